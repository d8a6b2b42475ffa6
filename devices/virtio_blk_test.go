package devices

import (
	"bytes"
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// newTestImage creates an image of size bytes filled with a pattern and
// opens it read-write.
func newTestImage(t testing.TB, size int) *DiskImage {
	t.Helper()
	p := filepath.Join(t.TempDir(), "disk.img")
	data := make([]byte, size)
	for i := range data {
		data[i] = byte(i / 512)
	}
	if err := os.WriteFile(p, data, 0o600); err != nil {
		t.Fatal(err)
	}
	img, err := OpenDiskImage(p, false)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { img.Close() })
	return img
}

func newBlkDriver(t *testing.T, img *DiskImage) (*testDriver, *Block) {
	blk := NewBlock(img, "ftkvm-test-serial")
	mem := newTestMem(0x40000)
	d := &testDriver{t: t, tr: NewMMIOTransport(blk, mem, &irqRec{}, 5), mem: mem}
	d.setup(1<<VIRTIO_F_VERSION_1 | 1<<VIRTIO_BLK_F_FLUSH)
	return d, blk
}

// blkHeader writes a request header at gpa.
func blkHeader(mem *testMem, gpa uint64, typ uint32, sector uint64) {
	binary.LittleEndian.PutUint32(mem.b[gpa:], typ)
	binary.LittleEndian.PutUint32(mem.b[gpa+4:], 0)
	binary.LittleEndian.PutUint64(mem.b[gpa+8:], sector)
}

const (
	hdrAt    = tqBufs
	dataAt   = tqBufs + 0x1000
	statusAt = tqBufs + 0x9000
)

// request submits a request with the header at hdrAt, n data bytes at
// dataAt (device-writable for reads), the status at statusAt, and returns
// the used length and the status byte.
func (d *testDriver) request(typ uint32, sector uint64, n uint32, dataWrite bool) (uint32, byte) {
	blkHeader(d.mem, hdrAt, typ, sector)
	d.mem.b[statusAt] = 0xee
	bufs := []buf{{hdrAt, blkHeaderSize, false}}
	if n > 0 {
		bufs = append(bufs, buf{dataAt, n, dataWrite})
	}
	bufs = append(bufs, buf{statusAt, 1, true})
	d.submit(bufs...)
	d.notify()
	used := d.takeUsed()
	if len(used) != 1 {
		d.t.Fatalf("used %v, want one", used)
	}
	return used[0][1], d.mem.b[statusAt]
}

func TestBlockConfig(t *testing.T) {
	d, _ := newBlkDriver(t, newTestImage(t, 64*512))
	if got := d.r32(VIRTIO_MMIO_DEVICE_ID); got != VIRTIO_ID_BLOCK {
		t.Fatalf("device ID %d", got)
	}
	capacity := uint64(d.r32(VIRTIO_MMIO_CONFIG)) | uint64(d.r32(VIRTIO_MMIO_CONFIG+4))<<32
	if capacity != 64 {
		t.Fatalf("capacity %d sectors, want 64", capacity)
	}
	if got := d.r32(VIRTIO_MMIO_CONFIG + 20); got != 512 {
		t.Fatalf("blk_size %d", got)
	}
	if f := d.r32(VIRTIO_MMIO_DEVICE_FEATURES); f&(1<<VIRTIO_BLK_F_RO) != 0 || f&(1<<VIRTIO_BLK_F_FLUSH) == 0 {
		t.Fatalf("features %#x: want FLUSH, not RO", f)
	}
}

func TestBlockReadWriteFlushGetID(t *testing.T) {
	img := newTestImage(t, 64*512)
	d, blk := newBlkDriver(t, img)

	// Read sectors 3-4: the pattern, into guest memory, marked dirty.
	n, st := d.request(VIRTIO_BLK_T_IN, 3, 1024, true)
	if st != VIRTIO_BLK_S_OK || n != 1025 {
		t.Fatalf("read: status %d, used len %d", st, n)
	}
	if d.mem.b[dataAt] != 3 || d.mem.b[dataAt+1023] != 4 {
		t.Fatalf("read data %d..%d, want sectors 3..4", d.mem.b[dataAt], d.mem.b[dataAt+1023])
	}
	for _, p := range []uint64{dataAt / 4096, statusAt / 4096, tqUsed / 4096} {
		if !d.mem.dirty[p] {
			t.Fatalf("page %#x written by the device not marked dirty (%v)", p, d.mem.dirty)
		}
	}

	// Write sector 10, then read it back from the file.
	for i := range 512 {
		d.mem.b[dataAt+uint64(i)] = 0xa5
	}
	n, st = d.request(VIRTIO_BLK_T_OUT, 10, 512, false)
	if st != VIRTIO_BLK_S_OK || n != 1 {
		t.Fatalf("write: status %d, used len %d", st, n)
	}
	got := make([]byte, 512)
	if _, err := img.f.ReadAt(got, 10*512); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, bytes.Repeat([]byte{0xa5}, 512)) {
		t.Fatal("write did not reach the image")
	}

	if _, st = d.request(VIRTIO_BLK_T_FLUSH, 0, 0, false); st != VIRTIO_BLK_S_OK {
		t.Fatalf("flush: status %d", st)
	}
	n, st = d.request(VIRTIO_BLK_T_GET_ID, 0, VIRTIO_BLK_ID_BYTES, true)
	if st != VIRTIO_BLK_S_OK || n != VIRTIO_BLK_ID_BYTES+1 {
		t.Fatalf("get-id: status %d, used len %d", st, n)
	}
	if id := string(bytes.TrimRight(d.mem.b[dataAt:dataAt+VIRTIO_BLK_ID_BYTES], "\x00")); id != "ftkvm-test-serial" {
		t.Fatalf("id %q", id)
	}
	if blk.Reads != 1 || blk.Writes != 1 || blk.Flushes != 1 || blk.IOErrors != 0 {
		t.Fatalf("counters %+v", blk.BlockCounters)
	}
}

func TestBlockHeaderSplitAcrossBuffers(t *testing.T) {
	// §2.7.4: the device must not assume a framing. Header in two
	// buffers, data and status in one.
	img := newTestImage(t, 16*512)
	d, _ := newBlkDriver(t, img)
	blkHeader(d.mem, hdrAt, VIRTIO_BLK_T_IN, 5)
	d.submit(buf{hdrAt, 5, false}, buf{hdrAt + 5, 11, false}, buf{dataAt, 513, true})
	d.notify()
	used := d.takeUsed()
	if len(used) != 1 || used[0][1] != 513 || d.mem.b[dataAt+512] != VIRTIO_BLK_S_OK || d.mem.b[dataAt] != 5 {
		t.Fatalf("used %v status %d data %d", used, d.mem.b[dataAt+512], d.mem.b[dataAt])
	}
}

func TestBlockBadRequests(t *testing.T) {
	img := newTestImage(t, 16*512)
	for _, tc := range []struct {
		name      string
		typ       uint32
		sector    uint64
		n         uint32
		write     bool
		want      byte
		wantCount func(*Block) uint64
	}{
		{"read past the end", VIRTIO_BLK_T_IN, 15, 1024, true, VIRTIO_BLK_S_IOERR, func(b *Block) uint64 { return b.IOErrors }},
		{"read at a huge sector", VIRTIO_BLK_T_IN, 1 << 62, 512, true, VIRTIO_BLK_S_IOERR, func(b *Block) uint64 { return b.IOErrors }},
		{"write past the end", VIRTIO_BLK_T_OUT, 16, 512, false, VIRTIO_BLK_S_IOERR, func(b *Block) uint64 { return b.IOErrors }},
		{"read of a partial sector", VIRTIO_BLK_T_IN, 0, 100, true, VIRTIO_BLK_S_IOERR, func(b *Block) uint64 { return b.IOErrors }},
		{"write of a partial sector", VIRTIO_BLK_T_OUT, 0, 100, false, VIRTIO_BLK_S_IOERR, func(b *Block) uint64 { return b.IOErrors }},
		{"unknown type", 99, 0, 0, false, VIRTIO_BLK_S_UNSUPP, func(b *Block) uint64 { return b.Unsupported }},
		{"discard (not offered)", 11, 0, 16, false, VIRTIO_BLK_S_UNSUPP, func(b *Block) uint64 { return b.Unsupported }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d, blk := newBlkDriver(t, img)
			for i := range 1024 {
				d.mem.b[dataAt+uint64(i)] = 0x77
			}
			if _, st := d.request(tc.typ, tc.sector, tc.n, tc.write); st != tc.want {
				t.Fatalf("status %d, want %d", st, tc.want)
			}
			if tc.wantCount(blk) != 1 {
				t.Fatalf("counter not incremented: %+v", blk.BlockCounters)
			}
		})
	}
	// Nothing was written by any of them.
	all := make([]byte, 16*512)
	if _, err := img.f.ReadAt(all, 0); err != nil {
		t.Fatal(err)
	}
	for i, b := range all {
		if b != byte(i/512) {
			t.Fatalf("image byte %d changed to %#x", i, b)
		}
	}
}

func TestBlockTruncatedRequest(t *testing.T) {
	d, blk := newBlkDriver(t, newTestImage(t, 16*512))
	for _, bufs := range [][]buf{
		{{hdrAt, 8, false}, {statusAt, 1, true}}, // header too short
		{{hdrAt, 16, false}},                     // no status byte
	} {
		blkHeader(d.mem, hdrAt, VIRTIO_BLK_T_OUT, 0)
		d.submit(bufs...)
		d.notify()
		used := d.takeUsed()
		if len(used) != 1 || used[0][1] != 0 {
			t.Fatalf("truncated request: used %v, want one with length 0", used)
		}
	}
	if blk.Malformed != 2 || blk.Writes != 0 {
		t.Fatalf("counters %+v", blk.BlockCounters)
	}
	if d.r32(VIRTIO_MMIO_STATUS)&VIRTIO_STATUS_DEVICE_NEEDS_RESET != 0 {
		t.Fatal("a malformed request (well-formed chain) needs no reset")
	}
}

func TestBlockReadOnly(t *testing.T) {
	p := filepath.Join(t.TempDir(), "ro.img")
	orig := bytes.Repeat([]byte{0x11}, 4*512)
	if err := os.WriteFile(p, orig, 0o400); err != nil {
		t.Fatal(err)
	}
	img, err := OpenDiskImage(p, true)
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	d, blk := newBlkDriver(t, img)
	if f := d.r32(VIRTIO_MMIO_DEVICE_FEATURES); f&(1<<VIRTIO_BLK_F_RO) == 0 {
		t.Fatalf("features %#x lack VIRTIO_BLK_F_RO", f)
	}
	if _, st := d.request(VIRTIO_BLK_T_OUT, 0, 512, false); st != VIRTIO_BLK_S_IOERR {
		t.Fatalf("write to a read-only disk: status %d, want IOERR", st)
	}
	if _, st := d.request(VIRTIO_BLK_T_IN, 0, 512, true); st != VIRTIO_BLK_S_OK || d.mem.b[dataAt] != 0x11 {
		t.Fatalf("read from a read-only disk: status %d", st)
	}
	got, _ := os.ReadFile(p)
	if !bytes.Equal(got, orig) || blk.IOErrors != 1 {
		t.Fatal("read-only image changed")
	}
}

func TestOpenDiskImageErrors(t *testing.T) {
	dir := t.TempDir()
	write := func(name string, n int) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, make([]byte, n), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	locked := write("locked.img", 1024)
	held, err := OpenDiskImage(locked, false)
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	for _, tc := range []struct {
		name, path, want string
		ro               bool
	}{
		{"missing", filepath.Join(dir, "nope.img"), "no such file", false},
		{"empty", write("empty.img", 0), "smaller than one 512-byte sector", false},
		{"too small", write("small.img", 100), "smaller than one 512-byte sector", true},
		{"partial sector", write("odd.img", 1000), "not a whole number", false},
		{"directory", dir, "is a directory", false},
		{"directory read-only", dir, "not a regular file", true},
		{"in use", locked, "in use by another process", false},
		{"in use, read-only", locked, "in use by another process", true},
	} {
		_, err := OpenDiskImage(tc.path, tc.ro)
		if err == nil || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), tc.path) {
			t.Errorf("%s: err = %v, want one naming %s and saying %q", tc.name, err, tc.path, tc.want)
		}
		if tc.name == "too small" && !errors.Is(err, ErrDiskImage) {
			t.Errorf("too small: %v is not ErrDiskImage", err)
		}
	}
	if os.Geteuid() != 0 { // root reads any file
		unreadable := write("unreadable.img", 1024)
		os.Chmod(unreadable, 0)
		if _, err := OpenDiskImage(unreadable, true); err == nil || !strings.Contains(err.Error(), "permission denied") {
			t.Errorf("unreadable: err = %v", err)
		}
	}
}

// FuzzBlockRequest serves an arbitrary chain (arbitrary descriptors and
// header) against a read-only image: never a panic, never a write to the
// image, a used length within the writable bytes.
func FuzzBlockRequest(f *testing.F) {
	f.Add([]byte{0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0}, uint8(3), uint32(512), uint16(0x0300))
	f.Add([]byte{1, 0, 0, 0}, uint8(1), uint32(17), uint16(0x1))
	f.Add([]byte{8}, uint8(2), uint32(20), uint16(0x2))
	f.Fuzz(func(t *testing.T, hdr []byte, nbufs uint8, n uint32, writeMask uint16) {
		p := filepath.Join(t.TempDir(), "ro.img")
		orig := bytes.Repeat([]byte{0x5a}, 8*512)
		if err := os.WriteFile(p, orig, 0o600); err != nil {
			t.Fatal(err)
		}
		img, err := OpenDiskImage(p, true)
		if err != nil {
			t.Fatal(err)
		}
		defer img.Close()
		blk := NewBlock(img, "fuzz")
		mem := newTestMem(0x8000)
		copy(mem.b[0x1000:], hdr)
		chain := make([]Desc, 0, 8)
		var writable uint64
		for i := range min(int(nbufs), 8) {
			w := writeMask&(1<<i) != 0
			d := Desc{Addr: 0x1000 + uint64(i)*0x800, Len: min(n>>(i*2), 0x800), Write: w}
			if w {
				writable += uint64(d.Len)
			}
			chain = append(chain, d)
		}
		used := serveChain(blk, mem, chain)
		if uint64(used) > writable {
			t.Fatalf("used length %d > %d writable bytes", used, writable)
		}
		got, _ := os.ReadFile(p)
		if !bytes.Equal(got, orig) {
			t.Fatal("a read-only image changed")
		}
	})
}

// serveChain serves one chain on the vCPU thread, as Notify without
// SetAsync does, without a queue: the used length.
func serveChain(b *Block, mem GuestMemory, chain []Desc) uint32 {
	r := &b.slots[0]
	if w, now := b.prepare(r, mem, 0, chain); now {
		return w
	}
	r.status = b.perform(r)
	return b.finish(mem, r)
}
