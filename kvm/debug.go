package kvm

import "fmt"

// Bits of DR6 as KVM reports it in DebugExit.DR6.
const (
	DR6BreakpointMask = 0xf     // B0-B3: hardware breakpoint i matched
	DR6SingleStep     = 1 << 14 // BS: the trap follows a single-stepped instruction
)

// DR7 encoding of an instruction breakpoint: local enable bit 2i, and the
// R/W (bits 16+4i) and LEN (bits 18+4i) fields left 0 (execute, 1 byte).
func dr7Exec(i int) uint64 { return 1 << (2 * i) }

// MaxBreakpoints is the number of hardware breakpoints (DR0-DR3).
const MaxBreakpoints = 4

// SingleStep reports whether a KVM_EXIT_DEBUG is the trap after a
// single-stepped instruction (DR6.BS).
func (d *DebugExit) SingleStep() bool { return d.DR6&DR6SingleStep != 0 }

// Breakpoints returns the hardware breakpoints (bit i = DR i) that caused a
// KVM_EXIT_DEBUG. An instruction breakpoint stops the vCPU before the
// instruction at its address runs.
func (d *DebugExit) Breakpoints() uint8 { return uint8(d.DR6 & DR6BreakpointMask) }

// StepDebug is the KVM_SET_GUEST_DEBUG argument for single-stepping with
// instruction breakpoints at the given linear addresses (at most
// MaxBreakpoints): every instruction ends in a KVM_EXIT_DEBUG with DR6.BS,
// and reaching a breakpoint address stops before the instruction there,
// with its B bit set in DR6. With step false and no addresses it turns
// guest debugging off. The guest's own debug registers are not used while
// KVM's are in force.
func StepDebug(step bool, breakpoints ...uint64) (GuestDebug, error) {
	var d GuestDebug
	if len(breakpoints) > MaxBreakpoints {
		return d, fmt.Errorf("kvm: %d hardware breakpoints asked for, the CPU has %d", len(breakpoints), MaxBreakpoints)
	}
	if step {
		d.Control |= GuestDebugEnable | GuestDebugSingleStep
	}
	if len(breakpoints) > 0 {
		d.Control |= GuestDebugEnable | GuestDebugUseHWBP
		for i, a := range breakpoints {
			d.DebugReg[i] = a
			d.DebugReg[7] |= dr7Exec(i)
		}
	}
	return d, nil
}

// SetSingleStep turns KVM_GUESTDBG_SINGLESTEP on or off (KVM_SET_GUEST_DEBUG),
// with no breakpoints.
func (v *VCPU) SetSingleStep(on bool) error {
	d, _ := StepDebug(on)
	return v.SetGuestDebug(&d)
}

// TranslateAddr is Translate for one address: the guest-physical address
// of linear, and whether the guest's page tables map it.
func (v *VCPU) TranslateAddr(linear uint64) (phys uint64, valid bool, err error) {
	t := Translation{LinearAddress: linear}
	if err := v.Translate(&t); err != nil {
		return 0, false, err
	}
	return t.PhysicalAddress, t.Valid != 0, nil
}
