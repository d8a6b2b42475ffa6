// Package driver is the thin layer between the replica protocol (package
// ft, a pure state machine) and the world: it is the machine's
// vmm.Environment on the vCPU thread, it carries the node's messages over
// a TCP link framed by ft/wire, it ticks the node's clock, and it performs
// the outputs the node releases. ft/doc.go ("The driver's contract") is
// its specification; this package follows it line by line.
//
// The same code serves the primary and the backup: the node decides what
// each call means by its role, and a backup that promotes itself becomes
// the primary without the driver changing anything.
package driver

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/ftkvm/ftkvm/ft"
	"github.com/ftkvm/ftkvm/ft/secure"
	"github.com/ftkvm/ftkvm/ft/wire"
	"github.com/ftkvm/ftkvm/vmm"
	"github.com/ftkvm/ftkvm/vmm/snapshot"
)

// Options configure a replica.
type Options struct {
	Node ft.Config
	// Console receives the outputs the node performs: the guest's console
	// on the primary, and on a backup once it is promoted.
	Console io.Writer
	// Log receives the node's notes (link up, backup lost, failover...).
	Log logrus.Ext1FieldLogger
	// Witness answers the node's claims (ft.Config.Witness): which
	// replica of the pair goes on when the two lose each other. Required
	// when the node has a witness.
	Witness Witness
	// TLS, if set, authenticates and encrypts the link (package
	// ft/secure): the peer must present a certificate from its CA, or the
	// connection is closed before anything of the guest is exchanged.
	TLS *tls.Config
	// InjectDivergence, if > 0, corrupts one byte of a page the guest
	// dirtied, on a backup, at the first verified epoch end at or after
	// this epoch: a test's way to see a divergence caught and repaired.
	InjectDivergence uint64
}

// Witness decides claims (package ft/witness's Client).
type Witness interface {
	Claim(ctx context.Context, c ft.Claim) (ft.Role, error)
}

// claimRetry is how long a claim waits before asking an unreachable
// witness again. The guest waits meanwhile: going on without an answer
// is what the witness is there to prevent.
const claimRetry = 200 * time.Millisecond

// Replica is one ftkvm replica: a node, its machine and its link.
type Replica struct {
	opts Options
	log  logrus.Ext1FieldLogger

	mu   sync.Mutex // guards everything below that is not atomic
	cond *sync.Cond // broadcast after every call into the node
	node *ft.Node

	m     Machine
	kick  func()
	start time.Time // the driver's clock: ns since New

	// Virtual time, seen by the guest only through Now: vbase + clock().
	// A backup raises vbase to the primary's values it replays, so that
	// after a failover its time goes on from the primary's.
	vbase    atomic.Int64
	lastRead int64 // the last virtual time the guest read (monotonic)

	last     vmm.Point // the last delivery point offered
	deadline int64     // the PIT deadline as of the last point (noDeadline: none)
	posted   int64     // the deadline a timer event was already posted for
	// held: the last timer event delivered left the deadline where it
	// was (the PIC still held the previous tick, devices.PIT.Fire). It is
	// posted again once the guest took that tick, or when the guest runs
	// on without exits (only a delivery lets the tick in at a kick point).
	held      bool
	heldExits uint64 // the last point's exit count at the ticker's last look
	started   bool   // the vCPU runs (Start was called)

	link    *link
	linkUp  chan struct{} // closed at the first NoteLinkUp
	upOnce  sync.Once
	peer    wire.Hello
	refused error // the handshake failed
	served  bool  // a backup accepted its one primary

	// Outputs to perform, by the performer goroutine.
	perfQ    []ft.Out
	perfCond *sync.Cond
	perfBusy bool

	wakeReq  bool        // the machine's Target.Wake fired while halted
	quit     atomic.Bool // the user quit
	fatal    error       // the driver cannot go on (a failed install...)
	finished bool        // the node said ActStop
	final    ft.Action
	done     chan struct{}
	stopOnce sync.Once

	// Dirty tracking: hashing an epoch drains the dirty log, so the pages
	// it drained are kept for the next incremental checkpoint.
	scratch, accum []uint64
	cp             vmm.Checkpoint
	mh             *memHash // verify mode's hash of guest memory
	injected       bool

	// A promoted backup's replay, watched by the ticker (watchReplay).
	stallEpoch  uint64
	stallPos    ft.Position
	stallSince  time.Time
	stallWarned bool

	linkBytes atomic.Int64   // bytes written to links
	prof      replicaProfile // profile.go
	trace     bool           // log every action (log level trace)
}

// LinkBytes is the number of bytes sent to peers so far.
func (r *Replica) LinkBytes() int64 { return r.linkBytes.Load() }

const noDeadline = int64(^uint64(0) >> 1)

var (
	errFinished = errors.New("replica finished")
	errWoken    = errors.New("woken for a control request")
)

// New returns a replica in opts.Node.Role with no machine and no link. Its
// clock and heartbeats run from now on; call Close when done.
func New(opts Options) *Replica {
	if opts.Log == nil {
		opts.Log = logrus.StandardLogger()
	}
	if opts.Console == nil {
		opts.Console = io.Discard
	}
	if opts.Node.Witness != (ft.Digest{}) && opts.Node.Instance == (ft.Digest{}) {
		// The pair's name at the witness must be new for every pair.
		_, _ = rand.Read(opts.Node.Instance[:])
	}
	r := &Replica{
		opts:     opts,
		log:      opts.Log,
		node:     ft.NewNode(opts.Node),
		start:    time.Now(),
		deadline: noDeadline,
		posted:   noDeadline,
		linkUp:   make(chan struct{}),
		done:     make(chan struct{}),
	}
	if l, ok := opts.Log.(*logrus.Logger); ok && l.IsLevelEnabled(logrus.TraceLevel) {
		r.trace = true
	}
	r.cond = sync.NewCond(&r.mu)
	r.perfCond = sync.NewCond(&r.mu)
	go r.ticker()
	go r.performer()
	return r
}

// clock is the driver's own time (ns): it times the node's decisions and
// never reaches the guest.
func (r *Replica) clock() int64 { return int64(time.Since(r.start)) }

// vnow is virtual time, without logging it.
func (r *Replica) vnow() int64 { return r.vbase.Load() + r.clock() }

// Attach gives the replica its machine: it turns the dirty log on, so that
// checkpoints and state hashes see every page the guest writes from now
// on. Call it before Run and before the machine runs.
//
// In verify mode (the primary's, which a backup learns from the
// handshake) it also hashes all of guest memory once, here, without the
// lock: at an epoch end, with the lock held, the driver's ticker could not
// send heartbeats while a large memory is hashed, and the peer would time
// out.
func (r *Replica) Attach(m Machine) error {
	if err := m.EnableDirtyLog(); err != nil {
		return err
	}
	r.mu.Lock()
	verify := r.opts.Node.Verify || r.peer.Verify
	r.mu.Unlock()
	var mh *memHash
	if verify {
		mh = newMemHash(m.Memory())
		mh.digest()
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.m = m
	r.scratch = make([]uint64, m.BitmapWords())
	r.accum = make([]uint64, m.BitmapWords())
	r.mh = mh
	return nil
}

// Console is the writer to give the machine as its UART output: every
// byte becomes an output of the node, performed when the policy allows.
func (r *Replica) Console() io.Writer { return consoleOut{r} }

type consoleOut struct{ r *Replica }

func (c consoleOut) Write(p []byte) (int, error) {
	r := c.r
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.finished || r.fatal != nil || r.quit.Load() { // a quit may have cut a call short
		return len(p), nil
	}
	a := r.node.Output(r.handling(), wire.KindConsole, p)
	if _, err := r.carry(a, false); err != nil && !errors.Is(err, errFinished) {
		r.setFatal(err)
	}
	return len(p), nil
}

// Input gives bytes typed for the guest (the terminal): the primary
// buffers them for the next epoch end, a backup ignores them.
func (r *Replica) Input(b []byte) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, c := range b {
		r.node.Async(ft.Event{Kind: wire.KindUART, Value: uint64(c)})
	}
	r.drain()
}

// Quit makes the machine stop at its next point (Ctrl-A x, a signal).
func (r *Replica) Quit() {
	if r.quit.CompareAndSwap(false, true) {
		r.mu.Lock()
		if r.kick != nil {
			r.kick()
		}
		r.cond.Broadcast()
		r.mu.Unlock()
	}
}

// Status is the node's status.
func (r *Replica) Status() ft.Status {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.node.Status()
}

// ---- vmm.Environment, on the vCPU thread ----

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

func (r *Replica) setFatal(err error) {
	if r.fatal == nil {
		r.fatal = err
		if r.kick != nil {
			r.kick()
		}
	}
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
			h, err := r.hash()
			r.prof.hash.add(t, 0)
			if err != nil {
				return a, err
			}
			a = r.node.Hashed(h)
		case ft.ActCheckpoint:
			t := time.Now()
			blob, err := r.capture(a.Full)
			if err != nil {
				return a, err
			}
			r.prof.capture.add(t, len(blob))
			a = r.node.Checkpointed(blob)
		case ft.ActInstall:
			t := time.Now()
			if err := r.install(a.State); err != nil {
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

// hash is the state hash of an epoch end: the registers and all of guest
// memory (memHash: the pages dirtied since the last hash are hashed
// again). The dirtied pages are kept for the next checkpoint.
func (r *Replica) hash() (ft.Digest, error) {
	var d ft.Digest
	if _, err := r.m.DirtyLog(r.scratch); err != nil {
		return d, fmt.Errorf("state hash: %w", err)
	}
	for i, w := range r.scratch {
		r.accum[i] |= w
	}
	if r.opts.InjectDivergence > 0 && !r.injected && r.node.Status().Role == ft.RoleBackup &&
		r.node.Status().Epoch >= r.opts.InjectDivergence {
		r.injectDivergence()
	}
	if r.mh == nil {
		// Verify mode that Attach did not know of.
		r.mh = newMemHash(r.m.Memory())
	}
	r.mh.mark(r.scratch)
	h := sha256.New()
	if err := r.m.WriteRegsHash(h); err != nil {
		return d, fmt.Errorf("state hash: %w", err)
	}
	// Hashing many pages (after an install, or the first time) takes a
	// while: the ticker and the link reader go on meanwhile, as while the
	// vCPU waits. The vCPU thread alone touches memHash and the memory.
	r.mu.Unlock()
	mem := r.mh.digest()
	r.mu.Lock()
	h.Write(mem[:])
	copy(d[:], h.Sum(nil))
	return d, nil
}

// injectDivergence flips a byte of the first page the guest dirtied in
// this epoch: a real difference of state that the hash must catch.
func (r *Replica) injectDivergence() {
	mem := r.m.Memory()
	vmm.ForEachPage(r.scratch, func(pfn uint64) {
		if r.injected {
			return
		}
		mem[pfn*snapshot.PageSize+snapshot.PageSize-1] ^= 0x5a
		r.injected = true
		r.log.Warnf("replica: test divergence injected into guest page %#x", pfn)
	})
}

// capture is a checkpoint at a quiescent point, as one stream.
func (r *Replica) capture(full bool) ([]byte, error) {
	// The checkpoint would drain the dirty log (a full one drops it): take
	// it first, so that the verify hash sees those pages, and only those.
	if _, err := r.m.DirtyLog(r.scratch); err != nil {
		return nil, fmt.Errorf("checkpoint: %w", err)
	}
	for i, w := range r.scratch {
		r.accum[i] |= w
	}
	if r.mh != nil {
		r.mh.mark(r.scratch)
	}
	if err := r.m.CheckpointWith(&r.cp, vmm.CheckpointOptions{Full: full, Extra: r.accum}); err != nil {
		return nil, fmt.Errorf("checkpoint: %w", err)
	}
	clear(r.accum)
	var buf bytes.Buffer
	if err := r.cp.Write(snapshot.NewWriter(&buf)); err != nil {
		return nil, fmt.Errorf("checkpoint: %w", err)
	}
	return buf.Bytes(), nil
}

// install replaces the machine's state with the primary's.
func (r *Replica) install(blob []byte) error {
	sr := snapshot.NewStreamReader(snapshot.NewReader(bytes.NewReader(blob)), func(h snapshot.Header) ([]byte, error) {
		if h.MemSize != r.m.MemSize() {
			return nil, fmt.Errorf("state for %d MiB of guest memory, this replica has %d MiB", h.MemSize>>20, r.m.MemSize()>>20)
		}
		return r.m.Memory(), nil
	})
	// The verify hash must see the pages the install changed (the dirty
	// log does not: the guest did not write them).
	if r.mh != nil {
		sr.Wrote = r.mh.markPage
	}
	st, err := sr.Read()
	if err != nil {
		return fmt.Errorf("install the primary's state: %w", err)
	}
	if err := r.m.Install(st); err != nil {
		return fmt.Errorf("install the primary's state: %w", err)
	}
	r.last = vmm.Point{Kind: vmm.PointKind(st.Machine.PointKind), Exits: st.Machine.PointExits, Instrs: st.Machine.Stats.Instrs}
	// What this replica's guest dirtied is replaced, and the install's
	// own writes are not the guest's.
	if _, err := r.m.DirtyLog(r.scratch); err != nil {
		return fmt.Errorf("install: %w", err)
	}
	if r.mh != nil {
		r.mh.mark(r.scratch)
	}
	clear(r.accum)
	return nil
}

// drain carries out the node's Ready: messages to the link, outputs to
// the performer, kicks, notes. mu is held.
func (r *Replica) drain() {
	rd := r.node.Ready()
	if l := r.link; l != nil {
		for _, m := range rd.Messages {
			var t time.Time
			if m.Type() == wire.TypeCheckpoint {
				t = time.Now() // only a checkpoint's encoding is worth a clock read
			}
			f := wire.Marshal(m)
			r.prof.sentMsg(m, len(f), t)
			l.send(f)
		}
		if rd.Close {
			l.closeAfterSend()
			r.link = nil
		}
	}
	if r.trace {
		for _, m := range rd.Messages {
			r.log.Tracef("replica: send %v %+v", m.Type(), m)
		}
	}
	if len(rd.Perform) > 0 {
		r.perfQ = append(r.perfQ, rd.Perform...)
		r.perfCond.Broadcast()
	}
	if rd.Kick && r.kick != nil {
		r.kick()
	}
	if rd.Claim != nil {
		go r.claim(*rd.Claim)
	}
	for _, n := range rd.Notes {
		r.noted(n)
	}
	r.cond.Broadcast()
}

func (r *Replica) noted(n ft.Note) {
	f := r.log.WithFields(logrus.Fields{"epoch": n.Epoch, "position": n.Pos.String()})
	switch n.Kind {
	case ft.NoteLinkUp:
		r.peer = n.Peer
		r.upOnce.Do(func() { close(r.linkUp) })
		f.Infof("replica: %v with a %v", n.Kind, n.Peer.Role)
	case ft.NoteRefused:
		if r.refused == nil {
			r.refused = n.Err
		}
		// Before a link is up the command fails with this error; later
		// (a new backup refused) it matters to the running primary.
		if r.m != nil && r.started {
			f.Warnf("replica: %v", n.Err)
		} else {
			f.Infof("replica: %v", n.Err)
		}
	case ft.NoteProtected:
		f.Infof("replica: protected: the backup holds the guest's state")
	case ft.NoteBackupLost:
		f.Warnf("replica: backup lost (%v); running unprotected", n.Err)
	case ft.NotePrimaryLost:
		if r.node.Role() != ft.RolePrimary {
			// After the guest's end (the goodbye), or with no state to
			// take over (a joining backup): the command says the rest.
			f.Infof("replica: the primary's link closed (%v); nothing to take over", n.Err)
			break
		}
		f.Warnf("replica: primary lost (%v); taking over", n.Err)
	case ft.NoteTakeover:
		// After a promotion, outputs whose performance the dead primary
		// had not confirmed (absorbed ones, and those replayed from the
		// log) are performed as uncertain: it may have performed them.
		// The offset places this replica's console output in the guest's
		// console stream, so that it joins the dead primary's exactly.
		f.Warnf("replica: performing from console byte offset %d (%d bytes uncertain: the primary had not confirmed them, they may repeat)",
			n.Seam, n.Uncertain)
	case ft.NoteLive:
		f.Warnf("replica: log replayed; this replica is the primary now, unprotected")
	case ft.NoteDivergence:
		f.Errorf("replica: DIVERGENCE: %v", n.Err)
	case ft.NoteRepaired:
		f.Warnf("replica: repaired: installed the primary's state")
	case ft.NoteGoodbye:
		f.Infof("replica: the guest ended on the primary with status %d", n.Status)
	case ft.NoteProtocol:
		f.Errorf("replica: %v", n.Err)
	case ft.NoteClaim:
		f.Warnf("replica: peer lost (%v); the guest waits while the witness decides which replica goes on", n.Err)
	case ft.NoteFenced:
		f.Errorf("replica: %v; this replica stops", n.Err)
	default:
		f.Infof("replica: %v", n)
	}
}

// claim asks the witness until it answers, then gives the node the
// answer. The node's vCPU waits meanwhile.
func (r *Replica) claim(c ft.Claim) {
	w := r.opts.Witness
	if w == nil {
		r.mu.Lock()
		r.setFatal(errors.New("replica: the peer is lost and the node asks a witness, but none is configured"))
		r.cond.Broadcast()
		r.mu.Unlock()
		return
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		select {
		case <-r.done:
			cancel()
		case <-ctx.Done():
		}
	}()
	for warned := false; ; {
		winner, err := w.Claim(ctx, c)
		if err == nil {
			r.mu.Lock()
			r.node.Claimed(winner == c.Role)
			r.drain()
			r.mu.Unlock()
			if winner == c.Role {
				r.log.Warnf("replica: the witness chose this replica (the %v); it goes on with the guest", c.Role)
			}
			return
		}
		if !warned {
			r.log.Errorf("replica: cannot reach the witness (%v); the guest waits, asking again every %v", err, claimRetry)
			warned = true
		}
		select {
		case <-r.done:
			return
		case <-time.After(claimRetry):
		}
	}
}

// performer writes released outputs in order, then confirms them.
func (r *Replica) performer() {
	r.mu.Lock()
	defer r.mu.Unlock()
	for {
		for len(r.perfQ) == 0 {
			select {
			case <-r.done:
				return
			default:
			}
			r.perfCond.Wait()
		}
		batch := r.perfQ
		r.perfQ = nil
		r.perfBusy = true
		r.mu.Unlock()
		for _, o := range batch {
			_, _ = r.opts.Console.Write(o.Data)
		}
		r.mu.Lock()
		r.perfBusy = false
		r.node.Performed(batch[len(batch)-1].Seq)
		r.drain()
		r.perfCond.Broadcast()
	}
}

// flushOutputs waits until every released output was written.
func (r *Replica) flushOutputs() {
	r.mu.Lock()
	defer r.mu.Unlock()
	for len(r.perfQ) > 0 || r.perfBusy {
		r.perfCond.Wait()
	}
}

// ticker gives the node its clock every millisecond, and the timer event
// of a guest that computes without exits.

func (r *Replica) ticker() {
	t := time.NewTicker(time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-t.C:
		case <-r.done:
			return
		}
		r.mu.Lock()
		r.repostHeld()
		r.postTimer()
		if l := r.link; l != nil {
			if rx := l.rx.Load(); rx != l.rxSeen {
				l.rxSeen = rx
				r.node.Heard()
			}
		}
		r.node.Tick(r.clock())
		if st := r.node.Status(); r.started && r.kick != nil && st.Replaying {
			// A promoted backup goes live at its next point; a guest
			// computing without exits would not reach one.
			r.kick()
			r.watchReplay(st)
		}
		r.drain()
		r.mu.Unlock()
	}
}

// replayStall is how long a promoted backup may replay without moving
// before the driver says so: replaying a log takes no longer than running
// it did.
const replayStall = 30 * time.Second

// watchReplay warns, once per position, when a promoted backup's replay
// stands still: a hang must not be silent. mu is held.
func (r *Replica) watchReplay(st ft.Status) {
	now := time.Now()
	if st.Epoch != r.stallEpoch || st.Pos != r.stallPos {
		r.stallEpoch, r.stallPos, r.stallSince, r.stallWarned = st.Epoch, st.Pos, now, false
		return
	}
	if !r.stallWarned && now.Sub(r.stallSince) >= replayStall {
		r.stallWarned = true
		r.log.Errorf("replica: the replay of the dead primary's log has not moved from epoch %d position %v for %v: %s",
			st.Epoch, st.Pos, replayStall, r.node.Describe())
	}
}

// watchWake turns the machine's wake-ups (control requests while the
// guest is halted) into a broadcast that Halt sees.
func (r *Replica) watchWake(wake <-chan struct{}) {
	for {
		select {
		case <-wake:
			r.mu.Lock()
			r.wakeReq = true
			r.cond.Broadcast()
			r.mu.Unlock()
		case <-r.done:
			return
		}
	}
}

// Run runs the attached machine as a replica until the guest ends (on
// this replica or, for a backup, on its primary), the user quits, or the
// replica fails. It returns the guest's exit status.
func (r *Replica) Run() (int, error) {
	status, err := r.m.Run()
	r.mu.Lock()
	switch {
	case errors.Is(err, errFinished):
	case err != nil:
		r.mu.Unlock()
		return 0, err
	default:
		// The guest ended by itself: the primary makes sure the backup
		// knows; a backup waits for its primary's word (or fails over).
		// First every output leaves and its performance is confirmed to
		// the backup: a backup told the guest ended stops without
		// performing anything, so a primary dying between its goodbye and
		// its last outputs would lose them.
		for r.node.Role() == ft.RolePrimary && r.fatal == nil && !r.node.Status().Fenced &&
			!r.quit.Load() && (r.node.Status().Held > 0 || len(r.perfQ) > 0 || r.perfBusy) {
			r.cond.Wait()
		}
		r.node.Tick(r.clock()) // sends the confirmation (Performed) now
		r.drain()
		a := r.node.Finish(status)
		if _, cerr := r.carry(a, false); cerr != nil && !errors.Is(cerr, errFinished) {
			r.mu.Unlock()
			return 0, cerr
		}
	}
	final := r.final
	r.mu.Unlock()
	r.flushOutputs()
	if final.Err != nil {
		return 0, final.Err
	}
	return final.Status, nil
}

// Close stops the replica's goroutines and its link.
func (r *Replica) Close() {
	r.stopOnce.Do(func() {
		close(r.done)
		r.mu.Lock()
		if r.link != nil {
			r.link.closeAfterSend()
			r.link = nil
		}
		r.perfCond.Broadcast()
		r.cond.Broadcast()
		r.mu.Unlock()
	})
}

// ---- Links ----

// Connect makes conn the replica's link: the node says hello. It fails if
// a link is up.
func (r *Replica) Connect(conn net.Conn) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.link != nil {
		return errors.New("replica: a link is up already")
	}
	r.connect(newLink(r, conn, nil, nil))
	r.drain()
	return nil
}

// connect makes l the link and says hello (r.mu held, no link up).
func (r *Replica) connect(l *link) {
	r.link = l
	r.node.Connected()
	go l.writer()
	go l.reader()
}

// Dial connects to a backup at addr (the primary's side), retrying for up
// to wait while nothing listens there yet.
func (r *Replica) Dial(addr string, wait time.Duration) error {
	deadline := time.Now().Add(wait)
	for {
		conn, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			setupTCP(conn)
			if r.opts.TLS != nil {
				if conn, err = secure.Client(conn, r.opts.TLS, 10*time.Second); err != nil {
					return fmt.Errorf("the backup at %s: %w", addr, err)
				}
			}
			return r.Connect(conn)
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("connect to the backup at %s: %w", addr, err)
		}
		select {
		case <-time.After(100 * time.Millisecond):
		case <-r.done:
			return fmt.Errorf("connect to the backup at %s: %w", addr, err)
		}
	}
}

// WaitLink waits until the handshake with a peer succeeded and returns
// the peer's hello, or the refusal.
func (r *Replica) WaitLink(timeout time.Duration) (wire.Hello, error) {
	var tc <-chan time.Time
	if timeout > 0 {
		t := time.NewTimer(timeout)
		defer t.Stop()
		tc = t.C
	}
	for {
		r.mu.Lock()
		refused, peer := r.refused, r.peer
		r.mu.Unlock()
		if refused != nil {
			return peer, refused
		}
		select {
		case <-r.linkUp:
			r.mu.Lock()
			defer r.mu.Unlock()
			return r.peer, nil
		case <-tc:
			return peer, errors.New("no handshake with the peer in time")
		case <-r.done:
			return peer, errors.New("replica closed")
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// Protect connects a running primary to a new backup at addr, which
// receives the guest's state and then replicates (ftkvm ctl protect).
func (r *Replica) Protect(addr string) error {
	r.mu.Lock()
	st := r.node.Status()
	busy := r.link != nil
	r.mu.Unlock()
	switch {
	case st.Claiming || st.Fenced:
		return errors.New("this replica lost its peer and waits for the witness (or was fenced): it cannot take a backup now")
	case st.Role != ft.RolePrimary:
		return errors.New("this replica is a backup: only the primary can be protected")
	case busy:
		return errors.New("this primary has a backup already")
	}
	return r.Dial(addr, 5*time.Second)
}

func setupTCP(conn net.Conn) {
	if tc, ok := conn.(*net.TCPConn); ok {
		_ = tc.SetNoDelay(true)
	}
}
