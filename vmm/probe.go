package vmm

import (
	"errors"
	"fmt"
	"runtime"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/ftkvm/ftkvm/kvm"
	"github.com/ftkvm/ftkvm/vmm/perfclock"
)

// ProbeReport is what `ftkvm probe` measures about a host's KVM.
type ProbeReport struct {
	Device     string
	APIVersion int
	Caps       []CapStatus

	// Loop speeds in guest instructions per second, from a two-instruction
	// loop run at ring 0 and at ring 3 in 64-bit mode.
	Ring0IPS, Ring3IPS float64
	// Ring0Native is true when ring 0 runs within a factor of 20 of ring 3
	// or above 50 million instructions/s; a KVM that emulates ring 0
	// (docs/KVM-HOSTS.md) manages 1-2 million.
	Ring0Native bool

	SingleStepRing0, SingleStepRing3             bool
	SingleStepRing0Detail, SingleStepRing3Detail string
	// StepExact: single-step traps come after every instruction across a
	// port write and a write to a fresh page, the way the step clock
	// requests them here (what it needs; see stepHow).
	StepExact       bool
	StepExactDetail string

	// The perf clock's pieces. PMU: the counter it needs opens here
	// (PMUDetail: which, or the missing piece: no PMU, perf_event_paranoid).
	PMU       bool
	PMUDetail string
	// PerfEvent names the retired-conditional-branch event for this CPU
	// (PerfEventKnown), or says why there is none.
	PerfEvent      string
	PerfEventKnown bool
	// PerfGuestOnly: the event counts guest execution only (exclude_host).
	PerfGuestOnly       bool
	PerfGuestOnlyDetail string
	// PerfSkid is the largest overshoot of the counter's overflow signal
	// measured here, in events; PerfMargin the margin the clock would use
	// (the larger of rr's for this CPU and twice PerfSkid).
	PerfSkid, PerfMargin uint64
	PerfSkidDetail       string // why the skid could not be measured
	// Breakpoints: a KVM_GUESTDBG_USE_HW_BP instruction breakpoint stops
	// the vCPU before the instruction.
	Breakpoints       bool
	BreakpointsDetail string
}

// CapStatus is one KVM capability and the value KVM_CHECK_EXTENSION gave.
type CapStatus struct {
	Cap      kvm.Cap
	Value    int
	Required bool
}

// Capabilities ftkvm relies on (Required) or uses when present.
var probeCaps = []struct {
	c        kvm.Cap
	required bool
}{
	{kvm.CapUserMemory, true},
	{kvm.CapImmediateExit, true},
	{kvm.CapX86UserSpaceMSR, true},
	{kvm.CapX86MSRFilter, true},
	{kvm.CapSetTSSAddr, false},
	{kvm.CapExtCPUID, true},
	{kvm.CapVCPUEvents, true},
	{kvm.CapDebugRegs, true},
	{kvm.CapXSave, false},
	{kvm.CapXCRs, false},
	{kvm.CapMPState, true},
	{kvm.CapSetGuestDebug, false},
	{kvm.CapSyncRegs, false},
	{kvm.CapIRQChip, false},
}

// Probe measures what KVM at path can do. Errors opening the device are
// returned; failures of individual probes are reported in the report.
func Probe(path string) (*ProbeReport, error) {
	sys, err := kvm.Open(path)
	if err != nil {
		return nil, err
	}
	defer sys.Close()
	r := &ProbeReport{Device: path}
	if r.APIVersion, err = sys.APIVersion(); err != nil {
		return nil, err
	}
	for _, pc := range probeCaps {
		v, err := sys.CheckExtension(pc.c)
		if err != nil {
			return nil, err
		}
		r.Caps = append(r.Caps, CapStatus{pc.c, v, pc.required})
	}

	if r.Ring0IPS, err = loopSpeed(sys, 0, 200_000); err != nil {
		return nil, fmt.Errorf("ring-0 loop: %w", err)
	}
	if r.Ring3IPS, err = loopSpeed(sys, 3, 20_000_000); err != nil {
		return nil, fmt.Errorf("ring-3 loop: %w", err)
	}
	r.Ring0Native = r.Ring0IPS*20 >= r.Ring3IPS || r.Ring0IPS >= 50e6

	r.SingleStepRing0, r.SingleStepRing0Detail = singleStep(sys, 0)
	r.SingleStepRing3, r.SingleStepRing3Detail = singleStep(sys, 3)
	_, r.StepExact, r.StepExactDetail = stepHow(sys)
	r.Breakpoints, r.BreakpointsDetail = breakpointStops(sys)
	if r.Breakpoints {
		r.BreakpointsDetail = "an instruction breakpoint stopped the vCPU before the instruction"
	}
	probePerf(sys, r)
	return r, nil
}

// probeVM is a 4 MiB VM whose vCPU starts in 64-bit mode at ring cpl,
// executing code at probeCode.
type probeVM struct {
	mem  *Memory
	vm   *kvm.VM
	vcpu *kvm.VCPU
}

const (
	probeCode = 0x10000
	probePML4 = 0x1000
	probePDPT = 0x2000
	probePD   = 0x3000
)

func newProbeVM(sys *kvm.System, cpl uint8, code []byte) (p *probeVM, err error) {
	p = &probeVM{}
	defer func() {
		if err != nil {
			p.Close()
		}
	}()
	if p.mem, err = NewMemory(4 << 20); err != nil {
		return nil, err
	}
	b := p.mem.Bytes()
	// Identity-map 4 MiB with 2 MiB pages, user-accessible.
	const pte = 0x7 // present, writable, user
	le64(b[probePML4:], probePDPT|pte)
	le64(b[probePDPT:], probePD|pte)
	le64(b[probePD:], 0|pte|0x80)
	le64(b[probePD+8:], 2<<20|pte|0x80)
	copy(b[probeCode:], code)

	if p.vm, err = sys.CreateVM(); err != nil {
		return nil, err
	}
	if err = p.vm.SetTSSAddr(0xfffbd000); err != nil {
		return nil, err
	}
	if err = p.vm.SetUserMemoryRegion(kvm.MemoryRegion{MemorySize: p.mem.Size(), UserspaceAddr: p.mem.Addr()}); err != nil {
		return nil, err
	}
	if p.vcpu, err = p.vm.CreateVCPU(0); err != nil {
		return nil, err
	}
	var sregs kvm.Sregs
	if err = p.vcpu.GetSregs(&sregs); err != nil {
		return nil, err
	}
	code64 := kvm.Segment{Limit: 0xffffffff, Selector: 0x10 | uint16(cpl), Type: 0xb, Present: 1, DPL: cpl, S: 1, L: 1, G: 1}
	data := kvm.Segment{Limit: 0xffffffff, Selector: 0x18 | uint16(cpl), Type: 0x3, Present: 1, DPL: cpl, S: 1, DB: 1, G: 1}
	sregs.CS = code64
	sregs.DS, sregs.ES, sregs.FS, sregs.GS, sregs.SS = data, data, data, data, data
	sregs.TR = kvm.Segment{Limit: 0x67, Selector: 0x20, Type: 0xb, Present: 1}
	sregs.CR0 = cr0PE | cr0ET | cr0NE | cr0PG
	sregs.CR3 = probePML4
	sregs.CR4 = cr4PAE
	sregs.EFER = eferLME | eferLMA
	if err = p.vcpu.SetSregs(&sregs); err != nil {
		return nil, err
	}
	// IOPL 3 lets ring 3 reach the port that ends the probe.
	if err = p.vcpu.SetRegs(&kvm.Regs{RIP: probeCode, RSP: 0x8000, RCX: 1000, RFLAGS: 0x3002}); err != nil {
		return nil, err
	}
	return p, nil
}

func (p *probeVM) Close() {
	if p.vcpu != nil {
		p.vcpu.Close()
	}
	if p.vm != nil {
		p.vm.Close()
	}
	if p.mem != nil {
		p.mem.Close()
	}
}

func le64(b []byte, v uint64) {
	for i := range 8 {
		b[i] = byte(v >> (8 * i))
	}
}

// loopSpeed runs a two-instruction loop (`dec ecx; jnz`) of n iterations at
// ring cpl and returns guest instructions per second. A short warm-up loop
// ends with a port write first, so that the timed run excludes the VM's
// first entry and its first page faults, which on a nested KVM cost more
// than a short native loop.
func loopSpeed(sys *kvm.System, cpl uint8, n uint32) (float64, error) {
	code := []byte{
		0xff, 0xc9, // 1: dec ecx          (rcx = 1000: the warm-up)
		0x75, 0xfc, //    jnz 1b
		0xe6, 0x80, //    out 0x80, al
		0xb9, byte(n), byte(n >> 8), byte(n >> 16), byte(n >> 24), // mov ecx, n
		0xff, 0xc9, // 2: dec ecx
		0x75, 0xfc, //    jnz 2b
		0xe6, 0x81, //    out 0x81, al
		0xf4, //          hlt
	}
	p, err := newProbeVM(sys, cpl, code)
	if err != nil {
		return 0, err
	}
	defer p.Close()
	run := func(port uint16) (time.Duration, error) {
		start := time.Now()
		reason, err := p.vcpu.Run()
		for reason == kvm.ExitIntr && err == nil {
			// A signal that is not ours (the runtime's preemption
			// signal can reach a thread just entered KVM_RUN): the
			// loop goes on where it was.
			reason, err = p.vcpu.Run()
		}
		elapsed := time.Since(start)
		if err != nil {
			return 0, err
		}
		if reason != kvm.ExitIO || p.vcpu.RunData().IO().Port != port {
			return 0, fmt.Errorf("loop ended with %v, not the write to port %#x", reason, port)
		}
		return elapsed, nil
	}
	if _, err := run(0x80); err != nil {
		return 0, err
	}
	elapsed, err := run(0x81)
	if err != nil {
		return 0, err
	}
	return float64(2*uint64(n)) / elapsed.Seconds(), nil
}

// singleStep checks that KVM_GUESTDBG_SINGLESTEP stops after each of three
// `nop`s at ring cpl with RIP advancing by one.
func singleStep(sys *kvm.System, cpl uint8) (bool, string) {
	p, err := newProbeVM(sys, cpl, []byte{0x90, 0x90, 0x90, 0x90, 0xe6, 0x80})
	if err != nil {
		return false, err.Error()
	}
	defer p.Close()
	if err := p.vcpu.SetGuestDebug(&kvm.GuestDebug{Control: kvm.GuestDebugEnable | kvm.GuestDebugSingleStep}); err != nil {
		return false, err.Error()
	}
	for i := 1; i <= 3; i++ {
		reason, err := p.vcpu.Run()
		for reason == kvm.ExitIntr && err == nil {
			reason, err = p.vcpu.Run() // a stray signal, not a step
		}
		if err != nil {
			return false, err.Error()
		}
		if reason != kvm.ExitDebug {
			return false, fmt.Sprintf("step %d: exit %v instead of a debug exit", i, reason)
		}
		if pc := p.vcpu.RunData().Debug().PC; pc != probeCode+uint64(i) {
			return false, fmt.Sprintf("step %d stopped at %#x, want %#x", i, pc, probeCode+uint64(i))
		}
	}
	return true, "3 of 3 steps stopped at the next instruction"
}

// probePerf fills in the perf clock's counter pieces of r: the event for
// this CPU, whether it opens for guest-only counting on this thread, and
// its skid, measured with a loop at guest ring 3 (where every KVM runs
// natively; the skid is the PMU's, whatever the ring).
func probePerf(sys *kvm.System, r *ProbeReport) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	cpu, err := perfclock.HostCPU()
	if err != nil {
		r.PMUDetail = err.Error()
		return
	}
	ev, err := perfclock.BranchEvent(cpu)
	if err != nil {
		// Is there a PMU at all? Say which piece is missing first.
		r.PerfEvent = err.Error()
		r.PMU, r.PMUDetail = probePMU()
		return
	}
	r.PerfEvent, r.PerfEventKnown = ev.Name, true
	ctr, err := perfclock.Open(ev, unix.Gettid(), kvm.KickSignal)
	switch {
	case errors.Is(err, perfclock.ErrNoGuestOnly):
		r.PMU, r.PMUDetail = true, ev.Name+" opens"
		r.PerfGuestOnlyDetail = err.Error()
		return
	case errors.Is(err, perfclock.ErrNoPMU) && cpu.Hypervisor:
		r.PMUDetail = err.Error() + "; this host is itself a virtual machine, and its hypervisor exposes no PMU to it"
		return
	case err != nil:
		r.PMUDetail = err.Error()
		return
	}
	defer ctr.Close()
	r.PMU, r.PMUDetail = true, ev.Name+" opens"
	r.PerfGuestOnly, r.PerfGuestOnlyDetail = true, "exclude_host accepted"
	s, err := MeasureSkid(sys, ctr, 3, 32)
	if err != nil {
		r.PerfSkidDetail = err.Error()
		return
	}
	r.PerfSkid, r.PerfMargin = s.Max, max(ev.Margin, 2*s.Max)
}

// probePMU tries to open a generic hardware instruction counter for this
// thread: whether there is a PMU at all, where no exact event is known
// for the CPU.
func probePMU() (bool, string) {
	attr := unix.PerfEventAttr{
		Type:   unix.PERF_TYPE_HARDWARE,
		Config: unix.PERF_COUNT_HW_INSTRUCTIONS,
		Size:   uint32(unsafeSizeofPerfAttr),
		Bits:   unix.PerfBitDisabled | unix.PerfBitExcludeHv,
	}
	fd, err := unix.PerfEventOpen(&attr, 0, -1, -1, unix.PERF_FLAG_FD_CLOEXEC)
	if err != nil {
		if errors.Is(err, unix.ENOENT) || errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.ENODEV) {
			return false, fmt.Sprintf("no hardware performance counters (perf_event_open: %v)", err)
		}
		return false, fmt.Sprintf("perf_event_open: %v", err)
	}
	unix.Close(fd)
	return true, "perf_event_open(PERF_COUNT_HW_INSTRUCTIONS) succeeded"
}

var unsafeSizeofPerfAttr = unsafe.Sizeof(unix.PerfEventAttr{})
