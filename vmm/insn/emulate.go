package insn

import "github.com/ftkvm/ftkvm/kvm"

// Outcome is what executing an instruction does, as far as the step clock
// carries it out itself.
type Outcome uint8

const (
	// Retired: the registers were updated and RIP advanced; the
	// instruction counts as one.
	Retired Outcome = iota
	// FaultUD and FaultGP: the instruction raises #UD or #GP(0) and does
	// not retire; RIP stays on it.
	FaultUD
	FaultGP
)

// Features are the CPUID bits of the vCPU that decide whether an
// environment instruction exists for the guest.
type Features struct {
	RDTSCP, RDRAND, RDSEED, RDPID bool
}

// FeaturesFromCPUID reads Features from a vCPU's CPUID entries.
func FeaturesFromCPUID(entries []kvm.CPUIDEntry) Features {
	var f Features
	for _, e := range entries {
		switch {
		case e.Function == 1:
			f.RDRAND = e.Ecx&(1<<30) != 0
		case e.Function == 7 && e.Index == 0:
			f.RDSEED = e.Ebx&(1<<18) != 0
			f.RDPID = e.Ecx&(1<<22) != 0
		case e.Function == 0x80000001:
			f.RDTSCP = e.Edx&(1<<27) != 0
		}
	}
	return f
}

// CR4.TSD: RDTSC and RDTSCP are privileged (ring 0 only).
const cr4TSD = 1 << 2

// Emulate carries out an environment instruction (Kind.Environment) on
// regs, as the CPU the guest sees would, with tsc the time-stamp counter's
// value and aux IA32_TSC_AUX. It is the whole of the step clock's
// emulation, and a pure function so that tests pin every case.
//
//   - RDTSC: EDX:EAX = tsc (#GP(0) at CPL > 0 with CR4.TSD).
//   - RDTSCP: the same and ECX = aux; #UD if CPUID hides RDTSCP (ftkvm's
//     CPUID does: a CPU without RDTSCP, which is what the guest was told).
//   - RDPID: the destination = aux; #UD if CPUID hides it.
//   - RDRAND, RDSEED: #UD if CPUID hides them. When CPUID exposes them
//     there is no environment value to give: needsSource is true and regs
//     are untouched; the caller refuses to run the guest.
//   - Undefined: #UD.
//
// Results written to 32-bit registers clear the upper half, as in 64-bit
// mode (outside it the upper half is not visible). RIP advances by the
// instruction's length, wrapping at 16 or 32 bits outside 64-bit mode.
func Emulate(in Insn, mode Mode, regs *kvm.Regs, cpl uint8, cr4 uint64, f Features, tsc uint64, aux uint32) (out Outcome, needsSource bool) {
	switch in.Kind {
	case RDTSC, RDTSCP:
		if in.Kind == RDTSCP && !f.RDTSCP {
			return FaultUD, false
		}
		if cpl > 0 && cr4&cr4TSD != 0 {
			return FaultGP, false
		}
		regs.RAX = tsc & 0xffff_ffff
		regs.RDX = tsc >> 32
		if in.Kind == RDTSCP {
			regs.RCX = uint64(aux)
		}
	case RDPID:
		if !f.RDPID {
			return FaultUD, false
		}
		setReg(regs, in.Reg, uint64(aux), in.OpSize)
	case RDRAND, RDSEED:
		if (in.Kind == RDRAND && !f.RDRAND) || (in.Kind == RDSEED && !f.RDSEED) {
			return FaultUD, false
		}
		return FaultUD, true
	case Undefined:
		return FaultUD, false
	default:
		panic("insn.Emulate: " + in.Kind.String() + " is not an environment instruction")
	}
	Advance(regs, mode, in.Len)
	return Retired, false
}

// Advance moves RIP past an instruction of n bytes.
func Advance(regs *kvm.Regs, mode Mode, n uint8) {
	rip := regs.RIP + uint64(n)
	switch mode {
	case Mode16:
		rip &= 0xffff
	case Mode32:
		rip &= 0xffff_ffff
	}
	regs.RIP = rip
}

// setReg writes v to general register r with the given operand size: a
// 32-bit write clears the upper half, a 16-bit one keeps the rest.
func setReg(regs *kvm.Regs, r uint8, v uint64, size uint8) {
	p := regPtr(regs, r)
	switch size {
	case 2:
		*p = *p&^0xffff | v&0xffff
	case 4:
		*p = v & 0xffff_ffff
	default:
		*p = v
	}
}

func regPtr(regs *kvm.Regs, r uint8) *uint64 {
	switch r & 15 {
	case 0:
		return &regs.RAX
	case 1:
		return &regs.RCX
	case 2:
		return &regs.RDX
	case 3:
		return &regs.RBX
	case 4:
		return &regs.RSP
	case 5:
		return &regs.RBP
	case 6:
		return &regs.RSI
	case 7:
		return &regs.RDI
	case 8:
		return &regs.R8
	case 9:
		return &regs.R9
	case 10:
		return &regs.R10
	case 11:
		return &regs.R11
	case 12:
		return &regs.R12
	case 13:
		return &regs.R13
	case 14:
		return &regs.R14
	}
	return &regs.R15
}

// CodeMode is the code size the CPU decodes with, from its registers.
func CodeMode(s *kvm.Sregs, rflags uint64) Mode {
	switch {
	case s.CR0&cr0PE == 0, rflags&rflagsVM != 0:
		return Mode16
	case s.EFER&eferLMA != 0 && s.CS.L != 0:
		return Mode64
	case s.CS.DB != 0:
		return Mode32
	}
	return Mode16
}

const rflagsVM = 1 << 17

// CPL is the current privilege level: 0 in real mode, 3 in virtual-8086
// mode, else SS's DPL (which is what KVM reports as the CPL).
func CPL(s *kvm.Sregs, rflags uint64) uint8 {
	switch {
	case s.CR0&cr0PE == 0:
		return 0
	case rflags&rflagsVM != 0:
		return 3
	}
	return s.SS.DPL
}

// PagingOf returns the paging state of s.
func PagingOf(s *kvm.Sregs) Paging {
	return Paging{CR0: s.CR0, CR3: s.CR3, CR4: s.CR4, EFER: s.EFER}
}

// Linear is the linear address of the instruction at RIP: CS's base is
// ignored in 64-bit mode, and addresses wrap at 4 GiB outside it.
func Linear(s *kvm.Sregs, rip uint64, mode Mode) uint64 {
	if mode == Mode64 {
		return rip
	}
	return (s.CS.Base + rip) & 0xffff_ffff
}

// stackLinear is the linear address of the stack slot off bytes above the
// stack pointer.
func stackLinear(s *kvm.Sregs, rsp uint64, off uint64, mode Mode) uint64 {
	switch {
	case mode == Mode64:
		return rsp + off
	case s.SS.DB != 0:
		return (s.SS.Base + (rsp+off)&0xffff_ffff) & 0xffff_ffff
	}
	return (s.SS.Base + (rsp+off)&0xffff) & 0xffff_ffff
}

// TargetCPL predicts the privilege level an IRET, RETF, SYSRET or SYSEXIT
// at the current RIP moves to, from the selector it will pop, reading the
// stack through p in mem. ok is false when the stack cannot be read (the
// instruction then faults in the guest and stays in its ring) or in real
// mode (no rings).
//
// SYSRET and SYSEXIT always go to ring 3. IRET outside 64-bit mode also
// goes to ring 3 when the EFLAGS image it pops has VM set (virtual-8086
// mode).
func TargetCPL(in Insn, mode Mode, s *kvm.Sregs, regs *kvm.Regs, mem []byte) (cpl uint8, ok bool) {
	switch in.Kind {
	case SYSRET, SYSEXIT:
		return 3, true
	case IRET, RETF:
	default:
		return 0, false
	}
	if s.CR0&cr0PE == 0 {
		return 0, false
	}
	p := PagingOf(s)
	slot := uint64(in.OpSize)
	cs, ok := p.Read(mem, stackLinear(s, regs.RSP, slot, mode), 2)
	if !ok {
		return 0, false
	}
	if in.Kind == IRET && mode != Mode64 && slot == 4 {
		if fl, ok := p.Read(mem, stackLinear(s, regs.RSP, 2*slot, mode), 4); ok && fl&rflagsVM != 0 {
			return 3, true
		}
	}
	return uint8(cs & 3), true
}
