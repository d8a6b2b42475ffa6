package kvm

import (
	"errors"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

func TestStepDebug(t *testing.T) {
	for _, tc := range []struct {
		name    string
		step    bool
		bps     []uint64
		control uint32
		dr7     uint64
	}{
		{"off", false, nil, 0, 0},
		{"step", true, nil, GuestDebugEnable | GuestDebugSingleStep, 0},
		{"one breakpoint", false, []uint64{0x1000}, GuestDebugEnable | GuestDebugUseHWBP, 0x1},
		{"step and four", true, []uint64{1, 2, 3, 4}, GuestDebugEnable | GuestDebugSingleStep | GuestDebugUseHWBP, 0x55},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d, err := StepDebug(tc.step, tc.bps...)
			if err != nil {
				t.Fatal(err)
			}
			if d.Control != tc.control || d.DebugReg[7] != tc.dr7 {
				t.Fatalf("control %#x dr7 %#x, want %#x %#x", d.Control, d.DebugReg[7], tc.control, tc.dr7)
			}
			for i, a := range tc.bps {
				if d.DebugReg[i] != a {
					t.Fatalf("DR%d = %#x, want %#x", i, d.DebugReg[i], a)
				}
			}
		})
	}
	if _, err := StepDebug(true, 1, 2, 3, 4, 5); err == nil {
		t.Fatal("five breakpoints accepted")
	}
}

func TestDebugExitBits(t *testing.T) {
	for _, tc := range []struct {
		dr6  uint64
		step bool
		bps  uint8
	}{
		{0xffff4ff0, true, 0},  // a single-step trap, as this host's KVM reports it
		{0xffff0ff1, false, 1}, // instruction breakpoint DR0
		{0xffff0ff8, false, 8},
	} {
		d := DebugExit{Exception: 1, DR6: tc.dr6}
		if d.SingleStep() != tc.step || d.Breakpoints() != tc.bps {
			t.Errorf("DR6 %#x: step %v breakpoints %#x, want %v %#x", tc.dr6, d.SingleStep(), d.Breakpoints(), tc.step, tc.bps)
		}
	}
}

// TestHWBreakpoint: an instruction breakpoint stops the vCPU before the
// instruction at its address (the step clock guards interrupt handlers with
// them), and stepping on from there executes it.
func TestHWBreakpoint(t *testing.T) {
	g := newGuest(t, 0x10000, 0)
	g.realMode(0x1000, []byte{0x90, 0x90, 0x40, 0xf4}) // nop; nop; inc ax; hlt
	d, err := StepDebug(false, 0x1002)
	if err != nil {
		t.Fatal(err)
	}
	if err := g.cpu.SetGuestDebug(&d); err != nil {
		t.Fatal(err)
	}
	de := g.run(ExitDebug).Debug()
	if de.PC != 0x1002 || de.Breakpoints() != 1 || de.SingleStep() {
		t.Fatalf("breakpoint exit pc %#x dr6 %#x, want pc 0x1002 with B0", de.PC, de.DR6)
	}
	if r := g.regs(); r.RAX&0xffff != 0 {
		t.Fatalf("AX %#x: the instruction at the breakpoint ran", r.RAX)
	}
	if err := g.cpu.SetSingleStep(true); err != nil {
		t.Fatal(err)
	}
	de = g.run(ExitDebug).Debug()
	if de.PC != 0x1003 || !de.SingleStep() {
		t.Fatalf("step exit pc %#x dr6 %#x, want pc 0x1003 with BS", de.PC, de.DR6)
	}
	if r := g.regs(); r.RAX&0xffff != 1 {
		t.Fatalf("AX %#x after inc, want 1", r.RAX)
	}
	if err := g.cpu.SetSingleStep(false); err != nil {
		t.Fatal(err)
	}
	g.run(ExitHLT)
}

// TestTranslate checks KVM_TRANSLATE on a mapping that is not the
// identity: linear 2 MiB..4 MiB maps physical 0..2 MiB.
func TestTranslate(t *testing.T) {
	g := newGuest(t, 2<<20, 0)
	g.longMode3([]byte{0xf4})
	g.mem[lmPD+8] = 0x87 // PDE 1: 2 MiB page at physical 0
	for _, tc := range []struct {
		linear, phys uint64
		valid        bool
	}{
		{lmCode + 0x123, lmCode + 0x123, true},
		{2<<20 + 0x4567, 0x4567, true},
		{4<<20 + 1, 0, false},
	} {
		phys, valid, err := g.cpu.TranslateAddr(tc.linear)
		if err != nil {
			t.Fatal(err)
		}
		if valid != tc.valid || (valid && phys != tc.phys) {
			t.Errorf("translate %#x = %#x valid %v, want %#x valid %v", tc.linear, phys, valid, tc.phys, tc.valid)
		}
	}
}

// The step clock's ioctls name themselves in errors, like every other.
func TestDebugErrorsNameIoctl(t *testing.T) {
	g := newGuest(t, 0x10000, 0)
	cpu, err := g.vm.CreateVCPU(1)
	if err != nil {
		t.Fatal(err)
	}
	cpu.Close()
	if err := cpu.SetSingleStep(true); !strings.HasPrefix(fmtErr(err), "KVM_SET_GUEST_DEBUG: ") || !errors.Is(err, unix.EBADF) {
		t.Errorf("SetSingleStep on a closed vCPU: %v", err)
	}
	if _, _, err := cpu.TranslateAddr(0); !strings.HasPrefix(fmtErr(err), "KVM_TRANSLATE: ") || !errors.Is(err, unix.EBADF) {
		t.Errorf("TranslateAddr on a closed vCPU: %v", err)
	}
}
