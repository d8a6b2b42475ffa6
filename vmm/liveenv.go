package vmm

import (
	"io"
	"math"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ftkvm/ftkvm/vmm/snapshot"
)

// LiveEnv is the environment of a machine running alone: host monotonic
// time, bytes from an input stream (the terminal), frames from network
// interfaces' host sides (liveframes.go), disk completions at the first
// point after the disk's I/O goroutine performed the request (DiskDone),
// and delivery of pending events at every point, kicks included, so that a guest spinning without
// exits still gets its timer ticks. It records nothing.
//
// Virtual time runs with host time while the machine runs: it starts when
// the machine starts (Start) and stands still while the machine holds the
// guest for control requests (Freeze/Thaw). A restored guest's time
// continues from the snapshot's (RestoreState).
type LiveEnv struct {
	origin time.Time
	base   atomic.Int64 // when running: virtual time = base + time.Since(origin)
	frozen atomic.Int64 // >= 0: virtual time stands at this value

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

	frames    liveFrames // network frames not yet delivered (liveframes.go)
	hasFrames atomic.Bool

	// Disk completions not yet delivered: at most devices.BlockSlots per
	// disk are in flight, so the queue is bounded by the guest's disks.
	diskMu    sync.Mutex
	disks     []DiskCompletion
	diskSpare []DiskCompletion
	hasDisks  atomic.Bool

	input io.Reader
	// kickFn is set by Start; disk completions may arrive before it (a
	// restored state's requests taken before Run), hence atomic.
	kickFn atomic.Pointer[func()]
}

const noDeadline = math.MaxInt64

// NewLiveEnv returns a live environment reading guest input from in (nil
// for none), with virtual time starting at 0.
func NewLiveEnv(in io.Reader) *LiveEnv { return NewLiveEnvAt(0, in) }

// NewLiveEnvAt is NewLiveEnv with virtual time starting at now (ns).
func NewLiveEnvAt(now int64, in io.Reader) *LiveEnv {
	e := &LiveEnv{
		origin:  time.Now(),
		wake:    make(chan struct{}, 1),
		inReady: make(chan struct{}, 1),
		quitCh:  make(chan struct{}),
		done:    make(chan struct{}),
		input:   in,
	}
	e.deadline.Store(noDeadline)
	e.frozen.Store(max(now, 0)) // until Start
	return e
}

// Now is virtual time: host monotonic time while the machine runs.
func (e *LiveEnv) Now() int64 {
	if f := e.frozen.Load(); f >= 0 {
		return f
	}
	return e.base.Load() + int64(time.Since(e.origin))
}

// Freeze stops virtual time (Freezer).
func (e *LiveEnv) Freeze() {
	if e.frozen.Load() < 0 {
		e.frozen.Store(e.Now())
	}
}

// Thaw lets virtual time run again from where Freeze stopped it.
func (e *LiveEnv) Thaw() {
	f := e.frozen.Load()
	if f < 0 {
		return
	}
	e.base.Store(f - int64(time.Since(e.origin)))
	e.frozen.Store(-1)
}

// SaveState records virtual time and the input not yet delivered
// (StateSaver).
func (e *LiveEnv) SaveState(s *snapshot.Env) {
	s.Now = e.Now()
	e.mu.Lock()
	s.Input = append(s.Input[:0], e.queue...)
	e.mu.Unlock()
}

// RestoreState sets virtual time and puts the saved input ahead of any
// input received so far. Call it before the machine runs.
func (e *LiveEnv) RestoreState(s *snapshot.Env) {
	if e.frozen.Load() >= 0 {
		e.frozen.Store(max(s.Now, 0))
	} else {
		e.base.Store(s.Now - int64(time.Since(e.origin)))
	}
	e.mu.Lock()
	e.queue = append(append([]byte(nil), s.Input...), e.queue...)
	e.hasInput.Store(len(e.queue) > 0)
	e.mu.Unlock()
}

// SetInput sets the input stream; call it before Start.
func (e *LiveEnv) SetInput(in io.Reader) { e.input = in }

// Quitting reports whether Quit was called.
func (e *LiveEnv) Quitting() bool { return e.quit.Load() }

// Start launches the input reader and the kicker, and starts virtual time.
func (e *LiveEnv) Start(kick func()) error {
	if kick != nil {
		e.kickFn.Store(&kick)
	}
	e.Thaw()
	if e.input != nil {
		go e.readInput()
	}
	e.startFrames()
	go e.kicker()
	return nil
}

// Quit asks the machine to stop at its next point (Ctrl-A x).
func (e *LiveEnv) Quit() {
	if e.quit.CompareAndSwap(false, true) {
		close(e.quitCh)
		e.kick()
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
	if e.hasFrames.Load() {
		e.deliverFrames(t)
	}
	if e.hasDisks.Load() {
		e.deliverDisks(t)
	}
}

// DiskDone queues a disk completion for the next point and wakes the
// vCPU (DiskEnvironment).
func (e *LiveEnv) DiskDone(c DiskCompletion) {
	e.diskMu.Lock()
	e.disks = append(e.disks, c)
	e.hasDisks.Store(true)
	e.diskMu.Unlock()
	select {
	case e.inReady <- struct{}{}:
	default:
	}
	e.kick()
}

// deliverDisks delivers the queued disk completions, oldest first. The
// two slices swap so that neither grows past the requests in flight.
func (e *LiveEnv) deliverDisks(t Target) {
	e.diskMu.Lock()
	batch := e.disks
	e.disks, e.diskSpare = e.diskSpare[:0], nil
	e.hasDisks.Store(false)
	e.diskMu.Unlock()
	for _, c := range batch {
		t.CompleteDisk(c.Disk, c.Seq)
	}
	e.diskMu.Lock()
	e.diskSpare = batch[:0]
	e.diskMu.Unlock()
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
		case <-t.Wake():
			return nil
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

// kick forces the vCPU out of KVM_RUN, once Start has given the means.
func (e *LiveEnv) kick() {
	if k := e.kickFn.Load(); k != nil {
		(*k)()
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
			if e.Now() < dl {
				continue // time stood still (Freeze) meanwhile
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
