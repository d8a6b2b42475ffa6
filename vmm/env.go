package vmm

import (
	"errors"

	"github.com/ftkvm/ftkvm/vmm/snapshot"
)

// PointKind tells apart the kinds of delivery point.
type PointKind uint8

const (
	// PointExit is a guest-caused exit (port or MMIO access, HLT, interrupt
	// window, MSR access). A second replica running the same guest finds it
	// again at the same instruction, so events delivered here are replayable.
	PointExit PointKind = iota
	// PointKick is a return from KVM_RUN that the VMM forced (immediate_exit
	// and a signal) because the guest ran long without exiting. Its place in
	// the instruction stream depends on host timing: it is never replayable.
	PointKick
	// PointStep is the boundary after one guest instruction under the step
	// clock (Config.Epoch == EpochStep): KVM single-stepped it, or ftkvm
	// emulated it (RDTSC). Its position (Exits, Instrs) is exact, so
	// events delivered here are replayable.
	PointStep
)

func (k PointKind) String() string {
	switch k {
	case PointKick:
		return "kick"
	case PointStep:
		return "step"
	}
	return "exit"
}

// Point is a moment at which the environment may deliver asynchronous
// events into the guest.
type Point struct {
	Kind PointKind
	// Exits counts guest-caused exits since the machine started, this one
	// included; with Kind == PointKick it is the count at the last such exit.
	// It is the position a replica uses to find the point again.
	Exits uint64
	// Instrs counts guest instructions retired since that exit, under the
	// step clock: (Exits, Instrs) is the position. It is 0 at every
	// guest-caused exit and always 0 with the exit clock; at a kick it is
	// the count at the last step (a kick is still not a position).
	Instrs uint64
	// Delivered is set when the environment delivered an event here. At a
	// kick point the machine injects interrupts only then, so an
	// environment that never delivers at kicks keeps every injection at a
	// guest-caused exit.
	Delivered bool
}

// Target is what the environment delivers into: the machine's asynchronous
// event sinks. Its methods are called only on the vCPU thread, from inside
// At or Halt.
type Target interface {
	// TimerDeadline is the virtual time at which the PIT's counter 0 next
	// raises IRQ0, if it is running.
	TimerDeadline() (int64, bool)
	// FireTimer delivers that timer event as of virtual time now.
	FireTimer(now int64)
	// RxSpace is how many bytes the UART can receive without loss.
	RxSpace() int
	// Receive delivers one byte arriving on the UART.
	Receive(b byte)
	// ReceiveFrame delivers one Ethernet frame arriving on network
	// interface nic (the index in Config.NICs). The device copies it; a
	// frame it cannot hold is dropped and counted by the device, so the
	// outcome depends only on the guest's state here.
	ReceiveFrame(nic int, frame []byte)
	// CompleteDisk delivers the completion of request seq of disk (the
	// index in Config.Disks): the guest sees its result from here. It
	// waits for the disk's I/O goroutine if the request is not performed
	// yet, and returns the request's status; ok is false when no such
	// request is in flight (it was completed or dropped already), which
	// is then a no-op. See DiskEnvironment.
	CompleteDisk(disk int, seq uint64) (status uint8, ok bool)
	// Pending reports whether an interrupt is waiting to be injected.
	Pending() bool
	// Wake receives when the machine needs its vCPU thread back (a control
	// request) while the guest is halted: Halt then returns nil at once,
	// whether or not an interrupt is pending.
	Wake() <-chan struct{}
}

// Environment is the single seam through which everything that could make
// two runs of the same guest differ reaches it: (a) host time, read by the
// PIT, the RTC and the TSC MSR; (b) bytes arriving on the UART and frames
// arriving on network interfaces; (c) the decision of when a pending
// asynchronous event is delivered. The machine
// has no other source of time, input or interrupts. A primary replica
// records what passes through here; a backup replays it.
type Environment interface {
	// Now returns virtual time in nanoseconds since the machine started.
	Now() int64
	// Start is called once on the vCPU thread before the guest first runs.
	// kick forces the vCPU out of KVM_RUN (a PointKick follows); it may be
	// called from any goroutine.
	Start(kick func()) error
	// At is offered every delivery point. It delivers what it decides into
	// t. A non-nil error stops the machine (ErrQuit: the user asked).
	At(p Point, t Target) error
	// Halt is called at a HLT exit when the guest waits for an interrupt
	// with interrupts enabled and none is pending. It blocks until an
	// interrupt is pending in t, or returns an error that stops the machine.
	// It may return nil with nothing pending (when t.Wake fires); the
	// machine then serves its control requests and calls Halt again.
	Halt(p Point, t Target) error
	// Stop releases what Start acquired. The machine calls it once.
	Stop()
}

// ErrQuit is returned by an environment when the user asked to quit.
var ErrQuit = errors.New("quit requested")

// Freezer is an environment whose virtual time can stand still. The machine
// freezes it while it holds the vCPU for control requests (a pause, a
// snapshot, a migration's stop-and-copy), so the guest does not see the
// hold. Freeze and Thaw come in pairs, on the vCPU thread.
type Freezer interface {
	Freeze()
	Thaw()
}

// StateSaver is an environment with state of its own that snapshots carry:
// its virtual time, and events it holds but has not delivered yet.
// SaveState is called on the vCPU thread at a quiescent point (frozen);
// RestoreState before Run, by Machine.Install.
type StateSaver interface {
	SaveState(*snapshot.Env)
	RestoreState(*snapshot.Env)
}

// DiskCompletion reports a disk request performed by the disk's I/O
// goroutine: the disk (index in Config.Disks), the request's sequence
// number and its virtio-blk status (devices/virtio_blk.go).
type DiskCompletion struct {
	Disk   int
	Seq    uint64
	Status uint8
}

// DiskEnvironment is an environment that delivers disk completions: the
// machine then performs disk requests off the vCPU thread, reports each
// one performed to DiskDone, and the guest sees it complete only when the
// environment calls Target.CompleteDisk at a delivery point of its
// choosing (a replica logs that point). DiskDone is called on a disk's I/O
// goroutine: it must not block or call the machine. With an environment
// that is not one, the machine performs each request inside the guest's
// notification, on the vCPU thread.
type DiskEnvironment interface {
	DiskDone(c DiskCompletion)
}
