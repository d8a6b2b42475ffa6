package vmm

import (
	"encoding/binary"
	"fmt"
	"io"

	"github.com/ftkvm/ftkvm/kvm"
)

// WriteRegsHash writes the vCPU's general and special registers to w (a
// hash): the registers' part of what two replicas compare at an epoch end
// (guest memory is the driver's, ft/driver/memhash.go). Call it on the
// vCPU thread (At or Halt): at an exit the registers are those of the
// exit, which both replicas see alike. The XSAVE area is left out,
// because its XSTATE_BV may differ for the same architectural state (see
// Quiescent).
func (m *Machine) WriteRegsHash(w io.Writer) error {
	var regs kvm.Regs
	var sregs kvm.Sregs
	if err := m.vcpu.GetRegs(&regs); err != nil {
		return err
	}
	if err := m.vcpu.GetSregs(&sregs); err != nil {
		return err
	}
	if err := binary.Write(w, binary.LittleEndian, &regs); err != nil {
		return fmt.Errorf("hash registers: %w", err)
	}
	if err := binary.Write(w, binary.LittleEndian, &sregs); err != nil {
		return fmt.Errorf("hash special registers: %w", err)
	}
	return nil
}
