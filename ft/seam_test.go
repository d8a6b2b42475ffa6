package ft

import (
	"testing"

	"github.com/ftkvm/ftkvm/ft/wire"
)

// The console seam, in the manner of paper_test.go. Reference: ft/doc.go,
// "Output policies" and "Failover": a promoted backup performs every
// output the dead primary did not confirm. Outputs are numbered, and their
// bytes are placed in the guest's console stream (Out.Offset): the
// promoted backup knows the byte from which its console continues the dead
// primary's, and how many bytes from there may repeat.

// consoleOut has the primary produce a console output and the backup
// receive its record; the primary performs it once acknowledged.
func consoleOut(t *testing.T, p, b *replica, exits uint64, s string) {
	t.Helper()
	wantGo(t, "output "+s, p.n.Output(at(exits), wire.KindConsole, []byte(s)))
	b.step(p.drain()...)
	p.step(b.drain()...)
	p.drain()
}

func TestSeamOffsetsOnTheWire(t *testing.T) {
	p, b := pair(t, OutputCommit, false)
	wantGo(t, "", p.n.Output(at(2), wire.KindConsole, []byte("hello\n")))
	wantGo(t, "", p.n.Output(at(3), wire.KindConsole, []byte("ab")))
	outs := ofType[wire.Output](p.drain())
	if len(outs) != 2 || outs[0].Offset != 0 || outs[1].Offset != 6 {
		t.Fatalf("output records %#v", outs)
	}
	if s := p.n.Status(); s.ConsoleBytes != 8 {
		t.Fatalf("primary status %+v", s)
	}
	// The backup checks the offset like the number and the bytes: a
	// record placing the output elsewhere in the stream is a divergence.
	b.step(outs[0])
	wantGo(t, "", b.n.Output(at(2), wire.KindConsole, []byte("hello\n")))
	bad := outs[1]
	bad.Offset = 5
	b.step(bad)
	b.n.Output(at(3), wire.KindConsole, []byte("ab"))
	b.drain()
	if n, ok := b.hasNote(NoteDivergence); !ok || !contains(n.Err.Error(), "console byte 6") {
		t.Fatalf("a misplaced output is no divergence: %v", b.notes)
	}
}

func TestSeamAtTakeover(t *testing.T) {
	for _, tc := range []struct {
		name string
		// replayed: how many of the outputs the backup replayed before
		// the primary died; confirmed: how many the primary confirmed.
		replayed, confirmed int
		seam, uncertain     uint64
	}{
		{"all confirmed, all replayed", 3, 3, 11, 0},
		{"all confirmed, none replayed", 0, 3, 11, 0},
		{"unconfirmed absorbed and in the log", 2, 1, 6, 5},
		{"unconfirmed in the log only", 1, 1, 6, 5},
		{"confirmed beyond the replay", 1, 2, 8, 3},
		{"nothing confirmed", 3, 0, 0, 11},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p, b := pair(t, OutputCommit, false)
			outs := []string{"hello\n", "ab", "xyz"}
			for i, s := range outs {
				consoleOut(t, p, b, uint64(i+2), s)
			}
			if tc.confirmed > 0 {
				p.n.Performed(uint64(tc.confirmed))
				p.n.Tick(ms)
				b.step(p.drain()...)
			}
			for i := range tc.replayed {
				wantGo(t, "replay", b.n.Output(at(uint64(i+2)), wire.KindConsole, []byte(outs[i])))
			}
			b.drain()
			b.n.Disconnected()
			b.drain()
			n, ok := b.hasNote(NoteTakeover)
			if !ok || n.Seam != tc.seam || n.Uncertain != tc.uncertain {
				t.Fatalf("takeover note %+v (seen: %v), want seam %d, %d uncertain", n, ok, tc.seam, tc.uncertain)
			}
			if s := b.n.Status(); s.Seam != tc.seam || s.SeamUncertain != tc.uncertain || s.Promotions != 1 {
				t.Fatalf("status %+v", s)
			}
			// The replay performs the rest of the log, then live output.
			for i := tc.replayed; i < len(outs); i++ {
				wantGo(t, "replay", b.n.Output(at(uint64(i+2)), wire.KindConsole, []byte(outs[i])))
			}
			wantGo(t, "live", b.n.Output(at(9), wire.KindConsole, []byte("!")))
			b.drain()
			// What the backup performed, placed at its offsets after the
			// confirmed bytes, is the whole stream: contiguous from the
			// seam, uncertain exactly up to seam+uncertain.
			stream := "hello\nabxyz!"
			next := tc.seam
			for _, o := range b.perform {
				if o.Offset != next || stream[o.Offset:o.Offset+uint64(len(o.Data))] != string(o.Data) {
					t.Fatalf("performed %+v at %d; want the stream's bytes from %d", o, o.Offset, next)
				}
				if o.Uncertain != (o.Offset < tc.seam+tc.uncertain) {
					t.Fatalf("performed %+v: uncertain %v, the seam's uncertain bytes end at %d", o, o.Uncertain, tc.seam+tc.uncertain)
				}
				next += uint64(len(o.Data))
			}
			if next != uint64(len(stream)) || b.n.Status().ConsoleBytes != next {
				t.Fatalf("performed up to byte %d, status %+v; the stream has %d", next, b.n.Status(), len(stream))
			}
		})
	}
}

// A joining backup learns the stream's length from the full state: its
// seam after a takeover is an offset since boot, not since it joined.
func TestSeamAfterJoin(t *testing.T) {
	p, old := pair(t, OutputCommit, false)
	consoleOut(t, p, old, 2, "before the join\n") // 16 bytes
	p.n.Performed(1)
	old.n.Disconnected()
	p.n.Disconnected()
	p.drain()
	wantGo(t, "unprotected", p.n.Output(at(3), wire.KindConsole, []byte("alone\n"))) // 6 bytes, performed at once
	p.drain()
	p.n.Performed(2)

	b := newReplica(t, testConfig(RoleBackup, OutputCommit))
	p.n.Connected()
	b.n.Connected()
	exchange(p, b)
	wantWait(t, "new backup", b.n.Point(pt(1, 0)), WaitLog)
	wantAction(t, "join checkpoint", p.n.Point(kick(4, ms)), ActCheckpoint)
	wantGo(t, "", p.n.Checkpointed([]byte("ALL")))
	sent := p.drain()
	if cps := ofType[wire.Checkpoint](sent); len(cps) != 1 || cps[0].OutBytes != 22 {
		t.Fatalf("join checkpoint %#v", cps)
	}
	b.step(sent...)
	wantAction(t, "yield", b.n.Continue(), ActYield)
	wantAction(t, "install", b.n.Point(kick(1, 0)), ActInstall)
	b.n.Continue() // waits for the log to show the primary went on
	p.step(b.drain()...)
	consoleOut(t, p, b, 5, "joined\n")
	wantGo(t, "the log shows the primary went on", b.n.Continue())
	wantGo(t, "absorb", b.n.Output(at(5), wire.KindConsole, []byte("joined\n")))
	b.n.Disconnected()
	b.drain()
	if n, ok := b.hasNote(NoteTakeover); !ok || n.Seam != 22 || n.Uncertain != 7 {
		t.Fatalf("takeover note %+v (seen: %v), want seam 22, 7 uncertain", n, ok)
	}
	if len(b.perform) != 1 || b.perform[0].Offset != 22 || !b.perform[0].Uncertain {
		t.Fatalf("performed %+v", b.perform)
	}
}

// A backup promoted while it waits for a repair performs the outputs the
// log announces before the repair's state (not confirmed, the primary may
// not have written them), at the primary's offsets, then goes on from
// that state with the primary's count.
func TestSeamOfDivergedBackup(t *testing.T) {
	p, b := pair(t, OutputCommit, false)
	consoleOut(t, p, b, 2, "ok\n")
	wantGo(t, "", b.n.Output(at(2), wire.KindConsole, []byte("ok\n")))
	p.n.Performed(1)
	// The backup's guest writes something else: a divergence; it asks
	// for the primary's state and waits for it.
	consoleOut(t, p, b, 3, "A")
	b.n.Output(at(3), wire.KindConsole, []byte("BB"))
	wantWait(t, "repair", b.n.Point(pt(4, 0)), WaitRepair)
	p.step(b.drain()...)
	// The primary writes on, then sends its full state, and dies before
	// confirming anything after "ok\n".
	consoleOut(t, p, b, 4, "C\n")
	a := wantAction(t, "repair checkpoint", p.n.Point(kick(5, 20*ms)), ActCheckpoint)
	if !a.Full {
		t.Fatal("a repair needs the full state")
	}
	wantGo(t, "", p.n.Checkpointed([]byte("ALL")))
	b.step(p.drain()...)
	b.n.Disconnected()
	b.drain()
	if n, ok := b.hasNote(NoteTakeover); !ok || n.Seam != 3 || n.Uncertain != 3 {
		t.Fatalf("takeover note %+v (seen: %v), want seam 3, 3 uncertain", n, ok)
	}
	var got []Out
	for _, o := range b.perform {
		got = append(got, Out{Seq: o.Seq, Kind: o.Kind, Offset: o.Offset, Data: o.Data, Uncertain: o.Uncertain})
	}
	if len(got) != 2 || string(got[0].Data) != "A" || got[0].Offset != 3 || string(got[1].Data) != "C\n" || got[1].Offset != 4 {
		t.Fatalf("performed %+v", got)
	}
	wantAction(t, "yield", b.n.Continue(), ActYield)
	wantAction(t, "install", b.n.Point(kick(4, 0)), ActInstall)
	wantGo(t, "", b.n.Continue())
	wantGo(t, "live", b.n.Output(at(6), wire.KindConsole, []byte("D")))
	b.drain()
	if o := b.perform[len(b.perform)-1]; o.Offset != 6 || o.Uncertain {
		t.Fatalf("live output after the repair's state: %+v", o)
	}
}
