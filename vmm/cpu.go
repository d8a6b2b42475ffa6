package vmm

import (
	"fmt"

	"github.com/ftkvm/ftkvm/guest"
	"github.com/ftkvm/ftkvm/kvm"
)

// Control-register bits used to build entry states.
const (
	cr0PE   = 1 << 0
	cr0ET   = 1 << 4
	cr0NE   = 1 << 5
	cr0WP   = 1 << 16
	cr0PG   = 1 << 31
	cr4PAE  = 1 << 5
	eferLME = 1 << 8
	eferLMA = 1 << 10
)

// Selectors of the loaders' boot GDT (guest.Entry).
const (
	selCode = 0x10
	selData = 0x18
	selTSS  = 0x20
)

// setupCPU puts the vCPU in the state the boot protocol promises: PVH's flat
// 32-bit protected mode with paging off, or Linux's 64-bit entry.
func setupCPU(v *kvm.VCPU, e *guest.Entry) error {
	var sregs kvm.Sregs
	if err := v.GetSregs(&sregs); err != nil {
		return err
	}
	code := kvm.Segment{Base: 0, Limit: 0xffffffff, Selector: selCode, Type: 0xb, Present: 1, S: 1, DB: 1, G: 1}
	data := kvm.Segment{Base: 0, Limit: 0xffffffff, Selector: selData, Type: 0x3, Present: 1, S: 1, DB: 1, G: 1}
	switch e.Mode {
	case guest.Protected32:
		sregs.CR0 = cr0PE | cr0ET
		sregs.CR4 = 0
		sregs.EFER = 0
	case guest.Long64:
		code.DB, code.L = 0, 1
		sregs.CR0 = cr0PE | cr0ET | cr0NE | cr0WP | cr0PG
		sregs.CR3 = e.CR3
		sregs.CR4 = cr4PAE
		sregs.EFER = eferLME | eferLMA
	default:
		return fmt.Errorf("unknown entry mode %v", e.Mode)
	}
	sregs.CS = code
	sregs.DS, sregs.ES, sregs.FS, sregs.GS, sregs.SS = data, data, data, data, data
	sregs.TR = kvm.Segment{Base: 0, Limit: 0x67, Selector: selTSS, Type: 0xb, Present: 1}
	sregs.LDT = kvm.Segment{Type: 0x2, Present: 1, Unusable: 1}
	sregs.GDT = kvm.DTable{Base: e.GDTBase, Limit: e.GDTLimit}
	sregs.IDT = kvm.DTable{}
	// No local APIC: disable it in IA32_APIC_BASE too. KVM derives
	// CPUID.1:EDX.APIC from that MSR's enable bit at run time, so leaving
	// the reset value (enabled) would advertise the APIC that
	// DeterministicCPUID hid, and Linux would try to use it.
	sregs.ApicBase = 0
	if err := v.SetSregs(&sregs); err != nil {
		return err
	}
	regs := &kvm.Regs{
		RIP:    e.RIP,
		RSP:    e.RSP,
		RBX:    e.RBX,
		RSI:    e.RSI,
		RFLAGS: 0x2,
	}
	if err := v.SetRegs(regs); err != nil {
		return err
	}
	fpu := &kvm.FPU{FCW: 0x37f, MXCSR: 0x1f80}
	return v.SetFPU(fpu)
}
