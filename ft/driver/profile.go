package driver

import (
	"fmt"
	"io"
	"strconv"
	"strings"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"github.com/ftkvm/ftkvm/ft"
	"github.com/ftkvm/ftkvm/ft/wire"
)

// The replica profile: how epochs end and what their ends cost on each
// side, next to the machine's exit profile (vmm.ExitProfile). An epoch
// ends at a guest-caused exit, at a halt, or (after the kick bound, or
// for a joining or diverged backup) with a checkpoint (ft/doc.go, P2 and
// the checkpoint rule); the costs are the capture and install of
// checkpoints, the state hashes of verify mode, the encoding and sending
// of messages, and the vCPU's waits in the node.
//
// It is kept under the replica's lock, at epoch ends and message
// boundaries, never per exit: the per-exit path (Point with ActGo) only
// pays a type switch over the messages it already sends. The link's
// writer goroutine keeps its own counters in atomics.

// wireTypes sizes the per-message-type tables (wire.Type values are
// small; anything beyond shares the last slot).
const wireTypes = 16

type profOp struct {
	n     uint64
	ns    int64
	bytes uint64
}

func (o *profOp) add(start time.Time, bytes int) {
	o.n++
	o.ns += int64(time.Since(start))
	o.bytes += uint64(bytes)
}

type replicaProfile struct {
	// Messages sent (by type, with their frame bytes and encoding time)
	// and received (by type).
	sent, recv [wireTypes]profOp

	epochEnds, haltEnds       uint64 // EpochEnd sent (primary) or received (backup): at an exit, at a halt
	kickCheckpoints, fullCkpt uint64 // Checkpoint sent or received: incremental (a kick point), full

	capture, install, hash profOp
	// Repairs (verify mode): states installed after a divergence (full
	// ones or page repairs), their bytes, and the pages they changed
	// (memHash.digestChanged).
	repairs, pageRepairs, repairPages, repairBytes uint64
	// The ticker's stalls (driver.go, tickerStall): how often and the
	// longest.
	stalls              uint64
	stallMax, stallLock time.Duration
	waits               [8]profOp // the vCPU waiting in the node, by ft.WaitReason

	// The link writer's side (atomics: its own goroutine).
	writes     atomic.Uint64
	writeNs    atomic.Int64
	writeBytes atomic.Int64
}

func wireSlot(t wire.Type) int { return min(int(t), wireTypes-1) }

// sentMsg notes a message handed to the link (mu held); encStart is when
// its encoding began, or zero if it was not timed.
func (p *replicaProfile) sentMsg(m wire.Msg, frame int, encStart time.Time) {
	o := &p.sent[wireSlot(m.Type())]
	o.n++
	o.bytes += uint64(frame)
	if !encStart.IsZero() {
		o.ns += int64(time.Since(encStart))
	}
	p.epochKind(m)
}

// recvMsg notes a message read from the link (mu held).
func (p *replicaProfile) recvMsg(m wire.Msg) {
	o := &p.recv[wireSlot(m.Type())]
	o.n++
	if c, ok := m.(wire.Checkpoint); ok {
		o.bytes += uint64(len(c.State))
	}
	p.epochKind(m)
}

func (p *replicaProfile) epochKind(m wire.Msg) {
	switch m := m.(type) {
	case wire.EpochEnd:
		if m.Halt {
			p.haltEnds++
		} else {
			p.epochEnds++
		}
	case wire.Checkpoint:
		if m.Full || m.Repair {
			// A page repair replaces the state as a full one does.
			p.fullCkpt++
		} else {
			p.kickCheckpoints++
		}
	}
}

// ReplicaProfile is the replica profile as a report (docs/PROFILE.md).
// Times are wall time in ns, counts since the replica started.
type ReplicaProfile struct {
	Role string `json:"role"`
	// Epochs ended (primary) or replayed (backup), from the node.
	Epochs           uint64 `json:"epochs"`
	CheckpointEpochs uint64 `json:"checkpoint_epochs"`
	CheckpointBytes  uint64 `json:"checkpoint_bytes"`
	// How the epochs sent (primary) or received (backup) ended.
	EndedAtExit       uint64 `json:"ended_at_exit"`
	EndedAtHalt       uint64 `json:"ended_at_halt"`
	EndedByCheckpoint uint64 `json:"ended_by_checkpoint"` // at a kick point, after the kick bound
	FullCheckpoints   uint64 `json:"full_checkpoints"`    // a joining or repaired backup (page repairs too)
	// Repairs (backup, verify mode): states installed after a divergence,
	// their bytes, and how many pages of this replica's memory they
	// changed (those that differed from the primary's). PageRepairs: of
	// them, those that carried only the pages that differed (the rest
	// carried the full state).
	Repairs       uint64 `json:"repairs"`
	PageRepairs   uint64 `json:"page_repairs"`
	RepairBytes   uint64 `json:"repair_bytes"`
	RepairedPages uint64 `json:"repaired_pages"`
	// Stalls: times this replica's ticker (due every millisecond) ran at
	// least 100 ms late, its process not scheduled or its lock held; the
	// peer's silence over them is not counted. StallMaxNs: the longest.
	Stalls     uint64 `json:"stalls"`
	StallMaxNs int64  `json:"stall_max_ns"`
	// StallLockNs: the part of all stalls the ticker waited for the lock
	// (the vCPU thread held it); the rest, it was not scheduled.
	StallLockNs int64 `json:"stall_lock_ns"`

	Capture Op `json:"capture"` // primary: checkpoints captured (machine state and pages, encoded)
	Install Op `json:"install"` // backup: checkpoints decoded and installed
	Hash    Op `json:"hash"`    // verify mode: state hashes (registers, dirtied pages)
	// Send is the link writer: its writes to the socket (batches of
	// frames), their bytes and the time they blocked.
	Send Op `json:"send"`

	Sent     []MsgOp `json:"sent"`     // by message type: count, frame bytes, encoding time
	Received []MsgOp `json:"received"` // by message type: count, checkpoint state bytes
	Waits    []Wait  `json:"waits"`    // the vCPU waiting in the node
}

// Op is a count, a total time and bytes.
type Op struct {
	Count uint64 `json:"count"`
	Ns    int64  `json:"ns"`
	Bytes uint64 `json:"bytes"`
}

// MsgOp is one message type's line.
type MsgOp struct {
	Type string `json:"type"`
	Op
}

// Wait is the time the vCPU waited for one reason (ft.WaitReason).
type Wait struct {
	Reason string `json:"reason"`
	Count  uint64 `json:"count"`
	Ns     int64  `json:"ns"`
}

func op(o profOp) Op { return Op{Count: o.n, Ns: o.ns, Bytes: o.bytes} }

// Profile returns the replica profile. Any goroutine.
func (r *Replica) Profile() ReplicaProfile {
	r.mu.Lock()
	defer r.mu.Unlock()
	p := &r.prof
	st := r.node.Status()
	rp := ReplicaProfile{
		Role: st.Role.String(), Epochs: st.Epochs, CheckpointEpochs: st.CheckpointEpochs, CheckpointBytes: st.CheckpointBytes,
		EndedAtExit: p.epochEnds, EndedAtHalt: p.haltEnds, EndedByCheckpoint: p.kickCheckpoints, FullCheckpoints: p.fullCkpt,
		Capture: op(p.capture), Install: op(p.install), Hash: op(p.hash),
		Repairs: p.repairs, PageRepairs: p.pageRepairs, RepairBytes: p.repairBytes, RepairedPages: p.repairPages,
		Stalls: p.stalls, StallMaxNs: int64(p.stallMax), StallLockNs: int64(p.stallLock),
		Send: Op{Count: p.writes.Load(), Ns: p.writeNs.Load(), Bytes: uint64(p.writeBytes.Load())},
	}
	for t, o := range p.sent {
		if o.n > 0 {
			rp.Sent = append(rp.Sent, MsgOp{Type: wire.Type(t).String(), Op: op(o)})
		}
	}
	for t, o := range p.recv {
		if o.n > 0 {
			rp.Received = append(rp.Received, MsgOp{Type: wire.Type(t).String(), Op: op(o)})
		}
	}
	for w, o := range p.waits {
		if o.n > 0 {
			rp.Waits = append(rp.Waits, Wait{Reason: ft.WaitReason(w).String(), Count: o.n, Ns: o.ns})
		}
	}
	return rp
}

// WriteTable prints the replica profile for a person.
func (p ReplicaProfile) WriteTable(w io.Writer) error {
	var err error
	pr := func(format string, args ...any) {
		if err == nil {
			_, err = fmt.Fprintf(w, format, args...)
		}
	}
	dir := "received"
	if p.Role == "primary" {
		dir = "sent"
	}
	pr("replica profile (%s): %d epochs, %d ended by a checkpoint (%s)\n", p.Role, p.Epochs, p.CheckpointEpochs, mib(p.CheckpointBytes))
	pr("epoch ends %s: %d at an exit, %d at a halt, %d by a checkpoint at a kick, %d full checkpoints\n",
		dir, p.EndedAtExit, p.EndedAtHalt, p.EndedByCheckpoint, p.FullCheckpoints)
	if p.Stalls > 0 {
		pr("stalls: the ticker ran at least 100 ms late %d times, at most by %s ms; %s ms of them waiting for the lock\n",
			p.Stalls, msStr(p.StallMaxNs), msStr(p.StallLockNs))
	}
	if p.Repairs > 0 {
		pr("repairs: %d (%d of the differing pages only, %d full states) installed %s and changed %d pages (%s)\n",
			p.Repairs, p.PageRepairs, p.Repairs-p.PageRepairs, mib(p.RepairBytes), p.RepairedPages, mib(p.RepairedPages*4096))
	}
	rows := [][]string{{"work", "count", "ms", "µs each", "MiB"}}
	for _, o := range []struct {
		name string
		Op
	}{{"capture", p.Capture}, {"install", p.Install}, {"hash", p.Hash}, {"send (socket writes)", p.Send}} {
		rows = append(rows, []string{o.name, u(o.Count), msStr(o.Ns), usEach(o.Ns, o.Count), mibNum(o.Bytes)})
	}
	pr("%s", table(rows))
	if len(p.Sent) > 0 {
		rows = [][]string{{"sent", "count", "encode ms", "MiB"}}
		for _, m := range p.Sent {
			rows = append(rows, []string{m.Type, u(m.Count), msStr(m.Ns), mibNum(m.Bytes)})
		}
		pr("\n%s", table(rows))
	}
	if len(p.Received) > 0 {
		rows = [][]string{{"received", "count", "checkpoint MiB"}}
		for _, m := range p.Received {
			rows = append(rows, []string{m.Type, u(m.Count), mibNum(m.Bytes)})
		}
		pr("\n%s", table(rows))
	}
	if len(p.Waits) > 0 {
		var ws []string
		for _, w := range p.Waits {
			ws = append(ws, fmt.Sprintf("%s %d (%s ms)", w.Reason, w.Count, msStr(w.Ns)))
		}
		pr("\nvCPU waits in the node: %s\n", strings.Join(ws, ", "))
	}
	return err
}

// table lays rows out in columns, indented by two spaces: the first
// column (a name) aligned left, the others (numbers) right.
func table(rows [][]string) string {
	var width []int
	for _, r := range rows {
		for i, c := range r {
			if i == len(width) {
				width = append(width, 0)
			}
			width[i] = max(width[i], utf8.RuneCountInString(c))
		}
	}
	var b strings.Builder
	for _, r := range rows {
		line := " "
		for i, c := range r {
			pad := strings.Repeat(" ", width[i]-utf8.RuneCountInString(c))
			if i == 0 {
				line += " " + c + pad
			} else {
				line += "  " + pad + c
			}
		}
		b.WriteString(strings.TrimRight(line, " ") + "\n")
	}
	return b.String()
}

func u(n uint64) string { return strconv.FormatUint(n, 10) }

func msStr(ns int64) string { return fmt.Sprintf("%.1f", float64(ns)/1e6) }

func usEach(ns int64, n uint64) string {
	if n == 0 {
		return "-"
	}
	return fmt.Sprintf("%.1f", float64(ns)/1e3/float64(n))
}

func mibNum(b uint64) string { return fmt.Sprintf("%.2f", float64(b)/(1<<20)) }

func mib(b uint64) string { return mibNum(b) + " MiB" }
