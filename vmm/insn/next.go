package insn

import "github.com/ftkvm/ftkvm/kvm"

// MSRs that hold the targets of SYSCALL and SYSENTER.
const (
	MSRLSTAR      = 0xc000_0082
	MSRSysenterIP = 0x176
)

// Next predicts the linear address of the instruction that runs after in,
// one of the kinds that LosesStep, so that the step clock can stop the
// vCPU there with an instruction breakpoint. msr reads one of the vCPU's
// MSRs (MSRLSTAR, MSRSysenterIP). ok is false when the address cannot be
// known (the stack or a descriptor is unreadable, an LDT selector): the
// instruction then most likely faults, and the fault's handler is covered
// by the step clock's guards.
//
//   - SWAPGS, the fences and POPF fall through.
//   - SYSCALL goes to LSTAR (64-bit mode only: Decode knows it only there),
//     SYSENTER to IA32_SYSENTER_EIP; SYSRET to RCX, SYSEXIT to RDX (ECX,
//     EDX without REX.W). All four load flat code segments.
//   - IRET pops its target: RIP and CS from the stack, the segment's base
//     from the GDT (64-bit code ignores it), and in real or virtual-8086
//     mode CS*16 + IP.
func Next(in Insn, mode Mode, s *kvm.Sregs, regs *kvm.Regs, mem []byte, msr func(uint32) (uint64, bool)) (uint64, bool) {
	switch in.Kind {
	case SWAPGS, FENCE, POPF:
		r := *regs
		Advance(&r, mode, in.Len)
		return Linear(s, r.RIP, mode), true
	case SYSCALL:
		return msr(MSRLSTAR)
	case SYSENTER:
		v, ok := msr(MSRSysenterIP)
		if s.EFER&eferLMA == 0 {
			v &= 0xffff_ffff
		}
		return v, ok
	case SYSRET:
		if in.OpSize == 8 {
			return regs.RCX, true
		}
		return regs.RCX & 0xffff_ffff, true
	case SYSEXIT:
		if in.OpSize == 8 {
			return regs.RDX, true
		}
		return regs.RDX & 0xffff_ffff, true
	case IRET:
		return iretTarget(in, mode, s, regs, mem)
	}
	return 0, false
}

func iretTarget(in Insn, mode Mode, s *kvm.Sregs, regs *kvm.Regs, mem []byte) (uint64, bool) {
	p := PagingOf(s)
	slot := uint64(in.OpSize)
	ip, ok1 := p.Read(mem, stackLinear(s, regs.RSP, 0, mode), int(slot))
	cs, ok2 := p.Read(mem, stackLinear(s, regs.RSP, slot, mode), 2)
	if !ok1 || !ok2 {
		return 0, false
	}
	if s.CR0&cr0PE == 0 {
		return (cs<<4 + ip&0xffff) & 0xf_ffff, true
	}
	if mode != Mode64 && slot == 4 {
		if fl, ok := p.Read(mem, stackLinear(s, regs.RSP, 2*slot, mode), 4); !ok {
			return 0, false
		} else if fl&rflagsVM != 0 {
			return (cs<<4 + ip&0xffff) & 0xf_ffff, true
		}
	}
	if cs&4 != 0 || (cs&^7)+7 > uint64(s.GDT.Limit) {
		return 0, false // an LDT selector, or beyond the GDT: it faults
	}
	d, ok := p.Read(mem, s.GDT.Base+cs&^7, 8)
	if !ok {
		return 0, false
	}
	if s.EFER&eferLMA != 0 && d&(1<<53) != 0 {
		return ip, true // 64-bit code: the base is ignored
	}
	base := (d>>16)&0xff_ffff | (d>>56)<<24
	return (base + ip&0xffff_ffff) & 0xffff_ffff, true
}
