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
//
// Files, by concern: driver.go (the replica, its loop and its ticker),
// env.go (the vmm.Environment seam on the vCPU thread: clock reads, epoch
// ends, halts), output.go (the console and the performer of released
// outputs), net.go (network interfaces: received frames, transmitted
// ones, the announcement at a takeover), state.go (state hashes,
// checkpoints and their installation),
// connect.go (links: dialing, accepting a peer, re-protection), link.go
// (one framed TCP link), accept.go (the listener and strangers).
package driver

import (
	"crypto/rand"
	"crypto/tls"
	"errors"
	"io"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/ftkvm/ftkvm/ft"
	"github.com/ftkvm/ftkvm/ft/wire"
	"github.com/ftkvm/ftkvm/vmm"
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
	// NICs are the guest's network interfaces, in the machine's order
	// (vmm.Config.NICs, whose Tx is NetTx(i)).
	NICs []NIC
}

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
	seqs           []uint64 // the disks' next sequence numbers, checked by an install
	mh             *memHash // verify mode's hash of guest memory
	injected       bool

	// A promoted backup's replay, watched by the ticker (watchReplay).
	stallEpoch  uint64
	stallPos    ft.Position
	stallSince  time.Time
	stallWarned bool

	net  netState  // net.go
	disk diskState // diskdone.go

	// Disks at a join (disks.go): the primary streams its images
	// (diskCopy); a joining backup receives them (diskRx, diskErr).
	diskCopy bool
	diskBusy bool // the link's reader writes a chunk, without the lock
	diskRx   []diskRx
	diskErr  error

	// Metrics (lag.go): the log records not yet done with by the other
	// side, the ticker's last time (ns, the driver's clock) that stamps
	// them, and how long released outputs were held.
	lag    lagLog
	tickAt int64
	holds  holdHist
	claims claimCounts

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
	r.net.netAttached = make(chan struct{})
	r.disk.wake = make(chan struct{}, 1)
	r.net.addrs = make([]guestIPv4, len(opts.NICs))
	if l, ok := opts.Log.(*logrus.Logger); ok && l.IsLevelEnabled(logrus.TraceLevel) {
		r.trace = true
	}
	r.cond = sync.NewCond(&r.mu)
	r.perfCond = sync.NewCond(&r.mu)
	go r.ticker()
	go r.performer()
	return r
}

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
	r.cond.Broadcast() // a joining backup's disk chunks wait for the machine (disks.go)
	return nil
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

func (r *Replica) setFatal(err error) {
	if r.fatal == nil {
		r.fatal = err
		if r.kick != nil {
			r.kick()
		}
	}
}

// drain carries out the node's Ready: messages to the link, outputs to
// the performer, kicks, notes. mu is held.
func (r *Replica) drain() {
	rd := r.node.Ready()
	if l := r.link; l != nil {
		for _, m := range rd.Messages {
			if cp, ok := m.(wire.Checkpoint); ok {
				// Encoded by the link's writer, without the lock; only a
				// checkpoint's encoding is worth a clock read. Its size
				// for the lag is its state's (the rest is a few bytes).
				if cp.Seq > 0 {
					r.lag.push(cp.Seq, r.lag.total+int64(len(cp.State)), r.tickAt)
				}
				l.sendLater(m)
				continue
			}
			f := wire.Marshal(m)
			r.prof.sentMsg(m, len(f), time.Time{})
			if seq := recordSeq(m); seq > 0 {
				r.lag.push(seq, r.lag.total+int64(len(f)), r.tickAt)
			}
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
		// Only now does this replica act for the guest on the network
		// (P4): attach the host sides, announce, then transmit.
		r.startNets(true)
		// After a promotion, outputs whose performance the dead primary
		// had not confirmed (absorbed ones, and those replayed from the
		// log) are performed as uncertain: it may have performed them.
		// The offset places this replica's console output in the guest's
		// console stream, so that it joins the dead primary's exactly.
		f.Warnf("replica: performing from console byte offset %d (%d bytes uncertain: the primary had not confirmed them, they may repeat)",
			n.Seam, n.Uncertain)
	case ft.NoteLive:
		f.Warnf("replica: log replayed; this replica is the primary now, unprotected")
		// The disk requests whose completions the log did not carry
		// complete here now (diskdone.go).
		r.postInFlight()
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

func (r *Replica) ticker() {
	t := time.NewTicker(time.Millisecond)
	defer t.Stop()
	prev := time.Now()
	for {
		select {
		case <-t.C:
		case <-r.done:
			return
		}
		woke := time.Now()
		r.mu.Lock()
		now := time.Now()
		gap := now.Sub(prev)
		stalled := gap >= tickerStall
		prev = now
		r.repostHeld()
		r.postTimer()
		if l := r.link; l != nil {
			if rx := l.rx.Load(); rx != l.rxSeen || r.diskBusy {
				// A chunk of the primary's image being written here
				// (disks.go) is a sign of life like bytes arriving.
				l.rxSeen = rx
				r.node.Heard()
			}
		}
		if stalled {
			r.node.Stalled(int64(gap - time.Millisecond))
			r.stalled(gap, now.Sub(woke))
		}
		r.tickAt = r.clock()
		r.node.Tick(r.tickAt)
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

// tickerStall is how late the ticker (due every millisecond) may run
// before the gap is reported to the node as a stall (ft.Node.Stalled). A
// late ticker means this replica did not run: its process was not
// scheduled, or its vCPU thread held the lock. The peer's frames may then
// be waiting unread in this side's socket, and the node would count that
// time as the peer's silence and declare a live peer dead (a backup busy
// installing, hashing or simply starved on a loaded host is alive). The
// node pushes the peer's timeout back by the stall's length; a broken
// connection is still seen at once.
const tickerStall = 100 * time.Millisecond

// stalled notes a ticker that ran gap late (mu held): in the profile, and
// in the log when the gap reaches half the peer timeout.
// lockWait is the part of it the ticker waited for the lock (held by the
// vCPU thread; the rest, the process or the goroutine was not scheduled).
func (r *Replica) stalled(gap, lockWait time.Duration) {
	r.prof.stalls++
	r.prof.stallMax = max(r.prof.stallMax, gap)
	r.prof.stallLock += lockWait
	if tout := r.opts.Node.Timeout; tout > 0 && gap >= tout/2 {
		r.log.Warnf("replica: this replica did not run for %v (its ticker, due every millisecond, ran late; %v of it waiting for the lock); the peer's timeout is pushed back by as much",
			gap.Round(time.Millisecond), lockWait.Round(time.Millisecond))
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
		closePorts(r.net.ports)
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
