package ft

import (
	"bytes"
	"slices"
	"testing"

	"github.com/ftkvm/ftkvm/ft/wire"
)

// Network interfaces under the rules: a received frame is an
// asynchronous event (P1, P4, P5), a transmitted frame an output
// (output policies, failover).

func frameEv(nic int, seed byte) Event {
	return Event{Kind: wire.KindNetRx, Value: uint64(nic), Data: bytes.Repeat([]byte{seed}, 60)}
}

func txData(nic int, seed byte) []byte {
	return wire.NetTxData(nil, nic, bytes.Repeat([]byte{seed}, 64))
}

// Rule P1 (ft/doc.go): a received frame is buffered, never delivered
// mid-epoch; at the epoch's end (P2) it is sent in the EpochEnd and
// delivered, on the primary and then on the backup at the same position
// (P5).
func TestNetRxFrameDeliveredOnlyAtEpochEnd(t *testing.T) {
	p, b := pair(t, OutputCommit, false)
	ev := frameEv(1, 0xa1)
	p.n.Async(ev)
	ev.Data[0] = 0 // the node copied the frame: the driver reuses its buffer
	for e := uint64(1); e <= 9; e++ {
		wantGo(t, "mid-epoch", p.n.Point(pt(e, int64(e)*ms/10)))
	}
	wantMsgs(t, "mid-epoch", without(p.drain()))
	a := wantAction(t, "epoch end", p.n.Point(pt(10, ms)), ActDeliver)
	want := []Event{frameEv(1, 0xa1)}
	if !equalEvents(a.Events, want) {
		t.Fatalf("primary delivers %v", a.Events)
	}
	wantGo(t, "after delivery", p.n.Continue())
	sent := p.drain()
	ends := ofType[wire.EpochEnd](sent)
	if len(ends) != 1 || ends[0].Pos != at(10) || !equalEvents(ends[0].Events, want) {
		t.Fatalf("epoch ends %v", ends)
	}
	b.step(sent...)
	for e := uint64(1); e < 10; e++ {
		wantGo(t, "backup before the end", b.n.Point(pt(e, 0)))
	}
	a = wantAction(t, "backup at the end", b.n.Point(pt(10, 0)), ActDeliver)
	if !equalEvents(a.Events, want) {
		t.Fatalf("backup delivers %v", a.Events)
	}
}

// Rule P4 (ft/doc.go): a backup ignores the frames of its own interfaces;
// it delivers only the primary's, from the log.
func TestNetRxBackupIgnoresOwnFrames(t *testing.T) {
	_, b := pair(t, OutputCommit, false)
	b.n.Async(frameEv(0, 0xbb))
	b.step(wire.EpochEnd{Seq: 1, Epoch: 1, Pos: at(3), Events: []Event{frameEv(0, 0xcc)}})
	wantGo(t, "before the end", b.n.Point(pt(2, 5*ms)))
	a := wantAction(t, "at the end", b.n.Point(pt(3, 5*ms)), ActDeliver)
	if !equalEvents(a.Events, []Event{frameEv(0, 0xcc)}) {
		t.Fatalf("delivered %v", a.Events)
	}
}

// Rule P1 (ft/doc.go): at most MaxPendingFrames frames wait for an epoch
// end; the rest are dropped and counted, and other events are not.
func TestNetRxFramesBounded(t *testing.T) {
	p, _ := pair(t, OutputCommit, false)
	for i := range MaxPendingFrames + 5 {
		p.n.Async(frameEv(0, byte(i)))
	}
	p.n.Async(uart('u'))
	if s := p.n.Status(); s.FramesDropped != 5 {
		t.Fatalf("dropped %d", s.FramesDropped)
	}
	a := wantAction(t, "epoch end", p.n.Point(pt(1, ms)), ActDeliver)
	if len(a.Events) != MaxPendingFrames+1 || a.Events[MaxPendingFrames-1].Data[0] != MaxPendingFrames-1 {
		t.Fatalf("delivered %d events", len(a.Events))
	}
	p.n.Continue()
	// Delivered frames make room again.
	p.n.Async(frameEv(0, 0xdd))
	a = wantAction(t, "next epoch end", p.n.Point(pt(2, 3*ms)), ActDeliver)
	if len(a.Events) != 1 || p.n.Status().FramesDropped != 5 {
		t.Fatalf("delivered %v, status %v", a.Events, p.n.Status())
	}
}

// Output commit (ft/doc.go): a transmitted frame is held until the backup
// acknowledged its record; the backup absorbs it and performs nothing.
func TestNetTxHeldUntilAck(t *testing.T) {
	for _, policy := range []Policy{OutputCommit, Strict} {
		t.Run(policy.String(), func(t *testing.T) {
			p, b := pair(t, policy, false)
			a := p.n.Output(at(4), wire.KindNetTx, txData(0, 0x77))
			if policy == Strict {
				wantWait(t, "strict output", a, WaitAck)
			} else {
				wantGo(t, "output-commit output", a)
			}
			sent := p.drain()
			if len(p.perform) != 0 {
				t.Fatal("a frame left before the ack")
			}
			outs := ofType[wire.Output](sent)
			if len(outs) != 1 || outs[0].Kind != wire.KindNetTx || !bytes.Equal(outs[0].Data, txData(0, 0x77)) {
				t.Fatalf("output records %v", outs)
			}
			b.step(sent...)
			wantGo(t, "backup absorbs", b.n.Output(at(4), wire.KindNetTx, txData(0, 0x77)))
			p.step(b.drain()...)
			if policy == Strict {
				wantGo(t, "acked", p.n.Continue())
			}
			p.drain()
			if len(p.perform) != 1 || p.perform[0].Kind != wire.KindNetTx || !bytes.Equal(p.perform[0].Data, txData(0, 0x77)) {
				t.Fatalf("performed %v", p.perform)
			}
			if len(b.perform) != 0 {
				t.Fatalf("the backup transmitted %v", b.perform)
			}
			// A different frame on the backup is a divergence.
			p.n.Output(at(6), wire.KindNetTx, txData(0, 1))
			b.step(p.drain()...)
			b.n.Output(at(6), wire.KindNetTx, txData(0, 2))
			b.drain()
			if _, ok := b.hasNote(NoteDivergence); !ok {
				t.Fatal("a different frame is not a divergence")
			}
		})
	}
}

// Failover (ft/doc.go): a promoted backup transmits the frames whose
// sending the dead primary had not confirmed (uncertain, duplicates
// allowed) and nothing before its promotion. Frames do not move the
// console seam.
func TestNetTxFailoverRedoesUnconfirmed(t *testing.T) {
	p, b := pair(t, OutputCommit, false)
	p.n.Output(at(2), wire.KindConsole, []byte("ab"))
	p.n.Output(at(3), wire.KindNetTx, txData(0, 1))
	p.n.Output(at(4), wire.KindNetTx, txData(0, 2))
	b.step(p.drain()...)
	p.step(b.drain()...)
	p.drain()
	p.n.Performed(2) // the console bytes and frame 1 left the primary; frame 2 did not (yet)
	p.n.Tick(5 * ms)
	b.step(p.drain()...)
	wantGo(t, "console", b.n.Output(at(2), wire.KindConsole, []byte("ab")))
	wantGo(t, "frame 1", b.n.Output(at(3), wire.KindNetTx, txData(0, 1)))
	wantGo(t, "frame 2", b.n.Output(at(4), wire.KindNetTx, txData(0, 2)))
	b.drain()
	if len(b.perform) != 0 {
		t.Fatalf("the backup transmitted %v", b.perform)
	}
	b.n.Disconnected()
	b.drain()
	if len(b.perform) != 1 || b.perform[0].Kind != wire.KindNetTx || !bytes.Equal(b.perform[0].Data, txData(0, 2)) || !b.perform[0].Uncertain {
		t.Fatalf("at takeover: %v", b.perform)
	}
	if s := b.n.Status(); s.Seam != 2 || s.SeamUncertain != 0 {
		t.Fatalf("seam %d uncertain %d", s.Seam, s.SeamUncertain)
	}
}

// Handshake (ft/doc.go): both replicas must give the guest the same
// network interfaces, by count and MAC address.
func TestHandshakeRefusesOtherNICs(t *testing.T) {
	nics := []wire.NIC{{MAC: [6]byte{2, 0, 0, 0, 0, 1}}, {MAC: [6]byte{2, 0, 0, 0, 0, 2}}}
	for _, tc := range []struct {
		name          string
		change        func(d []wire.NIC) []wire.NIC
		primary, back string
	}{
		{"same", func(d []wire.NIC) []wire.NIC { return d }, "", ""},
		{"count", func(d []wire.NIC) []wire.NIC { return d[:1] },
			"different network interfaces: 2 here, 1 on the peer", "different network interfaces: 1 here, 2 on the peer"},
		{"mac", func(d []wire.NIC) []wire.NIC { d[1].MAC[5] = 9; return d },
			"interface 1 has MAC 02:00:00:00:00:02 here, 02:00:00:00:00:09 on the peer",
			"interface 1 has MAC 02:00:00:00:00:09 here, 02:00:00:00:00:02 on the peer"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			pc, bc := testConfig(RolePrimary, OutputCommit), testConfig(RoleBackup, OutputCommit)
			pc.Guest.NICs = slices.Clone(nics)
			bc.Guest.NICs = tc.change(slices.Clone(nics))
			p, b := newReplica(t, pc), newReplica(t, bc)
			p.n.Connected()
			b.n.Connected()
			exchange(p, b)
			if tc.primary == "" {
				if !p.n.Status().Link || !b.n.Status().Link {
					t.Fatalf("same NICs: primary %v backup %v", p.n.Status(), b.n.Status())
				}
				return
			}
			for r, text := range map[*replica]string{p: tc.primary, b: tc.back} {
				n, ok := r.hasNote(NoteRefused)
				if !ok || !isErr(n.Err, ErrRefused) || !contains(n.Err.Error(), text) {
					t.Fatalf("%v notes %v, want a refusal %q", r.n.Role(), r.notes, text)
				}
			}
			if _, ok := b.hasNote(NoteLinkUp); ok {
				t.Fatal("link up despite the refusal")
			}
		})
	}
}
