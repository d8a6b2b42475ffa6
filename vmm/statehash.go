package vmm

import (
	"encoding/binary"
	"fmt"
	"io"

	"github.com/ftkvm/ftkvm/kvm"
	"github.com/ftkvm/ftkvm/vmm/snapshot"
)

// WriteStateHash writes what two replicas compare at an epoch end to w
// (a hash): the vCPU's general and special registers, then each page of
// the dirty bitmap pages, with its number (pages may be nil: the
// registers only). Call it on the vCPU thread (At
// or Halt): at an exit the registers are those of the exit, which both
// replicas see alike. The XSAVE area is left out, because its XSTATE_BV
// may differ for the same architectural state (see Quiescent).
func (m *Machine) WriteStateHash(w io.Writer, pages []uint64) error {
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
	mem := m.mem.Bytes()
	var num [8]byte
	var err error
	ForEachPage(pages, func(pfn uint64) {
		if err != nil || pfn >= m.Pages() {
			return
		}
		binary.LittleEndian.PutUint64(num[:], pfn)
		if _, err = w.Write(num[:]); err == nil {
			_, err = w.Write(mem[pfn*snapshot.PageSize : (pfn+1)*snapshot.PageSize])
		}
	})
	return err
}
