package insn

import (
	"testing"

	"github.com/ftkvm/ftkvm/kvm"
)

// Reference: Intel SDM vol. 2B, SYSCALL, "Operation" (64-bit mode).
func TestSyscall(t *testing.T) {
	user := kvm.Sregs{
		CR0:  cr0PE | 1<<31,
		EFER: eferLMA | eferSCE | 1<<8,
		CS:   kvm.Segment{Selector: 0x2b, Limit: 0xffff_ffff, Type: 11, Present: 1, DPL: 3, S: 1, L: 1, G: 1},
		SS:   kvm.Segment{Selector: 0x23, Limit: 0xffff_ffff, Type: 3, Present: 1, DPL: 3, S: 1, DB: 1, G: 1},
	}
	msrs := SyscallMSRs{STAR: 0x0023_0010 << 32, LSTAR: 0xffff_ffff_8100_0000, FMASK: 0x47700}
	in := Decode([]byte{0x0f, 0x05}, Mode64)
	for _, tc := range []struct {
		name   string
		s      kvm.Sregs
		flags  uint64
		out    Outcome
		rflags uint64
		r11    uint64
	}{
		{"from ring 3, IF and TF set", user, 0x302, Retired, 0x2, 0x302},
		{"RF is cleared in R11 and RFLAGS", user, 0x10202 | 1<<11, Retired, 0x802, 0x202 | 1<<11},
		{"EFER.SCE clear", kvm.Sregs{EFER: eferLMA, CS: user.CS, SS: user.SS}, 0x202, FaultUD, 0x202, 0x77},
	} {
		t.Run(tc.name, func(t *testing.T) {
			regs := kvm.Regs{RIP: 0x40_1000, RFLAGS: tc.flags, RCX: 0x55, R11: 0x77, RAX: 39}
			s := tc.s
			if out := Syscall(in, &regs, &s, msrs); out != tc.out {
				t.Fatalf("outcome %v, want %v", out, tc.out)
			}
			if tc.out != Retired {
				if regs.RIP != 0x40_1000 || s != tc.s || regs.RCX != 0x55 {
					t.Errorf("a faulting SYSCALL changed state: %+v", regs)
				}
				return
			}
			if regs.RIP != msrs.LSTAR || regs.RCX != 0x40_1002 || regs.R11 != tc.r11 || regs.RFLAGS != tc.rflags || regs.RAX != 39 {
				t.Errorf("rip %#x rcx %#x r11 %#x rflags %#x rax %d", regs.RIP, regs.RCX, regs.R11, regs.RFLAGS, regs.RAX)
			}
			wantCS := kvm.Segment{Selector: 0x10, Limit: 0xffff_ffff, Type: 11, Present: 1, S: 1, L: 1, G: 1}
			wantSS := kvm.Segment{Selector: 0x18, Limit: 0xffff_ffff, Type: 3, Present: 1, S: 1, DB: 1, G: 1}
			if s.CS != wantCS || s.SS != wantSS {
				t.Errorf("cs %+v ss %+v", s.CS, s.SS)
			}
			if CPL(&s, regs.RFLAGS) != 0 || CodeMode(&s, regs.RFLAGS) != Mode64 {
				t.Errorf("after SYSCALL: CPL %d, mode %v", CPL(&s, regs.RFLAGS), CodeMode(&s, regs.RFLAGS))
			}
		})
	}
}
