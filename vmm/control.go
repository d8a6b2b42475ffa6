package vmm

import (
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ftkvm/ftkvm/kvm"
)

// Control requests: how other goroutines (the control API, a migration)
// and the environment get the vCPU thread to act on the machine.
//
// A request is queued, a flag is set, and the vCPU is kicked. The loop
// checks the flag (one atomic load) before every KVM_RUN; when it is set the
// loop first makes the vCPU quiescent, then runs the requests on the vCPU
// thread, where every vCPU ioctl belongs. Quiescent means KVM holds no
// half-done instruction: after a port or MMIO exit KVM completes the
// instruction (writes the value read into RAX, advances RIP) only on the
// next KVM_RUN, so state read before that is not a state the guest can be
// resumed from. The loop re-enters KVM_RUN with immediate_exit set, which
// completes the instruction and returns EINTR without running the guest
// further. (A string instruction may exit again instead; that exit is a
// guest exit like any other and is handled as such, then the loop tries
// again.)
//
// While a request runs, and while the machine is paused, the environment's
// virtual time stands still (Freezer), so the guest does not see the hold.

// ErrNotRunning is returned by Do when the machine's Run has returned (or
// the machine was closed).
var ErrNotRunning = errors.New("the guest is not running")

// ErrStopped is returned by Run when the control API stopped the guest:
// after a snapshot taken with stop, or a migration that completed. The
// guest lives on elsewhere. The error's text says why.
var ErrStopped = errors.New("guest stopped")

type request struct {
	fn   func(*Machine) error
	done chan error
}

type control struct {
	pending atomic.Uint32 // the loop's one check: requests wait
	reqs    chan *request
	wake    chan struct{} // wakes Halt and the pause loop
	done    chan struct{} // closed when Run returns or the machine closes
	once    sync.Once
	started atomic.Bool

	// vCPU thread only.
	posted   []func(*Machine) error
	holds    int
	pausedAt time.Time

	paused     atomic.Bool
	pauses     atomic.Uint64
	lastPause  atomic.Int64
	totalPause atomic.Int64
}

func (c *control) init() {
	c.reqs = make(chan *request, 16)
	c.wake = make(chan struct{}, 1)
	c.done = make(chan struct{})
}

func (c *control) start() bool { return c.started.CompareAndSwap(false, true) }

// finish marks the machine as no longer running and fails queued requests.
func (c *control) finish() {
	if c.done == nil {
		return
	}
	c.once.Do(func() { close(c.done) })
	for {
		select {
		case r := <-c.reqs:
			r.done <- ErrNotRunning
		default:
			return
		}
	}
}

// kick gets the vCPU thread's attention: out of KVM_RUN, out of Halt, out
// of the pause loop. Any goroutine. It is also the kick the environment
// gets in Start.
func (m *Machine) kick() {
	m.kicks.Add(1)
	m.kvcpu.Kick()
	select {
	case m.ctl.wake <- struct{}{}:
	default:
	}
}

// Wake returns a channel that receives when the machine needs its vCPU
// thread back while the guest is halted; Environment.Halt implementations
// return nil early when it fires.
func (m *Machine) Wake() <-chan struct{} { return m.ctl.wake }

// Do runs fn on the vCPU thread at the next quiescent point and returns its
// error. Call it from any goroutine but the vCPU thread's (there it would
// wait for itself: use Post). If Run has not started yet, fn waits for it.
// While fn runs the guest does not, and fn may use every method that needs
// the vCPU thread: CaptureState, Checkpoint, Install, Pause, Stop, ...
func (m *Machine) Do(fn func(*Machine) error) error {
	select {
	case <-m.ctl.done:
		return ErrNotRunning
	default:
	}
	r := &request{fn: fn, done: make(chan error, 1)}
	select {
	case m.ctl.reqs <- r:
	case <-m.ctl.done:
		return ErrNotRunning
	}
	m.ctl.pending.Store(1)
	m.kick()
	select {
	case err := <-r.done:
		return err
	case <-m.ctl.done:
		select {
		case err := <-r.done:
			return err
		default:
			return ErrNotRunning
		}
	}
}

// Post queues fn to run on the vCPU thread at the next quiescent point,
// before the guest runs again. It is for code already on the vCPU thread:
// an Environment's At or Halt (a replica taking a checkpoint at an exit).
// An error from fn stops the machine: Run returns it.
func (m *Machine) Post(fn func(*Machine) error) {
	m.ctl.posted = append(m.ctl.posted, fn)
	m.ctl.pending.Store(1)
}

// service runs on the vCPU thread when requests are pending.
func (m *Machine) service() error {
	m.ctl.pending.Store(0)
	if err := m.quiesce(); err != nil {
		return err
	}
	if m.stopped {
		return nil
	}
	if f, ok := m.env.(Freezer); ok {
		f.Freeze()
		defer f.Thaw()
	}
	// A Stop takes effect when the last hold is released: a migration
	// stops the guest, then still uses the vCPU thread while it finishes.
	for {
		for len(m.ctl.posted) > 0 {
			fn := m.ctl.posted[0]
			m.ctl.posted[0] = nil
			m.ctl.posted = m.ctl.posted[1:]
			if err := fn(m); err != nil {
				return err
			}
		}
		select {
		case r := <-m.ctl.reqs:
			r.done <- r.fn(m)
			continue
		default:
		}
		if m.ctl.holds == 0 {
			return nil
		}
		select {
		case r := <-m.ctl.reqs:
			r.done <- r.fn(m)
		case <-m.ctl.wake:
			if q, ok := m.env.(interface{ Quitting() bool }); ok && q.Quitting() {
				return ErrQuit
			}
		}
	}
}

// quiesce completes the instruction of the last exit, if any (see above).
func (m *Machine) quiesce() error {
	for !m.quiescent && !m.stopped {
		m.kvcpu.Kick() // immediate_exit: complete the instruction, run nothing more
		reason, err := m.vcpu.Run()
		if err != nil {
			return err
		}
		if reason == kvm.ExitIntr {
			// Not a delivery point: the environment is not told.
			m.vcpu.ClearImmediateExit()
			m.quiescent = true
			return nil
		}
		if err := m.exit(reason); err != nil {
			return err
		}
	}
	return nil
}

// Pause holds the guest: it returns once the vCPU is parked at a quiescent
// point, and the guest stays parked until as many Resumes as Pauses. Any
// goroutine but the vCPU thread's. Requests still run while it is paused.
func (m *Machine) Pause() error { return m.Do(func(m *Machine) error { m.hold(); return nil }) }

// Resume undoes one Pause.
func (m *Machine) Resume() error { return m.Do(func(m *Machine) error { return m.release() }) }

// hold and release are Pause and Resume on the vCPU thread.
func (m *Machine) hold() {
	m.ctl.holds++
	if m.ctl.holds == 1 {
		m.ctl.pausedAt = time.Now()
		m.ctl.paused.Store(true)
	}
}

func (m *Machine) release() error {
	if m.ctl.holds == 0 {
		return errors.New("the guest is not paused")
	}
	m.ctl.holds--
	if m.ctl.holds == 0 {
		d := int64(time.Since(m.ctl.pausedAt))
		m.ctl.lastPause.Store(d)
		m.ctl.totalPause.Add(d)
		m.ctl.pauses.Add(1)
		m.ctl.paused.Store(false)
	}
	return nil
}

// Stop ends the machine's Run with an error wrapping ErrStopped and the
// reason (on the vCPU thread, inside Do or Post), once no Pause holds it.
// The guest does not run again. A later Stop or Fail replaces the reason.
func (m *Machine) Stop(reason string) {
	m.stopped, m.exitStatus, m.stopReason = true, 0, reason
	m.stopErr = fmt.Errorf("%w: %s", ErrStopped, reason)
}

// Fail is Stop with an error of the caller's for Run to return.
func (m *Machine) Fail(err error) {
	m.stopped, m.exitStatus, m.stopReason = true, 0, err.Error()
	m.stopErr = err
}

// ControlStats is what the control side knows about the machine; any
// goroutine may read it.
type ControlStats struct {
	Running    bool          // Run is active
	Paused     bool          // held by Pause
	Pauses     uint64        // completed pauses
	LastPause  time.Duration // the last completed pause
	TotalPause time.Duration // all completed pauses
}

// ControlStats returns the control-side counters.
func (m *Machine) ControlStats() ControlStats {
	running := m.ctl.started.Load()
	select {
	case <-m.ctl.done:
		running = false
	default:
	}
	return ControlStats{
		Running:    running,
		Paused:     m.ctl.paused.Load(),
		Pauses:     m.ctl.pauses.Load(),
		LastPause:  time.Duration(m.ctl.lastPause.Load()),
		TotalPause: time.Duration(m.ctl.totalPause.Load()),
	}
}
