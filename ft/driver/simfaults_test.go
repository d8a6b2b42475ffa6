package driver

import (
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/ftkvm/ftkvm/ft"
)

// The crash simulation's faults at message indices (simStride: every
// index for killing the primary, samples for the rest and under -race).
// A run's messages depend on timing, so the range is that of a faultless
// run; an index a run does not reach leaves it faultless, which the
// checks accept. Silent faults (the peer must notice the silence: a
// Timeout each) at every silentEvery-th index; the others close the
// connection.
const silentEvery = 32

// faultAt is the fault of index k: partial frames at even indices, silent
// at every silentEvery-th.
func faultAt(kind faultKind, side, k int) *simFault {
	return &simFault{kind: kind, side: side, at: k, partial: k%2 == 0, silent: silentAt(k)}
}

// silentAt tells whether faultAt's fault at index k is silent.
func silentAt(k int) bool { return mix(uint64(k), 1)%silentEvery == 0 }

// tally counts outcomes across the runs of one configuration.
type tally struct {
	mu sync.Mutex
	n  map[string]int
}

func (t *tally) add(k string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.n == nil {
		t.n = map[string]int{}
	}
	t.n[k]++
}

func (t *tally) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return fmt.Sprint(t.n)
}

// noHandshake: the fault took a hello, and the replica gave up as the
// command does.
func (sr *simReplica) noHandshake() bool { return errors.Is(sr.err, errNoHandshake) }

// Kill the primary at every message: the backup takes over and ends the
// guest; the primary's outputs and the backup's hold every output once,
// repeats only at the seam; the backup's deliveries are the primary's.
func TestSimKillPrimaryAtEveryMessage(t *testing.T) {
	simKillAt(t, simConfigs, 0, true, (*sim).run, nil)
}

// Kill the backup at every message: the primary goes on unprotected and
// performs every output once.
func TestSimKillBackupAtEveryMessage(t *testing.T) {
	simKillAt(t, simConfigs, 1, false, (*sim).run, nil)
}

// simKillAt runs each configuration of cfgs with one replica killed (side
// 0 the primary, 1 the backup) at the message indices simStride(total,
// every) picks, each run made by run (sim.run, or sim.runNet with a
// network interface), and checks every run: killedPrimary or
// killedBackup, then more (nil: nothing more), which may add outcomes.
func simKillAt(t *testing.T, cfgs []simConfig, side int, every bool,
	run func(*sim, *simFault) (p, b *simReplica, l *simLink),
	more func(s *sim, p, b *simReplica, out *tally)) {
	who := [2]string{"the primary", "the backup"}[side]
	check := [2]func(*sim, *simReplica, *simReplica, *simLink, *tally) bool{killedPrimary, killedBackup}[side]
	for _, cfg := range cfgs {
		t.Run(cfg.String(), func(t *testing.T) {
			t.Parallel() // forIndices bounds the runs of all
			total := countFrames(t, cfg)[side]
			var out tally
			reached := forIndices(t, total, simStride(total, every), silentAt, func(k int) (fired bool) {
				s := newSim(t, cfg)
				defer catch(t, fmt.Sprintf("kill %s at %d", who, k), s)
				p, b, l := run(s, faultAt(killSender, side, k))
				fired = l.hasFired()
				s.checkNoDivergence()
				if check(s, p, b, l, &out) && more != nil {
					more(s, p, b, &out)
				}
				return fired
			})
			t.Logf("%d messages, reached up to %d: %v", total, reached, &out)
		})
	}
}

// killedPrimary checks a run whose primary was killed: the backup ends
// the guest (promoted, or after the primary's goodbye); outputs join at
// the seams; the backup delivered what the primary did. False: the fault
// came before the handshake, and there is nothing more to check.
func killedPrimary(s *sim, p, b *simReplica, l *simLink, out *tally) bool {
	switch {
	case b.noHandshake():
		out.add("before the handshake")
		return false
	case !b.ended():
		s.fail("the backup: status %d, %v", b.status, b.err)
	case !l.hasFired():
		out.add("not reached")
		if !p.ended() {
			s.fail("faultless: the primary: status %d, %v", p.status, p.err)
		}
	case b.promoted:
		out.add("promoted")
	default:
		out.add("after the goodbye")
	}
	s.checkSeams(p, b)
	s.checkDeliveries(p, b, 0)
	return true
}

// killedBackup checks a run whose backup was killed: the primary ends the
// guest and performs every output once; the backup performed nothing.
// False: the fault came before the handshake.
func killedBackup(s *sim, p, b *simReplica, l *simLink, out *tally) bool {
	if p.noHandshake() {
		out.add("before the handshake")
		return false
	}
	if !p.ended() {
		s.fail("the primary: status %d, %v", p.status, p.err)
	}
	if len(b.outs) != 0 {
		s.fail("the backup performed %d outputs", len(b.outs))
	}
	s.checkSeams(p)
	switch {
	case !l.hasFired():
		out.add("not reached")
	case p.r.Status().Protected:
		out.add("after the goodbye")
	default:
		out.add("unprotected")
	}
	return true
}

// Cut the link at every message without a witness: both go on (split
// brain, ft/doc.go "Fencing"); the primary performs all its outputs, and
// the backup, up to where it went live, replays the primary's.
func TestSimCutLinkAtEveryMessage(t *testing.T) {
	for _, cfg := range simConfigs {
		if cfg.witness {
			continue
		}
		t.Run(cfg.String(), func(t *testing.T) {
			t.Parallel() // forIndices bounds the runs of all
			total := countFrames(t, cfg)[0]
			var out tally
			reached := forIndices(t, total, simStride(total, false), silentAt, func(k int) (fired bool) {
				s := newSim(t, cfg)
				defer catch(t, fmt.Sprintf("cut at %d", k), s)
				p, b, l := s.run(faultAt(cutLink, 0, k))
				fired = l.hasFired()
				s.checkNoDivergence()
				if b.noHandshake() {
					out.add("before the handshake")
					return
				}
				if !p.ended() || !b.ended() {
					s.fail("primary %d %v, backup %d %v", p.status, p.err, b.status, b.err)
				}
				s.checkSeams(p)
				s.checkDeliveries(p, b, 0)
				// The outputs the backup replayed (announced as
				// uncertain) are the primary's.
				n := 0
				for _, o := range b.outs {
					if n += len(o.data); n > b.uncertain {
						break
					}
					if o.seq > uint64(len(p.outs)) || p.outs[o.seq-1] != o {
						s.fail("the backup replayed output %d as %q", o.seq, o.data)
					}
				}
				if b.promoted {
					out.add("split brain")
				} else {
					out.add("after the goodbye")
				}
				return fired
			})
			t.Logf("%d messages, reached up to %d: %v", total, reached, &out)
		})
	}
}

// Cut the link at every message with a witness, the primary's claim
// reaching it first and the backup's first: exactly one replica goes on
// and ends the guest; the other stops fenced and performs nothing more;
// nothing is lost.
func TestSimCutLinkWithWitness(t *testing.T) {
	for _, cfg := range simConfigs {
		if !cfg.witness {
			continue
		}
		for _, first := range []ft.Role{ft.RolePrimary, ft.RoleBackup} {
			t.Run(fmt.Sprintf("%v/%v first", cfg, first), func(t *testing.T) {
				t.Parallel() // forIndices bounds the runs of all
				total := countFrames(t, cfg)[0]
				var out tally
				reached := forIndices(t, total, simStride(total, false), silentAt, func(k int) (fired bool) {
					s := newSim(t, cfg)
					s.witness.delay = map[ft.Role]time.Duration{first: time.Millisecond, ft.RolePrimary + ft.RoleBackup - first: 300 * time.Millisecond}
					defer catch(t, fmt.Sprintf("cut at %d", k), s)
					p, b, l := s.run(faultAt(cutLink, 0, k))
					fired = l.hasFired()
					s.checkNoDivergence()
					fencedP, fencedB := errors.Is(p.err, ft.ErrFenced), errors.Is(b.err, ft.ErrFenced)
					switch {
					case b.noHandshake():
						if s.witness.decided() != 0 {
							s.fail("claims without a handshake")
						}
						out.add("before the handshake")
						return
					case p.ended() && b.ended():
						out.add("not reached or after the goodbye")
					case p.ended() && (fencedB || errors.Is(b.err, ft.ErrNoState)):
						if len(b.outs) != 0 || b.promoted {
							s.fail("the fenced backup took over or performed %d outputs", len(b.outs))
						}
						out.add("primary")
					case b.ended() && (fencedP || p.noHandshake()):
						if !b.promoted {
							s.fail("the backup won but never took over")
						}
						out.add("backup")
					default:
						s.fail("primary %d %v, backup %d %v: want exactly one survivor", p.status, p.err, b.status, b.err)
					}
					s.checkSeams(p, b)
					s.checkDeliveries(p, b, 0)
					return fired
				})
				t.Logf("%d messages, reached up to %d: survivors %v", total, reached, &out)
			})
		}
	}
}

// Re-protection and a second failover: the primary dies at message k1;
// once the backup is live, a second backup joins it (full state at a kick
// point, then the log), and the promoted backup dies at its message k2.
func TestSimReprotectionAndSecondFailover(t *testing.T) {
	for _, cfg := range simConfigs {
		cfg.exits = 300
		t.Run(cfg.String(), func(t *testing.T) {
			t.Parallel() // forIndices bounds the runs of all
			var out tally
			k1s := []int{20, 60, 100, 140}
			k12 := func(i int) (int, int) { return k1s[(i-1)/8], 2 + (i-1)%8*9 + k1s[(i-1)/8]%7 }
			waits := func(i int) bool { k1, k2 := k12(i); return silentAt(k1) || silentAt(k2) }
			forIndices(t, len(k1s)*8, 1, waits, func(i int) (all bool) {
				// Every run counts as reached: its indices are fixed.
				all = true
				k1, k2 := k12(i)
				s := newSim(t, cfg)
				defer catch(t, fmt.Sprintf("k1 %d k2 %d", k1, k2), s)
				p, b := s.add("primary", ft.RolePrimary), s.add("backup", ft.RoleBackup)
				s.pair(p, b, faultAt(killSender, 0, k1))
				s.typeInput(p)
				var c *simReplica
				for c == nil {
					select {
					case <-b.done:
					case <-time.After(time.Millisecond):
						st := b.r.Status()
						if st.Role != ft.RolePrimary || st.Replaying || st.Link {
							continue
						}
						c = s.add("second backup", ft.RoleBackup)
						s.pair(b, c, faultAt(killSender, 0, k2))
						continue
					}
					break
				}
				s.wait()
				s.checkNoDivergence()
				if c == nil {
					out.add("no second backup")
					if b.ended() || b.noHandshake() {
						return
					}
					s.fail("the backup: status %d %v", b.status, b.err)
				}
				s.checkSeams(p, b, c)
				s.checkDeliveries(p, b, 0)
				switch {
				case c.promoted:
					out.add("second failover")
					if c.m.installs == 0 {
						s.fail("the second backup never installed the full state")
					}
					s.checkDeliveries(b, c, 0)
					if !c.ended() {
						s.fail("the second backup: status %d %v", c.status, c.err)
					}
				case b.ended():
					out.add("re-protected")
				case errors.Is(c.err, ft.ErrNoState):
					// The promoted backup died before the second had
					// its full state: nobody can go on (ft/doc.go).
					out.add("killed during the join")
				default:
					s.fail("nobody ended the guest")
				}
				return all
			})
			t.Logf("%v", &out)
		})
	}
}

// An injected divergence (a byte of a page the backup's guest dirtied) is
// caught by the verify hash and repaired with the primary's state; from
// the repair on, the backup's deliveries are the primary's again, up to a
// later failover.
func TestSimInjectedDivergenceRepaired(t *testing.T) {
	for _, cfg := range simConfigs {
		if !cfg.verify {
			continue
		}
		cfg.inject = 5
		// A guest four times the usual length, so that the primary's
		// guest does not end before the backup, lagging on a loaded host,
		// reaches the divergence and gets its repair.
		cfg.exits = 480
		t.Run(cfg.String(), func(t *testing.T) {
			total := countFrames(t, simConfig{policy: cfg.policy, verify: true, exits: cfg.exits})[0]
			for _, k := range []int{0, total * 2 / 3, total * 3 / 4, total * 5 / 6} {
				s := newSim(t, cfg)
				func() {
					defer catch(t, fmt.Sprintf("kill at %d", k), s)
					var f *simFault
					if k > 0 {
						f = &simFault{kind: killSender, side: 0, at: k, partial: true}
					}
					p, b, _ := s.run(f)
					bs := b.r.Status()
					switch {
					case bs.Divergences > 0 && bs.Repairs > 0:
					case k == 0:
						s.fail("divergence not caught or not repaired: %v", bs)
					default:
						// The primary died before the backup's first
						// hashed epoch end at or after cfg.inject, or
						// before it repaired it (the fault's index comes
						// from another run, whose timing differed).
						t.Logf("kill at %d: injected divergence not repaired before the kill: %v", k, bs)
						return
					}
					if !b.ended() {
						s.fail("the backup: status %d %v", b.status, b.err)
					}
					// The repair replaced the injected page at least.
					rp := b.r.Profile()
					if rp.Repairs != bs.Repairs || rp.RepairedPages < 1 || rp.RepairBytes == 0 {
						s.fail("the backup's profile: %d repairs changing %d pages (%d bytes), status %v", rp.Repairs, rp.RepairedPages, rp.RepairBytes, bs)
					}
					// The injected divergence got a page repair, which
					// carried the pages that differed, not the memory
					// (ft/doc.go, verify mode): at most those the two
					// guests wrote since the divergence. It made the
					// replicas equal: no second divergence, no fallback to
					// the full state (one was seen when a repair installed
					// in HLT woke the guest as from HLT, vmm/loop.go).
					switch {
					case rp.PageRepairs != rp.Repairs || bs.PageRepairs != bs.Repairs || bs.Divergences != 1:
						s.fail("the backup's profile: %d repairs, %d of pages only (node: %d), after %d divergences",
							rp.Repairs, rp.PageRepairs, bs.PageRepairs, bs.Divergences)
					case rp.RepairBytes >= rp.Repairs*simMemSize/2:
						s.fail("the backup's profile: %d page repairs of %d bytes for %d bytes of memory", rp.Repairs, rp.RepairBytes, simMemSize)
					}
					s.checkSeams(p, b)
					s.checkDeliveries(p, b, b.m.installedAt)
					t.Logf("kill at %d: backup %v", k, bs)
				}()
			}
		})
	}
}
