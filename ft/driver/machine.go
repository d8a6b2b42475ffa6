package driver

import (
	"io"

	"github.com/ftkvm/ftkvm/vmm"
	"github.com/ftkvm/ftkvm/vmm/snapshot"
)

// Machine is what the driver needs of the machine it replicates: a
// *vmm.Machine in ftkvm, a deterministic fake guest in the crash
// simulation (sim_test.go). Run calls the replica back as its
// vmm.Environment; the rest is called on the vCPU thread, from inside
// those calls (Attach excepted, before Run).
type Machine interface {
	vmm.Target // where the node's events are delivered

	// Run runs the guest until it ends (its status) or the environment
	// stops it (an error).
	Run() (int, error)

	// The dirty log, for checkpoints and the verify hash.
	EnableDirtyLog() error
	DirtyLog(bitmap []uint64) (int, error)
	BitmapWords() int

	// Guest memory, which the driver hashes and an install writes.
	Memory() []byte
	MemSize() uint64

	// WriteRegsHash writes the registers' part of the state hash.
	WriteRegsHash(w io.Writer) error
	// CheckpointWith captures state at a quiescent point; Install
	// replaces the machine's with a captured one.
	CheckpointWith(cp *vmm.Checkpoint, o vmm.CheckpointOptions) error
	Install(s *snapshot.State) error

	// SettleDisks completes the disk requests in flight (a capture's
	// first step); ServiceDisks takes those waiting (once the capture and
	// a join's images are sent); WaitDisk waits for one to be performed, from any
	// goroutine; DiskInFlight lists those performed and not delivered,
	// from any goroutine (vmm.Machine).
	SettleDisks()
	ServiceDisks()
	// DiskNextSeqs appends each disk's next request sequence number
	// (vmm.Machine), which an install checks against the state's.
	DiskNextSeqs(dst []uint64) []uint64
	WaitDisk(disk int, seq uint64)
	DiskInFlight(fn func(vmm.DiskCompletion))

	// Steps is the count of instructions retired under the step clock
	// (vmm.Stats.Steps).
	Steps() uint64
}

var (
	_ Machine             = (*vmm.Machine)(nil)
	_ vmm.DiskEnvironment = (*Replica)(nil)
)
