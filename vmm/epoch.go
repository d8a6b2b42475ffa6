package vmm

import (
	"errors"
	"fmt"
	"slices"
	"sync"

	"github.com/ftkvm/ftkvm/kvm"
)

// EpochClock is how the machine measures a position in the guest's
// execution: where the environment may deliver an event so that another
// run of the same guest finds the same place (Point).
type EpochClock uint8

const (
	// EpochExit counts guest-caused exits; Point.Instrs is always 0. The
	// guest runs at full speed, but an instruction that reads the host
	// without exiting (RDTSC) is invisible to ftkvm (docs/KVM-HOSTS.md).
	EpochExit EpochClock = iota
	// EpochStep single-steps every guest instruction (KVM_GUESTDBG_SINGLESTEP):
	// positions are (exits, instructions since the last exit), every
	// instruction boundary is a delivery point (PointStep), and RDTSC,
	// RDTSCP, RDRAND, RDSEED and RDPID are decoded and carried out by ftkvm
	// with values from the environment, never executed by KVM. It works
	// where KVM single-steps: at ring 0 on this project's hosts (guest ring
	// 3 is refused with ErrStepRing3), at every ring on a KVM with native
	// ring 0. It runs at the speed of one KVM_RUN per instruction
	// (~50-140k instructions/s).
	EpochStep
	// EpochPerf would count the guest's retired conditional branches with
	// a hardware performance counter and single-step only the last few
	// instructions before a target (vmm/perfclock: the counter, the
	// algorithm, positions). New fails with ErrPerfClock naming the first
	// missing piece (PerfClockUsable), wrapping ErrNoPerfCounters where
	// there is no usable PMU; with every piece present it fails too, since
	// the vCPU loop does not run the clock yet.
	EpochPerf
)

var epochNames = [...]string{EpochExit: "exit", EpochStep: "step", EpochPerf: "perf"}

func (c EpochClock) String() string {
	if int(c) < len(epochNames) {
		return epochNames[c]
	}
	return fmt.Sprintf("epoch clock %d", uint8(c))
}

// ParseEpochClock parses "exit", "step" or "perf".
func ParseEpochClock(s string) (EpochClock, error) {
	for c, name := range epochNames {
		if s == name {
			return EpochClock(c), nil
		}
	}
	return 0, fmt.Errorf("unknown epoch clock %q (want exit, step or perf)", s)
}

var (
	// ErrNoPerfCounters: the perf epoch clock needs hardware performance
	// counters, and none can be used here (none exist, or
	// perf_event_paranoid forbids them).
	ErrNoPerfCounters = errors.New("it needs hardware performance counters")
	// ErrStepRing3: under the step clock the guest reached, or was about to
	// enter, ring 3 on a KVM whose single-step trap at ring 3 goes to the
	// guest instead of to ftkvm. Run stops instead of running instructions
	// it cannot count.
	ErrStepRing3 = errors.New("the step clock cannot count ring-3 instructions on this KVM")
	// ErrStepClock: the step clock met something it cannot handle
	// deterministically (the error says what); Run stops.
	ErrStepClock = errors.New("step clock")
)

// initEpoch sets up the epoch clock cfg asks for, on a machine whose vCPU
// exists.
func (m *Machine) initEpoch(cfg *Config) error {
	switch cfg.Epoch {
	case EpochExit:
		return nil
	case EpochStep:
		return m.initStep()
	case EpochPerf:
		r := &ProbeReport{}
		probePerf(m.sys, r)
		r.SingleStepRing0, r.SingleStepRing0Detail = singleStep(m.sys, 0)
		_, r.StepExact, r.StepExactDetail = stepBehaviour(m.sys)
		r.Breakpoints, r.BreakpointsDetail = breakpointStops(m.sys)
		_, why := PerfClockUsable(r)
		return &perfClockError{why: why, noPMU: !r.PMU}
	}
	return fmt.Errorf("unknown epoch clock %d", cfg.Epoch)
}

// perfClockError is ErrPerfClock with its missing piece, and also
// ErrNoPerfCounters where that piece is the PMU.
type perfClockError struct {
	why   string
	noPMU bool
}

func (e *perfClockError) Error() string { return ErrPerfClock.Error() + ": " + e.why }

func (e *perfClockError) Is(target error) bool {
	return target == ErrPerfClock || e.noPMU && target == ErrNoPerfCounters
}

// PerfClockUsable reports, for `ftkvm probe` and `--epoch perf`, whether
// the perf epoch clock can run here, or the first piece it lacks: a PMU
// it may use, an exact event for this CPU, guest-only counting, a measured
// skid, working instruction breakpoints, exact single-step. With all of
// them it still cannot: the vCPU loop does not drive the clock yet
// (docs/PERF-CLOCK.md).
func PerfClockUsable(r *ProbeReport) (bool, string) {
	switch {
	case !r.PMU:
		return false, r.PMUDetail
	case !r.PerfEventKnown:
		return false, "no exact event: " + r.PerfEvent
	case !r.PerfGuestOnly:
		return false, r.PerfGuestOnlyDetail
	case r.PerfSkidDetail != "":
		return false, "skid not measured: " + r.PerfSkidDetail
	case !r.Breakpoints:
		return false, "no working breakpoints: " + r.BreakpointsDetail
	case !r.SingleStepRing0 || !r.StepExact:
		detail := r.StepExactDetail
		if !r.SingleStepRing0 {
			detail = r.SingleStepRing0Detail
		}
		return false, "no exact single-step: " + detail
	}
	return false, fmt.Sprintf("every piece is here (%s, guest-only, skid up to %d, margin %d), but ftkvm's vCPU loop does not run the perf clock yet", r.PerfEvent, r.PerfSkid, r.PerfMargin)
}

// StepClockUsable reports whether the step clock can run a guest on the KVM
// of a probe report, and at which rings, for `ftkvm probe`.
func StepClockUsable(r *ProbeReport) (usable bool, detail string) {
	var setGuestDebug bool
	for _, c := range r.Caps {
		if c.Cap == kvm.CapSetGuestDebug && c.Value > 0 {
			setGuestDebug = true
		}
	}
	switch {
	case !setGuestDebug:
		return false, "KVM lacks KVM_CAP_SET_GUEST_DEBUG"
	case r.SingleStepRing0 && !r.StepExact:
		return false, "single-step is not exact here: " + r.StepExactDetail
	case r.SingleStepRing0 && r.SingleStepRing3:
		return true, "guests at every ring"
	case r.SingleStepRing0:
		return true, "ring-0 guests only: single-step at ring 3 does not reach ftkvm, so a guest entering ring 3 is stopped"
	}
	return false, "single-step does not work at ring 0"
}

var ring3StepProbe struct {
	once sync.Once
	ok   bool
}

// ring3Steps reports, once per process, whether single-step traps at guest
// ring 3 reach user space on this KVM (the probe's three-nop test).
func ring3Steps(sys *kvm.System) bool {
	ring3StepProbe.once.Do(func() {
		ring3StepProbe.ok, _ = singleStep(sys, 3)
	})
	return ring3StepProbe.ok
}

var stepProbe struct {
	once      sync.Once
	rearm, ok bool
	detail    string
}

// stepBehaviour reports, once per process, how this KVM single-steps
// (stepHow).
func stepBehaviour(sys *kvm.System) (rearm, ok bool, detail string) {
	stepProbe.once.Do(func() {
		stepProbe.rearm, stepProbe.ok, stepProbe.detail = stepHow(sys)
	})
	return stepProbe.rearm, stepProbe.ok, stepProbe.detail
}

// stepHow measures two things about KVM_GUESTDBG_SINGLESTEP here.
//
// rearm: whether single-stepping survives a POPF that loads TF clear. A
// KVM that steps by setting TF in the guest (a hardware-virtualised one:
// the nested tier's kvm_amd) loses it there, and after any instruction it
// emulates at the RIP where stepping was last requested; such a KVM needs
// KVM_SET_GUEST_DEBUG before every KVM_RUN, which starts stepping anew at
// the current RIP. This project's KVM checks the request itself for every
// instruction it emulates: no need (and an ioctl costs ~8 µs here).
//
// ok: whether, stepping that way, every instruction ends in its own step
// across a port write and a write to a page the guest never touched (a
// nested page fault on a hardware-virtualised KVM). If not, the step
// clock would miss instructions, and it refuses to run.
func stepHow(sys *kvm.System) (rearm, ok bool, detail string) {
	const c = probeCode
	popf := []byte{
		0x6a, 0x02, // c+0: push 2
		0x9d,       // c+2: popfq
		0x90,       // c+3: nop
		0x90,       // c+4: nop
		0xe6, 0x80, // c+5: out 0x80, al
		0xe6, 0x81, // c+7: out 0x81, al
		0xf4,
	}
	pcs, err := stepTrace(sys, popf, false)
	if err != nil {
		return false, false, err.Error()
	}
	rearm = !slices.Equal(pcs[0], []uint64{c + 2, c + 3, c + 4, c + 5})
	code := []byte{
		0xe6, 0x80, // c+0:  out 0x80, al
		0x90,                                     // c+2:  nop
		0x90,                                     // c+3:  nop
		0x89, 0x04, 0x25, 0x00, 0x00, 0x30, 0x00, // c+4:  mov [0x300000], eax (a page never touched)
		0x90,       // c+0xb: nop
		0x90,       // c+0xc: nop
		0xe6, 0x81, // c+0xd: out 0x81, al
		0xf4, //       c+0xf: hlt
	}
	if pcs, err = stepTrace(sys, code, rearm); err != nil {
		return rearm, false, err.Error()
	}
	// After the port write: each instruction in its own step (the write's
	// own completion may add one at c+2).
	after := pcs[1]
	if len(after) > 0 && after[0] == c+2 {
		after = after[1:]
	}
	if want := []uint64{c + 3, c + 4, c + 0xb, c + 0xc, c + 0xd}; !slices.Equal(after, want) {
		if len(after) == 0 || after[0] != want[0] {
			return rearm, false, "after a port write KVM runs on without single-step traps"
		}
		return rearm, false, fmt.Sprintf("steps stopped at %#x, want %#x (a write to a fresh page loses single-step traps)", after, want)
	}
	if ok, detail := breakpointStops(sys); !ok {
		return rearm, false, detail
	}
	how := "every instruction stepped across a port write and a write to a fresh page, and an instruction breakpoint stopped the vCPU"
	if rearm {
		how += ", with single-stepping requested anew before each instruction"
	}
	return rearm, true, how
}

// breakpointStops checks that a KVM_GUESTDBG_USE_HW_BP instruction
// breakpoint stops the vCPU before the instruction: the step clock relies
// on one after the instructions that lose the step (insn.LosesStep) and at
// the entry of every event handler. Measured: the nested tier's kvm_amd
// under QEMU 7.2's TCG never stops there (QEMU before 9.1 loads the
// guest's DR7 at VMRUN without arming its breakpoints), and event handlers
// then ran uncounted up to their first port write.
func breakpointStops(sys *kvm.System) (bool, string) {
	const c = probeCode
	p, err := newProbeVM(sys, 0, []byte{0x90, 0x90, 0x90, 0xe6, 0x80, 0xf4})
	if err != nil {
		return false, err.Error()
	}
	defer p.Close()
	d, err := kvm.StepDebug(false, c+2)
	if err != nil {
		return false, err.Error()
	}
	if err := p.vcpu.SetGuestDebug(&d); err != nil {
		return false, err.Error()
	}
	for range 16 {
		reason, err := p.vcpu.Run()
		switch {
		case err != nil:
			return false, err.Error()
		case reason == kvm.ExitIntr:
			continue
		case reason == kvm.ExitDebug:
			if pc := p.vcpu.RunData().Debug().PC; pc != c+2 {
				return false, fmt.Sprintf("an instruction breakpoint at %#x stopped the vCPU at %#x", c+2, pc)
			}
			return true, ""
		}
		return false, fmt.Sprintf("an instruction breakpoint at %#x did not stop the vCPU, which ran on to %v", c+2, reason)
	}
	return false, "the breakpoint probe never got past signals"
}

// stepTrace single-steps code in a ring-0 probe VM up to its second port
// write and returns the step exits' PCs before the first port write and
// between the two. With rearm, it requests single-stepping before every
// KVM_RUN.
func stepTrace(sys *kvm.System, code []byte, rearm bool) ([2][]uint64, error) {
	var pcs [2][]uint64
	p, err := newProbeVM(sys, 0, code)
	if err != nil {
		return pcs, err
	}
	defer p.Close()
	if err := p.vcpu.SetSingleStep(true); err != nil {
		return pcs, err
	}
	part := 0
	for n := 0; n < 64; n++ {
		if rearm {
			if err := p.vcpu.SetSingleStep(true); err != nil {
				return pcs, err
			}
		}
		reason, err := p.vcpu.Run()
		switch {
		case err != nil:
			return pcs, err
		case reason == kvm.ExitIntr:
			continue
		case reason == kvm.ExitIO:
			if part == 1 {
				return pcs, nil
			}
			part++
		case reason == kvm.ExitDebug:
			pcs[part] = append(pcs[part], p.vcpu.RunData().Debug().PC)
		case reason == kvm.ExitHLT:
			return pcs, nil
		default:
			return pcs, fmt.Errorf("%v while single-stepping", reason)
		}
	}
	return pcs, errors.New("single-stepping did not reach the probe's end")
}
