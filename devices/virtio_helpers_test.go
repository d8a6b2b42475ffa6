package devices

import (
	"encoding/binary"
	"testing"
)

// testMem is guest memory for device tests; it records the pages devices
// mark dirty.
type testMem struct {
	b     []byte
	dirty map[uint64]bool // page numbers
}

func newTestMem(size int) *testMem { return &testMem{b: make([]byte, size), dirty: map[uint64]bool{}} }

func (m *testMem) Bytes() []byte { return m.b }
func (m *testMem) MarkDirty(gpa, n uint64) {
	for p := gpa / 4096; p <= (gpa+n-1)/4096; p++ {
		m.dirty[p] = true
	}
}

// Queue layout the test driver uses: descriptors at 0x1000, available ring
// at 0x2000, used ring at 0x3000, buffers from 0x10000.
const (
	tqDesc  = 0x1000
	tqAvail = 0x2000
	tqUsed  = 0x3000
	tqBufs  = 0x10000
	tqSize  = 16
)

// testDriver plays a virtio driver against an MMIOTransport.
type testDriver struct {
	t     *testing.T
	tr    *MMIOTransport
	mem   *testMem
	avail uint16
	used  uint16 // used entries consumed
	next  uint16 // next free descriptor
}

func (d *testDriver) w32(off uint64, v uint32) {
	var b [4]byte
	binary.LittleEndian.PutUint32(b[:], v)
	d.tr.Write(off, b[:])
}

func (d *testDriver) r32(off uint64) uint32 {
	var b [4]byte
	d.tr.Read(off, b[:])
	return binary.LittleEndian.Uint32(b[:])
}

// setup runs the driver initialisation of §3.1.1 and sets up queue 0;
// features are what the driver accepts.
func (d *testDriver) setup(features uint64) {
	d.w32(VIRTIO_MMIO_STATUS, 0)
	d.w32(VIRTIO_MMIO_STATUS, VIRTIO_STATUS_ACKNOWLEDGE)
	d.w32(VIRTIO_MMIO_STATUS, VIRTIO_STATUS_ACKNOWLEDGE|VIRTIO_STATUS_DRIVER)
	d.w32(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0)
	d.w32(VIRTIO_MMIO_DRIVER_FEATURES, uint32(features))
	d.w32(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1)
	d.w32(VIRTIO_MMIO_DRIVER_FEATURES, uint32(features>>32))
	d.w32(VIRTIO_MMIO_STATUS, VIRTIO_STATUS_ACKNOWLEDGE|VIRTIO_STATUS_DRIVER|VIRTIO_STATUS_FEATURES_OK)
	if d.r32(VIRTIO_MMIO_STATUS)&VIRTIO_STATUS_FEATURES_OK == 0 {
		d.t.Fatalf("device refused features %#x", features)
	}
	d.w32(VIRTIO_MMIO_QUEUE_SEL, 0)
	if max := d.r32(VIRTIO_MMIO_QUEUE_NUM_MAX); max < tqSize {
		d.t.Fatalf("QueueNumMax %d", max)
	}
	d.w32(VIRTIO_MMIO_QUEUE_NUM, tqSize)
	d.w32(VIRTIO_MMIO_QUEUE_DESC_LOW, tqDesc)
	d.w32(VIRTIO_MMIO_QUEUE_DESC_HIGH, 0)
	d.w32(VIRTIO_MMIO_QUEUE_DRIVER_LOW, tqAvail)
	d.w32(VIRTIO_MMIO_QUEUE_DRIVER_HIGH, 0)
	d.w32(VIRTIO_MMIO_QUEUE_DEVICE_LOW, tqUsed)
	d.w32(VIRTIO_MMIO_QUEUE_DEVICE_HIGH, 0)
	d.w32(VIRTIO_MMIO_QUEUE_READY, 1)
	d.w32(VIRTIO_MMIO_STATUS, VIRTIO_STATUS_ACKNOWLEDGE|VIRTIO_STATUS_DRIVER|VIRTIO_STATUS_FEATURES_OK|VIRTIO_STATUS_DRIVER_OK)
}

// putDesc writes descriptor i of the table at table.
func (d *testDriver) putDesc(table uint64, i uint16, addr uint64, n uint32, flags, next uint16) {
	e := d.mem.b[table+16*uint64(i):]
	binary.LittleEndian.PutUint64(e[0:], addr)
	binary.LittleEndian.PutUint32(e[8:], n)
	binary.LittleEndian.PutUint16(e[12:], flags)
	binary.LittleEndian.PutUint16(e[14:], next)
}

// buf is one buffer of a chain the test driver builds.
type buf struct {
	addr  uint64
	n     uint32
	write bool
}

// submit puts bufs as one chain in the descriptor table, makes it available
// and returns its head.
func (d *testDriver) submit(bufs ...buf) uint16 {
	head := d.next
	for i, b := range bufs {
		idx := d.next
		d.next = (d.next + 1) % tqSize
		var flags uint16
		if b.write {
			flags |= VIRTQ_DESC_F_WRITE
		}
		if i < len(bufs)-1 {
			flags |= VIRTQ_DESC_F_NEXT
		}
		d.putDesc(tqDesc, idx, b.addr, b.n, flags, d.next)
	}
	d.publish(head)
	return head
}

// publish makes head available.
func (d *testDriver) publish(head uint16) {
	binary.LittleEndian.PutUint16(d.mem.b[tqAvail+4+2*uint64(d.avail%tqSize):], head)
	d.avail++
	binary.LittleEndian.PutUint16(d.mem.b[tqAvail+2:], d.avail)
}

func (d *testDriver) notify() { d.w32(VIRTIO_MMIO_QUEUE_NOTIFY, 0) }

// takeUsed returns the used elements not seen yet.
func (d *testDriver) takeUsed() [][2]uint32 {
	var out [][2]uint32
	idx := binary.LittleEndian.Uint16(d.mem.b[tqUsed+2:])
	for d.used != idx {
		e := d.mem.b[tqUsed+4+8*uint64(d.used%tqSize):]
		out = append(out, [2]uint32{binary.LittleEndian.Uint32(e), binary.LittleEndian.Uint32(e[4:])})
		d.used++
	}
	return out
}
