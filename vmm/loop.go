package vmm

import (
	"errors"
	"fmt"
	"runtime"

	"github.com/ftkvm/ftkvm/kvm"
)

// ErrGuest wraps failures of the guest itself (triple fault, emulation
// failure), as opposed to failures of ftkvm or KVM.
var ErrGuest = errors.New("guest failed")

// Run runs the guest until it stops: through the debug-exit port (its
// status is returned), a reset request, the environment (ErrQuit), the
// control API (an error wrapping ErrStopped), or an error. It must be called
// once; it locks the calling goroutine to its OS thread because KVM binds a
// vCPU to the thread that runs it and kicks signal that thread.
//
// The loop is the exit path (~100k times a second): it allocates nothing,
// logs nothing and takes no locks. Its one check for control requests (Do,
// Post) is a single atomic load per iteration.
func (m *Machine) Run() (int, error) {
	if !m.installed {
		return 0, errors.New("vmm: the machine has no guest state (NewEmpty without Install)")
	}
	if !m.ctl.start() {
		return 0, errors.New("vmm: Run called twice")
	}
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	m.vcpu.BindThread()
	defer m.vcpu.UnbindThread()
	defer m.ctl.finish()
	if err := m.env.Start(m.kick); err != nil {
		return 0, fmt.Errorf("start environment: %w", err)
	}
	defer m.env.Stop()
	m.prof.runAt = m.prof.now()
	defer func() { m.prof.wallNs = m.prof.now() - m.prof.runAt }()
	// The first KVM_RUN returns at once: a kick point before any guest
	// code runs, where the environment learns the timer deadline (of a
	// fresh boot or an installed snapshot). Without it, a guest computing
	// for long before its first exit would get no ticks until then.
	m.kvcpu.Kick()

	for {
		if m.ctl.pending.Load() != 0 {
			if err := m.service(); err != nil {
				return 0, err
			}
			if m.stopped {
				return m.exitStatus, m.stopErr
			}
			if m.step != nil {
				m.stepInvalidate()
			}
		}
		if m.halted {
			// The guest waits in HLT. Halt returns when an interrupt is
			// pending, or early when a control request needs the thread.
			h := m.prof.now()
			err := m.env.Halt(m.point, m)
			m.prof.halts++
			m.prof.haltNs += m.prof.now() - h
			if err != nil {
				return 0, err
			}
			if m.stopped {
				return m.exitStatus, m.stopErr
			}
			if !m.halted {
				// An install replaced the state while the guest waited
				// (a replica's repair, ft/doc.go): the guest goes on as
				// from the point the state was captured at, where the
				// primary injected only what it delivered there (point,
				// at a kick point). Waking it as from HLT would inject a
				// pending interrupt the primary had not.
				m.injectAtPoint()
				continue
			}
			if !m.pic.HasInterrupt() {
				continue
			}
			m.halted = false
			m.inject()
		}
		if m.step != nil {
			// The step clock looks at the next instruction first, and
			// may retire it itself (a point like an exit's).
			retired, err := m.stepBefore()
			if err != nil {
				return 0, err
			}
			if m.stopped {
				return m.exitStatus, m.stopErr
			}
			if retired {
				continue
			}
			m.stepEnter()
		}
		t0 := m.prof.now()
		reason, err := m.vcpu.Run()
		t1 := m.prof.now()
		if err != nil {
			return 0, err
		}
		if m.step != nil {
			m.stepRan(reason)
		}
		err = m.exit(reason)
		m.prof.record(reason, t0, t1, m.prof.now())
		if err != nil {
			return 0, err
		}
		if m.stopped {
			return m.exitStatus, m.stopErr
		}
	}
}

// exit handles one return from KVM_RUN: the exit itself, the environment's
// delivery point, and interrupt injection. A HLT with nothing pending sets
// m.halted; Run then waits in the environment's Halt.
func (m *Machine) exit(reason kvm.ExitReason) error {
	if m.step != nil {
		if err := m.stepCheckExit(reason); err != nil {
			return err
		}
	}
	m.quiescent = false
	m.point.Kind = PointExit
	m.point.Delivered = false
	halted := false
	switch reason {
	case kvm.ExitIO:
		m.Stats.IOExits++
		m.handleIO()
	case kvm.ExitMMIO:
		m.Stats.MMIOExits++
		m.handleMMIO()
	case kvm.ExitHLT:
		// KVM completed the HLT before exiting: nothing is half-done.
		m.Stats.HaltExits++
		halted = true
		m.quiescent = true
	case kvm.ExitIRQWindowOpen:
		// An exit before entering the guest: nothing is half-done.
		m.Stats.WindowExits++
		m.quiescent = true
	case kvm.ExitX86RDMSR, kvm.ExitX86WRMSR:
		m.Stats.MSRExits++
		m.handleMSR(reason)
	case kvm.ExitIntr:
		// A kick (or a stray signal): host-timed, never a position. KVM
		// finishes any half-done instruction before it returns EINTR.
		m.vcpu.ClearImmediateExit()
		m.quiescent = true
		if m.step != nil {
			// Under the step clock it may end an instruction's step.
			if retired, err := m.stepKick(); err != nil {
				return err
			} else if retired {
				m.point.Kind = PointStep
				m.Stats.Steps++
				m.Stats.Instrs++
				break
			}
		}
		m.point.Kind = PointKick
		m.Stats.Kicks++
	case kvm.ExitDebug, exitEmulated:
		// The step clock: one instruction retired, single-stepped by KVM
		// or carried out by ftkvm (step.go). Nothing is half-done.
		if reason == kvm.ExitDebug {
			if step, err := m.stepTrap(); !step {
				m.quiescent = true
				return err // a guard breakpoint: nothing retired, no point
			}
		}
		m.quiescent = true
		m.point.Kind = PointStep
		m.Stats.Steps++
		m.Stats.Instrs++
	default:
		return m.exitError(reason)
	}
	if m.stopped {
		return nil
	}
	if m.point.Kind == PointExit {
		m.Stats.Exits++
		m.point.Exits = m.Stats.Exits
		m.Stats.Instrs = 0
	}
	m.point.Instrs = m.Stats.Instrs
	if err := m.env.At(m.point, m); err != nil {
		return err
	}
	if halted && !m.pic.HasInterrupt() {
		if m.run.IfFlag == 0 {
			// Nothing can wake a CPU halted with interrupts off: we
			// have no NMI source. Linux's power-off without ACPI ends
			// here; treat it as the guest powering off.
			m.stop(0, "guest halted with interrupts disabled (power off)")
			return nil
		}
		m.halted = true
		return nil
	}
	if m.stopped {
		return nil
	}
	m.injectAtPoint()
	return nil
}

// injectAtPoint injects (inject) at the current point, unless it is a kick
// point where nothing was delivered: there nothing new may be injected or
// requested either, since a pending interrupt the guest became ready for
// would otherwise enter at a place that depends on host timing. It waits
// for the next exit.
func (m *Machine) injectAtPoint() {
	if m.point.Kind == PointKick && !m.point.Delivered {
		return
	}
	m.inject()
}

// inject moves the PIC's highest-priority request into the vCPU if the
// guest can take it now, or asks KVM to exit as soon as it can. Both
// conditions are guest state, so at a guest-caused exit the outcome is the
// same on every replica.
func (m *Machine) inject() {
	run := m.run
	if !m.pic.HasInterrupt() {
		run.RequestInterruptWindow = 0
		return
	}
	if run.ReadyForInterruptInjection != 0 && run.IfFlag != 0 {
		vec := m.pic.Acknowledge()
		if err := m.vcpu.Interrupt(vec); err == nil {
			m.Stats.Injected++
			m.prof.vectors[vec]++
			if m.step != nil {
				m.step.injected, m.step.vector = true, vec
			}
		}
		run.RequestInterruptWindow = 0
		return
	}
	if !m.noWindows {
		if run.RequestInterruptWindow == 0 && !m.prof.off {
			m.prof.windows++
		}
		run.RequestInterruptWindow = 1
	}
}

func (m *Machine) handleIO() {
	io := m.run.IO()
	data := m.vcpu.IOData()
	size := int(io.Size)
	port := uint64(io.Port)
	m.prof.access(&m.prof.pio, m.pio, port, io.Direction == kvm.IOOut)
	m.prof.port(io.Port, io.Direction == kvm.IOOut)
	for off := 0; off+size <= len(data); off += size {
		chunk := data[off : off+size]
		if io.Direction == kvm.IOOut {
			m.pio.Write(port, chunk)
		} else {
			m.pio.Read(port, chunk)
		}
	}
}

func (m *Machine) handleMMIO() {
	mm := m.run.MMIO()
	n := min(int(mm.Len), len(mm.Data))
	m.prof.access(&m.prof.mmio, m.mmio, mm.PhysAddr, mm.IsWrite != 0)
	if mm.IsWrite != 0 {
		m.mmio.Write(mm.PhysAddr, mm.Data[:n])
	} else {
		m.mmio.Read(mm.PhysAddr, mm.Data[:n])
	}
}

// handleMSR serves the MSRs the filter traps. The TSC is virtual time at
// 1 GHz plus the offset the guest wrote; the others belong to features
// CPUID hides, and fault as on a CPU without them.
func (m *Machine) handleMSR(reason kvm.ExitReason) {
	msr := m.run.MSR()
	msr.Error = 0
	switch {
	case msr.Index == msrIA32TSC && reason == kvm.ExitX86RDMSR:
		msr.Data = uint64(m.env.Now()) + m.tscOffset
	case msr.Index == msrIA32TSC:
		m.tscOffset = msr.Data - uint64(m.env.Now())
	default:
		msr.Error = 1 // #GP
	}
}

func (m *Machine) exitError(reason kvm.ExitReason) error {
	var regs kvm.Regs
	_ = m.vcpu.GetRegs(&regs)
	rip := regs.RIP
	switch reason {
	case kvm.ExitShutdown:
		return fmt.Errorf("%w: shutdown (triple fault) at rip %#x", ErrGuest, rip)
	case kvm.ExitInternalError:
		ie := m.run.InternalError()
		return fmt.Errorf("%w: KVM internal error, suberror %d, at rip %#x (a KVM that emulates guest ring 0, such as kvm_pvm, rejects some instructions; see docs/KVM-HOSTS.md)",
			ErrGuest, ie.Suberror, rip)
	case kvm.ExitFailEntry:
		fe := m.run.FailEntry()
		return fmt.Errorf("%w: VM entry failed, hardware reason %#x", ErrGuest, fe.HardwareEntryFailureReason)
	case kvm.ExitSystemEvent:
		return fmt.Errorf("%w: system event %d", ErrGuest, m.run.SystemEvent().Type)
	}
	return fmt.Errorf("unexpected KVM exit %v at rip %#x", reason, rip)
}
