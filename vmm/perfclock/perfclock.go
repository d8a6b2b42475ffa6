// Package perfclock is the perf epoch clock (vmm EpochPerf): how to stop a
// guest at an exact point of its execution with a hardware event counter
// whose overflow interrupt lands a few events late (skid), as ReVirt, rr
// and VMware FT do. Program the overflow a safety margin before the
// target, let the guest run at full speed, then single-step the rest.
//
// The algorithm (Clock) works on an Engine; the counter (Counter, Event)
// is perf_event_open's, counting retired conditional branches of the guest
// only, as rr does; a Position is such a count plus the registers that
// place an instruction between two branches. vmm implements the Engine
// over a vCPU. See docs/PERF-CLOCK.md for what of this has run where.
package perfclock

import (
	"errors"
	"fmt"
)

// Engine runs the guest for the clock.
type Engine interface {
	// Retired is the count of the clock's event since the last
	// guest-caused exit: retired conditional branches for the hardware
	// counter, instructions for the step clock standing in for it in
	// tests (vmm.Point.Instrs).
	Retired() uint64
	// RunOverflow runs the guest with the counter set to overflow after n
	// more events (n > 0). It returns when the guest stopped: after
	// the overflow, which may land up to the counter's skid past n, never
	// before; or earlier, at a guest-caused exit (exited), or for a
	// host-side reason (a signal), short of n.
	RunOverflow(n uint64) (exited bool, err error)
	// Step runs at most one instruction (a signal may stop it before
	// the instruction), or stops at a guest-caused exit.
	Step() (exited bool, err error)
}

// Clock stops guests at exact event counts and positions.
type Clock struct {
	// Margin is how many events before the target the overflow is
	// programmed: it must be at least the counter's worst skid (rr uses
	// 100-125 branches on Intel, 10000 on AMD Zen; vmm.MeasureSkid
	// measures it), and is what is left to single steps or breakpoint
	// runs.
	Margin uint64
	// MaxRuns bounds the runs RunTo makes (0: 1000), so that an engine
	// that never gets anywhere (a signal storm) fails instead of looping.
	MaxRuns int
	// MaxSteps bounds the single steps Seek takes after the count is
	// reached (0: 1<<20): code without conditional branches (a loop
	// closed by an unconditional jump, a long REP string instruction)
	// can keep the count still for ever.
	MaxSteps int
}

// Errors of RunTo.
var (
	// ErrExit: a guest-caused exit came before the target: the position
	// does not exist in this stretch between exits.
	ErrExit = errors.New("perfclock: the guest exited before the target")
	// ErrOvershoot: the counter's skid was larger than the margin; the
	// guest is past the target, which is lost.
	ErrOvershoot = errors.New("perfclock: the counter overshot the target by more than the margin")
	// ErrNotFound: the guest went from the position's count to the next
	// without passing the position's registers: this execution does not
	// contain the position (a divergence).
	ErrNotFound = errors.New("perfclock: the position is not in this execution")
)

// Position is a point of the guest's execution under the perf clock. The
// counted event (retired conditional branches) does not tell apart the
// instructions between two branches, so a position is the count since the
// last guest-caused exit plus the instruction pointer and a digest of the
// registers (what rr compares): the count says which stretch between
// branches, RIP which instruction in it, and the registers which pass of
// a loop that retires no conditional branch, or which iteration of a REP
// string instruction (RCX). It is what the primary records where it
// delivers, and what a replica seeks.
type Position struct {
	Events uint64 // the event's count since the last guest-caused exit
	RIP    uint64
	Regs   uint64 // digest of the general registers and flags (vmm computes it)
}

// Seeker is an Engine that can say where the guest stands.
type Seeker interface {
	Engine
	// Here returns the guest's RIP and the digest of its registers.
	Here() (rip, regs uint64, err error)
}

// BreakpointRunner is a Seeker that can also run the guest to an
// instruction breakpoint: what rr does to reach a RIP in code that retires
// no conditional branch for long (a loop closed by an unconditional jump,
// a long straight stretch), where single steps would cost one exit per
// instruction.
type BreakpointRunner interface {
	Seeker
	// RunToRIP runs the guest with an instruction breakpoint at rip (a
	// linear address: RIP itself in long mode and flat segments) and the
	// counter set to overflow after n more events (n > 0). It returns at
	// the breakpoint, before the instruction there; or after the overflow
	// (up to the skid later); or earlier, at a signal or a guest-caused
	// exit (exited).
	RunToRIP(rip, n uint64) (exited bool, err error)
}

// Locate returns the position the guest is at.
func Locate(e Seeker) (Position, error) {
	rip, regs, err := e.Here()
	return Position{Events: e.Retired(), RIP: rip, Regs: regs}, err
}

// Seek brings the guest, which must not be past p, exactly to p. With a
// BreakpointRunner it runs the counter to the margin, then, as rr does,
// runs to an instruction breakpoint at p.RIP with the overflow set one
// event past p's count, checking the count and registers at each stop and
// stepping off the breakpoint where they do not match yet. Otherwise it
// runs RunTo to the count and single-steps until the registers match.
// Passing p's count without meeting its registers is ErrNotFound.
func (c Clock) Seek(e Seeker, p Position) (Stats, error) {
	br, bp := e.(BreakpointRunner)
	st, err := c.runTo(e, p.Events, !bp)
	if err != nil {
		return st, err
	}
	maxSteps := c.MaxSteps
	if maxSteps == 0 {
		maxSteps = 1 << 20
	}
	for n := 0; ; n++ {
		rip, regs, err := e.Here()
		if err != nil {
			return st, err
		}
		cur := e.Retired()
		if cur > p.Events {
			return st, fmt.Errorf("%w (count %d reached %d before rip %#x with register digest %#x)", ErrNotFound, p.Events, cur, p.RIP, p.Regs)
		}
		if cur == p.Events && rip == p.RIP && regs == p.Regs {
			return st, nil
		}
		if n == maxSteps {
			return st, fmt.Errorf("perfclock: %d single steps and breakpoint runs at count %d did not reach rip %#x", n, p.Events, p.RIP)
		}
		var exited bool
		if bp && rip != p.RIP {
			// The overflow one event past p's count stops a guest
			// that leaves it without passing p.RIP.
			st.Breaks++
			exited, err = br.RunToRIP(p.RIP, p.Events-cur+1)
		} else {
			st.Steps++
			exited, err = e.Step()
		}
		if err != nil {
			return st, err
		}
		if exited {
			return st, fmt.Errorf("%w (at count %d, seeking rip %#x)", ErrExit, e.Retired(), p.RIP)
		}
	}
}

// Stats says how RunTo or Seek got there.
type Stats struct {
	Runs   int // RunOverflow calls
	Steps  int // Step calls
	Breaks int // RunToRIP calls
}

// RunTo brings the guest to exactly target events after its last
// exit: while more than Margin remain, it lets the counter run to Margin
// before the target (each run may overshoot by the skid, which the margin
// absorbs; a run cut short by a signal is simply run again), then it
// single-steps the remainder.
func (c Clock) RunTo(e Engine, target uint64) (Stats, error) {
	return c.runTo(e, target, true)
}

// runTo is RunTo; without step it returns once the guest is within the
// margin of target, leaving the rest to the caller.
func (c Clock) runTo(e Engine, target uint64, step bool) (Stats, error) {
	var st Stats
	maxRuns := c.MaxRuns
	if maxRuns == 0 {
		maxRuns = 1000
	}
	for {
		cur := e.Retired()
		switch {
		case cur == target:
			return st, nil
		case cur > target:
			return st, fmt.Errorf("%w (%d events, target %d, margin %d)", ErrOvershoot, cur, target, c.Margin)
		}
		remaining := target - cur
		var exited bool
		var err error
		if remaining > c.Margin {
			if st.Runs == maxRuns {
				return st, fmt.Errorf("perfclock: %d runs did not reach %d events (at %d)", st.Runs, target, cur)
			}
			st.Runs++
			exited, err = e.RunOverflow(remaining - c.Margin)
		} else if !step {
			return st, nil
		} else {
			st.Steps++
			exited, err = e.Step()
		}
		if err != nil {
			return st, err
		}
		if exited {
			return st, fmt.Errorf("%w (at %d events, target %d)", ErrExit, e.Retired(), target)
		}
	}
}
