package test

import (
	"bytes"
	"fmt"
	"net"
	"os"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// A failover drill of a replicated network interface on /dev/kvm
// (docs/REPLICATION.md, "Network interfaces"): the primary's tap, the
// backup's tap and a client's veth are ports of one Linux bridge, as the
// replicas' host networks would be joined by a switch. The client streams
// numbered, checksummed requests to the guest's MAC (testos's netecho,
// guest/testos/README.md), at most netDrillWindow outstanding, and sends
// again a request not answered after netDrillResend, as a transport
// protocol does. The primary is SIGKILLed after a random number of echoes;
// the backup opens its tap, announces the guest's MAC (the bridge learns
// the new port from it) and sends the frames the primary had not
// confirmed. Every frame the guest sent must reach the client exactly once,
// or again identically (the uncertain frames at the seam): the guest's
// sequence numbers seen are 1..N without a gap, a number seen twice
// carries the same bytes; every request is answered with its own data; the
// guest finishes through the backup, and the consoles join at the seam.
const (
	netDrillFrames  = 240
	netDrillWindow  = 8
	netDrillMoments = 4
	// netDrillResend is the client's retransmission timer: a protocol's
	// timer (the frames to the dead primary are lost), not an assertion.
	netDrillResend = 300 * time.Millisecond
	// netDrillStall is a hang guard: no echo at all for this long fails.
	netDrillStall = 90 * time.Second
)

// netDrillLAN is a bridge with the two replicas' taps (persistent, so the
// backup's exists, bridged, before it opens it at takeover) and a veth
// whose other end is the client's interface.
type netDrillLAN struct {
	ptap, btap, client string
}

func newNetDrillLAN(t *testing.T, n int) netDrillLAN {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("this test needs root (a bridge, taps, AF_PACKET)")
	}
	id := fmt.Sprintf("%d_%d", os.Getpid()%10000, n)
	br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "ftbr" + id}}
	if err := netlink.LinkAdd(br); err != nil {
		t.Fatalf("create bridge: %v", err)
	}
	t.Cleanup(func() { netlink.LinkDel(br) })
	lan := netDrillLAN{ptap: "ftdp" + id, btap: "ftdb" + id, client: "ftdc" + id}
	veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "ftdv" + id}, PeerName: lan.client}
	if err := netlink.LinkAdd(veth); err != nil {
		t.Fatalf("create veth: %v", err)
	}
	t.Cleanup(func() { netlink.LinkDel(veth) })
	ports := []string{veth.Name}
	for _, name := range []string{lan.ptap, lan.btap} {
		tap := &netlink.Tuntap{LinkAttrs: netlink.LinkAttrs{Name: name}, Mode: netlink.TUNTAP_MODE_TAP, Flags: netlink.TUNTAP_NO_PI}
		if err := netlink.LinkAdd(tap); err != nil {
			t.Fatalf("create tap %s: %v", name, err)
		}
		t.Cleanup(func() { netlink.LinkDel(tap) })
		ports = append(ports, name)
	}
	for _, name := range ports {
		l, err := netlink.LinkByName(name)
		if err == nil {
			err = netlink.LinkSetMaster(l, br)
		}
		if err == nil {
			err = netlink.LinkSetUp(l)
		}
		if err != nil {
			t.Fatalf("bridge port %s: %v", name, err)
		}
	}
	for _, name := range []string{br.Name, lan.client} {
		l, err := netlink.LinkByName(name)
		if err == nil {
			err = netlink.LinkSetUp(l)
		}
		if err != nil {
			t.Fatalf("%s up: %v", name, err)
		}
	}
	return lan
}

// recvWithin returns the next frame from the guest, or nil after d.
func (c *packetConn) recvWithin(t *testing.T, d time.Duration) []byte {
	t.Helper()
	b := make([]byte, 2048)
	deadline := time.Now().Add(d)
	for {
		left := time.Until(deadline)
		if left <= 0 {
			return nil
		}
		tv := unix.NsecToTimeval(int64(left))
		if err := unix.SetsockoptTimeval(c.fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
			t.Fatal(err)
		}
		n, from, err := unix.Recvfrom(c.fd, b, 0)
		switch {
		case err == unix.EINTR:
			continue
		case err == unix.EAGAIN:
			return nil
		case err != nil:
			t.Fatalf("receive: %v", err)
		}
		if ll, ok := from.(*unix.SockaddrLinklayer); ok && ll.Pkttype == unix.PACKET_OUTGOING {
			continue
		}
		return b[:n]
	}
}

// await takes frames from the guest until one satisfies match, for at
// most d.
func (c *packetConn) await(t *testing.T, d time.Duration, match func([]byte) bool) bool {
	t.Helper()
	for end := time.Now().Add(d); time.Now().Before(end); {
		if f := c.recvWithin(t, time.Until(end)); f != nil && match(f) {
			return true
		}
	}
	return false
}

// netDrillClient is the client's side of one run.
type netDrillClient struct {
	t     *testing.T
	c     *packetConn
	guest net.HardwareAddr
	data  map[uint32][]byte    // request data by client sequence
	sent  map[uint32]time.Time // outstanding requests, last sent
	done  map[uint32]bool      // answered requests
	seen  map[uint32][]byte    // the guest's frames by guest sequence
	dups  int                  // guest frames seen again (identical)
	echos int
}

// step sends what the window allows and what timed out, then takes the
// frames that come within a short wait, checking each.
func (d *netDrillClient) step(next *uint32, last uint32) {
	t := d.t
	now := time.Now()
	for cs, at := range d.sent {
		if now.Sub(at) >= netDrillResend {
			d.c.send(t, neFrame(d.guest, d.c.mac, neRequest, cs, 0, d.data[cs]))
			d.sent[cs] = now
		}
	}
	for *next <= last && len(d.sent) < netDrillWindow {
		cs := *next
		data := bytes.Repeat([]byte{byte(cs), byte(cs >> 8), 0x5a}, int(cs%400))
		d.data[cs] = data
		d.c.send(t, neFrame(d.guest, d.c.mac, neRequest, cs, 0, data))
		d.sent[cs] = now
		*next++
	}
	f := d.c.recvWithin(t, 50*time.Millisecond)
	if f == nil {
		return
	}
	p, err := neParse(f)
	if err != nil {
		t.Fatalf("a frame from the guest: %v", err)
	}
	if prev, ok := d.seen[p.gseq]; ok {
		if !bytes.Equal(prev, f) {
			t.Fatalf("guest frame %d seen twice with different contents", p.gseq)
		}
		d.dups++
		return
	}
	d.seen[p.gseq] = append([]byte(nil), f...)
	switch {
	case p.src.String() != d.guest.String() || p.dst.String() != d.c.mac.String():
		t.Fatalf("frame %d from %s to %s, want from %s to %s", p.gseq, p.src, p.dst, d.guest, d.c.mac)
	case p.kind == neEcho:
		want, ok := d.data[p.cseq]
		if !ok || !bytes.Equal(p.data, want) {
			t.Fatalf("the echo of request %d carries other data (%d bytes, sent %d, known %v)", p.cseq, len(p.data), len(want), ok)
		}
		d.echos++
		d.done[p.cseq] = true
		delete(d.sent, p.cseq)
	case p.kind == neEnd:
		d.done[p.cseq] = true
		delete(d.sent, p.cseq)
	default:
		t.Fatalf("guest frame %d of kind %d", p.gseq, p.kind)
	}
}

// checkSequence: the guest's frames seen are 1..N, none missing.
func (d *netDrillClient) checkSequence() int {
	var gs []int
	for g := range d.seen {
		gs = append(gs, int(g))
	}
	sort.Ints(gs)
	for i, g := range gs {
		if g != i+1 {
			d.t.Fatalf("the guest's frame %d never reached the client (frames seen: %d, up to %d)", i+1, len(gs), gs[len(gs)-1])
		}
	}
	return len(gs)
}

func TestNetEchoFailoverDrills(t *testing.T) {
	requireKVM(t)
	r := newRand(t)
	const mac = "02:46:54:4b:56:10"
	w := workload{name: "netecho", cmdline: "workload=netecho every=40 hz=100"}
	for i := range netDrillMoments {
		lan := newNetDrillLAN(t, i)
		c := newPacketConn(t, lan.client)
		b := start(t, append([]string{"--log-level", "info", "backup", "--listen", "127.0.0.1:0", "--net", "tap=" + lan.btap + ",mac=" + mac}, replicaArgs(w)...)...)
		p := start(t, append([]string{"--log-level", "info", "primary", "--backup", b.backupAddr(), "--net", "tap=" + lan.ptap + ",mac=" + mac}, replicaArgs(w)...)...)
		gmac := guestMAC(t, p)
		d := &netDrillClient{t: t, c: c, guest: gmac, data: map[uint32][]byte{}, sent: map[uint32]time.Time{},
			done: map[uint32]bool{}, seen: map[uint32][]byte{}}
		killAt := 10 + r.IntN(netDrillFrames-40)
		next, killed := uint32(1), false
		last := time.Now()
		for len(d.done) < netDrillFrames {
			before := len(d.seen) + d.dups
			d.step(&next, netDrillFrames)
			if len(d.seen)+d.dups != before {
				last = time.Now()
			} else if time.Since(last) > netDrillStall {
				t.Fatalf("moment %d: no frame from the guest for %v (%d of %d requests answered, killed %v)\nprimary:\n%s\nbackup:\n%s",
					i, netDrillStall, len(d.done), netDrillFrames, killed, p.stderr(), b.stderr())
			}
			if !killed && d.echos >= killAt {
				p.kill()
				killed = true
			}
		}
		if !killed {
			t.Fatalf("moment %d: all %d requests answered before the kill after %d echoes", i, netDrillFrames, killAt)
		}
		// The end frame, sent until answered: the guest finishes.
		end := uint32(netDrillFrames + 1)
		d.data[end] = nil
		for !d.done[end] {
			d.c.send(t, neFrame(gmac, c.mac, neEnd, end, 0, nil))
			deadline := time.Now().Add(netDrillResend)
			for !d.done[end] && time.Now().Before(deadline) {
				d.step(&next, netDrillFrames)
			}
			if time.Since(last) > netDrillStall {
				t.Fatalf("moment %d: the end frame is not answered\nbackup:\n%s", i, b.stderr())
			}
		}
		pres, bres := p.wait(), b.wait()
		if bres.status != 0 || !strings.Contains(bres.stderr, "taking over") {
			t.Fatalf("moment %d: the backup: status %d, want 0 after a takeover\n%s", i, bres.status, bres.stderr)
		}
		if !strings.Contains(bres.stderr, "announc") {
			t.Errorf("moment %d: the backup's log does not mention its announcement\n%s", i, bres.stderr)
		}
		out, rep := mergeSeam(t, pres.stdout, bres)
		if !strings.HasSuffix(out, "testos: PASS\n") || !strings.Contains(out, "netecho: done echoed=") {
			t.Fatalf("moment %d: the joined console does not end the workload:\n%s", i, out)
		}
		n := d.checkSequence()
		t.Logf("moment %d: killed after %d echoes; %d guest frames, each seen (%d again, identical); %d requests answered; %d console bytes repeated at the seam",
			i, killAt, n, d.dups, netDrillFrames, rep)
	}
}
