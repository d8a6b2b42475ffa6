package perfclock

import (
	"errors"
	"math/rand/v2"
	"testing"
)

// simEngine is a guest reduced to an instruction count: a counter whose
// overflow lands up to skid instructions late (pseudo-randomly), signals
// that cut runs short, and a guest-caused exit at exitAt.
type simEngine struct {
	retired, exitAt uint64
	skid            uint64
	signals         int // the next runs cut short by a signal
	rng             *rand.Rand
	runs, steps     int
}

func (e *simEngine) Retired() uint64 { return e.retired }

func (e *simEngine) advance(n uint64) bool {
	if e.exitAt > 0 && e.retired+n >= e.exitAt {
		e.retired = e.exitAt
		return true
	}
	e.retired += n
	return false
}

func (e *simEngine) RunOverflow(n uint64) (bool, error) {
	e.runs++
	if e.signals > 0 {
		e.signals--
		return e.advance(n / 2), nil
	}
	return e.advance(n + e.rng.Uint64N(e.skid+1)), nil
}

func (e *simEngine) Step() (bool, error) {
	e.steps++
	return e.advance(1), nil
}

func TestRunTo(t *testing.T) {
	for _, tc := range []struct {
		name          string
		start, target uint64
		margin, skid  uint64
		signals       int
		exitAt        uint64
		err           error
		maxSteps      int
	}{
		{"already there", 100, 100, 50, 20, 0, 0, nil, 0},
		{"within the margin: steps only", 0, 30, 50, 20, 0, 0, nil, 30},
		{"far: one run, then steps", 0, 1_000_000, 64, 60, 0, 0, nil, 64},
		{"skid equal to the margin", 0, 10_000, 32, 32, 0, 0, nil, 32},
		{"no skid", 5, 10_000, 32, 0, 0, 0, nil, 32},
		{"signals cut runs short", 0, 1_000_000, 64, 60, 3, 0, nil, 64},
		{"exit before the target", 0, 10_000, 64, 20, 0, 5_000, ErrExit, 0},
		{"exit in the stepped part", 0, 10_000, 64, 0, 0, 9_990, ErrExit, 64},
		{"skid beyond the margin", 0, 10_000, 8, 500, 0, 0, ErrOvershoot, 8},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for seed := uint64(1); seed <= 20; seed++ {
				e := &simEngine{retired: tc.start, exitAt: tc.exitAt, skid: tc.skid, signals: tc.signals, rng: rand.New(rand.NewPCG(seed, 7))}
				st, err := Clock{Margin: tc.margin}.RunTo(e, tc.target)
				if tc.err == ErrOvershoot {
					// Only when a run really overshoots by more than the
					// margin; other seeds may land inside it.
					if err != nil && !errors.Is(err, ErrOvershoot) {
						t.Fatalf("seed %d: %v", seed, err)
					}
					if err == nil && e.retired != tc.target {
						t.Fatalf("seed %d: no error, at %d", seed, e.retired)
					}
					continue
				}
				if !errors.Is(err, tc.err) || (tc.err == nil && err != nil) {
					t.Fatalf("seed %d: err %v, want %v", seed, err, tc.err)
				}
				if err == nil && e.retired != tc.target {
					t.Fatalf("seed %d: stopped at %d, want %d", seed, e.retired, tc.target)
				}
				if st.Steps > tc.maxSteps {
					t.Fatalf("seed %d: %d single steps, at most the margin (%d) expected", seed, st.Steps, tc.maxSteps)
				}
				if st.Runs != e.runs || st.Steps != e.steps {
					t.Fatalf("seed %d: stats %+v, engine saw %d runs %d steps", seed, st, e.runs, e.steps)
				}
			}
		})
	}
}

// A skid larger than the margin is reported, for some seed.
func TestRunToOvershootReported(t *testing.T) {
	e := &simEngine{skid: 500, rng: rand.New(rand.NewPCG(3, 3))}
	if _, err := (Clock{Margin: 8}).RunTo(e, 10_000); !errors.Is(err, ErrOvershoot) {
		t.Fatalf("err %v at %d", err, e.retired)
	}
}

// An engine that never advances makes RunTo fail, not loop.
func TestRunToGivesUp(t *testing.T) {
	e := &simEngine{signals: 1 << 30, rng: rand.New(rand.NewPCG(1, 1))}
	e.retired = 0
	if _, err := (Clock{Margin: 10, MaxRuns: 50}).RunTo(e, 1); err != nil {
		t.Fatalf("within the margin no run is needed: %v", err)
	}
	stuck := &stuckEngine{}
	if _, err := (Clock{Margin: 10, MaxRuns: 50}).RunTo(stuck, 1000); err == nil || stuck.runs != 50 {
		t.Fatalf("err %v after %d runs", err, stuck.runs)
	}
}

type stuckEngine struct{ runs int }

func (e *stuckEngine) Retired() uint64                  { return 0 }
func (e *stuckEngine) RunOverflow(uint64) (bool, error) { e.runs++; return false, nil }
func (e *stuckEngine) Step() (bool, error)              { return false, nil }

// branchSim is a guest loop of seven instructions whose last is a
// conditional branch, with a register counting instructions: the event
// is the branch, so seven instructions share each count, and the loop
// repeats its RIPs, which only the register tells apart.
type branchSim struct {
	instrs uint64 // instructions retired
	skid   uint64
	rng    *rand.Rand
}

func (b *branchSim) Retired() uint64 { return (b.instrs + 1) / 7 } // instruction 6 of each pass is the branch

func (b *branchSim) RunOverflow(n uint64) (bool, error) {
	target := b.Retired() + n + b.rng.Uint64N(b.skid+1)
	for b.Retired() < target {
		b.instrs++
	}
	// The overflow interrupt lands somewhere in the stretch after the
	// branch that overflowed.
	b.instrs += b.rng.Uint64N(6)
	return false, nil
}

func (b *branchSim) Step() (bool, error) { b.instrs++; return false, nil }

func (b *branchSim) Here() (uint64, uint64, error) { return 0x1000 + b.instrs%7, b.instrs, nil }

func TestSeek(t *testing.T) {
	for _, instrs := range []uint64{0, 3, 6, 7, 700, 7001, 70_005} {
		ref := &branchSim{instrs: instrs}
		want, _ := Locate(ref)
		for seed := uint64(1); seed <= 10; seed++ {
			b := &branchSim{skid: 20, rng: rand.New(rand.NewPCG(seed, instrs))}
			st, err := Clock{Margin: 32}.Seek(b, want)
			if err != nil {
				t.Fatalf("instrs %d seed %d: %v", instrs, seed, err)
			}
			if b.instrs != instrs {
				t.Fatalf("seed %d: stopped at instruction %d, want %d", seed, b.instrs, instrs)
			}
			if st.Steps > 33*7 { // the margin is in branches, seven instructions each
				t.Fatalf("%d steps", st.Steps)
			}
		}
	}
	// A position whose registers never occur at its count is not found.
	b := &branchSim{skid: 0, rng: rand.New(rand.NewPCG(1, 1))}
	if _, err := (Clock{Margin: 32}).Seek(b, Position{Events: 100, RIP: 0x1003, Regs: 5}); !errors.Is(err, ErrNotFound) {
		t.Fatalf("err %v", err)
	}
	// Nor one the count never stays still long enough to be bounded.
	if _, err := (Clock{Margin: 32, MaxSteps: 3}).Seek(&branchSim{rng: rand.New(rand.NewPCG(1, 1))}, Position{Events: 0, RIP: 0x1005, Regs: 5}); err == nil || errors.Is(err, ErrNotFound) {
		t.Fatalf("MaxSteps 3, target 5 steps away: %v", err)
	}
}

// loopSim is a guest whose conditional branch retires every period
// instructions while its RIPs repeat every loopLen (an inner loop closed
// by an unconditional jump), with a register counting instructions. With
// bp it is a BreakpointRunner.
type loopSim struct {
	instrs, period, loopLen uint64
	skid                    uint64
	rng                     *rand.Rand
	runs, steps, breaks     int
}

func (l *loopSim) Retired() uint64 { return l.instrs / l.period }
func (l *loopSim) rip() uint64     { return 0x1000 + l.instrs%l.loopLen }

func (l *loopSim) Here() (uint64, uint64, error) { return l.rip(), l.instrs, nil }

func (l *loopSim) RunOverflow(n uint64) (bool, error) {
	l.runs++
	target := l.Retired() + n + l.rng.Uint64N(l.skid+1)
	for l.Retired() < target {
		l.instrs++
	}
	l.instrs += l.rng.Uint64N(l.period)
	return false, nil
}

func (l *loopSim) Step() (bool, error) { l.steps++; l.instrs++; return false, nil }

type bpSim struct{ *loopSim }

func (b bpSim) RunToRIP(rip, n uint64) (bool, error) {
	b.breaks++
	limit := b.Retired() + n
	for {
		b.instrs++
		if b.Retired() >= limit {
			b.instrs += b.rng.Uint64N(b.skid + 1) // the overflow's skid
			return false, nil
		}
		if b.rip() == rip {
			return false, nil
		}
	}
}

// In code that retires a conditional branch only every 5000 instructions,
// an inner loop of 10 repeating its RIPs, single steps would take
// thousands of exits to place a position; breakpoint runs at its RIP take
// two per pass of the inner loop (the run, and the step off the
// breakpoint), through the margin and the stretch. They land exactly.
func TestSeekWithBreakpoints(t *testing.T) {
	for _, instrs := range []uint64{4_321, 25_000, 123_456, 130_001} {
		ref := &loopSim{instrs: instrs, period: 5000, loopLen: 10}
		want, _ := Locate(ref)
		for seed := uint64(1); seed <= 5; seed++ {
			l := &loopSim{period: 5000, loopLen: 10, skid: 3, rng: rand.New(rand.NewPCG(seed, instrs))}
			st, err := Clock{Margin: 4}.Seek(bpSim{l}, want)
			if err != nil {
				t.Fatalf("instrs %d seed %d: %v", instrs, seed, err)
			}
			if l.instrs != instrs {
				t.Fatalf("seed %d: stopped at instruction %d, want %d", seed, l.instrs, instrs)
			}
			if st.Breaks != l.breaks || st.Steps != l.steps || st.Runs != l.runs {
				t.Fatalf("instrs %d: %+v, engine saw %d runs, %d breakpoint runs, %d steps", instrs, st, l.runs, l.breaks, l.steps)
			}
			// Steps only off the breakpoint: at most one per pass of the
			// inner loop through the margin and the stretch.
			if st.Steps > (4+1)*5000/10 {
				t.Fatalf("instrs %d: %d single steps", instrs, st.Steps)
			}
			// Single steps alone land there too, at several times the
			// exits (one per instruction through the margin's branches
			// and the stretch).
			s := &loopSim{period: 5000, loopLen: 10, skid: 3, rng: rand.New(rand.NewPCG(seed, instrs))}
			sst, err := Clock{Margin: 4}.Seek(s, want)
			if err != nil || s.instrs != instrs {
				t.Fatalf("instrs %d by single steps: at %d, %v", instrs, s.instrs, err)
			}
			if bpExits := st.Runs + st.Breaks + st.Steps; 3*bpExits > sst.Runs+sst.Steps {
				t.Fatalf("instrs %d: breakpoints took %d exits, single steps %d", instrs, bpExits, sst.Runs+sst.Steps)
			}
		}
	}
	// A position whose registers never occur at its RIP and count: the
	// overflow one event on ends the breakpoint runs, and it is not found.
	l := &loopSim{period: 5000, loopLen: 10, rng: rand.New(rand.NewPCG(1, 1))}
	if _, err := (Clock{Margin: 4}).Seek(bpSim{l}, Position{Events: 3, RIP: 0x1004, Regs: 15_005}); !errors.Is(err, ErrNotFound) {
		t.Fatalf("err %v", err)
	}
}
