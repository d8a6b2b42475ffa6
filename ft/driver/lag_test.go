package driver

import (
	"testing"

	"github.com/ftkvm/ftkvm/ft/wire"
)

// The lag log: records pushed at ticks, done with in order; the bytes and
// the oldest record's tick of what is pending.
func TestLagLog(t *testing.T) {
	type step struct {
		push       bool
		seq        uint64
		end, at    int64
		wantBytes  int64
		wantOldest int64
		wantOK     bool
	}
	for _, tc := range []struct {
		name  string
		base  int64
		steps []step
	}{
		{"acked in order", 0, []step{
			{push: true, seq: 1, end: 100, at: 10, wantBytes: 100, wantOldest: 10, wantOK: true},
			{push: true, seq: 2, end: 150, at: 20, wantBytes: 150, wantOldest: 10, wantOK: true},
			{seq: 1, wantBytes: 50, wantOldest: 20, wantOK: true},
			{seq: 2},
		}},
		{"records of one tick share a slot", 0, []step{
			{push: true, seq: 1, end: 100, at: 10, wantBytes: 100, wantOldest: 10, wantOK: true},
			{push: true, seq: 2, end: 150, at: 10, wantBytes: 150, wantOldest: 10, wantOK: true},
			{seq: 1, wantBytes: 150, wantOldest: 10, wantOK: true}, // half a slot: still pending
			{seq: 2},
		}},
		{"a backup's base", 1000, []step{
			{push: true, seq: 1, end: 1100, at: 5, wantBytes: 100, wantOldest: 5, wantOK: true},
			{seq: 1},
		}},
	} {
		var l lagLog
		l.reset(tc.base)
		for i, s := range tc.steps {
			if s.push {
				l.push(s.seq, s.end, s.at)
			} else {
				l.done(s.seq)
			}
			b, at, ok := l.pending()
			if b != s.wantBytes || at != s.wantOldest || ok != s.wantOK {
				t.Errorf("%s, step %d: pending %d bytes, oldest %d, %v; want %d, %d, %v", tc.name, i, b, at, ok, s.wantBytes, s.wantOldest, s.wantOK)
			}
		}
	}
}

// More records than slots: the newest slot takes the rest; the oldest
// stays exact, and all are done with once the last is.
func TestLagLogFull(t *testing.T) {
	var l lagLog
	l.reset(0)
	for i := 1; i <= 3*lagSlots; i++ {
		l.push(uint64(i), int64(i*10), int64(i))
	}
	if b, at, ok := l.pending(); b != 30*lagSlots || at != 1 || !ok || l.n != lagSlots {
		t.Fatalf("full: %d bytes, oldest %d, %v, %d slots", b, at, ok, l.n)
	}
	// The first lagSlots-1 records have a slot each; the last slot
	// holds the rest, from record lagSlots on, and is pending as a whole.
	l.done(lagSlots)
	if b, at, ok := l.pending(); b != 30*lagSlots-10*(lagSlots-1) || at != lagSlots || !ok {
		t.Fatalf("after the first slots: %d bytes, oldest %d, %v", b, at, ok)
	}
	l.done(3 * lagSlots)
	if b, _, ok := l.pending(); b != 0 || ok {
		t.Fatalf("all done: %d bytes, %v", b, ok)
	}
}

// The lag log is fed on the exit path (drain): no allocation.
func TestLagLogDoesNotAllocate(t *testing.T) {
	var l lagLog
	seq := uint64(0)
	var m wire.Msg = wire.Record{Seq: 1}
	if n := testing.AllocsPerRun(1000, func() {
		seq++
		l.push(seq+recordSeq(m)-1, int64(seq), int64(seq/7))
		l.done(seq - 3)
		l.pending()
	}); n != 0 {
		t.Fatalf("%v allocations per record", n)
	}
}

func TestHoldHist(t *testing.T) {
	var h holdHist
	for _, ns := range []int64{-5, 10e3, 50e3, 51e3, 1e6, 100e9} {
		h.observe(ns)
	}
	var cum uint64
	want := map[int]uint64{0: 3, 1: 4, 5: 5} // at most 50 µs, 100 µs, 1.6 ms
	for i, b := range HoldBuckets {
		cum += h.counts[i].Load()
		if w, ok := want[i]; ok && cum != w {
			t.Errorf("bucket %v s: %d, want %d", b, cum, w)
		}
	}
	if all := cum + h.counts[len(HoldBuckets)].Load(); all != 6 || cum != 5 {
		t.Errorf("%d observed, %d within the buckets", all, cum)
	}
	if s := h.sumNs.Load(); s != 10e3+50e3+51e3+1e6+100e9 {
		t.Errorf("sum %d ns", s)
	}
}
