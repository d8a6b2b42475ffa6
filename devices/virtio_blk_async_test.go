package devices

import (
	"bytes"
	"testing"
	"time"
)

// blkReport is what the I/O goroutine reported.
type blkReport struct {
	seq    uint64
	status byte
}

// newAsyncBlkDriver is newBlkDriver with the device's I/O goroutine on:
// reports arrive on the channel.
func newAsyncBlkDriver(t *testing.T, img *DiskImage) (*testDriver, *Block, chan blkReport) {
	d, blk := newBlkDriver(t, img)
	reports := make(chan blkReport, 4*BlockSlots)
	blk.SetAsync(func(seq uint64, status byte) { reports <- blkReport{seq, status} })
	t.Cleanup(blk.Close)
	return d, blk, reports
}

// report waits for the I/O goroutine's next report (a stuck goroutine
// fails the test after a minute rather than hanging it).
func report(t *testing.T, reports chan blkReport) blkReport {
	t.Helper()
	select {
	case r := <-reports:
		return r
	case <-time.After(time.Minute):
		t.Fatal("no report from the I/O goroutine")
	}
	return blkReport{}
}

// A request performed off the vCPU thread is not visible to the guest
// (no used entry, no status, no data) until its completion is delivered;
// then it is, with what the request read or wrote as of its notification.
func TestBlockAsyncCompletionOnlyWhenDelivered(t *testing.T) {
	for _, tc := range []struct {
		name  string
		typ   uint32
		n     uint32
		write bool // the data buffer is device-writable
	}{
		{"read", VIRTIO_BLK_T_IN, 1024, true},
		{"write", VIRTIO_BLK_T_OUT, 512, false},
		{"flush", VIRTIO_BLK_T_FLUSH, 0, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			img := newTestImage(t, 64*512)
			d, blk, reports := newAsyncBlkDriver(t, img)
			for i := range 1024 {
				d.mem.b[dataAt+uint64(i)] = 0xa5
			}
			blkHeader(d.mem, hdrAt, tc.typ, 6)
			d.mem.b[statusAt] = 0xee
			bufs := []buf{{hdrAt, blkHeaderSize, false}}
			if tc.n > 0 {
				bufs = append(bufs, buf{dataAt, tc.n, tc.write})
			}
			d.submit(append(bufs, buf{statusAt, 1, true})...)
			d.notify()
			// The guest scribbles on its buffer while the request is in
			// flight: a write takes the data as of the notification.
			for i := range 1024 {
				d.mem.b[dataAt+uint64(i)] = 0x11
			}
			rep := report(t, reports)
			if rep.seq != 0 || rep.status != VIRTIO_BLK_S_OK {
				t.Fatalf("report %+v", rep)
			}
			if used := d.takeUsed(); len(used) != 0 || d.mem.b[statusAt] != 0xee || d.mem.b[dataAt] != 0x11 {
				t.Fatalf("performed but not delivered: used %v, status %#x, data %#x", used, d.mem.b[statusAt], d.mem.b[dataAt])
			}
			if st, ok := blk.Deliver(rep.seq); !ok || st != VIRTIO_BLK_S_OK {
				t.Fatalf("Deliver: %d %v", st, ok)
			}
			d.tr.Service(0)
			used := d.takeUsed()
			want := uint32(1)
			if tc.typ == VIRTIO_BLK_T_IN {
				want += tc.n
			}
			if len(used) != 1 || used[0][1] != want || d.mem.b[statusAt] != VIRTIO_BLK_S_OK {
				t.Fatalf("delivered: used %v (want length %d), status %#x", used, want, d.mem.b[statusAt])
			}
			switch tc.typ {
			case VIRTIO_BLK_T_IN:
				if d.mem.b[dataAt] != 6 || d.mem.b[dataAt+1023] != 7 || !d.mem.dirty[dataAt/4096] {
					t.Fatalf("read data %d..%d (want 6..7), dirty %v", d.mem.b[dataAt], d.mem.b[dataAt+1023], d.mem.dirty[dataAt/4096])
				}
			case VIRTIO_BLK_T_OUT:
				got := make([]byte, 512)
				if _, err := img.f.ReadAt(got, 6*512); err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(got, bytes.Repeat([]byte{0xa5}, 512)) {
					t.Fatalf("image has % x..., want the data as of the notification", got[:4])
				}
			}
			if _, ok := blk.Deliver(rep.seq); ok {
				t.Fatal("a completion delivered twice")
			}
		})
	}
}

// Requests the device answers at once (bad ones, GET_ID) complete in the
// notification with their status, and never reach the I/O goroutine.
func TestBlockAsyncImmediateAnswers(t *testing.T) {
	for _, tc := range []struct {
		name   string
		typ    uint32
		sector uint64
		n      uint32
		write  bool
		want   byte
	}{
		{"read past the end", VIRTIO_BLK_T_IN, 15, 1024, true, VIRTIO_BLK_S_IOERR},
		{"write of a partial sector", VIRTIO_BLK_T_OUT, 0, 100, false, VIRTIO_BLK_S_IOERR},
		{"unknown type", 99, 0, 0, false, VIRTIO_BLK_S_UNSUPP},
		{"get-id", VIRTIO_BLK_T_GET_ID, 0, VIRTIO_BLK_ID_BYTES, true, VIRTIO_BLK_S_OK},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d, blk, reports := newAsyncBlkDriver(t, newTestImage(t, 16*512))
			if _, st := d.request(tc.typ, tc.sector, tc.n, tc.write); st != tc.want {
				t.Fatalf("status %d, want %d", st, tc.want)
			}
			if blk.Busy() != 0 || len(reports) != 0 || blk.NextSeq() != 0 {
				t.Fatalf("an immediate answer went to the I/O goroutine: busy %d, reports %d, next seq %d", blk.Busy(), len(reports), blk.NextSeq())
			}
		})
	}
}

// At most BlockSlots requests are in flight; the others wait in the
// available ring and are taken when a delivered completion frees a slot.
// Settle completes what is in flight in sequence order; completions
// delivered afterwards for them do nothing.
func TestBlockAsyncSlotsAndSettle(t *testing.T) {
	const total = BlockSlots + 3
	d, blk, reports := newAsyncBlkDriver(t, newTestImage(t, 64*512))
	// One descriptor per request, pointing to an indirect table of three
	// (§2.7.5.3), so that more requests than slots fit in the queue.
	for i := range uint16(total) {
		at := tqBufs + 0x20000 + uint64(i)*0x400
		blkHeader(d.mem, at, VIRTIO_BLK_T_IN, uint64(i))
		d.putDesc(at+0x200, 0, at, blkHeaderSize, VIRTQ_DESC_F_NEXT, 1)
		d.putDesc(at+0x200, 1, at+0x100, 512, VIRTQ_DESC_F_NEXT|VIRTQ_DESC_F_WRITE, 2)
		d.putDesc(at+0x200, 2, at+0x300, 1, VIRTQ_DESC_F_WRITE, 0)
		d.putDesc(tqDesc, i, at+0x200, 48, VIRTQ_DESC_F_INDIRECT, 0)
		d.publish(i)
	}
	d.next = total
	d.notify()
	if blk.Busy() != BlockSlots {
		t.Fatalf("%d requests in flight, want %d", blk.Busy(), BlockSlots)
	}
	// Deliver the first two: their slots take two of the waiting three.
	for range 2 {
		rep := report(t, reports)
		if _, ok := blk.Deliver(rep.seq); !ok {
			t.Fatalf("request %d not in flight", rep.seq)
		}
	}
	d.tr.Service(0)
	if used := d.takeUsed(); len(used) != 2 || blk.Busy() != BlockSlots || blk.NextSeq() != BlockSlots+2 {
		t.Fatalf("used %v, %d in flight, next seq %d", used, blk.Busy(), blk.NextSeq())
	}
	blk.Settle()
	d.tr.Service(0)
	used := d.takeUsed()
	if len(used) != BlockSlots {
		t.Fatalf("settled %d, want %d", len(used), BlockSlots)
	}
	// Head i is request i: the used ring lists the settled requests in
	// sequence order.
	for i, u := range used {
		if want := uint32(i + 2); u[0] != want {
			t.Fatalf("settled used ring %v: entry %d is head %d, want %d", used, i, u[0], want)
		}
	}
	// The last waiting request is taken now that slots are free.
	if blk.Busy() != 1 {
		t.Fatalf("%d in flight after the settle, want the last one", blk.Busy())
	}
	for seq := range uint64(BlockSlots + 2) {
		if _, ok := blk.Deliver(seq); ok {
			t.Fatalf("request %d delivered after it was settled", seq)
		}
	}
	blk.Drop()
	if blk.Busy() != 0 {
		t.Fatalf("%d in flight after Drop", blk.Busy())
	}
}

// A request with more data than SEG_MAX x SIZE_MAX allow fails with
// IOERR (a slot's host buffer holds at most BlockRequestMax), though it is
// inside the image; one of exactly BlockRequestMax is served.
func TestBlockRequestMax(t *testing.T) {
	img := newTestImage(t, 4<<20)
	for _, tc := range []struct {
		n    uint32
		want byte
	}{
		{BlockRequestMax, VIRTIO_BLK_S_OK},
		{BlockRequestMax + 512, VIRTIO_BLK_S_IOERR},
	} {
		blk := NewBlock(img, "max")
		mem := newTestMem(BlockRequestMax + 0x4000)
		blkHeader(mem, 0x1000, VIRTIO_BLK_T_IN, 0)
		// The data buffer may run past guest memory for the refused
		// case: the device must not touch it.
		chain := []Desc{{Addr: 0x1000, Len: blkHeaderSize}, {Addr: 0x3000, Len: tc.n, Write: true}, {Addr: 0x2000, Len: 1, Write: true}}
		serveChain(blk, mem, chain)
		if got := mem.b[0x2000]; got != tc.want {
			t.Errorf("%d bytes: status %d, want %d", tc.n, got, tc.want)
		}
	}
}
