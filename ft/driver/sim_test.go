package driver

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/ftkvm/ftkvm/ft"
)

// The crash simulation runs the real driver: a primary and a backup
// Replica, each with a deterministic fake guest (fakeguest_test.go) as its
// machine, joined by a loopback TCP link that kills either side or cuts
// the link at a chosen message (simlink_test.go). The replicas run
// concurrently in real time, with their own tickers, heartbeats and
// timeouts, so a run's message sequence varies from run to run; the
// invariants hold for every interleaving (ft/doc.go):
//
//   - outputs: the primary's performed outputs followed by each promoted
//     replica's hold every output in order; the only repeats are at a
//     seam, are identical, and number no more bytes than the replica
//     taking over announced as uncertain;
//   - deliveries: what a backup delivered from the log is a contiguous
//     run of what the primary delivered, at the same positions, into the
//     same state (the fake guest's registers);
//   - status: the replica that ends the guest ends with its status; a
//     backup never performs before it is promoted; nothing diverges.
//
// Coverage (simfaults_test.go, simStride): without -race and -short,
// killing the primary runs at every message index of every
// configuration; the other scenarios, and all of them under -race or
// -short, run about simSamples (simSamplesRace) indices spread over the
// range. The range is that of a faultless run, and stops where runs stop
// reaching their index (forIndices). One index in silentEvery (by a hash
// of the index) is a silent fault, which waits for the peer timeout; the
// rest close the connection.
// Runs use real time and are never judged by it: the timeout is long
// enough (simTimeout) that a starved process does not fail over falsely.

type simConfig struct {
	policy  ft.Policy
	verify  bool
	witness bool
	input   string // typed at the primary, a byte every 2 ms
	exits   uint64 // the guest ends at this exit (default 120)
	inject  uint64 // Options.InjectDivergence for the backup
	// net gives the guest a network interface (simnet_test.go): it sends
	// frames, and a client sends it frames, a frame every 2 ms.
	net bool
}

func (c simConfig) String() string {
	s := c.policy.String()
	if c.verify {
		s += "+verify"
	}
	if c.witness {
		s += "+witness"
	}
	if c.input != "" {
		s += "+input"
	}
	if c.net {
		s += "+net"
	}
	return s
}

var simConfigs = []simConfig{
	{policy: ft.Strict},
	{policy: ft.OutputCommit},
	{policy: ft.Strict, verify: true},
	{policy: ft.OutputCommit, verify: true, input: "hello"},
	{policy: ft.OutputCommit, witness: true},
	{policy: ft.Strict, verify: true, witness: true, input: "hi"},
}

// simTimeout is the replicas' peer timeout: long enough that a loaded
// host does not starve heartbeats into a false failover (whole-process
// stalls of over a second were seen with a load of 15 on two cores), so
// only the few silent faults wait for it.
const simTimeout = 10 * time.Second

var simWitnessDigest = ft.Digest{0x77, 0x17}

// simReplica is one replica process: its driver, its fake guest, what it
// performed, and what its log said.
type simReplica struct {
	name string
	role ft.Role
	r    *Replica
	m    *fakeMachine
	nic  simNIC // simnet_test.go

	mu         sync.Mutex // guards the fields below
	dead       bool       // killed: performs nothing more
	outs       []simOut   // outputs performed
	uncertain  int        // bytes announced as possibly repeated
	seam       int        // the console byte offset the takeover line gave
	seamLogged bool
	liveAt     int // len(m.delivered) when it went live (-1: never)
	promoted   bool
	lines      []string // its log

	ran      bool // its run was started
	attached bool
	status   int
	err      error
	done     chan struct{}
}

type simOut struct {
	seq  uint64
	data string
}

// Write is the replica's console: one call per output.
func (s *simReplica) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.dead {
		return len(p), nil
	}
	seq, _, _ := strings.Cut(string(p), " ")
	n, err := strconv.ParseUint(seq, 10, 64)
	if err != nil {
		s.lines = append(s.lines, fmt.Sprintf("BAD OUTPUT %q", p))
	}
	s.outs = append(s.outs, simOut{seq: n, data: string(p)})
	return len(p), nil
}

// Levels and Fire make the replica's log a hook: lines are kept, and the
// notes the checks need are taken from them. Fire runs with the replica's
// lock held (the driver logs from drain).
func (s *simReplica) Levels() []logrus.Level { return logrus.AllLevels }

func (s *simReplica) Fire(e *logrus.Entry) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	msg := e.Message
	s.lines = append(s.lines, fmt.Sprintf("%s %s %s", e.Time.Format("15:04:05.000000"), e.Level, msg))
	switch {
	case strings.Contains(msg, "taking over"):
		s.promoted = true
	case strings.Contains(msg, "log replayed; this replica is the primary now"):
		s.m.mu.Lock()
		s.liveAt = len(s.m.delivered)
		s.m.mu.Unlock()
	case strings.Contains(msg, "performing from console byte offset"):
		var off, n int
		if _, err := fmt.Sscanf(msg, "replica: performing from console byte offset %d (%d bytes uncertain", &off, &n); err == nil {
			s.uncertain += n
			s.seam, s.seamLogged = off, true
		}
	}
	return nil
}

// simWitness answers the first claim of a pair with its claimant's role
// and every later one the same. A claim reaches it after delay[role].
type simWitness struct {
	mu     sync.Mutex
	delay  map[ft.Role]time.Duration
	winner map[ft.Digest]ft.Role
}

func (w *simWitness) Claim(ctx context.Context, c ft.Claim) (ft.Role, error) {
	select {
	case <-time.After(w.delay[c.Role]):
	case <-ctx.Done():
		return 0, ctx.Err()
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.winner == nil {
		w.winner = map[ft.Digest]ft.Role{}
	}
	r, ok := w.winner[c.Pair]
	if !ok {
		w.winner[c.Pair], r = c.Role, c.Role
	}
	return r, nil
}

// deadOrAlive is a replica's way to the witness: a killed replica makes
// no claims (its goroutines outlive it here, not in a real crash).
type deadOrAlive struct {
	w  *simWitness
	sr *simReplica
}

func (d deadOrAlive) Claim(ctx context.Context, c ft.Claim) (ft.Role, error) {
	d.sr.mu.Lock()
	dead := d.sr.dead
	d.sr.mu.Unlock()
	if dead {
		return 0, errors.New("killed")
	}
	return d.w.Claim(ctx, c)
}

func (w *simWitness) decided() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return len(w.winner)
}

type sim struct {
	t       testing.TB
	cfg     simConfig
	cleanup []func()
	witness *simWitness
	reps    []*simReplica
	links   []*simLink
}

func newSim(t testing.TB, cfg simConfig) *sim {
	if cfg.exits == 0 {
		cfg.exits = 120
	}
	s := &sim{t: t, cfg: cfg}
	if cfg.witness {
		s.witness = &simWitness{delay: map[ft.Role]time.Duration{ft.RolePrimary: 2 * time.Millisecond, ft.RoleBackup: 10 * time.Millisecond}}
	}
	return s
}

func (s *sim) add(name string, role ft.Role) *simReplica {
	sr := &simReplica{name: name, role: role, liveAt: -1, done: make(chan struct{})}
	log := logrus.New()
	log.SetOutput(discard{})
	log.SetLevel(logrus.DebugLevel)
	log.AddHook(sr)
	cfg := ft.Config{Role: role, Policy: s.cfg.policy, Verify: s.cfg.verify,
		Guest:       ft.Identity{Kernel: ft.Digest{1}, MemSize: simMemSize, WallClock: 42},
		EpochLength: time.Millisecond, KickAfter: 2 * time.Millisecond,
		Heartbeat: 20 * time.Millisecond, Timeout: simTimeout}
	opts := Options{Node: cfg, Console: sr, Log: log}
	if s.witness != nil {
		opts.Node.Witness = simWitnessDigest
		opts.Witness = deadOrAlive{s.witness, sr}
	}
	if role == ft.RoleBackup {
		opts.InjectDivergence = s.cfg.inject
		// A backup of the simulation may join a running guest (the
		// second backup of re-protection), as backup --join does.
		opts.Node.Join = true
	}
	if s.cfg.net {
		opts.NICs = []NIC{{MAC: simMAC, Open: sr.openPort}}
	}
	sr.r = New(opts)
	sr.m = newFakeMachine(s.cfg.exits, 150)
	sr.m.env, sr.m.console = sr.r, sr.r.Console()
	if s.cfg.net {
		sr.m.nicTx = sr.r.NetTx(0)
	}
	s.reps = append(s.reps, sr)
	s.cleanup = append(s.cleanup, sr.r.Close)
	return sr
}

type discard struct{}

func (discard) Write(p []byte) (int, error) { return len(p), nil }

// die is kill -9: from now on the replica performs and sends nothing,
// its guest stops, and it makes no claims.
func (s *sim) die(sr *simReplica) {
	sr.mu.Lock()
	sr.dead = true
	sr.mu.Unlock()
	sr.m.killed.Store(true)
}

// stop tells a dead replica's vCPU to stop.
func (s *sim) stop(sr *simReplica) {
	sr.r.Quit()
	// Its goroutines go on until its Run returned (wait closes it): a
	// replica closed while Run waits for its last outputs' acks would
	// wait for ever, its ticker gone. What they send vanishes (simLink).
}

// pair connects a (as the primary's side, Connect) to b (the backup's,
// Serve) through a link with fault, and runs both: the primary once the
// handshake succeeded (as ftkvm primary does), the backup once it has a
// primary.
func (s *sim) pair(a, b *simReplica, fault *simFault) *simLink {
	ends := [2]*simReplica{a, b}
	l := s.newSimLink(fault, func(side int) { s.die(ends[side]) }, func(side int) { s.stop(ends[side]) })
	s.links = append(s.links, l)
	ln := newSimListener(l.end(1))
	s.cleanup = append(s.cleanup, func() { ln.Close() })
	go b.r.Serve(ln)
	if !a.ran {
		// As ftkvm primary: attach, connect, run after the handshake.
		if err := a.r.Attach(a.m); err != nil {
			s.fail("%v", err)
		}
		a.attached = true
	}
	if err := a.r.Connect(l.end(0)); err != nil {
		s.fail("%v", err)
	}
	if !a.ran {
		a.ran = true
		go s.runWhen(a, l, 1)
	}
	b.ran = true
	go s.runWhen(b, l, 0)
	return l
}

// runWhen runs sr's guest once its link is up, unless the hello it waits
// for (from side peer) was lost to the fault: then, as the command would,
// it gives up without running the guest.
func (s *sim) runWhen(sr *simReplica, l *simLink, peer int) {
	defer close(sr.done)
	hang := time.NewTimer(time.Minute)
	defer hang.Stop()
	for {
		select {
		case <-sr.r.linkUp:
		case <-sr.r.done:
			sr.err = errors.New("closed before the handshake")
			return
		case <-hang.C:
			sr.err = errors.New("no handshake in a minute")
			return
		case <-time.After(time.Millisecond):
			// The backup sends its hello only after it received the
			// primary's: a primary (peer 1) has no handshake if either
			// hello was lost, a backup if the primary's was.
			if l.firedAtHello(0) || peer == 1 && l.firedAtHello(1) {
				sr.err = errNoHandshake
				return
			}
			continue
		}
		break
	}
	if !sr.attached {
		if err := sr.r.Attach(sr.m); err != nil {
			sr.err = err
			return
		}
	}
	sr.status, sr.err = sr.r.Run()
}

var errNoHandshake = errors.New("the peer's hello was lost: no handshake")

// wait waits until every replica's run ended, then closes them.
func (s *sim) wait() {
	hang := time.After(2 * time.Minute)
	for _, sr := range s.reps {
		if !sr.ran {
			continue
		}
		select {
		case <-sr.done:
		case <-hang:
			s.fail("the simulation does not end")
		}
	}
	for _, sr := range s.reps {
		sr.r.Close()
	}
}

func (s *sim) dump() string {
	var b strings.Builder
	for _, l := range s.links {
		count, types := l.frames()
		fmt.Fprintf(&b, "link: %v; frames %v / %v\n", l.fault, count, types)
	}
	for _, sr := range s.reps {
		sr.mu.Lock()
		fmt.Fprintf(&b, "--- %s: ran %v status %d err %v dead %v promoted %v outs %d uncertain %d; node %v; guest exits %d\n",
			sr.name, sr.ran, sr.status, sr.err, sr.dead, sr.promoted, len(sr.outs), sr.uncertain, sr.r.Status(), sr.m.stats.Exits)
		start := max(0, len(sr.lines)-40)
		for _, l := range sr.lines[start:] {
			b.WriteString("  " + l + "\n")
		}
		sr.mu.Unlock()
	}
	return b.String()
}

// simFailure is a failed check; forIndices reports it.
type simFailure string

func (s *sim) fail(format string, args ...any) {
	panic(simFailure(fmt.Sprintf(format+"\n%s", append(args, s.dump())...)))
}

// close releases the run's links and replicas.
func (s *sim) close() {
	for _, f := range s.cleanup {
		f()
	}
}

// ---- Invariants ----

// ended: sr ran its guest to its end.
func (sr *simReplica) ended() bool { return sr.ran && sr.err == nil && sr.status == simStatus }

// checkSeams: each replica in turn performed outputs, the first as the
// primary, each next one after it took over. Nothing is lost, and the
// repeats at each seam are identical and announced as uncertain. If the
// last one ended the guest, every output its guest produced was performed.
func (s *sim) checkSeams(chain ...*simReplica) {
	var merged []simOut
	for i, sr := range chain {
		if i > 0 && !sr.promoted && len(sr.outs) > 0 {
			s.fail("%s performed %d outputs without taking over", sr.name, len(sr.outs))
		}
		if i > 0 && sr.promoted && len(sr.outs) > 0 {
			// The takeover line places the first output it performs in
			// the console stream: the bytes of every output before it.
			before := 0
			for _, m := range merged[:min(len(merged), int(sr.outs[0].seq)-1)] {
				before += len(m.data)
			}
			if !sr.seamLogged || sr.seam != before {
				s.fail("%s performs output %d from console byte %d (logged %v); the outputs before it hold %d bytes", sr.name, sr.outs[0].seq, sr.seam, sr.seamLogged, before)
			}
		}
		repeated := 0
		for j, o := range sr.outs {
			if j > 0 && o.seq != sr.outs[j-1].seq+1 || i == 0 && j == 0 && o.seq != 1 {
				s.fail("%s performed output %d after %d", sr.name, o.seq, sr.outs[max(0, j-1)].seq)
			}
			switch {
			case o.seq == uint64(len(merged))+1:
				merged = append(merged, o)
			case o.seq > uint64(len(merged))+1:
				s.fail("outputs %d..%d lost before %s", len(merged)+1, o.seq-1, sr.name)
			default:
				if merged[o.seq-1].data != o.data {
					s.fail("output %d differs: %q before, %q by %s", o.seq, merged[o.seq-1].data, o.data, sr.name)
				}
				repeated += len(o.data)
			}
		}
		if repeated > sr.uncertain {
			s.fail("%s repeated %d bytes of output and announced %d as uncertain", sr.name, repeated, sr.uncertain)
		}
	}
	// The guest's end is that of the last replica that took over (a
	// backup told of the end by the goodbye stops where it is).
	last := chain[0]
	for _, sr := range chain[1:] {
		if sr.promoted {
			last = sr
		}
	}
	if last.ended() && uint64(len(merged)) != last.m.regs.rsi {
		s.fail("%s ended the guest, which produced %d outputs; %d were performed", last.name, last.m.regs.rsi, len(merged))
	}
}

// checkDeliveries: what b delivered from p's log (from its from-th
// delivery, until it went live) is a contiguous run of what p delivered.
func (s *sim) checkDeliveries(p, b *simReplica, from int) {
	end := len(b.m.delivered)
	if b.liveAt >= 0 {
		end = b.liveAt
	}
	if from >= end {
		return
	}
	fromLog := b.m.delivered[from:end]
	start := -1
	for i, d := range p.m.delivered {
		if d == fromLog[0] {
			start = i
			break
		}
	}
	// p ended an epoch and died (or was fenced) before it delivered its
	// events: b delivers those of one epoch end (one position) that p
	// never did.
	oneEnd := func(rest []delivery) bool {
		for _, d := range rest {
			if d.pos != rest[0].pos {
				return false
			}
		}
		return !p.ended()
	}
	if start < 0 {
		if !oneEnd(fromLog) {
			s.fail("%s's delivery %d %+v is none of %s's", b.name, from, fromLog[0], p.name)
		}
		return
	}
	for i, d := range fromLog {
		if start+i >= len(p.m.delivered) {
			if !oneEnd(fromLog[i:]) {
				s.fail("%s delivered %d events from the log that %s never delivered", b.name, len(fromLog)-i, p.name)
			}
			return
		}
		if p.m.delivered[start+i] != d {
			s.fail("%s's delivery %d %+v differs from %s's %+v", b.name, from+i, d, p.name, p.m.delivered[start+i])
		}
	}
}

func (s *sim) checkNoDivergence() {
	for _, sr := range s.reps {
		if st := sr.r.Status(); st.Divergences > 0 {
			s.fail("%s: %d divergences", sr.name, st.Divergences)
		}
		sr.mu.Lock()
		for _, l := range sr.lines {
			if strings.Contains(l, "DIVERGENCE") || strings.Contains(l, "protocol") {
				sr.mu.Unlock()
				s.fail("%s: %s", sr.name, l)
			}
		}
		sr.mu.Unlock()
	}
}

// run is one run of the pair with fault; it returns the primary and the
// backup after both ended.
func (s *sim) run(fault *simFault) (p, b *simReplica, l *simLink) {
	p, b = s.add("primary", ft.RolePrimary), s.add("backup", ft.RoleBackup)
	l = s.pair(p, b, fault)
	s.typeInput(p)
	s.wait()
	return p, b, l
}

// typeInput types cfg.input at the primary, a byte every 2 ms.
func (s *sim) typeInput(p *simReplica) {
	if s.cfg.input == "" {
		return
	}
	go func() {
		for i := range len(s.cfg.input) {
			select {
			case <-p.done:
				return
			case <-time.After(2 * time.Millisecond):
			}
			p.r.Input([]byte{s.cfg.input[i]})
		}
	}()
}

// ---- The scenarios ----

// simStride is the stride over message indices. Every index (1) is run
// for the scenario marked every, without -race and -short, and for all
// the fault scenarios with -sim.every (`make race` runs them under -race
// that way); otherwise, and under -race (which slows each run several
// times) or -short, about simSamples indices spread over the range run.
func simStride(total int, every bool) int {
	if *simEvery || every && !raceEnabled && !testing.Short() {
		return 1
	}
	n := simSamples
	if raceEnabled || testing.Short() {
		n = simSamplesRace
	}
	return max(1, total/n)
}

var simEvery = flag.Bool("sim.every", false, "run every fault scenario at every message index, also under -race and -short")

const (
	simSamples     = 40
	simSamplesRace = 12
)

// A run without faults: the backup follows the primary to the end and
// stops with the guest's status; nothing diverges; the backup performs
// nothing; compute stretches give checkpoint epochs.
func TestSimNoFailure(t *testing.T) {
	for _, cfg := range simConfigs {
		t.Run(cfg.String(), func(t *testing.T) {
			t.Parallel()
			s := newSim(t, cfg)
			defer catch(t, "no fault", s)
			p, b, l := s.run(nil)
			s.checkNoDivergence()
			if !p.ended() || !b.ended() {
				s.fail("status: primary %d %v, backup %d %v", p.status, p.err, b.status, b.err)
			}
			s.checkSeams(p)
			if len(p.outs) < 5 {
				s.fail("the primary performed %d outputs", len(p.outs))
			}
			if len(b.outs) != 0 || b.promoted {
				s.fail("the backup performed %d outputs (promoted %v)", len(b.outs), b.promoted)
			}
			s.checkDeliveries(p, b, 0)
			if len(b.m.delivered) == 0 {
				s.fail("nothing delivered")
			}
			// Metrics: every output the primary performed was timed, the
			// backup performed none; the lag in records, bytes and time
			// agree (the backup may stop at the goodbye with records not
			// replayed).
			pm, bm := p.r.Metrics(), b.r.Metrics()
			if pm.Holds.Count != pm.Status.Performed || pm.Holds.Count != uint64(len(p.outs)) || pm.Holds.Sum <= 0 {
				s.fail("hold times of %d outputs (%v s), %d performed, %d seen", pm.Holds.Count, pm.Holds.Sum, pm.Status.Performed, len(p.outs))
			}
			if bm.Holds.Count != 0 || bm.Lag.Records != bm.Status.Backlog {
				s.fail("backup metrics at the end: %+v", bm)
			}
			for _, m := range []Metrics{pm, bm} {
				if l := m.Lag; (l.Records == 0) != (l.Bytes == 0) || (l.Records == 0) != (l.Age == 0) {
					s.fail("%v lag: %+v", m.Status.Role, l)
				}
			}
			ps := p.r.Status()
			count, _ := l.frames()
			t.Logf("primary %v; backup %v; frames %v; lag %+v", ps, b.r.Status(), count, pm.Lag)
		})
	}
}

// countFrames runs the faultless pair and returns how many frames each
// side sent: the range of indices to put faults at. (A run's count varies
// with timing; indices beyond a run's count leave it faultless.)
func countFrames(t *testing.T, cfg simConfig) [2]int {
	s := newSim(t, cfg)
	defer catch(t, "counting frames", s)
	_, _, l := s.run(nil)
	count, _ := l.frames()
	return count
}

// catch reports a failed check of s (a simFailure) and releases s.
func catch(t testing.TB, what string, s *sim) {
	v := recover()
	s.close()
	if v == nil {
		return
	}
	f, ok := v.(simFailure)
	if !ok {
		panic(v)
	}
	t.Errorf("%s: %s", what, f)
}

// simParallel runs at once: a run mostly waits (for its guest's timer,
// its peer's acknowledgements, a timeout), so several share the cores.
const simParallel = 4

// forIndices calls run(k) for k = 1, 1+stride, ... up to total, on
// simParallel goroutines, and stops starting runs after a failure, or once
// simTail runs above the highest index a run reached did not reach
// theirs: run says whether the fault at k fired. A run's messages depend
// on timing (heartbeats every 20 ms), and total, the count of one
// faultless run, was seen more than twice what the runs reach; a run
// that does not reach its index is a faultless run, as TestSimNoFailure's.
// A run for which waits(k) holds (a silent fault: it waits simTimeout for
// the peer to notice) takes one of simWaiting other goroutines, so that
// the runs behind it are not held up. The goroutines are shared by every
// forIndices of the process: the scenarios' configurations run as
// parallel subtests, so that one's last silent fault is waited out while
// the others run, and never more runs at once than these. It returns the
// highest index a run reached.
func forIndices(t *testing.T, total, stride int, waits func(k int) bool, run func(k int) (reached bool)) int {
	var wg sync.WaitGroup
	busy, waiting := simBusy, simWaitingRuns
	var mu sync.Mutex
	highest, missed := 0, []int{}
	for k := 1; k <= total; k += stride {
		if t.Failed() {
			break
		}
		sem := busy
		if waits(k) {
			sem = waiting
		}
		sem <- struct{}{}
		mu.Lock()
		beyond := 0
		for _, m := range missed {
			if m > highest {
				beyond++
			}
		}
		mu.Unlock()
		if beyond >= simTail {
			<-sem
			break
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			hit := run(k)
			mu.Lock()
			if hit {
				highest = max(highest, k)
			} else {
				missed = append(missed, k)
			}
			mu.Unlock()
		}()
	}
	wg.Wait()
	return highest
}

// simWaiting is how many runs waiting out a silent fault forIndices runs
// beside its simParallel others.
const simWaiting = 8

// The slots of forIndices' runs.
var simBusy, simWaitingRuns = make(chan struct{}, simParallel), make(chan struct{}, simWaiting)

// simTail is how many runs in a row may miss their index, beyond the
// highest one reached, before forIndices stops: several times the runs
// in flight, since the reach of runs near the end varies.
const simTail = 4 * simParallel
