package driver

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"io"
	"sync"
	"testing"
	"time"

	"github.com/ftkvm/ftkvm/ft"
)

// The crash simulation with a network interface (ft/doc.go: received
// frames are asynchronous events, transmitted frames outputs). Each
// replica's host side is a simPort, opened by the driver: the primary's
// when its guest starts, a backup's only when it takes over. A client
// sends the guest a numbered frame every 2 ms to whichever replica acts
// for the guest; the guest's received frames enter its computation, so a
// frame delivered at another position changes everything after it
// (checkDeliveries). The guest sends numbered frames; checkFrames sees
// every one performed exactly once, or repeated identically only where a
// promoted backup took over, after its RARP announcement.

var simNetConfigs = []simConfig{
	{policy: ft.OutputCommit, net: true, exits: 240},
	{policy: ft.Strict, verify: true, net: true, exits: 240},
	{policy: ft.OutputCommit, witness: true, net: true, input: "hi", exits: 240},
}

// simNIC is a replica's network interface as the simulation sees it.
type simNIC struct {
	port           *simPort
	frames         []simOut // frames the host side sent, by the guest's numbers (sr.mu)
	announced      int      // RARP announcements sent
	announcedFirst bool     // an announcement came before any frame
	openedAsBackup bool     // the driver opened the host side of a backup not taken over
}

// simPort is a host side: the client's frames come in through in.
type simPort struct {
	sr     *simReplica
	in     chan []byte
	closed chan struct{}
	once   sync.Once
}

func (sr *simReplica) openPort() (FramePort, error) {
	sr.mu.Lock()
	defer sr.mu.Unlock()
	if sr.role == ft.RoleBackup && !sr.promoted {
		sr.nic.openedAsBackup = true
	}
	sr.nic.port = &simPort{sr: sr, in: make(chan []byte, 256), closed: make(chan struct{})}
	return sr.nic.port, nil
}

func (p *simPort) Read(b []byte) (int, error) {
	select {
	case f := <-p.in:
		return copy(b, f), nil
	case <-p.closed:
		return 0, io.EOF
	}
}

func (p *simPort) Write(f []byte) (int, error) {
	sr := p.sr
	sr.mu.Lock()
	defer sr.mu.Unlock()
	if sr.dead {
		return len(f), nil
	}
	switch {
	case len(f) == 60 && f[12] == 0x80 && f[13] == 0x35 && bytes.Equal(f, RARPAnnouncement(simMAC)):
		if len(sr.nic.frames) == 0 {
			sr.nic.announcedFirst = true
		}
		sr.nic.announced++
	case len(f) == 60 && f[12] == 0x88 && f[13] == 0xb5:
		sr.nic.frames = append(sr.nic.frames, simOut{seq: binary.LittleEndian.Uint64(f[14:]), data: string(f)})
	default:
		sr.lines = append(sr.lines, fmt.Sprintf("BAD FRAME %x", f))
	}
	return len(f), nil
}

func (p *simPort) Close() error {
	p.once.Do(func() { close(p.closed) })
	return nil
}

// feedFrames is the client: a numbered frame every 2 ms to the replica
// that acts for the guest (the primary, or a backup once it took over),
// until both ended. Frames sent to a replica that dies are lost, as on a
// wire. A few frames of wrong lengths go too: the driver drops them.
func (s *sim) feedFrames(p, b *simReplica) {
	go func() {
		for seq := uint64(1); ; seq++ {
			select {
			case <-p.done:
				select {
				case <-b.done:
					return
				default:
				}
			default:
			}
			time.Sleep(2 * time.Millisecond)
			var port *simPort
			for _, sr := range []*simReplica{p, b} {
				sr.mu.Lock()
				if !sr.dead && sr.nic.port != nil && (sr.role == ft.RolePrimary || sr.promoted) {
					port = sr.nic.port
				}
				sr.mu.Unlock()
			}
			if port == nil {
				continue
			}
			f := simFrame(seq, 0xc1)
			switch seq % 16 {
			case 5:
				f = f[:13] // shorter than an Ethernet header
			case 11:
				f = append(f, make([]byte, 1600)...) // longer than any frame
			}
			select {
			case port.in <- f:
			default:
			}
		}
	}()
}

// checkFrames: as checkSeams, for the frames the guest sent. The first
// replica sent them in order from 1; each promoted one announced the
// guest's address before its first frame, and sent in order from at most
// one after the last frame before it: repeats only at its start,
// identical. A backup not taken over opened nothing and sent nothing. If
// the last one ended the guest, every frame was sent.
func (s *sim) checkFrames(chain ...*simReplica) {
	var merged []simOut
	for i, sr := range chain {
		sr.mu.Lock()
		nic := sr.nic
		nic.frames = append([]simOut(nil), sr.nic.frames...)
		promoted := sr.promoted
		sr.mu.Unlock()
		if nic.openedAsBackup {
			s.fail("%s's host side was opened while it was a backup", sr.name)
		}
		if i > 0 && !promoted && (len(nic.frames) > 0 || nic.announced > 0) {
			s.fail("%s sent %d frames and %d announcements without taking over", sr.name, len(nic.frames), nic.announced)
		}
		if i > 0 && len(nic.frames) > 0 && !nic.announcedFirst {
			s.fail("%s sent frames before announcing the guest's address (%d announcements)", sr.name, nic.announced)
		}
		for j, o := range nic.frames {
			if j > 0 && o.seq != nic.frames[j-1].seq+1 || i == 0 && j == 0 && o.seq != 1 {
				s.fail("%s sent frame %d after %d", sr.name, o.seq, nic.frames[max(0, j-1)].seq)
			}
			switch {
			case o.seq == uint64(len(merged))+1:
				merged = append(merged, o)
			case o.seq > uint64(len(merged))+1:
				s.fail("frames %d..%d lost before %s", len(merged)+1, o.seq-1, sr.name)
			case merged[o.seq-1].data != o.data:
				s.fail("frame %d differs when %s sent it again", o.seq, sr.name)
			}
		}
	}
	last := chain[0]
	for _, sr := range chain[1:] {
		if sr.promoted {
			last = sr
		}
	}
	if last.ended() && uint64(len(merged)) != last.m.regs.r8 {
		s.fail("%s ended the guest, which sent %d frames; %d were sent", last.name, last.m.regs.r8, len(merged))
	}
}

func (s *sim) runNet(fault *simFault) (p, b *simReplica, l *simLink) {
	p, b = s.add("primary", ft.RolePrimary), s.add("backup", ft.RoleBackup)
	l = s.pair(p, b, fault)
	s.typeInput(p)
	s.feedFrames(p, b)
	s.wait()
	return p, b, l
}

// A run with a network interface and no fault: frames flow both ways, the
// backup delivers the primary's received frames at the same positions
// into the same state, and sends and opens nothing.
func TestSimNetNoFailure(t *testing.T) {
	for _, cfg := range simNetConfigs {
		t.Run(cfg.String(), func(t *testing.T) {
			t.Parallel()
			s := newSim(t, cfg)
			defer catch(t, "no fault", s)
			p, b, _ := s.runNet(nil)
			s.checkNoDivergence()
			if !p.ended() || !b.ended() {
				s.fail("status: primary %d %v, backup %d %v", p.status, p.err, b.status, b.err)
			}
			s.checkSeams(p)
			s.checkFrames(p, b)
			s.checkDeliveries(p, b, 0)
			frames := 0
			for _, d := range b.m.delivered {
				if len(d.event) > 5 && d.event[:5] == "frame" {
					frames++
				}
			}
			ns := p.r.NetStats()
			if len(p.nic.frames) < 3 || frames < 3 || ns.RxBad == 0 {
				s.fail("the guest sent %d frames, the backup delivered %d received ones; primary %v", len(p.nic.frames), frames, ns)
			}
			t.Logf("primary: %d frames sent; %v; backup delivered %d frames", len(p.nic.frames), ns, frames)
		})
	}
}

// Kill the primary at sampled messages: every frame the guest sent is
// sent once, or repeated identically at the seam after the backup's
// announcement; the backup's received frames are the primary's (and what
// TestSimKillPrimaryAtEveryMessage checks holds).
func TestSimNetKillPrimary(t *testing.T) {
	simKillAt(t, simNetConfigs, 0, false, (*sim).runNet, func(s *sim, p, b *simReplica, out *tally) {
		if b.promoted && b.nic.frames != nil && b.nic.frames[0].seq <= uint64(len(p.nic.frames)) {
			out.add("frames repeated at the seam")
		}
		s.checkFrames(p, b)
	})
}

// Kill the backup at sampled messages: the primary goes on unprotected
// and sends every frame once; the dead backup opened and sent nothing
// (and what TestSimKillBackupAtEveryMessage checks holds).
func TestSimNetKillBackup(t *testing.T) {
	simKillAt(t, simNetConfigs, 1, false, (*sim).runNet, func(s *sim, p, b *simReplica, _ *tally) {
		s.checkFrames(p, b)
	})
}
