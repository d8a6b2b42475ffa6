package vmm

import (
	"errors"
	"fmt"
	"math/bits"
	"slices"
	"time"

	"github.com/ftkvm/ftkvm/devices"
	"github.com/ftkvm/ftkvm/kvm"
	"github.com/ftkvm/ftkvm/vmm/snapshot"
)

// Capturing and installing a guest's complete state: every vCPU register
// set KVM exposes, every device model, the machine's own state around the
// vCPU (TSC offset, halted, the interrupt-window request, the delivery
// point, Stats) and the environment's (virtual time, undelivered input).
// Memory travels separately (see snapshot.StreamWriter, Checkpoint).

// extraMSRs are MSRs a guest may write that KVM_GET_MSR_INDEX_LIST leaves
// out on some kernels (MTRRs, SPEC_CTRL). The probe keeps those this vCPU
// has.
var extraMSRs = func() []uint32 {
	l := []uint32{0x2ff, 0x250, 0x258, 0x259, 0x48, 0x3a}
	for i := uint32(0x200); i < 0x210; i++ {
		l = append(l, i) // variable-range MTRRs
	}
	for i := uint32(0x268); i < 0x270; i++ {
		l = append(l, i) // fixed-range MTRRs
	}
	return l
}()

// probeMSRs finds the MSRs a capture saves: those of KVM's index list (the
// MSRs KVM saves and restores for a guest) and extraMSRs that this vCPU,
// with its CPUID, lets user space both read and write back.
func (m *Machine) probeMSRs() ([]uint32, error) {
	list, err := m.sys.MSRIndexList()
	if err != nil {
		return nil, err
	}
	cand := append(slices.Clone(list), extraMSRs...)
	seen := map[uint32]bool{}
	var keep []uint32
	e := make([]kvm.MSREntry, 1)
	for _, idx := range cand {
		if seen[idx] {
			continue
		}
		seen[idx] = true
		e[0] = kvm.MSREntry{Index: idx}
		if ok, err := msrOK(m.vcpu.GetMSRs(e)); err != nil {
			return nil, err
		} else if !ok {
			continue
		}
		if ok, err := msrOK(m.vcpu.SetMSRs(e)); err != nil {
			return nil, err
		} else if !ok {
			continue
		}
		keep = append(keep, idx)
	}
	return keep, nil
}

// msrOK tells a refused MSR (false, nil) from a failed ioctl.
func msrOK(n int, err error) (bool, error) {
	var me *kvm.MSRError
	if errors.As(err, &me) {
		return false, nil
	}
	return n == 1, err
}

// Quiescent reports whether KVM holds no half-done instruction, so that
// state may be captured or installed now: after a kick (Environment.At at a
// PointKick), a HLT (Environment.Halt) or an interrupt-window exit, and
// inside functions given to Do or Post. After a port, MMIO or MSR exit it
// is false until the next KVM_RUN: use Post. vCPU thread only.
//
// (After KVM_RUN the XSAVE area may differ in XSTATE_BV for components in
// their initial state, which the CPU's init optimisation clears: the same
// architectural state. Compare or hash it with that in mind.)
func (m *Machine) Quiescent() bool { return m.quiescent }

// errNotQuiescent is returned when state is read or set while KVM holds a
// half-done instruction.
var errNotQuiescent = errors.New("vmm: the vCPU is not at a quiescent point (use Do or Post)")

// errDisksBusy is returned when state is captured with disk requests in
// flight.
var errDisksBusy = errors.New("vmm: disk requests in flight (SettleDisks first)")

// CaptureState fills s with the machine's complete state apart from guest
// memory. Call it on the vCPU thread where Quiescent is true (inside Do or
// Post, at a kick point, in Halt), or while Run is not active. s's slices
// are reused.
//
// No disk request may be in flight: call SettleDisks first, before guest
// memory is read, since it writes the completions there.
func (m *Machine) CaptureState(s *snapshot.State) error {
	if !m.quiescent {
		return errNotQuiescent
	}
	if m.disksBusy() {
		return errDisksBusy
	}
	if s.Header.Kind == 0 {
		s.Header.Kind = snapshot.KindSnapshot
	}
	s.Header.Version = snapshot.Version
	s.Header.MemSize = m.mem.Size()
	s.Header.Created = time.Now().UnixNano()
	s.CPUID = append(s.CPUID[:0], m.cpuid...)

	v, c := &s.VCPU, m.vcpu
	for _, step := range []struct {
		what string
		err  error
	}{
		// The events first: without KVM_CAP_EXCEPTION_PAYLOAD,
		// KVM_GET_VCPU_EVENTS delivers a pending exception's payload
		// (CR2 of a #PF, DR6 of a #DB) into the registers read after it.
		{"vCPU events", c.GetVCPUEvents(&v.Events)},
		{"registers", c.GetRegs(&v.Regs)},
		{"special registers", c.GetSregs(&v.Sregs)},
		{"FPU", c.GetFPU(&v.FPU)},
		{"XSAVE area", c.GetXSave(&v.XSave)},
		{"XCRs", c.GetXCRs(&v.XCRs)},
		{"debug registers", c.GetDebugRegs(&v.DebugRegs)},
		{"MP state", c.GetMPState(&v.MPState)},
	} {
		if step.err != nil {
			return fmt.Errorf("capture %s: %w", step.what, step.err)
		}
	}
	normalizeEvents(&v.Events)
	v.MSRs = slices.Grow(v.MSRs[:0], len(m.msrIndices))[:len(m.msrIndices)]
	for i, idx := range m.msrIndices {
		v.MSRs[i] = kvm.MSREntry{Index: idx}
	}
	if _, err := c.GetMSRs(v.MSRs); err != nil {
		return fmt.Errorf("capture MSRs: %w", err)
	}

	s.Devices = snapshot.Devices{
		PIC:       m.pic.State(),
		PIT:       m.pit.State(),
		UART:      m.uart.State(),
		RTC:       m.rtc.State(),
		Reset:     m.reset.State(),
		I8042:     m.i8042.State(),
		DebugExit: m.debugExit.State(),
		ACPIPM:    m.acpiPM.State(),
	}
	s.Disks = slices.Grow(s.Disks[:0], len(m.virtio))
	for _, v := range m.virtio {
		if v.img != nil {
			s.Disks = append(s.Disks, snapshot.Disk{Size: v.img.Size(), ReadOnly: v.img.ReadOnly(), Transport: v.t.State(),
				NextSeq: v.blk.NextSeq()})
		}
	}
	s.NICs = slices.Grow(s.NICs[:0], len(m.nics))
	for _, v := range m.nics {
		var n snapshot.NIC
		copy(n.MAC[:], v.net.MAC())
		n.Transport = v.t.State()
		n.Pending = v.net.State().Pending
		s.NICs = append(s.NICs, n)
	}
	s.Machine = snapshot.Machine{
		TSCOffset:              m.tscOffset,
		Halted:                 m.halted,
		RequestInterruptWindow: m.run.RequestInterruptWindow != 0,
		PointKind:              uint8(m.point.Kind),
		PointExits:             m.point.Exits,
		Stats:                  m.Stats,
	}
	if es, ok := m.env.(StateSaver); ok {
		es.SaveState(&s.Env)
	} else {
		s.Env = snapshot.Env{Now: m.env.Now()}
	}
	return nil
}

// Install sets a captured state into the machine: into a machine from
// NewEmpty before Run (restore, migration; guest memory written first), or
// on the vCPU thread inside Do or Post (a replica repairing a divergence).
// The device models check their states. On error the machine holds part of
// the state: Run refuses to start it; close it.
func (m *Machine) Install(s *snapshot.State) error {
	if !m.quiescent {
		return errNotQuiescent
	}
	if s.Header.MemSize != m.mem.Size() {
		return fmt.Errorf("install: state for %d bytes of guest memory, the machine has %d", s.Header.MemSize, m.mem.Size())
	}
	// The disks and network interfaces first: a machine given others
	// than the captured one's is refused before anything is set.
	if err := m.CheckDisks(s.Disks); err != nil {
		return err
	}
	if err := m.CheckNICs(s.NICs); err != nil {
		return err
	}
	m.installed = false
	if !slices.Equal(s.CPUID, m.cpuid) {
		if err := m.setCPUID(s.CPUID); err != nil {
			return fmt.Errorf("install CPUID: %w", err)
		}
	}
	if s.VCPU.MPState.State != kvm.MPStateRunnable {
		return fmt.Errorf("install: MP state %d (only runnable is possible without an in-kernel irqchip)", s.VCPU.MPState.State)
	}
	v, c := &s.VCPU, m.vcpu
	// QEMU's order: registers, FPU state, XCRs, special registers, MSRs,
	// MP state, events, debug registers. XSAVE after FPU: it is complete
	// (KVM_SET_FPU ignores MXCSR).
	steps := []struct {
		what string
		set  func() error
	}{
		{"registers", func() error { return c.SetRegs(&v.Regs) }},
		{"FPU", func() error { return c.SetFPU(&v.FPU) }},
		{"XSAVE area", func() error { return c.SetXSave(&v.XSave) }},
		{"XCRs", func() error {
			if v.XCRs.NrXCRs == 0 {
				return nil
			}
			return c.SetXCRs(&v.XCRs)
		}},
		{"special registers", func() error { return c.SetSregs(&v.Sregs) }},
		{"MSRs", func() error { _, err := c.SetMSRs(v.MSRs); return err }},
		{"MP state", func() error { return c.SetMPState(&v.MPState) }},
		{"vCPU events", func() error { return c.SetVCPUEvents(&v.Events) }},
		{"debug registers", func() error { return c.SetDebugRegs(&v.DebugRegs) }},
	}
	for _, st := range steps {
		if err := st.set(); err != nil {
			return fmt.Errorf("install %s: %w", st.what, err)
		}
	}
	d := &s.Devices
	for _, st := range []struct {
		what string
		set  func() error
	}{
		{"PIC", func() error { return m.pic.SetState(d.PIC) }},
		{"PIT", func() error { return m.pit.SetState(d.PIT) }},
		{"UART", func() error { return m.uart.SetState(d.UART) }},
		{"RTC", func() error { return m.rtc.SetState(d.RTC) }},
		{"reset control", func() error { return m.reset.SetState(d.Reset) }},
		{"i8042", func() error { return m.i8042.SetState(d.I8042) }},
		{"debug exit", func() error { return m.debugExit.SetState(d.DebugExit) }},
		{"ACPI PM", func() error { return m.acpiPM.SetState(d.ACPIPM) }},
	} {
		if err := st.set(); err != nil {
			return fmt.Errorf("install %s state: %w", st.what, err)
		}
	}
	for i, v := range m.virtio {
		if v.img == nil {
			continue // a network interface: below
		}
		// Requests in flight here are the state's too (a backup ran
		// the guest to this state's point) and completed in it: they
		// are dropped once performed, so the image has their writes.
		v.blk.Drop()
		if err := v.t.SetState(s.Disks[i].Transport); err != nil {
			return fmt.Errorf("install disk %d (%s): %w", i, v.img.Path(), err)
		}
		v.blk.SetNextSeq(s.Disks[i].NextSeq)
	}
	for i, v := range m.nics {
		if v.adoptMAC {
			v.net.SetMAC(s.NICs[i].MAC[:])
			v.adoptMAC = false
		}
		if err := v.t.SetState(s.NICs[i].Transport); err != nil {
			return fmt.Errorf("install network interface %d: %w", i, err)
		}
		if err := v.net.SetState(devices.NetState{Pending: s.NICs[i].Pending}); err != nil {
			return fmt.Errorf("install network interface %d: %w", i, err)
		}
	}
	ms := &s.Machine
	m.tscOffset = ms.TSCOffset
	m.halted = ms.Halted
	m.run.RequestInterruptWindow = 0
	if ms.RequestInterruptWindow {
		m.run.RequestInterruptWindow = 1
	}
	m.point = Point{Kind: PointKind(ms.PointKind), Exits: ms.PointExits}
	m.Stats = ms.Stats
	if es, ok := m.env.(StateSaver); ok {
		es.RestoreState(&s.Env)
	}
	if m.ctl.started.Load() {
		// Installed mid-run, on the vCPU thread (a replica's checkpoint):
		// kvm_run's if_flag and ready_for_interrupt_injection still
		// describe the replaced state, and inject() reads them at this
		// very point. Have KVM refresh them from the installed state, as
		// the captured machine's KVM had them; otherwise the two machines
		// may disagree about taking an interrupt here.
		if err := m.vcpu.Refresh(); err != nil {
			return fmt.Errorf("install: %w", err)
		}
	}
	// Requests waiting in the rings are taken here, as the captured
	// machine took them after its capture (SettleDisks).
	m.ServiceDisks()
	// Run starts with a kick point, so the environment sees the installed
	// timer deadline before the guest runs.
	m.installed = true
	return nil
}

// Checkpoint is an incremental checkpoint: the guest pages written since
// the previous one, and the complete vCPU, device and environment state.
// Its buffers are reused from one Checkpoint call to the next.
type Checkpoint struct {
	State snapshot.State
	Dirty []uint64 // bitmap of the pages in Pages (bit i of word i/64 = page i)
	Pages []byte   // their contents, in ascending page order
	N     int      // number of pages
	Full  bool     // the first checkpoint: every page of guest memory

	sw *snapshot.StreamWriter // reused by Write
}

// Checkpoint fills cp. Call it on the vCPU thread at a quiescent point:
// directly from an Environment's At at a kick point or from its Halt, or at
// any exit through a function given to Post (it runs before the guest
// does), or inside Do. The first call turns the dirty log on and captures every
// page; later calls capture the pages written since the previous call. The
// guest does not run meanwhile, so pages and state agree.
func (m *Machine) Checkpoint(cp *Checkpoint) error {
	return m.CheckpointWith(cp, CheckpointOptions{})
}

// CheckpointOptions vary what CheckpointWith captures.
type CheckpointOptions struct {
	// Full captures every page even when the dirty log is on (a replica
	// joining a running primary needs the whole memory).
	Full bool
	// Extra adds pages (a bitmap of BitmapWords words) to those the dirty
	// log reports: pages a caller already drained from the log since the
	// previous checkpoint, as a replica hashing each epoch's dirty pages
	// does.
	Extra []uint64
}

// CheckpointWith is Checkpoint with options.
//
// It settles the disks first (SettleDisks): a caller that reads the dirty
// log before (a replica's verify hash) settles them before that. The
// caller calls ServiceDisks once the capture is done.
func (m *Machine) CheckpointWith(cp *Checkpoint, o CheckpointOptions) error {
	if !m.quiescent {
		return errNotQuiescent
	}
	m.SettleDisks()
	words := m.BitmapWords()
	if o.Extra != nil && len(o.Extra) < words {
		return fmt.Errorf("checkpoint: extra bitmap of %d words, %d needed", len(o.Extra), words)
	}
	cp.Dirty = slices.Grow(cp.Dirty[:0], words)[:words]
	cp.Full = o.Full || !m.dl.on.Load()
	if cp.Full {
		if err := m.EnableDirtyLog(); err != nil {
			return err
		}
		pages := m.Pages()
		for i := range cp.Dirty {
			cp.Dirty[i] = ^uint64(0)
		}
		if pages%64 != 0 {
			cp.Dirty[words-1] = 1<<(pages%64) - 1
		}
		cp.N = int(pages)
	} else {
		n, err := m.DirtyLog(cp.Dirty)
		if err != nil {
			return err
		}
		if o.Extra != nil {
			n = 0
			for i := range cp.Dirty {
				cp.Dirty[i] |= o.Extra[i]
				n += bits.OnesCount64(cp.Dirty[i])
			}
		}
		cp.N = n
	}
	size := cp.N * snapshot.PageSize
	cp.Pages = slices.Grow(cp.Pages[:0], size)[:size]
	mem := m.mem.Bytes()
	off := 0
	ForEachPage(cp.Dirty, func(pfn uint64) {
		off += copy(cp.Pages[off:off+snapshot.PageSize], mem[pfn*snapshot.PageSize:])
	})
	cp.State.Header.Kind = snapshot.KindCheckpoint
	return m.CaptureState(&cp.State)
}

// Write sends the checkpoint as one stream (zero pages as zero records).
// Applying the stream to the memory of a machine that had the previous
// checkpoints makes that memory equal to this one's.
func (cp *Checkpoint) Write(w *snapshot.Writer) error {
	h := cp.State.Header
	h.Kind = snapshot.KindCheckpoint
	if cp.sw == nil {
		cp.sw = &snapshot.StreamWriter{}
	}
	sw := cp.sw
	err := sw.Reset(w, h)
	if err != nil {
		return err
	}
	i := 0
	ForEachPage(cp.Dirty, func(pfn uint64) {
		if err == nil {
			err = sw.Page(pfn, cp.Pages[i*snapshot.PageSize:(i+1)*snapshot.PageSize], false)
		}
		i++
	})
	if err != nil {
		return err
	}
	if err := sw.State(&cp.State); err != nil {
		return err
	}
	return sw.End()
}

// ForEachPage calls fn for each set bit of a dirty bitmap, in ascending
// order.
func ForEachPage(bitmap []uint64, fn func(pfn uint64)) {
	for i, w := range bitmap {
		for w != 0 {
			b := uint64(bits.TrailingZeros64(w))
			fn(uint64(i)*64 + b)
			w &= w - 1
		}
	}
}

// normalizeEvents puts captured vCPU events in the form KVM_SET_VCPU_EVENTS
// keeps, so that a state installed and captured again is the same state
// (and hashes the same on both replicas). Without KVM_CAP_EXCEPTION_PAYLOAD,
// which ftkvm does not enable, KVM keeps the original ABI: GET reports a
// pending exception as injected (and may also set exception.pending), and
// SET establishes no pending exception and no payload (the KVM API,
// KVM_GET_VCPU_EVENTS and KVM_CAP_EXCEPTION_PAYLOAD). The exception is
// delivered as the injected one either way.
func normalizeEvents(e *kvm.VCPUEvents) {
	if e.Flags&kvm.VCPUEventValidPayload != 0 {
		return
	}
	if e.Exception.Pending != 0 {
		e.Exception.Injected = 1
		e.Exception.Pending = 0
	}
	e.ExceptionHasPayload, e.ExceptionPayload = 0, 0
}
