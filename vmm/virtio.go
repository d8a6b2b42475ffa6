package vmm

import (
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/ftkvm/ftkvm/devices"
	"github.com/ftkvm/ftkvm/vmm/snapshot"
)

// virtio-mmio devices (docs/DEVICES.md): window n at virtioMMIOBase + n *
// 0x1000, on 8259 line virtioIRQs[n], described to the guest in the DSDT.

// Disk is a raw disk image for a virtio-blk device.
type Disk struct {
	Path     string
	ReadOnly bool
}

const virtioMMIOBase = 0xd0000000

// virtioIRQs are the 8259 lines free on ftkvm's PC (0 PIT, 1 keyboard, 2
// cascade, 4 COM1, 8 RTC, 9 SCI, 12 mouse, 13 FPU; 3, 6 and 7 are left to
// COM2, the floppy and the 8259's spurious IRQ 7).
var virtioIRQs = []int{5, 10, 11, 14, 15}

// virtioDev is one device in its window.
type virtioDev struct {
	base uint64
	irq  int
	t    *devices.MMIOTransport
	blk  *devices.Block     // for a disk
	img  *devices.DiskImage // closed with the machine
	net  *devices.Net       // for a network interface
	// adoptMAC: a network interface of a machine from NewEmpty given no
	// MAC: Install sets the captured one.
	adoptMAC bool
}

// guestMemory is guest RAM as devices see it: writes they make are marked
// dirty (dirty.go).
type guestMemory struct{ m *Machine }

func (g guestMemory) Bytes() []byte           { return g.m.mem.Bytes() }
func (g guestMemory) MarkDirty(gpa, n uint64) { g.m.MarkDirty(gpa, n) }

// wireVirtio opens the disks and puts a virtio-blk device for each in its
// window.
func (m *Machine) wireVirtio(cfg Config) error {
	if len(cfg.Disks)+len(cfg.NICs) == 0 {
		return nil
	}
	if len(cfg.Disks)+len(cfg.NICs) > len(virtioIRQs) {
		if len(cfg.NICs) > 0 {
			return &NICError{fmt.Errorf("%d disks and %d network interfaces: ftkvm has interrupt lines for at most %d virtio devices",
				len(cfg.Disks), len(cfg.NICs), len(virtioIRQs))}
		}
		return &DiskError{fmt.Errorf("%d disks: ftkvm has interrupt lines for at most %d virtio devices", len(cfg.Disks), len(virtioIRQs))}
	}
	if m.mem.Size() > virtioMMIOBase {
		if len(cfg.Disks) == 0 {
			return &NICError{fmt.Errorf("guest memory of %d MiB overlaps the virtio-mmio windows at %#x: use at most %d MiB with --net",
				m.mem.Size()>>20, virtioMMIOBase, virtioMMIOBase>>20)}
		}
		return &DiskError{fmt.Errorf("guest memory of %d MiB overlaps the virtio-mmio windows at %#x: use at most %d MiB with --disk or --net",
			m.mem.Size()>>20, virtioMMIOBase, virtioMMIOBase>>20)}
	}
	for i, d := range cfg.Disks {
		img, err := devices.OpenDiskImage(d.Path, d.ReadOnly)
		if err != nil {
			return &DiskError{err}
		}
		// The serial number is the disk's position: the same on every
		// replica, whatever the image's file name there.
		blk := devices.NewBlock(img, fmt.Sprintf("ftkvm-disk%d", i))
		if de, ok := m.env.(DiskEnvironment); ok {
			disk := i
			blk.SetAsync(func(seq uint64, status byte) {
				de.DiskDone(DiskCompletion{Disk: disk, Seq: seq, Status: status})
			})
		}
		v := &virtioDev{base: virtioMMIOBase + uint64(i)*devices.VirtioMMIOWindow, irq: virtioIRQs[i], blk: blk, img: img}
		m.virtio = append(m.virtio, v)
		v.t = devices.NewMMIOTransport(blk, guestMemory{m}, m.pic, v.irq)
		if err := m.mmio.Register(v.base, devices.VirtioMMIOWindow, fmt.Sprintf("virtio-blk%d", i), v.t); err != nil {
			return fmt.Errorf("wire disk %s: %w", d.Path, err)
		}
	}
	return m.wireNICs(cfg)
}

// DiskMismatchError is a state installed into a machine whose disks differ
// from those of the machine it was captured from (count, size, read-only
// flag). The images' contents are not in a state: the machine must be
// given the images as they were at the capture (docs/SNAPSHOTS.md).
type DiskMismatchError struct{ Msg string }

func (e *DiskMismatchError) Error() string { return e.Msg }

// DiskNextSeqs appends each disk's next request sequence number to dst, in
// the order of a state's Disks. On the vCPU thread, which alone numbers
// requests.
func (m *Machine) DiskNextSeqs(dst []uint64) []uint64 {
	for _, v := range m.virtio {
		if v.img != nil {
			dst = append(dst, v.blk.NextSeq())
		}
	}
	return dst
}

// CheckDisks compares the machine's disks with those a state recorded.
func (m *Machine) CheckDisks(want []snapshot.Disk) error {
	var have []string
	for _, v := range m.virtio {
		if v.img != nil {
			have = append(have, diskDesc(v.img.Size(), v.img.ReadOnly()))
		}
	}
	var rec []string
	for _, d := range want {
		rec = append(rec, diskDesc(d.Size, d.ReadOnly))
	}
	if slices.Equal(have, rec) {
		return nil
	}
	return &DiskMismatchError{fmt.Sprintf("the guest was captured with %s; this machine was given %s (pass the same --disk images, in order, as they were at the capture)",
		diskList(rec), diskList(have))}
}

func diskDesc(size uint64, ro bool) string {
	if ro {
		return fmt.Sprintf("%d bytes read-only", size)
	}
	return fmt.Sprintf("%d bytes read-write", size)
}

func diskList(d []string) string {
	switch len(d) {
	case 0:
		return "no disks"
	case 1:
		return "1 disk (" + d[0] + ")"
	}
	return fmt.Sprintf("%d disks (%s)", len(d), strings.Join(d, ", "))
}

// DiskInfo describes a disk image for the replicas' handshake.
type DiskInfo struct {
	Size     uint64
	ReadOnly bool
	Digest   [32]byte // SHA-256 of the contents
}

// DescribeDisks opens each image as the machine would (same checks), reads
// it whole for its SHA-256, and closes it. It costs a full read of every
// image (docs/REPLICATION.md).
func DescribeDisks(disks []Disk) ([]DiskInfo, error) {
	var out []DiskInfo
	for _, d := range disks {
		img, err := devices.OpenDiskImage(d.Path, d.ReadOnly)
		if err != nil {
			return nil, &DiskError{err}
		}
		sum, err := img.Digest()
		img.Close()
		if err != nil {
			return nil, &DiskError{err}
		}
		out = append(out, DiskInfo{Size: img.Size(), ReadOnly: d.ReadOnly, Digest: sum})
	}
	return out, nil
}

// DiskImages returns the machine's open disk images, in --disk order.
// Others may use them only while the vCPU is stopped and no request is in
// flight (SettleDisks): a replica sending or receiving images at a join,
// ft/doc.go.
func (m *Machine) DiskImages() []*devices.DiskImage {
	var out []*devices.DiskImage
	for _, v := range m.virtio {
		if v.img != nil {
			out = append(out, v.img)
		}
	}
	return out
}

// DiskError is a disk image that cannot be used (missing, unreadable, too
// small, in use).
type DiskError struct{ Err error }

func (e *DiskError) Error() string { return e.Err.Error() }
func (e *DiskError) Unwrap() error { return e.Err }

// closeVirtio closes the disk images, once the requests in flight are
// performed.
func (m *Machine) closeVirtio() error {
	var errs []error
	for _, v := range m.virtio {
		if v.img != nil {
			v.blk.Close()
			errs = append(errs, v.img.Close())
			v.img = nil
		}
	}
	return errors.Join(errs...)
}

// DiskStats is one disk's request counters (diagnostics).
type DiskStats struct {
	Path                                                     string
	Reads, Writes, Flushes, IOErrors, Unsupported, Malformed uint64
	DeviceErrors, Unhandled                                  uint64
}

// DiskStats returns the disks' counters. Call it when Run has returned or
// on the vCPU thread.
func (m *Machine) DiskStats() []DiskStats {
	var out []DiskStats
	for _, v := range m.virtio {
		if v.blk == nil {
			continue
		}
		b := v.blk
		out = append(out, DiskStats{
			Path: v.blk.Path(), Reads: b.Reads, Writes: b.Writes, Flushes: b.Flushes,
			IOErrors: b.IOErrors, Unsupported: b.Unsupported, Malformed: b.Malformed,
			DeviceErrors: v.t.Errors(), Unhandled: v.t.Unhandled(),
		})
	}
	return out
}

// disk is the virtio-blk device of disk i (Config.Disks order), or nil.
func (m *Machine) disk(i int) *virtioDev {
	if i < 0 || i >= len(m.virtio) || m.virtio[i].blk == nil {
		return nil
	}
	return m.virtio[i]
}

// CompleteDisk delivers a disk request's completion (Target): the device
// completes it in the guest's rings and interrupts the driver.
func (m *Machine) CompleteDisk(disk int, seq uint64) (uint8, bool) {
	v := m.disk(disk)
	if v == nil {
		return 0, false
	}
	status, ok := v.blk.Deliver(seq)
	if !ok {
		return 0, false
	}
	v.t.Service(0)
	m.point.Delivered = true
	return status, true
}

// WaitDisk waits until request seq of disk is performed (or returns at
// once if it is not in flight), without delivering it: a replica waits
// for its own I/O goroutine this way without holding its lock. Any
// goroutine.
func (m *Machine) WaitDisk(disk int, seq uint64) {
	if v := m.disk(disk); v != nil {
		v.blk.Wait(seq)
	}
}

// SettleDisks waits for every disk request in flight and completes them
// all in the guest now, in each disk's sequence order; those a driver not
// ready (or waiting for a reset) cannot take are dropped. It takes no
// request waiting in the rings: then no request is in flight, and the
// images hold every write the guest submitted. A capture calls it first
// (devices/virtio_blk.go); completions the environment delivers later for
// these requests do nothing. Once the capture is done (and a join's
// images copied), ServiceDisks takes the waiting requests; a machine the
// state is installed into does the same at the end of Install, at the
// same point of the guest's execution. vCPU thread, at a quiescent point.
func (m *Machine) SettleDisks() {
	for _, v := range m.virtio {
		if v.blk == nil || v.blk.Busy() == 0 {
			continue
		}
		v.blk.Settle()
		v.blk.SetHold(true)
		v.t.Service(0)
		v.blk.SetHold(false)
		v.blk.Drop()
	}
}

// ServiceDisks has each disk take the requests waiting in its ring (after
// a capture, SettleDisks). vCPU thread, or before Run.
func (m *Machine) ServiceDisks() {
	for _, v := range m.virtio {
		if v.blk != nil {
			v.t.Service(0)
		}
	}
}

// SettleDisksAlone is, for a machine whose delivery points no other run
// follows (its environment is not ExactPoints), SettleDisks repeated with
// ServiceDisks until no request is in flight or waiting: the state then
// has none, and the image, which goes with the state (a snapshot, a
// migration), holds all their writes. A replica's machine settles only at
// its checkpoints: a snapshot of it with requests in flight is refused
// (CaptureState) and can be tried again. vCPU thread, quiescent.
func (m *Machine) SettleDisksAlone() {
	if ep, ok := m.env.(ExactPoints); ok && ep.ExactPoints() {
		return
	}
	for range 256 / devices.BlockSlots * 2 {
		m.SettleDisks()
		m.ServiceDisks()
		if !m.disksBusy() {
			return
		}
	}
	m.SettleDisks()
}

// DiskInFlight calls fn for each disk request performed and not yet
// delivered: what a replica that takes over delivers itself (those still
// being performed reach the environment's DiskDone when they are). Any
// goroutine.
func (m *Machine) DiskInFlight(fn func(DiskCompletion)) {
	for i, v := range m.virtio {
		if v.blk != nil {
			v.blk.InFlight(func(seq uint64, status byte) { fn(DiskCompletion{Disk: i, Seq: seq, Status: status}) })
		}
	}
}

// disksBusy reports whether a disk request is in flight.
func (m *Machine) disksBusy() bool {
	for _, v := range m.virtio {
		if v.blk != nil && v.blk.Busy() > 0 {
			return true
		}
	}
	return false
}
