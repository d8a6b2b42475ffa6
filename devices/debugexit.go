package devices

// Debug exit port at 0x501: the guest ends the run by writing its exit
// status. ftkvm uses the byte v as the status directly; QEMU's isa-debug-exit
// instead exits with (v<<1)|1.

// DebugExit is the debug-exit port. Register it at 0x501 with size 1.
type DebugExit struct {
	onExit    func(code uint8)
	unhandled uint64
}

// NewDebugExit returns the port; onExit (may be nil) is called synchronously
// with the written byte.
func NewDebugExit(onExit func(code uint8)) *DebugExit {
	return &DebugExit{onExit: onExit}
}

// Unhandled counts reads (the port is write only) and writes at a nonzero
// offset.
func (d *DebugExit) Unhandled() uint64 { return d.unhandled }

// Read implements Device: the port is write only and reads 0xff.
func (d *DebugExit) Read(offset uint64, data []byte) {
	d.unhandled++
	for i := range data {
		data[i] = 0xff
	}
}

// Write implements Device. A write wider than a byte uses its low byte
// (x86 is little endian: data[0]).
func (d *DebugExit) Write(offset uint64, data []byte) {
	if offset != 0 || len(data) == 0 {
		d.unhandled++
		return
	}
	if d.onExit != nil {
		d.onExit(data[0])
	}
}

// DebugExitState is empty: the port has no state.
type DebugExitState struct{}

// State returns the (empty) state.
func (d *DebugExit) State() DebugExitState { return DebugExitState{} }

// SetState restores a state from State.
func (d *DebugExit) SetState(DebugExitState) error { return nil }
