package vmm

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ftkvm/ftkvm/devices"
	"github.com/ftkvm/ftkvm/devices/tap"
	"github.com/ftkvm/ftkvm/vmm/snapshot"
)

// txLog records transmitted frames.
type txLog struct{ frames [][]byte }

func (l *txLog) Write(p []byte) (int, error) {
	l.frames = append(l.frames, append([]byte(nil), p...))
	return len(p), nil
}

// chanFrames is a FrameReader fed by a test: each Read returns one frame;
// a closed channel ends the source.
type chanFrames chan []byte

func (c chanFrames) Read(b []byte) (int, error) {
	f, ok := <-c
	if !ok {
		return 0, io.EOF
	}
	return copy(b, f), nil
}

// TestNetThroughEnvironment runs a real machine with a disk and a network
// interface (window 0 and 1 of the shared pool), plays the guest's
// virtio-net driver through the MMIO bus, and checks that a frame from the
// host side reaches guest memory only through the environment's delivery,
// dirty in KVM's log, and that a transmitted frame reaches NIC.Tx.
func TestNetThroughEnvironment(t *testing.T) {
	disk := filepath.Join(t.TempDir(), "disk.img")
	if err := os.WriteFile(disk, make([]byte, 4096), 0o600); err != nil {
		t.Fatal(err)
	}
	tx := &txLog{}
	m, err := New(Config{Kernel: buildTestOS(t), MemSize: 64 << 20, WallClock: time.Unix(0, 0),
		Disks: []Disk{{Path: disk}}, NICs: []NIC{{Tx: tx}}})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if err := m.EnableDirtyLog(); err != nil {
		t.Fatal(err)
	}
	le := binary.LittleEndian
	base := uint64(virtioMMIOBase + devices.VirtioMMIOWindow)
	var b [4]byte
	m.mmio.Read(base+devices.VIRTIO_MMIO_DEVICE_ID, b[:])
	if le.Uint32(b[:]) != devices.VIRTIO_ID_NET {
		t.Fatalf("window 1 holds device %d, want virtio-net", le.Uint32(b[:]))
	}
	// The default MAC is the guest's: the same for the same guest.
	want := tap.DefaultMAC(macSeed(Config{Kernel: buildTestOS(t)}), 0)
	if got := m.NICStats()[0].MAC; got != want.String() {
		t.Fatalf("MAC %s, want %s", got, want)
	}
	mem := m.Memory()
	const (
		rxDesc, rxAvail, rxUsed = 40 << 20, 40<<20 + 0x1000, 40<<20 + 0x2000
		txDesc, txAvail, txUsed = 44 << 20, 44<<20 + 0x1000, 44<<20 + 0x2000
		rxBuf, txBuf            = 41 << 20, 45 << 20
	)
	writes := [][2]uint64{
		{devices.VIRTIO_MMIO_STATUS, 0},
		{devices.VIRTIO_MMIO_STATUS, 3},
		{devices.VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0},
		{devices.VIRTIO_MMIO_DRIVER_FEATURES, 1 << devices.VIRTIO_NET_F_MAC},
		{devices.VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1},
		{devices.VIRTIO_MMIO_DRIVER_FEATURES, 1},
		{devices.VIRTIO_MMIO_STATUS, 11},
	}
	for i, q := range [][3]uint64{{rxDesc, rxAvail, rxUsed}, {txDesc, txAvail, txUsed}} {
		writes = append(writes, [][2]uint64{
			{devices.VIRTIO_MMIO_QUEUE_SEL, uint64(i)},
			{devices.VIRTIO_MMIO_QUEUE_NUM, 16},
			{devices.VIRTIO_MMIO_QUEUE_DESC_LOW, q[0]},
			{devices.VIRTIO_MMIO_QUEUE_DRIVER_LOW, q[1]},
			{devices.VIRTIO_MMIO_QUEUE_DEVICE_LOW, q[2]},
			{devices.VIRTIO_MMIO_QUEUE_READY, 1},
		}...)
	}
	writes = append(writes, [2]uint64{devices.VIRTIO_MMIO_STATUS, 15})
	for _, w := range writes {
		m.testMMIO32(base+w[0], uint32(w[1]))
	}
	// One receive buffer, notified.
	le.PutUint64(mem[rxDesc:], rxBuf)
	le.PutUint32(mem[rxDesc+8:], 1600)
	le.PutUint16(mem[rxDesc+12:], devices.VIRTQ_DESC_F_WRITE)
	le.PutUint16(mem[rxAvail+2:], 1)
	m.testMMIO32(base+devices.VIRTIO_MMIO_QUEUE_NOTIFY, 0)

	env := NewLiveEnv(nil)
	src := make(chanFrames)
	env.AddFrameSource(0, src, nil)
	if err := env.Start(func() {}); err != nil {
		t.Fatal(err)
	}
	defer env.Stop()
	frame := bytes.Repeat([]byte{0xab}, 60)
	src <- frame
	// The frame is queued by the reader; nothing is in guest memory until
	// the environment delivers at a point.
	bitmap := make([]uint64, m.BitmapWords())
	if _, err := m.DirtyLog(bitmap); err != nil {
		t.Fatal(err)
	}
	for !env.hasFrames.Load() {
		time.Sleep(time.Millisecond)
	}
	if le.Uint16(mem[rxUsed+2:]) != 0 {
		t.Fatal("a frame reached the guest before a delivery point")
	}
	if err := env.At(Point{Kind: PointExit, Exits: 1}, m); err != nil {
		t.Fatal(err)
	}
	if le.Uint16(mem[rxUsed+2:]) != 1 || le.Uint32(mem[rxUsed+8:]) != uint32(devices.VirtioNetHdrSize+len(frame)) {
		t.Fatalf("used ring: idx %d len %d", le.Uint16(mem[rxUsed+2:]), le.Uint32(mem[rxUsed+8:]))
	}
	if !bytes.Equal(mem[rxBuf+devices.VirtioNetHdrSize:rxBuf+devices.VirtioNetHdrSize+60], frame) || !m.point.Delivered {
		t.Fatal("frame not in the receive buffer, or the point not marked delivered")
	}
	if _, err := m.DirtyLog(bitmap); err != nil {
		t.Fatal(err)
	}
	for _, gpa := range []uint64{rxBuf, rxUsed} {
		p := gpa / snapshot.PageSize
		if bitmap[p/64]&(1<<(p%64)) == 0 {
			t.Errorf("page of %#x written by the device is not in the dirty log", gpa)
		}
	}
	// Transmit one frame.
	out := bytes.Repeat([]byte{0xcd}, 42)
	copy(mem[txBuf+devices.VirtioNetHdrSize:], out)
	le.PutUint64(mem[txDesc:], txBuf)
	le.PutUint32(mem[txDesc+8:], uint32(devices.VirtioNetHdrSize+len(out)))
	le.PutUint16(mem[txAvail+2:], 1)
	m.testMMIO32(base+devices.VIRTIO_MMIO_QUEUE_NOTIFY, 1)
	if len(tx.frames) != 1 || !bytes.Equal(tx.frames[0], out) {
		t.Fatalf("transmitted %d frames", len(tx.frames))
	}
	s := m.NICStats()[0]
	if s.RxFrames != 1 || s.TxFrames != 1 || s.Unhandled != 0 || s.DeviceErrors != 0 {
		t.Fatalf("stats %+v", s)
	}
	if !bytes.Contains(mem[acpiTablesAddr:0x100000], []byte("LNRO0005")) {
		t.Fatal("no virtio-mmio device in the DSDT")
	}
}

// fakeTarget counts frames delivered.
type fakeTarget struct {
	mu     sync.Mutex
	frames int
	disks  []DiskCompletion // CompleteDisk calls (Status unset)
}

func (f *fakeTarget) TimerDeadline() (int64, bool) { return 0, false }
func (f *fakeTarget) FireTimer(int64)              {}
func (f *fakeTarget) RxSpace() int                 { return 0 }
func (f *fakeTarget) Receive(byte)                 {}
func (f *fakeTarget) ReceiveFrame(int, []byte)     { f.mu.Lock(); f.frames++; f.mu.Unlock() }
func (f *fakeTarget) Pending() bool                { return false }
func (f *fakeTarget) CompleteDisk(disk int, seq uint64) (uint8, bool) {
	f.disks = append(f.disks, DiskCompletion{Disk: disk, Seq: seq})
	return 0, true
}
func (f *fakeTarget) Wake() <-chan struct{} { return nil }

// The LiveEnv holds at most LiveFramesQueued frames; more are dropped and
// counted. A source that fails reports it.
func TestLiveEnvFramesBounded(t *testing.T) {
	env := NewLiveEnv(nil)
	src := make(chanFrames)
	ended := make(chan error, 1)
	env.AddFrameSource(0, src, func(err error) { ended <- err })
	if err := env.Start(func() {}); err != nil {
		t.Fatal(err)
	}
	defer env.Stop()
	for range LiveFramesQueued + 5 {
		src <- make([]byte, 60)
	}
	close(src)
	if err := <-ended; !errors.Is(err, io.EOF) {
		t.Fatalf("source ended with %v", err)
	}
	if d := env.FramesDropped(); d != 5 {
		t.Fatalf("dropped %d, want 5", d)
	}
	tg := &fakeTarget{}
	if err := env.At(Point{}, tg); err != nil {
		t.Fatal(err)
	}
	if tg.frames != LiveFramesQueued {
		t.Fatalf("delivered %d frames, want %d", tg.frames, LiveFramesQueued)
	}
}

func TestNICConfigErrors(t *testing.T) {
	kernel := buildTestOS(t)
	for _, tc := range []struct {
		name string
		cfg  Config
		want string
	}{
		{"too many", Config{NICs: make([]NIC, 6)}, "at most 5 virtio devices"},
		{"multicast MAC", Config{NICs: []NIC{{MAC: net.HardwareAddr{1, 0, 0, 0, 0, 1}}}}, "not a 6-byte unicast"},
		{"short MAC", Config{NICs: []NIC{{MAC: net.HardwareAddr{2, 0, 0}}}}, "not a 6-byte unicast"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tc.cfg.Kernel, tc.cfg.MemSize = kernel, 64<<20
			m, err := New(tc.cfg)
			if err == nil {
				m.Close()
				t.Fatal("accepted")
			}
			var ne *NICError
			if !errors.As(err, &ne) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err %v, want a NICError with %q", err, tc.want)
			}
		})
	}
}

// TestCaptureInstallWithNIC captures a machine whose network interface
// holds received frames (no driver has posted buffers), carries the state
// through the stream encoding, and installs it: into a machine given the
// interface without a MAC (it adopts the captured one) with the same
// frames waiting and the same transport; a machine given another MAC or
// none is refused before anything is set.
func TestCaptureInstallWithNIC(t *testing.T) {
	mac := net.HardwareAddr{0x02, 0, 0x5e, 0, 0x53, 0x10}
	a, err := New(Config{Kernel: buildTestOS(t), MemSize: 64 << 20, WallClock: time.Unix(0, 0), NICs: []NIC{{MAC: mac, Tx: &txLog{}}}})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	frames := [][]byte{bytes.Repeat([]byte{1}, 60), bytes.Repeat([]byte{2}, devices.NetMaxFrame)}
	for _, f := range frames {
		a.ReceiveFrame(0, f)
	}
	var s snapshot.State
	if err := a.CaptureState(&s); err != nil {
		t.Fatal(err)
	}
	nics, err := snapshot.DecodeNICs(snapshot.EncodeNICs(nil, s.NICs), nil)
	if err != nil {
		t.Fatal(err)
	}
	s.NICs = nics
	if len(s.NICs) != 1 || net.HardwareAddr(s.NICs[0].MAC[:]).String() != mac.String() || len(s.NICs[0].Pending) != 2 ||
		!bytes.Equal(s.NICs[0].Pending[1], frames[1]) {
		t.Fatalf("captured %+v", s.NICs)
	}
	for _, tc := range []struct {
		name string
		nics []NIC
		want string
	}{
		{"none", nil, "captured with 1 network interface (02:00:5e:00:53:10); this machine was given no network interfaces"},
		{"other MAC", []NIC{{MAC: net.HardwareAddr{2, 0, 0, 0, 0, 9}}}, "given 1 network interface (02:00:00:00:00:09)"},
		{"two", []NIC{{}, {}}, "given 2 network interfaces"},
	} {
		m, err := NewEmpty(Config{MemSize: a.mem.Size(), NICs: tc.nics})
		if err != nil {
			t.Fatal(err)
		}
		err = m.Install(&s)
		var nm *NICMismatchError
		if !errors.As(err, &nm) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: Install: %v, want a NICMismatchError containing %q", tc.name, err, tc.want)
		}
		m.Close()
	}
	b, err := NewEmpty(Config{MemSize: a.mem.Size(), NICs: []NIC{{Tx: &txLog{}}}})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	copy(b.Memory(), a.Memory())
	if err := b.Install(&s); err != nil {
		t.Fatal(err)
	}
	as, bs := a.NICStats()[0], b.NICStats()[0]
	if bs.MAC != mac.String() || bs.Pending != 2 || b.nics[0].t.State() != a.nics[0].t.State() {
		t.Fatalf("installed: %+v; captured %+v", bs, as)
	}
	var s2 snapshot.State
	if err := b.CaptureState(&s2); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(snapshot.EncodeNICs(nil, s2.NICs), snapshot.EncodeNICs(nil, s.NICs)) {
		t.Fatal("the installed machine captures another interface state")
	}
}

// A LiveEnv delivers a disk completion at the first point after the I/O
// goroutine reported it, in the order reported, and wakes the vCPU for it.
func TestLiveEnvDeliversDiskCompletions(t *testing.T) {
	env := NewLiveEnv(nil)
	kicks := 0
	if err := env.Start(func() { kicks++ }); err != nil {
		t.Fatal(err)
	}
	defer env.Stop()
	tg := &fakeTarget{}
	if err := env.At(Point{}, tg); err != nil || len(tg.disks) != 0 {
		t.Fatalf("delivered %v before any report (%v)", tg.disks, err)
	}
	want := []DiskCompletion{{Disk: 1, Seq: 7}, {Disk: 0, Seq: 3}, {Disk: 1, Seq: 8}}
	for _, c := range want {
		env.DiskDone(DiskCompletion{Disk: c.Disk, Seq: c.Seq, Status: 1})
	}
	if kicks != len(want) {
		t.Fatalf("%d kicks for %d reports", kicks, len(want))
	}
	if err := env.At(Point{}, tg); err != nil || !reflect.DeepEqual(tg.disks, want) {
		t.Fatalf("delivered %v, want %v (%v)", tg.disks, want, err)
	}
	if err := env.At(Point{}, tg); err != nil || len(tg.disks) != len(want) {
		t.Fatalf("delivered again: %v (%v)", tg.disks, err)
	}
}
