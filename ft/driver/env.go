package driver

// The environment seam (vmm.Environment): clock reads, delivery points and
// halts, called on the vCPU thread only.
//
// Locking: each call takes r.mu for its whole length. carry releases it
// only in cond.Wait (ActWait: the node waits for the peer or the
// performer), Halt between two offers of the same point, and hash while
// it digests memory; after each of those it re-reads what it depends on.

import (
	"errors"
	"fmt"
	"runtime"
	"time"

	"github.com/ftkvm/ftkvm/ft"
	"github.com/ftkvm/ftkvm/ft/wire"
	"github.com/ftkvm/ftkvm/vmm"
	"github.com/ftkvm/ftkvm/vmm/snapshot"
)

// clock is the driver's own time (ns): it times the node's decisions and
// never reaches the guest.
func (r *Replica) clock() int64 { return int64(time.Since(r.start)) }

// vnow is virtual time, without logging it.
func (r *Replica) vnow() int64 { return r.vbase.Load() + r.clock() }

// Now is an environment read (P0/P3): the primary logs its virtual time,
// a backup takes the logged value.
func (r *Replica) Now() int64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	if !r.started {
		// Firmware set-up (vmm.New programs the PIT) before the guest
		// runs: virtual time has not started, on either replica.
		return 0
	}
	live := max(r.vnow(), r.lastRead)
	if r.finished || r.fatal != nil || r.quit.Load() { // a quit may have cut a call short
		return live
	}
	a := r.node.Read(r.handling(), wire.KindClock, uint64(live))
	a, err := r.carry(a, false)
	if err != nil {
		if !errors.Is(err, errFinished) && !errors.Is(err, vmm.ErrQuit) {
			r.setFatal(err)
		}
		return live
	}
	v := int64(a.Value)
	r.adopt(v)
	return v
}

// adopt makes the local virtual time no earlier than v, a time the guest
// has seen: a promoted backup then goes on from the primary's time.
func (r *Replica) adopt(v int64) {
	r.lastRead = max(r.lastRead, v)
	if d := v - r.clock(); d > r.vbase.Load() {
		r.vbase.Store(d)
	}
}

// ExactPoints: every delivery point must be found again by the other
// replica, so the machine must not use interrupt windows where they are
// host-timed (vmm.ExactPoints).
func (r *Replica) ExactPoints() bool { return true }

// VirtualNow is virtual time for status displays (vmm.VirtualClock): not a
// read the guest makes, so it is not logged.
func (r *Replica) VirtualNow() int64 { return r.vnow() }

// Start is called on the vCPU thread before the guest first runs.
func (r *Replica) Start(kick func()) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.m == nil {
		return errors.New("replica: Attach the machine before running it")
	}
	r.kick = kick
	if !r.started {
		// Virtual time starts with the guest, unless a state installed
		// before Run set it (RestoreState).
		if r.vbase.Load() == 0 {
			r.vbase.Store(-r.clock())
		}
		r.started = true
	}
	go r.watchWake(r.m.Wake())
	r.startDisks()
	if r.node.Role() == ft.RolePrimary {
		r.startNets(false)
	}
	return nil
}

// At offers a delivery point to the node.
func (r *Replica) At(p vmm.Point, t vmm.Target) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if err := r.check(); err != nil {
		return err
	}
	r.last = p
	r.noteDeadline(t)
	a := r.node.Point(r.point(p, t))
	_, err := r.carry(a, false)
	return err
}

// Halt: the guest waits in HLT with nothing pending.
func (r *Replica) Halt(p vmm.Point, t vmm.Target) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	for {
		if err := r.check(); err != nil {
			return err
		}
		r.last = p
		r.noteDeadline(t)
		a := r.node.Halt(r.point(p, t))
		a, err := r.carry(a, true)
		switch {
		case errors.Is(err, errWoken):
			return nil
		case err != nil:
			return err
		case a.Kind == ft.ActYield || t.Pending() || r.last != p:
			// (r.last != p: an install replaced the machine's state,
			// which need not be halted: the machine goes on from it.)
			return nil
		}
		// Nothing woke the guest: offer the point again, but let the
		// ticker, the link and the performer have the lock in between,
		// or they would wait as long as the guest does.
		r.mu.Unlock()
		runtime.Gosched()
		r.mu.Lock()
	}
}

// Stop is called once when the machine stops.
func (r *Replica) Stop() {}

// SaveState and RestoreState carry virtual time in checkpoints
// (vmm.StateSaver). They run inside carry, with mu held: atomics only.
func (r *Replica) SaveState(s *snapshot.Env) {
	s.Now = max(r.vnow(), r.lastRead)
	s.Input = s.Input[:0]
}

func (r *Replica) RestoreState(s *snapshot.Env) {
	// Called by Install with mu held (from carry), or before Run.
	if d := s.Now - r.clock(); d > r.vbase.Load() {
		r.vbase.Store(d)
	}
	r.lastRead = max(r.lastRead, s.Now)
}

func (r *Replica) point(p vmm.Point, t vmm.Target) ft.Point {
	pt := ft.Point{Pos: ft.Position{Exits: p.Exits, Instr: p.Instrs}, Kick: p.Kind == vmm.PointKick, Now: r.clock(), RxSpace: t.RxSpace()}
	if r.exact() {
		pt.Instructions = r.m.Steps()
	}
	return pt
}

// exact reports whether positions count instructions (the step clock).
func (r *Replica) exact() bool { return r.opts.Node.Guest.Clock != wire.ClockExits }

// handling is the position of the instruction being handled when the
// guest reads or outputs: with the exit clock the exit after the last
// point (reads at N come before point N); with the step clock the
// instruction after the last point, whether it exits (a port access) or
// ftkvm carries it out (RDTSC).
func (r *Replica) handling() ft.Position {
	if r.exact() {
		return ft.Position{Exits: r.last.Exits, Instr: r.last.Instrs + 1}
	}
	return ft.Position{Exits: r.last.Exits + 1}
}

// check reports why the vCPU must not go on, if it must not.
func (r *Replica) check() error {
	switch {
	case r.fatal != nil:
		return r.fatal
	case r.finished:
		return errFinished
	case r.quit.Load():
		return vmm.ErrQuit
	}
	return nil
}

// noteDeadline records the PIT's deadline and posts the timer event if it
// passed (P1: the node buffers it).
func (r *Replica) noteDeadline(t vmm.Target) {
	dl, ok := t.TimerDeadline()
	if !ok {
		dl = noDeadline
	}
	if r.held && (dl != r.deadline || !t.Pending()) {
		// The guest took the tick the PIC held: post the next one.
		r.held, r.posted = false, noDeadline
	}
	r.deadline = dl
	r.postTimer()
}

// repostHeld posts again a deadline whose tick the PIC holds when the
// guest made no exit since the ticker's last look: it computes without
// exits, and the held tick enters only at a delivery (an epoch end). A
// guest that makes exits takes it at one (vmm's inject) without an epoch
// end, which under strict would cost an acknowledgement each. Ticker only.
func (r *Replica) repostHeld() {
	if !r.held {
		return
	}
	if r.last.Exits == r.heldExits {
		r.held, r.posted = false, noDeadline
	}
	r.heldExits = r.last.Exits
}

func (r *Replica) postTimer() {
	if !r.started || r.deadline == noDeadline || r.posted == r.deadline {
		return
	}
	if r.node.Role() != ft.RolePrimary {
		// A backup's own events are ignored (P4): post nothing, so that
		// after a promotion this deadline is still posted.
		return
	}
	if now := r.vnow(); now >= r.deadline {
		r.node.Async(ft.Event{Kind: wire.KindTimer, Value: uint64(now)})
		r.posted = r.deadline
	}
}

// carry does what the node asks until it lets the vCPU go on (ActGo,
// ActYield) or stops it. mu is held; ActWait releases it while waiting.
func (r *Replica) carry(a ft.Action, inHalt bool) (ft.Action, error) {
	for {
		if r.trace {
			r.log.Tracef("replica: at %v/%d (%v): %v", r.last.Kind, r.last.Exits, r.node.Describe(), a)
		}
		r.drain()
		switch a.Kind {
		case ft.ActGo:
			return a, nil
		case ft.ActYield:
			if r.kick != nil {
				r.kick()
			}
			return a, nil
		case ft.ActStop:
			r.finished, r.final = true, a
			r.cond.Broadcast()
			return a, errFinished
		case ft.ActWait:
			if r.quit.Load() {
				return a, vmm.ErrQuit
			}
			if r.fatal != nil {
				return a, r.fatal
			}
			// A control request needs the thread: leave a Halt that
			// has done nothing yet (the node allows offering it again).
			if inHalt && r.wakeReq && r.node.CanLeave() {
				r.wakeReq = false
				return a, errWoken
			}
			t := time.Now()
			r.cond.Wait()
			r.prof.waits[min(int(a.Wait), len(r.prof.waits)-1)].add(t, 0)
			a = r.node.Continue()
		case ft.ActDeliver:
			for _, ev := range a.Events {
				switch ev.Kind {
				case wire.KindTimer:
					r.m.FireTimer(int64(ev.Value))
				case wire.KindUART:
					r.m.Receive(byte(ev.Value))
				case wire.KindNetRx:
					r.m.ReceiveFrame(int(ev.Value), ev.Data)
				case wire.KindDiskDone:
					r.completeDisk(ev) // diskdone.go
				}
			}
			// A tick moves the deadline: learn the next one now, since
			// a guest computing without exits offers no point to see it.
			// The PIT catches up one edge per tick (a next deadline that
			// is due already is posted at once), and holds one back while
			// the PIC holds the previous edge (held: posted again later).
			dl := r.deadline
			r.noteDeadline(r.m)
			for _, ev := range a.Events {
				if ev.Kind == wire.KindTimer && r.deadline == dl && dl != noDeadline {
					r.held, r.heldExits = true, r.last.Exits
				}
			}
			a = r.node.Continue()
		case ft.ActHash:
			t := time.Now()
			if a.Pages {
				regs, pages, err := r.pageHashes()
				r.prof.hash.add(t, 0)
				if err != nil {
					return a, err
				}
				a = r.node.HashedPages(regs, pages)
				continue
			}
			h, err := r.hash()
			r.prof.hash.add(t, 0)
			if err != nil {
				return a, err
			}
			a = r.node.Hashed(h)
		case ft.ActCheckpoint:
			t := time.Now()
			var blob []byte
			var err error
			if a.Repair {
				blob, err = r.captureRepair(a.Against)
			} else {
				blob, err = r.capture(a.Full)
			}
			if err != nil {
				return a, err
			}
			r.prof.capture.add(t, len(blob))
			if a.Join {
				// The images as of this state, before it (disks.go).
				if err := r.sendDisks(); err != nil {
					return a, err
				}
			}
			// Disk requests waiting in the rings are taken now, after
			// the capture settled those in flight: a backup installing
			// the state takes them at the same point (vmm.SettleDisks).
			r.m.ServiceDisks()
			a = r.node.Checkpointed(blob)
		case ft.ActInstall:
			t := time.Now()
			if a.Join {
				if err := r.disksReceived(); err != nil {
					return a, err
				}
			}
			if err := r.install(a.State, a.Repair, a.Join); err != nil {
				return a, err
			}
			r.prof.install.add(t, len(a.State))
			r.noteDeadline(r.m)
			a = r.node.Continue()
		default:
			return a, fmt.Errorf("replica: unknown action %v", a)
		}
	}
}
