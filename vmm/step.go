package vmm

import (
	"fmt"

	"github.com/ftkvm/ftkvm/kvm"
	"github.com/ftkvm/ftkvm/vmm/insn"
)

// The step clock (EpochStep).
//
// KVM single-steps the guest: every KVM_RUN retires at most one instruction
// and ends in KVM_EXIT_DEBUG (DR6.BS). Each such exit is a delivery point
// of kind PointStep at position (Exits, Instrs): guest-caused exits since
// the start, instructions since the last one. Guest-caused exits are
// counted as with the exit clock and reset Instrs; kicks count nothing.
//
// Before every KVM_RUN, stepBefore looks at the instruction at RIP (page
// walk in guest memory, a byte scan, then x86asm to confirm; package insn):
//
//   - RDTSC, RDTSCP, RDPID are carried out by ftkvm, never by KVM: the
//     value is the TSC the machine serves for the TSC MSR (environment
//     time plus the guest's offset), so it passes through the environment
//     as a clock read; RDTSCP's and RDPID's TSC_AUX is 0 (ftkvm does not
//     let the guest write it: it #GPs). Each is one instruction and a
//     step point. Whether they exist is what CPUID says: ftkvm's CPUID
//     hides RDTSCP, RDPID, RDRAND and RDSEED, so for those ftkvm raises #UD
//     (as the CPU the guest was told about would), without letting KVM's
//     emulator run them with host values.
//   - HLT at ring 0 is carried out by ftkvm as well: RIP advances and the
//     machine halts exactly as at a KVM HLT exit (a guest-caused exit).
//     Single-stepping a HLT on this project's KVM does not halt; the halt
//     resurfaces as a KVM_EXIT_HLT a few instructions later.
//   - IRET, RETF, SYSRET and SYSEXIT that would enter ring 3 on a KVM that
//     cannot single-step ring 3 stop the machine with ErrStepRing3 before
//     they run (the probe found that at ring 3 the trap goes to the guest:
//     ring-3 code would then run uncounted until its next exit).
//   - Instructions after which KVM would not stop on its own (insn
//     LosesStep: IRET, SYSCALL, SWAPGS and the fences, which this
//     project's KVM runs together with the next instruction; POPF and the
//     other RFLAGS loaders, after which a hardware-virtualised KVM loses
//     TF): ftkvm predicts where the next instruction is (insn.Next) and
//     sets a one-time instruction breakpoint there; reaching it is the
//     instruction's step.
//   - MOV SS and POP SS: the next instruction runs in their shadow, where
//     nothing can stop it; it must not be one ftkvm has to carry out.
//
// Events entering the guest: an interrupt ftkvm injects, or an exception
// it raises, is delivered at the next KVM_RUN; this project's KVM runs the
// handler's first instruction with it, a hardware-virtualised one the
// whole handler (delivery clears TF). So ftkvm sets a one-time breakpoint
// at the handler's entry (not an instruction: no point) and steps on from
// there. An exception a guest instruction raises has a vector ftkvm cannot
// know in advance: whenever the IDT register changes, and for the vector
// at each injection, the first instruction of every handler is decoded,
// and those that start with an instruction stepBefore must see get a
// standing instruction breakpoint (up to four, KVM_GUESTDBG_USE_HW_BP).
//
// How KVM single-steps is measured once (stepHow): where it loses the
// request after POPF, single-stepping is requested before every KVM_RUN;
// where even then instructions go unstepped, the step clock refuses.
//
// Interrupt windows are never requested: every instruction boundary is a
// point where a pending interrupt is injected if the guest can take it.
type stepper struct {
	ring3 bool // single-step traps at ring 3 reach ftkvm (probed)
	// rearm: this KVM needs single-stepping requested before every
	// KVM_RUN (stepHow).
	rearm    bool
	syncRegs bool // KVM_CAP_SYNC_REGS: registers arrive in kvm_run, no ioctl
	// fresh: kvm_run's synced registers are the vCPU's current ones (set
	// after each KVM_RUN; cleared when something else may have changed
	// them, such as a control request installing a state).
	fresh bool
	regs  kvm.Regs // registers when not synced
	sregs kvm.Sregs

	// An event KVM delivers at the next entry, before any instruction:
	// injected is set by inject (vector: which), raised by raise (#UD,
	// #GP). recheck: a control request ran and may have installed a state;
	// ask KVM what it holds.
	injected, raised, recheck bool
	vector                    uint8

	// Interrupt handlers that start with an instruction stepBefore must
	// see, as of the IDT scan.
	idt      kvm.DTable
	scanned  bool
	handlers [256]uint64 // linear entry point of each vector's handler (0: none)
	danger   [256]bool
	guards   [kvm.MaxBreakpoints]uint64 // distinct dangerous entry points
	nguards  int
	armed    [kvm.MaxBreakpoints]uint64 // what KVM has now
	narmed   int
	// armedOK: KVM's guest-debug state is current. Cleared when it must be
	// set again even with the same breakpoints: KVM_SET_GUEST_DEBUG also
	// (re)starts single-stepping at the current RIP, and a KVM that steps
	// by setting TF in the guest loses it when ftkvm writes the registers.
	armedOK bool

	// shot is a one-time breakpoint, for the next KVM_RUN only (shotSet):
	// at the instruction after one that LosesStep, where reaching it is
	// that instruction's step (shotCounts); or at the entry of the handler
	// of an event about to be delivered, where it is no instruction.
	shot                uint64
	shotSet, shotCounts bool

	// What the vCPU was at when KVM_RUN was entered, to make sense of a
	// kick: RIP, whether an event was to be delivered first, and whether
	// KVM held a half-done instruction (after a port or MMIO exit) that
	// the run completes.
	entryRIP              uint64
	entryEvent, entryBusy bool

	// SYSCALL's and SYSENTER's targets, read from the vCPU once and kept
	// until the guest executes WRMSR (or a state is installed).
	msrs      [2]kvm.MSREntry
	msrsValid bool

	buf [insn.MaxLen]byte
}

// exitEmulated is the pseudo exit reason of an instruction ftkvm retired
// itself under the step clock: a step point like KVM_EXIT_DEBUG's.
const exitEmulated kvm.ExitReason = 0xffff_0001

func (m *Machine) initStep() error {
	if n, err := m.sys.CheckExtension(kvm.CapSetGuestDebug); err != nil {
		return err
	} else if n == 0 {
		return fmt.Errorf("%w: KVM lacks KVM_CAP_SET_GUEST_DEBUG, which single-stepping needs", ErrStepClock)
	}
	rearm, ok, detail := stepBehaviour(m.sys)
	if !ok {
		return fmt.Errorf("%w: single-step on this KVM is not exact (%s), so instructions would go uncounted; ftkvm refuses the step clock here (`ftkvm probe`)", ErrStepClock, detail)
	}
	// The guest-debug state is set at the first stepBefore, when the
	// registers are the guest's (KVM starts single-stepping at the RIP
	// it has then).
	s := &stepper{ring3: ring3Steps(m.sys), rearm: rearm}
	if n, err := m.sys.CheckExtension(kvm.CapSyncRegs); err != nil {
		return err
	} else {
		s.syncRegs = n&(kvm.SyncX86Regs|kvm.SyncX86Sregs) == kvm.SyncX86Regs|kvm.SyncX86Sregs
	}
	m.step = s
	// Every instruction boundary is a point: a pending interrupt enters at
	// the first one where the guest can take it. Window exits would only
	// add host-timed exits on a KVM that emulates ring 0 (quirks.go).
	m.noWindows = true
	return nil
}

// stepInvalidate forgets what the stepper cached about the vCPU and guest
// memory: after control requests, which may install a whole new state.
func (m *Machine) stepInvalidate() {
	m.step.fresh = false
	m.step.scanned = false
	m.step.recheck = true
	m.step.msrsValid = false
	m.step.armedOK = false
}

// stepState returns the vCPU's registers: those KVM synced into kvm_run at
// the last exit when they are current, else read with two ioctls.
func (m *Machine) stepState() (*kvm.Regs, *kvm.Sregs, error) {
	s := m.step
	if s.syncRegs && s.fresh {
		sr := m.run.SyncRegs()
		return &sr.Regs, &sr.Sregs, nil
	}
	if err := m.vcpu.GetRegs(&s.regs); err != nil {
		return nil, nil, err
	}
	if err := m.vcpu.GetSregs(&s.sregs); err != nil {
		return nil, nil, err
	}
	return &s.regs, &s.sregs, nil
}

// stepEnter prepares KVM_RUN under the step clock: ask KVM to sync the
// registers out at the exit.
func (m *Machine) stepEnter() {
	if m.step.syncRegs {
		m.run.ValidRegs = kvm.SyncX86Regs | kvm.SyncX86Sregs
	}
	// No interrupt windows (initStep), not even one an installed
	// snapshot asked for: their exits are host-timed on this KVM.
	m.run.RequestInterruptWindow = 0
	m.step.entryBusy = !m.quiescent
}

// stepKick makes sense of a kick (KVM_RUN returned EINTR) under the step
// clock. A signal can end KVM_RUN between an instruction that MergesNext
// and the one-time breakpoint after it: the instruction retired, and the
// kick is its step (true). If the vCPU moved otherwise without a step
// exit, instructions ran that the step clock did not count: an error.
// Moves that are no instructions are fine: delivering an event (the
// handler's entry point), completing a port or MMIO access.
func (m *Machine) stepKick() (bool, error) {
	s := m.step
	var rip uint64
	if s.syncRegs {
		rip = m.run.SyncRegs().Regs.RIP
	} else {
		var regs kvm.Regs
		if err := m.vcpu.GetRegs(&regs); err != nil {
			return false, err
		}
		rip = regs.RIP
	}
	lin := rip
	if s.syncRegs {
		sr := m.run.SyncRegs()
		lin = insn.Linear(&sr.Sregs, rip, insn.CodeMode(&sr.Sregs, sr.Regs.RFLAGS))
	}
	switch {
	case rip == s.entryRIP:
		return false, nil // nothing ran (an event stays pending)
	case s.entryEvent && (!s.shotSet || lin == s.shot):
		// Delivered: RIP is the handler's entry (or unknown: no handler
		// was found to guard).
		s.injected, s.raised = false, false
		return false, nil
	case s.shotSet && lin == s.shot:
		return s.shotCounts, nil
	case s.entryBusy:
		// KVM completed a port or MMIO access (and may have delivered
		// an event after it).
		if s.entryEvent {
			// Whether the event entered too: ask KVM before the next run.
			s.injected, s.raised, s.recheck = false, false, true
		}
		return false, nil
	}
	return false, fmt.Errorf("%w: the vCPU went from rip %#x to %#x in a KVM_RUN that a signal ended, without a single-step exit: instructions ran uncounted",
		ErrStepClock, s.entryRIP, rip)
}

// stepRan records that KVM_RUN returned. Any return but a kick means the
// guest ran, so an event it was to deliver first has been delivered.
func (m *Machine) stepRan(reason kvm.ExitReason) {
	s := m.step
	s.fresh = s.syncRegs
	if reason != kvm.ExitIntr {
		s.injected, s.raised = false, false
	}
}

// stepBefore runs before every KVM_RUN under the step clock. It returns
// true when it retired an instruction itself (its point has been
// processed; the caller starts its loop again, as after an exit).
func (m *Machine) stepBefore() (bool, error) {
	s := m.step
	s.shotSet = false // it served the KVM_RUN it was set for
	regs, sregs, err := m.stepState()
	if err != nil {
		return false, err
	}
	cpl := insn.CPL(sregs, regs.RFLAGS)
	if cpl != 0 && !s.ring3 {
		return false, fmt.Errorf("%w: the guest is at ring 3 (rip %#x) and its instructions would run uncounted; ftkvm stopped it before running any (`ftkvm probe`: single-step ring 3 no)",
			ErrStepRing3, regs.RIP)
	}
	mem := m.mem.Bytes()
	if !s.scanned || sregs.IDT != s.idt {
		if err := m.scanIDT(sregs, mem); err != nil {
			return false, err
		}
	}
	if s.recheck {
		s.recheck = false
		var ev kvm.VCPUEvents
		if err := m.vcpu.GetVCPUEvents(&ev); err != nil {
			return false, fmt.Errorf("step clock: %w", err)
		}
		s.raised = ev.Exception.Injected != 0 || ev.Exception.Pending != 0 || ev.NMI.Injected != 0
		if ev.Interrupt.Injected != 0 {
			s.injected, s.vector = true, ev.Interrupt.Nr
		}
		if ev.Exception.Injected != 0 || ev.Exception.Pending != 0 {
			s.vector = ev.Exception.Nr
		}
	}
	if s.injected || s.raised {
		// The next entry delivers an event first: what runs is its
		// handler, not the instruction at RIP (that runs after the
		// handler returns, and is looked at then). Check the injected
		// vector's handler again: its code may have changed since the
		// scan.
		if s.injected {
			if err := m.checkVector(s.vector, sregs, mem); err != nil {
				return false, err
			}
		}
		// Stop at the handler's entry, before its first instruction: this
		// KVM would run that instruction with the delivery, unseen, and a
		// KVM that steps with the guest's TF would run the whole handler
		// (delivery clears TF). From the entry, stepping goes on.
		if entry, _ := m.handler(s.vector, sregs, mem); entry != 0 {
			s.shot, s.shotSet, s.shotCounts = entry, true, false
		}
		// The flags stay set until a KVM_RUN delivers the event (stepRan,
		// stepKick): a kick before the guest entered leaves it pending.
		s.entryRIP, s.entryEvent = regs.RIP, true
		return false, m.armGuards(^uint64(0))
	}
	s.entryRIP, s.entryEvent = regs.RIP, false
	mode := insn.CodeMode(sregs, regs.RFLAGS)
	lin := insn.Linear(sregs, regs.RIP, mode)
	n := insn.PagingOf(sregs).Fetch(mem, lin, s.buf[:])
	in := insn.Decode(s.buf[:n], mode)
	if stepHook != nil {
		stepHook(m, regs.RIP, mode, s.buf[:n], in)
	}
	if in.Kind == insn.None {
		return false, m.armGuards(lin)
	}
	if in.Kind != insn.HLT && !insn.Confirm(s.buf[:n], mode, in) {
		return false, fmt.Errorf("%w: its decoder and x86asm disagree on the instruction at rip %#x (% x); stopping rather than guess",
			ErrStepClock, regs.RIP, s.buf[:n])
	}
	switch {
	case in.Kind.Environment() || in.Kind == insn.Undefined:
		return m.stepEmulate(in, mode, cpl, regs, sregs)
	case in.Kind == insn.HLT && cpl == 0:
		// HLT retires (RIP past it) and the CPU waits: exactly a KVM
		// HLT exit from here on.
		insn.Advance(regs, mode, in.Len)
		if err := m.stepSetRegs(regs); err != nil {
			return false, err
		}
		m.Stats.Steps++
		return true, m.exit(kvm.ExitHLT)
	case in.Kind == insn.WRMSR:
		s.msrsValid = false
	}
	if in.Kind.LeavesRing0() && cpl == 0 && !s.ring3 {
		if to, ok := insn.TargetCPL(in, mode, sregs, regs, mem); ok && to != 0 {
			return false, fmt.Errorf("%w: the guest is about to enter ring %d (%v at rip %#x); ftkvm stopped it before that instruction (`ftkvm probe`: single-step ring 3 no)",
				ErrStepRing3, to, in.Kind, regs.RIP)
		}
	}
	if in.Kind.Shadows() {
		// The next instruction runs in the same step on hardware, and no
		// breakpoint can stop before it: it must not be one ftkvm has to
		// carry out.
		var next [insn.MaxLen]byte
		r := *regs
		insn.Advance(&r, mode, in.Len)
		k := insn.PagingOf(sregs).Fetch(mem, insn.Linear(sregs, r.RIP, mode), next[:])
		if nin := insn.Decode(next[:k], mode); nin.Kind != insn.None && nin.Kind != insn.WRMSR {
			return false, fmt.Errorf("%w: %v follows %v at rip %#x, in its interrupt shadow, where the step clock cannot stop to carry it out",
				ErrStepClock, nin.Kind, in.Kind, regs.RIP)
		}
	}
	if in.Kind.LosesStep() {
		// KVM would run the next instruction in the same step, unseen, or
		// stop stepping: stop the vCPU before it instead.
		if next, ok := insn.Next(in, mode, sregs, regs, mem, m.stepMSR); ok {
			s.shot, s.shotSet, s.shotCounts = next, true, true
		}
	}
	return false, m.armGuards(lin)
}

// stepMSR reads LSTAR or SYSENTER_EIP for insn.Next, from the cache.
func (m *Machine) stepMSR(idx uint32) (uint64, bool) {
	s := m.step
	if !s.msrsValid {
		s.msrs = [2]kvm.MSREntry{{Index: insn.MSRLSTAR}, {Index: insn.MSRSysenterIP}}
		if n, err := m.vcpu.GetMSRs(s.msrs[:]); err != nil || n != len(s.msrs) {
			return 0, false
		}
		s.msrsValid = true
	}
	for _, e := range s.msrs {
		if e.Index == idx {
			return e.Data, true
		}
	}
	return 0, false
}

// stepEmulate carries out an environment instruction (insn.Emulate).
func (m *Machine) stepEmulate(in insn.Insn, mode insn.Mode, cpl uint8, regs *kvm.Regs, sregs *kvm.Sregs) (bool, error) {
	f := insn.FeaturesFromCPUID(m.cpuid)
	// The TSC is read from the environment only when the instruction
	// really reads it: every Now is an environment read a replica logs.
	var tsc uint64
	if (in.Kind == insn.RDTSC || (in.Kind == insn.RDTSCP && f.RDTSCP)) && (cpl == 0 || sregs.CR4&cr4TSD == 0) {
		tsc = uint64(m.env.Now()) + m.tscOffset
	}
	out, needsSource := insn.Emulate(in, mode, regs, cpl, sregs.CR4, f, tsc, 0)
	if needsSource {
		return false, fmt.Errorf("%w: the guest executed %v at rip %#x, which its CPUID exposes, and the environment has no source of randomness for it",
			ErrStepClock, in.Kind, regs.RIP)
	}
	m.Stats.Emulated++
	switch out {
	case insn.FaultUD:
		return false, m.raise(6, false)
	case insn.FaultGP:
		return false, m.raise(13, true)
	}
	if err := m.stepSetRegs(regs); err != nil {
		return false, err
	}
	return true, m.exit(exitEmulated)
}

// stepSetRegs writes registers ftkvm changed by carrying out an
// instruction, and ends an STI or MOV SS interrupt shadow that covered it:
// the instruction retired, so the shadow is over, but KVM did not see it
// run. kvm_run's ready_for_interrupt_injection, which inject reads, is
// updated to match (KVM rewrites it at the next exit); otherwise a guest
// idling with "sti; hlt" would never take the interrupt it waits for.
func (m *Machine) stepSetRegs(regs *kvm.Regs) error {
	if err := m.vcpu.SetRegs(regs); err != nil {
		return fmt.Errorf("step clock: %w", err)
	}
	m.step.armedOK = false // single-stepping starts anew at the new RIP
	// IF as the instruction left it (kvm_run's if_flag is the last
	// exit's): an instruction ftkvm carries out that changed IF must not
	// leave inject reading a stale flag.
	ifFlag := uint8(regs.RFLAGS >> 9 & 1)
	m.run.IfFlag = ifFlag
	if m.run.ReadyForInterruptInjection != 0 {
		m.run.ReadyForInterruptInjection = ifFlag
		return nil // no shadow at the last exit
	}
	var ev kvm.VCPUEvents
	if err := m.vcpu.GetVCPUEvents(&ev); err != nil {
		return fmt.Errorf("step clock: %w", err)
	}
	if ev.Interrupt.Shadow != 0 {
		ev.Interrupt.Shadow = 0
		ev.Flags |= kvm.VCPUEventValidShadow
		if err := m.vcpu.SetVCPUEvents(&ev); err != nil {
			return fmt.Errorf("step clock: %w", err)
		}
	}
	// No event is pending here (stepBefore emulates nothing then), so
	// the guest can take an interrupt exactly when IF is set.
	m.run.ReadyForInterruptInjection = ifFlag
	return nil
}

// raise makes the next KVM_RUN deliver exception vec (a fault: RIP stays on
// the instruction), with error code 0 if hasErr.
func (m *Machine) raise(vec uint8, hasErr bool) error {
	var ev kvm.VCPUEvents
	if err := m.vcpu.GetVCPUEvents(&ev); err != nil {
		return fmt.Errorf("step clock: %w", err)
	}
	ev.Exception = kvm.ExceptionState{Injected: 1, Nr: vec}
	m.step.vector = vec
	if hasErr {
		ev.Exception.HasErrorCode = 1
	}
	if err := m.vcpu.SetVCPUEvents(&ev); err != nil {
		return fmt.Errorf("step clock: raise exception %d: %w", vec, err)
	}
	m.step.raised = true
	return nil
}

const cr4TSD = 1 << 2

// stepTrap classifies a KVM_EXIT_DEBUG under the step clock: true for the
// trap after one retired instruction, or the one-time breakpoint after an
// instruction that MergesNext (it retired); false for a guard breakpoint
// (the vCPU stopped before a handler's first instruction; nothing retired,
// so it is no point).
func (m *Machine) stepTrap() (bool, error) {
	d := m.run.Debug()
	switch {
	case m.step == nil:
		return false, m.exitError(kvm.ExitDebug)
	case d.SingleStep():
		return true, nil
	case d.Breakpoints() != 0:
		return m.step.shotSet && m.step.shotCounts && d.PC == m.step.shot, nil
	}
	return false, fmt.Errorf("%w: debug exit that is neither a step nor a breakpoint (exception %d, DR6 %#x, at %#x)",
		ErrStepClock, d.Exception, d.DR6, d.PC)
}

// stepCheckExit runs at every return from KVM_RUN under the step clock,
// before the exit is acted on. An exit that a one-time breakpoint should
// have preceded means instructions ran unstepped: an error, never a
// silent miscount. And a guest found at ring 3 on a KVM that cannot
// step it ran uncounted since it got there, so nothing it did (a port
// write, say) may take effect. stepBefore stops the known ways into ring 3
// before they run; this catches any other.
func (m *Machine) stepCheckExit(reason kvm.ExitReason) error {
	s := m.step
	switch reason {
	case kvm.ExitIO, kvm.ExitMMIO, kvm.ExitHLT, kvm.ExitX86RDMSR, kvm.ExitX86WRMSR:
		// None of the instructions a one-time breakpoint follows exits
		// this way, and an event's delivery does not either: the vCPU
		// ran past the breakpoint without stopping there, uncounted.
		if s.shotSet {
			what := "the instruction"
			if !s.shotCounts {
				what = "an event's delivery"
			}
			return fmt.Errorf("%w: after %s at rip %#x the vCPU ran past the breakpoint at %#x to an exit (%v) without stopping there: instructions ran uncounted",
				ErrStepClock, what, s.entryRIP, s.shot, reason)
		}
	}
	if s.ring3 || !s.syncRegs || !s.fresh {
		return nil // without synced registers the next stepBefore checks
	}
	sr := m.run.SyncRegs()
	if insn.CPL(&sr.Sregs, sr.Regs.RFLAGS) != 0 {
		return fmt.Errorf("%w: the guest reached ring 3 without ftkvm seeing the instruction that took it there, and ran there uncounted up to rip %#x; ftkvm stopped before acting on its exit",
			ErrStepRing3, sr.Regs.RIP)
	}
	return nil
}

// scanIDT decodes the first instruction of every interrupt handler and
// collects those that need a guard.
func (m *Machine) scanIDT(sregs *kvm.Sregs, mem []byte) error {
	s := m.step
	s.idt, s.scanned = sregs.IDT, true
	s.handlers, s.danger = [256]uint64{}, [256]bool{}
	for v := range 256 {
		s.handlers[v], s.danger[v] = m.handler(uint8(v), sregs, mem)
	}
	return m.collectGuards(sregs)
}

// checkVector looks at vector v's handler again; if it changed since the
// scan, the guards are collected anew.
func (m *Machine) checkVector(v uint8, sregs *kvm.Sregs, mem []byte) error {
	s := m.step
	h, d := m.handler(v, sregs, mem)
	if h == s.handlers[v] && d == s.danger[v] {
		return nil
	}
	s.handlers[v], s.danger[v] = h, d
	return m.collectGuards(sregs)
}

func (m *Machine) collectGuards(sregs *kvm.Sregs) error {
	s := m.step
	s.nguards = 0
	for v := range 256 {
		if !s.danger[v] {
			continue
		}
		h, dup := s.handlers[v], false
		for _, g := range s.guards[:s.nguards] {
			dup = dup || g == h
		}
		if dup {
			continue
		}
		if s.nguards == len(s.guards) {
			return fmt.Errorf("%w: more than %d distinct interrupt handlers (vector %d at %#x among them) start with an instruction the step clock must see before it runs (IDT at %#x); it can guard only %d",
				ErrStepClock, len(s.guards), v, h, sregs.IDT.Base, len(s.guards))
		}
		s.guards[s.nguards] = h
		s.nguards++
	}
	return nil
}

// handler returns the linear entry point of vector v's handler and whether
// its first instruction is one stepBefore must see (0, false when there is
// no usable gate). Gate formats: 16-byte gates in long mode, 8-byte gates
// in protected mode (the segment base from the GDT), the 4-byte real-mode
// vector table.
func (m *Machine) handler(v uint8, sregs *kvm.Sregs, mem []byte) (uint64, bool) {
	pg := insn.PagingOf(sregs)
	idt := sregs.IDT
	var entry uint64
	mode := insn.Mode64
	switch {
	case sregs.CR0&1 == 0:
		if uint64(v)*4+3 > uint64(idt.Limit) {
			return 0, false
		}
		e, ok := pg.Read(mem, idt.Base+uint64(v)*4, 4)
		if !ok {
			return 0, false
		}
		entry, mode = (e>>16)<<4+e&0xffff, insn.Mode16
	case sregs.EFER&(1<<10) != 0:
		if uint64(v)*16+15 > uint64(idt.Limit) {
			return 0, false
		}
		lo, ok1 := pg.Read(mem, idt.Base+uint64(v)*16, 8)
		hi, ok2 := pg.Read(mem, idt.Base+uint64(v)*16+8, 4)
		if !ok1 || !ok2 || lo&(1<<47) == 0 {
			return 0, false
		}
		entry = lo&0xffff | (lo>>48)<<16 | hi<<32
	default:
		if uint64(v)*8+7 > uint64(idt.Limit) {
			return 0, false
		}
		g, ok := pg.Read(mem, idt.Base+uint64(v)*8, 8)
		if !ok || g&(1<<47) == 0 || (g>>40)&0x1f == 0x05 { // not present, or a task gate
			return 0, false
		}
		sel := (g >> 16) & 0xfff8
		if (g>>16)&4 != 0 || sel+7 > uint64(sregs.GDT.Limit) {
			return 0, false // an LDT selector, or beyond the GDT
		}
		d, ok := pg.Read(mem, sregs.GDT.Base+sel, 8)
		if !ok {
			return 0, false
		}
		base := (d>>16)&0xffffff | (d>>56)<<24
		entry = (base + (g&0xffff | (g>>48)<<16)) & 0xffff_ffff
		mode = insn.Mode16
		if d&(1<<54) != 0 {
			mode = insn.Mode32
		}
	}
	s := m.step
	n := pg.Fetch(mem, entry, s.buf[:])
	in := insn.Decode(s.buf[:n], mode)
	danger := in.Kind.Environment() || in.Kind == insn.Undefined || (in.Kind.LeavesRing0() && !s.ring3)
	return entry, danger
}

// armGuards gives KVM the guard breakpoints, except one at skip: the vCPU
// is about to run the instruction there, which stepBefore has looked at,
// and a breakpoint would stop it before it forever; and the one-time
// breakpoint if one is set. The ioctl is issued only when the set changes.
func (m *Machine) armGuards(skip uint64) error {
	s := m.step
	var want [kvm.MaxBreakpoints]uint64
	n := 0
	for _, g := range s.guards[:s.nguards] {
		if g != skip && !(s.shotSet && g == s.shot) {
			want[n] = g
			n++
		}
	}
	if s.shotSet {
		if n == len(want) {
			return fmt.Errorf("%w: four interrupt handlers are guarded, and the instruction at the next breakpoint needs one more", ErrStepClock)
		}
		want[n] = s.shot
		n++
	}
	if s.armedOK && !s.rearm && n == s.narmed && want == s.armed {
		return nil
	}
	d, err := kvm.StepDebug(true, want[:n]...)
	if err != nil {
		return err
	}
	if err := m.vcpu.SetGuestDebug(&d); err != nil {
		return fmt.Errorf("step clock: %w", err)
	}
	s.armed, s.narmed, s.armedOK = want, n, true
	return nil
}

// stepHook, for tests only, sees every instruction stepBefore decodes.
var stepHook func(m *Machine, rip uint64, mode insn.Mode, code []byte, in insn.Insn)
