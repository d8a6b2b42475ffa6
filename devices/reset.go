package devices

// Reset control register at port 0xcf9 (Intel PIIX/ICH "RC", Reset Control
// Register): bit 1 SYS_RST selects a hard (1) or soft (0) reset, bit 2
// RST_CPU initiates it, bit 3 FULL_RST. Reads return the last value written.

// Reset control register bits.
const (
	RC_SYS_RST  = 0x02
	RC_RST_CPU  = 0x04
	RC_FULL_RST = 0x08
)

// ResetControl is the 0xcf9 register. Register it at 0xcf9 with size 1.
type ResetControl struct {
	onReset   func()
	value     uint8
	unhandled uint64
}

// NewResetControl returns the register; onReset (may be nil) is called
// synchronously by a write with RST_CPU set. Linux writes SYS_RST then
// SYS_RST|RST_CPU (reboot=pci), which resets once.
func NewResetControl(onReset func()) *ResetControl {
	return &ResetControl{onReset: onReset}
}

// Unhandled counts accesses outside the register.
func (r *ResetControl) Unhandled() uint64 { return r.unhandled }

// Read implements Device.
func (r *ResetControl) Read(offset uint64, data []byte) {
	for i := range data {
		if offset+uint64(i) != 0 {
			r.unhandled++
			data[i] = 0xff
			continue
		}
		data[i] = r.value
	}
}

// Write implements Device.
func (r *ResetControl) Write(offset uint64, data []byte) {
	for i, v := range data {
		if offset+uint64(i) != 0 {
			r.unhandled++
			continue
		}
		r.value = v
		if v&RC_RST_CPU != 0 && r.onReset != nil {
			r.onReset()
		}
	}
}

// ResetControlState is the register's state.
type ResetControlState struct {
	Value uint8
}

// State returns the register's state.
func (r *ResetControl) State() ResetControlState { return ResetControlState{Value: r.value} }

// SetState restores a state from State.
func (r *ResetControl) SetState(s ResetControlState) error {
	r.value = s.Value
	return nil
}
