package vmm

import (
	"io"
	"math"
	"sync"
	"sync/atomic"
	"time"
)

// LiveEnv is the environment of a machine running alone: host monotonic
// time, bytes from an input stream (the terminal), and delivery of pending
// events at every point, kicks included, so that a guest spinning without
// exits still gets its timer ticks. It records nothing.
type LiveEnv struct {
	start time.Time

	deadline atomic.Int64  // next timer deadline the vCPU reported; noDeadline if none
	wake     chan struct{} // kicker: the deadline changed
	inReady  chan struct{} // Halt: input arrived
	hasInput atomic.Bool
	quit     atomic.Bool
	quitCh   chan struct{}
	done     chan struct{}
	stopOnce sync.Once

	mu    sync.Mutex
	queue []byte // input not yet delivered

	input io.Reader
	kick  func()
}

const noDeadline = math.MaxInt64

// NewLiveEnv returns a live environment reading guest input from in (nil
// for none).
func NewLiveEnv(in io.Reader) *LiveEnv {
	e := &LiveEnv{
		start:   time.Now(),
		wake:    make(chan struct{}, 1),
		inReady: make(chan struct{}, 1),
		quitCh:  make(chan struct{}),
		done:    make(chan struct{}),
		input:   in,
	}
	e.deadline.Store(noDeadline)
	return e
}

// Now is host monotonic time since the environment was created.
func (e *LiveEnv) Now() int64 { return int64(time.Since(e.start)) }

// Start launches the input reader and the kicker.
func (e *LiveEnv) Start(kick func()) error {
	e.kick = kick
	if e.input != nil {
		go e.readInput()
	}
	go e.kicker()
	return nil
}

// Quit asks the machine to stop at its next point (Ctrl-A x).
func (e *LiveEnv) Quit() {
	if e.quit.CompareAndSwap(false, true) {
		close(e.quitCh)
		if e.kick != nil {
			e.kick()
		}
	}
}

// Stop ends the background goroutines. The input reader may stay blocked in
// Read until its stream has data; it delivers nothing after Stop.
func (e *LiveEnv) Stop() { e.stopOnce.Do(func() { close(e.done) }) }

// At delivers whatever is due: the timer if its deadline passed, and as
// much input as the UART can take.
func (e *LiveEnv) At(p Point, t Target) error {
	if e.quit.Load() {
		return ErrQuit
	}
	e.deliver(t)
	return nil
}

func (e *LiveEnv) deliver(t Target) {
	dl, ok := t.TimerDeadline()
	if ok {
		if now := e.Now(); now >= dl {
			t.FireTimer(now)
			dl, ok = t.TimerDeadline()
		}
	}
	if !ok {
		dl = noDeadline
	}
	if e.deadline.Swap(dl) != dl {
		select {
		case e.wake <- struct{}{}:
		default:
		}
	}
	if e.hasInput.Load() {
		e.mu.Lock()
		n := 0
		for n < len(e.queue) && t.RxSpace() > 0 {
			t.Receive(e.queue[n])
			n++
		}
		e.queue = e.queue[n:]
		e.hasInput.Store(len(e.queue) > 0)
		e.mu.Unlock()
	}
}

// Halt waits, in host time, for the next timer deadline or input.
func (e *LiveEnv) Halt(p Point, t Target) error {
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		if e.quit.Load() {
			return ErrQuit
		}
		e.deliver(t)
		if t.Pending() {
			return nil
		}
		var tc <-chan time.Time
		if dl, ok := t.TimerDeadline(); ok {
			timer.Reset(time.Duration(max(dl-e.Now(), 0)))
			tc = timer.C
		}
		select {
		case <-tc:
		case <-e.inReady:
		case <-e.quitCh:
		}
	}
}

func (e *LiveEnv) readInput() {
	buf := make([]byte, 256)
	for {
		n, err := e.input.Read(buf)
		if n > 0 {
			select {
			case <-e.done:
				return
			default:
			}
			e.mu.Lock()
			e.queue = append(e.queue, buf[:n]...)
			e.hasInput.Store(true)
			e.mu.Unlock()
			select {
			case e.inReady <- struct{}{}:
			default:
			}
			e.kick()
		}
		if err != nil {
			return
		}
	}
}

// kicker forces the vCPU out of a long stretch without exits when the timer
// deadline passes, so a guest computing at ring 3 still gets its ticks.
func (e *LiveEnv) kicker() {
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		dl := e.deadline.Load()
		if dl == noDeadline {
			select {
			case <-e.wake:
				continue
			case <-e.done:
				return
			}
		}
		if d := dl - e.Now(); d > 0 {
			timer.Reset(time.Duration(d))
			select {
			case <-timer.C:
			case <-e.wake:
				timer.Stop()
				continue
			case <-e.done:
				return
			}
		}
		if e.deadline.Load() == dl {
			e.kick()
		}
		// The guest may be unable to take the tick (interrupts off); wait
		// for the deadline to move before kicking again, or retry later.
		timer.Reset(time.Millisecond)
		select {
		case <-e.wake:
			timer.Stop()
		case <-timer.C:
		case <-e.done:
			return
		}
	}
}
