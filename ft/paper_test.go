package ft

import (
	"fmt"
	"slices"
	"strings"
	"testing"

	"github.com/ftkvm/ftkvm/ft/wire"
)

// One test per rule of the protocol, in the manner of etcd's
// raft_paper_test.go. References are to Bressoud & Schneider,
// "Hypervisor-based fault tolerance", ACM TOCS 14(1), 1996, section 3, and
// to the adapted wording of ft/doc.go.

// Reference: Bressoud & Schneider, section 3, rule P0.
// Rule P0 (ft/doc.go): "P0, primary: an environment instruction's result is sent to
// the backup as [epoch, position, kind, value]."
func TestP0PrimarySendsEnvironmentReads(t *testing.T) {
	p, _ := pair(t, OutputCommit, false)
	a := p.n.Read(at(5), wire.KindClock, 123456)
	if a.Kind != ActGo || a.Value != 123456 {
		t.Fatalf("read: %v, want go(123456)", a)
	}
	p.n.Read(at(5), wire.KindClock, 123460) // two reads at one exit
	wantMsgs(t, "records", p.drain(),
		wire.Record{Seq: 1, Epoch: 1, Pos: at(5), Kind: wire.KindClock, Value: 123456},
		wire.Record{Seq: 2, Epoch: 1, Pos: at(5), Kind: wire.KindClock, Value: 123460})

	// Unprotected, nobody is told.
	alone := newReplica(t, testConfig(RolePrimary, OutputCommit))
	if a := alone.n.Read(at(5), wire.KindClock, 7); a.Value != 7 {
		t.Fatalf("unprotected read: %v", a)
	}
	wantMsgs(t, "unprotected", alone.drain())
}

// Reference: Bressoud & Schneider, section 3, rule P1.
// Rule P1 (ft/doc.go): "P1, primary: an asynchronous event (PIT tick, UART byte) is
// buffered." It is never delivered in the middle of an epoch.
func TestP1PrimaryBuffersAsyncEvents(t *testing.T) {
	p, _ := pair(t, OutputCommit, false)
	p.n.Async(timer(100))
	p.n.Async(uart('a'))
	for e := uint64(1); e <= 50; e++ {
		// Every exit before the epoch length has passed: nothing is
		// delivered, nothing is sent.
		wantGo(t, "exit", p.n.Point(pt(e, int64(e)*ms/100)))
	}
	wantMsgs(t, "mid-epoch", without(p.drain()))
	if s := p.n.Status(); s.Epoch != 1 {
		t.Fatalf("epoch %d", s.Epoch)
	}
}

// Reference: Bressoud & Schneider, section 3, rule P2.
// Rule P2 (ft/doc.go): "P2, primary: at the end of the epoch it sends the buffered
// events, waits for the ack as the policy requires, delivers them, and
// starts the next epoch." and "The primary ends an epoch at the first such
// exit after its epoch length has passed."
func TestP2EpochEndsAtFirstExitAfterLength(t *testing.T) {
	for _, policy := range []Policy{Strict, OutputCommit} {
		t.Run(policy.String(), func(t *testing.T) {
			p, b := pair(t, policy, false)
			p.n.Async(timer(500_000))
			p.n.Async(uart('x'))
			wantGo(t, "before the length", p.n.Point(pt(9, ms-1)))
			a := p.n.Point(pt(10, ms))
			sent := p.drain()
			want := wire.EpochEnd{Seq: 1, Epoch: 1, Pos: at(10), Events: []Event{timer(500_000), uart('x')}}
			wantMsgs(t, "epoch end", without(sent), want)
			if policy == Strict {
				// The events wait for the backup's ack.
				wantWait(t, "strict", a, WaitAck)
				wantWait(t, "no ack yet", p.n.Continue(), WaitAck)
				b.step(sent...)
				p.step(b.drain()...)
				a = p.n.Continue()
			}
			a = wantAction(t, "deliver", a, ActDeliver)
			if !equalEvents(a.Events, want.Events) {
				t.Fatalf("delivered %v", a.Events)
			}
			wantGo(t, "after delivery", p.n.Continue())
			if s := p.n.Status(); s.Epoch != 2 || s.Epochs != 1 {
				t.Fatalf("status %v", s)
			}
			// The next epoch starts now: its length counts from here.
			p.n.Async(timer(2_000_000))
			wantGo(t, "new epoch", p.n.Point(pt(11, 2*ms-1)))
		})
	}
}

// Rule (ft/doc.go, epoch boundaries): "... or at once at HLT when events
// are pending." With nothing to deliver the halted primary waits.
func TestP2HaltEndsEpochAtOnce(t *testing.T) {
	p, _ := pair(t, OutputCommit, false)
	wantGo(t, "exit", p.n.Point(pt(3, 10)))
	wantWait(t, "halt, nothing pending", p.n.Halt(pt(3, 20)), WaitEvent)
	wantWait(t, "still nothing", p.n.Continue(), WaitEvent)
	p.n.Async(timer(30))
	a := wantAction(t, "halt ends the epoch", p.n.Continue(), ActDeliver)
	if !equalEvents(a.Events, []Event{timer(30)}) {
		t.Fatalf("delivered %v", a.Events)
	}
	wantGo(t, "delivered", p.n.Continue())
	wantMsgs(t, "epoch end", without(p.drain()),
		wire.EpochEnd{Seq: 1, Epoch: 1, Pos: at(3), Halt: true, Events: []Event{timer(30)}})
}

// Rule (ft/doc.go, epochs): "An
// epoch with nothing to deliver is not ended", except in verify mode,
// where every epoch end compares the replicas' states.
func TestP2EmptyEpochIsNotEnded(t *testing.T) {
	p, _ := pair(t, OutputCommit, false)
	wantGo(t, "long epoch, nothing to deliver", p.n.Point(pt(10, 50*ms)))
	wantMsgs(t, "no epoch end", without(p.drain()))

	v, _ := pair(t, OutputCommit, true)
	wantAction(t, "verify mode hashes every epoch", v.n.Point(pt(10, 50*ms)), ActHash)
	wantGo(t, "then goes on", v.n.Hashed(Digest{1}))
	ends := ofType[wire.EpochEnd](v.drain())
	if len(ends) != 1 || !ends[0].Verify || ends[0].Hash != (Digest{1}) || len(ends[0].Events) != 0 {
		t.Fatalf("verify epoch end: %#v", ends)
	}
}

// UART bytes beyond the receiver's room stay buffered for a later epoch:
// the backup must deliver exactly what the primary delivered, and
// delivering into a full FIFO would lose them on both.
func TestP2UARTBytesBeyondRoomStayBuffered(t *testing.T) {
	p, _ := pair(t, OutputCommit, false)
	for _, c := range "abc" {
		p.n.Async(uart(byte(c)))
	}
	p.n.Async(timer(5))
	a := wantAction(t, "end", p.n.Point(Point{Pos: at(4), Now: ms, RxSpace: 1}), ActDeliver)
	if !equalEvents(a.Events, []Event{uart('a'), timer(5)}) {
		t.Fatalf("delivered %v", a.Events)
	}
	wantGo(t, "delivered", p.n.Continue())
	// No room: the bytes are not deliverable, so nothing is due.
	wantGo(t, "no room", p.n.Point(Point{Pos: at(5), Now: 3 * ms, RxSpace: 0}))
	wantWait(t, "halt with only undeliverable bytes", p.n.Halt(Point{Pos: at(5), Now: 3 * ms, RxSpace: 0}), WaitEvent)
	p.n.Async(timer(6))
	a = wantAction(t, "timer arrives", p.n.Continue(), ActDeliver)
	if !equalEvents(a.Events, []Event{timer(6)}) {
		t.Fatalf("delivered %v", a.Events)
	}
	wantGo(t, "delivered", p.n.Continue())
	a = wantAction(t, "room again", p.n.Point(Point{Pos: at(6), Now: 5 * ms, RxSpace: 8}), ActDeliver)
	if !equalEvents(a.Events, []Event{uart('b'), uart('c')}) {
		t.Fatalf("delivered %v", a.Events)
	}
}

// Timer events coalesce: an epoch end gives the guest one tick (the PIT's
// Fire(now) delivers one edge due by now and keeps later ones due for the
// driver to post again), so only the latest time matters.
func TestP1TimerEventsCoalesce(t *testing.T) {
	p, _ := pair(t, OutputCommit, false)
	p.n.Async(timer(100))
	p.n.Async(uart('q'))
	p.n.Async(timer(300))
	p.n.Async(timer(200))
	a := wantAction(t, "end", p.n.Point(pt(2, ms)), ActDeliver)
	if !equalEvents(a.Events, []Event{timer(300), uart('q')}) {
		t.Fatalf("delivered %v", a.Events)
	}
}

// Reference: Bressoud & Schneider, section 3, rule P3.
// Rule P3 (ft/doc.go): "P3, backup: at an environment instruction it takes the value
// from the log, waiting if it has not arrived."
func TestP3BackupTakesValueFromLog(t *testing.T) {
	p, b := pair(t, OutputCommit, false)
	wantWait(t, "not arrived", b.n.Read(at(5), wire.KindClock, 999), WaitLog)
	wantWait(t, "still not", b.n.Continue(), WaitLog)
	p.n.Read(at(5), wire.KindClock, 42)
	b.step(p.drain()...)
	a := b.n.Continue()
	if a.Kind != ActGo || a.Value != 42 {
		t.Fatalf("replayed read: %v, want go(42)", a)
	}
	// The backup acknowledges what it received.
	wantMsgs(t, "ack", b.drain(), wire.Ack{Seq: 1})
}

// Rule P3 (ft/doc.go): "It verifies that position and kind match. A
// mismatch is a divergence." It is loud (a note, a count) and repaired
// from the primary's state.
func TestP3MismatchIsDivergence(t *testing.T) {
	for _, tc := range []struct {
		name string
		log  wire.Msg
		read Position
		kind Kind
	}{
		{"position", wire.Record{Seq: 1, Epoch: 1, Pos: at(5), Kind: wire.KindClock, Value: 1}, at(6), wire.KindClock},
		{"kind", wire.Record{Seq: 1, Epoch: 1, Pos: at(5), Kind: wire.KindClock, Value: 1}, at(5), 77},
		{"epoch", wire.Record{Seq: 1, Epoch: 2, Pos: at(5), Kind: wire.KindClock, Value: 1}, at(5), wire.KindClock},
		{"an output, not a read", wire.Output{Seq: 1, Epoch: 1, Pos: at(5), OutSeq: 1, Kind: wire.KindConsole, Data: []byte("x")}, at(5), wire.KindClock},
		{"an epoch end, not a read", wire.EpochEnd{Seq: 1, Epoch: 1, Pos: at(5)}, at(5), wire.KindClock},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, b := pair(t, OutputCommit, false)
			b.step(tc.log)
			a := b.n.Read(tc.read, tc.kind, 31337)
			// The read goes on (the state is wrong anyway) to the next
			// point, where the backup waits for the primary's state.
			if a.Kind != ActGo {
				t.Fatalf("read: %v", a)
			}
			sent := b.drain()
			if n, ok := b.hasNote(NoteDivergence); !ok || !isErr(n.Err, ErrDivergence) {
				t.Fatalf("no divergence note: %v", b.notes)
			}
			if got := ofType[wire.CheckpointRequest](sent); len(got) != 1 {
				t.Fatalf("checkpoint requests: %v", got)
			}
			wantWait(t, "next point", b.n.Point(pt(6, 0)), WaitRepair)
			if s := b.n.Status(); s.Divergences != 1 || !s.Diverged {
				t.Fatalf("status %v", s)
			}
		})
	}
}

// Reference: Bressoud & Schneider, section 3, rule P4.
// Rule P4 (ft/doc.go): "P4, backup: it ignores its own asynchronous events."
func TestP4BackupIgnoresOwnAsyncEvents(t *testing.T) {
	_, b := pair(t, OutputCommit, false)
	b.n.Async(timer(1))
	b.n.Async(uart('z'))
	b.step(wire.EpochEnd{Seq: 1, Epoch: 1, Pos: at(3)})
	wantGo(t, "before the end", b.n.Point(pt(2, 5*ms)))
	// The epoch end has no events, and the backup adds none of its own.
	// It goes on once the primary is known to have passed this point.
	wantWait(t, "at the end", b.n.Point(pt(3, 5*ms)), WaitLog)
	b.step(wire.Heartbeat{Epoch: 2, Pos: at(4)})
	wantGo(t, "the primary passed 3", b.n.Continue())
	if s := b.n.Status(); s.Epoch != 2 {
		t.Fatalf("status %v", s)
	}
}

// Rule P4 (ft/doc.go): "It absorbs outputs (UART transmit, and every
// later device output) instead of performing them."
func TestP4BackupAbsorbsOutputs(t *testing.T) {
	p, b := pair(t, OutputCommit, false)
	p.n.Output(at(4), wire.KindConsole, []byte("hi"))
	b.step(p.drain()...)
	wantGo(t, "absorbed", b.n.Output(at(4), wire.KindConsole, []byte("hi")))
	b.drain()
	if len(b.perform) != 0 {
		t.Fatalf("backup performed %v", b.perform)
	}
	if s := b.n.Status(); s.Outputs != 1 {
		t.Fatalf("status %v", s)
	}
	// A different output is a divergence.
	p.n.Output(at(6), wire.KindConsole, []byte("A"))
	b.step(p.drain()...)
	b.n.Output(at(6), wire.KindConsole, []byte("B"))
	b.drain()
	if _, ok := b.hasNote(NoteDivergence); !ok {
		t.Fatal("different output bytes not a divergence")
	}
}

// Reference: Bressoud & Schneider, section 3, rule P5.
// Rule P5 (ft/doc.go): "P5, backup: at the epoch's end it delivers the primary's events
// at exactly that point."
func TestP5BackupDeliversAtEpochEnd(t *testing.T) {
	p, b := pair(t, OutputCommit, false)
	p.n.Async(timer(77))
	a := p.n.Point(pt(10, ms))
	wantAction(t, "primary delivers", a, ActDeliver)
	p.n.Continue()
	b.step(p.drain()...)
	for e := uint64(1); e < 10; e++ {
		wantGo(t, "before the end", b.n.Point(pt(e, 0)))
	}
	a = wantAction(t, "at the end", b.n.Point(pt(10, 0)), ActDeliver)
	if !equalEvents(a.Events, []Event{timer(77)}) {
		t.Fatalf("delivered %v", a.Events)
	}
	// Before exit 11 the primary could still end epoch 2 with a
	// checkpoint; the backup runs on once it passed 11.
	wantWait(t, "delivered", b.n.Continue(), WaitLog)
	b.step(wire.Heartbeat{Epoch: 2, Pos: at(11)})
	wantGo(t, "the primary passed 11", b.n.Continue())
	if s := b.n.Status(); s.Epoch != 2 || s.Backlog != 0 {
		t.Fatalf("status %v", s)
	}
}

// The backup runs ahead of the primary only as far as the primary has
// gone: at a point it does not know the primary passed, it waits. A
// record at q, or a heartbeat, proves the primary passed every point
// before it.
func TestP5BackupWaitsWhereTheLogEnds(t *testing.T) {
	p, b := pair(t, OutputCommit, false)
	wantWait(t, "nothing known", b.n.Point(pt(1, 0)), WaitLog)
	p.n.Read(at(4), wire.KindClock, 1)
	b.step(p.drain()...)
	wantGo(t, "a record at 4 proves the primary passed 1", b.n.Continue())
	wantGo(t, "and 3", b.n.Point(pt(3, 0)))
	b.n.Read(at(4), wire.KindClock, 0)
	wantWait(t, "but not 4", b.n.Point(pt(4, 0)), WaitLog)
	// The primary's progress heartbeat.
	for e := uint64(4); e <= 9; e++ {
		p.n.Point(pt(e, 10))
	}
	p.n.Tick(20)
	b.step(p.drain()...)
	wantGo(t, "heartbeat at 9", b.n.Continue())
	wantGo(t, "8", b.n.Point(pt(8, 0)))
	wantWait(t, "9", b.n.Point(pt(9, 0)), WaitLog)
}

// An epoch ended while the primary's guest waited in HLT is delivered in
// the backup's Halt at that position, not when the exit is first offered;
// several epochs can end at one halted position.
func TestP5EpochsEndedInHalt(t *testing.T) {
	p, b := pair(t, OutputCommit, false)
	wantGo(t, "primary exit", p.n.Point(pt(7, 10)))
	wantWait(t, "primary halts", p.n.Halt(pt(7, 10)), WaitEvent)
	p.n.Async(uart('m')) // e.g. the guest masked the UART: no interrupt
	wantAction(t, "primary delivers 1", p.n.Continue(), ActDeliver)
	wantGo(t, "", p.n.Continue())
	wantWait(t, "still halted", p.n.Halt(pt(7, 20)), WaitEvent)
	p.n.Async(timer(30))
	wantAction(t, "primary delivers 2", p.n.Continue(), ActDeliver)
	wantGo(t, "", p.n.Continue())
	b.step(p.drain()...)

	wantGo(t, "backup exit: no epoch ended in At", b.n.Point(pt(7, 0)))
	a := wantAction(t, "backup halt: epoch 1", b.n.Halt(pt(7, 0)), ActDeliver)
	if !equalEvents(a.Events, []Event{uart('m')}) {
		t.Fatalf("epoch 1 delivered %v", a.Events)
	}
	// Epoch 2 ended at the same halted position: delivered in the same
	// call (the guest cannot run between the two: the primary's did not).
	a = wantAction(t, "then epoch 2", b.n.Continue(), ActDeliver)
	if !equalEvents(a.Events, []Event{timer(30)}) {
		t.Fatalf("epoch 2 delivered %v", a.Events)
	}
	wantWait(t, "then it waits for what the primary did next", b.n.Continue(), WaitLog)
}

// A backup that halts where the primary's guest went on has diverged.
func TestP5HaltWherePrimaryWentOnIsDivergence(t *testing.T) {
	_, b := pair(t, OutputCommit, false)
	b.step(wire.Record{Seq: 1, Epoch: 1, Pos: at(9), Kind: wire.KindClock})
	wantGo(t, "exit", b.n.Point(pt(5, 0)))
	wantWait(t, "halt", b.n.Halt(pt(5, 0)), WaitRepair)
	b.drain()
	if _, ok := b.hasNote(NoteDivergence); !ok {
		t.Fatal("no divergence")
	}
}

// Rule (ft/doc.go, epochs): a kick's point "depends on host timing. It
// must never count toward a position, and nothing may be injected there
// while replicating."
func TestKickPointIsNeverABoundary(t *testing.T) {
	p, b := pair(t, OutputCommit, false)
	p.n.Async(timer(1))
	wantGo(t, "primary kick, not overdue", p.n.Point(kick(10, 2*ms)))
	b.step(wire.EpochEnd{Seq: 1, Epoch: 1, Pos: at(10), Events: []Event{timer(1)}})
	wantGo(t, "backup kick at the end's position", b.n.Point(kick(10, 0)))
	wantAction(t, "backup exit at it", b.n.Point(pt(10, 0)), ActDeliver)
}

// Rule (ft/doc.go, output): "strict, the paper's: the primary waits for
// the ack of each log record before going on."
func TestStrictWaitsForEachRecord(t *testing.T) {
	p, b := pair(t, Strict, false)
	wantWait(t, "read", p.n.Read(at(3), wire.KindClock, 5), WaitAck)
	sent := p.drain()
	b.step(sent...)
	p.step(b.drain()...)
	if a := p.n.Continue(); a.Kind != ActGo || a.Value != 5 {
		t.Fatalf("after ack: %v", a)
	}
	wantWait(t, "output", p.n.Output(at(4), wire.KindConsole, []byte("o")), WaitAck)
	p.drain()
	if len(p.perform) != 0 {
		t.Fatal("output left before its ack")
	}
}

// Rule (ft/doc.go, output): "output-commit, VMware FT's output rule:
// records stream without waiting, and the primary waits for the ack only
// before an output leaves the machine." The guest itself does not wait:
// the output is held until the acknowledgement covers its own record.
func TestOutputCommitStreamsAndHoldsOutput(t *testing.T) {
	p, b := pair(t, OutputCommit, false)
	for i := range 3 {
		if a := p.n.Read(at(uint64(i+1)), wire.KindClock, uint64(i)); a.Kind != ActGo {
			t.Fatalf("read %d waited: %v", i, a)
		}
	}
	wantGo(t, "output", p.n.Output(at(4), wire.KindConsole, []byte("out")))
	sent := p.drain()
	if len(p.perform) != 0 {
		t.Fatal("output left before any ack")
	}
	// An ack of the reads only is not enough: the output waits for its
	// own record too.
	p.step(wire.Ack{Seq: 3})
	p.drain()
	if len(p.perform) != 0 {
		t.Fatal("output left before its record's ack")
	}
	b.step(sent...)
	p.step(b.drain()...)
	p.drain()
	if len(p.perform) != 1 || string(p.perform[0].Data) != "out" || p.perform[0].Seq != 1 || p.perform[0].Uncertain {
		t.Fatalf("performed %v", p.perform)
	}
	if s := p.n.Status(); s.Held != 0 {
		t.Fatalf("status %v", s)
	}
}

// Rule (ft/doc.go, output): "Outputs carry sequence numbers, and the
// primary tells the backup which it has performed."
func TestPerformedConfirmations(t *testing.T) {
	p, b := pair(t, OutputCommit, false)
	p.n.Output(at(2), wire.KindConsole, []byte("a"))
	b.step(p.drain()...)
	p.step(b.drain()...)
	p.drain()
	p.n.Performed(p.perform[0].Seq)
	// The next output carries the confirmation, and a tick sends it if
	// no output comes.
	p.n.Output(at(3), wire.KindConsole, []byte("b"))
	outs := ofType[wire.Output](p.drain())
	if len(outs) != 1 || outs[0].Done != 1 {
		t.Fatalf("piggyback: %#v", outs)
	}
	p.n.Performed(2)
	p.n.Tick(ms)
	if got := ofType[wire.Performed](p.drain()); len(got) != 1 || got[0].OutSeq != 2 {
		t.Fatalf("performed: %#v", got)
	}
}

// Rule (ft/doc.go, epoch boundaries): "After a bound (default about
// 10-20 ms), the primary kicks the vCPU and ends the epoch with an
// incremental checkpoint instead. The backup installs it, and the buffered
// events are delivered after it, at the same state on both sides. Count
// these checkpoint epochs and their bytes."
func TestCheckpointEpochAfterKickBound(t *testing.T) {
	for _, policy := range []Policy{Strict, OutputCommit} {
		t.Run(policy.String(), func(t *testing.T) {
			p, b := pair(t, policy, false)
			wantGo(t, "exit", p.n.Point(pt(5, 0)))
			p.n.Async(timer(ms))
			p.n.Tick(2 * ms) // due: the length passed, an event waits
			p.drain()
			if p.kicks != 0 {
				t.Fatal("kicked before the bound")
			}
			p.n.Tick(11 * ms)
			p.n.Tick(12 * ms) // overdue from 2 ms: kick at 12 ms
			p.drain()
			if p.kicks != 1 {
				t.Fatalf("%d kicks", p.kicks)
			}
			a := wantAction(t, "kick point", p.n.Point(kick(5, 12*ms)), ActCheckpoint)
			if a.Full {
				t.Fatal("a kick's checkpoint is incremental")
			}
			a = p.n.Checkpointed([]byte("STATE"))
			sent := p.drain()
			cps := ofType[wire.Checkpoint](sent)
			if len(cps) != 1 || string(cps[0].State) != "STATE" || cps[0].Full || cps[0].Epoch != 1 || cps[0].Pos != at(5) ||
				!equalEvents(cps[0].Events, []Event{timer(ms)}) {
				t.Fatalf("checkpoint: %#v", cps)
			}
			if policy == Strict {
				wantWait(t, "strict", a, WaitAck)
				b.step(sent...)
				p.step(b.drain()...)
				a = p.n.Continue()
			}
			wantAction(t, "deliver after the checkpoint", a, ActDeliver)
			wantGo(t, "", p.n.Continue())
			if s := p.n.Status(); s.CheckpointEpochs != 1 || s.CheckpointBytes != 5 || s.Epoch != 2 {
				t.Fatalf("status %v", s)
			}
		})
	}
}

// A guest computing without exits gets its timer ticks only through kicks
// and checkpoints. With the default kick bound they come faster than a
// 100 Hz timer's ticks, so its tick count keeps up with virtual time: the
// driver posts the timer again after each delivery while the deadline is
// still due, and the PIT delivers one edge per event (devices.PIT.Fire),
// as this loop models. Time is driven explicitly, one driver tick per ms.
func TestTimerTicksKeepUpWithoutExits(t *testing.T) {
	for _, policy := range []Policy{Strict, OutputCommit} {
		t.Run(policy.String(), func(t *testing.T) {
			pc, bc := testConfig(RolePrimary, policy), testConfig(RoleBackup, policy)
			pc.KickAfter, bc.KickAfter = 0, 0 // the defaults
			p, b := pairOf(t, pc, bc)
			const period, span = 10 * ms, 1000 * ms
			deadline, posted, ticks := period, int64(-1), int64(0)
			wantGo(t, "exit", p.n.Point(pt(1, 0)))
			for now := int64(0); now <= span; now += ms {
				if now >= deadline && posted != deadline {
					p.n.Async(timer(now))
					posted = deadline
				}
				kicks := p.kicks
				p.n.Tick(now)
				exchange(p, b)
				if p.kicks == kicks {
					continue
				}
				// The vCPU leaves KVM_RUN: a kick point.
				a := p.n.Point(kick(1, now))
				for a.Kind != ActGo {
					switch a.Kind {
					case ActCheckpoint:
						a = p.n.Checkpointed([]byte("S"))
					case ActWait:
						exchange(p, b)
						a = p.n.Continue()
					case ActDeliver:
						for _, e := range a.Events {
							if e.Kind == wire.KindTimer && int64(e.Value) >= deadline {
								ticks++
								deadline += period
								posted = -1
							}
						}
						a = p.n.Continue()
					default:
						t.Fatalf("unexpected %v", a)
					}
				}
			}
			if want := span / period; ticks < want*95/100 {
				t.Fatalf("%d ticks delivered in %d ms of a %d ms timer, want about %d", ticks, span/ms, period/ms, want)
			}
		})
	}
}

// A kick point whose epoch end is not overdue is no boundary and no
// checkpoint; an unprotected primary delivers there like a lone VMM.
func TestKickPointWithoutOverdueEpoch(t *testing.T) {
	p, _ := pair(t, OutputCommit, false)
	p.n.Async(timer(1))
	p.n.Tick(2 * ms)
	wantGo(t, "due but not overdue", p.n.Point(kick(3, 5*ms)))
	wantMsgs(t, "nothing", without(p.drain()))

	alone := newReplica(t, testConfig(RolePrimary, OutputCommit))
	alone.n.Async(timer(1))
	alone.n.Tick(2 * ms)
	alone.n.Tick(13 * ms)
	wantAction(t, "unprotected overdue kick delivers", alone.n.Point(kick(3, 13*ms)), ActDeliver)
}

// Rule (ft/doc.go): "The backup installs it, and the buffered events are
// delivered after it." Before an incremental checkpoint the backup runs to
// its position (every exit of the epoch executes on both replicas: a disk
// write happens at one). Installing needs a quiescent vCPU: at an exit the
// backup yields to a kick point first; in Halt it installs at once.
func TestBackupInstallsCheckpointThenDelivers(t *testing.T) {
	for _, where := range []string{"kick", "halt"} {
		t.Run(where, func(t *testing.T) {
			_, b := pair(t, OutputCommit, false)
			cp := wire.Checkpoint{Seq: 1, Epoch: 1, Pos: at(8), OutSeq: 0, Events: []Event{timer(5)}, State: []byte("S")}
			b.step(cp)
			b.drain()
			if b.kicks != 1 {
				t.Fatal("a checkpoint arriving kicks the backup's vCPU")
			}
			wantGo(t, "an exit before the checkpoint's position", b.n.Point(pt(6, 0)))
			wantGo(t, "a kick before the checkpoint's position", b.n.Point(kick(6, 0)))
			wantGo(t, "the next exit", b.n.Point(pt(7, 0)))
			wantAction(t, "the exit at the checkpoint's position", b.n.Point(pt(8, 0)), ActYield)
			var a Action
			if where == "kick" {
				a = b.n.Point(kick(8, 0))
			} else {
				a = b.n.Halt(pt(8, 0))
			}
			a = wantAction(t, "install", a, ActInstall)
			if string(a.State) != "S" {
				t.Fatalf("install %v", a)
			}
			a = wantAction(t, "then deliver", b.n.Continue(), ActDeliver)
			if !equalEvents(a.Events, cp.Events) {
				t.Fatalf("delivered %v", a.Events)
			}
			a = b.n.Continue()
			{
				// Still at a kick point: the guest may run on only once
				// the primary is known to have passed its next exit.
				wantAction(t, "after the install", a, ActWait)
				b.step(wire.Heartbeat{Epoch: 2, Pos: at(9)})
				a = b.n.Continue()
			}
			wantGo(t, "", a)
			if s := b.n.Status(); s.Epoch != 2 || s.Pos != at(8) || s.CheckpointEpochs != 1 {
				t.Fatalf("status %v", s)
			}
		})
	}
}

// Rule (ft/doc.go, checkpoint epochs): every exit of the epoch executes on
// both replicas before an install. A backup in Halt woken by the events of
// an epoch end (a disk completion: the primary's guest then ran on and
// submitted its next request) goes on to the checkpoint's position rather
// than installing where it halted; a backup in Halt that nothing woke
// installs at once (the test above).
func TestBackupWokenInHaltRunsToTheCheckpoint(t *testing.T) {
	_, b := pair(t, OutputCommit, false)
	done := Event{Kind: wire.KindDiskDone, Value: 7, Data: wire.DiskDoneData(nil, 0, 0)}
	b.step(wire.EpochEnd{Seq: 1, Epoch: 1, Pos: at(6), Halt: true, Events: []Event{done}},
		wire.Checkpoint{Seq: 2, Epoch: 2, Pos: at(8), State: []byte("S")})
	b.drain()
	wantGo(t, "an exit before the halt", b.n.Point(pt(5, 0)))
	a := wantAction(t, "the epoch end in Halt", b.n.Halt(pt(6, 0)), ActDeliver)
	if !equalEvents(a.Events, []Event{done}) {
		t.Fatalf("delivered %v", a.Events)
	}
	wantGo(t, "woken: run on towards the checkpoint", b.n.Continue())
	wantGo(t, "the exit after the halt", b.n.Point(pt(7, 0)))
	wantAction(t, "the exit at the checkpoint's position", b.n.Point(pt(8, 0)), ActYield)
	wantAction(t, "install at the kick point", b.n.Point(kick(8, 0)), ActInstall)
}

// Rule (ft/doc.go): "Wire format: framed, versioned, checksummed, with
// heartbeats." A quiet link carries heartbeats both ways.
func TestHeartbeatsOnAQuietLink(t *testing.T) {
	p, b := pair(t, OutputCommit, false)
	p.n.Tick(1)
	b.n.Tick(1)
	p.drain()
	b.drain()
	p.n.Tick(15 * ms)
	b.n.Tick(15 * ms)
	wantMsgs(t, "not yet", append(p.drain(), b.drain()...))
	p.n.Tick(21 * ms)
	b.n.Tick(21 * ms)
	if len(ofType[wire.Heartbeat](p.drain())) != 1 || len(ofType[wire.Heartbeat](b.drain())) != 1 {
		t.Fatal("no heartbeats after 20 ms of silence")
	}
}

// Rule (ft/doc.go, failure): "The backup declares the primary dead when
// nothing arrives within a timeout (heartbeats; default 100 ms,
// configurable), or when the connection breaks."
func TestBackupDeclaresPrimaryDead(t *testing.T) {
	for _, how := range []string{"timeout", "connection"} {
		t.Run(how, func(t *testing.T) {
			p, b := pair(t, OutputCommit, false)
			b.n.Tick(0)
			b.step(wire.Heartbeat{Epoch: 1})
			b.n.Tick(50 * ms)
			b.n.Tick(149 * ms)
			b.drain()
			if _, ok := b.hasNote(NotePrimaryLost); ok {
				t.Fatal("declared dead within the timeout")
			}
			if how == "timeout" {
				b.n.Tick(150 * ms)
			} else {
				b.n.Disconnected()
			}
			b.drain()
			if _, ok := b.hasNote(NotePrimaryLost); !ok || !b.closed {
				t.Fatalf("not declared dead: %v", b.notes)
			}
			s := b.n.Status()
			if s.Role != RolePrimary || !s.Replaying || s.Promotions != 1 || s.Link {
				t.Fatalf("status %v", s)
			}
			_ = p
		})
	}
}

// Rule (ft/doc.go, failover): the timeout counts the peer's silence only
// while this replica runs: a stall of the driver (Stalled) pushes it back
// by its length, and no further.
func TestStallIsNotThePeersSilence(t *testing.T) {
	tests := []struct {
		name   string
		stall  int64 // reported before the Tick at tick
		tick   int64
		lostAt int64 // the first Tick, 10 ms apart from tick on, that declares the peer dead
	}{
		{name: "no stall", tick: 90 * ms, lostAt: 100 * ms},
		{name: "a stall of 80 ms", stall: 80 * ms, tick: 150 * ms, lostAt: 180 * ms},
		{name: "a stall longer than the timeout", stall: 400 * ms, tick: 400 * ms, lostAt: 500 * ms},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, b := pair(t, OutputCommit, false)
			b.n.Tick(0)
			b.step(wire.Heartbeat{Epoch: 1})
			b.n.Tick(0) // heard at 0
			b.drain()
			b.n.Stalled(tc.stall)
			for now := tc.tick; now <= tc.lostAt; now += 10 * ms {
				b.n.Tick(now)
				b.drain()
				_, lost := b.hasNote(NotePrimaryLost)
				if lost != (now >= tc.lostAt) {
					t.Fatalf("at %d ms: declared dead %v, want %v (at %d ms)", now/ms, lost, now >= tc.lostAt, tc.lostAt/ms)
				}
			}
		})
	}
}

// Rule (ft/doc.go, failure): "If the backup dies, the primary continues
// unprotected, says so in its log and status, and accepts a new backup."
// Whatever waited for the backup goes on.
func TestPrimaryContinuesUnprotectedWhenBackupDies(t *testing.T) {
	for _, how := range []string{"timeout", "connection"} {
		t.Run(how, func(t *testing.T) {
			p, _ := pair(t, Strict, false)
			p.n.Tick(0)
			wantWait(t, "strict output", p.n.Output(at(2), wire.KindConsole, []byte("held")), WaitAck)
			p.drain()
			if how == "timeout" {
				p.n.Tick(100 * ms)
			} else {
				p.n.Disconnected()
			}
			wantGo(t, "the vCPU goes on", p.n.Continue())
			p.drain()
			if _, ok := p.hasNote(NoteBackupLost); !ok || !p.closed {
				t.Fatalf("notes %v", p.notes)
			}
			if s := p.n.Status(); s.Protected || s.Role != RolePrimary {
				t.Fatalf("status %v", s)
			}
			if len(p.perform) != 1 {
				t.Fatalf("held output not released: %v", p.perform)
			}
		})
	}
}

// Rule (ft/doc.go, failure): "It replays everything it received and goes
// live where the log ends. Environment instructions become real there.
// ... From the next epoch on it is the primary."
func TestFailoverReplaysLogThenGoesLive(t *testing.T) {
	_, b := pair(t, OutputCommit, false)
	b.step(
		wire.Record{Seq: 1, Epoch: 1, Pos: at(3), Kind: wire.KindClock, Value: 30},
		wire.EpochEnd{Seq: 2, Epoch: 1, Pos: at(5), Events: []Event{uart('p')}},
		wire.Record{Seq: 3, Epoch: 2, Pos: at(7), Kind: wire.KindClock, Value: 70},
	)
	b.n.Async(uart('b')) // before promotion: ignored
	b.n.Disconnected()
	b.n.Async(timer(1000)) // after: its own
	if a := b.n.Read(at(3), wire.KindClock, 1); a.Value != 30 {
		t.Fatalf("replayed read: %v", a)
	}
	a := wantAction(t, "replayed epoch end", b.n.Point(pt(5, 0)), ActDeliver)
	if !equalEvents(a.Events, []Event{uart('p')}) {
		t.Fatalf("delivered %v", a.Events)
	}
	wantGo(t, "", b.n.Continue())
	if a := b.n.Read(at(7), wire.KindClock, 2); a.Value != 70 {
		t.Fatalf("replayed read: %v", a)
	}
	b.drain()
	if _, ok := b.hasNote(NoteLive); ok {
		t.Fatal("live before the log ended")
	}
	if a := b.n.Read(at(8), wire.KindClock, 80); a.Value != 80 {
		t.Fatalf("live read: %v", a)
	}
	b.drain()
	if _, ok := b.hasNote(NoteLive); !ok {
		t.Fatal("not live")
	}
	// Its own events, delivered by its own epochs.
	a = wantAction(t, "own epoch", b.n.Point(pt(9, 5*ms)), ActDeliver)
	if !equalEvents(a.Events, []Event{timer(1000)}) {
		t.Fatalf("delivered %v", a.Events)
	}
	if s := b.n.Status(); s.Replaying || s.Protected || s.Role != RolePrimary {
		t.Fatalf("status %v", s)
	}
}

// Rule (ft/doc.go, output): "A promoted backup performs only those not
// confirmed. Nothing is lost, and a duplicate can only be an output whose
// confirmation was in flight." and failure: "Outstanding device operations
// complete with an 'uncertain' outcome".
func TestFailoverRedoesUnconfirmedOutputs(t *testing.T) {
	_, b := pair(t, OutputCommit, false)
	out := func(seq, pos uint64, done uint64, s string) wire.Output {
		return wire.Output{Seq: seq, Epoch: 1, Pos: at(pos), OutSeq: seq, Done: done, Kind: wire.KindConsole, Offset: seq - 1, Data: []byte(s)}
	}
	b.step(out(1, 2, 0, "a"), out(2, 3, 0, "b"), out(3, 4, 1, "c"), out(4, 5, 1, "d"), out(5, 6, 1, "e"))
	for i, s := range []string{"a", "b", "c"} {
		wantGo(t, "absorb", b.n.Output(at(uint64(i+2)), wire.KindConsole, []byte(s)))
	}
	b.step(wire.Performed{OutSeq: 2})
	b.n.Disconnected()
	b.drain()
	// Absorbed and not confirmed: "c" is redone at once.
	if len(b.perform) != 1 || string(b.perform[0].Data) != "c" || !b.perform[0].Uncertain {
		t.Fatalf("redone at promotion: %v", b.perform)
	}
	// Replayed from the log, not confirmed: performed, uncertain.
	b.n.Output(at(5), wire.KindConsole, []byte("d"))
	b.n.Output(at(6), wire.KindConsole, []byte("e"))
	// Past the log: new, certain.
	b.n.Output(at(7), wire.KindConsole, []byte("f"))
	b.drain()
	var got string
	for i, o := range b.perform {
		got += string(o.Data)
		if o.Seq != uint64(i+3) || o.Uncertain != (i < 3) {
			t.Fatalf("output %d: %+v", i, o)
		}
	}
	if got != "cdef" {
		t.Fatalf("performed %q", got)
	}
}

// Rule (ft/doc.go, failover): "If a message arrives only in
// part, the backup ignores the incomplete record. A record is applied only
// when its checksum verifies."
func TestFailoverIgnoresPartialRecord(t *testing.T) {
	_, b := pair(t, OutputCommit, false)
	stream := wire.Append(nil, wire.Record{Seq: 1, Epoch: 1, Pos: at(3), Kind: wire.KindClock, Value: 30})
	last := wire.Marshal(wire.Record{Seq: 2, Epoch: 1, Pos: at(5), Kind: wire.KindClock, Value: 50})
	stream = append(stream, last[:len(last)-1]...) // the last byte never came
	d := wire.NewDecoder(0)
	d.Write(stream)
	for {
		m, err := d.Next()
		if err != nil {
			t.Fatal(err)
		}
		if m == nil {
			break
		}
		b.step(m)
	}
	b.n.Disconnected()
	if a := b.n.Read(at(3), wire.KindClock, 1); a.Value != 30 {
		t.Fatalf("whole record: %v", a)
	}
	if a := b.n.Read(at(5), wire.KindClock, 55); a.Value != 55 {
		t.Fatalf("the partial record was applied: %v", a)
	}
}

// A backup still waiting for a joining checkpoint has nothing to promote.
func TestBackupWithoutStateCannotPromote(t *testing.T) {
	p := newReplica(t, testConfig(RolePrimary, OutputCommit))
	p.n.Point(pt(1, 0)) // the guest has run
	b := newReplica(t, testConfig(RoleBackup, OutputCommit))
	p.n.Connected()
	b.n.Connected()
	exchange(p, b)
	b.n.Disconnected()
	a := wantAction(t, "no state", b.n.Point(pt(1, 0)), ActStop)
	if !isErr(a.Err, ErrNoState) {
		t.Fatalf("err %v", a.Err)
	}
}

// Rule (ft/doc.go, surface): "The handshake refuses, with a clear
// message: a different protocol version; a different kernel, initrd or
// command line (compared by hash); a different memory size." Both sides
// say why, and a refused backup stops.
func TestHandshakeRefusals(t *testing.T) {
	for _, tc := range []struct {
		name   string
		change func(*wire.Hello)
		reason wire.RefuseReason
		text   string
	}{
		{"protocol version 1", func(h *wire.Hello) { h.Version = 1 }, wire.RefuseVersion, "protocol version 1"},
		{"a later protocol version", func(h *wire.Hello) { h.Version, h.Rest = ProtocolVersion+1, []byte("later fields") }, wire.RefuseVersion,
			fmt.Sprintf("protocol version %d", ProtocolVersion+1)},
		{"protocol version 3", func(h *wire.Hello) { h.Version = 3 }, wire.RefuseVersion, "protocol version 3"},
		{"a disk on one side", func(h *wire.Hello) { h.Disks = []wire.Disk{{Size: 512}} }, wire.RefuseDisks, "different disks: 0 here, 1 on the peer"},
		{"protocol version 2", func(h *wire.Hello) { h.Version = 2 }, wire.RefuseVersion, "protocol version 2"},
		{"protocol version 3", func(h *wire.Hello) { h.Version = 3 }, wire.RefuseVersion, "protocol version 3"},
		{"cpu", func(h *wire.Hello) { h.CPU[0] = 0xee }, wire.RefuseCPU, "different CPU"},
		{"witness on one side", func(h *wire.Hello) { h.Witness[0] = 0xee }, wire.RefuseWitness, "different witness: none here"},
		{"kernel", func(h *wire.Hello) { h.Kernel[0] = 0xee }, wire.RefuseKernel, "different kernel"},
		{"initrd", func(h *wire.Hello) { h.Initrd[0] = 0xee }, wire.RefuseInitrd, "different initrd"},
		{"command line", func(h *wire.Hello) { h.Cmdline[0] = 0xee }, wire.RefuseCmdline, "different command line"},
		{"memory size", func(h *wire.Hello) { h.MemSize = 128 << 20 }, wire.RefuseMemory, "128 MiB on the peer"},
		{"two primaries", func(h *wire.Hello) { h.Role = RolePrimary }, wire.RefuseRole, "both replicas are primaries"},
		{"epoch clock", func(h *wire.Hello) { h.Clock = 1 }, wire.RefuseClock, "different epoch clock"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := newReplica(t, testConfig(RolePrimary, OutputCommit))
			b := newReplica(t, testConfig(RoleBackup, OutputCommit))
			p.n.Connected()
			b.n.Connected()
			hello := ofType[wire.Hello](b.drain())[0]
			tc.change(&hello)
			// Across the wire, as a peer of that version would send it.
			hm, err := wire.Unmarshal(wire.Marshal(hello))
			if err != nil {
				t.Fatal(err)
			}
			p.step(hm)
			refusals := ofType[wire.Refuse](p.drain())
			if len(refusals) != 1 || refusals[0].Reason != tc.reason || !contains(refusals[0].Text, tc.text) {
				t.Fatalf("refusal %#v, want %v %q", refusals, tc.reason, tc.text)
			}
			if n, ok := p.hasNote(NoteRefused); !ok || !isErr(n.Err, ErrRefused) || !p.closed {
				t.Fatalf("primary notes %v", p.notes)
			}
			if s := p.n.Status(); s.Protected || s.Link {
				t.Fatalf("primary %v", s)
			}
			b.step(refusals[0])
			b.drain()
			if _, ok := b.hasNote(NoteRefused); !ok || !b.closed {
				t.Fatalf("backup notes %v", b.notes)
			}
			a := wantAction(t, "refused backup", b.n.Point(pt(1, 0)), ActStop)
			if !isErr(a.Err, ErrRefused) || !contains(a.Err.Error(), tc.text) {
				t.Fatalf("stop: %v", a.Err)
			}
		})
	}
}

// Rule (ft/doc.go, Handshake): the disks are compared (count, size,
// read-only flag, contents' hash); both sides refuse with one line.
func TestHandshakeRefusesOtherDisks(t *testing.T) {
	disks := []wire.Disk{{Size: 1 << 20, Digest: Digest{1}}, {Size: 4096, ReadOnly: true, Digest: Digest{2}}}
	for _, tc := range []struct {
		name          string
		change        func(d []wire.Disk) []wire.Disk
		primary, back string // the refusal's text on each side
	}{
		{"same", func(d []wire.Disk) []wire.Disk { return d }, "", ""},
		{"count", func(d []wire.Disk) []wire.Disk { return d[:1] },
			"different disks: 2 here, 1 on the peer", "different disks: 1 here, 2 on the peer"},
		{"size", func(d []wire.Disk) []wire.Disk { d[0].Size *= 2; return d },
			"disk 0 has 1048576 bytes here, 2097152 on the peer", "disk 0 has 2097152 bytes here, 1048576 on the peer"},
		{"read-only", func(d []wire.Disk) []wire.Disk { d[1].ReadOnly = false; return d },
			"disk 1 is read-only here, read-write on the peer", "disk 1 is read-write here, read-only on the peer"},
		{"contents", func(d []wire.Disk) []wire.Disk { d[1].Digest[0] = 9; return d },
			"disk 1's contents differ: sha256 020000000000 here, 090000000000 on the peer",
			"disk 1's contents differ: sha256 090000000000 here, 020000000000 on the peer"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			pc, bc := testConfig(RolePrimary, OutputCommit), testConfig(RoleBackup, OutputCommit)
			pc.Guest.Disks = slices.Clone(disks)
			bc.Guest.Disks = tc.change(slices.Clone(disks))
			p, b := newReplica(t, pc), newReplica(t, bc)
			p.n.Connected()
			b.n.Connected()
			exchange(p, b)
			if tc.primary == "" {
				if !p.n.Status().Link || !b.n.Status().Link {
					t.Fatalf("same disks: primary %v backup %v", p.n.Status(), b.n.Status())
				}
				return
			}
			for r, text := range map[*replica]string{p: tc.primary, b: tc.back} {
				n, ok := r.hasNote(NoteRefused)
				if !ok || !isErr(n.Err, ErrRefused) || !contains(n.Err.Error(), text) {
					t.Fatalf("%v notes %v, want a refusal %q", r.n.Role(), r.notes, text)
				}
			}
		})
	}
}

// Rule (ft/doc.go, Handshake): a backup joining a running guest with
// disks is admitted when its disks have the primary's number, sizes and
// read-only flags; a read-write image's contents may differ (the primary
// sends them), a read-only image's may not. The primary asks for the
// full checkpoint as a join's (Action.Join), and only the joining backup
// takes disk contents.
func TestHandshakeJoinWithDisks(t *testing.T) {
	rw := wire.Disk{Size: 1 << 20, Digest: Digest{1}}
	ro := wire.Disk{Size: 4096, ReadOnly: true, Digest: Digest{2}}
	for _, tc := range []struct {
		name   string
		backup []wire.Disk
		refuse string // "" admits
	}{
		{"same", []wire.Disk{rw, ro}, ""},
		{"stale read-write image", []wire.Disk{{Size: rw.Size, Digest: Digest{9}}, ro}, ""},
		{"size", []wire.Disk{{Size: 2 << 20, Digest: Digest{1}}, ro}, "disk 0 has 1048576 bytes here, 2097152 on the peer"},
		{"read-only flag", []wire.Disk{{Size: rw.Size, ReadOnly: true, Digest: Digest{1}}, ro}, "disk 0 is read-write here, read-only on the peer"},
		{"read-only contents", []wire.Disk{rw, {Size: ro.Size, ReadOnly: true, Digest: Digest{3}}}, "read-only disk 1's contents differ"},
		{"count", []wire.Disk{rw}, "2 here, 1 on the peer"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			pc, bc := testConfig(RolePrimary, OutputCommit), testConfig(RoleBackup, OutputCommit)
			bc.Join = true
			pc.Guest.Disks = []wire.Disk{rw, ro}
			bc.Guest.Disks = tc.backup
			p, b := newReplica(t, pc), newReplica(t, bc)
			p.n.Point(pt(1, 0)) // the guest has run
			p.n.Connected()
			b.n.Connected()
			exchange(p, b)
			if tc.refuse != "" {
				n, ok := p.hasNote(NoteRefused)
				if !ok || !contains(n.Err.Error(), tc.refuse) {
					t.Fatalf("primary notes %v, want a refusal %q", p.notes, tc.refuse)
				}
				if b.n.TakesDisks() {
					t.Fatal("a refused backup takes disk contents")
				}
				return
			}
			if !p.n.Status().Link || !b.n.Status().Link {
				t.Fatalf("not admitted: primary %v backup %v", p.n.Status(), b.n.Status())
			}
			if !b.n.TakesDisks() || p.n.TakesDisks() {
				t.Fatalf("TakesDisks: backup %v primary %v, want true, false", b.n.TakesDisks(), p.n.TakesDisks())
			}
			a := p.n.Point(kick(2, 0))
			if a.Kind != ActCheckpoint || !a.Full || !a.Join {
				t.Fatalf("the primary's next kick point: %v (join %v), want a join's full checkpoint", a, a.Join)
			}
		})
	}
}

// The backup adopts the primary's wall clock (an input of the
// environment, vmm.Config.WallClock).
func TestHandshakeGivesPeerIdentity(t *testing.T) {
	pc := testConfig(RolePrimary, Strict)
	pc.Guest.WallClock = 42
	p, b := newReplica(t, pc), newReplica(t, testConfig(RoleBackup, OutputCommit))
	p.n.Connected()
	b.n.Connected()
	exchange(p, b)
	n, ok := b.hasNote(NoteLinkUp)
	if !ok || n.Peer.WallClock != 42 || n.Peer.Policy != Strict || n.Peer.Role != RolePrimary {
		t.Fatalf("note %+v", n)
	}
}

// Rule (ft/doc.go, verify mode): each EpochEnd carries the primary's
// state hash; the backup compares. On a mismatch, a logged divergence:
// the backup asks for a page repair, takes its page hashes at a kick
// point and sends them; the primary, at its next kick point, sends only
// the pages whose hashes differ with the rest of its state; the backup
// installs it and goes on. Repairs are counted.
func TestVerifyDivergenceDetectedAndRepaired(t *testing.T) {
	p, b := pair(t, OutputCommit, true)
	primaryHash, backupHash := Digest{1}, Digest{2}

	// Epoch 1 ends at 4; the hashes differ.
	p.n.Async(timer(1))
	wantAction(t, "primary hash", p.n.Point(pt(4, ms)), ActHash)
	wantAction(t, "deliver", p.n.Hashed(primaryHash), ActDeliver)
	wantGo(t, "", p.n.Continue())
	// Epoch 2 goes on meanwhile: a read and an output at 6.
	p.n.Read(at(6), wire.KindClock, 60)
	p.n.Output(at(6), wire.KindConsole, []byte("z"))
	b.step(p.drain()...)

	wantAction(t, "backup hash", b.n.Point(pt(4, 0)), ActHash)
	// Diverged at an exit: it yields, to take its page hashes at the
	// kick point where it will install the repair.
	wantAction(t, "mismatch", b.n.Hashed(backupHash), ActYield)
	fromB := b.drain()
	if n, ok := b.hasNote(NoteDivergence); !ok || !contains(n.Err.Error(), "state hash") {
		t.Fatalf("backup notes %v", b.notes)
	}
	reqs := ofType[wire.CheckpointRequest](fromB)
	if len(reqs) != 1 || reqs[0].Epoch != 1 || !reqs[0].Pages {
		t.Fatalf("requests %#v", reqs)
	}
	p.step(fromB...)
	p.drain()
	if _, ok := p.hasNote(NoteDivergence); !ok || p.kicks != 0 {
		t.Fatalf("primary: notes %v, kicks %d (none before the page hashes)", p.notes, p.kicks)
	}
	// An overdue kick point meanwhile is no repair: the hashes are not here.
	if p.n.repairReady() {
		t.Fatal("repair ready without the page hashes")
	}

	pages := testPages(b)
	pages[3] ^= 1 // the page that differs, as the backup hashed it
	a := wantAction(t, "page hashes", b.n.Point(kick(4, 0)), ActHash)
	if !a.Pages {
		t.Fatalf("a diverged backup hashes %v, want its pages", a)
	}
	wantWait(t, "hashed", b.n.HashedPages(Digest{7}, pages), WaitRepair)
	fromB = b.drain()
	hs := ofType[wire.PageHashes](fromB)
	if len(hs) != 1 || !hs[0].Last || hs[0].Total != uint64(len(pages)) || hs[0].Regs != (Digest{7}) {
		t.Fatalf("page hashes %d frames", len(hs))
	}
	p.step(fromB...)
	p.drain()
	if p.kicks != 1 {
		t.Fatalf("primary: kicks %d once the hashes are in", p.kicks)
	}
	// The primary's next kick point gives a page repair against them.
	a = wantAction(t, "repair checkpoint", p.n.Point(kick(7, 2*ms)), ActCheckpoint)
	if !a.Repair || a.Full || len(a.Against) != len(pages) || a.Against[3] != pages[3] {
		t.Fatalf("repair %v, against %d hashes", a, len(a.Against))
	}
	wantGo(t, "", p.n.Checkpointed([]byte("PAGES")))
	cps := ofType[wire.Checkpoint](p.drain())
	if len(cps) != 1 || !cps[0].Repair || cps[0].Full {
		t.Fatalf("checkpoints sent %+v", cps)
	}
	b.step(cps[0])

	// The backup skips what the checkpoint replaces and installs it at
	// the kick point where it hashed.
	a = wantAction(t, "install", b.n.Continue(), ActInstall)
	if !a.Repair || a.Full || string(a.State) != "PAGES" {
		t.Fatalf("install %v", a)
	}
	wantAction(t, "at the primary's kick point", b.n.Continue(), ActWait)
	b.step(wire.Heartbeat{Epoch: 3, Pos: at(8)})
	wantGo(t, "", b.n.Continue())
	b.drain()
	if _, ok := b.hasNote(NoteRepaired); !ok {
		t.Fatal("no repaired note")
	}
	s := b.n.Status()
	if s.Repairs != 1 || s.PageRepairs != 1 || s.RepairBytes != 5 || s.Divergences != 1 || s.Diverged ||
		s.Epoch != 3 || s.Pos != at(7) || s.Outputs != 1 {
		t.Fatalf("status %v", s)
	}

	// From here the hashes agree again.
	p.n.Async(timer(9))
	wantAction(t, "hash", p.n.Point(pt(9, 10*ms)), ActHash)
	p.n.Hashed(Digest{7})
	p.n.Continue()
	b.step(p.drain()...)
	wantAction(t, "backup hash", b.n.Point(pt(9, 0)), ActHash)
	wantAction(t, "agrees", b.n.Hashed(Digest{7}), ActDeliver)
	if s := b.n.Status(); s.Divergences != 1 {
		t.Fatalf("status %v", s)
	}
}

// Rule (ft/doc.go, failure): "Re-protection: a fresh ftkvm backup
// --listen ADDR --join receives the running primary's state through live
// transfer, then replicates." After its backup died the primary accepts a
// new one: full state at the next kick point, then the log.
func TestReprotection(t *testing.T) {
	p, old := pair(t, OutputCommit, false)
	p.n.Point(pt(3, 0))
	old.n.Disconnected()
	p.n.Disconnected()
	p.drain()
	if s := p.n.Status(); s.Protected {
		t.Fatalf("status %v", s)
	}
	p.n.Output(at(4), wire.KindConsole, []byte("u"))

	b := newReplica(t, testConfig(RoleBackup, OutputCommit))
	p.n.Connected()
	b.n.Connected()
	exchange(p, b)
	if s := p.n.Status(); !s.Joining || s.Protected {
		t.Fatalf("joining: %v", s)
	}
	if p.kicks == 0 {
		t.Fatal("no kick for the join")
	}
	// The new backup booted a guest; it waits for the state.
	wantWait(t, "new backup", b.n.Point(pt(1, 0)), WaitLog)
	// Reads before the checkpoint are not logged: the state covers them.
	p.n.Read(at(5), wire.KindClock, 1)
	a := wantAction(t, "join checkpoint", p.n.Point(kick(5, ms)), ActCheckpoint)
	if !a.Full {
		t.Fatal("a join needs the full state")
	}
	wantGo(t, "", p.n.Checkpointed([]byte("ALL")))
	p.n.Read(at(6), wire.KindClock, 66)
	sent := p.drain()
	if _, ok := p.hasNote(NoteProtected); !ok {
		t.Fatal("not protected")
	}
	cps := ofType[wire.Checkpoint](sent)
	if len(cps) != 1 || !cps[0].Full || cps[0].OutSeq != 1 || len(ofType[wire.Record](sent)) != 1 {
		t.Fatalf("sent %#v", sent)
	}
	b.step(sent...)
	wantAction(t, "yield", b.n.Continue(), ActYield)
	wantAction(t, "install", b.n.Point(kick(1, 0)), ActInstall)
	wantGo(t, "", b.n.Continue())
	if a := b.n.Read(at(6), wire.KindClock, 0); a.Value != 66 {
		t.Fatalf("replicating: %v", a)
	}
	if s := b.n.Status(); s.Epoch != 2 || s.Outputs != 1 || s.Performed != 1 {
		t.Fatalf("backup %v", s)
	}
}

// A promoted backup is a primary like any other: it accepts a new backup
// once it is live.
func TestReprotectionAfterFailover(t *testing.T) {
	_, b := pair(t, OutputCommit, false)
	b.step(wire.Record{Seq: 1, Epoch: 1, Pos: at(3), Kind: wire.KindClock, Value: 3})
	b.n.Disconnected()
	nb := newReplica(t, testConfig(RoleBackup, OutputCommit))
	b.n.Connected()
	nb.n.Connected()
	exchange(b, nb)
	if s := b.n.Status(); !s.Joining {
		t.Fatalf("status %v", s)
	}
	// Still replaying: the join waits until live.
	wantGo(t, "replaying kick", b.n.Point(kick(2, 0)))
	b.n.Read(at(3), wire.KindClock, 0)
	wantGo(t, "live", b.n.Point(pt(3, 0)))
	b.n.Tick(20 * ms)
	b.drain()
	a := wantAction(t, "join checkpoint", b.n.Point(kick(3, 20*ms)), ActCheckpoint)
	if !a.Full {
		t.Fatal("not full")
	}
	b.n.Checkpointed([]byte("X"))
	nb.step(b.drain()...)
	if s := b.n.Status(); !s.Protected {
		t.Fatalf("status %v", s)
	}
}

// Rule (ft/doc.go, surface): "When the guest ends normally on the
// primary, the backup exits with the same status." The primary makes sure
// the goodbye arrived, so that the backup does not fail over instead. A
// backup behind the primary runs its guest on to the same end, also after
// the primary closed the link, so that it executes every exit the primary
// did (a disk write happens at one).
func TestGoodbyeStatus(t *testing.T) {
	for _, order := range []string{"goodbye first", "backup ends first"} {
		t.Run(order, func(t *testing.T) {
			p, b := pair(t, OutputCommit, false)
			if order == "backup ends first" {
				wantWait(t, "backup guest ended", b.n.Finish(3), WaitPrimary)
			}
			wantWait(t, "primary finish", p.n.Finish(3), WaitAck)
			b.step(p.drain()...)
			if order == "goodbye first" {
				wantGo(t, "the backup's guest runs on to its end", b.n.Point(pt(100, 0)))
			} else if a := b.n.Continue(); a.Kind != ActStop || a.Status != 3 || a.Err != nil {
				t.Fatalf("backup: %v", a)
			}
			p.step(b.drain()...)
			if a := p.n.Continue(); a.Kind != ActStop || a.Status != 3 {
				t.Fatalf("primary: %v", a)
			}
			if n, ok := b.hasNote(NoteGoodbye); !ok || n.Status != 3 {
				t.Fatalf("notes %v", b.notes)
			}
			// The primary closes the link: no failover now.
			b.n.Disconnected()
			if s := b.n.Status(); s.Role != RoleBackup || s.Promotions != 0 {
				t.Fatalf("status %v", s)
			}
			if order == "goodbye first" {
				wantGo(t, "after the link closed", b.n.Point(pt(101, 0)))
				if a := b.n.Finish(3); a.Kind != ActStop || a.Status != 3 || a.Err != nil {
					t.Fatalf("backup at its guest's end: %v", a)
				}
			}
		})
	}
}

// After the goodbye a backup whose guest halted with nothing left in the
// log stops: nothing would wake it.
func TestGoodbyeStopsAHaltedBackup(t *testing.T) {
	p, b := pair(t, OutputCommit, false)
	wantWait(t, "primary finish", p.n.Finish(0), WaitAck)
	b.step(p.drain()...)
	if a := b.n.Halt(pt(5, 0)); a.Kind != ActStop || a.Status != 0 {
		t.Fatalf("halted backup after the goodbye: %v", a)
	}
}

// Reference: the vmm loop is the exit path (~100k times a second) and
// allocates nothing; neither may the primary's answer at an exit with
// nothing to log.
func TestPrimaryExitPathDoesNotAllocate(t *testing.T) {
	for _, protected := range []bool{false, true} {
		var n *Node
		if protected {
			p, _ := pair(t, OutputCommit, false)
			n = p.n
		} else {
			n = NewNode(testConfig(RolePrimary, OutputCommit))
		}
		n.Tick(0)
		e := uint64(0)
		allocs := testing.AllocsPerRun(1000, func() {
			e++
			if a := n.Point(Point{Pos: Position{Exits: e}, Now: int64(e), RxSpace: 16}); a.Kind != ActGo {
				t.Fatal(a)
			}
			n.Ready()
		})
		if allocs != 0 {
			t.Errorf("protected=%v: %v allocations per exit", protected, allocs)
		}
	}
	// The backup's too, running up to the primary's next record.
	_, b := pair(t, OutputCommit, false)
	b.step(wire.Record{Seq: 1, Epoch: 1, Pos: at(1 << 40), Kind: wire.KindClock})
	e := uint64(0)
	allocs := testing.AllocsPerRun(1000, func() {
		e++
		if a := b.n.Point(pt(e, 0)); a.Kind != ActGo {
			t.Fatal(a)
		}
		b.n.Ready()
	})
	if allocs != 0 {
		t.Errorf("backup: %v allocations per exit", allocs)
	}
}

func BenchmarkPrimaryExit(b *testing.B) {
	p, _ := pair(b, OutputCommit, false)
	n := p.n
	e := uint64(0)
	for b.Loop() {
		e++
		n.Point(Point{Pos: Position{Exits: e}, Now: int64(e), RxSpace: 16})
		n.Ready()
	}
}

// vmm's Halt returns early when the machine needs its thread (Target.Wake)
// and is called again: a waiting Halt may be offered again.
func TestHaltMayBeOfferedAgain(t *testing.T) {
	p, b := pair(t, OutputCommit, false)
	wantWait(t, "primary halts", p.n.Halt(pt(3, 0)), WaitEvent)
	wantWait(t, "offered again", p.n.Halt(pt(3, 10)), WaitEvent)
	p.n.Async(timer(20))
	wantAction(t, "then ends the epoch", p.n.Continue(), ActDeliver)
	wantWait(t, "backup halts", b.n.Halt(pt(3, 0)), WaitLog)
	wantWait(t, "offered again", b.n.Halt(pt(3, 0)), WaitLog)
}

// The vCPU thread's conversation has an order; breaking it is a driver
// bug, reported at once.
func TestCallOrderIsChecked(t *testing.T) {
	p, _ := pair(t, Strict, false)
	p.n.Read(at(1), wire.KindClock, 0) // waits for its ack
	for name, f := range map[string]func(){
		"Point":        func() { p.n.Point(pt(2, 0)) },
		"Hashed":       func() { p.n.Hashed(Digest{}) },
		"Checkpointed": func() { p.n.Checkpointed(nil) },
	} {
		func() {
			defer func() {
				if recover() == nil {
					t.Errorf("%s during a Read: no panic", name)
				}
			}()
			f()
		}()
	}
}

func equalEvents(a, b []Event) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i].Kind != b[i].Kind || a[i].Value != b[i].Value || string(a[i].Data) != string(b[i].Data) {
			return false
		}
	}
	return true
}

func contains(s, sub string) bool { return strings.Contains(s, sub) }

// Reference: ft/doc.go: "the backup never executes guest code the primary
// has not". A kick point is host-timed: from one, the guest runs to its
// next exit, so the backup goes on only once the primary is known to have
// passed that exit (a later record, epoch end or progress heartbeat).
// Otherwise the primary could still end the epoch with a checkpoint of a
// state between the two exits, which the backup would have run past.
func TestBackupWaitsAtKickUntilPrimaryPassedNextExit(t *testing.T) {
	_, b := pair(t, OutputCommit, false)
	wantAction(t, "kick, nothing known", b.n.Point(kick(0, 0)), ActWait)
	b.step(wire.Heartbeat{Epoch: 1, Pos: at(0)})
	wantAction(t, "primary still at the same exit", b.n.Continue(), ActWait)
	b.step(wire.Heartbeat{Epoch: 1, Pos: at(1)})
	wantGo(t, "primary passed exit 1", b.n.Continue())
	wantGo(t, "exit 0 < 1", b.n.Point(pt(0, 0)))
	b.step(wire.Record{Seq: 1, Epoch: 1, Pos: at(3), Kind: wire.KindClock, Value: 9})
	wantGo(t, "a record at 3 proves exit 2 passed", b.n.Point(kick(2, 0)))
}

// "Nothing arrives": bytes of a long frame (a full checkpoint) that is
// still arriving are something. The driver reports them with Heard.
func TestBackupHearsAFrameStillArriving(t *testing.T) {
	_, b := pair(t, OutputCommit, false)
	b.n.Tick(0)
	b.step(wire.Heartbeat{Epoch: 1})
	b.n.Tick(50 * ms)
	for now := 60 * ms; now <= 400*ms; now += 10 * ms {
		b.n.Heard()
		b.n.Tick(now)
	}
	b.drain()
	if _, ok := b.hasNote(NotePrimaryLost); ok {
		t.Fatal("declared dead while its frame was arriving")
	}
	b.n.Tick(510 * ms)
	b.drain()
	if _, ok := b.hasNote(NotePrimaryLost); !ok {
		t.Fatal("not declared dead once nothing arrived for the timeout")
	}
}

// Rule (ft/doc.go, positions) and the paper's section 3: with an exact clock the
// epoch length is a number of instructions. An epoch ends at the first
// point that many instructions after it began, whatever the time, and no
// kick is ever asked for (every instruction is a point).
func TestEpochLengthInInstructions(t *testing.T) {
	cfg := testConfig(RolePrimary, OutputCommit)
	cfg.EpochInstructions = 1000
	cfg.Guest.Clock = wire.ClockStep
	p := newReplica(t, cfg)
	step := func(exits, instr, total uint64, now int64) Point {
		return Point{Pos: Position{Exits: exits, Instr: instr}, Now: now, RxSpace: 16, Instructions: total}
	}
	p.n.Async(timer(1))
	wantGo(t, "999 instructions in, an hour later", p.n.Point(step(3, 200, 999, 3600e9)))
	p.n.Tick(3700e9)
	p.drain()
	if p.kicks != 0 {
		t.Fatal("a kick under an exact clock")
	}
	wantAction(t, "1000 instructions", p.n.Point(step(3, 201, 1000, 3600e9)), ActDeliver)
	wantGo(t, "", p.n.Continue())
	p.n.Async(timer(2))
	wantGo(t, "the next epoch counts from its start", p.n.Point(step(4, 0, 1999, 3601e9)))
	wantAction(t, "1000 more", p.n.Point(step(4, 1, 2000, 3601e9)), ActDeliver)
}

// After an epoch end the guest runs on to its next exit, and before that
// exit the primary may end the next epoch with a checkpoint (its guest
// computed past the kick bound). The backup must not run past the state
// that checkpoint holds: it waits, then installs it at a kick point.
func TestBackupWaitsAfterEpochEndForCheckpoint(t *testing.T) {
	_, b := pair(t, OutputCommit, false)
	b.step(wire.EpochEnd{Seq: 1, Epoch: 1, Pos: at(5), Events: []Event{timer(1)}})
	wantAction(t, "epoch end", b.n.Point(pt(5, 0)), ActDeliver)
	wantWait(t, "may not run to exit 6 yet", b.n.Continue(), WaitLog)
	b.step(wire.Checkpoint{Seq: 2, Epoch: 2, Pos: at(5), Events: []Event{timer(2)}, State: []byte("S")})
	wantAction(t, "a checkpoint before exit 6", b.n.Continue(), ActYield)
	wantAction(t, "installed at the kick point", b.n.Point(kick(5, 0)), ActInstall)
	wantAction(t, "then its events", b.n.Continue(), ActDeliver)
	wantWait(t, "and waits again", b.n.Continue(), WaitLog)
	if _, ok := b.hasNote(NoteDivergence); ok {
		t.Fatalf("divergence: %v", b.notes)
	}
}

// A joining backup whose primary dies after the full state arrived, but
// before the backup installed it, installs it and takes over; one that
// has not received it has nothing to take over.
func TestJoiningBackupPromotesWithReceivedState(t *testing.T) {
	for _, received := range []bool{true, false} {
		t.Run(fmt.Sprint("received=", received), func(t *testing.T) {
			b := newReplica(t, testConfig(RoleBackup, OutputCommit))
			b.n.Connected()
			h := wire.Hello{Version: ProtocolVersion, Role: RolePrimary, Policy: OutputCommit, Started: true,
				MemSize: testGuest.MemSize, Kernel: testGuest.Kernel, Initrd: testGuest.Initrd, Cmdline: testGuest.Cmdline}
			b.step(h)
			if received {
				b.step(wire.Checkpoint{Seq: 1, Epoch: 4, Pos: at(9), Full: true, State: []byte("FULL")})
			}
			b.drain()
			b.n.Disconnected()
			b.drain()
			a := b.n.Point(kick(0, 0))
			if !received {
				wantAction(t, "nothing to take over", a, ActStop)
				return
			}
			a = wantAction(t, "installs the state it holds", a, ActInstall)
			if string(a.State) != "FULL" {
				t.Fatalf("installed %q", a.State)
			}
		})
	}
}

// Handshake: interrupt windows are the primary's decision. A backup
// whose host places them exactly adopts either choice (NoteLinkUp's Peer
// carries it); one whose host cannot refuses a primary that uses them,
// with one line on both sides, and a primary that uses them refuses it.
func TestHandshakeWindows(t *testing.T) {
	for _, tc := range []struct {
		primary, backupCan bool
		refused            bool
	}{
		{primary: false, backupCan: false},
		{primary: false, backupCan: true},
		{primary: true, backupCan: true},
		{primary: true, backupCan: false, refused: true},
	} {
		t.Run(fmt.Sprintf("primary %v, backup can %v", tc.primary, tc.backupCan), func(t *testing.T) {
			pc, bc := testConfig(RolePrimary, OutputCommit), testConfig(RoleBackup, OutputCommit)
			pc.Guest.Windows, bc.Guest.Windows = tc.primary, tc.backupCan
			p, b := newReplica(t, pc), newReplica(t, bc)
			p.n.Connected()
			b.n.Connected()
			ph, bh := ofType[wire.Hello](p.drain())[0], ofType[wire.Hello](b.drain())[0]
			p.step(bh)
			b.step(ph)
			pr, br := ofType[wire.Refuse](p.drain()), ofType[wire.Refuse](b.drain())
			if !tc.refused {
				if len(pr)+len(br) != 0 {
					t.Fatalf("refused: %v %v", pr, br)
				}
				n, ok := b.hasNote(NoteLinkUp)
				if !ok || n.Peer.Windows != tc.primary {
					t.Fatalf("the backup did not learn the primary's choice: %v", b.notes)
				}
				return
			}
			for _, r := range [][]wire.Refuse{pr, br} {
				if len(r) != 1 || r[0].Reason != wire.RefuseWindows || !contains(r[0].Text, "interrupt windows") {
					t.Fatalf("refusals %v %v", pr, br)
				}
			}
			if _, ok := b.hasNote(NoteLinkUp); ok {
				t.Fatal("the backup paired")
			}
		})
	}
}

// Handshake: a backup that joins a running guest installs the primary's
// CPUID with its state, so a different CPU digest is no refusal there.
func TestHandshakeJoinAdoptsCPU(t *testing.T) {
	pc, bc := testConfig(RolePrimary, OutputCommit), testConfig(RoleBackup, OutputCommit)
	bc.Guest.CPU[0] = 0xee
	p, b := newReplica(t, pc), newReplica(t, bc)
	p.n.started = true
	p.n.Connected()
	b.n.Connected()
	ph, bh := ofType[wire.Hello](p.drain())[0], ofType[wire.Hello](b.drain())[0]
	p.step(bh)
	b.step(ph)
	if r := append(ofType[wire.Refuse](p.drain()), ofType[wire.Refuse](b.drain())...); len(r) != 0 {
		t.Fatalf("refused: %v", r)
	}
}

// Handshake: a backup not told to join (Config.Join) refuses a primary
// whose guest runs already, and the primary is told why.
func TestHandshakeJoinOnlyWhenAsked(t *testing.T) {
	pc, bc := testConfig(RolePrimary, OutputCommit), testConfig(RoleBackup, OutputCommit)
	bc.Join = false
	p, b := newReplica(t, pc), newReplica(t, bc)
	p.n.started = true
	p.n.Connected()
	b.n.Connected()
	ph, bh := ofType[wire.Hello](p.drain())[0], ofType[wire.Hello](b.drain())[0]
	b.step(ph)
	r := ofType[wire.Refuse](b.drain())
	if len(r) != 1 || r[0].Reason != wire.RefuseJoin || !contains(r[0].Text, "--join") {
		t.Fatalf("refusals %v", r)
	}
	_ = bh
	p.step(r[0])
	p.drain()
	if _, ok := p.hasNote(NoteRefused); !ok {
		t.Fatalf("primary notes %v", p.notes)
	}
}

// Rule (ft/doc.go, "Disks at a join"): only a backup that joins and has
// no state yet takes disk contents; to a backup booted with the primary,
// or to a primary, they are a protocol error.
func TestDiskDataOnlyForAJoiningBackup(t *testing.T) {
	pc, bc := testConfig(RolePrimary, OutputCommit), testConfig(RoleBackup, OutputCommit)
	p, b := newReplica(t, pc), newReplica(t, bc)
	p.n.Connected()
	b.n.Connected()
	exchange(p, b) // the guest has not run: the backup boots with the primary
	for _, r := range []*replica{b, p} {
		if r.n.TakesDisks() {
			t.Fatalf("%v takes disk contents", r.n.Role())
		}
		if _, ok := r.hasNote(NoteProtocol); ok {
			t.Fatalf("%v: a protocol error before the disk contents: %v", r.n.Role(), r.notes)
		}
		r.n.Step(wire.DiskData{Data: []byte{1}})
		r.drain()
		if _, ok := r.hasNote(NoteProtocol); !ok {
			t.Fatalf("%v: notes %v, want a protocol error", r.n.Role(), r.notes)
		}
	}
}

// The driver captures a checkpoint without its lock, so a repair request
// can arrive between checkpointEpoch and Checkpointed: the incremental
// state captured then does not serve it, and the next kick point gives the
// full state (ft/doc.go, divergence).
func TestRepairRequestedDuringIncrementalCapture(t *testing.T) {
	p, b := pair(t, OutputCommit, true)
	fromB := hashesDifferAt4(t, p, b)

	// An overdue incremental checkpoint begins; the request and the
	// page hashes arrive while its state is captured.
	p.n.Async(timer(5))
	p.n.Tick(5 * ms) // the event is due; a guest without exits is overdue after the kick bound
	p.n.Tick(20 * ms)
	a := wantAction(t, "incremental checkpoint", p.n.Point(kick(6, 30*ms)), ActCheckpoint)
	if a.Full {
		t.Fatal("no repair was asked for yet")
	}
	p.step(fromB...)
	wantAction(t, "deliver after the checkpoint", p.n.Checkpointed([]byte("INCR")), ActDeliver)
	wantGo(t, "", p.n.Continue())
	b.step(p.drain()...)
	if !p.n.repair {
		t.Fatal("the incremental checkpoint cleared the repair")
	}
	// The next kick point gives the repair.
	a = wantAction(t, "repair checkpoint", p.n.Point(kick(8, 31*ms)), ActCheckpoint)
	if !a.Repair {
		t.Fatal("the repair got no page repair")
	}
	wantGo(t, "", p.n.Checkpointed([]byte("PAGES")))
	var repairs int
	for _, m := range ofType[wire.Checkpoint](p.drain()) {
		if m.Repair && string(m.State) == "PAGES" {
			repairs++
		}
	}
	if repairs != 1 || p.n.repair {
		t.Fatalf("%d page repairs sent, repair still asked %v", repairs, p.n.repair)
	}
}

// testPages is a backup's page hashes for the test guest: one per page.
func testPages(r *replica) []uint64 {
	pages := make([]uint64, r.n.cfg.Guest.MemSize/PageSize)
	for i := range pages {
		pages[i] = uint64(i) * 0x9e3779b97f4a7c15
	}
	return pages
}

// divergedPages: a backup whose last call diverged at an exit (a) yields
// and takes its page hashes at the kick point at exits; it returns what
// it sent (the request and the hashes).
func divergedPages(t *testing.T, b *replica, a Action, exits uint64) []wire.Msg {
	t.Helper()
	wantAction(t, "diverged at an exit", a, ActYield)
	if a := wantAction(t, "page hashes", b.n.Point(kick(exits, 0)), ActHash); !a.Pages {
		t.Fatalf("hash %v, want the pages", a)
	}
	wantWait(t, "hashed", b.n.HashedPages(Digest{7}, testPages(b)), WaitRepair)
	return b.drain()
}

// The same for a join: the backup whose link was up when an incremental
// state began to be captured is lost meanwhile, and a new one joins
// before the capture ends. The incremental state does not serve a backup
// that has no state: the joiner is sent nothing, the primary is not
// protected by it yet, and the next kick point gives the full state with
// the join's images (Action.Join).
func TestJoinDuringIncrementalCapture(t *testing.T) {
	p, _ := pair(t, OutputCommit, false)
	p.n.Async(timer(1))
	p.n.Tick(5 * ms)
	p.n.Tick(20 * ms)
	a := wantAction(t, "incremental checkpoint", p.n.Point(kick(6, 30*ms)), ActCheckpoint)
	if a.Full || a.Join {
		t.Fatalf("checkpoint %v: nobody asked for the full state yet", a)
	}
	// Meanwhile: the link to b1 breaks, a new backup connects and joins.
	p.n.Disconnected()
	p.drain()
	b2 := newReplica(t, testConfig(RoleBackup, OutputCommit))
	p.n.Connected()
	b2.n.Connected()
	exchange(p, b2)
	if s := p.n.Status(); !s.Joining {
		t.Fatalf("the new backup is not joining: %v", s)
	}
	wantAction(t, "deliver after the checkpoint", p.n.Checkpointed([]byte("INCR")), ActDeliver)
	wantGo(t, "", p.n.Continue())
	for _, m := range ofType[wire.Checkpoint](p.drain()) {
		t.Fatalf("the joining backup was sent a checkpoint (full %v, %q)", m.Full, m.State)
	}
	if s := p.n.Status(); s.Protected || !s.Joining {
		t.Fatalf("after the incremental state: %v", s)
	}
	a = wantAction(t, "the join's checkpoint", p.n.Point(kick(8, 31*ms)), ActCheckpoint)
	if !a.Full || !a.Join {
		t.Fatalf("checkpoint %v: the joiner needs the full state and the images", a)
	}
	p.n.Checkpointed([]byte("FULL"))
	var full int
	for _, m := range ofType[wire.Checkpoint](p.drain()) {
		if m.Full && string(m.State) == "FULL" {
			full++
		}
	}
	if s := p.n.Status(); full != 1 || !s.Protected || s.Joining {
		t.Fatalf("%d full checkpoints sent; %v", full, s)
	}
}

// hashesDifferAt4 runs a verify pair's first epoch to its end at 4, where
// the backup's hash differs from the primary's, and returns what the
// backup sends then (its checkpoint request and its page hashes).
func hashesDifferAt4(t *testing.T, p, b *replica) []wire.Msg {
	t.Helper()
	p.n.Async(timer(1))
	wantAction(t, "primary hash", p.n.Point(pt(4, ms)), ActHash)
	wantAction(t, "deliver", p.n.Hashed(Digest{1}), ActDeliver)
	wantGo(t, "", p.n.Continue())
	b.step(p.drain()...)
	wantAction(t, "backup hash", b.n.Point(pt(4, 0)), ActHash)
	return divergedPages(t, b, b.n.Hashed(Digest{2}), 4)
}

// pageRepairedPair: a verify-mode pair whose backup diverged at the end
// of epoch 1 (exit 4) and installed a page repair the primary captured at
// its kick point at exit 5 (ending epoch 2). Both are in epoch 3 at 5.
func pageRepairedPair(t *testing.T) (p, b *replica) {
	t.Helper()
	p, b = pair(t, OutputCommit, true)
	p.step(hashesDifferAt4(t, p, b)...)
	p.drain()
	if a := wantAction(t, "page repair", p.n.Point(kick(5, 2*ms)), ActCheckpoint); !a.Repair {
		t.Fatalf("checkpoint %v, want a page repair", a)
	}
	wantGo(t, "", p.n.Checkpointed([]byte("PAGES")))
	b.step(p.drain()...)
	if a := wantAction(t, "install", b.n.Continue(), ActInstall); !a.Repair {
		t.Fatalf("install %v", a)
	}
	wantWait(t, "at the primary's kick point", b.n.Continue(), WaitLog)
	if s := b.n.Status(); s.Diverged || s.PageRepairs != 1 || s.Epoch != 3 || s.Pos != at(5) {
		t.Fatalf("after the page repair: %v", s)
	}
	return p, b
}

// endEpoch3: the primary ends epoch 3 at exit 6 with hash h; the backup
// reaches it and hashes.
func endEpoch3(t *testing.T, p, b *replica, h Digest) {
	t.Helper()
	p.n.Async(timer(3 * ms))
	wantAction(t, "primary hash", p.n.Point(pt(6, 3*ms)), ActHash)
	wantAction(t, "deliver", p.n.Hashed(h), ActDeliver)
	wantGo(t, "", p.n.Continue())
	b.step(p.drain()...)
	wantGo(t, "the backup leaves the kick point", b.n.Continue())
	wantAction(t, "backup hash", b.n.Point(pt(6, 0)), ActHash)
}

// Rule (ft/doc.go, verify mode): a page repair is right only if the pages
// it did not carry were equal; the next compared hash says so. If it
// differs, the backup says so and asks for the full state, which it gets.
func TestVerifyPageRepairNotConfirmedFallsBackToFull(t *testing.T) {
	p, b := pageRepairedPair(t)
	endEpoch3(t, p, b, Digest{3})
	wantWait(t, "still differs: no page hashes this time", b.n.Hashed(Digest{4}), WaitRepair)
	fromB := b.drain()
	reqs := ofType[wire.CheckpointRequest](fromB)
	if len(reqs) != 1 || reqs[0].Pages || len(ofType[wire.PageHashes](fromB)) != 0 {
		t.Fatalf("sent %v, want a request for the full state", fromB)
	}
	var said bool
	for _, n := range b.notes {
		said = said || n.Kind == NoteDivergence && contains(n.Err.Error(), "page repair") && contains(n.Err.Error(), "full state")
	}
	if !said {
		t.Fatalf("the fallback is not in the notes: %v", b.notes)
	}
	p.step(fromB...)
	p.drain()
	if a := wantAction(t, "full repair", p.n.Point(kick(7, 4*ms)), ActCheckpoint); !a.Full || a.Repair {
		t.Fatalf("checkpoint %v, want the full state", a)
	}
	wantGo(t, "", p.n.Checkpointed([]byte("FULL")))
	b.step(p.drain()...)
	wantAction(t, "yield to install", b.n.Continue(), ActYield)
	if a := wantAction(t, "install", b.n.Point(kick(6, 0)), ActInstall); !a.Full || string(a.State) != "FULL" {
		t.Fatalf("install %v", a)
	}
	b.n.Continue()
	b.drain()
	if s := b.n.Status(); s.Repairs != 2 || s.PageRepairs != 1 || s.RepairBytes != 5+4 || s.Diverged {
		t.Fatalf("status %v", s)
	}
}

// A matching hash confirms a page repair: a later divergence is repaired
// by pages again.
func TestVerifyPageRepairConfirmedByNextHash(t *testing.T) {
	p, b := pageRepairedPair(t)
	endEpoch3(t, p, b, Digest{3})
	wantAction(t, "matches", b.n.Hashed(Digest{3}), ActDeliver)
	if b.n.checkRepair {
		t.Fatal("a matching hash left the page repair unconfirmed")
	}
	p.n.Read(at(7), wire.KindClock, 60)
	b.step(p.drain()...)
	wantGo(t, "", b.n.Continue())
	b.drain()
	// The next divergence (a read where the primary made none) asks for
	// pages.
	b.n.Read(at(8), wire.KindClock, 1)
	reqs := ofType[wire.CheckpointRequest](b.drain())
	if len(reqs) != 1 || !reqs[0].Pages {
		t.Fatalf("requests %+v, want a page repair", reqs)
	}
}

// Page hashes come in bounded frames, in order; the primary takes them
// only after a request for a page repair and only for its guest's pages,
// and a backup takes a page repair only after sending its hashes. Anything
// else is a protocol error.
func TestPageHashesFramesAndProtocol(t *testing.T) {
	pc, bc := testConfig(RolePrimary, OutputCommit), testConfig(RoleBackup, OutputCommit)
	pc.Verify = true
	pc.Guest.MemSize, bc.Guest.MemSize = 1<<30, 1<<30 // 262144 pages: 4 frames
	p, b := pairOf(t, pc, bc)
	fromB := hashesDifferAt4(t, p, b)
	hs := ofType[wire.PageHashes](fromB)
	if len(hs) != 4 {
		t.Fatalf("%d frames of page hashes, want 4", len(hs))
	}
	for i, h := range hs {
		if len(h.Hashes) > wire.MaxPageHashes || h.First != uint64(i*wire.MaxPageHashes) || h.Last != (i == 3) || h.Total != 1<<18 {
			t.Fatalf("frame %d: first %d, %d hashes, last %v", i, h.First, len(h.Hashes), h.Last)
		}
	}
	req := ofType[wire.CheckpointRequest](fromB)[0]

	for _, tc := range []struct {
		name string
		msgs []wire.Msg
		text string
	}{
		{"hashes without a request", []wire.Msg{hs[0]}, "without a request"},
		{"a frame missing", []wire.Msg{req, hs[0], hs[2]}, "page 65536 was expected"},
		{"another memory size", []wire.Msg{req, wire.PageHashes{Total: 5, Last: true, Hashes: make([]uint64, 5)}}, "the guest has 262144"},
		{"past the end", []wire.Msg{req, hs[0], hs[1], hs[2], hs[3], hs[3]}, "without a request"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			q, _ := pairOf(t, pc, bc)
			q.step(tc.msgs...)
			q.drain()
			n, ok := q.hasNote(NoteProtocol)
			if !ok || !contains(n.Err.Error(), tc.text) {
				t.Fatalf("notes %v, want a protocol error with %q", q.notes, tc.text)
			}
		})
	}

	// In order, the primary has them all and kicks for the repair.
	p.step(fromB...)
	p.drain()
	if !p.n.repairReady() || len(p.n.peerPages) != 1<<18 {
		t.Fatalf("primary: repair ready %v with %d hashes", p.n.repairReady(), len(p.n.peerPages))
	}

	// A backup that sent no hashes takes no page repair.
	_, c := pairOf(t, pc, bc)
	c.step(wire.Checkpoint{Seq: 1, Epoch: 1, Repair: true, State: []byte("PAGES")})
	c.drain()
	if n, ok := c.hasNote(NoteProtocol); !ok || !contains(n.Err.Error(), "sent no page hashes") {
		t.Fatalf("notes %v", c.notes)
	}
}
