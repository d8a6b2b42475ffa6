package vmm

import (
	"fmt"

	"github.com/ftkvm/ftkvm/devices"
	"github.com/ftkvm/ftkvm/devices/acpi"
	"github.com/ftkvm/ftkvm/guest"
)

// ACPI: the tables (devices/acpi) in the e820 reserved range below 1 MiB,
// and the fixed hardware they describe (devices.ACPIPM): PM1a event and
// control blocks, PM timer. docs/DEVICES.md has the layout and the reasons.
const (
	acpiTablesAddr = 0xe0000 // the RSDP; Linux also scans 0xe0000-0xfffff for it
	acpiTablesEnd  = 0x100000
	acpiPMPort     = 0x600 // PM1a_EVT 0x600, PM1a_CNT 0x604, PM_TMR 0x608
	acpiSCI        = 9
)

// wireACPI registers the ACPI fixed hardware. S5 stops the machine as a
// power-off (status 0).
func (m *Machine) wireACPI() error {
	m.acpiPM = devices.NewACPIPM(m.env, func() {
		m.stop(0, "guest powered off (ACPI S5)")
	})
	if err := m.pio.Register(acpiPMPort, devices.ACPIPMSize, "acpi-pm", m.acpiPM); err != nil {
		return fmt.Errorf("wire ACPI: %w", err)
	}
	return nil
}

// writeACPI builds the tables for the machine's devices, copies them into
// guest memory and tells the kernel where the RSDP is.
func (m *Machine) writeACPI(entry *guest.Entry) error {
	cfg := acpi.Config{
		PM1aEvent:   acpiPMPort,
		PM1aControl: acpiPMPort + 4,
		PMTimer:     acpiPMPort + 8,
		SCI:         acpiSCI,
		ResetPort:   devices.PortReset,
		ResetValue:  devices.RC_SYS_RST | devices.RC_RST_CPU,
		SlpTypS5:    devices.ACPISlpTypS5,
	}
	for _, v := range m.virtio {
		cfg.Virtio = append(cfg.Virtio, acpi.Virtio{Base: uint32(v.base), Size: devices.VirtioMMIOWindow, IRQ: uint32(v.irq)})
	}
	tables, err := acpi.Build(acpiTablesAddr, cfg)
	if err != nil {
		return err
	}
	if len(tables) > acpiTablesEnd-acpiTablesAddr {
		return fmt.Errorf("ACPI tables of %d bytes do not fit at %#x", len(tables), acpiTablesAddr)
	}
	copy(m.mem.Bytes()[acpiTablesAddr:], tables)
	return guest.SetRSDP(m.mem.Bytes(), entry, acpiTablesAddr)
}
