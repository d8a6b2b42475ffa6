package ft

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"net"
	"slices"

	"github.com/ftkvm/ftkvm/ft/wire"
)

// Node is one replica's protocol state machine: the primary, or the
// backup, which becomes the primary when it promotes itself. It is not
// safe for concurrent use: the driver serializes every call (one mutex)
// and drains Ready after each.
type Node struct {
	cfg                                  Config
	self                                 wire.Hello
	epochLen, kickAfter, heartbeat, tout int64

	role Role

	// The link to the peer.
	link      linkState
	peer      wire.Hello
	heard     bool   // something arrived since the last Tick
	lastHeard int64  // the Tick at which something last arrived
	lastSent  int64  // when something was last sent (as of the latest timestamp)
	hbEpoch   uint64 // last progress heartbeat sent (primary), or received (backup)
	hbPos     Position

	now      int64 // the latest timestamp seen
	started  bool  // the guest has run (primary)
	epoch    uint64
	pos      Position // the last point
	outSeq   uint64   // outputs the guest produced
	outBytes uint64   // bytes of console output the guest produced (the stream's length)

	op         op // the conversation with the vCPU thread in progress
	stopAction Action

	// Primary.
	protected bool // a backup holds our state and receives the log
	joining   bool // a backup passed the handshake and needs the full state
	repair    bool // the backup asked for its repair
	// A page repair (verify mode): the backup's page hashes, received in
	// order (wire.PageHashes) up to peerTotal; the repair waits for the
	// last of them (pagesIn).
	repairPages bool
	peerPages   []uint64
	peerTotal   uint64
	pagesIn     bool
	seq, acked  uint64
	events      []Event // P1: buffered asynchronous events
	// pendingFrames: the KindNetRx events among events (MaxPendingFrames).
	pendingFrames int
	rxSpace       int // the UART's room at the last point
	epochStart    int64
	instrs        uint64 // Point.Instructions at the latest point (exact clocks)
	epochStartI   uint64 // instrs when the epoch began
	due           bool   // an epoch end is due (seen by Tick) since dueSince
	dueSince      int64
	kicked        bool // a kick was requested at kickedAt and no kick point came yet
	kickedAt      int64
	held          []heldOut // outputs waiting for acknowledgements
	performed     uint64    // outputs the driver performed (Performed)
	doneSent      uint64    // the highest confirmation sent to the backup

	// Backup.
	log       []wire.Msg // records received and not replayed, in order
	recv      uint64     // the last log sequence number received
	ackSent   uint64
	confirmed uint64 // the primary performed every output up to here
	absorbed  []Out  // outputs absorbed and not confirmed: redone at promotion
	hasState  bool   // it holds the guest's state (booted alongside, or installed)
	diverged  bool   // waiting for the primary's state
	// pagesDue: diverged, and its page hashes are still to be taken and
	// sent (at its next quiescent point); pagesSent: they were, and a page
	// repair may come. checkRepair: a page repair was installed and no
	// compared hash has matched since; a divergence then asks for the
	// full state.
	pagesDue, pagesSent, checkRepair bool
	goodbye                          bool // the guest ended on the primary with goodbyeStatus
	goodbyeSt                        int
	replaying                        bool  // promoted; still replaying the log
	failed                           error // it cannot go on (ActStop with this error)

	// Fencing (Config.Witness).
	pair     Digest // names the pair, from both Hellos
	claiming bool   // the peer is lost; the witness has not answered
	claimWhy error  // why the peer was declared lost
	claimOut *Claim // to hand out in Ready
	claimDue int64  // a diverged backup claims only from then on
	claimed  bool   // the claim was handed out

	// Produced, drained by Ready.
	outbox    []wire.Msg
	perform   []Out
	notes     []Note
	kick      bool
	closeLink bool

	st Status // counters
}

type linkState uint8

const (
	linkDown  linkState = iota
	linkHello           // our Hello is sent, the peer's not yet accepted
	linkUp
)

type heldOut struct {
	out Out
	seq uint64 // the log sequence number of its Output record
}

// op is the vCPU thread's call in progress. A call returns an action; the
// driver carries it out and calls Continue, Hashed or Checkpointed, which
// resume the call where stage says, until it returns ActGo, ActYield or
// ActStop.
type op struct {
	kind    opKind
	stage   stage
	pt      Point
	rkind   Kind   // Read, Output
	value   uint64 // Read: the live value
	data    []byte // Output
	status  int    // Finish
	halt    bool   // the epoch ends in Halt
	woke    bool   // Halt (backup): events were delivered in this call
	events  []Event
	hash    Digest
	hashed  bool
	full    bool
	repair  bool // the checkpoint captured is a page repair
	state   []byte
	waitSeq uint64
	last    ActionKind
}

type opKind uint8

const (
	opNone opKind = iota
	opPoint
	opHalt
	opRead
	opOutput
	opFinish
	opStopped
)

var opNames = [...]string{"none", "Point", "Halt", "Read", "Output", "Finish", "stopped"}

type stage uint8

const (
	stStart         stage = iota
	stHashed              // ActHash returned; Hashed resumes
	stCheckpointed        // ActCheckpoint returned; Checkpointed resumes
	stAck                 // a record was sent; the policy may wait for its ack
	stDelivered           // ActDeliver returned (or nothing to deliver)
	stInstalled           // ActInstall returned
	stMatch               // Output: counted; now matched against the log
	stDeliver             // backup: the epoch end is checked; deliver its events
	stCkptDelivered       // backup: the checkpoint's events are delivered
	stGoOn                // backup: an epoch ended here; may the guest run on?
	stPageHashed          // backup: ActHash with Pages returned; HashedPages resumes
)

// NewNode returns a node in cfg.Role, at epoch 1, position 0, with no
// link. A primary runs unprotected until a backup's handshake completes.
func NewNode(cfg Config) *Node {
	cfg.setDefaults()
	if cfg.Role != RolePrimary && cfg.Role != RoleBackup {
		panic("ft: Config.Role must be RolePrimary or RoleBackup")
	}
	n := &Node{
		cfg:       cfg,
		role:      cfg.Role,
		epoch:     1,
		epochLen:  int64(cfg.EpochLength),
		kickAfter: int64(cfg.KickAfter),
		heartbeat: int64(cfg.Heartbeat),
		tout:      int64(cfg.Timeout),
	}
	if cfg.Witness != (Digest{}) && cfg.Instance == (Digest{}) {
		panic("ft: Config.Witness needs Config.Instance")
	}
	g := cfg.Guest
	n.self = wire.Hello{Version: ProtocolVersion, Policy: cfg.Policy, Clock: g.Clock, Verify: cfg.Verify,
		MemSize: g.MemSize, WallClock: g.WallClock, Kernel: g.Kernel, Initrd: g.Initrd, Cmdline: g.Cmdline,
		Instance: cfg.Instance, Witness: cfg.Witness, Windows: g.Windows, CPU: g.CPU, Disks: g.Disks, NICs: g.NICs}
	return n
}

// ---- Calls from the vCPU thread ----

// Point offers a delivery point (vmm.Environment.At). On the primary's
// exit path, with nothing due, it returns ActGo without allocating.
func (n *Node) Point(pt Point) Action {
	n.begin(opPoint)
	n.op.pt = pt
	return n.run()
}

// Halt is called when the guest waits in HLT at pt with nothing pending
// (vmm.Environment.Halt). After ActGo the driver returns from Halt if an
// interrupt is pending, else calls Halt again. While it waits (ActWait)
// the driver may return early for vmm's Target.Wake and call Halt again
// later instead of Continue.
func (n *Node) Halt(pt Point) Action {
	n.begin(opHalt)
	pt.Kick = false
	n.op.pt = pt
	return n.run()
}

// Read is an environment read of kind at pos, while the exit that makes
// point pos is handled. live is the environment's real value: the primary
// logs it (P0); the backup returns the logged one (P3) until it is
// promoted and its log ends. The final ActGo carries the value.
func (n *Node) Read(pos Position, kind Kind, live uint64) Action {
	n.begin(opRead)
	n.op.pt.Pos, n.op.rkind, n.op.value = pos, kind, live
	return n.run()
}

// Output is output of kind leaving the guest at pos (the UART transmits).
// It is never performed by the caller: Ready.Perform hands it out when
// the policy allows, and a backup absorbs it (P4). data must not change
// until the call ends (ActGo); the node keeps a copy of what it needs.
func (n *Node) Output(pos Position, kind Kind, data []byte) Action {
	n.begin(opOutput)
	n.op.pt.Pos, n.op.rkind, n.op.data = pos, kind, data
	return n.run()
}

// Finish: the guest ended by itself with status. The final action is
// ActStop: the primary first makes sure the backup got the goodbye; a
// backup waits for its primary's goodbye (or fails over).
func (n *Node) Finish(status int) Action {
	n.begin(opFinish)
	n.op.status = status
	return n.run()
}

// Continue resumes the call after ActWait, ActDeliver or ActInstall.
func (n *Node) Continue() Action {
	n.resume(ActWait, ActDeliver, ActInstall)
	return n.run()
}

// Hashed gives the state hash ActHash asked for.
func (n *Node) Hashed(h Digest) Action {
	n.resume(ActHash)
	if n.op.kind != opStopped && n.op.stage == stPageHashed {
		panic("ft: Hashed for page hashes (HashedPages)")
	}
	n.op.hash, n.op.hashed = h, true
	return n.run()
}

// HashedPages gives the page hashes ActHash with Pages asked for (a
// diverged backup): the hash of the vCPU registers and one 64-bit hash
// per page of guest memory (ft/doc.go, verify mode). The node keeps pages.
func (n *Node) HashedPages(regs Digest, pages []uint64) Action {
	n.resume(ActHash)
	if n.op.kind != opStopped && n.op.stage != stPageHashed {
		panic("ft: HashedPages for a state hash (Hashed)")
	}
	n.sendPageHashes(regs, pages)
	return n.run()
}

// Checkpointed gives the state ActCheckpoint asked for. The node keeps
// state until the next Ready has been sent.
func (n *Node) Checkpointed(state []byte) Action {
	n.resume(ActCheckpoint)
	n.op.state = state
	return n.run()
}

func (n *Node) begin(k opKind) {
	if n.op.kind == opStopped {
		return // every call answers ActStop again
	}
	// vmm's Halt may return early (Target.Wake: a control request) and
	// be called again: a Halt still waiting where it began has done
	// nothing yet and may be offered again. Every other wait must be
	// seen through.
	reoffer := k == opHalt && n.op.kind == opHalt && n.op.last == ActWait && n.op.stage == stStart
	if n.op.kind != opNone && !reoffer {
		panic(fmt.Sprintf("ft: %s called while %s waits for the answer to %v", opNames[k], opNames[n.op.kind], n.op.last))
	}
	n.op = op{kind: k}
}

func (n *Node) resume(want ...ActionKind) {
	if n.op.kind == opStopped {
		return
	}
	if n.op.kind == opNone || !slices.Contains(want, n.op.last) {
		panic(fmt.Sprintf("ft: resuming %s after %v", opNames[n.op.kind], n.op.last))
	}
}

// run advances the call in progress by the rules of the node's role.
func (n *Node) run() Action {
	if n.op.kind == opStopped {
		return n.stopAction
	}
	var a Action
	switch {
	case n.failed != nil:
		a = Action{Kind: ActStop, Err: n.failed}
	case n.claiming:
		// Neither replica may act for the guest before the witness
		// answered: the call resumes where it stood.
		a = wait(WaitWitness)
	case n.role == RolePrimary && !n.replaying:
		a = n.primaryStep()
	default:
		a = n.backupStep()
	}
	switch a.Kind {
	case ActGo, ActYield:
		n.op = op{}
	case ActStop:
		n.op = op{kind: opStopped}
		n.stopAction = a
	default:
		n.op.last = a.Kind
	}
	return a
}

var (
	goAction = Action{Kind: ActGo}
)

func wait(w WaitReason) Action { return Action{Kind: ActWait, Wait: w} }

// ---- Calls from any goroutine (serialized) ----

// Async gives an asynchronous event that arrived (a timer deadline that
// passed, a byte typed). The primary buffers it (P1); a backup ignores its
// own (P4).
func (n *Node) Async(ev Event) {
	if n.role != RolePrimary {
		return
	}
	n.p1Buffer(ev)
}

// Performed: the driver performed every output up to seq.
func (n *Node) Performed(seq uint64) {
	n.performed = max(n.performed, seq)
}

// Tick gives the time (ns, the same clock as Point.Now). Call it at
// least every millisecond: it sends heartbeats, declares a silent peer
// dead, and kicks a vCPU whose epoch end is overdue.
func (n *Node) Tick(now int64) {
	n.observe(now)
	n.askWitness()
	if n.heard {
		n.lastHeard, n.heard = now, false
	}
	if n.link != linkDown && now-n.lastHeard >= n.tout {
		n.peerLost(fmt.Errorf("%w: nothing heard for %v", ErrPeerLost, n.cfg.Timeout))
	}
	if n.role == RolePrimary && !n.replaying {
		n.primaryTick(now)
	}
	if n.link == linkUp && now-n.lastSent >= n.heartbeat {
		n.send(wire.Heartbeat{Epoch: n.epoch, Pos: n.pos})
	}
}

func (n *Node) observe(t int64) { n.now = max(n.now, t) }

// Connected: a link to a peer is up (the driver connected or accepted).
// The node sends its Hello; the peer's decides the handshake. One link at
// a time: the driver refuses others (wire.Refuse, RefuseBusy) and calls
// Disconnected before a new one.
func (n *Node) Connected() {
	if n.link != linkDown {
		panic("ft: Connected while a link is up")
	}
	n.link, n.heard = linkHello, true
	n.seq, n.acked, n.recv, n.ackSent = 0, 0, 0, 0
	h := n.self
	h.Role, h.Started = n.role, n.started
	n.send(h)
}

// Disconnected: the link broke (EOF, reset, a decoding error).
func (n *Node) Disconnected() {
	if n.link != linkDown {
		n.peerLost(fmt.Errorf("%w: the connection broke", ErrPeerLost))
	}
}

// Step gives a message from the peer.
func (n *Node) Step(m wire.Msg) {
	if n.link == linkDown {
		return // from a link already given up on
	}
	n.heard = true
	switch m := m.(type) {
	case wire.Hello:
		n.stepHello(m)
		return
	case wire.Refuse:
		err := fmt.Errorf("%w by the peer: %v: %s", ErrRefused, m.Reason, m.Text)
		n.note(NoteRefused, err)
		// A backup that refuses a running primary (a protocol error)
		// then takes over: the primary asks the witness too. A refusal
		// in the handshake loses nothing.
		var lost error
		if n.link == linkUp {
			lost = err
		}
		n.dropLink(lost)
		if n.role == RoleBackup {
			// Refused in the handshake, or cut off by a primary that goes
			// on alone: either way there is nothing to take over.
			n.failed = fmt.Errorf("%w by the primary: %v: %s", ErrRefused, m.Reason, m.Text)
		}
		return
	}
	if n.link != linkUp {
		n.protocolError(fmt.Errorf("%v before the handshake", m.Type()))
		return
	}
	if n.role == RolePrimary {
		n.primaryStepMsg(m)
	} else {
		n.backupStepMsg(m)
	}
}

// Ready drains what the node produced.
func (n *Node) Ready() Ready {
	if n.link == linkUp && n.recv > n.ackSent {
		// Acknowledge every record received, once per batch.
		n.send(wire.Ack{Seq: n.recv})
		n.ackSent = n.recv
	}
	r := Ready{Messages: n.outbox, Perform: n.perform, Kick: n.kick, Close: n.closeLink, Notes: n.notes, Claim: n.claimOut}
	n.outbox, n.perform, n.notes, n.kick, n.closeLink, n.claimOut = nil, nil, nil, false, false, nil
	return r
}

// Status reports the node's state and counters.
func (n *Node) Status() Status {
	s := n.st
	s.Role = n.role
	s.Link = n.link == linkUp
	s.Protected, s.Joining, s.Replaying, s.Diverged = n.protected, n.joining, n.replaying, n.diverged
	s.Claiming, s.Fenced = n.claiming, errors.Is(n.failed, ErrFenced)
	s.Epoch, s.Pos, s.Outputs, s.ConsoleBytes = n.epoch, n.pos, n.outSeq, n.outBytes
	if n.role == RolePrimary {
		s.Performed = n.performed
	} else {
		s.Performed = n.confirmed
	}
	s.Held, s.LogSent, s.LogAcked, s.LogReceived, s.Backlog = len(n.held), n.seq, n.acked, n.recv, len(n.log)
	return s
}

// ---- The link ----

func (n *Node) send(m wire.Msg) {
	if n.link == linkDown {
		return
	}
	n.outbox = append(n.outbox, m)
	n.lastSent = n.now
}

func (n *Node) note(k NoteKind, err error) {
	n.notes = append(n.notes, Note{Kind: k, Epoch: n.epoch, Pos: n.pos, Err: err})
}

// dropLink closes the link. A primary whose backup may take over (the
// handshake had succeeded) asks the witness first, if there is one;
// otherwise it goes on unprotected at once. why is nil when the link
// closes without a loss (a refusal in the handshake).
func (n *Node) dropLink(why error) {
	up := n.link == linkUp
	n.link = linkDown
	n.closeLink = true
	if n.role != RolePrimary {
		return
	}
	// A backup still joining (the full state not sent) cannot take over:
	// nothing to ask.
	if up && why != nil && !n.joining && n.fencing() {
		// Held outputs stay held: if the backup wins, it performs them.
		n.protected, n.joining, n.repair = false, false, false
		n.repairPages, n.pagesIn, n.peerPages = false, false, nil
		n.claim(why)
		return
	}
	n.backupGone()
	// A link that breaks before the handshake lost no backup: there was
	// none (the driver reports the failed handshake).
	if why != nil && up && n.op.kind != opStopped {
		n.note(NoteBackupLost, why)
	}
}

// peerLost: the peer is dead or unreachable. A primary goes on
// unprotected; a backup fails over. With a witness, either asks it first.
func (n *Node) peerLost(err error) {
	if n.role == RolePrimary {
		n.dropLink(err)
		return
	}
	up := n.link == linkUp
	n.dropLink(nil)
	n.promote(err, up)
}

// fencing reports whether a lost peer is a question for the witness.
func (n *Node) fencing() bool {
	return n.cfg.Witness != (Digest{}) && n.op.kind != opStopped && n.failed == nil
}

// claim asks the witness whether this replica goes on (Ready.Claim); the
// vCPU waits until Claimed.
//
// A backup that diverged and waits for its repair claims one Timeout
// late: its state is known to be wrong, so a primary that is alive (the
// link was cut) claims first and goes on; only a dead primary leaves the
// guest to it.
func (n *Node) claim(why error) {
	n.claiming, n.claimWhy, n.claimed = true, why, false
	n.claimDue = n.now
	if n.role == RoleBackup && n.diverged {
		n.claimDue = n.now + n.tout
	}
	n.kick = true // a guest computing without exits stops at a point and waits there
	n.note(NoteClaim, why)
	n.askWitness()
}

// askWitness hands the claim out once it is due.
func (n *Node) askWitness() {
	if n.claiming && !n.claimed && n.now >= n.claimDue {
		n.claimOut = &Claim{Pair: n.pair, Role: n.role}
		n.claimed = true
	}
}

// Claimed gives the witness's answer to Ready.Claim: won, this replica
// goes on (a primary unprotected, a backup takes over); lost, the witness
// gave the guest to the peer and this replica stops (ActStop, ErrFenced),
// performing nothing more.
func (n *Node) Claimed(won bool) {
	if !n.claiming {
		return
	}
	n.claiming = false
	n.kick = true
	why := n.claimWhy
	n.claimWhy = nil
	if !won {
		peer := "backup"
		if n.role == RoleBackup {
			peer = "primary"
		}
		n.failed = fmt.Errorf("%w: the peer was lost (%v), and the witness chose the %s, which goes on with the guest", ErrFenced, why, peer)
		n.note(NoteFenced, n.failed)
		return
	}
	if n.role == RolePrimary {
		n.backupGone()
		n.note(NoteBackupLost, why)
		return
	}
	n.note(NotePrimaryLost, why)
	n.takeOver()
}

func (n *Node) protocolError(err error) {
	err = fmt.Errorf("%w: %v", ErrProtocol, err)
	n.note(NoteProtocol, err)
	n.send(wire.Refuse{Reason: wire.RefuseProtocol, Text: err.Error()})
	n.peerLost(err)
}

// stepHello is the handshake: each side sends its Hello and checks the
// peer's. A mismatch is refused with the reason, and the link closed.
func (n *Node) stepHello(h wire.Hello) {
	if n.link != linkHello {
		n.protocolError(fmt.Errorf("a second hello"))
		return
	}
	if reason, err := n.compatible(h); err != nil {
		n.send(wire.Refuse{Reason: reason, Text: err.Error()})
		n.note(NoteRefused, fmt.Errorf("%w: %v", ErrRefused, err))
		n.link, n.closeLink = linkDown, true
		if n.role == RoleBackup && !n.hasState {
			n.failed = fmt.Errorf("%w: %v", ErrRefused, err)
		}
		return
	}
	n.link, n.peer = linkUp, h
	n.pair = pairName(n.self.Instance, h.Instance, n.role)
	n.notes = append(n.notes, Note{Kind: NoteLinkUp, Epoch: n.epoch, Pos: n.pos, Peer: h})
	if n.role == RolePrimary {
		n.backupJoined()
	} else if !h.Started {
		// Both boot the same guest: the backup's state is the primary's.
		n.hasState = true
	}
}

// TakesDisks reports whether this node is a backup joining a running
// guest that has not received its state yet: the only replica to which a
// primary sends its disk images (wire.DiskData, ft/doc.go "Checkpoint
// epochs, repair, re-protection").
func (n *Node) TakesDisks() bool {
	return n.role == RoleBackup && n.link == linkUp && n.peer.Started && !n.hasState
}

// Admits reports whether a peer whose Hello is h could complete the
// handshake with this node now, and if not, the refusal's reason. The
// backup's driver asks it of every connection before it makes one its
// link (Connected, then Step with h): a stranger (a port scanner, a
// health check, a foreign guest's primary) never becomes the peer, so its
// going away is no loss of a primary.
func (n *Node) Admits(h wire.Hello) (wire.RefuseReason, error) {
	switch {
	case n.link != linkDown:
		return wire.RefuseBusy, errors.New("a link is up already")
	case n.failed != nil:
		return wire.RefuseBusy, fmt.Errorf("this replica has stopped: %v", n.failed)
	}
	return n.compatible(h)
}

// compatible reports why the peer cannot be our partner, if it cannot.
func (n *Node) compatible(h wire.Hello) (wire.RefuseReason, error) {
	s := n.self
	short := func(d Digest) string { return fmt.Sprintf("%x", d[:6]) }
	// A backup joining a running guest receives the read-write images'
	// contents with the state: their digests are not compared.
	joins := n.role == RoleBackup && h.Started && !n.hasState || n.role == RolePrimary && n.started
	switch {
	case h.Version != ProtocolVersion:
		return wire.RefuseVersion, fmt.Errorf("the peer speaks protocol version %d, this ftkvm %d", h.Version, ProtocolVersion)
	case h.Role == n.role:
		if n.role == RolePrimary {
			return wire.RefuseRole, fmt.Errorf("both replicas are primaries")
		}
		return wire.RefuseRole, fmt.Errorf("both replicas are backups")
	case h.Role != RolePrimary && h.Role != RoleBackup:
		return wire.RefuseRole, fmt.Errorf("the peer has no role (%v)", h.Role)
	case h.Kernel != s.Kernel:
		return wire.RefuseKernel, fmt.Errorf("different kernel: sha256 %s here, %s on the peer", short(s.Kernel), short(h.Kernel))
	case h.Initrd != s.Initrd:
		return wire.RefuseInitrd, fmt.Errorf("different initrd: sha256 %s here, %s on the peer", short(s.Initrd), short(h.Initrd))
	case h.Cmdline != s.Cmdline:
		return wire.RefuseCmdline, fmt.Errorf("different command line: sha256 %s here, %s on the peer", short(s.Cmdline), short(h.Cmdline))
	case h.MemSize != s.MemSize:
		return wire.RefuseMemory, fmt.Errorf("different memory size: %d MiB here, %d MiB on the peer", s.MemSize>>20, h.MemSize>>20)
	case h.Clock != s.Clock:
		return wire.RefuseClock, fmt.Errorf("different epoch clock: %v here, %v on the peer", s.Clock, h.Clock)
	case h.Witness != s.Witness:
		// Two witnesses, or one side without, would let both go on.
		name := func(d Digest) string {
			if d == (Digest{}) {
				return "none"
			}
			return "sha256 " + short(d)
		}
		return wire.RefuseWitness, fmt.Errorf("different witness: %s here, %s on the peer (both need the same --witness)", name(s.Witness), name(h.Witness))
	case n.role == RoleBackup && h.Started && !n.cfg.Join && !n.hasState:
		return wire.RefuseJoin, fmt.Errorf("the primary's guest runs already: a backup receives its state only when started with --join")
	case n.role == RoleBackup && h.Windows && !s.Windows:
		return wire.RefuseWindows, fmt.Errorf("the primary requests interrupt windows, which this backup's KVM does not open at points the guest defines (guest ring 0 is emulated here); run the primary with --interrupt-windows off, or the backup on a host like the primary's")
	case n.role == RolePrimary && s.Windows && !h.Windows:
		return wire.RefuseWindows, fmt.Errorf("this primary requests interrupt windows, which the backup's KVM does not open at points the guest defines (guest ring 0 is emulated there); run the primary with --interrupt-windows off, or the backup on a host like the primary's")
	case h.CPU != s.CPU && !(n.role == RoleBackup && h.Started) && !(n.role == RolePrimary && n.started):
		return wire.RefuseCPU, fmt.Errorf("the guest would see a different CPU: CPUID sha256 %s here, %s on the peer (replicas need the same CPU model and KVM)", short(s.CPU), short(h.CPU))
	case !slices.EqualFunc(h.Disks, s.Disks, func(a, b wire.Disk) bool { return sameDisk(a, b, joins) }):
		return wire.RefuseDisks, fmt.Errorf("different disks: %s", diskDiff(s.Disks, h.Disks, joins))
	case !slices.Equal(h.NICs, s.NICs):
		return wire.RefuseNICs, fmt.Errorf("different network interfaces: %s", nicDiff(s.NICs, h.NICs))
	case s.Witness != (Digest{}) && (h.Instance == (Digest{}) || h.Instance == s.Instance):
		return wire.RefuseWitness, fmt.Errorf("the peer's instance name is %s: the pair cannot be named at the witness", name0(h.Instance))
	}
	return 0, nil
}

// sameDisk reports whether two replicas' disks match: size, read-only
// flag and contents; with joins, a read-write image's contents are the
// primary's to send, not compared.
func sameDisk(a, b wire.Disk, joins bool) bool {
	if joins && !a.ReadOnly && !b.ReadOnly {
		a.Digest = b.Digest
	}
	return a == b
}

// diskDiff says how the disks here and on the peer differ.
func diskDiff(here, peer []wire.Disk, joins bool) string {
	if len(here) != len(peer) {
		return fmt.Sprintf("%d here, %d on the peer", len(here), len(peer))
	}
	for i := range here {
		a, b := here[i], peer[i]
		switch {
		case a.Size != b.Size:
			return fmt.Sprintf("disk %d has %d bytes here, %d on the peer", i, a.Size, b.Size)
		case a.ReadOnly != b.ReadOnly:
			ro := func(r bool) string {
				if r {
					return "read-only"
				}
				return "read-write"
			}
			return fmt.Sprintf("disk %d is %s here, %s on the peer", i, ro(a.ReadOnly), ro(b.ReadOnly))
		case a.Digest != b.Digest && joins:
			return fmt.Sprintf("read-only disk %d's contents differ: sha256 %x here, %x on the peer (a joining backup receives the read-write images, and needs an identical copy of each read-only one)", i, a.Digest[:6], b.Digest[:6])
		case a.Digest != b.Digest:
			return fmt.Sprintf("disk %d's contents differ: sha256 %x here, %x on the peer (each replica needs an identical copy of the image)", i, a.Digest[:6], b.Digest[:6])
		}
	}
	return "they differ"
}

// nicDiff says how the network interfaces here and on the peer differ.
func nicDiff(here, peer []wire.NIC) string {
	if len(here) != len(peer) {
		return fmt.Sprintf("%d here, %d on the peer (both need the same --net interfaces, in order)", len(here), len(peer))
	}
	for i := range here {
		if here[i] != peer[i] {
			return fmt.Sprintf("interface %d has MAC %s here, %s on the peer (give both the same mac=, or none)",
				i, net.HardwareAddr(here[i].MAC[:]), net.HardwareAddr(peer[i].MAC[:]))
		}
	}
	return "they differ"
}

func name0(d Digest) string {
	if d == (Digest{}) {
		return "empty"
	}
	return "this replica's own"
}

// pairName names a primary-backup pair at the witness: a hash of both
// replicas' instance names, the primary's first.
func pairName(self, peer Digest, role Role) Digest {
	h := sha256.New()
	h.Write([]byte("ftkvm pair\x00"))
	if role == RolePrimary {
		h.Write(self[:])
		h.Write(peer[:])
	} else {
		h.Write(peer[:])
		h.Write(self[:])
	}
	var d Digest
	copy(d[:], h.Sum(nil))
	return d
}

// Role is the node's role now: a backup that promoted itself is the
// primary (its asynchronous events count from then on).
func (n *Node) Role() Role { return n.role }

// Describe summarizes the node's internals (the call in progress, the head
// of a backup's log, its view of the primary's progress) for trace logs.
func (n *Node) Describe() string {
	head := "none"
	if len(n.log) > 0 {
		head = describe(n.log[0])
		switch m := n.log[0].(type) {
		case wire.EpochEnd:
			head = fmt.Sprintf("epoch end %d at %v (halt %v, events %v)", m.Epoch, m.Pos, m.Halt, m.Events)
		case wire.Checkpoint:
			head = fmt.Sprintf("checkpoint of epoch %d at %v (full %v)", m.Epoch, m.Pos, m.Full)
		}
	}
	return fmt.Sprintf("%v epoch %d at %v; op %s after %v (stage %d); log %d, head %s; heartbeat %d/%v; events %v",
		n.role, n.epoch, n.pos, opNames[n.op.kind], n.op.last, n.op.stage, len(n.log), head, n.hbEpoch, n.hbPos, n.events)
}

// Heard: bytes of a message arrived from the peer (a long frame, such as
// a full checkpoint, still being received). The peer is alive: its
// timeout runs from here.
func (n *Node) Heard() {
	if n.link != linkDown {
		n.heard = true
	}
}

// Stalled: the driver did not run for d (ns; its ticker, due every
// millisecond, ran that late: the process was not scheduled, or its vCPU
// thread held the lock). The peer's frames may be waiting unread on this
// side meanwhile, so that time is not the peer's silence: its timeout is
// pushed back by d. A peer that stays silent is still declared dead,
// after Timeout of this replica's running time. Call it before the Tick
// that ends the stall.
func (n *Node) Stalled(d int64) {
	if n.link != linkDown && d > 0 {
		n.lastHeard += d
	}
}

// CanLeave reports whether the vCPU call in progress still waits where it
// began, so that the driver may leave it (a Halt left for a control
// request) and offer the point again later.
func (n *Node) CanLeave() bool {
	return n.op.kind == opHalt && n.op.last == ActWait && n.op.stage == stStart
}
