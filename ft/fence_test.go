package ft

import (
	"fmt"
	"testing"

	"github.com/ftkvm/ftkvm/ft/wire"
)

// Fencing. Bressoud and Schneider assume fail-stop processors and a
// failure detector that is never wrong; a cut link breaks that
// assumption, and both replicas would go on (split brain). The rules below
// are VMware FT's answer (Scales, Nelson and Venkitachalam, "The Design of
// a Practical System for Fault-Tolerant Virtual Machines", SIGOPS OSR
// 44(4), 2010, section 2.3): "To avoid split-brain problems, we make use
// of ... an atomic test-and-set operation ... If the operation succeeds,
// the VM is allowed to go live. If the operation fails, then the other VM
// must have already gone live, so the current VM actually halts itself."
// Here the test-and-set is a witness's claim (Config.Witness).

var (
	testWitness                   = Digest{0x77}
	testPrimaryID, testBackupID   = Digest{0xa1}, Digest{0xb2}
	testPrimaryID2, testBackupID2 = Digest{0xa3}, Digest{0xb4}
)

// fencedConfigs are a primary's and a backup's configurations, both
// claiming at the same witness under the instance names given.
func fencedConfigs(policy Policy, primary, backup Digest) (pc, bc Config) {
	pc, bc = testConfig(RolePrimary, policy), testConfig(RoleBackup, policy)
	pc.Witness, pc.Instance = testWitness, primary
	bc.Witness, bc.Instance = testWitness, backup
	return pc, bc
}

// fencedPair is pair() with both replicas claiming at the same witness.
func fencedPair(t *testing.T, policy Policy) (p, b *replica) {
	pc, bc := fencedConfigs(policy, testPrimaryID, testBackupID)
	return pairOf(t, pc, bc)
}

// lastClaim drains r and returns the claim it asks for, if any.
func (r *replica) lastClaim() *Claim {
	r.t.Helper()
	rd := r.n.Ready()
	r.notes = append(r.notes, rd.Notes...)
	r.perform = append(r.perform, rd.Perform...)
	if rd.Close {
		r.closed = true
	}
	return rd.Claim
}

// cutPair loses the link on both sides (the primary by timeout, the
// backup by a broken connection) with an output held on the primary and
// one absorbed on the backup, and returns both claims.
func cutPair(t *testing.T) (p, b *replica, pc, bc *Claim) {
	p, b = fencedPair(t, OutputCommit)
	p.n.Tick(0)
	wantGo(t, "output", p.n.Output(at(2), wire.KindConsole, []byte("x")))
	b.step(p.drain()...)
	wantGo(t, "absorbed", b.n.Output(at(2), wire.KindConsole, []byte("x")))
	b.drain() // the ack is lost with the link
	p.n.Tick(100 * ms)
	b.n.Disconnected()
	pc, bc = p.lastClaim(), b.lastClaim()
	return p, b, pc, bc
}

// Reference: Scales et al., section 2.3: both replicas race to the
// test-and-set when they lose each other; neither goes live before it.
// Here: each asks the witness, naming the same pair, and its vCPU waits;
// the primary's held output stays held and the backup takes nothing over.
func TestFenceBothAskTheWitnessWhenTheLinkIsLost(t *testing.T) {
	p, b, pc, bc := cutPair(t)
	if pc == nil || bc == nil {
		t.Fatalf("claims: primary %v, backup %v", pc, bc)
	}
	if pc.Pair != bc.Pair || pc.Pair == (Digest{}) || pc.Role != RolePrimary || bc.Role != RoleBackup {
		t.Fatalf("claims: primary %+v, backup %+v", *pc, *bc)
	}
	for _, r := range []*replica{p, b} {
		if _, ok := r.hasNote(NoteClaim); !ok || !r.closed {
			t.Fatalf("notes %v closed %v", r.notes, r.closed)
		}
		if s := r.n.Status(); !s.Claiming || s.Fenced {
			t.Fatalf("status %v", s)
		}
		wantWait(t, "a point while claiming", r.n.Point(pt(3, 200*ms)), WaitWitness)
		wantWait(t, "still", r.n.Continue(), WaitWitness)
	}
	if _, ok := b.hasNote(NotePrimaryLost); ok || b.n.Status().Promotions != 0 || b.n.Role() != RoleBackup {
		t.Fatalf("the backup took over before the witness answered: %v", b.n.Status())
	}
	if _, ok := p.hasNote(NoteBackupLost); ok {
		t.Fatal("the primary went on unprotected before the witness answered")
	}
	if len(p.perform) != 0 || len(b.perform) != 0 {
		t.Fatalf("performed while claiming: primary %v, backup %v", p.perform, b.perform)
	}
}

// Reference: Scales et al., section 2.3: "If the operation succeeds, the
// VM is allowed to go live. If the operation fails, then the other VM must
// have already gone live, so the current VM actually halts itself."
// The primary wins: it goes on unprotected and releases its held output;
// the backup stops without performing anything.
func TestFencePrimaryWinsBackupHalts(t *testing.T) {
	p, b, _, _ := cutPair(t)
	wantWait(t, "primary", p.n.Point(pt(3, 200*ms)), WaitWitness)
	wantWait(t, "backup", b.n.Point(pt(2, 200*ms)), WaitWitness)
	p.n.Claimed(true)
	b.n.Claimed(false)
	wantGo(t, "the winning primary goes on", p.n.Continue())
	p.drain()
	if len(p.perform) != 1 || string(p.perform[0].Data) != "x" {
		t.Fatalf("held output: %v", p.perform)
	}
	if _, ok := p.hasNote(NoteBackupLost); !ok {
		t.Fatalf("notes %v", p.notes)
	}
	a := wantAction(t, "the losing backup halts", b.n.Continue(), ActStop)
	if !isErr(a.Err, ErrFenced) || !contains(a.Err.Error(), "chose the primary") {
		t.Fatalf("stop: %v", a.Err)
	}
	b.drain()
	if _, ok := b.hasNote(NoteFenced); !ok || !b.n.Status().Fenced || b.n.Role() != RoleBackup {
		t.Fatalf("backup %v notes %v", b.n.Status(), b.notes)
	}
	if len(b.perform) != 0 {
		t.Fatalf("the fenced backup performed %v", b.perform)
	}
	wantAction(t, "every later call", b.n.Read(at(3), wire.KindClock, 1), ActStop)
}

// The backup wins: it takes over as without a witness (the absorbed
// output not confirmed is performed, uncertain); the primary halts, and
// its held output never leaves: the new primary performed it.
func TestFenceBackupWinsPrimaryHalts(t *testing.T) {
	p, b, _, _ := cutPair(t)
	wantWait(t, "primary", p.n.Point(pt(3, 200*ms)), WaitWitness)
	b.n.Claimed(true)
	p.n.Claimed(false)
	b.drain()
	if _, ok := b.hasNote(NotePrimaryLost); !ok || b.n.Role() != RolePrimary || b.n.Status().Promotions != 1 {
		t.Fatalf("backup %v notes %v", b.n.Status(), b.notes)
	}
	if len(b.perform) != 1 || string(b.perform[0].Data) != "x" || !b.perform[0].Uncertain {
		t.Fatalf("redone at promotion: %v", b.perform)
	}
	a := wantAction(t, "the losing primary halts", p.n.Continue(), ActStop)
	if !isErr(a.Err, ErrFenced) || !contains(a.Err.Error(), "chose the backup") {
		t.Fatalf("stop: %v", a.Err)
	}
	p.drain()
	if len(p.perform) != 0 || !p.n.Status().Fenced {
		t.Fatalf("fenced primary performed %v; %v", p.perform, p.n.Status())
	}
}

// The vCPU call in progress when the link is lost waits where it stood
// and resumes there: a strict primary waiting for an ack goes on after
// winning, with the output released.
func TestFenceCallResumesWhereItStood(t *testing.T) {
	p, _ := fencedPair(t, Strict)
	p.n.Tick(0)
	wantWait(t, "strict output", p.n.Output(at(2), wire.KindConsole, []byte("held")), WaitAck)
	p.drain()
	p.n.Disconnected()
	if c := p.lastClaim(); c == nil {
		t.Fatal("no claim")
	}
	wantWait(t, "claiming", p.n.Continue(), WaitWitness)
	p.n.Claimed(true)
	wantGo(t, "after the win", p.n.Continue())
	p.drain()
	if len(p.perform) != 1 {
		t.Fatalf("performed %v", p.perform)
	}
}

// A claim is made only where the peer could go on with the guest: not by
// a backup with no state, nor by a primary whose backup is still joining
// (the full state not sent), nor after the goodbye, nor before the
// handshake. Once the full state is sent the primary claims: it cannot
// know whether the backup holds it.
func TestFenceOnlyWhereThePeerCouldGoOn(t *testing.T) {
	for _, sent := range []bool{false, true} {
		t.Run(fmt.Sprintf("joining backup, full state sent %v", sent), func(t *testing.T) {
			pc, bc := fencedConfigs(OutputCommit, testPrimaryID, testBackupID)
			p, b := newReplica(t, pc), newReplica(t, bc)
			wantGo(t, "the guest runs", p.n.Point(pt(1, 0))) // a backup must wait for the full state
			p.n.Connected()
			b.n.Connected()
			exchange(p, b)
			if sent {
				wantAction(t, "full checkpoint", p.n.Point(kick(1, ms)), ActCheckpoint)
				wantGo(t, "sent", p.n.Checkpointed([]byte("FULL")))
				p.drain() // lost with the link
			}
			b.n.Disconnected()
			p.n.Disconnected()
			if c := b.lastClaim(); c != nil {
				t.Fatalf("a backup without state claims %+v", c)
			}
			a := wantAction(t, "no state", b.n.Point(pt(1, 0)), ActStop)
			if !isErr(a.Err, ErrNoState) {
				t.Fatalf("err %v", a.Err)
			}
			c := p.lastClaim()
			switch {
			case sent && c == nil:
				t.Fatal("the primary that sent the full state must claim")
			case !sent && c != nil:
				t.Fatalf("the primary of a backup still joining claims %+v", c)
			case !sent:
				wantGo(t, "the primary goes on", p.n.Point(pt(2, 2*ms)))
			}
		})
	}
	t.Run("after the goodbye", func(t *testing.T) {
		p, b := fencedPair(t, OutputCommit)
		wantWait(t, "primary's goodbye", p.n.Finish(3), WaitAck)
		b.step(p.drain()...)
		p.step(b.drain()...)
		wantAction(t, "primary", p.n.Continue(), ActStop)
		b.n.Disconnected()
		if c := b.lastClaim(); c != nil {
			t.Fatalf("claimed after the goodbye: %+v", c)
		}
		if a := wantAction(t, "backup", b.n.Finish(3), ActStop); a.Err != nil || a.Status != 3 {
			t.Fatalf("backup stop %v", a)
		}
	})
	t.Run("before the handshake", func(t *testing.T) {
		pc := testConfig(RolePrimary, OutputCommit)
		pc.Witness, pc.Instance = testWitness, testPrimaryID
		p := newReplica(t, pc)
		p.n.Connected()
		p.drain()
		p.n.Disconnected()
		if c := p.lastClaim(); c != nil {
			t.Fatalf("claimed for a pair never formed: %+v", c)
		}
		wantGo(t, "goes on", p.n.Point(pt(1, 0)))
	})
}

// Each pair has its own name at the witness: a promoted backup that takes
// a new backup claims, at its next loss, for the new pair, whose claim
// nobody has made yet.
func TestFencePairNames(t *testing.T) {
	names := map[Digest]string{}
	for _, tc := range []struct {
		name    string
		primary Digest
		backup  Digest
	}{{"first", testPrimaryID, testBackupID}, {"re-protected", testBackupID, testBackupID2}, {"another", testPrimaryID2, testBackupID}} {
		pc, bc := fencedConfigs(OutputCommit, tc.primary, tc.backup)
		p, b := pairOf(t, pc, bc)
		p.n.Disconnected()
		b.n.Disconnected()
		pcl, bcl := p.lastClaim(), b.lastClaim()
		if pcl == nil || bcl == nil || pcl.Pair != bcl.Pair {
			t.Fatalf("%s: claims %v %v", tc.name, pcl, bcl)
		}
		if prev, ok := names[pcl.Pair]; ok {
			t.Fatalf("%s and %s have the same pair name", prev, tc.name)
		}
		names[pcl.Pair] = tc.name
	}
}

// Both replicas must claim at the same witness, and name themselves.
func TestFenceHandshake(t *testing.T) {
	for _, tc := range []struct {
		name   string
		change func(*Config)
		text   string
	}{
		{"backup without a witness", func(c *Config) { c.Witness, c.Instance = Digest{}, Digest{} }, "different witness"},
		{"another witness", func(c *Config) { c.Witness = Digest{0x78} }, "different witness"},
		{"the same instance", func(c *Config) { c.Instance = testPrimaryID }, "this replica's own"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			pc, bc := fencedConfigs(OutputCommit, testPrimaryID, testBackupID)
			tc.change(&bc)
			p, b := newReplica(t, pc), newReplica(t, bc)
			p.n.Connected()
			b.n.Connected()
			exchange(p, b)
			n, ok := p.hasNote(NoteRefused)
			if !ok || !contains(n.Err.Error(), tc.text) || p.n.Status().Link {
				t.Fatalf("primary notes %v", p.notes)
			}
		})
	}
}

// A backup that diverged and waits for its repair holds a state known to
// be wrong: it claims one Timeout late, so that a primary still alive
// (the link was cut) claims first and goes on with the right state.
func TestFenceDivergedBackupClaimsLate(t *testing.T) {
	pc, bc := fencedConfigs(OutputCommit, testPrimaryID, testBackupID)
	pc.Verify = true
	_, b := pairOf(t, pc, bc)
	b.n.Tick(0)
	b.step(wire.EpochEnd{Seq: 1, Epoch: 1, Pos: at(2), Verify: true, Hash: Digest{1}})
	wantAction(t, "hash", b.n.Point(pt(2, 0)), ActHash)
	// Diverged: it yields to a kick point to take its page hashes.
	wantAction(t, "diverged", b.n.Hashed(Digest{2}), ActYield)
	b.drain()
	b.n.Tick(10 * ms)
	b.n.Disconnected()
	if c := b.lastClaim(); c != nil {
		t.Fatalf("a diverged backup claims at once: %+v", c)
	}
	if _, ok := b.hasNote(NoteClaim); !ok || !b.n.Status().Claiming {
		t.Fatalf("notes %v", b.notes)
	}
	b.n.Tick(10*ms + 99*ms)
	if c := b.lastClaim(); c != nil {
		t.Fatal("claimed before a Timeout passed")
	}
	b.n.Tick(10*ms + 100*ms)
	if c := b.lastClaim(); c == nil || c.Role != RoleBackup {
		t.Fatalf("no claim a Timeout later: %v", c)
	}
}
