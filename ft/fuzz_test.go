package ft

import (
	"bytes"
	"testing"

	"github.com/ftkvm/ftkvm/ft/wire"
)

// FuzzNode drives a node (primary or backup) with calls from a correct
// driver and messages from an arbitrary peer: nothing the peer sends may
// make it panic, and whatever happens it performs each output at most
// once, in order. The input is a little program: each byte picks a call,
// the next bytes its arguments.
func FuzzNode(f *testing.F) {
	f.Add([]byte{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15})
	f.Add([]byte{1, 5, 5, 5, 0, 0, 0, 2, 2, 2, 9, 9, 9, 3, 3, 3, 7, 7})
	f.Add([]byte{0, 8, 1, 8, 2, 8, 3, 8, 4, 8, 5, 8, 6, 8, 7, 9, 9, 9, 9})
	f.Fuzz(runFuzzNode)
}

func runFuzzNode(t *testing.T, prog []byte) {
	if len(prog) == 0 {
		return
	}
	role := RolePrimary
	if prog[0]&1 == 1 {
		role = RoleBackup
	}
	cfg := testConfig(role, Policy(1+prog[0]>>1&1))
	cfg.Verify = prog[0]&4 != 0
	n := NewNode(cfg)
	r := &fuzzReader{b: prog[1:]}
	var (
		exits   uint64
		now     int64
		link    bool
		pending Action // the vCPU's conversation in progress
		busy    bool
		lastOut uint64
		stopped bool
	)
	drain := func() {
		rd := n.Ready()
		for _, o := range rd.Perform {
			if o.Seq <= lastOut {
				t.Fatalf("output %d performed after %d", o.Seq, lastOut)
			}
			lastOut = o.Seq
		}
		if rd.Close {
			link = false
		}
	}
	// answer carries the conversation one step, as a driver would.
	answer := func(a Action) {
		switch a.Kind {
		case ActGo, ActYield:
			busy = false
		case ActStop:
			busy, stopped = false, true
		case ActWait, ActDeliver, ActInstall:
			busy, pending = true, a
		case ActHash, ActCheckpoint:
			busy, pending = true, a
		}
	}
	for steps := 0; r.more() && steps < 500; steps++ {
		switch op := r.byte() % 12; {
		case op == 0 && !link:
			n.Connected()
			link = true
		case op == 1:
			n.Step(r.msg())
		case op == 2:
			now += int64(r.byte()) * ms / 4
			n.Tick(now)
		case op == 3:
			n.Async(r.event())
		case op == 4 && link:
			n.Disconnected()
			link = false
		case op == 5:
			n.Performed(uint64(r.byte()))
		case busy:
			switch pending.Kind {
			case ActHash:
				if pending.Pages {
					answer(n.HashedPages(Digest{r.byte() % 2}, make([]uint64, testGuest.MemSize/PageSize)))
					break
				}
				answer(n.Hashed(Digest{r.byte() % 2}))
			case ActCheckpoint:
				answer(n.Checkpointed([]byte{r.byte()}))
			default:
				answer(n.Continue())
			}
		case stopped:
			answer(n.Point(pt(exits, now)))
		case op == 6:
			exits += uint64(r.byte() % 3)
			answer(n.Point(Point{Pos: at(exits), Now: now, RxSpace: int(r.byte() % 3)}))
		case op == 7:
			answer(n.Point(kick(exits, now)))
		case op == 8:
			answer(n.Halt(pt(exits, now)))
		case op == 9:
			answer(n.Read(at(exits+1), wire.KindClock, uint64(r.byte())))
		case op == 10:
			answer(n.Output(at(exits+1), r.outKind(), []byte{r.byte()}))
		case op == 11:
			answer(n.Finish(int(r.byte())))
		}
		drain()
	}
	_ = n.Status().String()
}

type fuzzReader struct{ b []byte }

func (r *fuzzReader) more() bool { return len(r.b) > 0 }

func (r *fuzzReader) byte() byte {
	if len(r.b) == 0 {
		return 0
	}
	c := r.b[0]
	r.b = r.b[1:]
	return c
}

func (r *fuzzReader) small() uint64 { return uint64(r.byte() % 8) }

// event is an asynchronous event: a timer tick, a UART byte, or a
// received frame (wire.KindNetRx) on one of two interfaces.
func (r *fuzzReader) event() Event {
	switch r.byte() % 4 {
	case 0:
		return Event{Kind: wire.KindTimer, Value: uint64(r.byte())}
	case 1:
		return Event{Kind: wire.KindUART, Value: uint64(r.byte())}
	case 2:
		return Event{Kind: wire.KindNetRx, Value: r.small() % 2, Data: bytes.Repeat([]byte{r.byte()}, 60)}
	}
	return Event{Kind: Kind(r.byte() % 8), Value: uint64(r.byte())}
}

// outKind is an output's kind: console bytes or a transmitted frame.
func (r *fuzzReader) outKind() Kind {
	if r.byte()%2 == 0 {
		return wire.KindNetTx
	}
	return wire.KindConsole
}

// msg makes a message a peer could send, with small numbers so that
// sequence numbers, epochs and positions collide with the node's.
func (r *fuzzReader) msg() wire.Msg {
	pos := Position{Exits: r.small()}
	evs := []Event{r.event()}
	switch r.byte() % 12 {
	case 0:
		h := wire.Hello{Version: ProtocolVersion, Role: Role(1 + r.byte()%2), MemSize: testGuest.MemSize,
			Kernel: testGuest.Kernel, Initrd: testGuest.Initrd, Cmdline: testGuest.Cmdline, Started: r.byte()&1 == 1}
		if r.byte()%4 == 0 {
			h.MemSize++
		}
		return h
	case 1:
		return wire.Refuse{Reason: wire.RefuseReason(r.byte() % 10), Text: "no"}
	case 2:
		return wire.Record{Seq: r.small(), Epoch: r.small(), Pos: pos, Kind: wire.KindClock, Value: r.small()}
	case 3:
		return wire.EpochEnd{Seq: r.small(), Epoch: r.small(), Pos: pos, Halt: r.byte()&1 == 1, Events: evs, Verify: r.byte()&1 == 1}
	case 4:
		b := r.byte()
		return wire.Checkpoint{Seq: r.small(), Epoch: r.small(), Pos: pos, Full: b&1 == 1, Repair: b&2 == 2, OutSeq: r.small(), Events: evs, State: []byte{1}}
	case 5:
		return wire.Output{Seq: r.small(), Epoch: r.small(), Pos: pos, OutSeq: r.small(), Done: r.small(), Kind: r.outKind(), Data: []byte{r.byte()}}
	case 6:
		return wire.Performed{OutSeq: r.small()}
	case 7:
		return wire.Ack{Seq: r.small()}
	case 8:
		return wire.CheckpointRequest{Epoch: r.small(), Pos: pos, Pages: r.byte()&1 == 1}
	case 10:
		// Page hashes: all of the test guest's in one frame, or a piece.
		total := testGuest.MemSize / PageSize
		if r.byte()&1 == 1 {
			return wire.PageHashes{Epoch: r.small(), Pos: pos, Total: total, Last: true, Hashes: make([]uint64, total)}
		}
		return wire.PageHashes{Epoch: r.small(), Pos: pos, First: r.small(), Total: total - r.small(), Last: r.byte()&1 == 1, Hashes: []uint64{r.small()}}
	case 9, 11:
		return wire.Heartbeat{Epoch: r.small(), Pos: pos}
	}
	return wire.Goodbye{Seq: r.small(), Status: int32(r.byte())}
}
