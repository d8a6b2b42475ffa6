package ft

import (
	"github.com/ftkvm/ftkvm/ft/wire"
)

// The primary's rules. References are to Bressoud & Schneider,
// "Hypervisor-based fault tolerance", ACM TOCS 14(1), 1996, section 3, as
// adapted to KVM (ft/doc.go).

func (n *Node) primaryStep() Action {
	switch n.op.kind {
	case opPoint, opHalt:
		return n.primaryPoint()
	case opRead:
		return n.p0Read()
	case opOutput:
		return n.primaryOutput()
	case opFinish:
		return n.primaryFinish()
	}
	panic("ft: no call in progress")
}

// p0Read is P0: "an environment instruction's result is sent to the
// backup as [epoch, position, kind, value]". Under strict the vCPU waits
// for its acknowledgement.
func (n *Node) p0Read() Action {
	o := &n.op
	if o.stage == stStart {
		n.started = true
		if !n.protected {
			return Action{Kind: ActGo, Value: o.value}
		}
		n.seq++
		n.send(wire.Record{Seq: n.seq, Epoch: n.epoch, Pos: o.pt.Pos, Kind: o.rkind, Value: o.value})
		o.waitSeq, o.stage = n.seq, stAck
	}
	if n.mustWait(o.waitSeq) {
		return wait(WaitAck)
	}
	return Action{Kind: ActGo, Value: o.value}
}

// mustWait: strict's rule, "the primary waits for the ack of each log
// record before going on".
func (n *Node) mustWait(seq uint64) bool {
	return n.cfg.Policy == Strict && n.protected && n.acked < seq
}

// p1Buffer is P1: "an asynchronous event (PIT tick, UART byte) is
// buffered", never delivered mid-epoch. Timer events coalesce into the
// latest: the PIT's Fire(now) delivers one edge due by now and keeps the
// later ones due, which the driver posts again (no tick is lost).
//
// Received frames are bounded: at most MaxPendingFrames wait for an epoch
// end; more are dropped and counted (Status.FramesDropped), as a full NIC
// queue drops them, so a flood cannot grow the primary's memory or an
// EpochEnd without limit.
func (n *Node) p1Buffer(ev Event) {
	if ev.Kind == wire.KindNetRx {
		if n.pendingFrames >= MaxPendingFrames {
			n.st.FramesDropped++
			return
		}
		n.pendingFrames++
	}
	if ev.Kind == wire.KindTimer {
		for i := range n.events {
			if n.events[i].Kind == wire.KindTimer {
				n.events[i].Value = max(n.events[i].Value, ev.Value)
				return
			}
		}
	}
	if len(ev.Data) > 0 {
		ev.Data = append([]byte(nil), ev.Data...)
	}
	n.events = append(n.events, ev)
}

// MaxPendingFrames bounds the received frames a primary buffers for one
// epoch end (P1).
const MaxPendingFrames = 64

// deliverable reports whether an epoch end now would deliver anything:
// UART bytes need room in the receiver.
func (n *Node) deliverable() bool {
	for i := range n.events {
		if n.events[i].Kind != wire.KindUART || n.rxSpace > 0 {
			return true
		}
	}
	return false
}

// take removes the events deliverable now. UART bytes beyond the
// receiver's room stay for a later epoch: delivered, they would be lost
// (identically on both replicas, but lost).
func (n *Node) take() []Event {
	if len(n.events) == 0 {
		return nil
	}
	var out []Event
	room := n.rxSpace
	keep := n.events[:0]
	for _, e := range n.events {
		if e.Kind == wire.KindUART {
			if room <= 0 {
				keep = append(keep, e)
				continue
			}
			room--
		}
		if e.Kind == wire.KindNetRx {
			n.pendingFrames--
		}
		out = append(out, e)
	}
	clear(n.events[len(keep):])
	n.events = keep
	return out
}

// epochDue: "the primary ends an epoch at the first such exit after its
// epoch length has passed, or at once at HLT when events are pending".
// Length is virtual time: in exits an epoch of an idle guest would hold a
// tick for seconds. An epoch with nothing to deliver is not ended (its end
// would be a message and nothing else: records and heartbeats already
// carry the positions the backup needs), except in verify mode, where each
// epoch end checks the replicas' states.
func (n *Node) epochDue(now int64) bool {
	if n.cfg.EpochInstructions > 0 {
		if n.instrs-n.epochStartI < n.cfg.EpochInstructions {
			return false
		}
	} else if now-n.epochStart < n.epochLen {
		return false
	}
	return n.deliverable() || n.cfg.Verify && n.protected
}

// overdue: the epoch's end has been due for the kick bound with no
// guest-caused exit.
func (n *Node) overdue(now int64) bool {
	return n.due && now-n.dueSince >= n.kickAfter && n.deliverable()
}

// primaryPoint decides at each point: go on, end the epoch (P2), or end
// it with a checkpoint. The first case is the exit path: no allocation.
func (n *Node) primaryPoint() Action {
	o := &n.op
	for {
		switch o.stage {
		case stStart:
			pt := &o.pt
			n.observe(pt.Now)
			n.pos, n.rxSpace, n.started = pt.Pos, pt.RxSpace, true
			n.instrs = max(n.instrs, pt.Instructions)
			switch {
			case pt.Kick:
				n.kicked = false
				if n.joining || n.repairReady() || n.protected && n.overdue(n.now) {
					return n.checkpointEpoch()
				}
				if n.overdue(n.now) {
					// Unprotected: nobody replays; deliver as a lone VMM.
					n.p2EndEpoch(false)
					continue
				}
				return goAction
			case o.kind == opHalt:
				if !n.deliverable() {
					return wait(WaitEvent)
				}
				if n.p2EndEpoch(true) {
					return Action{Kind: ActHash}
				}
				continue
			case n.epochDue(n.now):
				if n.p2EndEpoch(false) {
					return Action{Kind: ActHash}
				}
				continue
			}
			return goAction

		case stHashed:
			n.sendEpochEnd()

		case stCheckpointed:
			n.sendCheckpoint()

		case stAck:
			if n.mustWait(o.waitSeq) {
				return wait(WaitAck)
			}
			o.stage = stDelivered
			if len(o.events) > 0 {
				return Action{Kind: ActDeliver, Events: o.events}
			}

		case stDelivered:
			// "... delivers them, and starts the next epoch."
			n.epoch++
			n.st.Epochs++
			n.epochStart, n.epochStartI, n.due = n.now, n.instrs, false
			return goAction

		default:
			panic("ft: bad stage")
		}
	}
}

// p2EndEpoch is P2: "at the end of the epoch it sends the buffered events,
// waits for the ack as the policy requires, delivers them, and starts the
// next epoch". In verify mode the state hash is taken first, at the
// boundary, before the events change the state: then it reports true and
// the caller returns ActHash.
func (n *Node) p2EndEpoch(halt bool) (hash bool) {
	o := &n.op
	o.events, o.halt = n.take(), halt
	if n.protected && n.cfg.Verify {
		o.stage = stHashed
		return true
	}
	n.sendEpochEnd()
	return false
}

func (n *Node) sendEpochEnd() {
	o := &n.op
	if n.protected {
		n.seq++
		n.send(wire.EpochEnd{Seq: n.seq, Epoch: n.epoch, Pos: n.pos, Halt: o.halt, Events: o.events,
			Verify: o.hashed, Hash: o.hash})
		o.waitSeq = n.seq
	}
	o.stage = stAck
}

// checkpointEpoch ends the epoch at a kick point: "after a bound the
// primary kicks the vCPU and ends the epoch with an incremental checkpoint
// instead. The backup installs it, and the buffered events are delivered
// after it, at the same state on both sides." A joining backup and a
// repair get the full state the same way.
func (n *Node) checkpointEpoch() Action {
	o := &n.op
	o.stage = stCheckpointed
	if !n.joining && n.repairReady() && n.repairPages {
		// A page repair: the driver compares the backup's page hashes
		// with its own and captures the pages that differ, with the rest
		// of the state. The hashes are the driver's now.
		o.repair = true
		against := n.peerPages
		n.peerPages = nil
		return Action{Kind: ActCheckpoint, Repair: true, Against: against}
	}
	o.full = n.joining || n.repairReady()
	return Action{Kind: ActCheckpoint, Full: o.full, Join: n.joining}
}

// repairReady: the backup asked for its repair, and a page repair has
// all the backup's page hashes.
func (n *Node) repairReady() bool {
	return n.repair && (!n.repairPages || n.pagesIn)
}

func (n *Node) sendCheckpoint() {
	o := &n.op
	// Events are taken after the capture: they are delivered after it.
	o.events = n.take()
	// A join or a repair asked for while an incremental state was being
	// captured (the driver captures without its lock) is not served by
	// it: a joining backup, which has no state, is sent nothing, and
	// either waits for the full state of the next kick point (Tick asks
	// for one while joining or repair is set).
	//
	// A page repair is sent only to the backup whose hashes it was
	// computed against: one that still waits for it (repair set, and
	// no other request reset the hashes since).
	pageRepairOK := !o.repair || n.repair && n.repairPages && n.pagesIn && n.peerPages == nil
	if n.link == linkUp && (n.protected || n.joining) && (o.full || !n.joining) && pageRepairOK {
		n.seq++
		n.send(wire.Checkpoint{Seq: n.seq, Epoch: n.epoch, Pos: n.pos, Full: o.full, Repair: o.repair, OutSeq: n.outSeq,
			OutBytes: n.outBytes, Events: o.events, State: o.state})
		o.waitSeq = n.seq
		n.st.CheckpointEpochs++
		n.st.CheckpointBytes += uint64(len(o.state))
		if n.joining {
			n.joining, n.protected = false, true
			n.note(NoteProtected, nil)
		}
		if o.full || o.repair {
			n.repair, n.repairPages, n.pagesIn = false, false, false
		}
	}
	o.state = nil
	o.stage = stAck
}

// primaryOutput: "the primary waits for the ack only before an output
// leaves the machine" (output-commit), or has waited for every record
// already (strict). The output's own record is acknowledged first too: then
// a promoted backup knows where it was and replays up to it.
func (n *Node) primaryOutput() Action {
	o := &n.op
	if o.stage == stStart {
		n.started = true
		n.outSeq++
		out := Out{Seq: n.outSeq, Kind: o.rkind, Offset: n.outBytes, Data: append([]byte(nil), o.data...), At: n.now}
		n.outBytes += consoleLen(out.Kind, out.Data)
		if !n.protected {
			n.perform = append(n.perform, out)
			return goAction
		}
		n.seq++
		n.send(wire.Output{Seq: n.seq, Epoch: n.epoch, Pos: o.pt.Pos, OutSeq: out.Seq, Done: n.performed,
			Kind: out.Kind, Offset: out.Offset, Data: out.Data})
		n.doneSent = max(n.doneSent, n.performed)
		n.held = append(n.held, heldOut{out: out, seq: n.seq})
		o.waitSeq, o.stage = n.seq, stAck
	}
	if n.mustWait(o.waitSeq) {
		return wait(WaitAck)
	}
	return goAction
}

// release hands out the held outputs whose records are acknowledged, in
// order; all of them when no backup is left to wait for.
func (n *Node) release() {
	i := 0
	for ; i < len(n.held); i++ {
		if n.protected && n.held[i].seq > n.acked {
			break
		}
		n.perform = append(n.perform, n.held[i].out)
	}
	n.held = append(n.held[:0], n.held[i:]...)
}

// primaryFinish: the guest ended. The backup exits with the same status
// once it has the goodbye; the primary waits for that acknowledgement (or
// the backup's death) so that the backup does not fail over instead.
func (n *Node) primaryFinish() Action {
	o := &n.op
	if o.stage == stStart {
		if n.protected {
			if n.performed > n.doneSent {
				n.send(wire.Performed{OutSeq: n.performed})
				n.doneSent = n.performed
			}
			n.seq++
			n.send(wire.Goodbye{Seq: n.seq, Status: int32(o.status)})
			o.waitSeq = n.seq
		}
		o.stage = stAck
	}
	if n.protected && n.acked < o.waitSeq {
		return wait(WaitAck)
	}
	return Action{Kind: ActStop, Status: o.status}
}

func (n *Node) primaryStepMsg(m wire.Msg) {
	switch m := m.(type) {
	case wire.Ack:
		if m.Seq > n.seq {
			n.protocolError(errorf("ack of record %d, only %d sent", m.Seq, n.seq))
			return
		}
		if m.Seq > n.acked {
			n.acked = m.Seq
			n.release()
		}
	case wire.CheckpointRequest:
		// Verify mode: the backup saw a divergence and waits for our
		// state. It comes at the next kick point; a page repair's once
		// the backup's page hashes are all here.
		if n.protected {
			n.repair, n.repairPages, n.pagesIn = true, m.Pages, false
			n.peerPages, n.peerTotal = nil, 0
			if !m.Pages {
				n.kick, n.kicked, n.kickedAt = true, true, n.now
			}
			what := "the full state"
			if m.Pages {
				what = "the pages that differ"
			}
			n.note(NoteDivergence, errorf("%w reported by the backup at epoch %d position %v: %s; repairing it with %s",
				ErrDivergence, m.Epoch, m.Pos, m.Reason, what))
		}
	case wire.PageHashes:
		n.stepPageHashes(m)
	case wire.Heartbeat:
		// Liveness only.
	default:
		n.protocolError(errorf("a primary got %v", m.Type()))
	}
}

// stepPageHashes collects a diverged backup's page hashes (ft/doc.go,
// verify mode): in order from page 0, one per page of the guest's memory,
// after its request for a page repair. Anything else is a protocol error.
func (n *Node) stepPageHashes(m wire.PageHashes) {
	if !n.protected {
		return // a backup given up on; its link is gone
	}
	pages := n.cfg.Guest.MemSize / PageSize
	end := m.First + uint64(len(m.Hashes))
	switch {
	case !n.repair || !n.repairPages || n.pagesIn:
		n.protocolError(errorf("page hashes without a request for a page repair"))
		return
	case m.Total != pages:
		n.protocolError(errorf("page hashes for %d pages; the guest has %d", m.Total, pages))
		return
	case m.First != uint64(len(n.peerPages)) || end < m.First || end > pages || m.Last != (end == pages):
		n.protocolError(errorf("page hashes for pages %d to %d of %d (last %v); page %d was expected next",
			m.First, end, m.Total, m.Last, len(n.peerPages)))
		return
	}
	if n.peerPages == nil {
		n.peerPages = make([]uint64, 0, pages)
	}
	n.peerPages = append(n.peerPages, m.Hashes...)
	n.peerTotal = m.Total
	if m.Last {
		n.pagesIn = true
		n.kick, n.kicked, n.kickedAt = true, true, n.now
	}
}

// backupJoined: the handshake with a backup succeeded. A backup that
// boots alongside a guest that has not run yet is protected at once;
// otherwise it first gets the full state at the next kick point
// (re-protection).
func (n *Node) backupJoined() {
	if !n.started {
		n.protected = true
		n.note(NoteProtected, nil)
		return
	}
	n.joining, n.kick, n.kicked, n.kickedAt = true, true, true, n.now
}

// backupGone: running unprotected from here; held outputs leave now.
func (n *Node) backupGone() {
	n.protected, n.joining, n.repair = false, false, false
	n.repairPages, n.pagesIn, n.peerPages = false, false, nil
	n.release()
}

func (n *Node) primaryTick(now int64) {
	// Confirm performed outputs ("performed up to seq N").
	if n.protected && n.performed > n.doneSent {
		n.send(wire.Performed{OutSeq: n.performed})
		n.doneSent = n.performed
	}
	// Progress for the backup: it may pass every point before ours.
	if n.protected && (n.hbEpoch != n.epoch || n.hbPos != n.pos) {
		n.send(wire.Heartbeat{Epoch: n.epoch, Pos: n.pos})
		n.hbEpoch, n.hbPos = n.epoch, n.pos
	}
	// The kick bound.
	// With an exact clock every instruction is a point: an epoch end
	// never waits for an exit, and no kick is needed.
	due := n.deliverable() && now-n.epochStart >= n.epochLen && n.cfg.EpochInstructions == 0
	if due && !n.due {
		n.dueSince = now
	}
	n.due = due
	need := n.overdue(now) || n.joining || n.repairReady()
	if need && n.op.kind == opNone && (!n.kicked || now-n.kickedAt >= n.kickAfter) {
		n.kick, n.kicked, n.kickedAt = true, true, now
	}
}
