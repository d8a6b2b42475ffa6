package vmm

import (
	"errors"
	"math/rand/v2"
	"testing"

	"github.com/ftkvm/ftkvm/kvm"
	"github.com/ftkvm/ftkvm/vmm/perfclock"
)

// The perf clock's algorithm (vmm/perfclock) on the real /dev/kvm, with the
// step clock standing in for the hardware counter this host lacks: a
// "counter run" of n instructions single-steps n instructions plus a
// pseudo-random skid. Stopping at a target must land on exactly the state
// a plain single-stepped reference run has after that many instructions.

// xorshiftLoop is ring-0 64-bit code: 300 rounds of xorshift64 on RAX (11
// instructions a round), then a port write.
var xorshiftLoop = []byte{
	0xb9, 0x2c, 0x01, 0x00, 0x00, // mov ecx, 300
	0x48, 0xb8, 0x15, 0x7c, 0x4a, 0x7f, 0xb9, 0x79, 0x37, 0x9e, // mov rax, 0x9e3779b97f4a7c15
	0x48, 0x89, 0xc2, // 1: mov rdx, rax
	0x48, 0xc1, 0xe2, 0x0d, // shl rdx, 13
	0x48, 0x31, 0xd0, // xor rax, rdx
	0x48, 0x89, 0xc2, // mov rdx, rax
	0x48, 0xc1, 0xea, 0x07, // shr rdx, 7
	0x48, 0x31, 0xd0, // xor rax, rdx
	0x48, 0x89, 0xc2, // mov rdx, rax
	0x48, 0xc1, 0xe2, 0x11, // shl rdx, 17
	0x48, 0x31, 0xd0, // xor rax, rdx
	0xff, 0xc9, // dec ecx
	0x75, 0xde, // jnz 1b
	0xe6, 0x80, // out 0x80, al
	0xf4, // hlt
}

// kvmStepEngine is a perfclock.Engine over a single-stepped probe VM.
type kvmStepEngine struct {
	t       *testing.T
	vcpu    *kvm.VCPU
	retired uint64
	skid    uint64
	rng     *rand.Rand
}

func (e *kvmStepEngine) Retired() uint64 { return e.retired }

func (e *kvmStepEngine) Step() (bool, error) {
	reason, err := e.vcpu.Run()
	for reason == kvm.ExitIntr && err == nil {
		reason, err = e.vcpu.Run() // a Go preemption signal: not an instruction
	}
	if err != nil {
		return false, err
	}
	if reason != kvm.ExitDebug {
		return true, nil // the port write: the loop's guest-caused exit
	}
	e.retired++
	return false, nil
}

func (e *kvmStepEngine) RunOverflow(n uint64) (bool, error) {
	for range n + e.rng.Uint64N(e.skid+1) {
		if exited, err := e.Step(); exited || err != nil {
			return exited, err
		}
	}
	return false, nil
}

func newStepEngine(t *testing.T, sys *kvm.System, skid uint64, seed uint64) (*kvmStepEngine, func()) {
	p, err := newProbeVM(sys, 0, xorshiftLoop)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.vcpu.SetSingleStep(true); err != nil {
		p.Close()
		t.Fatal(err)
	}
	return &kvmStepEngine{t: t, vcpu: p.vcpu, skid: skid, rng: rand.New(rand.NewPCG(seed, 9))}, p.Close
}

func TestPerfClockOnStepClock(t *testing.T) {
	sys, err := kvm.Open("/dev/kvm")
	if err != nil {
		t.Fatal(err)
	}
	defer sys.Close()
	targets := []uint64{1, 700, 2500}
	// Reference: plain single steps, registers after each target count.
	ref := map[uint64]kvm.Regs{}
	e, done := newStepEngine(t, sys, 0, 1)
	for e.retired < targets[len(targets)-1] {
		if exited, err := e.Step(); exited || err != nil {
			t.Fatalf("reference run ended at %d: %v", e.retired, err)
		}
		for _, tg := range targets {
			if e.retired == tg {
				var r kvm.Regs
				if err := e.vcpu.GetRegs(&r); err != nil {
					t.Fatal(err)
				}
				ref[tg] = r
			}
		}
	}
	done()
	for _, tg := range targets {
		for _, c := range []struct{ margin, skid uint64 }{{64, 60}, {16, 0}, {100, 99}} {
			e, done := newStepEngine(t, sys, c.skid, tg+c.margin)
			st, err := perfclock.Clock{Margin: c.margin}.RunTo(e, tg)
			var r kvm.Regs
			if err == nil {
				err = e.vcpu.GetRegs(&r)
			}
			done()
			if err != nil {
				t.Fatalf("target %d margin %d skid %d: %v", tg, c.margin, c.skid, err)
			}
			if r != ref[tg] {
				t.Fatalf("target %d margin %d skid %d: stopped at rip %#x rax %#x, the reference at rip %#x rax %#x",
					tg, c.margin, c.skid, r.RIP, r.RAX, ref[tg].RIP, ref[tg].RAX)
			}
			if uint64(st.Steps) > c.margin {
				t.Fatalf("target %d: %d single steps with margin %d", tg, st.Steps, c.margin)
			}
			t.Logf("target %d, margin %d, skid up to %d: %d counter runs, %d single steps", tg, c.margin, c.skid, st.Runs, st.Steps)
		}
	}
	// A skid beyond the margin is caught, not silently accepted (the
	// seeded skid of this run lands past the target).
	e, done = newStepEngine(t, sys, 400, 5)
	defer done()
	if _, err = (perfclock.Clock{Margin: 4}).RunTo(e, 2500); !errors.Is(err, perfclock.ErrOvershoot) {
		t.Fatalf("margin 4, skid up to 400: %v", err)
	}
}

// kvmBranchEngine is the stand-in for the retired-conditional-branch
// counter: the step clock counts xorshiftLoop's one conditional branch
// (the jnz) as the event, and a "counter run" of n events steps until n
// branches plus a pseudo-random skid of branches and then of instructions
// have retired. Positions are then (branches, RIP, register digest), as
// with the hardware counter.
type kvmBranchEngine struct {
	*kvmStepEngine
	branches uint64
	regs     kvm.Regs
}

const xorshiftJNZ = probeCode + 47 // the loop's jnz

func (e *kvmBranchEngine) Retired() uint64 { return e.branches }

func (e *kvmBranchEngine) Step() (bool, error) {
	if err := e.vcpu.GetRegs(&e.regs); err != nil {
		return false, err
	}
	rip := e.regs.RIP
	exited, err := e.kvmStepEngine.Step()
	if err == nil && !exited && rip == xorshiftJNZ {
		e.branches++
	}
	return exited, err
}

func (e *kvmBranchEngine) RunOverflow(n uint64) (bool, error) {
	target := e.branches + n + e.rng.Uint64N(e.skid+1)
	for e.branches < target {
		if exited, err := e.Step(); exited || err != nil {
			return exited, err
		}
	}
	for range e.rng.Uint64N(11) {
		if exited, err := e.Step(); exited || err != nil {
			return exited, err
		}
	}
	return false, nil
}

func (e *kvmBranchEngine) Here() (uint64, uint64, error) {
	if err := e.vcpu.GetRegs(&e.regs); err != nil {
		return 0, 0, err
	}
	return e.regs.RIP, regsDigest(&e.regs), nil
}

// Seeking a position (branch count, RIP, registers) recorded in a plain
// single-stepped run lands on exactly that run's state, eleven
// instructions sharing each count; a position whose registers never occur
// is reported as not found.
func TestPerfClockSeekOnStepClock(t *testing.T) {
	sys, err := kvm.Open("/dev/kvm")
	if err != nil {
		t.Fatal(err)
	}
	defer sys.Close()
	targets := []uint64{3, 5, 700, 2501, 3000}
	type ref struct {
		pos  perfclock.Position
		regs kvm.Regs
	}
	refs := map[uint64]ref{}
	se, done := newStepEngine(t, sys, 0, 1)
	e := &kvmBranchEngine{kvmStepEngine: se}
	for se.retired < targets[len(targets)-1] {
		if exited, err := e.Step(); exited || err != nil {
			t.Fatalf("reference run ended at %d: %v", se.retired, err)
		}
		for _, tg := range targets {
			if se.retired == tg {
				pos, err := perfclock.Locate(e)
				if err != nil {
					t.Fatal(err)
				}
				refs[tg] = ref{pos, e.regs}
			}
		}
	}
	done()
	for _, tg := range targets {
		for seed := uint64(1); seed <= 3; seed++ {
			se, done := newStepEngine(t, sys, 6, seed*tg)
			e := &kvmBranchEngine{kvmStepEngine: se}
			st, err := perfclock.Clock{Margin: 8}.Seek(e, refs[tg].pos)
			var r kvm.Regs
			if err == nil {
				err = e.vcpu.GetRegs(&r)
			}
			done()
			if err != nil {
				t.Fatalf("instruction %d (%+v), seed %d: %v", tg, refs[tg].pos, seed, err)
			}
			if r != refs[tg].regs || se.retired != tg {
				t.Fatalf("instruction %d: stopped after %d instructions at rip %#x rcx %d, the reference at rip %#x rcx %d",
					tg, se.retired, r.RIP, r.RCX, refs[tg].regs.RIP, refs[tg].regs.RCX)
			}
			if seed == 1 {
				t.Logf("instruction %d = branch %d at %#x: %d counter runs, %d single steps", tg, refs[tg].pos.Events, refs[tg].pos.RIP, st.Runs, st.Steps)
			}
		}
	}
	bad := refs[700].pos
	bad.Regs++
	se, done = newStepEngine(t, sys, 0, 1)
	defer done()
	if _, err := (perfclock.Clock{Margin: 8}).Seek(&kvmBranchEngine{kvmStepEngine: se}, bad); !errors.Is(err, perfclock.ErrNotFound) {
		t.Fatalf("a position with other registers: %v", err)
	}
}
