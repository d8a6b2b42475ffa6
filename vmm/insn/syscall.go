package insn

import "github.com/ftkvm/ftkvm/kvm"

// MSRs SYSCALL reads besides LSTAR.
const (
	MSRSTAR  = 0xc000_0081
	MSRFMASK = 0xc000_0084
)

const (
	eferSCE  = 1 << 0
	rflagsRF = 1 << 16
)

// SyscallMSRs are the MSRs that define SYSCALL in 64-bit mode.
type SyscallMSRs struct {
	STAR, LSTAR, FMASK uint64
}

// Syscall carries out SYSCALL in 64-bit mode on regs and s, as the Intel
// SDM (vol. 2B, SYSCALL) and the AMD APM (vol. 3) give it, so that the step
// clock need not rely on a breakpoint at LSTAR to see where it went: on a
// KVM that single-steps with the guest's TF, SYSCALL clears TF through
// FMASK, and the nested tier's KVM was measured running on from LSTAR
// without stopping at a breakpoint there.
//
//   - #UD when EFER.SCE is clear (the caller decodes SYSCALL in 64-bit
//     mode only, where CS.L and EFER.LMA are set).
//   - RCX = the next RIP, R11 = RFLAGS with RF clear, RFLAGS &= ^FMASK
//     and RF cleared, RIP = LSTAR.
//   - CS = STAR[47:32] & ^3, a flat 64-bit ring-0 code segment; SS =
//     STAR[47:32] + 8, a flat ring-0 data segment. The descriptors are
//     not read (SYSCALL does not read them either).
func Syscall(in Insn, regs *kvm.Regs, s *kvm.Sregs, m SyscallMSRs) Outcome {
	if in.Kind != SYSCALL {
		panic("insn.Syscall: " + in.Kind.String())
	}
	if s.EFER&eferSCE == 0 {
		return FaultUD
	}
	next := regs.RIP + uint64(in.Len)
	regs.RCX = next
	regs.R11 = regs.RFLAGS &^ rflagsRF
	regs.RFLAGS = regs.RFLAGS&^(m.FMASK|rflagsRF) | 2
	regs.RIP = m.LSTAR
	sel := uint16(m.STAR>>32) &^ 3
	s.CS = kvm.Segment{Selector: sel, Limit: 0xffff_ffff, Type: 11, Present: 1, S: 1, L: 1, G: 1}
	s.SS = kvm.Segment{Selector: sel + 8, Limit: 0xffff_ffff, Type: 3, Present: 1, S: 1, DB: 1, G: 1}
	return Retired
}
