package vmm

import "fmt"

// DeviceUnhandled is one device's count of accesses it does not model
// (devices/doc.go, "Unhandled accesses").
type DeviceUnhandled struct {
	Device    string
	Unhandled uint64
}

// UnhandledAccesses returns every device's unhandled-access counter, the
// port and MMIO buses' own (accesses that reach no device) included. Call
// it on the vCPU thread (inside Do) or once Run has returned.
func (m *Machine) UnhandledAccesses() []DeviceUnhandled {
	out := []DeviceUnhandled{
		{"port bus", m.pio.Unhandled()}, {"mmio bus", m.mmio.Unhandled()},
		{"pic", m.pic.Unhandled()}, {"pit", m.pit.Unhandled()}, {"uart", m.uart.Unhandled()},
		{"rtc", m.rtc.Unhandled()}, {"reset", m.reset.Unhandled()}, {"i8042", m.i8042.Unhandled()},
		{"debug-exit", m.debugExit.Unhandled()},
	}
	if m.acpiPM != nil {
		out = append(out, DeviceUnhandled{"acpi-pm", m.acpiPM.Unhandled()})
	}
	for i, v := range m.virtio {
		out = append(out, DeviceUnhandled{fmt.Sprintf("virtio%d", i), v.t.Unhandled()})
	}
	return out
}
