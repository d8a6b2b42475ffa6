package ft

import (
	"errors"
	"reflect"
	"testing"
	"time"

	"github.com/ftkvm/ftkvm/ft/wire"
)

var testGuest = Identity{Kernel: Digest{1}, Initrd: Digest{2}, Cmdline: Digest{3}, MemSize: 64 << 20, WallClock: 1_700_000_000e9}

const ms = int64(time.Millisecond)

func testConfig(role Role, policy Policy) Config {
	// Backups join a running guest where a test makes them (Join); the
	// refusal without it has its own test.
	return Config{Role: role, Policy: policy, Guest: testGuest, Join: role == RoleBackup,
		EpochLength: time.Millisecond, KickAfter: 10 * time.Millisecond,
		Heartbeat: 20 * time.Millisecond, Timeout: 100 * time.Millisecond}
}

// replica wraps a node with what its driver would have seen: every Ready
// drained, messages passed through the wire codec.
type replica struct {
	t       testing.TB
	n       *Node
	notes   []Note
	perform []Out
	kicks   int
	closed  bool
}

func newReplica(t testing.TB, cfg Config) *replica {
	return &replica{t: t, n: NewNode(cfg)}
}

// drain takes the node's Ready and returns its messages, encoded and
// decoded as they would cross the link.
func (r *replica) drain() []wire.Msg {
	r.t.Helper()
	rd := r.n.Ready()
	r.notes = append(r.notes, rd.Notes...)
	r.perform = append(r.perform, rd.Perform...)
	if rd.Kick {
		r.kicks++
	}
	if rd.Close {
		r.closed = true
	}
	var out []wire.Msg
	for _, m := range rd.Messages {
		got, err := wire.Unmarshal(wire.Marshal(m))
		if err != nil {
			r.t.Fatalf("%v does not round-trip: %v", m.Type(), err)
		}
		out = append(out, got)
	}
	return out
}

func (r *replica) step(ms ...wire.Msg) {
	for _, m := range ms {
		r.n.Step(m)
	}
}

// hasNote reports whether a note of kind k was seen (and returns it).
func (r *replica) hasNote(k NoteKind) (Note, bool) {
	for _, n := range r.notes {
		if n.Kind == k {
			return n, true
		}
	}
	return Note{}, false
}

// exchange moves messages both ways until neither side has more.
func exchange(a, b *replica) {
	for range 100 {
		ab, ba := a.drain(), b.drain()
		if len(ab) == 0 && len(ba) == 0 {
			return
		}
		b.step(ab...)
		a.step(ba...)
	}
	panic("exchange does not settle")
}

// pair returns a connected primary and backup that have done the
// handshake and booted the same guest.
func pair(t testing.TB, policy Policy, verify bool) (p, b *replica) {
	pc, bc := testConfig(RolePrimary, policy), testConfig(RoleBackup, policy)
	pc.Verify = verify
	return pairOf(t, pc, bc)
}

// pairOf is pair with the two configurations given.
func pairOf(t testing.TB, pc, bc Config) (p, b *replica) {
	p, b = newReplica(t, pc), newReplica(t, bc)
	p.n.Connected()
	b.n.Connected()
	exchange(p, b)
	if !p.n.Status().Protected || !b.n.Status().Link {
		t.Fatalf("pair not set up: %v / %v", p.n.Status(), b.n.Status())
	}
	p.notes, b.notes = nil, nil
	return p, b
}

func at(exits uint64) Position { return Position{Exits: exits} }

func pt(exits uint64, now int64) Point { return Point{Pos: at(exits), Now: now, RxSpace: 16} }

func kick(exits uint64, now int64) Point {
	return Point{Pos: at(exits), Kick: true, Now: now, RxSpace: 16}
}

func timer(t int64) Event { return Event{Kind: wire.KindTimer, Value: uint64(t)} }
func uart(b byte) Event   { return Event{Kind: wire.KindUART, Value: uint64(b)} }

func wantAction(t testing.TB, what string, got Action, want ActionKind) Action {
	t.Helper()
	if got.Kind != want {
		t.Fatalf("%s: got %v, want %v", what, got, want)
	}
	return got
}

func wantWait(t testing.TB, what string, got Action, w WaitReason) {
	t.Helper()
	if got.Kind != ActWait || got.Wait != w {
		t.Fatalf("%s: got %v, want wait(%v)", what, got, w)
	}
}

func wantGo(t testing.TB, what string, got Action) {
	t.Helper()
	wantAction(t, what, got, ActGo)
}

func wantMsgs(t testing.TB, what string, got []wire.Msg, want ...wire.Msg) {
	t.Helper()
	if len(got) == 0 && len(want) == 0 {
		return
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("%s: messages\n got %#v\nwant %#v", what, got, want)
	}
}

// ofType keeps the messages of type T.
func ofType[T wire.Msg](ms []wire.Msg) []T {
	var out []T
	for _, m := range ms {
		if v, ok := m.(T); ok {
			out = append(out, v)
		}
	}
	return out
}

// without drops heartbeats and acks, which tests rarely care about.
func without(ms []wire.Msg) []wire.Msg {
	var out []wire.Msg
	for _, m := range ms {
		switch m.(type) {
		case wire.Heartbeat, wire.Ack:
			continue
		}
		out = append(out, m)
	}
	return out
}

func isErr(err, target error) bool { return errors.Is(err, target) }
