// Package perfclock is the algorithm of the perf epoch clock (vmm
// EpochPerf): how to stop a guest exactly N instructions after its last
// exit with a hardware instruction counter whose overflow interrupt lands a
// few instructions late (skid), as ReVirt, rr and VMware FT do. Program the
// overflow a safety margin before the target, let the guest run at full
// speed, then single-step the rest.
//
// No host of this project has performance counters (docs/KVM-HOSTS.md), so
// vmm does not wire the perf clock; the algorithm is here, with its tests,
// driven through Engine, which the tests implement with the step clock
// standing in for the counter.
package perfclock

import (
	"errors"
	"fmt"
)

// Engine runs the guest for the clock.
type Engine interface {
	// Retired is the number of guest instructions retired since the last
	// guest-caused exit (vmm.Point.Instrs).
	Retired() uint64
	// RunOverflow runs the guest with the counter set to overflow after n
	// more instructions (n > 0). It returns when the guest stopped: after
	// the overflow, which may land up to the counter's skid past n, never
	// before; or earlier, at a guest-caused exit (exited), or for a
	// host-side reason (a signal), short of n.
	RunOverflow(n uint64) (exited bool, err error)
	// Step runs exactly one instruction, or stops at a guest-caused exit.
	Step() (exited bool, err error)
}

// Clock stops guests at exact instruction counts.
type Clock struct {
	// Margin is how many instructions before the target the overflow is
	// programmed: it must be at least the counter's worst skid (a few
	// dozen on x86; rr uses 100 for its branch counter), and is what is
	// left to single-step.
	Margin uint64
	// MaxRuns bounds the runs RunTo makes (0: 1000), so that an engine
	// that never gets anywhere (a signal storm) fails instead of looping.
	MaxRuns int
}

// Errors of RunTo.
var (
	// ErrExit: a guest-caused exit came before the target: the position
	// does not exist in this stretch between exits.
	ErrExit = errors.New("perfclock: the guest exited before the target")
	// ErrOvershoot: the counter's skid was larger than the margin; the
	// guest is past the target, which is lost.
	ErrOvershoot = errors.New("perfclock: the counter overshot the target by more than the margin")
)

// Stats says how RunTo got there.
type Stats struct {
	Runs  int // RunOverflow calls
	Steps int // Step calls
}

// RunTo brings the guest to exactly target instructions after its last
// exit: while more than Margin remain, it lets the counter run to Margin
// before the target (each run may overshoot by the skid, which the margin
// absorbs; a run cut short by a signal is simply run again), then it
// single-steps the remainder.
func (c Clock) RunTo(e Engine, target uint64) (Stats, error) {
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
			return st, fmt.Errorf("%w (%d instructions, target %d, margin %d)", ErrOvershoot, cur, target, c.Margin)
		}
		remaining := target - cur
		var exited bool
		var err error
		if remaining > c.Margin {
			if st.Runs == maxRuns {
				return st, fmt.Errorf("perfclock: %d runs did not reach %d instructions (at %d)", st.Runs, target, cur)
			}
			st.Runs++
			exited, err = e.RunOverflow(remaining - c.Margin)
		} else {
			st.Steps++
			exited, err = e.Step()
		}
		if err != nil {
			return st, err
		}
		if exited {
			return st, fmt.Errorf("%w (at %d instructions, target %d)", ErrExit, e.Retired(), target)
		}
	}
}
