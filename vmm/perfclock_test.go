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
