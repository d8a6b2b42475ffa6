package vmm

import (
	"errors"
	"fmt"

	"github.com/ftkvm/ftkvm/kvm"
	"github.com/ftkvm/ftkvm/vmm/perfclock"
)

// perfEngine is the perf clock's engine over one vCPU
// (perfclock.BreakpointRunner): guest runs with the counter's overflow
// armed, runs to an instruction breakpoint, single steps, and the guest's
// position. The counter must have been opened for the thread that
// calls these methods (the vCPU thread, locked to its goroutine) with
// kvm.KickSignal as its signal: the overflow then interrupts KVM_RUN the
// way a Kick does, and the Go runtime, which already handles that signal
// (it is its preemption signal), lets it through.
//
// Its methods are the exit path's: no allocation, logging or locks.
// Machine.Run does not drive it yet: it knows nothing of Kick's
// ImmediateExit, which would end every run at once until cleared.
type perfEngine struct {
	vcpu     *kvm.VCPU
	ctr      *perfclock.Counter
	base     uint64 // the count at the last guest-caused exit
	last     uint64 // the last count read
	stepping bool
	bp       bool           // an instruction breakpoint is set (RunToRIP)
	dbg      kvm.GuestDebug // RunToRIP's KVM_SET_GUEST_DEBUG argument
	// rearm requests single-stepping before every step, on a KVM that
	// steps by setting TF in the guest (stepHow).
	rearm bool
	err   error          // a failed count read, returned by the next call
	exit  kvm.ExitReason // why the last run or step stopped, when it exited
	regs  kvm.Regs
}

func newPerfEngine(vcpu *kvm.VCPU, ctr *perfclock.Counter, rearm bool) (*perfEngine, error) {
	e := &perfEngine{vcpu: vcpu, ctr: ctr, rearm: rearm}
	return e, e.MarkExit()
}

// MarkExit starts a new count: the guest has just made a guest-caused
// exit, where positions restart (Point.Exits).
func (e *perfEngine) MarkExit() error {
	n, err := e.ctr.Count()
	if err != nil {
		return err
	}
	e.base, e.last = n, n
	return nil
}

// Retired is the count since the last guest-caused exit. A failed read
// keeps the last count and fails the next run, step or Here.
func (e *perfEngine) Retired() uint64 {
	n, err := e.ctr.Count()
	if err != nil {
		e.err = err
		return e.last - e.base
	}
	e.last = n
	return n - e.base
}

// RunOverflow runs the guest with the overflow armed n events on. Any
// signal ends the run (the overflow's, a Kick, the runtime's preemption):
// the clock looks at the count and runs again if short.
func (e *perfEngine) RunOverflow(n uint64) (bool, error) {
	if e.err != nil {
		return false, e.err
	}
	if e.stepping || e.bp {
		if err := e.vcpu.SetSingleStep(false); err != nil {
			return false, err
		}
		e.stepping, e.bp = false, false
	}
	if err := e.ctr.Overflow(n); err != nil {
		return false, err
	}
	return e.run()
}

// RunToRIP runs the guest with an instruction breakpoint at rip and the
// overflow armed n events on (perfclock.BreakpointRunner). The breakpoint
// address is linear: RIP itself in long mode, where segment bases are 0.
func (e *perfEngine) RunToRIP(rip, n uint64) (bool, error) {
	if e.err != nil {
		return false, e.err
	}
	d, err := kvm.StepDebug(false, rip)
	if err != nil {
		return false, err
	}
	e.dbg = d
	if err := e.vcpu.SetGuestDebug(&e.dbg); err != nil {
		return false, err
	}
	e.stepping, e.bp = false, true
	if err := e.ctr.Overflow(n); err != nil {
		return false, err
	}
	return e.run()
}

// stepGuard is the overflow period armed while single-stepping: a step
// that KVM loses (on a KVM that steps with the guest's TF, an exception
// entering its handler clears it; docs/STEP-CLOCK.md) lets the guest run
// free, and the guard's overflow brings it back after at most this many
// events, where Seek finds the count past its target and says so, instead
// of the guest running unobserved until its next exit, or for ever.
const stepGuard = 1 << 16

// Step runs at most one instruction single-stepped, with only the guard
// overflow armed. A signal (the guard's, the runtime's) may end the
// KVM_RUN before the instruction; Seek checks the position after every
// step, so nothing is skipped.
func (e *perfEngine) Step() (bool, error) {
	if e.err != nil {
		return false, e.err
	}
	if !e.stepping {
		if err := e.ctr.Overflow(stepGuard); err != nil {
			return false, err
		}
	}
	if !e.stepping || e.rearm {
		// This also removes RunToRIP's breakpoint: stepping off it.
		if err := e.vcpu.SetSingleStep(true); err != nil {
			return false, err
		}
		e.stepping, e.bp = true, false
	}
	return e.run()
}

func (e *perfEngine) run() (bool, error) {
	reason, err := e.vcpu.Run()
	switch {
	case err != nil:
		return false, err
	case reason == kvm.ExitIntr, reason == kvm.ExitDebug && (e.stepping || e.bp):
		return false, nil
	}
	e.exit = reason
	return true, nil
}

// Here returns RIP and the digest of the registers (perfclock.Position).
func (e *perfEngine) Here() (uint64, uint64, error) {
	if e.err != nil {
		return 0, 0, e.err
	}
	if err := e.vcpu.GetRegs(&e.regs); err != nil {
		return 0, 0, err
	}
	return e.regs.RIP, regsDigest(&e.regs), nil
}

// regsDigest is FNV-1a over the general registers, RIP and RFLAGS.
func regsDigest(r *kvm.Regs) uint64 {
	v := [...]uint64{r.RAX, r.RBX, r.RCX, r.RDX, r.RSI, r.RDI, r.RSP, r.RBP,
		r.R8, r.R9, r.R10, r.R11, r.R12, r.R13, r.R14, r.R15, r.RIP, r.RFLAGS}
	h := uint64(14695981039346656037)
	for _, x := range v {
		for i := 0; i < 8; i++ {
			h ^= x >> (8 * i) & 0xff
			h *= 1099511628211
		}
	}
	return h
}

// skidLoop is 64-bit code for MeasureSkid: a conditional branch every two
// instructions, 2^30 times, then a port write. It is finite so that an
// overflow that never stops KVM_RUN ends in an exit MeasureSkid reports,
// not in a hang: 2^30 branches are far more than its samples need.
var skidLoop = []byte{
	0xb9, 0x00, 0x00, 0x00, 0x40, // mov ecx, 1<<30
	0x48, 0xff, 0xc9, // 1: dec rcx
	0x75, 0xfb, //    jnz 1b
	0xe6, 0x80, //    out 0x80, al
	0xf4, //          hlt
}

// Skid is what MeasureSkid found.
type Skid struct {
	Max     uint64 // the largest overshoot seen, in events
	Samples int    // overflows measured
}

// MeasureSkid measures how far past its programmed overflow ctr's signal
// stops a guest: it runs a loop of conditional branches in a probe VM at
// ring cpl (0 where ring 0 runs natively, 3 otherwise), arms overflows of
// varying periods, and records how many events the count stood past each
// when KVM_RUN returned. Call it on the thread ctr was opened for. A run
// cut short by another signal (the runtime's) is re-armed for the rest;
// one that ends late for that reason only raises the maximum, which errs
// on the safe side.
func MeasureSkid(sys *kvm.System, ctr *perfclock.Counter, cpl uint8, samples int) (Skid, error) {
	p, err := newProbeVM(sys, cpl, skidLoop)
	if err != nil {
		return Skid{}, err
	}
	defer p.Close()
	e, err := newPerfEngine(p.vcpu, ctr, false)
	if err != nil {
		return Skid{}, err
	}
	var s Skid
	for i := 0; i < samples; i++ {
		period := uint64(20_000 + 7_919*i)
		start := e.Retired()
		for tries := 0; ; tries++ {
			done := e.Retired() - start
			if e.err != nil {
				return s, e.err
			}
			if done >= period {
				s.Max = max(s.Max, done-period)
				s.Samples++
				break
			}
			if tries == 1000 {
				return s, fmt.Errorf("skid: 1000 runs did not count %d events (at %d): the overflow signal does not stop KVM_RUN", period, done)
			}
			exited, err := e.RunOverflow(period - done)
			if err != nil {
				return s, err
			}
			if exited {
				return s, fmt.Errorf("skid: the probe loop exited (%v) instead of being interrupted", e.exit)
			}
		}
	}
	if err := ctr.Overflow(0); err != nil {
		return s, err
	}
	return s, nil
}

// ErrPerfClock: the perf epoch clock cannot run on this host; the error
// names the missing piece (PerfClockUsable). Where the piece is the PMU,
// the error is also ErrNoPerfCounters.
var ErrPerfClock = errors.New("the perf epoch clock cannot run here")
