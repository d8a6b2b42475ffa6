package vmm

import "errors"

// PointKind tells apart the two kinds of delivery point.
type PointKind uint8

const (
	// PointExit is a guest-caused exit (port or MMIO access, HLT, interrupt
	// window, MSR access). A second replica running the same guest finds it
	// again at the same instruction, so events delivered here are replayable.
	PointExit PointKind = iota
	// PointKick is a return from KVM_RUN that the VMM forced (immediate_exit
	// and a signal) because the guest ran long without exiting. Its place in
	// the instruction stream depends on host timing: it is never replayable.
	PointKick
)

func (k PointKind) String() string {
	if k == PointKick {
		return "kick"
	}
	return "exit"
}

// Point is a moment at which the environment may deliver asynchronous
// events into the guest.
type Point struct {
	Kind PointKind
	// Exits counts guest-caused exits since the machine started, this one
	// included; with Kind == PointKick it is the count at the last such exit.
	// It is the position a replica uses to find the point again.
	Exits uint64
}

// Target is what the environment delivers into: the machine's asynchronous
// event sinks. Its methods are called only on the vCPU thread, from inside
// At or Halt.
type Target interface {
	// TimerDeadline is the virtual time at which the PIT's counter 0 next
	// raises IRQ0, if it is running.
	TimerDeadline() (int64, bool)
	// FireTimer delivers that timer event as of virtual time now.
	FireTimer(now int64)
	// RxSpace is how many bytes the UART can receive without loss.
	RxSpace() int
	// Receive delivers one byte arriving on the UART.
	Receive(b byte)
	// Pending reports whether an interrupt is waiting to be injected.
	Pending() bool
}

// Environment is the single seam through which everything that could make
// two runs of the same guest differ reaches it: (a) host time, read by the
// PIT, the RTC and the TSC MSR; (b) bytes arriving on the UART; (c) the
// decision of when a pending asynchronous event is delivered. The machine
// has no other source of time, input or interrupts. A primary replica
// records what passes through here; a backup replays it.
type Environment interface {
	// Now returns virtual time in nanoseconds since the machine started.
	Now() int64
	// Start is called once on the vCPU thread before the guest first runs.
	// kick forces the vCPU out of KVM_RUN (a PointKick follows); it may be
	// called from any goroutine.
	Start(kick func()) error
	// At is offered every delivery point. It delivers what it decides into
	// t. A non-nil error stops the machine (ErrQuit: the user asked).
	At(p Point, t Target) error
	// Halt is called at a HLT exit when the guest waits for an interrupt
	// with interrupts enabled and none is pending. It blocks until an
	// interrupt is pending in t, or returns an error that stops the machine.
	Halt(p Point, t Target) error
	// Stop releases what Start acquired. The machine calls it once.
	Stop()
}

// ErrQuit is returned by an environment when the user asked to quit.
var ErrQuit = errors.New("quit requested")
