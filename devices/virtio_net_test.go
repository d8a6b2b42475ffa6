package devices

import (
	"bytes"
	"encoding/binary"
	"errors"
	"net"
	"testing"
)

// frameLog records the frames a Net transmits.
type frameLog struct {
	frames [][]byte
	err    error
}

func (l *frameLog) Write(p []byte) (int, error) {
	if l.err != nil {
		return 0, l.err
	}
	l.frames = append(l.frames, append([]byte(nil), p...))
	return len(p), nil
}

// netQ is one queue as the test's virtio-net driver lays it out.
type netQ struct {
	desc, avail, used uint64
	availIdx, seen    uint16
	next              uint16
}

const netTQSize = 16

// netDriver drives a Net through its transport: receiveq1 at 0x1000..,
// transmitq1 at 0x4000.., buffers from 0x10000.
type netDriver struct {
	t   *testing.T
	tr  *MMIOTransport
	mem *testMem
	irq *irqRec
	net *Net
	out *frameLog
	q   [2]netQ
	acc [4]byte
}

var testMAC = net.HardwareAddr{0x02, 0x11, 0x22, 0x33, 0x44, 0x55}

func newNetDriver(t *testing.T) *netDriver {
	d := &netDriver{t: t, mem: newTestMem(0x40000), irq: &irqRec{}, out: &frameLog{}}
	d.net = NewNet(testMAC, d.out)
	d.tr = NewMMIOTransport(d.net, d.mem, d.irq, 10)
	d.q[0] = netQ{desc: 0x1000, avail: 0x2000, used: 0x3000}
	d.q[1] = netQ{desc: 0x4000, avail: 0x5000, used: 0x6000}
	td := &testDriver{t: t, tr: d.tr, mem: d.mem}
	td.w32(VIRTIO_MMIO_STATUS, 0)
	td.w32(VIRTIO_MMIO_STATUS, VIRTIO_STATUS_ACKNOWLEDGE|VIRTIO_STATUS_DRIVER)
	f := uint64(1)<<VIRTIO_F_VERSION_1 | 1<<VIRTIO_NET_F_MAC
	td.w32(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0)
	td.w32(VIRTIO_MMIO_DRIVER_FEATURES, uint32(f))
	td.w32(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1)
	td.w32(VIRTIO_MMIO_DRIVER_FEATURES, uint32(f>>32))
	td.w32(VIRTIO_MMIO_STATUS, VIRTIO_STATUS_ACKNOWLEDGE|VIRTIO_STATUS_DRIVER|VIRTIO_STATUS_FEATURES_OK)
	if td.r32(VIRTIO_MMIO_STATUS)&VIRTIO_STATUS_FEATURES_OK == 0 {
		t.Fatal("features refused")
	}
	for i, q := range d.q {
		td.w32(VIRTIO_MMIO_QUEUE_SEL, uint32(i))
		td.w32(VIRTIO_MMIO_QUEUE_NUM, netTQSize)
		td.w32(VIRTIO_MMIO_QUEUE_DESC_LOW, uint32(q.desc))
		td.w32(VIRTIO_MMIO_QUEUE_DRIVER_LOW, uint32(q.avail))
		td.w32(VIRTIO_MMIO_QUEUE_DEVICE_LOW, uint32(q.used))
		td.w32(VIRTIO_MMIO_QUEUE_READY, 1)
	}
	td.w32(VIRTIO_MMIO_STATUS, VIRTIO_STATUS_ACKNOWLEDGE|VIRTIO_STATUS_DRIVER|VIRTIO_STATUS_FEATURES_OK|VIRTIO_STATUS_DRIVER_OK)
	return d
}

// submit makes bufs one chain on queue qi (no notification).
func (d *netDriver) submit(qi int, bufs ...buf) {
	q := &d.q[qi]
	head := q.next
	for i, b := range bufs {
		idx := q.next
		q.next = (q.next + 1) % netTQSize
		var flags uint16
		if b.write {
			flags |= VIRTQ_DESC_F_WRITE
		}
		if i < len(bufs)-1 {
			flags |= VIRTQ_DESC_F_NEXT
		}
		e := d.mem.b[q.desc+16*uint64(idx):]
		binary.LittleEndian.PutUint64(e[0:], b.addr)
		binary.LittleEndian.PutUint32(e[8:], b.n)
		binary.LittleEndian.PutUint16(e[12:], flags)
		binary.LittleEndian.PutUint16(e[14:], q.next)
	}
	binary.LittleEndian.PutUint16(d.mem.b[q.avail+4+2*uint64(q.availIdx%netTQSize):], head)
	q.availIdx++
	binary.LittleEndian.PutUint16(d.mem.b[q.avail+2:], q.availIdx)
}

func (d *netDriver) notify(qi int) {
	// The access buffer is the driver's, reused (as KVM's run structure
	// is): the transport hands it to interfaces, so a local would escape.
	binary.LittleEndian.PutUint32(d.acc[:], uint32(qi))
	d.tr.Write(VIRTIO_MMIO_QUEUE_NOTIFY, d.acc[:])
}

// takeUsed returns the used elements of queue qi not seen yet.
func (d *netDriver) takeUsed(qi int) [][2]uint32 {
	q := &d.q[qi]
	var out [][2]uint32
	idx := binary.LittleEndian.Uint16(d.mem.b[q.used+2:])
	for q.seen != idx {
		e := d.mem.b[q.used+4+8*uint64(q.seen%netTQSize):]
		out = append(out, [2]uint32{binary.LittleEndian.Uint32(e), binary.LittleEndian.Uint32(e[4:])})
		q.seen++
	}
	return out
}

// testFrame is an Ethernet frame of n bytes with a recognisable pattern.
func testFrame(n int, seed byte) []byte {
	f := make([]byte, n)
	for i := range f {
		f[i] = seed + byte(i*7)
	}
	return f
}

func TestNetConfigAndFeatures(t *testing.T) {
	d := newNetDriver(t)
	td := &testDriver{t: t, tr: d.tr, mem: d.mem}
	if id := td.r32(VIRTIO_MMIO_DEVICE_ID); id != VIRTIO_ID_NET {
		t.Fatalf("device id %d", id)
	}
	td.w32(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0)
	lo := td.r32(VIRTIO_MMIO_DEVICE_FEATURES)
	td.w32(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1)
	hi := td.r32(VIRTIO_MMIO_DEVICE_FEATURES)
	want := uint64(1)<<VIRTIO_NET_F_MAC | 1<<VIRTIO_RING_F_INDIRECT_DESC | 1<<VIRTIO_F_VERSION_1
	if got := uint64(hi)<<32 | uint64(lo); got != want {
		t.Fatalf("features %#x, want %#x (no offloads)", got, want)
	}
	mac := make([]byte, 6)
	for i := range mac {
		d.tr.Read(VIRTIO_MMIO_CONFIG+uint64(i), mac[i:i+1])
	}
	if !bytes.Equal(mac, testMAC) {
		t.Fatalf("config mac % x", mac)
	}
	before := d.tr.Unhandled()
	var b [2]byte
	d.tr.Read(VIRTIO_MMIO_CONFIG+6, b[:])
	d.tr.Write(VIRTIO_MMIO_CONFIG, []byte{0xff})
	if b != [2]byte{} || d.tr.Unhandled() != before+3 {
		t.Fatalf("past the mac: % x, unhandled %d -> %d", b, before, d.tr.Unhandled())
	}
	if d.net.MAC().String() != testMAC.String() {
		t.Fatal("MAC()")
	}
}

func TestNetTransmit(t *testing.T) {
	for _, tc := range []struct {
		name  string
		n     int // frame bytes
		split bool
		sent  bool
	}{
		{"header apart", 60, true, true},
		{"header with frame", 60, false, true},
		{"shortest", NetMinFrame, true, true},
		{"longest", NetMaxFrame, false, true},
		{"too short", NetMinFrame - 1, true, false},
		{"too long", NetMaxFrame + 1, true, false},
		{"header only", 0, false, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := newNetDriver(t)
			frame := testFrame(tc.n, 3)
			const at = 0x10000
			copy(d.mem.b[at:], make([]byte, VirtioNetHdrSize))
			copy(d.mem.b[at+VirtioNetHdrSize:], frame)
			if tc.split {
				d.submit(1, buf{at, VirtioNetHdrSize, false}, buf{at + VirtioNetHdrSize, uint32(tc.n), false},
					buf{0x20000, 64, true}) // a writable buffer is ignored
			} else {
				d.submit(1, buf{at, uint32(VirtioNetHdrSize + tc.n), false})
			}
			d.notify(1)
			used := d.takeUsed(1)
			if len(used) != 1 || used[0][1] != 0 {
				t.Fatalf("used %v, want one chain with length 0", used)
			}
			if !d.irq.level[10] {
				t.Fatal("no interrupt")
			}
			if tc.sent {
				if len(d.out.frames) != 1 || !bytes.Equal(d.out.frames[0], frame) {
					t.Fatalf("sent %d frames", len(d.out.frames))
				}
				if d.net.TxFrames != 1 || d.net.TxBytes != uint64(tc.n) || d.net.TxBadLength != 0 {
					t.Fatalf("counters %+v", d.net.NetCounters)
				}
			} else if len(d.out.frames) != 0 || d.net.TxBadLength != 1 || d.net.TxFrames != 0 {
				t.Fatalf("bad frame: sent %d, counters %+v", len(d.out.frames), d.net.NetCounters)
			}
		})
	}
}

func TestNetTransmitOutputError(t *testing.T) {
	d := newNetDriver(t)
	d.out.err = errors.New("tap gone")
	d.submit(1, buf{0x10000, VirtioNetHdrSize + 60, false})
	d.notify(1)
	if d.net.TxErrors != 1 || d.net.TxFrames != 0 || len(d.takeUsed(1)) != 1 {
		t.Fatalf("counters %+v", d.net.NetCounters)
	}
}

// rxCheck verifies a received chain: the header (num_buffers 1, the rest
// zero) then the frame, across the buffers at addrs of the given sizes.
func rxCheck(t *testing.T, mem *testMem, bufs []buf, frame []byte) {
	t.Helper()
	var got []byte
	for _, b := range bufs {
		got = append(got, mem.b[b.addr:b.addr+uint64(b.n)]...)
	}
	want := make([]byte, VirtioNetHdrSize)
	want[10] = 1
	want = append(want, frame...)
	if !bytes.Equal(got[:len(want)], want) {
		t.Fatalf("received bytes differ:\n got % x\nwant % x", got[:min(len(got), 40)], want[:min(len(want), 40)])
	}
	for _, b := range bufs {
		if !mem.dirty[b.addr/4096] {
			t.Fatalf("buffer at %#x not marked dirty", b.addr)
		}
	}
}

func TestNetReceive(t *testing.T) {
	d := newNetDriver(t)
	bufs := []buf{{0x10000, 20, true}, {0x11000, 2000, true}}
	d.submit(0, bufs...)
	d.notify(0)
	if len(d.takeUsed(0)) != 0 {
		t.Fatal("a buffer used with no frame")
	}
	frame := testFrame(100, 9)
	d.net.Receive(frame)
	d.tr.Service(0)
	used := d.takeUsed(0)
	if len(used) != 1 || used[0][1] != uint32(VirtioNetHdrSize+len(frame)) {
		t.Fatalf("used %v", used)
	}
	rxCheck(t, d.mem, bufs, frame)
	if !d.irq.level[10] || d.net.RxFrames != 1 || d.net.RxBytes != 100 {
		t.Fatalf("irq %v counters %+v", d.irq.level[10], d.net.NetCounters)
	}
}

// Frames arriving before the driver posts buffers wait (up to
// NetRxPending) and are placed when it does; the rest are counted.
func TestNetReceiveBounded(t *testing.T) {
	d := newNetDriver(t)
	for i := range NetRxPending + 6 {
		d.net.Receive(testFrame(60, byte(i)))
		d.tr.Service(0)
	}
	if d.net.Pending() != NetRxPending || d.net.RxOverflow != 6 {
		t.Fatalf("pending %d overflow %d", d.net.Pending(), d.net.RxOverflow)
	}
	d.net.Receive(testFrame(NetMinFrame-1, 0))
	d.net.Receive(testFrame(NetMaxFrame+1, 0))
	if d.net.RxBadLength != 2 || d.net.Pending() != NetRxPending {
		t.Fatalf("bad lengths: %+v", d.net.NetCounters)
	}
	// A chain too small for header and frame: the frame is dropped and
	// the chain kept for the next.
	d.submit(0, buf{0x10000, VirtioNetHdrSize + 59, true})
	d.notify(0)
	if d.net.RxTooSmall != NetRxPending || d.net.Pending() != 0 || len(d.takeUsed(0)) != 0 {
		t.Fatalf("small chain: %+v pending %d", d.net.NetCounters, d.net.Pending())
	}
	// The kept chain takes a frame that fits; the next goes to a new one.
	d.net.Receive(testFrame(59, 1))
	d.net.Receive(testFrame(60, 2))
	d.tr.Service(0)
	for i := range 2 {
		d.submit(0, buf{0x12000 + uint64(i)*0x1000, 2000, true})
	}
	d.notify(0)
	used := d.takeUsed(0)
	if len(used) != 2 || used[0][1] != VirtioNetHdrSize+59 || d.net.RxFrames != 2 {
		t.Fatalf("used %v counters %+v", used, d.net.NetCounters)
	}
	rxCheck(t, d.mem, []buf{{0x12000, 2000, true}}, testFrame(60, 2))
}

func TestNetResetDropsPending(t *testing.T) {
	d := newNetDriver(t)
	d.net.Receive(testFrame(60, 0))
	d.net.Receive(testFrame(60, 1))
	(&testDriver{t: t, tr: d.tr, mem: d.mem}).w32(VIRTIO_MMIO_STATUS, 0)
	if d.net.Pending() != 0 || d.net.RxReset != 2 {
		t.Fatalf("after reset: pending %d, %+v", d.net.Pending(), d.net.NetCounters)
	}
	// Service before the driver is ready does nothing.
	d.net.Receive(testFrame(60, 0))
	d.tr.Service(0)
	if d.net.Pending() != 1 {
		t.Fatal("frame lost before the driver was ready")
	}
}

// A malformed receive queue is a device error, like any other queue's.
func TestNetReceiveBadQueue(t *testing.T) {
	d := newNetDriver(t)
	d.submit(0, buf{0x3ffff000, 2000, true}) // outside guest memory
	d.net.Receive(testFrame(60, 0))
	d.tr.Service(0)
	if d.tr.Status()&VIRTIO_STATUS_DEVICE_NEEDS_RESET == 0 || d.tr.Errors() != 1 {
		t.Fatalf("status %#x errors %d", d.tr.Status(), d.tr.Errors())
	}
}

// FuzzNetTransmit decodes arbitrary transmit chains: never a panic, a frame
// only within [NetMinFrame, NetMaxFrame] and equal to the readable bytes
// after the header.
func FuzzNetTransmit(f *testing.F) {
	f.Add([]byte{1, 2, 3}, uint8(2), uint32(VirtioNetHdrSize), uint32(60), uint16(0))
	f.Add([]byte{}, uint8(1), uint32(VirtioNetHdrSize+13), uint32(0), uint16(0))
	f.Add([]byte{9}, uint8(4), uint32(5), uint32(700), uint16(0x4))
	f.Fuzz(func(t *testing.T, data []byte, nbufs uint8, first, rest uint32, writeMask uint16) {
		mem := newTestMem(0x10000)
		copy(mem.b[0x1000:], data)
		chain := make([]Desc, 0, 8)
		var readable []byte
		for i := range min(int(nbufs), 8) {
			n := rest
			if i == 0 {
				n = first
			}
			d := Desc{Addr: 0x1000 + uint64(i)*0x800, Len: min(n, 0x800), Write: writeMask&(1<<i) != 0}
			if !d.Write {
				readable = append(readable, mem.b[d.Addr:d.Addr+uint64(d.Len)]...)
			}
			chain = append(chain, d)
		}
		out := &frameLog{}
		n := NewNet(testMAC, out)
		frame, ok := n.decodeTx(mem.b, chain)
		if !ok {
			if len(readable) >= VirtioNetHdrSize+NetMinFrame && len(readable) <= VirtioNetHdrSize+NetMaxFrame {
				t.Fatalf("a %d-byte chain refused", len(readable))
			}
			if n.TxBadLength != 1 {
				t.Fatal("refusal not counted")
			}
			return
		}
		if len(frame) < NetMinFrame || len(frame) > NetMaxFrame || !bytes.Equal(frame, readable[VirtioNetHdrSize:]) {
			t.Fatalf("frame of %d bytes from %d readable", len(frame), len(readable))
		}
	})
}

// Serving the queues allocates nothing: transmit and receive run inside
// the vCPU loop's exits.
func TestNetNoAllocs(t *testing.T) {
	d := newNetDriver(t)
	d.out = nil
	d.net.tx = discardFrames{}
	frame := testFrame(1514, 1)
	copy(d.mem.b[0x10000+VirtioNetHdrSize:], frame)
	tx := testing.AllocsPerRun(100, func() {
		d.submit(1, buf{0x10000, VirtioNetHdrSize + 1514, false})
		d.notify(1)
	})
	rx := testing.AllocsPerRun(100, func() {
		d.submit(0, buf{0x20000, 2048, true})
		d.net.Receive(frame)
		d.tr.Service(0)
	})
	if tx != 0 || rx != 0 || d.net.TxFrames < 100 || d.net.RxFrames < 100 {
		t.Fatalf("allocations per frame: transmit %v, receive %v (counters %+v)", tx, rx, d.net.NetCounters)
	}
}

type discardFrames struct{}

func (discardFrames) Write(p []byte) (int, error) { return len(p), nil }

// BenchmarkNet moves one 1514-byte frame per iteration through the
// transport: transmit (QueueNotify to the output) and receive (a frame
// delivered to a posted chain).
func BenchmarkNet(b *testing.B) {
	frame := testFrame(1514, 1)
	b.Run("transmit", func(b *testing.B) {
		d := newNetDriver(&testing.T{})
		d.net.tx = discardFrames{}
		copy(d.mem.b[0x10000+VirtioNetHdrSize:], frame)
		b.ReportAllocs()
		for b.Loop() {
			d.submit(1, buf{0x10000, VirtioNetHdrSize + 1514, false})
			d.notify(1)
		}
	})
	b.Run("receive", func(b *testing.B) {
		d := newNetDriver(&testing.T{})
		b.ReportAllocs()
		for b.Loop() {
			d.submit(0, buf{0x20000, 2048, true})
			d.net.Receive(frame)
			d.tr.Service(0)
		}
	})
}

// TestNetStateRoundTrip captures a device in mid-use (frames transmitted
// and received, three frames waiting for receive chains, an interrupt
// pending) and installs transport and device state into a fresh device
// over a copy of guest memory: the same next steps (buffers posted, a
// frame received, a frame sent) give the same guest memory, used
// elements, transmitted frames and states on both.
func TestNetStateRoundTrip(t *testing.T) {
	d := newNetDriver(t)
	d.submit(0, buf{0x10000, 2000, true})
	d.notify(0)
	for i := range 4 {
		d.net.Receive(testFrame(60+i, byte(i)))
		d.tr.Service(0)
	}
	copy(d.mem.b[0x20000:], make([]byte, VirtioNetHdrSize))
	copy(d.mem.b[0x20000+VirtioNetHdrSize:], testFrame(80, 7))
	d.submit(1, buf{0x20000, VirtioNetHdrSize + 80, false})
	d.notify(1)
	if d.net.Pending() != 3 || len(d.out.frames) != 1 {
		t.Fatalf("pending %d, sent %d", d.net.Pending(), len(d.out.frames))
	}
	d.takeUsed(0)
	d.takeUsed(1)

	ts, ns := d.tr.State(), d.net.State()
	if len(ns.Pending) != 3 || !bytes.Equal(ns.Pending[0], testFrame(61, 1)) {
		t.Fatalf("captured %d frames", len(ns.Pending))
	}
	d2 := &netDriver{t: t, mem: newTestMem(len(d.mem.b)), irq: &irqRec{}, out: &frameLog{}, q: d.q}
	copy(d2.mem.b, d.mem.b)
	d2.net = NewNet(testMAC, d2.out)
	d2.tr = NewMMIOTransport(d2.net, d2.mem, d2.irq, 10)
	if err := d2.tr.SetState(ts); err != nil {
		t.Fatal(err)
	}
	if err := d2.net.SetState(ns); err != nil {
		t.Fatal(err)
	}
	if d2.tr.State() != ts || d2.net.Pending() != 3 {
		t.Fatalf("installed state differs")
	}

	for _, dr := range []*netDriver{d, d2} {
		dr.out.frames = nil
		dr.submit(0, buf{0x11000, 2000, true})
		dr.submit(0, buf{0x12000, 2000, true})
		dr.notify(0)
		dr.net.Receive(testFrame(90, 3))
		dr.submit(0, buf{0x13000, 2000, true})
		dr.submit(0, buf{0x14000, 2000, true})
		dr.notify(0)
		dr.submit(1, buf{0x20000, VirtioNetHdrSize + 80, false})
		dr.notify(1)
		if used := dr.takeUsed(0); len(used) != 4 {
			t.Fatalf("used %v", used)
		}
	}
	rxCheck(t, d2.mem, []buf{{0x14000, 2000, true}}, testFrame(90, 3))
	if !bytes.Equal(d.mem.b, d2.mem.b) {
		t.Error("guest memory differs after the same steps")
	}
	if d.tr.State() != d2.tr.State() || d.net.Pending() != 0 || d2.net.Pending() != 0 {
		t.Error("states differ after the same steps")
	}
	if len(d.out.frames) != 1 || len(d2.out.frames) != 1 || !bytes.Equal(d.out.frames[0], d2.out.frames[0]) {
		t.Error("transmitted frames differ")
	}
}

func TestNetSetStateRefuses(t *testing.T) {
	for _, tc := range []struct {
		name string
		s    NetState
	}{
		{"too many", NetState{Pending: make([][]byte, NetRxPending+1)}},
		{"short frame", NetState{Pending: [][]byte{make([]byte, NetMinFrame-1)}}},
		{"long frame", NetState{Pending: [][]byte{make([]byte, NetMaxFrame+1)}}},
	} {
		n := NewNet(testMAC, &frameLog{})
		n.Receive(testFrame(60, 1))
		if err := n.SetState(tc.s); err == nil {
			t.Errorf("%s: accepted", tc.name)
		}
	}
}
