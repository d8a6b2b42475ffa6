package ft

import (
	"bytes"
	"fmt"

	"github.com/ftkvm/ftkvm/ft/wire"
)

// The backup's rules, and failover. References as in primary.go.

func (n *Node) backupStep() Action {
	switch n.op.kind {
	case opPoint, opHalt:
		return n.backupPoint()
	case opRead:
		return n.p3Read()
	case opOutput:
		return n.p4Output()
	case opFinish:
		return n.backupFinish()
	}
	panic("ft: no call in progress")
}

// backupPoint replays the primary's decisions at a point. The head of the
// log says what the primary did next, so it also says how far the backup
// may run ahead: a record at position q proves the primary passed every
// point before q without ending the epoch; a heartbeat does the same for
// its position.
func (n *Node) backupPoint() Action {
	o := &n.op
	pt := &o.pt
	for {
		switch o.stage {
		case stStart:
			if n.goodbye && n.stopsAtGoodbye() {
				return n.stopGoodbye()
			}
			n.pos = pt.Pos
			n.instrs = max(n.instrs, pt.Instructions)
			if (n.diverged || !n.hasState) && !n.skipToRepair() {
				// Waiting for the primary's full state (a repair, or
				// a join): what comes before it is replaced by it.
				if n.diverged {
					return n.awaitRepair()
				}
				return wait(WaitLog)
			}
			if len(n.log) == 0 {
				if n.replaying {
					// Failover: "it replays everything it received and
					// goes live where the log ends".
					n.goLive()
					return n.primaryPoint()
				}
				// After the goodbye the primary ran the guest to its
				// end: it passed every point before that end.
				ahead := n.hasState && (n.goodbye || n.hbEpoch == n.epoch && pt.Pos.Less(n.hbPos))
				switch {
				case pt.Kick && ahead:
					// A kick point is not a place the primary can be
					// found at: from here the guest runs to its next
					// exit, which is safe only if the primary passed
					// it; before it, the primary may still end the
					// epoch with a checkpoint of a state this replica
					// would have run past.
					return goAction
				case pt.Kick:
					return wait(WaitLog)
				case ahead && o.kind == opHalt:
					return n.diverge(errorf("%w: the guest halted at %v; the primary's went on to %v in epoch %d",
						ErrDivergence, pt.Pos, n.hbPos, n.epoch))
				case ahead:
					return goAction
				}
				return wait(WaitLog)
			}
			switch m := n.log[0].(type) {
			case wire.Checkpoint:
				return n.checkpointHead(m)
			case wire.EpochEnd:
				if a, done := n.epochEndHead(m); done {
					return a
				}
			case wire.Record, wire.Output:
				q := posOf(m)
				switch {
				case pt.Kick:
					return goAction
				case pt.Pos.Less(q) && o.kind == opHalt:
					return n.diverge(errorf("%w: the guest halted at %v; the primary's went on to %s",
						ErrDivergence, pt.Pos, describe(m)))
				case pt.Pos.Less(q):
					return goAction
				}
				return n.diverge(errorf("%w: passed %v without %s", ErrDivergence, pt.Pos, describe(m)))
			default:
				panic("ft: " + m.Type().String() + " in the log")
			}

		case stHashed:
			// Verify mode: "the backup compares" the hashes at the end.
			m := n.log[0].(wire.EpochEnd)
			if o.hash != m.Hash {
				if n.checkRepair {
					return n.diverge(errorf("%w: the state hash at the end of epoch %d (position %v) differs from the primary's after a page repair; falling back to the full state",
						ErrDivergence, m.Epoch, m.Pos))
				}
				return n.diverge(errorf("%w: the state hash at the end of epoch %d (position %v) differs from the primary's",
					ErrDivergence, m.Epoch, m.Pos))
			}
			// A page repair is confirmed by the first hash that matches.
			n.checkRepair = false
			o.stage = stDeliver

		case stDeliver:
			m := n.log[0].(wire.EpochEnd)
			o.stage = stDelivered
			if len(m.Events) > 0 {
				o.woke = true
				return Action{Kind: ActDeliver, Events: m.Events}
			}

		case stDelivered:
			n.pop()
			n.epoch++
			n.st.Epochs++
			o.stage = stGoOn

		case stGoOn:
			// From here the guest runs on to its next exit. Before that
			// exit the primary may still end the new epoch with a
			// checkpoint of a state this replica must not run past: go
			// on only once the log or a heartbeat shows the primary
			// passed this point.
			if n.goodbye && n.stopsAtGoodbye() {
				return n.stopGoodbye()
			}
			if len(n.log) == 0 {
				if n.replaying || n.goodbye || n.hbEpoch == n.epoch && pt.Pos.Less(n.hbPos) {
					return goAction
				}
				return wait(WaitLog)
			}
			switch m := n.log[0].(type) {
			case wire.Checkpoint:
				return n.checkpointHead(m)
			case wire.EpochEnd, wire.Record, wire.Output:
				if !pt.Pos.Less(posOf(m)) {
					// Another epoch ended here (in Halt), or a
					// divergence: the point is looked at afresh.
					o.stage = stStart
					continue
				}
			}
			return goAction

		case stInstalled:
			cp := n.log[0].(wire.Checkpoint)
			o.stage = stCkptDelivered
			if len(cp.Events) > 0 {
				return Action{Kind: ActDeliver, Events: cp.Events}
			}

		case stCkptDelivered:
			n.installed(n.log[0].(wire.Checkpoint))
			n.pop()
			// Now at the primary's point: decide again whether the
			// guest may run on (the next record may be a checkpoint
			// too).
			pt.Pos = n.pos
			if o.kind == opPoint && pt.Kick {
				o.stage = stStart
			} else {
				o.stage = stGoOn
			}

		default:
			panic("ft: bad stage")
		}
	}
}

// epochEndHead is P5: "at the epoch's end it delivers the primary's events
// at exactly that point". It reports done with the action to return, or
// moves the call to the hash or delivery stage.
func (n *Node) epochEndHead(m wire.EpochEnd) (Action, bool) {
	o := &n.op
	pt := &o.pt
	if m.Epoch != n.epoch {
		return n.diverge(errorf("%w: the primary ended epoch %d; this replica is in epoch %d", ErrDivergence, m.Epoch, n.epoch)), true
	}
	if pt.Kick {
		return goAction, true // never a boundary
	}
	switch c := pt.Pos.Compare(m.Pos); {
	case c < 0 && o.kind == opHalt:
		return n.diverge(errorf("%w: the guest halted at %v; the primary's went on to %v", ErrDivergence, pt.Pos, m.Pos)), true
	case c < 0:
		return goAction, true
	case c > 0:
		return n.diverge(errorf("%w: passed %v, where the primary ended epoch %d", ErrDivergence, m.Pos, m.Epoch)), true
	}
	// At the boundary. The primary ended the epoch either when the exit
	// was offered (At) or while its guest waited in HLT there (Halt); the
	// backup does the same in the same call. Only one epoch can end in
	// At, so after it the backup goes on; more may end in Halt, one per
	// call, until an interrupt is pending.
	switch {
	case m.Halt && o.kind == opPoint:
		return goAction, true
	case !m.Halt && o.kind == opHalt:
		return n.diverge(errorf("%w: the guest halted at %v, where the primary's ended epoch %d without halting",
			ErrDivergence, pt.Pos, m.Epoch)), true
	}
	if m.Verify {
		o.stage = stHashed
		return Action{Kind: ActHash}, true
	}
	o.stage = stDeliver
	return Action{}, false
}

// checkpointHead: the primary ended this epoch with a checkpoint (or a
// repair or a join gives its full state). The backup installs it, then
// delivers the events. It may be behind the primary's position in the same
// epoch (it runs ahead only as far as the primary went): before an
// incremental checkpoint it first runs to the checkpoint's position (the
// count at the primary's last exit), which the checkpoint proves the
// primary passed. Every exit of the epoch is then executed on both
// replicas: device requests take effect at exits, and what they write
// outside guest memory (a disk image, docs/DEVICES.md) is in no
// checkpoint. The pages the backup wrote are among those the checkpoint
// carries. Installing needs a quiescent vCPU: at a kick point or in Halt
// (unless this Halt delivered events: they woke the guest, which runs on
// to the position first); at an exit, yield first.
func (n *Node) checkpointHead(m wire.Checkpoint) Action {
	o := &n.op
	if !replaces(m) {
		if m.Epoch != n.epoch {
			return n.diverge(errorf("%w: a checkpoint ends epoch %d; this replica is in epoch %d", ErrDivergence, m.Epoch, n.epoch))
		}
		if m.Pos.Less(o.pt.Pos) {
			return n.diverge(errorf("%w: at %v, past the primary's checkpoint at %v", ErrDivergence, o.pt.Pos, m.Pos))
		}
		if o.pt.Pos.Less(m.Pos) && (o.kind == opPoint || o.woke) {
			// Also in Halt when this call delivered events: they woke
			// the guest here, as they woke the primary's, which ran on
			// to the checkpoint's position (a disk completion, then the
			// next request: its exits must execute here too).
			return goAction
		}
	}
	if o.kind == opPoint && !o.pt.Kick {
		return Action{Kind: ActYield}
	}
	o.stage = stInstalled
	return Action{Kind: ActInstall, State: m.State, Full: m.Full, Repair: m.Repair, Join: !n.hasState}
}

// replaces: the checkpoint replaces the backup's state as a whole (a
// join's or a repair's full state, or a page repair), rather than ending
// an epoch both replicas ran.
func replaces(cp wire.Checkpoint) bool { return cp.Full || cp.Repair }

func (n *Node) installed(cp wire.Checkpoint) {
	n.epoch, n.pos, n.outSeq, n.outBytes = cp.Epoch+1, cp.Pos, cp.OutSeq, cp.OutBytes
	n.st.Epochs++
	n.st.CheckpointEpochs++
	n.st.CheckpointBytes += uint64(len(cp.State))
	if !n.hasState {
		// A joining backup: the outputs before its state are history.
		n.hasState = true
		n.confirmed = max(n.confirmed, cp.OutSeq)
		n.trimAbsorbed()
	}
	if n.diverged {
		n.diverged, n.pagesDue, n.pagesSent = false, false, false
		n.st.Repairs++
		n.st.RepairBytes += uint64(len(cp.State))
		// A page repair is right only if the pages not sent were
		// equal: the next compared hash says (ft/doc.go, verify mode).
		n.checkRepair = cp.Repair
		if cp.Repair {
			n.st.PageRepairs++
		}
		n.note(NoteRepaired, nil)
	}
}

// skipToRepair drops the log up to the full checkpoint that repairs (or
// starts) this replica: the epochs before it are replaced by the primary's
// state. The outputs they announce are kept: not confirmed, they may need
// redoing.
func (n *Node) skipToRepair() bool {
	for len(n.log) > 0 {
		switch m := n.log[0].(type) {
		case wire.Checkpoint:
			if replaces(m) {
				return true
			}
		case wire.Output:
			n.confirm(m.Done)
			n.absorb(Out{Seq: m.OutSeq, Kind: m.Kind, Offset: m.Offset, Data: m.Data, At: n.now})
		}
		n.pop()
	}
	return false
}

// p3Read is P3: "at an environment instruction it takes the value from the
// log, waiting if it has not arrived. It verifies that position and kind
// match. A mismatch is a divergence."
func (n *Node) p3Read() Action {
	o := &n.op
	live := Action{Kind: ActGo, Value: o.value}
	if n.diverged || !n.hasState {
		// Its execution is to be replaced by the primary's state: it runs
		// on to its next point, where it waits for that.
		return live
	}
	if len(n.log) == 0 {
		if n.replaying {
			// "Environment instructions become real there."
			n.goLive()
			return live
		}
		if n.goodbye {
			return live
		}
		return wait(WaitLog)
	}
	m, ok := n.log[0].(wire.Record)
	if !ok || m.Epoch != n.epoch || m.Pos != o.pt.Pos || m.Kind != o.rkind {
		return n.diverge(errorf("%w: %v read at %v in epoch %d; the primary's log has %s next",
			ErrDivergence, o.rkind, o.pt.Pos, n.epoch, describe(n.log[0])))
	}
	n.pop()
	return Action{Kind: ActGo, Value: m.Value}
}

// p4Output is P4: "it absorbs outputs instead of performing them". Each is
// matched against the primary's output record (same number, position and
// bytes) and kept until the primary confirms it performed it. A promoted
// backup still replaying performs those not confirmed.
func (n *Node) p4Output() Action {
	o := &n.op
	if o.stage == stStart {
		n.outSeq++
		n.outBytes += consoleLen(o.rkind, o.data)
		o.stage = stMatch
	}
	if n.diverged || !n.hasState {
		return goAction
	}
	off := n.outBytes - consoleLen(o.rkind, o.data) // this output's place in the console stream
	if len(n.log) == 0 {
		if n.replaying {
			n.goLive()
			n.perform = append(n.perform, Out{Seq: n.outSeq, Kind: o.rkind, Offset: off, Data: bytes.Clone(o.data), At: n.now})
			return goAction
		}
		if n.goodbye {
			return goAction
		}
		return wait(WaitLog)
	}
	m, ok := n.log[0].(wire.Output)
	if !ok || m.Epoch != n.epoch || m.Pos != o.pt.Pos || m.OutSeq != n.outSeq || m.Kind != o.rkind || m.Offset != off || !bytes.Equal(m.Data, o.data) {
		return n.diverge(errorf("%w: output %d (%v, %d bytes at console byte %d) at %v; the primary's log has %s next",
			ErrDivergence, n.outSeq, o.rkind, len(o.data), off, o.pt.Pos, describe(n.log[0])))
	}
	n.pop()
	n.confirm(m.Done)
	out := Out{Seq: m.OutSeq, Kind: m.Kind, Offset: m.Offset, Data: m.Data, At: n.now}
	if !n.replaying {
		n.absorb(out)
	} else if out.Seq > n.confirmed {
		// Failover: "outstanding outputs whose performance was not
		// confirmed are performed", as uncertain.
		out.Uncertain = true
		n.perform = append(n.perform, out)
	}
	return goAction
}

func (n *Node) absorb(out Out) {
	if out.Seq > n.confirmed {
		n.absorbed = append(n.absorbed, out)
	}
}

func (n *Node) confirm(seq uint64) {
	if seq > n.confirmed {
		n.confirmed = seq
		n.trimAbsorbed()
	}
}

func (n *Node) trimAbsorbed() {
	i := 0
	for i < len(n.absorbed) && n.absorbed[i].Seq <= n.confirmed {
		i++
	}
	if i > 0 {
		n.absorbed = append(n.absorbed[:0], n.absorbed[i:]...)
	}
}

// diverge logs a divergence loudly and asks the primary for its state
// (verify mode's repair; any mismatch is repaired the same way). The
// backup waits for it at its next point.
func (n *Node) diverge(err error) Action {
	o := &n.op
	n.st.Divergences++
	n.note(NoteDivergence, err)
	if n.replaying {
		// No primary is left to repair from: go on from this state.
		n.log = nil
		n.goLive()
		switch o.kind {
		case opRead:
			return Action{Kind: ActGo, Value: o.value}
		case opOutput:
			n.perform = append(n.perform, Out{Seq: n.outSeq, Kind: o.rkind, Offset: n.outBytes - consoleLen(o.rkind, o.data), Data: bytes.Clone(o.data), At: n.now})
			return goAction
		}
		o.stage = stStart
		return n.primaryPoint()
	}
	if !n.diverged {
		n.diverged = true
		// In verify mode the backup asks for the pages that differ only
		// (a page repair), unless a page repair was installed and no
		// hash has matched since: then for the full state.
		pages := n.peer.Verify && n.hasState && !n.checkRepair
		if n.checkRepair {
			n.note(NoteDivergence, errorf("%w: the last page repair did not make the replicas equal; asking for the full state", ErrDivergence))
		}
		n.checkRepair, n.pagesDue, n.pagesSent = false, pages, false
		n.send(wire.CheckpointRequest{Epoch: n.epoch, Pos: n.pos, Pages: pages, Reason: err.Error()})
	}
	switch o.kind {
	case opRead:
		return Action{Kind: ActGo, Value: o.value}
	case opOutput:
		return goAction
	}
	return n.awaitRepair()
}

// awaitRepair: a diverged backup at a point waits for its repair. For a
// page repair it first takes its page hashes and sends them (ActHash with
// Pages): at a quiescent point (a kick point or in Halt), so that its
// state does not change between the hashes and the install, which happens
// at that same point (at an exit it yields first, as for an install).
func (n *Node) awaitRepair() Action {
	o := &n.op
	o.stage = stStart
	if !n.pagesDue {
		return wait(WaitRepair)
	}
	if o.kind == opPoint && !o.pt.Kick {
		return Action{Kind: ActYield}
	}
	o.stage = stPageHashed
	return Action{Kind: ActHash, Pages: true}
}

// sendPageHashes sends a diverged backup's page hashes in frames of at
// most wire.MaxPageHashes, then waits for the repair.
func (n *Node) sendPageHashes(regs Digest, pages []uint64) {
	if n.op.kind == opStopped {
		return
	}
	n.op.stage = stStart
	if !n.diverged || !n.pagesDue {
		return // repaired or promoted meanwhile
	}
	n.pagesDue, n.pagesSent = false, true
	for first := 0; ; first += wire.MaxPageHashes {
		end := min(first+wire.MaxPageHashes, len(pages))
		last := end == len(pages)
		m := wire.PageHashes{Epoch: n.epoch, Pos: n.pos, First: uint64(first), Total: uint64(len(pages)), Last: last,
			Hashes: pages[first:end:end]}
		if last {
			m.Regs = regs
		}
		n.send(m)
		if last {
			return
		}
	}
}

// stopsAtGoodbye: after the primary's goodbye, whether the backup stops
// here. Otherwise it replays the rest of the log and runs its guest on to
// the same end ("the backup exits with the same status"), so that every
// exit the primary executed executes here too: device requests take effect
// at exits, and a disk image is kept identical only by performing the same
// writes (docs/DEVICES.md). It stops at once when it has no state to run
// (a join not completed, a divergence waiting for repair) or its guest
// halted with nothing left in the log to wake it.
func (n *Node) stopsAtGoodbye() bool {
	return n.diverged || !n.hasState || len(n.log) == 0 && n.op.kind == opHalt
}

func (n *Node) stopGoodbye() Action {
	return Action{Kind: ActStop, Status: n.goodbyeSt}
}

// backupFinish: the guest ended on the backup by itself. "When the guest
// ends normally on the primary, the backup exits with the same status":
// it waits for the goodbye (or fails over and finishes as the primary).
func (n *Node) backupFinish() Action {
	o := &n.op
	switch {
	case n.goodbye:
		if o.status != n.goodbyeSt {
			n.st.Divergences++
			n.note(NoteDivergence, errorf("%w: the guest ended here with status %d, on the primary with %d",
				ErrDivergence, o.status, n.goodbyeSt))
		}
		return n.stopGoodbye()
	case n.replaying:
		n.goLive()
		return Action{Kind: ActStop, Status: o.status}
	}
	return wait(WaitPrimary)
}

func (n *Node) backupStepMsg(m wire.Msg) {
	switch m := m.(type) {
	case wire.Record:
		n.append(m.Seq, m)
	case wire.EpochEnd:
		n.append(m.Seq, m)
	case wire.Output:
		if n.append(m.Seq, m) {
			n.confirm(m.Done)
		}
	case wire.Checkpoint:
		if m.Repair && !(n.diverged && n.pagesSent) {
			// Its pages are those in which this replica's memory, as
			// hashed, differed: only a backup that sent its hashes and
			// waited since can install it.
			n.protocolError(errorf("a page repair for a backup that sent no page hashes"))
			return
		}
		if n.append(m.Seq, m) {
			n.kick = true // the vCPU may be computing: bring it to a kick point
		}
	case wire.Goodbye:
		if n.inSeq(m.Seq) {
			n.goodbye, n.goodbyeSt = true, int(m.Status)
			n.notes = append(n.notes, Note{Kind: NoteGoodbye, Epoch: n.epoch, Pos: n.pos, Status: n.goodbyeSt})
			n.kick = true
		}
	case wire.Performed:
		n.confirm(m.OutSeq)
	case wire.Heartbeat:
		n.hbEpoch, n.hbPos = m.Epoch, m.Pos
	case wire.DiskData:
		// The driver writes it to the image (TakesDisks): only a backup
		// joining a running guest receives images, before its state.
		if !n.TakesDisks() {
			n.protocolError(errorf("disk contents for a backup that holds the guest's state or did not join"))
		}
	default:
		n.protocolError(errorf("a backup got %v", m.Type()))
	}
}

func (n *Node) append(seq uint64, m wire.Msg) bool {
	if !n.inSeq(seq) {
		return false
	}
	n.log = append(n.log, m)
	return true
}

// inSeq checks a log record's sequence number: TCP delivers in order, so a
// gap is a broken peer.
func (n *Node) inSeq(seq uint64) bool {
	if seq != n.recv+1 {
		n.protocolError(errorf("log record %d after %d", seq, n.recv))
		return false
	}
	n.recv = seq
	return true
}

func (n *Node) pop() {
	n.log[0] = nil
	n.log = n.log[1:]
	if len(n.log) == 0 {
		n.log = n.log[:0:0]
	}
}

// promote: the primary is dead. "It replays everything it received and
// goes live where the log ends ... From the next epoch on it is the
// primary. It runs unprotected until a new backup joins."
//
// With a witness, a backup that was paired (up: the handshake had
// succeeded) and could take over asks it first (claim); Claimed then
// takes over, or stops it.
func (n *Node) promote(why error, up bool) {
	if n.goodbye {
		n.note(NotePrimaryLost, why)
		return // the guest ended; nothing to take over
	}
	if !n.hasState && !n.holdsFull() {
		n.note(NotePrimaryLost, why)
		n.failed = fmt.Errorf("%w (%v)", ErrNoState, why)
		return
	}
	if up && n.fencing() {
		n.claim(why)
		return
	}
	n.note(NotePrimaryLost, why)
	n.takeOver()
}

// takeOver makes the backup the primary, replaying its log first.
func (n *Node) takeOver() {
	n.role, n.replaying, n.started = RolePrimary, true, true
	n.pagesDue, n.pagesSent, n.checkRepair = false, false, false
	n.st.Promotions++
	n.events, n.pendingFrames = n.events[:0], 0
	n.epochStart, n.epochStartI = n.now, n.instrs
	// A diverged backup skips to the repair first: the outputs the log
	// announces before it are absorbed, and performed below with the rest.
	if n.diverged && !n.skipToRepair() {
		// The repair will never come; go on from this replica's state.
		n.diverged = false
		n.log = nil
		n.note(NoteDivergence, errorf("%w: promoted before the repair: the guest goes on from the backup's diverged state", ErrDivergence))
	}
	n.st.Seam, n.st.SeamUncertain = n.seam()
	n.notes = append(n.notes, Note{Kind: NoteTakeover, Epoch: n.epoch, Pos: n.pos, Seam: n.st.Seam, Uncertain: n.st.SeamUncertain})
	// "Outstanding outputs whose performance was not confirmed are
	// performed": a duplicate can only be one whose confirmation was in
	// flight.
	for _, out := range n.absorbed {
		out.Uncertain = true
		n.perform = append(n.perform, out)
	}
	n.absorbed = nil
}

// seam says where in the console stream a promoted backup's output
// begins: the first byte of the first output the dead primary did not
// confirm (every byte before it, the primary wrote), or where the stream
// stands when it confirmed all. uncertain counts the bytes of the outputs
// it did not confirm, absorbed or still in the log: the primary may have
// written them, and they are performed again, identically.
func (n *Node) seam() (at, uncertain uint64) {
	at = n.outBytes
	if n.op.kind == opOutput && n.op.stage == stMatch {
		// An output counted but not matched yet (it waits for the log):
		// it comes after the seam.
		at -= consoleLen(n.op.rkind, n.op.data)
	}
	found := false
	visit := func(seq, off uint64, k Kind, data []byte) {
		switch {
		case seq <= n.confirmed:
			at = off + consoleLen(k, data)
		case !found:
			at, found = off, true
			fallthrough
		default:
			uncertain += consoleLen(k, data)
		}
	}
	for _, o := range n.absorbed {
		visit(o.Seq, o.Offset, o.Kind, o.Data)
	}
	for _, m := range n.log {
		switch m := m.(type) {
		case wire.Output:
			visit(m.OutSeq, m.Offset, m.Kind, m.Data)
		case wire.Checkpoint:
			if !found {
				// Installed before any output to redo: the stream
				// stands where the primary's did (a repair's full
				// state replaces a diverged count).
				at = m.OutBytes
			}
		}
	}
	return at, uncertain
}

// goLive: the log is replayed; the promoted backup is the primary.
func (n *Node) goLive() {
	n.replaying = false
	n.epochStart, n.epochStartI = n.now, n.instrs
	n.note(NoteLive, nil)
}

func posOf(m wire.Msg) Position {
	switch m := m.(type) {
	case wire.Record:
		return m.Pos
	case wire.Output:
		return m.Pos
	case wire.EpochEnd:
		return m.Pos
	case wire.Checkpoint:
		return m.Pos
	}
	return Position{}
}

// describe names a log record in divergence messages.
func describe(m wire.Msg) string {
	switch m := m.(type) {
	case wire.Record:
		return fmt.Sprintf("a %v read at %v", m.Kind, m.Pos)
	case wire.Output:
		return fmt.Sprintf("output %d (%v, %d bytes at console byte %d) at %v", m.OutSeq, m.Kind, len(m.Data), m.Offset, m.Pos)
	case wire.EpochEnd:
		return fmt.Sprintf("the end of epoch %d at %v", m.Epoch, m.Pos)
	case wire.Checkpoint:
		return fmt.Sprintf("a checkpoint ending epoch %d at %v", m.Epoch, m.Pos)
	}
	return m.Type().String()
}

// holdsFull reports whether the log holds a full checkpoint, received
// whole: a joining backup whose primary dies after sending its state, but
// before the backup installed it, installs it and takes over.
func (n *Node) holdsFull() bool {
	for _, m := range n.log {
		if cp, ok := m.(wire.Checkpoint); ok && cp.Full {
			return true
		}
	}
	return false
}
