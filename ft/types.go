package ft

import (
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/ftkvm/ftkvm/ft/wire"
)

// ProtocolVersion is sent in Hello; peers with another version are refused.
// Version 2 added the pair's instances and the witness to Hello; version 3
// the interrupt windows and the CPUID hash; version 4 the disks to Hello
// and the console stream's offsets to Output and Checkpoint; version 5 the
// network interfaces to Hello (and the frame kinds, wire.KindNetRx and
// wire.KindNetTx); version 6 the disk completion events (wire.KindDiskDone:
// disk requests are performed off the vCPU thread and complete at epoch
// ends), with no new Hello field; version 7 page repairs (wire.PageHashes,
// CheckpointRequest.Pages, Checkpoint.Repair).
const ProtocolVersion = 7

// PageSize is the page of the page repair's hashes (wire.PageHashes).
const PageSize = 4096

// The wire types the protocol speaks in, under shorter names.
type (
	Position = wire.Position
	Event    = wire.Event
	Kind     = wire.Kind
	Role     = wire.Role
	Policy   = wire.Policy
	Digest   = wire.Digest
)

const (
	RolePrimary  = wire.RolePrimary
	RoleBackup   = wire.RoleBackup
	Strict       = wire.PolicyStrict
	OutputCommit = wire.PolicyOutputCommit
)

// Identity is what the handshake compares: both replicas must run the same
// guest on the same clock.
type Identity struct {
	Kernel, Initrd, Cmdline Digest // SHA-256 of the files and the command line
	MemSize                 uint64 // bytes
	Clock                   wire.Clock
	// WallClock (Unix ns) is the primary's RTC base; the backup adopts the
	// primary's (Note.Peer of NoteLinkUp). It is not compared.
	WallClock int64
	// Windows: on a primary, its machine requests interrupt windows; on a
	// backup, its host places them exactly, so it can follow a primary
	// that uses them (and adopts the primary's choice: Note.Peer). The
	// primary decides; a backup that cannot follow refuses.
	Windows bool
	// CPU: SHA-256 of the guest's CPUID table (vmm.HostTraits). Compared,
	// except for a backup that joins a running guest: it installs the
	// primary's CPUID with its state.
	CPU Digest
	// Disks: each disk image's size, read-only flag and SHA-256 of its
	// contents at the replica's start, in order. Compared: each replica
	// writes its own copy, so the copies must start identical.
	Disks []wire.Disk
	// NICs: each network interface's MAC address, in order. Compared:
	// the guest reads them from its devices.
	NICs []wire.NIC
}

// Config configures a Node. Durations are compared with the timestamps
// the driver passes in (Point.Now, Tick), in nanoseconds.
type Config struct {
	Role   Role
	Policy Policy // the primary's; zero means OutputCommit
	// Verify: the primary sends a state hash with each epoch end and ends
	// epochs every EpochLength even with nothing to deliver, so that a
	// divergence is seen within an epoch.
	Verify bool
	Guest  Identity
	// Join (a backup): accept a primary whose guest runs already and
	// receive its full state first. Without it such a primary is refused:
	// a backup meant to boot alongside its primary must not silently wait
	// for a whole memory's transfer instead.
	Join bool

	// EpochLength: an epoch ends at the first guest-caused exit at least
	// this long after it began (virtual time, from Point.Now), if it has
	// something to deliver (default 1 ms). At HLT it ends at once.
	EpochLength time.Duration
	// EpochInstructions, with an exact clock (the step clock), makes the
	// epoch length a number of retired guest instructions, as in the
	// paper: an epoch ends at the first point at least this many
	// instructions after it began (if it has something to deliver, or in
	// verify mode). Every instruction is then a point, so no epoch needs a
	// kick. 0: EpochLength (time) decides.
	EpochInstructions uint64
	// KickAfter: an epoch whose end is due but finds no guest-caused exit
	// for this long is ended by a kick and a checkpoint (default 1 ms).
	// It must be well below the guest's timer period: a guest computing
	// without exits gets one tick per checkpoint epoch, and ticks that
	// come slower than the timer's fall ever further behind.
	KickAfter time.Duration
	// Heartbeat: a link quiet for this long gets a heartbeat (default
	// 20 ms).
	Heartbeat time.Duration
	// Timeout: a peer heard nothing from for this long is dead (default
	// 100 ms).
	Timeout time.Duration

	// Witness names the witness both replicas claim at (SHA-256 of its
	// address; zero: none). With one, a replica that loses its peer after
	// the handshake does not go on by itself: it asks the witness
	// (Ready.Claim) and goes on only if it won (Claimed); the loser
	// stops. Without one, a cut link lets both go on (split brain).
	Witness Digest
	// Instance names this replica process; the driver draws it at random.
	// The primary's and the backup's together name the pair at the
	// witness. Required with a Witness.
	Instance Digest
}

func (c *Config) setDefaults() {
	if c.Policy == 0 {
		c.Policy = OutputCommit
	}
	def := func(d *time.Duration, v time.Duration) {
		if *d <= 0 {
			*d = v
		}
	}
	def(&c.EpochLength, time.Millisecond)
	def(&c.KickAfter, time.Millisecond)
	def(&c.Heartbeat, 20*time.Millisecond)
	def(&c.Timeout, 100*time.Millisecond)
}

// Point is a delivery point, as the vCPU loop offers it to the
// environment (vmm.Environment.At and Halt).
type Point struct {
	Pos Position
	// Kick: a return from KVM_RUN forced by the host (vmm.PointKick). It
	// is never an epoch boundary; Pos is the count at the last exit.
	Kick bool
	// Now is the driver's clock (ns), read at the point. It only times
	// the primary's decisions; it is not an environment read.
	Now int64
	// RxSpace is the UART's room (vmm.Target.RxSpace): bytes beyond it
	// stay buffered for a later epoch.
	RxSpace int
	// Instructions retired since boot, with an exact clock
	// (Config.EpochInstructions); 0 with the exit clock.
	Instructions uint64
}

// ActionKind is what the vCPU thread must do next.
type ActionKind uint8

const (
	// ActGo: done; the vCPU goes on. After Read, Action.Value is what the
	// guest reads.
	ActGo ActionKind = iota
	// ActWait: the vCPU must not go on. Block until anything else is
	// given to the node (Step, Tick, Async, Disconnected), then call
	// Continue. Action.Wait says for what.
	ActWait
	// ActDeliver: deliver Action.Events into the machine, in order, now
	// (vmm.Target.FireTimer, Receive), then call Continue.
	ActDeliver
	// ActHash: compute the state hash (vCPU registers and guest memory)
	// and call Hashed. With Action.Pages (a diverged backup, at a
	// quiescent point) compute the page hashes instead (the registers'
	// hash and a 64-bit hash per page of memory) and call HashedPages.
	ActHash
	// ActCheckpoint: capture the machine's state (Action.Full: complete,
	// else the pages dirtied since the last checkpoint) and call
	// Checkpointed with the blob. Only ever at a kick point, where the
	// vCPU is quiescent and the position exact.
	ActCheckpoint
	// ActInstall: install Action.State into the machine, then call
	// Continue. Only ever at a kick point or in Halt.
	ActInstall
	// ActYield: leave this point without running the guest: call the
	// kick function, then return from At (or Halt). The install waiting
	// for this replica happens at the kick point that follows.
	ActYield
	// ActStop: stop the machine; the process exits with Action.Status, or
	// fails with Action.Err.
	ActStop
)

var actionNames = [...]string{"go", "wait", "deliver", "hash", "checkpoint", "install", "yield", "stop"}

func (k ActionKind) String() string {
	if int(k) < len(actionNames) {
		return actionNames[k]
	}
	return "action(" + strconv.Itoa(int(k)) + ")"
}

// WaitReason says what an ActWait waits for.
type WaitReason uint8

const (
	WaitNone WaitReason = iota
	// WaitAck: the primary waits for the backup's acknowledgement (strict
	// policy, or Finish).
	WaitAck
	// WaitEvent: the primary's guest is halted with nothing to deliver.
	// The driver also wakes at its timer deadline and gives the node the
	// timer event (Async) before Continue.
	WaitEvent
	// WaitLog: the backup is ahead of the primary's log.
	WaitLog
	// WaitRepair: the backup diverged and waits for the primary's state.
	WaitRepair
	// WaitPrimary: the backup's guest ended; it waits for the primary's
	// goodbye, or for failover.
	WaitPrimary
	// WaitWitness: the peer is lost and the witness has not yet said
	// which replica goes on (Claimed).
	WaitWitness
)

var waitNames = [...]string{"nothing", "ack", "event", "log", "repair", "primary", "witness"}

func (w WaitReason) String() string {
	if int(w) < len(waitNames) {
		return waitNames[w]
	}
	return "wait(" + strconv.Itoa(int(w)) + ")"
}

// Action is the node's answer to a call from the vCPU thread. Its slices
// belong to the node and are valid until the next call.
type Action struct {
	Kind   ActionKind
	Value  uint64     // ActGo after Read
	Wait   WaitReason // ActWait
	Events []Event    // ActDeliver
	Full   bool       // ActCheckpoint, ActInstall
	// Pages (ActHash): the page hashes for a page repair (HashedPages).
	Pages bool
	// Repair (ActCheckpoint): a page repair: capture the pages whose
	// hashes differ from Against (the backup's, one per page) and all the
	// rest of the state but memory. ActInstall: the state is one.
	Repair  bool
	Against []uint64
	// Join (ActCheckpoint): the full state is for a backup that joins the
	// running guest; the driver sends the read-write disk images first
	// (wire.DiskData). ActInstall: this backup is joining, and must have
	// received them.
	Join   bool
	State  []byte // ActInstall
	Status int    // ActStop
	Err    error  // ActStop: the replica cannot go on
}

func (a Action) String() string {
	switch a.Kind {
	case ActGo:
		return fmt.Sprintf("go(%d)", a.Value)
	case ActWait:
		return "wait(" + a.Wait.String() + ")"
	case ActDeliver:
		return fmt.Sprintf("deliver%v", a.Events)
	case ActCheckpoint, ActInstall:
		return fmt.Sprintf("%v(full=%v, repair=%v, %d bytes)", a.Kind, a.Full, a.Repair, len(a.State))
	case ActStop:
		if a.Err != nil {
			return fmt.Sprintf("stop(%v)", a.Err)
		}
		return fmt.Sprintf("stop(%d)", a.Status)
	}
	return a.Kind.String()
}

// Out is an output to perform (write to the console). Uncertain: the
// failed primary may have performed it already; devices redo it (a
// console repeats the bytes, TCP drops the duplicate, a disk write is
// idempotent).
//
// Offset places a console output in the guest's console stream: its first
// byte is byte Offset of the console output since boot. A promoted backup
// knows it for every output it performs, so its console joins the dead
// primary's at a known byte, not at a guessed overlap.
//
// At is the node's time (the clock of Tick and Point.Now) when the guest
// produced it, or when a promoted backup replayed it: the driver measures
// how long outputs are held from it.
type Out struct {
	Seq       uint64
	Kind      Kind
	Offset    uint64
	Data      []byte
	Uncertain bool
	At        int64
}

// consoleLen is how far an output advances the console stream.
func consoleLen(k Kind, data []byte) uint64 {
	if k != wire.KindConsole {
		return 0
	}
	return uint64(len(data))
}

// Ready is what the node produced since the last Ready: the driver drains
// it after every call (or batch of calls), under the same lock.
type Ready struct {
	// Messages go to the peer, in this order.
	Messages []wire.Msg
	// Perform: outputs to perform now, in this order, by one goroutine;
	// then call Performed with the highest Seq done.
	Perform []Out
	// Kick: call the vCPU's kick function (any goroutine).
	Kick bool
	// Close: close the link after sending Messages (a refusal, a peer
	// declared dead, a protocol error).
	Close bool
	// Notes: state changes to log and show in the status.
	Notes []Note
	// Claim, if set: ask the witness which replica of the pair goes on
	// (Config.Witness), retrying until it answers, then call Claimed.
	Claim *Claim
}

// Claim asks the witness for the pair's survivor. The witness answers the
// first claim of a pair with its claimant's role, and every later claim
// of that pair with the same role: of two replicas that lost each other,
// exactly one goes on.
type Claim struct {
	Pair Digest // names the primary-backup pair (both Instances)
	Role Role   // the claimant's role when the pair was formed
}

// NoteKind tells what changed.
type NoteKind uint8

const (
	NoteLinkUp      NoteKind = iota + 1 // handshake accepted; Peer is the peer's Hello
	NoteRefused                         // the handshake was refused, by us or by the peer (Err)
	NoteProtected                       // primary: a backup holds its state; replication runs
	NoteBackupLost                      // primary: the backup is gone (Err); running unprotected
	NotePrimaryLost                     // backup: the primary is declared dead (Err); failover
	NoteLive                            // promoted backup: log replayed; it is the primary now, unprotected
	NoteDivergence                      // the replicas differ (Err says how)
	NoteRepaired                        // backup: installed the primary's state after a divergence
	NoteGoodbye                         // backup: the guest ended on the primary with Status
	NoteProtocol                        // the peer broke the protocol (Err); the link is closed
	NoteClaim                           // the peer is lost (Err); asking the witness which replica goes on
	NoteFenced                          // the witness chose the peer (Err): this replica stops
	NoteTakeover                        // backup: it takes over; Seam and Uncertain place its console output
)

var noteNames = [...]string{"", "link up", "refused", "protected", "backup lost", "primary lost",
	"live", "divergence", "repaired", "goodbye", "protocol error", "claim", "fenced", "takeover"}

func (k NoteKind) String() string {
	if int(k) < len(noteNames) && k > 0 {
		return noteNames[k]
	}
	return "note(" + strconv.Itoa(int(k)) + ")"
}

// Note is a state change for the driver to log and show.
type Note struct {
	Kind   NoteKind
	Epoch  uint64
	Pos    Position
	Status int        // NoteGoodbye
	Peer   wire.Hello // NoteLinkUp
	Err    error
	// NoteTakeover: the console byte offset from which the promoted
	// backup performs output (the dead primary confirmed every byte
	// before it), and how many bytes from there on the dead primary may
	// have written already (outputs it had not confirmed).
	Seam, Uncertain uint64
}

func (n Note) String() string {
	s := fmt.Sprintf("%v at epoch %d position %v", n.Kind, n.Epoch, n.Pos)
	if n.Kind == NoteGoodbye {
		s += fmt.Sprintf(", status %d", n.Status)
	}
	if n.Kind == NoteTakeover {
		s += fmt.Sprintf(", performing from console byte offset %d (%d bytes uncertain)", n.Seam, n.Uncertain)
	}
	if n.Err != nil {
		s += ": " + n.Err.Error()
	}
	return s
}

// Errors carried by notes and ActStop, for errors.Is.
var (
	ErrDivergence = errors.New("divergence")
	ErrRefused    = errors.New("handshake refused")
	ErrProtocol   = errors.New("protocol error")
	ErrPeerLost   = errors.New("peer lost")
	// ErrNoState: a backup lost its primary before it had the guest's
	// state (it was still waiting for the full checkpoint).
	ErrNoState = errors.New("the backup has no guest state to promote")
	// ErrFenced: the witness chose the other replica of the pair, which
	// goes on with the guest; this one must not.
	ErrFenced = errors.New("fenced")
)

// Status is a snapshot of the node for `ftkvm ctl status` and logs.
type Status struct {
	Role Role
	// Link: the handshake with a peer succeeded and the link is up.
	Link bool
	// Protected (primary): a backup holds the guest's state and receives
	// the log. A primary that is not protected says so.
	Protected bool
	Joining   bool // primary: a backup waits for the full state
	Replaying bool // promoted backup: still replaying the dead primary's log
	Diverged  bool // backup: waiting for a repair
	Claiming  bool // the peer is lost; waiting for the witness's answer
	Fenced    bool // the witness chose the peer: this replica stops

	Epoch   uint64
	Pos     Position
	Outputs uint64 // outputs the guest produced
	// ConsoleBytes: bytes of console output the guest produced since boot
	// (the console stream's length after Outputs).
	ConsoleBytes uint64
	// Performed: primary, outputs the driver performed; backup, outputs
	// the primary confirmed.
	Performed uint64
	Held      int    // primary: outputs waiting for acknowledgements
	LogSent   uint64 // primary: log records sent on this link
	LogAcked  uint64
	// LogReceived (backup): log records received on this link; the last
	// LogReceived-Backlog of them are replayed.
	LogReceived uint64
	Backlog     int // backup: log records received, not replayed yet

	Epochs           uint64 // epochs ended (primary) or replayed (backup)
	CheckpointEpochs uint64
	CheckpointBytes  uint64
	Divergences      uint64
	Repairs          uint64
	// PageRepairs (backup): of the repairs, those that carried only the
	// pages in which its memory differed (the rest carried the full
	// state); RepairBytes: the states of all repairs installed.
	PageRepairs uint64
	RepairBytes uint64
	Promotions  uint64
	// FramesDropped (primary): received frames dropped because
	// MaxPendingFrames waited for the epoch's end already (P1).
	FramesDropped uint64
	// Seam (after a promotion): the console byte offset from which this
	// replica performed output when it took over; SeamUncertain: how many
	// bytes from there the dead primary may have written already. Its
	// console joins the dead primary's at Seam, and those bytes repeat
	// identically.
	Seam, SeamUncertain uint64
}

func (s Status) String() string {
	state := s.Role.String()
	switch {
	case s.Role == RolePrimary && s.Replaying:
		state += ", promoted, replaying the log"
	case s.Role == RolePrimary && s.Protected:
		state += ", protected"
	case s.Role == RolePrimary && s.Joining:
		state += ", unprotected (a backup is joining)"
	case s.Role == RolePrimary:
		state += ", unprotected"
	case s.Diverged:
		state += ", diverged, waiting for repair"
	}
	switch {
	case s.Fenced:
		state += ", fenced (the witness chose the peer)"
	case s.Claiming:
		state += ", peer lost, waiting for the witness"
	}
	str := fmt.Sprintf("%s; epoch %d at %v; %d outputs, %d performed; %d checkpoint epochs (%d bytes); %d divergences, %d repairs",
		state, s.Epoch, s.Pos, s.Outputs, s.Performed, s.CheckpointEpochs, s.CheckpointBytes, s.Divergences, s.Repairs)
	if s.Repairs > 0 {
		str += fmt.Sprintf(" (%d of pages only; %d bytes of state)", s.PageRepairs, s.RepairBytes)
	}
	if s.Promotions > 0 {
		str += fmt.Sprintf("; took over performing from console byte offset %d (%d bytes uncertain)", s.Seam, s.SeamUncertain)
	}
	return str
}

func errorf(format string, args ...any) error { return fmt.Errorf(format, args...) }
