package vmm

// ftkvm boots kernels directly (PVH, Linux 64-bit entry): no BIOS runs
// first. Kernels nevertheless expect the legacy devices in the state PC
// firmware leaves them, and some depend on it: Linux's KASLR entropy
// (arch/x86/lib/kaslr.c, i8254()) spins on the PIT read-back status until
// counter 0 has a count loaded, so a never-programmed PIT hangs it before
// its console starts. QEMU's and KVM's PIT reset to the same state.
//
// firmwareInit programs, through the port bus exactly as firmware would:
//   - the PIC pair initialised (master vectors 0x08, slave 0x70, cascade on
//     IR2, 8086 mode) with every line masked, so nothing is injected before
//     the guest programs the PIC itself;
//   - PIT counter 0 in mode 3 with count 0 (65536, the 18.2 Hz BIOS tick).
//
// The PIT's count load reads virtual time once, through the environment.
func (m *Machine) firmwareInit() {
	for _, w := range []struct {
		port uint64
		v    byte
	}{
		{0x20, 0x11}, {0x21, 0x08}, {0x21, 0x04}, {0x21, 0x01}, {0x21, 0xff},
		{0xa0, 0x11}, {0xa1, 0x70}, {0xa1, 0x02}, {0xa1, 0x01}, {0xa1, 0xff},
		{0x43, 0x36}, {0x40, 0x00}, {0x40, 0x00},
	} {
		m.pio.Write(w.port, []byte{w.v})
	}
}
