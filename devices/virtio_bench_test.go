package devices

import "testing"

// BenchmarkBlockRequest serves one request per iteration through the
// transport (QueueNotify to used ring), against an image in the test's
// temporary directory: the device's own cost plus the host's pread/pwrite
// from its page cache.
func BenchmarkBlockRequest(b *testing.B) {
	for _, bc := range []struct {
		name  string
		typ   uint32
		n     uint32
		write bool
		async bool // through the I/O goroutine and a delivered completion
	}{
		{"read-4k", VIRTIO_BLK_T_IN, 4096, true, false},
		{"write-4k", VIRTIO_BLK_T_OUT, 4096, false, false},
		{"get-id", VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_ID_BYTES, true, false},
		{"read-4k-async", VIRTIO_BLK_T_IN, 4096, true, true},
		{"write-4k-async", VIRTIO_BLK_T_OUT, 4096, false, true},
	} {
		b.Run(bc.name, func(b *testing.B) {
			img := newTestImage(b, 1<<20)
			blk := NewBlock(img, "bench")
			done := make(chan uint64, BlockSlots)
			if bc.async {
				blk.SetAsync(func(seq uint64, _ byte) { done <- seq })
				defer blk.Close()
			}
			mem := newTestMem(0x40000)
			d := &testDriver{t: &testing.T{}, tr: NewMMIOTransport(blk, mem, &irqRec{}, 5), mem: mem}
			d.setup(1 << VIRTIO_F_VERSION_1)
			// One chain (header, data, status) in descriptors 0-2, made
			// available again at every iteration.
			d.putDesc(tqDesc, 0, hdrAt, blkHeaderSize, VIRTQ_DESC_F_NEXT, 1)
			flags := uint16(VIRTQ_DESC_F_NEXT)
			if bc.write {
				flags |= VIRTQ_DESC_F_WRITE
			}
			d.putDesc(tqDesc, 1, dataAt, bc.n, flags, 2)
			d.putDesc(tqDesc, 2, statusAt, 1, VIRTQ_DESC_F_WRITE, 0)
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; b.Loop(); i++ {
				blkHeader(mem, hdrAt, bc.typ, uint64(i%200)*8)
				d.publish(0)
				d.notify()
				if bc.async {
					blk.Deliver(<-done)
					d.tr.Service(0)
				}
				d.w32(VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING)
			}
			b.StopTimer()
			if mem.b[statusAt] != VIRTIO_BLK_S_OK || blk.IOErrors != 0 {
				b.Fatalf("status %d, counters %+v", mem.b[statusAt], blk.BlockCounters)
			}
		})
	}
}
