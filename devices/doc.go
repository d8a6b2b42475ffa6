// Package devices holds ftkvm's legacy PC device models: the 8259A PIC pair
// with ELCR, the 8254 PIT with port 0x61, the 16550A UART, the MC146818 CMOS
// RTC, the 0xcf9 reset control register, a minimal 8042 keyboard controller
// and the debug-exit port. They are pure Go and know nothing about KVM.
//
// # Determinism
//
// ftkvm replicates a guest deterministically, so a model never reads host
// time and never does anything on its own: there are no goroutines, timers
// or locks in this package. Virtual time comes only from the Clock interface
// and is read only when the guest's access needs it (a PIT counter read, an
// RTC time register read, ...); every Clock.Now call is an environment read
// that a backup replays. Asynchronous events are delivered by the VMM at
// moments it chooses: PIT.Fire (a counter 0 period elapsed, see
// PIT.Deadline) and UART.Receive (a byte arrived, see UART.RxSpace).
//
// # Threading
//
// Models are not safe for concurrent use. The VMM calls them from the vCPU
// thread only (or with its own serialisation). Callbacks given to a model
// (onReset, onExit, the IRQ sink, the UART output writer) run synchronously
// inside the Read/Write call that triggers them.
//
// # Bus and accesses
//
// A Bus maps port ranges to Devices and calls Device.Read/Write with the
// offset from the registered base. An access wider than one byte to these
// 8-bit ISA devices is split as the ISA bus does it: byte i goes to offset
// offset+i. Bytes that fall outside a device's registers read 0xff and count
// as unhandled. (DebugExit is the one exception: a wide write uses its low
// byte.) Read and Write do not allocate and do not log.
//
// # Unhandled accesses
//
// Every model has an Unhandled() uint64 counter of accesses it does not
// model (reads of write-only ports, unknown commands, features documented as
// not implemented). It is diagnostics only and is not part of State.
//
// # State
//
// Every model has State() returning a plain exported struct (fixed-size
// fields and arrays only, no pointers or interfaces) and SetState restoring
// it. Callbacks, the Clock, the IRQ sink and the UART writer are not part of
// the state: they are given at construction. SetState never calls them
// (it does not re-raise IRQ lines: the PIC's own state holds its input
// levels). Restore the PIC, PIT, UART, ... from states taken at the same
// instant.
package devices
