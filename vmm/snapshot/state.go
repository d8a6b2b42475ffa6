package snapshot

import (
	"encoding/binary"
	"fmt"

	"github.com/ftkvm/ftkvm/devices"
	"github.com/ftkvm/ftkvm/kvm"
)

// PageSize is the guest page size the format (and KVM's dirty log) uses.
const PageSize = 4096

// Limits the decoders enforce.
const (
	MaxMemSize       = 1 << 40 // 1 TiB
	MaxCPUIDEntries  = 256
	MaxMSRs          = 1024
	MaxInput         = 1 << 20 // pending console input carried by the environment state
	MaxPagesPerFrame = 256     // pages frame: 256 pages, 1 MiB of data
	MaxZeroPerFrame  = 8192    // zero-pages frame: 64 KiB of page numbers
	MaxDisks         = 16      // disks frame
	MaxNICs          = 16      // network interfaces frame
)

// Kind says what a stream was made for. It does not change how it is read.
type Kind uint32

const (
	KindSnapshot   Kind = 1
	KindMigration  Kind = 2
	KindCheckpoint Kind = 3
)

func (k Kind) String() string {
	switch k {
	case KindSnapshot:
		return "snapshot"
	case KindMigration:
		return "migration"
	case KindCheckpoint:
		return "checkpoint"
	}
	return fmt.Sprintf("kind %d", uint32(k))
}

// Header opens a stream.
type Header struct {
	Version uint32 // = Version
	Kind    Kind
	MemSize uint64 // guest memory in bytes, a multiple of 2 MiB
	Created int64  // Unix ns when the stream was started (informational)
}

// State is a guest's complete state apart from its memory.
type State struct {
	Header  Header
	CPUID   []kvm.CPUIDEntry
	VCPU    VCPU
	Devices Devices
	Disks   []Disk // virtio-blk devices, in order
	NICs    []NIC  // virtio-net devices, in order
	Machine Machine
	Env     Env
}

// VCPU is every register set KVM exposes for a vCPU without an in-kernel
// irqchip. FPU duplicates part of XSave; XSave is the one restored last
// (KVM_SET_FPU ignores MXCSR).
type VCPU struct {
	Regs      kvm.Regs
	Sregs     kvm.Sregs
	FPU       kvm.FPU
	XSave     kvm.XSave
	XCRs      kvm.XCRs
	Events    kvm.VCPUEvents
	DebugRegs kvm.DebugRegs
	MPState   kvm.MPState
	MSRs      []kvm.MSREntry
}

// Devices is the state of every device model.
type Devices struct {
	PIC       devices.PICState
	PIT       devices.PITState
	UART      devices.UARTState
	RTC       devices.RTCState
	Reset     devices.ResetControlState
	I8042     devices.I8042State
	DebugExit devices.DebugExitState
	ACPIPM    devices.ACPIPMState
}

// Disk is one virtio-blk device: its virtio-mmio transport (status,
// negotiated features, each queue's configuration and the device's
// positions in its rings) and what the image it was given looked like.
// The image's contents are not part of a stream: the image is the guest's
// disk, which the machine the state is installed into must be given in
// the state it had at the capture (docs/SNAPSHOTS.md).
//
// No request is in flight in a state (a capture settles them first:
// devices/virtio_blk.go); NextSeq is the sequence number the device gives
// its next request, which logs and completions name requests by.
type Disk struct {
	Size      uint64 // image size in bytes
	ReadOnly  bool
	Transport devices.MMIOTransportState
	NextSeq   uint64
}

// NIC is one virtio-net device: its address, its virtio-mmio transport
// and the received frames waiting for receive chains (devices.NetState).
type NIC struct {
	MAC       [6]byte
	Transport devices.MMIOTransportState
	Pending   [][]byte
}

// Stats counts what the vCPU loop did (vmm.Stats is this type). Points are
// kept apart by kind: guest-caused exits can be found again by a replica,
// kicks cannot.
type Stats struct {
	Exits        uint64 `json:"exits"` // guest-caused exits: replayable points
	Kicks        uint64 `json:"kicks"` // forced returns from KVM_RUN: non-replayable points
	IOExits      uint64 `json:"io_exits"`
	MMIOExits    uint64 `json:"mmio_exits"`
	HaltExits    uint64 `json:"halt_exits"`
	WindowExits  uint64 `json:"window_exits"`
	MSRExits     uint64 `json:"msr_exits"`
	Injected     uint64 `json:"injected"`      // interrupts injected with KVM_INTERRUPT
	TimerEvents  uint64 `json:"timer_events"`  // PIT ticks delivered
	InputBytes   uint64 `json:"input_bytes"`   // UART bytes delivered
	KickTimer    uint64 `json:"kick_timer"`    // timer events delivered at a kick point
	ConsoleBytes uint64 `json:"console_bytes"` // bytes the guest wrote to its console
	// The step clock (vmm.EpochStep); all three stay 0 with the exit clock.
	Steps uint64 `json:"steps"` // guest instructions retired: single-stepped by KVM or emulated
	// Instrs is the second component of the position: instructions retired
	// since the last guest-caused exit (vmm.Point.Instrs). It is kept here
	// so that a snapshot or checkpoint resumes counting where it stopped.
	Instrs   uint64 `json:"instrs"`
	Emulated uint64 `json:"emulated"` // RDTSC/RDTSCP/RDPID the step clock emulated, and the #UD/#GP it raised instead
}

// Machine is the VMM's own state around the vCPU.
type Machine struct {
	TSCOffset uint64 // the guest's TSC MSR reads TSCOffset + virtual ns
	// Halted: the guest executed HLT with interrupts enabled and waits for
	// an interrupt; the machine must not re-enter it until one is pending.
	Halted bool
	// RequestInterruptWindow is kvm_run's flag as the loop left it.
	RequestInterruptWindow bool
	PointKind              uint8  // vmm.PointKind of the last delivery point
	PointExits             uint64 // its position (guest-caused exits); Stats.Instrs is the rest of it
	Stats                  Stats
}

// Env is the environment's own state.
type Env struct {
	Now   int64  // virtual time in ns when the state was taken
	Input []byte // console input received but not yet delivered to the guest
}

var le = binary.LittleEndian

// EncodeHeader appends h's payload to dst.
func EncodeHeader(dst []byte, h *Header) []byte {
	return mustAppend(dst, h)
}

// DecodeHeader decodes and checks a header payload.
func DecodeHeader(p []byte) (Header, error) {
	var h Header
	d := decoder{p: p, what: FrameHeader}
	if len(p) >= 4 {
		// The version comes first so that a future, longer header still
		// gets the right error.
		if v := le.Uint32(p); v != Version {
			return h, &VersionError{Got: v}
		}
	}
	d.value(&h)
	if err := d.finish(); err != nil {
		return h, err
	}
	if err := CheckMemSize(h.MemSize); err != nil {
		return h, fmt.Errorf("header: %w: %w", err, ErrCorrupt)
	}
	if h.Kind < KindSnapshot || h.Kind > KindCheckpoint {
		return h, fmt.Errorf("header: unknown kind %d: %w", h.Kind, ErrCorrupt)
	}
	return h, nil
}

// CheckMemSize checks a guest memory size.
func CheckMemSize(n uint64) error {
	if n == 0 || n%(2<<20) != 0 || n > MaxMemSize {
		return fmt.Errorf("guest memory size %d is not a positive multiple of 2 MiB up to 1 TiB", n)
	}
	return nil
}

// EncodeCPUID appends a CPUID frame's payload to dst.
func EncodeCPUID(dst []byte, entries []kvm.CPUIDEntry) []byte {
	dst = le.AppendUint32(dst, uint32(len(entries)))
	return mustAppend(dst, entries)
}

// DecodeCPUID decodes a CPUID payload.
func DecodeCPUID(p []byte) ([]kvm.CPUIDEntry, error) {
	d := decoder{p: p, what: FrameCPUID}
	n := d.count(MaxCPUIDEntries)
	e := make([]kvm.CPUIDEntry, n)
	d.value(e)
	return e, d.finish()
}

// EncodeVCPU appends a vCPU frame's payload to dst.
func EncodeVCPU(dst []byte, v *VCPU) []byte {
	dst = mustAppend(dst, &v.Regs)
	dst = mustAppend(dst, &v.Sregs)
	dst = mustAppend(dst, &v.FPU)
	dst = mustAppend(dst, v.XSave.Region[:]) // a slice: encoding/binary's fast path
	dst = mustAppend(dst, &v.XCRs)
	dst = mustAppend(dst, &v.Events)
	dst = mustAppend(dst, &v.DebugRegs)
	dst = mustAppend(dst, &v.MPState)
	dst = le.AppendUint32(dst, uint32(len(v.MSRs)))
	for _, m := range v.MSRs {
		dst = le.AppendUint32(dst, m.Index)
		dst = le.AppendUint64(dst, m.Data)
	}
	return dst
}

// DecodeVCPU decodes a vCPU payload into v (reusing v.MSRs' storage).
func DecodeVCPU(p []byte, v *VCPU) error {
	d := decoder{p: p, what: FrameVCPU}
	d.value(&v.Regs)
	d.value(&v.Sregs)
	d.value(&v.FPU)
	d.value(v.XSave.Region[:])
	d.value(&v.XCRs)
	d.value(&v.Events)
	d.value(&v.DebugRegs)
	d.value(&v.MPState)
	n := d.count(MaxMSRs)
	v.MSRs = v.MSRs[:0]
	for i := 0; i < n && d.err == nil; i++ {
		idx := d.u32()
		v.MSRs = append(v.MSRs, kvm.MSREntry{Index: idx, Data: d.u64()})
	}
	if err := d.finish(); err != nil {
		return err
	}
	if v.XCRs.NrXCRs > kvm.MaxXCRs {
		return fmt.Errorf("vcpu: %d XCRs: %w", v.XCRs.NrXCRs, ErrCorrupt)
	}
	return nil
}

// EncodeDevices appends a devices frame's payload to dst.
func EncodeDevices(dst []byte, s *Devices) []byte { return mustAppend(dst, s) }

// DecodeDevices decodes a devices payload. The models' SetState checks the
// values themselves.
func DecodeDevices(p []byte, s *Devices) error {
	d := decoder{p: p, what: FrameDevices}
	d.value(s)
	return d.finish()
}

// EncodeDisks appends a disks frame's payload to dst: a count, then each
// disk.
func EncodeDisks(dst []byte, disks []Disk) []byte {
	dst = le.AppendUint32(dst, uint32(len(disks)))
	for i := range disks {
		dst = mustAppend(dst, &disks[i])
	}
	return dst
}

// DecodeDisks decodes a disks payload (reusing disks' storage). The
// transports' SetState checks the values themselves.
func DecodeDisks(p []byte, disks []Disk) ([]Disk, error) {
	d := decoder{p: p, what: FrameDisks}
	n := d.count(MaxDisks)
	disks = disks[:0]
	for i := 0; i < n && d.err == nil; i++ {
		var k Disk
		d.value(&k)
		disks = append(disks, k)
	}
	if err := d.finish(); err != nil {
		return disks[:0], err
	}
	for i, k := range disks {
		if k.Transport.NumQueues > devices.MaxVirtioQueues {
			return disks[:0], fmt.Errorf("disk %d: %d queues: %w", i, k.Transport.NumQueues, ErrCorrupt)
		}
	}
	return disks, nil
}

// EncodeNICs appends a network interfaces frame's payload to dst: a
// count, then each interface (address, transport, a count of waiting
// frames, each frame as a 32-bit length and its bytes).
func EncodeNICs(dst []byte, nics []NIC) []byte {
	dst = le.AppendUint32(dst, uint32(len(nics)))
	for i := range nics {
		n := &nics[i]
		dst = append(dst, n.MAC[:]...)
		dst = mustAppend(dst, &n.Transport)
		dst = le.AppendUint32(dst, uint32(len(n.Pending)))
		for _, f := range n.Pending {
			dst = le.AppendUint32(dst, uint32(len(f)))
			dst = append(dst, f...)
		}
	}
	return dst
}

// DecodeNICs decodes a network interfaces payload. The frames are copies;
// the devices' SetState checks the transports and the frames' lengths.
func DecodeNICs(p []byte, nics []NIC) ([]NIC, error) {
	d := decoder{p: p, what: FrameNICs}
	n := d.count(MaxNICs)
	nics = nics[:0]
	for i := 0; i < n && d.err == nil; i++ {
		var k NIC
		copy(k.MAC[:], d.bytes(6))
		d.value(&k.Transport)
		frames := d.count(devices.NetRxPending)
		for j := 0; j < frames && d.err == nil; j++ {
			l := d.count(devices.NetMaxFrame)
			k.Pending = append(k.Pending, append([]byte(nil), d.bytes(l)...))
		}
		nics = append(nics, k)
	}
	if err := d.finish(); err != nil {
		return nics[:0], err
	}
	for i, k := range nics {
		if k.Transport.NumQueues > devices.MaxVirtioQueues {
			return nics[:0], fmt.Errorf("network interface %d: %d queues: %w", i, k.Transport.NumQueues, ErrCorrupt)
		}
	}
	return nics, nil
}

// EncodeMachine appends a machine frame's payload to dst.
func EncodeMachine(dst []byte, s *Machine) []byte { return mustAppend(dst, s) }

// DecodeMachine decodes a machine payload.
func DecodeMachine(p []byte, s *Machine) error {
	d := decoder{p: p, what: FrameMachine}
	d.value(s)
	if err := d.finish(); err != nil {
		return err
	}
	if s.PointKind > 2 {
		return fmt.Errorf("machine: point kind %d: %w", s.PointKind, ErrCorrupt)
	}
	return nil
}

// EncodeEnv appends an environment frame's payload to dst.
func EncodeEnv(dst []byte, s *Env) []byte {
	dst = le.AppendUint64(dst, uint64(s.Now))
	dst = le.AppendUint32(dst, uint32(len(s.Input)))
	return append(dst, s.Input...)
}

// DecodeEnv decodes an environment payload.
func DecodeEnv(p []byte, s *Env) error {
	d := decoder{p: p, what: FrameEnv}
	s.Now = int64(d.u64())
	n := d.count(MaxInput)
	s.Input = append(s.Input[:0], d.bytes(n)...)
	if err := d.finish(); err != nil {
		return err
	}
	if s.Now < 0 {
		return fmt.Errorf("environment: virtual time %d: %w", s.Now, ErrCorrupt)
	}
	return nil
}

// End closes a stream.
type End struct {
	Frames uint64 // frames of the stream before the end frame, header included
	Pages  uint64 // page records (pages and zero pages) in the stream
}

// EncodeEnd appends an end frame's payload to dst.
func EncodeEnd(dst []byte, e *End) []byte { return mustAppend(dst, e) }

// DecodeEnd decodes an end payload.
func DecodeEnd(p []byte) (End, error) {
	var e End
	d := decoder{p: p, what: FrameEnd}
	d.value(&e)
	return e, d.finish()
}

// Pages is a decoded pages or zero-pages frame: a view of its payload.
type Pages struct {
	p    []byte
	N    int
	zero bool
}

// PFN returns the i-th page's frame number.
func (pg Pages) PFN(i int) uint64 { return le.Uint64(pg.p[4+8*i:]) }

// Data returns the i-th page's contents (nil for a zero-pages frame).
func (pg Pages) Data(i int) []byte {
	if pg.zero {
		return nil
	}
	off := 4 + 8*pg.N + PageSize*i
	return pg.p[off : off+PageSize : off+PageSize]
}

// DecodePages decodes a pages (zero = false) or zero-pages payload and
// checks every page number against a memory of memPages pages.
func DecodePages(p []byte, zero bool, memPages uint64) (Pages, error) {
	what, max, per := FramePages, MaxPagesPerFrame, 8+PageSize
	if zero {
		what, max, per = FrameZeroPages, MaxZeroPerFrame, 8
	}
	if len(p) < 4 {
		return Pages{}, fmt.Errorf("%v: too short: %w", what, ErrCorrupt)
	}
	n := le.Uint32(p)
	if n == 0 || n > uint32(max) || uint64(len(p)) != 4+uint64(n)*uint64(per) {
		return Pages{}, fmt.Errorf("%v: %d pages in %d bytes: %w", what, n, len(p), ErrCorrupt)
	}
	pg := Pages{p: p, N: int(n), zero: zero}
	for i := 0; i < pg.N; i++ {
		if pfn := pg.PFN(i); pfn >= memPages {
			return Pages{}, fmt.Errorf("%v: page %#x beyond guest memory (%d pages): %w", what, pfn, memPages, ErrCorrupt)
		}
	}
	return pg, nil
}

// EncodeError appends an error frame's payload (a message) to dst.
func EncodeError(dst []byte, msg string) []byte {
	if len(msg) > 4096 {
		msg = msg[:4096]
	}
	return append(dst, msg...)
}

// DecodeError returns an error frame's message, made printable.
func DecodeError(p []byte) string {
	b := make([]byte, 0, min(len(p), 4096))
	for _, c := range p[:min(len(p), 4096)] {
		if c < 0x20 || c > 0x7e {
			c = '?'
		}
		b = append(b, c)
	}
	return string(b)
}

// mustAppend appends v's fixed-size encoding; v is always one of this
// package's fixed-size types, so an error is a programming error.
func mustAppend(dst []byte, v any) []byte {
	out, err := binary.Append(dst, le, v)
	if err != nil {
		panic(fmt.Sprintf("snapshot: encoding %T: %v", v, err))
	}
	return out
}

// decoder reads fixed-size values, remembering the first error.
type decoder struct {
	p    []byte
	err  error
	what FrameType
}

func (d *decoder) fail(format string, args ...any) {
	if d.err == nil {
		d.err = fmt.Errorf("%v: %s: %w", d.what, fmt.Sprintf(format, args...), ErrCorrupt)
	}
}

func (d *decoder) value(v any) {
	if d.err != nil {
		return
	}
	n, err := binary.Decode(d.p, le, v)
	if err != nil {
		d.fail("too short for %T (%d bytes left)", v, len(d.p))
		return
	}
	d.p = d.p[n:]
}

func (d *decoder) u32() uint32 {
	if d.err != nil {
		return 0
	}
	if len(d.p) < 4 {
		d.fail("too short")
		return 0
	}
	v := le.Uint32(d.p)
	d.p = d.p[4:]
	return v
}

func (d *decoder) u64() uint64 {
	if d.err != nil {
		return 0
	}
	if len(d.p) < 8 {
		d.fail("too short")
		return 0
	}
	v := le.Uint64(d.p)
	d.p = d.p[8:]
	return v
}

// count reads a uint32 count and checks it against max.
func (d *decoder) count(max int) int {
	n := d.u32()
	if d.err == nil && n > uint32(max) {
		d.fail("count %d exceeds %d", n, max)
		return 0
	}
	return int(n)
}

func (d *decoder) bytes(n int) []byte {
	if d.err != nil {
		return nil
	}
	if len(d.p) < n {
		d.fail("too short")
		return nil
	}
	b := d.p[:n]
	d.p = d.p[n:]
	return b
}

func (d *decoder) finish() error {
	if d.err == nil && len(d.p) != 0 {
		d.fail("%d trailing bytes", len(d.p))
	}
	return d.err
}
