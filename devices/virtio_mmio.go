package devices

import (
	"encoding/binary"
	"errors"
)

// The virtio-mmio transport, version 2 register layout (virtio 1.2 §4.2.2).
// One MMIOTransport is one device's 0x200-byte window (registers below
// 0x100, device configuration space from 0x100); register it on the MMIO bus
// with size 0x1000, the window ftkvm reserves per device. Only modern
// devices are offered: VIRTIO_F_VERSION_1 is always among the features and a
// driver that does not accept it cannot set FEATURES_OK (§6.1).

// Register offsets (§4.2.2, Table "MMIO Device Register Layout").
const (
	VIRTIO_MMIO_MAGIC_VALUE         = 0x000
	VIRTIO_MMIO_VERSION             = 0x004
	VIRTIO_MMIO_DEVICE_ID           = 0x008
	VIRTIO_MMIO_VENDOR_ID           = 0x00c
	VIRTIO_MMIO_DEVICE_FEATURES     = 0x010
	VIRTIO_MMIO_DEVICE_FEATURES_SEL = 0x014
	VIRTIO_MMIO_DRIVER_FEATURES     = 0x020
	VIRTIO_MMIO_DRIVER_FEATURES_SEL = 0x024
	VIRTIO_MMIO_QUEUE_SEL           = 0x030
	VIRTIO_MMIO_QUEUE_NUM_MAX       = 0x034
	VIRTIO_MMIO_QUEUE_NUM           = 0x038
	VIRTIO_MMIO_QUEUE_READY         = 0x044
	VIRTIO_MMIO_QUEUE_NOTIFY        = 0x050
	VIRTIO_MMIO_INTERRUPT_STATUS    = 0x060
	VIRTIO_MMIO_INTERRUPT_ACK       = 0x064
	VIRTIO_MMIO_STATUS              = 0x070
	VIRTIO_MMIO_QUEUE_DESC_LOW      = 0x080
	VIRTIO_MMIO_QUEUE_DESC_HIGH     = 0x084
	VIRTIO_MMIO_QUEUE_DRIVER_LOW    = 0x090
	VIRTIO_MMIO_QUEUE_DRIVER_HIGH   = 0x094
	VIRTIO_MMIO_QUEUE_DEVICE_LOW    = 0x0a0
	VIRTIO_MMIO_QUEUE_DEVICE_HIGH   = 0x0a4
	VIRTIO_MMIO_SHM_SEL             = 0x0ac
	VIRTIO_MMIO_SHM_LEN_LOW         = 0x0b0
	VIRTIO_MMIO_SHM_LEN_HIGH        = 0x0b4
	VIRTIO_MMIO_SHM_BASE_LOW        = 0x0b8
	VIRTIO_MMIO_SHM_BASE_HIGH       = 0x0bc
	VIRTIO_MMIO_QUEUE_RESET         = 0x0c0
	VIRTIO_MMIO_CONFIG_GENERATION   = 0x0fc
	VIRTIO_MMIO_CONFIG              = 0x100

	virtioMMIOMagic   = 0x74726976 // "virt"
	virtioMMIOVersion = 2
	// VirtioVendorID is the vendor ID ftkvm's devices report ("FTKV" would
	// do as well; the spec leaves it to the device).
	VirtioVendorID = 0x564b5446 // "FTKV" little-endian

	// VirtioMMIOWindow is the window size ftkvm reserves per device.
	VirtioMMIOWindow = 0x1000
)

// Device status bits (§2.1).
const (
	VIRTIO_STATUS_ACKNOWLEDGE        = 1
	VIRTIO_STATUS_DRIVER             = 2
	VIRTIO_STATUS_DRIVER_OK          = 4
	VIRTIO_STATUS_FEATURES_OK        = 8
	VIRTIO_STATUS_DEVICE_NEEDS_RESET = 0x40
	VIRTIO_STATUS_FAILED             = 0x80
)

// Interrupt status bits (§4.2.2).
const (
	VIRTIO_MMIO_INT_VRING  = 1 // used buffer notification
	VIRTIO_MMIO_INT_CONFIG = 2 // configuration change notification
)

// Reserved feature bits (§6).
const (
	VIRTIO_RING_F_INDIRECT_DESC = 28
	VIRTIO_RING_F_EVENT_IDX     = 29
	VIRTIO_F_VERSION_1          = 32
)

// VirtioDevice is a device behind a transport.
type VirtioDevice interface {
	// DeviceID is the virtio device type (§5).
	DeviceID() uint32
	// Features are the device's feature bits; the transport adds
	// VIRTIO_F_VERSION_1.
	Features() uint64
	// QueueMax gives the largest size of each queue; its length is the
	// number of queues.
	QueueMax() []uint16
	// ReadConfig and WriteConfig access the device configuration space.
	ReadConfig(offset uint64, data []byte)
	WriteConfig(offset uint64, data []byte)
	// Notify serves queue index of queues after the driver notified it;
	// it reports whether it returned used buffers. An error wrapping
	// ErrVirtqueue is a device error: the transport sets
	// DEVICE_NEEDS_RESET and stops serving until the driver resets it.
	Notify(index int, q *Queue, mem GuestMemory) (bool, error)
	// Reset returns the device to its initial state (status written 0).
	Reset()
	// Unhandled counts the device's own unmodelled accesses.
	Unhandled() uint64
}

// MMIOTransport is one virtio-mmio register window.
type MMIOTransport struct {
	dev    VirtioDevice
	mem    GuestMemory
	irq    IRQ
	line   int
	queues []Queue

	status         uint8
	deviceFeatSel  uint32
	driverFeatSel  uint32
	driverFeatures uint64
	queueSel       uint32
	intStatus      uint32
	line_          bool // the level last driven on line

	unhandled uint64
	errors    uint64
}

// NewMMIOTransport puts dev behind a virtio-mmio window whose interrupt is
// ISA line on irq. mem is guest memory, for the queues.
func NewMMIOTransport(dev VirtioDevice, mem GuestMemory, irq IRQ, line int) *MMIOTransport {
	t := &MMIOTransport{dev: dev, mem: mem, irq: irq, line: line}
	for _, m := range dev.QueueMax() {
		t.queues = append(t.queues, Queue{Max: min(m, VirtqMaxSize)})
	}
	return t
}

// Unhandled counts accesses the transport does not model: unaligned or
// narrow register accesses, unknown registers, writes to read-only ones,
// writes at moments the spec forbids them, plus the device's own count.
func (t *MMIOTransport) Unhandled() uint64 { return t.unhandled + t.dev.Unhandled() }

// Errors counts device errors (malformed queues or chains) that set
// DEVICE_NEEDS_RESET.
func (t *MMIOTransport) Errors() uint64 { return t.errors }

// Status is the device status register.
func (t *MMIOTransport) Status() uint8 { return t.status }

// features is what the device offers.
func (t *MMIOTransport) features() uint64 { return t.dev.Features() | 1<<VIRTIO_F_VERSION_1 }

func (t *MMIOTransport) queue() *Queue {
	if int(t.queueSel) < len(t.queues) {
		return &t.queues[t.queueSel]
	}
	return nil
}

// Read implements Device.
func (t *MMIOTransport) Read(offset uint64, data []byte) {
	if offset >= VIRTIO_MMIO_CONFIG {
		t.dev.ReadConfig(offset-VIRTIO_MMIO_CONFIG, data)
		return
	}
	clear(data)
	if len(data) != 4 || offset%4 != 0 {
		t.unhandled++ // §4.2.2.2: registers are 32 bits wide and aligned
		return
	}
	var v uint32
	switch offset {
	case VIRTIO_MMIO_MAGIC_VALUE:
		v = virtioMMIOMagic
	case VIRTIO_MMIO_VERSION:
		v = virtioMMIOVersion
	case VIRTIO_MMIO_DEVICE_ID:
		v = t.dev.DeviceID()
	case VIRTIO_MMIO_VENDOR_ID:
		v = VirtioVendorID
	case VIRTIO_MMIO_DEVICE_FEATURES:
		if t.deviceFeatSel < 2 {
			v = uint32(t.features() >> (32 * t.deviceFeatSel))
		}
	case VIRTIO_MMIO_QUEUE_NUM_MAX:
		if q := t.queue(); q != nil {
			v = uint32(q.Max)
		}
	case VIRTIO_MMIO_QUEUE_READY:
		if q := t.queue(); q != nil && q.Ready {
			v = 1
		}
	case VIRTIO_MMIO_INTERRUPT_STATUS:
		v = t.intStatus
	case VIRTIO_MMIO_STATUS:
		v = uint32(t.status)
	case VIRTIO_MMIO_QUEUE_DESC_LOW, VIRTIO_MMIO_QUEUE_DESC_HIGH,
		VIRTIO_MMIO_QUEUE_DRIVER_LOW, VIRTIO_MMIO_QUEUE_DRIVER_HIGH,
		VIRTIO_MMIO_QUEUE_DEVICE_LOW, VIRTIO_MMIO_QUEUE_DEVICE_HIGH:
		if q := t.queue(); q != nil {
			v = uint32(*t.queueAddr(q, offset) >> (32 * (offset / 4 % 2)))
		}
	case VIRTIO_MMIO_SHM_LEN_LOW, VIRTIO_MMIO_SHM_LEN_HIGH:
		v = 0xffffffff // no shared memory regions (§4.2.2: length -1)
	case VIRTIO_MMIO_SHM_BASE_LOW, VIRTIO_MMIO_SHM_BASE_HIGH:
		v = 0xffffffff
	case VIRTIO_MMIO_QUEUE_RESET:
		v = 0 // VIRTIO_F_RING_RESET is not offered
	case VIRTIO_MMIO_CONFIG_GENERATION:
		v = 0 // the configuration never changes while the device runs
	default:
		t.unhandled++ // write-only or reserved
	}
	binary.LittleEndian.PutUint32(data, v)
}

// queueAddr returns the field of q a QUEUE_{DESC,DRIVER,DEVICE}_{LOW,HIGH}
// offset names.
func (t *MMIOTransport) queueAddr(q *Queue, offset uint64) *uint64 {
	switch offset &^ 7 {
	case VIRTIO_MMIO_QUEUE_DESC_LOW:
		return &q.Desc
	case VIRTIO_MMIO_QUEUE_DRIVER_LOW:
		return &q.Avail
	}
	return &q.Used
}

// Write implements Device.
func (t *MMIOTransport) Write(offset uint64, data []byte) {
	if offset >= VIRTIO_MMIO_CONFIG {
		if t.status&VIRTIO_STATUS_FAILED != 0 {
			t.unhandled++
			return
		}
		t.dev.WriteConfig(offset-VIRTIO_MMIO_CONFIG, data)
		return
	}
	if len(data) != 4 || offset%4 != 0 {
		t.unhandled++
		return
	}
	v := binary.LittleEndian.Uint32(data)
	switch offset {
	case VIRTIO_MMIO_DEVICE_FEATURES_SEL:
		t.deviceFeatSel = v
	case VIRTIO_MMIO_DRIVER_FEATURES_SEL:
		t.driverFeatSel = v
	case VIRTIO_MMIO_DRIVER_FEATURES:
		// Only while negotiating (§3.1.1 steps 4-5).
		if t.status&VIRTIO_STATUS_FEATURES_OK != 0 || t.driverFeatSel >= 2 {
			t.unhandled++
			return
		}
		sh := 32 * t.driverFeatSel
		t.driverFeatures = t.driverFeatures&^(0xffffffff<<sh) | uint64(v)<<sh
	case VIRTIO_MMIO_QUEUE_SEL:
		t.queueSel = v
	case VIRTIO_MMIO_QUEUE_NUM:
		if q := t.queue(); q != nil && !q.Ready {
			q.Size = uint16(min(v, 0xffff))
			if v > 0xffff {
				q.Size = 0 // refused when the queue is used
			}
		} else {
			t.unhandled++
		}
	case VIRTIO_MMIO_QUEUE_READY:
		q := t.queue()
		if q == nil {
			t.unhandled++
			return
		}
		ready := v&1 != 0
		if ready && !q.Ready {
			// A queue (re)enabled starts at the beginning of its
			// rings, which the driver has just zeroed (§2.7.13.1).
			q.LastAvail, q.UsedIdx = 0, 0
		}
		q.Ready = ready
	case VIRTIO_MMIO_QUEUE_DESC_LOW, VIRTIO_MMIO_QUEUE_DESC_HIGH,
		VIRTIO_MMIO_QUEUE_DRIVER_LOW, VIRTIO_MMIO_QUEUE_DRIVER_HIGH,
		VIRTIO_MMIO_QUEUE_DEVICE_LOW, VIRTIO_MMIO_QUEUE_DEVICE_HIGH:
		q := t.queue()
		if q == nil || q.Ready {
			t.unhandled++ // §4.2.2.3: only while the queue is not ready
			return
		}
		p := t.queueAddr(q, offset)
		sh := 32 * (offset / 4 % 2)
		*p = *p&^(0xffffffff<<sh) | uint64(v)<<sh
	case VIRTIO_MMIO_QUEUE_NOTIFY:
		t.notify(v)
	case VIRTIO_MMIO_INTERRUPT_ACK:
		t.intStatus &^= v
		t.updateIRQ()
	case VIRTIO_MMIO_STATUS:
		t.setStatus(uint8(v))
	case VIRTIO_MMIO_SHM_SEL, VIRTIO_MMIO_QUEUE_RESET:
		// SHM_SEL selects among no regions; QUEUE_RESET needs
		// VIRTIO_F_RING_RESET, not offered.
		t.unhandled++
	default:
		t.unhandled++ // read-only or reserved
	}
}

// setStatus handles a write of the device status (§2.1, §3.1.1).
func (t *MMIOTransport) setStatus(v uint8) {
	if v == 0 {
		t.reset()
		return
	}
	if v&^t.status&VIRTIO_STATUS_FEATURES_OK != 0 {
		// FEATURES_OK is kept only for features the device offers,
		// VERSION_1 among them (§2.2.2, §6.1).
		f := t.driverFeatures
		if f&^t.features() != 0 || f&(1<<VIRTIO_F_VERSION_1) == 0 {
			v &^= VIRTIO_STATUS_FEATURES_OK
		}
	}
	// The driver cannot clear bits it set, except by a reset, nor set
	// DEVICE_NEEDS_RESET.
	keep := t.status & VIRTIO_STATUS_DEVICE_NEEDS_RESET
	if t.status&^v&^VIRTIO_STATUS_DEVICE_NEEDS_RESET != 0 {
		t.unhandled++
	}
	t.status = t.status | v&^VIRTIO_STATUS_DEVICE_NEEDS_RESET | keep
}

// reset is a device reset: status 0, queues unconfigured, interrupt low.
func (t *MMIOTransport) reset() {
	t.dev.Reset()
	for i := range t.queues {
		t.queues[i].reset()
	}
	t.status, t.deviceFeatSel, t.driverFeatSel, t.driverFeatures, t.queueSel = 0, 0, 0, 0, 0
	t.intStatus = 0
	t.updateIRQ()
}

// notify serves a QueueNotify write. Notifications count only once the
// driver is ready (DRIVER_OK) and the device is not waiting for a reset.
func (t *MMIOTransport) notify(index uint32) {
	if t.status&VIRTIO_STATUS_DRIVER_OK == 0 || t.status&(VIRTIO_STATUS_DEVICE_NEEDS_RESET|VIRTIO_STATUS_FAILED) != 0 ||
		int(index) >= len(t.queues) || !t.queues[index].Ready {
		t.unhandled++
		return
	}
	t.serve(int(index))
}

// Service lets the device serve queue index on its own initiative, as
// after a driver notification: a virtio-net device places a frame the
// environment delivered into the receive queue this way. Before the driver
// is ready, or while the device waits for a reset, it does nothing (the
// device keeps the event for a later notification).
func (t *MMIOTransport) Service(index int) {
	if t.status&VIRTIO_STATUS_DRIVER_OK == 0 || t.status&(VIRTIO_STATUS_DEVICE_NEEDS_RESET|VIRTIO_STATUS_FAILED) != 0 ||
		index < 0 || index >= len(t.queues) || !t.queues[index].Ready {
		return
	}
	t.serve(index)
}

// serve has the device serve a ready queue and interrupts the driver if it
// returned used buffers and wants to hear of them.
func (t *MMIOTransport) serve(index int) {
	q := &t.queues[index]
	used, err := t.dev.Notify(index, q, t.mem)
	if err != nil {
		t.deviceError(err)
		return
	}
	if used && q.WantsInterrupt(t.mem) {
		t.intStatus |= VIRTIO_MMIO_INT_VRING
		t.updateIRQ()
	}
}

// deviceError sets DEVICE_NEEDS_RESET and notifies a configuration change
// (§2.1.2): the driver must reset the device.
func (t *MMIOTransport) deviceError(err error) {
	if !errors.Is(err, ErrVirtqueue) {
		t.unhandled++
	}
	t.errors++
	t.status |= VIRTIO_STATUS_DEVICE_NEEDS_RESET
	t.intStatus |= VIRTIO_MMIO_INT_CONFIG
	t.updateIRQ()
}

// updateIRQ drives the line high while an interrupt status bit is set. The
// line is declared edge-triggered in ACPI: a new edge comes only after the
// driver acknowledged everything, which is when it looks again.
func (t *MMIOTransport) updateIRQ() {
	level := t.intStatus != 0
	if level != t.line_ {
		t.line_ = level
		t.irq.SetIRQ(t.line, level)
	}
}

// MMIOTransportState is the transport's state (queues up to
// MaxVirtioQueues).
type MMIOTransportState struct {
	Status         uint8
	DeviceFeatSel  uint32
	DriverFeatSel  uint32
	DriverFeatures uint64
	QueueSel       uint32
	IntStatus      uint32
	Line           bool
	NumQueues      uint32
	Queues         [MaxVirtioQueues]Queue
}

// MaxVirtioQueues bounds the queues a transport's state carries.
const MaxVirtioQueues = 8

// State returns the transport's state; a device's own state is separate.
func (t *MMIOTransport) State() MMIOTransportState {
	s := MMIOTransportState{
		Status: t.status, DeviceFeatSel: t.deviceFeatSel, DriverFeatSel: t.driverFeatSel,
		DriverFeatures: t.driverFeatures, QueueSel: t.queueSel, IntStatus: t.intStatus,
		Line: t.line_, NumQueues: uint32(len(t.queues)),
	}
	copy(s.Queues[:], t.queues)
	return s
}

// SetState restores a state from State of a transport with the same queues.
func (t *MMIOTransport) SetState(s MMIOTransportState) error {
	if int(s.NumQueues) != len(t.queues) || len(t.queues) > MaxVirtioQueues {
		return errors.New("virtio-mmio state: queue count differs")
	}
	for i := range t.queues {
		if s.Queues[i].Max != t.queues[i].Max {
			return errors.New("virtio-mmio state: queue size limit differs")
		}
	}
	t.status, t.deviceFeatSel, t.driverFeatSel = s.Status, s.DeviceFeatSel, s.DriverFeatSel
	t.driverFeatures, t.queueSel, t.intStatus, t.line_ = s.DriverFeatures, s.QueueSel, s.IntStatus, s.Line
	copy(t.queues, s.Queues[:])
	return nil
}
