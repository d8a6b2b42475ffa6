// Package ft is ftkvm's replica-coordination protocol: Bressoud and
// Schneider's hypervisor-based fault tolerance (ACM TOCS 14(1), 1996,
// section 3), adapted to KVM, with what VMware FT,
// Remus and COLO learned (output commit, checkpoints, re-protection).
//
// It is a pure state machine in the manner of etcd's raft package: calls
// and messages in, actions and messages out. It has no sockets, clocks,
// goroutines or KVM, and imports neither vmm nor kvm; time enters only as
// timestamps the driver passes in. A thin driver connects a Node to a TCP
// link (package ft/wire frames the messages) and to the vCPU loop through
// vmm.Environment. The tests drive nodes directly: paper_test.go has one
// test per rule. ft/driver/sim_test.go runs the real driver with a fake
// guest and kills either replica or cuts the link at every message.
//
// # Positions and epochs
//
// A Position is (guest-caused exits since boot, instructions since the
// last exit); the exit clock keeps the second at zero, the exact clocks
// (the step clock, vmm/step.go) set it. Point N is the moment after exit N
// was handled, when vmm offers it (Environment.At). Environment reads and
// outputs made while exit N is handled are at position N: they come before
// point N. Kick points (vmm.PointKick) are host-timed: never a boundary.
//
// An epoch runs between two boundaries. Epoch 1 starts at boot. The
// primary ends an epoch:
//   - at the first exit at least Config.EpochLength (virtual time, from
//     Point.Now) after the epoch began, if it has events to deliver (or in
//     verify mode, where every epoch end compares states). An epoch with
//     nothing to deliver is not ended: its end would be a message and
//     nothing else, since records and heartbeats already tell the backup
//     how far it may go. Length is in time, not exits, because an idle
//     guest makes few exits and its timer ticks would wait for them;
//   - at once in Halt (the guest waits in HLT) when events are deliverable;
//   - with a checkpoint, at a kick point, when the end has been due for
//     Config.KickAfter without a guest-caused exit (the guest computes
//     without exits). Tick asks for the kick (Ready.Kick).
//
// # The rules
//
// Primary:
//   - P0 (p0Read): an environment read's value goes to the backup as a
//     Record [epoch, position, kind, value].
//   - P1 (p1Buffer): asynchronous events are buffered, never delivered
//     mid-epoch. Timer events coalesce into one, which gives the guest one
//     tick: the PIT keeps the ticks it could not deliver yet due (it
//     catches up one edge per timer event, and holds one while the PIC
//     still holds the last), and the driver posts the timer again while
//     its deadline is due, so late ticks arrive at later epoch ends and
//     none is lost. UART bytes beyond the receiver's
//     room stay for a later epoch. Received frames (wire.KindNetRx) are
//     events too: at most MaxPendingFrames wait for an epoch end, and
//     more are dropped and counted (Status.FramesDropped), as a full
//     network card drops them, so a flood grows neither memory nor the
//     epoch end's record. Disk completions (wire.KindDiskDone) are
//     events the primary's own disks cause: never dropped, and bounded by
//     the requests in flight (devices.BlockSlots per disk).
//   - P2 (p2EndEpoch): at the epoch's end it sends the events (EpochEnd),
//     waits for the ack as the policy requires, delivers them and starts
//     the next epoch.
//
// Backup:
//   - P3 (p3Read): a read takes its value from the log, waiting if it has
//     not arrived; position, kind and epoch must match, else divergence.
//   - P4 (Async, p4Output): it ignores its own asynchronous events; it
//     absorbs outputs, checking each against the primary's Output record.
//     (Its driver does not even attach its network interfaces' host
//     sides before a takeover: it neither reads frames there nor sends.)
//   - P5 (epochEndHead): at the epoch's end position it delivers the
//     primary's events, in At or in Halt as the primary did.
//
// The backup runs ahead of the primary only as far as the primary went:
// the head of its log says what the primary did next (a record at q proves
// the primary passed every point before q without ending the epoch), and
// a progress heartbeat says the same for its position. So the backup never
// executes guest code the primary has not, which keeps the pages it dirtied
// a subset of those a checkpoint carries. This holds at kick points too:
// from a kick point at position q the guest runs to exit q+1, so the backup
// goes on only once the primary is known to have passed q+1; before that
// the primary may still end the epoch with a checkpoint taken between the
// two exits.
//
// # Output policies
//
// Outputs are numbered (Out.Seq). The primary sends an Output record
// before an output leaves and performs it (Ready.Perform) only once the
// backup acknowledged every record up to and including it: then a promoted
// backup can reproduce it.
//   - Strict (the paper's): the vCPU waits for the ack of every record
//     (read, output, epoch end, checkpoint) before it goes on.
//   - OutputCommit (VMware FT's rule): records stream; the vCPU never waits
//     for the log; outputs are held until acknowledged.
//
// The primary confirms what it performed (Performed messages, and Done in
// each Output). A promoted backup performs every output not confirmed,
// marked Uncertain: a repeat is only ever an output whose confirmation was
// in flight, and it is identical. Nothing is lost.
//
// A frame the guest transmits is an output (wire.KindNetTx: the
// interface's index, then the frame), held and performed by the same
// rules as console bytes. A promoted backup's driver first attaches its
// host sides and announces the guest's addresses (RARP, as QEMU after a
// migration), then performs the uncertain frames: a repeated frame is
// identical, and the network drops or tolerates it.
//
// Each console output has its place in the guest's console stream (bytes
// since boot): Output records carry it (Offset, checked by the backup like
// the number and the bytes) and checkpoints the stream's length. A
// promoted backup says where its console continues the dead primary's
// (NoteTakeover, Status.Seam: the first byte it performs; every byte
// before it the primary confirmed) and how many bytes from there may
// repeat, so the two consoles join at a known byte.
//
// # Checkpoint epochs, repair, re-protection
//
// The primary captures state only at kick points, where the vCPU is
// quiescent (KVM holds no half-done instruction) and the position exact.
// The backup first runs to an incremental checkpoint's position (the count
// at the primary's last exit), so that every exit of the epoch executes on
// both replicas: device requests are submitted at exits, and what they
// write outside guest memory (a disk image) is in no checkpoint. The
// primary's capture first completes the disk requests in flight
// (vmm.Machine.SettleDisks), so that a state has none; the backup, which
// submitted the same ones, drops its own once performed when it installs.
// Requests waiting in the rings are taken after the capture (and a join's
// image copy) on the primary, and at the end of the install on the
// backup: the same point. The backup installs at a kick point or in Halt
// (but a Halt whose epoch end delivered events woke the guest, as it woke
// the primary's, which ran on: the backup runs on to the position too); at
// an exit it yields (ActYield) to get a kick point first. Events of a
// checkpoint epoch are delivered after the install, on both sides.
//
// Verify mode: each EpochEnd carries the primary's state hash, taken at
// the boundary before delivery; the backup compares its own. Any mismatch
// (hash, read, output, position) is a divergence: a NoteDivergence, a
// CheckpointRequest, and the backup waits; the primary sends its state at
// its next kick point; the backup drops the log it replaces, installs it
// and goes on. Status counts divergences and repairs.
//
// Page repair (as Plover's, NSDI 2018): in verify mode the request asks
// for the pages that differ (CheckpointRequest.Pages), not the whole
// state. The backup, at its next quiescent point (a kick point: at an exit
// it yields first; or in Halt), takes its page hashes (ActHash with Pages:
// one 64-bit hash per 4 KiB page, the first word of the page's SHA-256 in
// the verify hash, and the registers' hash) and sends them in order, in
// PageHashes frames of at most wire.MaxPageHashes; it waits there, its
// state unchanged, and installs the repair at that same point. The
// primary kicks for the repair only once the last frame is in; at its kick
// point the driver brings its own page hashes up to date and captures
// (ActCheckpoint with Repair and the backup's hashes) the pages whose
// hashes differ, those the backup diverged in and those the primary wrote
// since, with all the rest of the state (registers, devices, machine),
// sent as a Checkpoint with Repair. Its other pages equal the backup's, so
// the installed state is the primary's. A repair is confirmed by the next
// compared hash that matches; a divergence before one (a 64-bit
// collision, a page the backup wrote after hashing) asks for the full
// state, and the note says so. Only a backup that sent its hashes takes a
// page repair, and the primary takes hashes only after a request for one,
// in order and for its guest's pages: anything else is a protocol error.
//
// A primary whose backup died (Timeout without a message, or the link
// broke) goes on unprotected: held outputs leave, nobody is waited for,
// and NoteBackupLost says so. When a new backup completes the handshake,
// the primary sends its full state at its next kick point (a Checkpoint
// with Full), then replicates. A backup that boots together with a primary
// whose guest has not run (Hello.Started false) needs no checkpoint.
//
// Disks at a join: a disk image is in no checkpoint, so for a joining
// backup (ActCheckpoint with Join) the primary's driver sends each
// read-write image whole, as DiskData chunks in order (the last with the
// image's SHA-256), at that kick point and before the Checkpoint. The
// capture settled the requests in flight, and the vCPU, which alone
// submits requests, stays stopped until the chunks are queued: the images
// sent are the state's, no block changes during the copy, and the guest
// waits for the transfer. Only a backup that joins and has no state yet takes DiskData
// (TakesDisks; any other is a protocol error); it writes them to its
// copies while its vCPU waits, and installs the state (ActInstall with
// Join) only if every read-write image arrived whole and matched its
// digest.
//
// # Failover
//
// The backup declares the primary dead after Config.Timeout of silence or
// when the link breaks. Silence counts only while the replica itself runs:
// a driver that did not run for a while (Stalled: its process was not
// scheduled) may have the peer's frames waiting unread, so the timeout is
// pushed back by the stall; the same holds for a primary watching its
// backup. It becomes the primary at once (role, status), but
// replays everything it received first: reads take logged values, epoch
// ends deliver the primary's events, and the outputs not confirmed are
// performed (uncertain). Where the log ends it goes live (NoteLive): reads
// become real and it delivers its own events, unprotected until a backup
// joins. Among them are the completions of the disk requests its guest
// submitted and the log did not complete (wire.KindDiskDone): its own I/O
// goroutines performed them or will; the dead primary may have too. These
// are uncertain completions, as outputs are: a write performed twice
// writes the same data to the same sectors, and a completion delivered for
// a request no longer in flight does nothing. A partial frame never reaches it (the decoder hands out only
// frames whose checksums verify). A backup still waiting for a join's full
// state has nothing to take over: ActStop with ErrNoState. When the guest
// ends on the primary, Goodbye carries its status; the backup replays the
// rest of its log and runs its guest on to the same end (every exit the
// primary executed executes there too, its disk writes included), then
// stops with that status; it stops at once if it has no state to run or
// its guest halted with the log empty. The primary waits for that
// goodbye's ack so the backup does not fail over instead; a link that
// closes after the goodbye is no failover.
//
// # Fencing
//
// Bressoud and Schneider assume a failure detector that is never wrong.
// A cut link is not a dead peer, and without more both replicas would go
// on with the guest (split brain). With Config.Witness, a replica that
// loses its peer after the handshake acts as VMware FT does with its
// test-and-set on shared storage: it asks the witness (Ready.Claim, with
// the pair's name from both Hellos' Instance and the role it had) and does
// nothing for the guest until the answer (Claimed): every vCPU call waits
// (WaitWitness) where it stood, and a primary's held outputs stay held.
// The witness answers the first claim of a pair with its claimant's role
// and every later one the same. The winner goes on: a primary unprotected,
// releasing its held outputs; a backup takes over as above. The loser
// stops with ErrFenced and performs nothing more: a fenced primary's held
// outputs are the promoted backup's to perform. No claim is made where
// the peer cannot go on: a backup without the guest's state, a primary
// whose backup is still joining (its full state not sent), after the
// goodbye, or before the handshake. A backup that diverged and waits for
// its repair claims one Timeout late, so that a live primary wins. Both sides must name the same witness
// (Hello.Witness, compared). An unreachable witness leaves the guest
// waiting: availability is given up rather than consistency.
//
// # Handshake
//
// Each side sends a Hello when the link is up; the peer's decides. It is
// refused (Refuse, with the reason, and the link closed) unless both run
// the same protocol version and guest (kernel, initrd and command line by
// SHA-256, memory size, epoch clock), name the same witness, and agree on
// what of the host decides where delivery points fall. Those settings are
// the primary's to decide, once; a backup adopts them or refuses:
//   - Interrupt windows (Hello.Windows): the primary says whether its
//     machine requests them; a backup says whether its KVM opens them at
//     points the guest's execution defines (native ring 0). A primary
//     that uses windows and a backup that cannot place them refuse each
//     other; otherwise the backup's machine uses the primary's choice.
//     Two replicas that each measured for themselves could count
//     different exits.
//   - The CPU (Hello.CPU, the CPUID table's SHA-256): compared, except
//     for a backup joining a running guest, which installs the primary's
//     CPUID with its state.
//   - The disks (Hello.Disks): each replica has its own copy of each
//     image and performs the guest's requests on it at the same points
//     of the guest's execution, so the copies stay identical only if they
//     start identical: the number of disks, each one's size, read-only
//     flag and SHA-256 of its contents are compared. For a backup joining
//     a running guest the read-write images' digests are not compared:
//     the primary sends their contents with its state (below); the
//     count, sizes, flags and read-only images' digests still are.
//   - The network interfaces (Hello.NICs): their number and MAC
//     addresses, compared (the guest reads them from its devices). A
//     joining backup receives the devices' state with the checkpoint.
//
// The backup's driver asks Admits before a connection becomes the link,
// so only a peer that would pass these checks is ever its primary.
//
// # Messages (package ft/wire)
//
//	Hello              both, first: version, role, policy, clock, verify,
//	                   started, memory size, wall clock, kernel/initrd/
//	                   command-line hashes; from version 2 the replica's
//	                   instance and the witness's hash; from version 3
//	                   interrupt windows and the CPUID hash; from version
//	                   4 the disks (size, read-only, contents' hash); from
//	                   version 5 the network interfaces' MACs (versions 6 and 7:
//	                   disk completions and page repairs, no field of their own)
//	Refuse             a refused handshake, or a protocol error: reason, text
//	Record      (log)  P0: seq, epoch, position, kind, value
//	EpochEnd    (log)  P2: seq, epoch, position, halt, events, hash
//	Checkpoint  (log)  seq, epoch, position, full, repair (a page repair),
//	                   output count, events, state
//	Output      (log)  seq, epoch, position, output seq, performed-up-to, data
//	Goodbye     (log)  seq, the guest's exit status
//	DiskData           primary, to a joining backup before the full
//	                   checkpoint: disk, offset, last, image digest, data
//	                   (at most wire.MaxDiskData bytes)
//	Performed          outputs performed up to N
//	Ack                backup: every log record up to seq N received
//	CheckpointRequest  backup: diverged, send the state (pages: a page
//	                   repair, whose page hashes follow)
//	PageHashes         backup, after a request for a page repair: epoch,
//	                   position, first page, total pages, last, the
//	                   registers' hash (with last), a 64-bit hash per page
//	                   (at most wire.MaxPageHashes)
//	Heartbeat          both: liveness; from the primary, its epoch and position
//
// Log records carry consecutive sequence numbers per link; the backup
// acknowledges them cumulatively, once per Ready.
//
// # The driver's contract
//
// A Node is not safe for concurrent use. The driver holds one mutex around
// every call and drains Ready before releasing it. Then:
//
//   - Vcpu calls (Point, Halt, Read, Output, Finish) come from the vCPU
//     thread, one at a time, each followed by answers until the node says
//     ActGo, ActYield or ActStop: Continue after ActWait, ActDeliver and
//     ActInstall; Hashed after ActHash (HashedPages with Pages);
//     Checkpointed after ActCheckpoint. Calling anything else in between
//     panics.
//   - ActWait: release the lock and wait (a sync.Cond broadcast after
//     every other call), then Continue. With WaitEvent (a halted primary)
//     also wake at the PIT deadline and give the timer event first.
//   - Positions: Point.Pos is vmm.Point.Exits; Read and Output are at the
//     last point's Exits+1 (the exit being handled). Positions never
//     decrease.
//   - Read is every call of Environment.Now made by a device (PIT, RTC,
//     TSC MSR). The driver's own decisions (is the timer due, Point.Now,
//     Tick) use its own clock, never Environment.Now.
//   - Output is every byte string the UART transmits: the console writer
//     calls it instead of writing; and every frame a network interface
//     transmits (KindNetTx, its NIC.Tx writer). They are written when
//     Ready.Perform hands them out, in order, by one goroutine (frames to
//     the interface's host side); then Performed(seq).
//   - Deliver: Timer events as Target.FireTimer(Value), UART events as
//     Target.Receive(byte(Value)), frames as Target.ReceiveFrame(Value,
//     Data), in order.
//   - Hash: SHA-256 of the vCPU registers and of all guest memory, which
//     the driver keeps as a sum of per-page hashes and updates for every
//     page that may have changed (dirtied by the guest, captured by a
//     checkpoint, written by an install). Not of the dirty pages alone: a
//     dirty log may name a page the guest did not write, on one replica
//     and not the other. Keep a separate accumulated bitmap for
//     incremental checkpoints, which need every page dirtied since the last
//     checkpoint. With Pages: the registers' hash and each page's (the
//     first word of its SHA-256 in that sum), brought up to date the same
//     way, given to HashedPages.
//   - Checkpoint: at the kick point it is asked at (quiescent): Full is the
//     complete state; otherwise the pages dirtied since the previous
//     checkpoint plus all vCPU, device and machine state (halted, the
//     interrupt-window request, the delivery point, Stats).
//   - Checkpoint with Repair: the pages whose hashes (up to date as for
//     Hash) differ from Action.Against, and all the other state.
//   - Install: the state replaces the machine's entirely, its position
//     included (a page repair's pages replace those that differed); then
//     deliver and go on. Installed in Halt, a state that is not halted
//     goes on as from the kick point it was captured at (injecting only
//     what was delivered there), not as a guest woken from HLT.
//   - ActYield: call the kick function and return from At or Halt.
//   - ActStop: make Run return (Status, or Err).
//   - Tick at least every millisecond with the driver's clock; Async the
//     events it sees (the PIT deadline passed: KindTimer with the time,
//     once per deadline; a deadline a delivery left in place because the
//     PIC held the last tick is posted again once the guest took that
//     tick, or when it ran a tick without exits; a byte typed: KindUART; a frame read from a
//     network interface's host side, of 14 to 1518 bytes: KindNetRx, only
//     while the node's role is primary; a disk request its I/O goroutine
//     performed: KindDiskDone, only while primary, and at NoteLive every
//     request performed and not delivered; delivering one on a backup
//     waits for its own I/O goroutine and checks the status); Step each decoded message; Disconnected on
//     EOF, a reset or a decoding error; Connected when a link is up (one
//     at a time; refuse others with Refuse{RefuseBusy}).
//   - A backup's accepted connection is a stranger until its first frame
//     is a Hello that Admits accepts: only then Connected and Step(hello).
//     A stranger (no hello in time, bytes that are not a frame, another
//     message, an oversized frame, a hello the node refuses) gets a
//     Refuse where the protocol allows and is closed; the backup goes on
//     listening. Its going away is therefore never a lost primary.
//   - Ready: send Messages in order on the link; Kick: call the kick
//     function; Close: close the link after sending; Notes: log them.
//   - Start the primary's guest only after the handshake (or with no
//     backup at all): a backup that booted with it must find the same
//     guest.
//
// A primary driver over vmm.Environment, in outline:
//
//	At(p, t):    lock; post the timer if its deadline passed
//	             a := node.Point(Point{Exits(p), kick?, clock(), t.RxSpace()})
//	             return carry(a, t)
//	Halt(p, t):  lock; a := node.Halt(...); carry(a, t)   // WaitEvent: wait for the
//	             // deadline or input; after ActGo return if t.Pending()
//	Now():       lock; a := node.Read(last+1, KindClock, clock()); carry; return a.Value
//	console:     lock; node.Output(last+1, KindConsole, b); carry
//	carry(a, t): loop: drain Ready; switch a.Kind {
//	               Go: return nil; Yield: kick(); return nil; Stop: stop Run
//	               Wait: cond.Wait(); a = node.Continue()
//	               Deliver: FireTimer/Receive each; a = node.Continue()
//	               Hash: a = node.Hashed(hash()); Checkpoint: a = node.Checkpointed(capture(a.Full))
//	               Install: install(a.State); a = node.Continue() }
//	net reader:  for { m, err := r.Read(); lock; err? node.Disconnected() : node.Step(m); drain; cond.Broadcast() }
//	ticker:      every ms: lock; node.Tick(clock()); drain; cond.Broadcast()
//	input:       lock; node.Async(Event{KindUART, b}); cond.Broadcast()
//	guest end:   lock; carry(node.Finish(status)) then exit with it
//
// The backup's driver is the same code: the node decides what each call
// means by its role, ignores the backup's own events, and turns into the
// primary on failover without the driver changing anything.
//
// # Not here yet
//
// Flow control of the backup's log; batching
// of console bytes into fewer Output records; pre-copy before a join's
// full checkpoint; chunking of checkpoints larger than wire.DefaultMaxBody;
// batching of frames into fewer records.
package ft
