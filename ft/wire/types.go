package wire

import (
	"fmt"
	"strconv"
)

// Position is a point in the guest's instruction stream that both replicas
// can find again: the number of guest-caused exits since the machine
// started and, for the exact-epoch clocks, the instructions
// retired since the last of them. The exit clock keeps Instr at zero.
// Positions compare lexicographically, Exits first.
type Position struct {
	Exits uint64
	Instr uint64
}

// Compare returns -1, 0 or +1 as p is before, at or after q.
func (p Position) Compare(q Position) int {
	switch {
	case p.Exits < q.Exits:
		return -1
	case p.Exits > q.Exits:
		return 1
	case p.Instr < q.Instr:
		return -1
	case p.Instr > q.Instr:
		return 1
	}
	return 0
}

// Less reports whether p is before q.
func (p Position) Less(q Position) bool { return p.Compare(q) < 0 }

func (p Position) String() string {
	if p.Instr == 0 {
		return strconv.FormatUint(p.Exits, 10)
	}
	return strconv.FormatUint(p.Exits, 10) + "+" + strconv.FormatUint(p.Instr, 10)
}

// Kind says what a log record, an event or an output is. Kinds are shared
// by the three so that a later device adds one constant, not three.
type Kind uint8

const (
	// KindClock is an environment read of virtual time (the PIT counter,
	// the RTC, the TSC MSR all read vmm.Environment.Now): Value is the ns.
	KindClock Kind = 1
	// KindTimer is an asynchronous PIT tick: Value is the virtual time it
	// fires at (vmm.Target.FireTimer).
	KindTimer Kind = 2
	// KindUART is an asynchronous byte arriving on the UART: Value is the
	// byte (vmm.Target.Receive).
	KindUART Kind = 3
	// KindConsole is an output: bytes the UART transmits, in Data.
	KindConsole Kind = 4
	// KindNetRx is an asynchronous Ethernet frame arriving on a network
	// interface: Value is the interface's index (vmm.Config.NICs), Data
	// the frame (vmm.Target.ReceiveFrame).
	KindNetRx Kind = 5
	// KindNetTx is an output: a frame the guest transmits. Data is the
	// interface's index (one byte) followed by the frame (NetTxData).
	KindNetTx Kind = 6
	// KindDiskDone is an asynchronous event: a disk request the disk's
	// I/O goroutine performed completes in the guest
	// (vmm.Target.CompleteDisk). Value is the request's sequence number
	// on its disk; Data is the disk's index (vmm.Config.Disks) and the
	// request's virtio-blk status, one byte each (DiskDoneData). A backup
	// delivers it at the same point, after its own I/O goroutine
	// performed the same request, and checks that its status is this one.
	KindDiskDone Kind = 7
)

// DiskDoneData is a KindDiskDone event's Data: the disk, then the status.
func DiskDoneData(dst []byte, disk int, status uint8) []byte {
	return append(dst[:0], byte(disk), status)
}

// DiskDone splits a KindDiskDone event's Data into the disk and the
// status; ok is false unless it is exactly two bytes naming a disk below
// MaxDisks.
func DiskDone(data []byte) (disk int, status uint8, ok bool) {
	if len(data) != 2 || int(data[0]) >= MaxDisks {
		return 0, 0, false
	}
	return int(data[0]), data[1], true
}

// NetTxData is a KindNetTx output's Data: the interface index, then the
// frame. NetTxFrame splits it again.
func NetTxData(dst []byte, nic int, frame []byte) []byte {
	return append(append(dst[:0], byte(nic)), frame...)
}

// NetTxFrame splits a KindNetTx output's Data into the interface index
// and the frame; ok is false for empty data.
func NetTxFrame(data []byte) (nic int, frame []byte, ok bool) {
	if len(data) == 0 {
		return 0, nil, false
	}
	return int(data[0]), data[1:], true
}

func (k Kind) String() string {
	switch k {
	case KindClock:
		return "clock"
	case KindTimer:
		return "timer"
	case KindUART:
		return "uart"
	case KindConsole:
		return "console"
	case KindNetRx:
		return "net-rx"
	case KindNetTx:
		return "net-tx"
	case KindDiskDone:
		return "disk-done"
	}
	return "kind(" + strconv.Itoa(int(k)) + ")"
}

// Event is an asynchronous event the primary buffered during an epoch and
// both replicas deliver at its end.
type Event struct {
	Kind  Kind
	Value uint64
	Data  []byte // empty for the timer and the UART
}

func (e Event) String() string {
	if len(e.Data) > 0 {
		return fmt.Sprintf("%v(%d, %d bytes)", e.Kind, e.Value, len(e.Data))
	}
	return fmt.Sprintf("%v(%d)", e.Kind, e.Value)
}

// Digest is a SHA-256 hash (files in the handshake, state in verify mode).
type Digest [32]byte

// Role is a replica's part in the pair.
type Role uint8

const (
	RolePrimary Role = 1
	RoleBackup  Role = 2
)

func (r Role) String() string {
	switch r {
	case RolePrimary:
		return "primary"
	case RoleBackup:
		return "backup"
	}
	return "role(" + strconv.Itoa(int(r)) + ")"
}

// Policy is when the primary waits for the backup's acknowledgements.
type Policy uint8

const (
	// PolicyOutputCommit (VMware FT's output rule): log records stream;
	// an output leaves the machine only once every record before it,
	// its own included, is acknowledged. The guest does not wait.
	PolicyOutputCommit Policy = 1
	// PolicyStrict (the paper's): the vCPU waits for the acknowledgement
	// of each log record before it goes on.
	PolicyStrict Policy = 2
)

func (p Policy) String() string {
	switch p {
	case PolicyOutputCommit:
		return "output-commit"
	case PolicyStrict:
		return "strict"
	}
	return "policy(" + strconv.Itoa(int(p)) + ")"
}

// Clock is what measures positions. Both replicas must use the same.
type Clock uint8

const (
	// ClockExits counts guest-caused exits; Position.Instr stays 0.
	ClockExits Clock = 0
	// ClockStep single-steps every instruction: positions are exact
	// (exits, instructions since the last exit).
	ClockStep Clock = 1
	// ClockPerf counts instructions with hardware performance counters
	// and single-steps the last few: positions as ClockStep's.
	ClockPerf Clock = 2
)

func (c Clock) String() string {
	switch c {
	case ClockExits:
		return "exits"
	case ClockStep:
		return "step"
	case ClockPerf:
		return "perf"
	}
	return "clock(" + strconv.Itoa(int(c)) + ")"
}

// RefuseReason says why a handshake was refused.
type RefuseReason uint8

const (
	RefuseVersion  RefuseReason = 1  // a different protocol version
	RefuseRole     RefuseReason = 2  // two primaries or two backups
	RefuseKernel   RefuseReason = 3  // a different kernel (by hash)
	RefuseInitrd   RefuseReason = 4  // a different initrd (by hash)
	RefuseCmdline  RefuseReason = 5  // a different command line (by hash)
	RefuseMemory   RefuseReason = 6  // a different memory size
	RefuseClock    RefuseReason = 7  // a different epoch clock
	RefuseBusy     RefuseReason = 8  // the primary already has a backup
	RefuseProtocol RefuseReason = 9  // the peer broke the protocol
	RefuseWitness  RefuseReason = 10 // a different witness, or one side has none
	RefuseWindows  RefuseReason = 11 // the primary uses interrupt windows the backup cannot place exactly
	RefuseCPU      RefuseReason = 12 // the guest would see a different CPU (CPUID)
	RefuseJoin     RefuseReason = 13 // the primary's guest runs already, and the backup was not told to join
	RefuseDisks    RefuseReason = 14 // different disks (count, size, read-only, contents), or disks on a joining backup
	RefuseNICs     RefuseReason = 15 // different network interfaces (count, addresses)
)

func (r RefuseReason) String() string {
	switch r {
	case RefuseVersion:
		return "protocol version"
	case RefuseRole:
		return "role"
	case RefuseKernel:
		return "kernel"
	case RefuseInitrd:
		return "initrd"
	case RefuseCmdline:
		return "command line"
	case RefuseMemory:
		return "memory size"
	case RefuseClock:
		return "epoch clock"
	case RefuseBusy:
		return "busy"
	case RefuseProtocol:
		return "protocol error"
	case RefuseWitness:
		return "witness"
	case RefuseWindows:
		return "interrupt windows"
	case RefuseCPU:
		return "cpu"
	case RefuseJoin:
		return "join"
	case RefuseDisks:
		return "disks"
	case RefuseNICs:
		return "network interfaces"
	}
	return "reason(" + strconv.Itoa(int(r)) + ")"
}
