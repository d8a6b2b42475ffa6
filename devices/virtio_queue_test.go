package devices

import (
	"encoding/binary"
	"errors"
	"strings"
	"testing"
)

func TestReadChain(t *testing.T) {
	type desc struct {
		i     uint16
		addr  uint64
		n     uint32
		flags uint16
		next  uint16
	}
	const ind = 0x4000 // an indirect table
	tests := []struct {
		name    string
		descs   []desc
		inds    []desc // entries of the indirect table at ind
		head    uint16
		want    []Desc
		wantErr string
	}{
		{name: "single", descs: []desc{{0, 0x10000, 16, 0, 0}}, want: []Desc{{0x10000, 16, false}}},
		{name: "three", descs: []desc{
			{0, 0x10000, 16, VIRTQ_DESC_F_NEXT, 5},
			{5, 0x11000, 512, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 2},
			{2, 0x12000, 1, VIRTQ_DESC_F_WRITE, 0},
		}, want: []Desc{{0x10000, 16, false}, {0x11000, 512, true}, {0x12000, 1, true}}},
		{name: "indirect", descs: []desc{{3, ind, 3 * 16, VIRTQ_DESC_F_INDIRECT, 0}}, head: 3,
			inds: []desc{
				{0, 0x10000, 16, VIRTQ_DESC_F_NEXT, 2},
				{1, 0x12000, 1, VIRTQ_DESC_F_WRITE, 0},
				{2, 0x11000, 512, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 1},
			}, want: []Desc{{0x10000, 16, false}, {0x11000, 512, true}, {0x12000, 1, true}}},
		{name: "head outside table", descs: []desc{{0, 0x10000, 16, 0, 0}}, head: tqSize, wantErr: "index 16 outside"},
		{name: "next outside table", descs: []desc{{0, 0x10000, 16, VIRTQ_DESC_F_NEXT, tqSize}}, wantErr: "index 16 outside"},
		{name: "loop", descs: []desc{
			{0, 0x10000, 16, VIRTQ_DESC_F_NEXT, 1},
			{1, 0x10000, 16, VIRTQ_DESC_F_NEXT, 0},
		}, wantErr: "longer than the queue size"},
		{name: "self loop", descs: []desc{{0, 0x10000, 16, VIRTQ_DESC_F_NEXT, 0}}, wantErr: "longer than the queue size"},
		{name: "buffer outside memory", descs: []desc{{0, 0x17ff0, 0x20, 0, 0}}, wantErr: "outside guest memory"},
		{name: "buffer address wraps", descs: []desc{{0, ^uint64(0) - 4, 16, 0, 0}}, wantErr: "outside guest memory"},
		{name: "readable after writable", descs: []desc{
			{0, 0x10000, 16, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 1},
			{1, 0x11000, 16, 0, 0},
		}, wantErr: "readable buffer after"},
		{name: "indirect with next", descs: []desc{{0, ind, 16, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT, 1}},
			inds: []desc{{0, 0x10000, 16, 0, 0}}, wantErr: "both INDIRECT and NEXT"},
		{name: "indirect in indirect", descs: []desc{{0, ind, 16, VIRTQ_DESC_F_INDIRECT, 0}},
			inds: []desc{{0, ind, 16, VIRTQ_DESC_F_INDIRECT, 0}}, wantErr: "inside an indirect table"},
		{name: "indirect length not a multiple of 16", descs: []desc{{0, ind, 17, VIRTQ_DESC_F_INDIRECT, 0}}, wantErr: "indirect table of 17 bytes"},
		{name: "indirect empty", descs: []desc{{0, ind, 0, VIRTQ_DESC_F_INDIRECT, 0}}, wantErr: "indirect table of 0 bytes"},
		{name: "indirect larger than queue", descs: []desc{{0, ind, 16 * (tqSize + 1), VIRTQ_DESC_F_INDIRECT, 0}}, wantErr: "more than the queue size"},
		{name: "indirect outside memory", descs: []desc{{0, 0x17ff0, 32, VIRTQ_DESC_F_INDIRECT, 0}}, wantErr: "outside guest memory"},
		{name: "indirect loop", descs: []desc{{0, ind, 32, VIRTQ_DESC_F_INDIRECT, 0}},
			inds: []desc{{0, 0x10000, 16, VIRTQ_DESC_F_NEXT, 1}, {1, 0x10000, 16, VIRTQ_DESC_F_NEXT, 0}}, wantErr: "longer than the queue size"},
		{name: "indirect next outside its table", descs: []desc{{0, ind, 16, VIRTQ_DESC_F_INDIRECT, 0}},
			inds: []desc{{0, 0x10000, 16, VIRTQ_DESC_F_NEXT, 1}}, wantErr: "index 1 outside a table of 1"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			m := newTestMem(0x10000 + 0x8000)
			d := &testDriver{mem: m}
			for _, e := range tc.descs {
				d.putDesc(tqDesc, e.i, e.addr, e.n, e.flags, e.next)
			}
			for _, e := range tc.inds {
				d.putDesc(ind, e.i, e.addr, e.n, e.flags, e.next)
			}
			got, err := ReadChain(m.b, tqDesc, tqSize, tc.head, make([]Desc, 0, tqSize))
			if tc.wantErr != "" {
				if !errors.Is(err, ErrVirtqueue) || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err = %v, want ErrVirtqueue saying %q (chain %v)", err, tc.wantErr, got)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if len(got) != len(tc.want) {
				t.Fatalf("chain %v, want %v", got, tc.want)
			}
			for i := range got {
				if got[i] != tc.want[i] {
					t.Fatalf("chain %v, want %v", got, tc.want)
				}
			}
		})
	}
}

func TestQueueCheckAndPending(t *testing.T) {
	m := newTestMem(0x20000)
	ok := Queue{Max: 256, Size: tqSize, Ready: true, Desc: tqDesc, Avail: tqAvail, Used: tqUsed}
	for _, tc := range []struct {
		name string
		mod  func(q *Queue)
	}{
		{"size zero", func(q *Queue) { q.Size = 0 }},
		{"size not a power of two", func(q *Queue) { q.Size = 12 }},
		{"size above max", func(q *Queue) { q.Size = 512 }},
		{"descriptors unaligned", func(q *Queue) { q.Desc = tqDesc + 8 }},
		{"available ring unaligned", func(q *Queue) { q.Avail = tqAvail + 1 }},
		{"used ring unaligned", func(q *Queue) { q.Used = tqUsed + 2 }},
		{"used ring outside memory", func(q *Queue) { q.Used = 0x20000 - 8 }},
		{"descriptors wrap", func(q *Queue) { q.Desc = ^uint64(0) &^ 15 }},
	} {
		q := ok
		tc.mod(&q)
		if _, err := q.Pending(m); !errors.Is(err, ErrVirtqueue) {
			t.Errorf("%s: Pending err = %v, want ErrVirtqueue", tc.name, err)
		}
	}
	q := ok
	binary.LittleEndian.PutUint16(m.b[tqAvail+2:], tqSize)
	if n, err := q.Pending(m); err != nil || n != tqSize {
		t.Fatalf("Pending = %d, %v; want %d", n, err, tqSize)
	}
	binary.LittleEndian.PutUint16(m.b[tqAvail+2:], tqSize+1)
	if _, err := q.Pending(m); !errors.Is(err, ErrVirtqueue) {
		t.Fatalf("an available index more than a queue ahead: err = %v", err)
	}
	// Free-running indices wrap at 16 bits.
	q.LastAvail = 0xfffe
	binary.LittleEndian.PutUint16(m.b[tqAvail+2:], 3)
	if n, err := q.Pending(m); err != nil || n != 5 {
		t.Fatalf("wrapped Pending = %d, %v; want 5", n, err)
	}
}

func TestPushUsedMarksDirty(t *testing.T) {
	m := newTestMem(0x20000)
	q := Queue{Max: 256, Size: tqSize, Ready: true, Desc: tqDesc, Avail: tqAvail, Used: tqUsed, UsedIdx: tqSize - 1}
	q.PushUsed(m, 7, 513)
	e := m.b[tqUsed+4+8*(tqSize-1):]
	if id, n := binary.LittleEndian.Uint32(e), binary.LittleEndian.Uint32(e[4:]); id != 7 || n != 513 {
		t.Fatalf("used element (%d, %d), want (7, 513)", id, n)
	}
	if idx := binary.LittleEndian.Uint16(m.b[tqUsed+2:]); idx != tqSize {
		t.Fatalf("used idx %d, want %d", idx, tqSize)
	}
	if !m.dirty[tqUsed/4096] || len(m.dirty) != 1 {
		t.Fatalf("dirty pages %v, want only the used ring's", m.dirty)
	}
}

// FuzzReadChain decodes arbitrary descriptor tables: never a panic, never a
// chain longer than the queue, never a buffer outside memory.
func FuzzReadChain(f *testing.F) {
	seed := make([]byte, 0x100)
	binary.LittleEndian.PutUint64(seed[0:], 0x80)
	binary.LittleEndian.PutUint32(seed[8:], 16)
	binary.LittleEndian.PutUint16(seed[12:], VIRTQ_DESC_F_NEXT)
	binary.LittleEndian.PutUint16(seed[14:], 1)
	binary.LittleEndian.PutUint64(seed[16:], 0x40)
	binary.LittleEndian.PutUint32(seed[24:], 32)
	binary.LittleEndian.PutUint16(seed[28:], VIRTQ_DESC_F_INDIRECT)
	f.Add(seed, uint16(4), uint16(0))
	f.Add(seed, uint16(0), uint16(0))
	f.Add(seed, uint16(16), uint16(15))
	f.Fuzz(func(t *testing.T, mem []byte, size, head uint16) {
		size = min(size, 256)
		chain, err := ReadChain(mem, 0, size, head, make([]Desc, 0, 4))
		if err != nil && !errors.Is(err, ErrVirtqueue) {
			t.Fatalf("error %v does not wrap ErrVirtqueue", err)
		}
		if len(chain) > int(size) {
			t.Fatalf("chain of %d descriptors in a queue of %d", len(chain), size)
		}
		for _, d := range chain {
			if d.Addr+uint64(d.Len) > uint64(len(mem)) || d.Addr+uint64(d.Len) < d.Addr {
				t.Fatalf("buffer %+v outside %d bytes of memory", d, len(mem))
			}
		}
	})
}
