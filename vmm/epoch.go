package vmm

import (
	"errors"
	"fmt"
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
	// without exiting (RDTSC) is invisible to ftkvm (REPLICATION-NOTES).
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
	// EpochPerf would count instructions with a hardware performance
	// counter and single-step only the last few (vmm/perfclock holds the
	// algorithm). No host ftkvm runs on has counters: New fails with
	// ErrNoPerfCounters, and where counters exist, with an error saying the
	// clock is not implemented.
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
	// counters, and perf_event_open found none.
	ErrNoPerfCounters = errors.New("the perf epoch clock needs hardware performance counters, and this host has none")
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
		if ok, detail := probePMU(); !ok {
			return fmt.Errorf("%w (%s); the step clock (ring-0 guests on this host) and the exit clock work without them", ErrNoPerfCounters, detail)
		}
		return errors.New("the perf epoch clock is not implemented: this host has counters, but ftkvm has only its algorithm (vmm/perfclock); use the step clock or the exit clock")
	}
	return fmt.Errorf("unknown epoch clock %d", cfg.Epoch)
}

// PerfClockUsable reports, for `ftkvm probe`, whether the perf epoch clock
// can run here: never yet (it is not implemented), and the reason.
func PerfClockUsable(r *ProbeReport) (bool, string) {
	if !r.PMU {
		return false, "no hardware performance counters: " + r.PMUDetail
	}
	return false, "counters found, but the perf clock is not implemented"
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
