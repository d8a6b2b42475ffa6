package devices

import (
	"encoding/binary"
	"testing"
)

// nullDevice is a virtio device that returns every chain with 0 bytes
// written; it records what it was given.
type nullDevice struct {
	chains [][]Desc
	resets int
	cfg    [8]byte
}

func (d *nullDevice) DeviceID() uint32   { return 42 }
func (d *nullDevice) Features() uint64   { return 1 << 3 }
func (d *nullDevice) QueueMax() []uint16 { return []uint16{64, 32} }
func (d *nullDevice) ReadConfig(off uint64, data []byte) {
	for i := range data {
		data[i] = d.cfg[(off+uint64(i))%8]
	}
}
func (d *nullDevice) WriteConfig(off uint64, data []byte) {}
func (d *nullDevice) Reset()                              { d.resets++ }
func (d *nullDevice) Unhandled() uint64                   { return 0 }
func (d *nullDevice) Notify(index int, q *Queue, mem GuestMemory) (bool, error) {
	n, err := q.Pending(mem)
	if err != nil {
		return false, err
	}
	for range n {
		head, chain, err := q.Pop(mem, make([]Desc, 0, q.Size))
		if err != nil {
			return false, err
		}
		d.chains = append(d.chains, append([]Desc(nil), chain...))
		q.PushUsed(mem, head, 0)
	}
	return n > 0, nil
}

func newNullDriver(t *testing.T) (*testDriver, *nullDevice, *irqRec) {
	dev := &nullDevice{cfg: [8]byte{1, 2, 3, 4, 5, 6, 7, 8}}
	irq := &irqRec{}
	mem := newTestMem(0x20000)
	return &testDriver{t: t, tr: NewMMIOTransport(dev, mem, irq, 5), mem: mem}, dev, irq
}

func TestMMIOIdentity(t *testing.T) {
	d, _, _ := newNullDriver(t)
	for _, r := range []struct {
		off  uint64
		want uint32
	}{
		{VIRTIO_MMIO_MAGIC_VALUE, 0x74726976},
		{VIRTIO_MMIO_VERSION, 2},
		{VIRTIO_MMIO_DEVICE_ID, 42},
		{VIRTIO_MMIO_VENDOR_ID, VirtioVendorID},
		{VIRTIO_MMIO_DEVICE_FEATURES, 1 << 3}, // DeviceFeaturesSel 0
		{VIRTIO_MMIO_SHM_LEN_LOW, 0xffffffff},
		{VIRTIO_MMIO_CONFIG_GENERATION, 0},
		{VIRTIO_MMIO_CONFIG + 4, 0x08070605},
	} {
		if got := d.r32(r.off); got != r.want {
			t.Errorf("register %#x = %#x, want %#x", r.off, got, r.want)
		}
	}
	d.w32(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1)
	if got := d.r32(VIRTIO_MMIO_DEVICE_FEATURES); got != 1 {
		t.Errorf("features high word = %#x, want VIRTIO_F_VERSION_1", got)
	}
	d.w32(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 2)
	if got := d.r32(VIRTIO_MMIO_DEVICE_FEATURES); got != 0 {
		t.Errorf("features word 2 = %#x, want 0", got)
	}
	// Config space accepts byte accesses.
	var b [1]byte
	d.tr.Read(VIRTIO_MMIO_CONFIG+2, b[:])
	if b[0] != 3 {
		t.Errorf("config byte 2 = %d, want 3", b[0])
	}
	if d.tr.Unhandled() != 0 {
		t.Errorf("unhandled = %d after valid accesses", d.tr.Unhandled())
	}
}

func TestMMIOUnhandledAccesses(t *testing.T) {
	d, _, _ := newNullDriver(t)
	for _, tc := range []struct {
		name string
		do   func()
	}{
		{"narrow register read", func() { var b [2]byte; d.tr.Read(VIRTIO_MMIO_MAGIC_VALUE, b[:]) }},
		{"unaligned register read", func() { var b [4]byte; d.tr.Read(VIRTIO_MMIO_MAGIC_VALUE+2, b[:]) }},
		{"narrow register write", func() { d.tr.Write(VIRTIO_MMIO_STATUS, []byte{1}) }},
		{"read of a write-only register", func() { d.r32(VIRTIO_MMIO_QUEUE_NOTIFY) }},
		{"write of a read-only register", func() { d.w32(VIRTIO_MMIO_MAGIC_VALUE, 0) }},
		{"reserved register", func() { d.r32(0x0f0) }},
		{"notify before DRIVER_OK", func() { d.notify() }},
		{"QueueNum of a queue that does not exist", func() { d.w32(VIRTIO_MMIO_QUEUE_SEL, 9); d.w32(VIRTIO_MMIO_QUEUE_NUM, 8) }},
	} {
		before := d.tr.Unhandled()
		tc.do()
		if d.tr.Unhandled() != before+1 {
			t.Errorf("%s: unhandled went from %d to %d, want one more", tc.name, before, d.tr.Unhandled())
		}
	}
}

func TestMMIOFeatureNegotiation(t *testing.T) {
	for _, tc := range []struct {
		name     string
		features uint64
		ok       bool
	}{
		{"version 1", 1 << VIRTIO_F_VERSION_1, true},
		{"version 1 and a device feature", 1<<VIRTIO_F_VERSION_1 | 1<<3, true},
		{"legacy driver (no VERSION_1)", 1 << 3, false},
		{"a feature not offered", 1<<VIRTIO_F_VERSION_1 | 1<<4, false},
	} {
		d, _, _ := newNullDriver(t)
		d.w32(VIRTIO_MMIO_STATUS, VIRTIO_STATUS_ACKNOWLEDGE|VIRTIO_STATUS_DRIVER)
		d.w32(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0)
		d.w32(VIRTIO_MMIO_DRIVER_FEATURES, uint32(tc.features))
		d.w32(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1)
		d.w32(VIRTIO_MMIO_DRIVER_FEATURES, uint32(tc.features>>32))
		d.w32(VIRTIO_MMIO_STATUS, VIRTIO_STATUS_ACKNOWLEDGE|VIRTIO_STATUS_DRIVER|VIRTIO_STATUS_FEATURES_OK)
		got := d.r32(VIRTIO_MMIO_STATUS)&VIRTIO_STATUS_FEATURES_OK != 0
		if got != tc.ok {
			t.Errorf("%s: FEATURES_OK kept = %v, want %v", tc.name, got, tc.ok)
		}
	}
}

func TestMMIONotifyInterruptAck(t *testing.T) {
	d, dev, irq := newNullDriver(t)
	d.setup(1 << VIRTIO_F_VERSION_1)
	if got := d.r32(VIRTIO_MMIO_QUEUE_READY); got != 1 {
		t.Fatalf("QueueReady = %d", got)
	}
	// Addresses cannot change while the queue is ready.
	before := d.tr.Unhandled()
	d.w32(VIRTIO_MMIO_QUEUE_DESC_LOW, 0x8000)
	if d.r32(VIRTIO_MMIO_QUEUE_DESC_LOW) != tqDesc || d.tr.Unhandled() != before+1 {
		t.Fatalf("descriptor address changed while ready")
	}
	head := d.submit(buf{tqBufs, 16, false}, buf{tqBufs + 0x1000, 1, true})
	d.notify()
	used := d.takeUsed()
	if len(used) != 1 || used[0][0] != uint32(head) {
		t.Fatalf("used %v, want head %d", used, head)
	}
	if len(dev.chains) != 1 || len(dev.chains[0]) != 2 || !dev.chains[0][1].Write {
		t.Fatalf("device saw %v", dev.chains)
	}
	eqEvents(t, "after notify", irq.take(), []irqEvent{{5, true}})
	if got := d.r32(VIRTIO_MMIO_INTERRUPT_STATUS); got != VIRTIO_MMIO_INT_VRING {
		t.Fatalf("InterruptStatus = %d", got)
	}
	// A second request before the ack: the line stays up, no new edge.
	d.submit(buf{tqBufs, 16, false})
	d.notify()
	eqEvents(t, "second notify before ack", irq.take(), nil)
	d.w32(VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING)
	eqEvents(t, "after ack", irq.take(), []irqEvent{{5, false}})
	// The driver suppresses interrupts.
	binary.LittleEndian.PutUint16(d.mem.b[tqAvail:], VIRTQ_AVAIL_F_NO_INTERRUPT)
	d.submit(buf{tqBufs, 16, false})
	d.notify()
	eqEvents(t, "NO_INTERRUPT", irq.take(), nil)
	if len(d.takeUsed()) != 2 {
		t.Fatal("requests not returned")
	}
	// The used ring's page was marked dirty.
	if !d.mem.dirty[tqUsed/4096] {
		t.Fatal("used ring page not marked dirty")
	}
}

func TestMMIODeviceErrorNeedsReset(t *testing.T) {
	d, dev, irq := newNullDriver(t)
	d.setup(1 << VIRTIO_F_VERSION_1)
	// A chain that loops.
	d.putDesc(tqDesc, 0, tqBufs, 16, VIRTQ_DESC_F_NEXT, 1)
	d.putDesc(tqDesc, 1, tqBufs, 16, VIRTQ_DESC_F_NEXT, 0)
	d.publish(0)
	d.notify()
	if s := d.r32(VIRTIO_MMIO_STATUS); s&VIRTIO_STATUS_DEVICE_NEEDS_RESET == 0 {
		t.Fatalf("status %#x, want DEVICE_NEEDS_RESET", s)
	}
	if d.r32(VIRTIO_MMIO_INTERRUPT_STATUS)&VIRTIO_MMIO_INT_CONFIG == 0 {
		t.Fatal("no configuration change interrupt")
	}
	eqEvents(t, "device error", irq.take(), []irqEvent{{5, true}})
	if d.tr.Errors() != 1 {
		t.Fatalf("errors = %d", d.tr.Errors())
	}
	// Further notifications are refused until a reset.
	d.notify()
	if len(dev.chains) != 0 {
		t.Fatal("device served a queue after an error")
	}
	resets := dev.resets
	d.w32(VIRTIO_MMIO_STATUS, 0)
	if d.r32(VIRTIO_MMIO_STATUS) != 0 || d.r32(VIRTIO_MMIO_QUEUE_READY) != 0 || dev.resets != resets+1 {
		t.Fatal("reset did not clear the device")
	}
	eqEvents(t, "reset", irq.take(), []irqEvent{{5, false}})
	// The driver starts again; the device works.
	d.avail, d.used, d.next = 0, 0, 0
	clear(d.mem.b[tqAvail : tqAvail+0x2000])
	d.setup(1 << VIRTIO_F_VERSION_1)
	d.submit(buf{tqBufs, 16, false})
	d.notify()
	if len(d.takeUsed()) != 1 {
		t.Fatal("no used buffer after the reset")
	}
}

func TestMMIOQueueReenabledStartsAtZero(t *testing.T) {
	d, _, _ := newNullDriver(t)
	d.setup(1 << VIRTIO_F_VERSION_1)
	d.submit(buf{tqBufs, 16, false})
	d.notify()
	d.w32(VIRTIO_MMIO_QUEUE_READY, 0)
	if d.r32(VIRTIO_MMIO_QUEUE_READY) != 0 {
		t.Fatal("queue still ready")
	}
	clear(d.mem.b[tqAvail : tqAvail+0x2000])
	d.avail, d.used, d.next = 0, 0, 0
	d.w32(VIRTIO_MMIO_QUEUE_READY, 1)
	d.submit(buf{tqBufs, 16, false})
	d.notify()
	if u := d.takeUsed(); len(u) != 1 || u[0][0] != 0 {
		t.Fatalf("used %v after re-enabling, want head 0 in slot 0", u)
	}
}

func TestMMIOStateRoundTrip(t *testing.T) {
	d, _, _ := newNullDriver(t)
	d.setup(1 << VIRTIO_F_VERSION_1)
	d.submit(buf{tqBufs, 16, false})
	d.notify()
	s := d.tr.State()
	d2, _, _ := newNullDriver(t)
	if err := d2.tr.SetState(s); err != nil {
		t.Fatal(err)
	}
	if d2.tr.State() != s {
		t.Fatal("state differs after SetState")
	}
}

// FuzzMMIOTransport drives the registers with arbitrary accesses over
// arbitrary guest memory: never a panic.
func FuzzMMIOTransport(f *testing.F) {
	f.Add([]byte{0x70, 1, 0x70, 3, 0x38, 16, 0x44, 1, 0x70, 15, 0x50, 0}, make([]byte, 64))
	f.Fuzz(func(t *testing.T, ops []byte, memSeed []byte) {
		mem := newTestMem(0x8000)
		for i := range mem.b {
			if len(memSeed) > 0 {
				mem.b[i] = memSeed[i%len(memSeed)]
			}
		}
		img := newTestImage(t, 8*512)
		tr := NewMMIOTransport(NewBlock(img, "fuzz"), mem, &irqRec{}, 5)
		var b [4]byte
		for i := 0; i+1 < len(ops); i += 2 {
			off := uint64(ops[i]) &^ 3
			v := uint32(ops[i+1])
			if off == VIRTIO_MMIO_QUEUE_DESC_LOW || off == VIRTIO_MMIO_QUEUE_DRIVER_LOW || off == VIRTIO_MMIO_QUEUE_DEVICE_LOW {
				v <<= 8
			}
			binary.LittleEndian.PutUint32(b[:], v)
			if ops[i]&1 != 0 {
				tr.Read(off, b[:])
			} else {
				tr.Write(off, b[:])
			}
		}
	})
}
