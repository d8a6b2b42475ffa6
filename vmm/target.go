package vmm

// The machine is the environment's Target. These run on the vCPU thread,
// called by the environment from At or Halt.

// TimerDeadline reports when the PIT's counter 0 next fires.
func (m *Machine) TimerDeadline() (int64, bool) { return m.pit.Deadline() }

// FireTimer delivers a PIT tick as of virtual time now.
func (m *Machine) FireTimer(now int64) {
	m.pit.Fire(now)
	m.point.Delivered = true
	m.Stats.TimerEvents++
	if m.point.Kind == PointKick {
		m.Stats.KickTimer++
	}
}

// RxSpace is the room left in the UART's receive FIFO. Until the guest
// enables the receive interrupt it is zero: a driver initialising the UART
// resets the FIFO, and input that arrived before it would be lost (as on
// real hardware); holding it back is the flow control a user expects.
func (m *Machine) RxSpace() int {
	if !m.uart.ReceiveEnabled() {
		return 0
	}
	return m.uart.RxSpace()
}

// Receive delivers one byte to the UART.
func (m *Machine) Receive(b byte) {
	m.uart.Receive(b)
	m.point.Delivered = true
	m.Stats.InputBytes++
}

// Pending reports whether the PIC has an interrupt for the CPU.
func (m *Machine) Pending() bool { return m.pic.HasInterrupt() }
