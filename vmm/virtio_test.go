package vmm

import (
	"bytes"
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/ftkvm/ftkvm/devices"
	"github.com/ftkvm/ftkvm/vmm/snapshot"
)

// newDiskMachine is a testos machine with one disk whose sector i holds
// byte i; it does not run the guest: the tests play the guest's driver
// through the buses, as firmwareInit plays firmware.
func newDiskMachine(t *testing.T) (*Machine, string) {
	t.Helper()
	p := filepath.Join(t.TempDir(), "disk.img")
	data := make([]byte, 64*512)
	for i := range data {
		data[i] = byte(i / 512)
	}
	if err := os.WriteFile(p, data, 0o600); err != nil {
		t.Fatal(err)
	}
	m, err := New(Config{Kernel: buildTestOS(t), MemSize: 64 << 20, WallClock: time.Unix(0, 0),
		Disks: []Disk{{Path: p}}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	return m, p
}

func (m *Machine) testMMIO32(addr uint64, v uint32) {
	var b [4]byte
	binary.LittleEndian.PutUint32(b[:], v)
	m.mmio.Write(addr, b[:])
}

// TestVirtioBlockWritesAreDirty reads a sector through the virtio-blk
// device of a real machine and checks that KVM's dirty log, as the machine
// reports it, names every page the device wrote: the data buffer, the
// status byte and the used ring.
func TestVirtioBlockWritesAreDirty(t *testing.T) {
	m, _ := newDiskMachine(t)
	if err := m.EnableDirtyLog(); err != nil {
		t.Fatal(err)
	}
	bitmap := make([]uint64, m.BitmapWords())
	const (
		desc, avail, used = 40 << 20, 40<<20 + 0x1000, 40<<20 + 0x2000
		hdr, data, status = 41 << 20, 42 << 20, 43 << 20
	)
	mem := m.Memory()
	le := binary.LittleEndian
	// Header: VIRTIO_BLK_T_IN of sector 7; descriptors 0 (header), 1
	// (512 bytes of data), 2 (status).
	le.PutUint32(mem[hdr:], devices.VIRTIO_BLK_T_IN)
	le.PutUint64(mem[hdr+8:], 7)
	for i, d := range []struct {
		addr  uint64
		n     uint32
		flags uint16
	}{
		{hdr, 16, devices.VIRTQ_DESC_F_NEXT},
		{data, 512, devices.VIRTQ_DESC_F_NEXT | devices.VIRTQ_DESC_F_WRITE},
		{status, 1, devices.VIRTQ_DESC_F_WRITE},
	} {
		e := mem[desc+16*i:]
		le.PutUint64(e, d.addr)
		le.PutUint32(e[8:], d.n)
		le.PutUint16(e[12:], d.flags)
		le.PutUint16(e[14:], uint16(i+1))
	}
	le.PutUint16(mem[avail+4:], 0) // ring[0] = head 0
	le.PutUint16(mem[avail+2:], 1) // idx
	mem[status] = 0xee
	if _, err := m.DirtyLog(bitmap); err != nil { // start a new interval
		t.Fatal(err)
	}

	base := uint64(virtioMMIOBase)
	var b [4]byte
	m.mmio.Read(base+devices.VIRTIO_MMIO_MAGIC_VALUE, b[:])
	if le.Uint32(b[:]) != 0x74726976 {
		t.Fatalf("no virtio-mmio device at %#x", base)
	}
	for _, w := range []struct {
		off uint64
		v   uint32
	}{
		{devices.VIRTIO_MMIO_STATUS, 0},
		{devices.VIRTIO_MMIO_STATUS, 3},
		{devices.VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1},
		{devices.VIRTIO_MMIO_DRIVER_FEATURES, 1}, // VIRTIO_F_VERSION_1
		{devices.VIRTIO_MMIO_STATUS, 11},
		{devices.VIRTIO_MMIO_QUEUE_SEL, 0},
		{devices.VIRTIO_MMIO_QUEUE_NUM, 16},
		{devices.VIRTIO_MMIO_QUEUE_DESC_LOW, desc},
		{devices.VIRTIO_MMIO_QUEUE_DRIVER_LOW, avail},
		{devices.VIRTIO_MMIO_QUEUE_DEVICE_LOW, used},
		{devices.VIRTIO_MMIO_QUEUE_READY, 1},
		{devices.VIRTIO_MMIO_STATUS, 15},
		{devices.VIRTIO_MMIO_QUEUE_NOTIFY, 0},
	} {
		m.testMMIO32(base+w.off, w.v)
	}
	// Performed off the vCPU thread; completed when delivered (here as
	// a capture does, SettleDisks).
	if mem[status] != 0xee || le.Uint16(mem[used+2:]) != 0 {
		t.Fatalf("read request completed before its delivery: status %d", mem[status])
	}
	m.SettleDisks()
	if mem[status] != devices.VIRTIO_BLK_S_OK || !bytes.Equal(mem[data:data+512], bytes.Repeat([]byte{7}, 512)) {
		t.Fatalf("read request: status %d, data starts % x", mem[status], mem[data:data+4])
	}
	if le.Uint16(mem[used+2:]) != 1 {
		t.Fatal("used index not advanced")
	}
	if _, err := m.DirtyLog(bitmap); err != nil {
		t.Fatal(err)
	}
	for _, gpa := range []uint64{data, status, used} {
		p := gpa / snapshot.PageSize
		if bitmap[p/64]&(1<<(p%64)) == 0 {
			t.Errorf("page of %#x written by the device is not in the dirty log", gpa)
		}
	}
	// The request raised the device's line on the PIC (IRQ 5, masked
	// by the firmware state: requested, not yet deliverable).
	if ds := m.DiskStats(); len(ds) != 1 || ds[0].Reads != 1 || ds[0].Unhandled != 0 {
		t.Fatalf("disk stats %+v", ds)
	}
}

// TestACPIInGuestMemory checks that a booted machine carries the RSDP at
// 0xe0000, that PVH's start info points at it, and that S5 through the
// PM1a control block stops the machine as a power-off.
func TestACPIInGuestMemory(t *testing.T) {
	m, _ := newDiskMachine(t)
	mem := m.Memory()
	if string(mem[acpiTablesAddr:acpiTablesAddr+8]) != "RSD PTR " {
		t.Fatalf("no RSDP at %#x", acpiTablesAddr)
	}
	// testos is a PVH kernel: hvm_start_info at %rbx = 0x6000,
	// rsdp_paddr at offset 32.
	if got := binary.LittleEndian.Uint64(mem[0x6000+32:]); got != acpiTablesAddr {
		t.Fatalf("start info rsdp_paddr = %#x", got)
	}
	if !bytes.Contains(mem[acpiTablesAddr:0x100000], []byte("LNRO0005")) {
		t.Fatal("the DSDT does not describe the disk")
	}
	var w [2]byte
	binary.LittleEndian.PutUint16(w[:], devices.ACPISlpTypS5<<10|devices.PM1_CNT_SLP_EN)
	m.pio.Write(acpiPMPort+4, w[:])
	if !m.stopped || m.exitStatus != 0 || m.StopReason() != "guest powered off (ACPI S5)" {
		t.Fatalf("after S5: stopped %v status %d reason %q", m.stopped, m.exitStatus, m.StopReason())
	}
}

// testBlkDriver plays a virtio-blk driver on a machine's first disk
// through the MMIO bus, with its queue and buffers at fixed guest
// addresses (above testos).
type testBlkDriver struct {
	m    *Machine
	next uint16 // requests submitted
}

const (
	tbDesc, tbAvail, tbUsed = 40 << 20, 40<<20 + 0x1000, 40<<20 + 0x2000
	tbHdr, tbData, tbStatus = 41 << 20, 42 << 20, 43 << 20
)

func (d *testBlkDriver) setup() {
	base := uint64(virtioMMIOBase)
	for _, w := range []struct {
		off uint64
		v   uint32
	}{
		{devices.VIRTIO_MMIO_STATUS, 0},
		{devices.VIRTIO_MMIO_STATUS, 3},
		{devices.VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1},
		{devices.VIRTIO_MMIO_DRIVER_FEATURES, 1}, // VIRTIO_F_VERSION_1
		{devices.VIRTIO_MMIO_STATUS, 11},
		{devices.VIRTIO_MMIO_QUEUE_SEL, 0},
		{devices.VIRTIO_MMIO_QUEUE_NUM, 16},
		{devices.VIRTIO_MMIO_QUEUE_DESC_LOW, tbDesc},
		{devices.VIRTIO_MMIO_QUEUE_DRIVER_LOW, tbAvail},
		{devices.VIRTIO_MMIO_QUEUE_DEVICE_LOW, tbUsed},
		{devices.VIRTIO_MMIO_QUEUE_READY, 1},
		{devices.VIRTIO_MMIO_STATUS, 15},
	} {
		d.m.testMMIO32(base+w.off, w.v)
	}
}

// request submits one request of n data bytes (sector at sector) and
// returns its status byte.
func (d *testBlkDriver) request(t *testing.T, typ uint32, sector uint64, n uint32) byte {
	t.Helper()
	mem := d.m.Memory()
	le := binary.LittleEndian
	le.PutUint32(mem[tbHdr:], typ)
	le.PutUint64(mem[tbHdr+8:], sector)
	var flags uint16
	if typ == devices.VIRTIO_BLK_T_IN {
		flags = devices.VIRTQ_DESC_F_WRITE
	}
	first := 3 * (d.next % 5)
	for i, e := range []struct {
		addr  uint64
		n     uint32
		flags uint16
	}{
		{tbHdr, 16, devices.VIRTQ_DESC_F_NEXT},
		{tbData, n, devices.VIRTQ_DESC_F_NEXT | flags},
		{tbStatus, 1, devices.VIRTQ_DESC_F_WRITE},
	} {
		p := mem[tbDesc+16*uint64(first+uint16(i)):]
		le.PutUint64(p, e.addr)
		le.PutUint32(p[8:], e.n)
		le.PutUint16(p[12:], e.flags)
		le.PutUint16(p[14:], first+uint16(i)+1)
	}
	le.PutUint16(mem[tbAvail+4+2*uint64(d.next%16):], first)
	d.next++
	le.PutUint16(mem[tbAvail+2:], d.next)
	mem[tbStatus] = 0xee
	d.m.testMMIO32(virtioMMIOBase+devices.VIRTIO_MMIO_QUEUE_NOTIFY, 0)
	// The request completes only when the environment delivers it.
	if got := le.Uint16(mem[tbUsed+2:]); got != d.next-1 || mem[tbStatus] != 0xee {
		t.Fatalf("used index %d, status %#x before the completion of request %d was delivered", got, mem[tbStatus], d.next)
	}
	seq := d.m.virtio[0].blk.NextSeq() - 1
	if _, ok := d.m.CompleteDisk(0, seq); !ok {
		t.Fatalf("request %d (seq %d) not in flight", d.next, seq)
	}
	if _, ok := d.m.CompleteDisk(0, seq); ok {
		t.Fatalf("request %d (seq %d) completed twice", d.next, seq)
	}
	if got := le.Uint16(mem[tbUsed+2:]); got != d.next {
		t.Fatalf("used index %d after request %d", got, d.next)
	}
	d.m.testMMIO32(virtioMMIOBase+devices.VIRTIO_MMIO_INTERRUPT_ACK, devices.VIRTIO_MMIO_INT_VRING)
	return mem[tbStatus]
}

// TestCaptureInstallWithDisk captures a machine whose disk the (played)
// driver has configured and used, installs the state into an empty
// machine given a copy of the image as it was at the capture, and checks
// that the next requests leave both machines' memory, images and device
// state identical.
func TestCaptureInstallWithDisk(t *testing.T) {
	a, path := newDiskMachine(t)
	da := &testBlkDriver{m: a}
	da.setup()
	memA := a.Memory()
	for i := range 512 {
		memA[tbData+i] = 0x5a
	}
	if st := da.request(t, devices.VIRTIO_BLK_T_OUT, 2, 512); st != devices.VIRTIO_BLK_S_OK {
		t.Fatalf("write: status %d", st)
	}

	var s snapshot.State
	if err := a.CaptureState(&s); err != nil {
		t.Fatal(err)
	}
	if len(s.Disks) != 1 || s.Disks[0].Size != 64*512 || s.Disks[0].ReadOnly || s.Disks[0].Transport.Status != 15 ||
		s.Disks[0].Transport.Queues[0].LastAvail != 1 || s.Disks[0].NextSeq != 1 {
		t.Fatalf("captured disks %+v", s.Disks)
	}
	// Through the stream encoding, as a snapshot file carries it.
	disks, err := snapshot.DecodeDisks(snapshot.EncodeDisks(nil, s.Disks), nil)
	if err != nil {
		t.Fatal(err)
	}
	s.Disks = disks
	img, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	copyPath := filepath.Join(t.TempDir(), "copy.img")
	if err := os.WriteFile(copyPath, img, 0o600); err != nil {
		t.Fatal(err)
	}

	// Refusals first: other disks than the captured machine's.
	other := filepath.Join(t.TempDir(), "small.img")
	if err := os.WriteFile(other, make([]byte, 32*512), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name  string
		disks []Disk
		want  string
	}{
		{"no disk", nil, "the guest was captured with 1 disk (32768 bytes read-write); this machine was given no disks"},
		{"other size", []Disk{{Path: other}}, "given 1 disk (16384 bytes read-write)"},
		{"read-only", []Disk{{Path: copyPath, ReadOnly: true}}, "given 1 disk (32768 bytes read-only)"},
		{"two disks", []Disk{{Path: copyPath, ReadOnly: true}, {Path: other, ReadOnly: true}}, "given 2 disks"},
	} {
		m, err := NewEmpty(Config{MemSize: a.mem.Size(), Disks: tc.disks})
		if err != nil {
			t.Fatal(err)
		}
		err = m.Install(&s)
		var dm *DiskMismatchError
		if !errors.As(err, &dm) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: Install: %v, want a DiskMismatchError containing %q", tc.name, err, tc.want)
		}
		m.Close()
	}

	b, err := NewEmpty(Config{MemSize: a.mem.Size(), Disks: []Disk{{Path: copyPath}}})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	copy(b.Memory(), memA)
	if err := b.Install(&s); err != nil {
		t.Fatal(err)
	}
	db := &testBlkDriver{m: b, next: da.next}
	for _, d := range []*testBlkDriver{da, db} {
		mem := d.m.Memory()
		for i := range 1024 {
			mem[tbData+i] = byte(i * 3)
		}
		if st := d.request(t, devices.VIRTIO_BLK_T_OUT, 9, 1024); st != devices.VIRTIO_BLK_S_OK {
			t.Fatalf("write after install: status %d", st)
		}
		if st := d.request(t, devices.VIRTIO_BLK_T_IN, 2, 512); st != devices.VIRTIO_BLK_S_OK || mem[tbData] != 0x5a {
			t.Fatalf("read after install: status %d, data %#x", st, mem[tbData])
		}
		if st := d.request(t, devices.VIRTIO_BLK_T_FLUSH, 0, 0); st != devices.VIRTIO_BLK_S_OK {
			t.Fatalf("flush after install: status %d", st)
		}
	}
	if !bytes.Equal(a.Memory(), b.Memory()) {
		t.Error("guest memory differs after the same requests")
	}
	var sa, sb snapshot.State
	if err := a.CaptureState(&sa); err != nil {
		t.Fatal(err)
	}
	if err := b.CaptureState(&sb); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(sa.Disks, sb.Disks) || sa.Devices != sb.Devices {
		t.Errorf("device states differ after the same requests:\n%+v\n%+v", sa.Disks, sb.Disks)
	}
	ia, _ := os.ReadFile(path)
	ib, _ := os.ReadFile(copyPath)
	if !bytes.Equal(ia, ib) {
		t.Error("images differ after the same requests")
	}
}
