package driver

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"testing"

	"github.com/ftkvm/ftkvm/ft"
	"github.com/ftkvm/ftkvm/vmm/snapshot"
)

func bitmapOf(pages uint64, pfns ...uint64) []uint64 {
	b := make([]uint64, (pages+63)/64)
	for _, p := range pfns {
		b[p/64] |= 1 << (p % 64)
	}
	return b
}

// Two replicas agree exactly when their memories do, whatever pages their
// dirty logs name: a page named without a change leaves the hash as it
// was; a changed page named changes it; the incremental hash is always
// the hash computed afresh over all pages.
func TestMemHash(t *testing.T) {
	const pages = 200
	a, b := make([]byte, pages*memHashPage), make([]byte, pages*memHashPage)
	rng := rand.New(rand.NewPCG(1, 2))
	for i := range a {
		a[i] = byte(rng.IntN(7)) // many equal pages, so the page number matters
	}
	copy(b, a)
	ha, hb := newMemHash(a), newMemHash(b)
	if ha.digest() != hb.digest() {
		t.Fatal("equal memories, different hashes")
	}
	// A spurious dirty report: named, unchanged.
	hb.mark(bitmapOf(pages, 7, 64, 199))
	if ha.digest() != hb.digest() {
		t.Fatal("a page named dirty without a change changed the hash")
	}
	// A real difference, named: seen.
	b[130*memHashPage+5] ^= 1
	hb.mark(bitmapOf(pages, 130))
	if ha.digest() == hb.digest() {
		t.Fatal("a changed page went unseen")
	}
	// The same change on the other side: equal again.
	a[130*memHashPage+5] ^= 1
	ha.markPage(130)
	if ha.digest() != hb.digest() {
		t.Fatal("equal memories after the same change, different hashes")
	}
	// Swapping two pages' contents is a difference (page numbers count).
	p1, p2 := a[3*memHashPage:4*memHashPage], a[4*memHashPage:5*memHashPage]
	tmp := append([]byte(nil), p1...)
	copy(p1, p2)
	copy(p2, tmp)
	ha.mark(bitmapOf(pages, 3, 4))
	if ha.digest() == hb.digest() {
		t.Fatal("two swapped pages went unseen")
	}
	// Random changes, each named, some pages named spuriously: the
	// incremental hash is the fresh one.
	for round := range 50 {
		var named []uint64
		for range rng.IntN(10) {
			p := rng.Uint64N(pages)
			a[p*memHashPage+rng.Uint64N(memHashPage)] = byte(rng.Uint32())
			named = append(named, p)
		}
		named = append(named, rng.Uint64N(pages))
		ha.mark(bitmapOf(pages, named...))
		if got, want := ha.digest(), newMemHash(a).digest(); got != want {
			t.Fatalf("round %d: incremental %x, afresh %x", round, got[:8], want[:8])
		}
	}
}

// The per-epoch update costs nothing but the hashing: no allocation.
func TestMemHashDoesNotAllocate(t *testing.T) {
	mem := make([]byte, 64*memHashPage)
	h := newMemHash(mem)
	h.digest()
	bm := bitmapOf(64, 1, 2, 3)
	if n := testing.AllocsPerRun(100, func() { h.mark(bm); h.digest() }); n != 0 {
		t.Fatalf("%v allocations per epoch", n)
	}
}

// digestChanged names exactly the marked pages whose contents changed since
// they were last hashed: what a repair's install really replaced.
func TestMemHashChanged(t *testing.T) {
	const pages = 130
	mem := make([]byte, pages*memHashPage)
	for i := range mem {
		mem[i] = byte(i / memHashPage)
	}
	h := newMemHash(mem)
	var got []uint64
	note := func(pfn uint64) { got = append(got, pfn) }
	h.digestChanged(note)
	if len(got) != 0 {
		t.Fatalf("the first digest named %v: it has nothing to compare with", got)
	}
	tests := []struct {
		name  string
		write []uint64 // pages given new contents
		same  []uint64 // pages rewritten with their own contents
		want  []uint64
	}{
		{name: "nothing written", want: nil},
		{name: "rewritten unchanged", same: []uint64{0, 64, 129}, want: nil},
		{name: "two changed, one rewritten", write: []uint64{5, 128}, same: []uint64{6}, want: []uint64{5, 128}},
		{name: "every page named, one changed", write: []uint64{70}, same: []uint64{0, 1, 63, 64, 65, 127, 129}, want: []uint64{70}},
	}
	for round, tc := range tests {
		got = nil
		for _, p := range tc.write {
			mem[p*memHashPage+uint64(round)] ^= 0xff
			h.markPage(p)
		}
		for _, p := range tc.same {
			h.markPage(p)
		}
		d := h.digestChanged(note)
		if fmt.Sprint(got) != fmt.Sprint(tc.want) {
			t.Errorf("%s: changed pages %v, want %v", tc.name, got, tc.want)
		}
		if want := newMemHash(mem).digest(); d != want {
			t.Errorf("%s: digest %x, afresh %x", tc.name, d[:8], want[:8])
		}
	}
}

// A page repair (ft/doc.go, verify mode) between two replicas of the fake
// guest whose memories differ in a few pages and whose registers differ:
// the backup's page hashes go to the primary, whose repair carries only
// the pages that differ (those the backup changed and those the primary
// changed since) with the rest of its state; installed, it makes the
// backup's state the primary's, and its size is that of those pages, not
// of the memory.
func TestPageRepairCarriesOnlyDifferingPages(t *testing.T) {
	id := ft.Identity{MemSize: simMemSize}
	rp := New(Options{Node: ft.Config{Role: ft.RolePrimary, Verify: true, Guest: id}, Log: quietLog()})
	defer rp.Close()
	rb := New(Options{Node: ft.Config{Role: ft.RoleBackup, Verify: true, Guest: id}, Log: quietLog()})
	defer rb.Close()
	fp, fb := newFakeMachine(1000, 10), newFakeMachine(1000, 10)
	for i := range fp.mem {
		fp.mem[i] = byte(i*7 + i/4096)
	}
	copy(fb.mem, fp.mem)
	for _, c := range []struct {
		r *Replica
		f *fakeMachine
	}{{rp, fp}, {rb, fb}} {
		c.f.env, c.f.quiescent = c.r, true
		if err := c.r.Attach(c.f); err != nil {
			t.Fatal(err)
		}
	}
	write := func(f *fakeMachine, pfn uint64) {
		f.mem[pfn*snapshot.PageSize+17] ^= 0xa5
		f.dirty[pfn/64] |= 1 << (pfn % 64)
	}
	// The backup diverged in three pages and a register; the primary went
	// on and wrote two more pages (one of them also one of the three).
	for _, pfn := range []uint64{3, 200, 511} {
		write(fb, pfn)
	}
	fb.regs.rax ^= 1
	for _, pfn := range []uint64{200, 64} {
		write(fp, pfn)
	}

	rb.mu.Lock()
	regs, pages, err := rb.pageHashes()
	rb.mu.Unlock()
	if err != nil || len(pages) != simPages || regs == (ft.Digest{}) {
		t.Fatalf("page hashes: %d, %v", len(pages), err)
	}
	rp.mu.Lock()
	blob, err := rp.captureRepair(pages)
	rp.mu.Unlock()
	if err != nil {
		t.Fatal(err)
	}
	rb.mu.Lock()
	err = rb.install(blob, true, false)
	rb.mu.Unlock()
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(fb.mem, fp.mem) || fb.regs != fp.regs {
		t.Fatal("the repaired backup's state is not the primary's")
	}
	rp.mu.Lock()
	hp, err1 := rp.hash()
	rp.mu.Unlock()
	rb.mu.Lock()
	hb, err2 := rb.hash()
	rb.mu.Unlock()
	if err1 != nil || err2 != nil || hp != hb {
		t.Fatalf("state hashes after the repair: %x, %x (%v, %v)", hp[:8], hb[:8], err1, err2)
	}
	// Pages 3, 64, 200 and 511 differ: four pages and the rest of the
	// state, against a full state of 512 pages.
	rp.mu.Lock()
	full, err := rp.capture(true)
	rp.mu.Unlock()
	if err != nil {
		t.Fatal(err)
	}
	if len(blob) < 4*snapshot.PageSize || len(blob) > 4*snapshot.PageSize+len(full)-simMemSize {
		t.Fatalf("the page repair is %d bytes; 4 pages are %d, the full state %d", len(blob), 4*snapshot.PageSize, len(full))
	}
	t.Logf("page repair %d bytes; full state %d bytes", len(blob), len(full))
}
