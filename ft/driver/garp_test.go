package driver

import (
	"bytes"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/ftkvm/ftkvm/ft"
)

// The gratuitous ARP is an ARP announcement (RFC 5227 §2.3): a 60-byte
// broadcast ARP request from the guest's MAC whose sender and target
// protocol addresses are both the guest's address.
func TestGratuitousARP(t *testing.T) {
	mac := net.HardwareAddr{0x02, 0x11, 0x22, 0x33, 0x44, 0x55}
	want := []byte{
		0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02, 0x11, 0x22, 0x33, 0x44, 0x55, 0x08, 0x06, // Ethernet, ETH_P_ARP
		0x00, 0x01, 0x08, 0x00, 6, 4, 0x00, 0x01, // Ethernet/IPv4, request
		0x02, 0x11, 0x22, 0x33, 0x44, 0x55, 10, 0, 2, 15, // sender
		0, 0, 0, 0, 0, 0, 10, 0, 2, 15, // target
	}
	want = append(want, make([]byte, 18)...)
	if got := GratuitousARP(mac, [4]byte{10, 0, 2, 15}); !bytes.Equal(got, want) {
		t.Fatalf("got  % x\nwant % x", got, want)
	}
}

// arpFrame is an Ethernet/IPv4 ARP frame of operation op from spa.
func arpFrame(op byte, spa [4]byte) []byte {
	f := GratuitousARP(net.HardwareAddr{2, 0, 0, 0, 0, 9}, spa)
	f[21] = op
	return f
}

// ipv4Frame is an Ethernet frame carrying an IPv4 header from src.
func ipv4Frame(src [4]byte) []byte {
	f := make([]byte, 60)
	f[12], f[13], f[14] = 0x08, 0x00, 0x45
	copy(f[26:30], src[:])
	return f
}

// learn keeps the unicast sender addresses of the guest's ARP and IPv4
// frames, each once, at most maxGuestIPv4, and nothing from other or
// malformed frames.
func TestGuestIPv4Learn(t *testing.T) {
	short := ipv4Frame([4]byte{10, 0, 0, 9})[:33]
	badARP := arpFrame(2, [4]byte{10, 0, 0, 8})
	badARP[18] = 8 // not 6-byte hardware addresses
	other := ipv4Frame([4]byte{10, 0, 0, 7})
	other[12], other[13] = 0x88, 0xb5
	v6 := ipv4Frame([4]byte{10, 0, 0, 6})
	v6[14] = 0x60
	for _, tc := range []struct {
		name   string
		frames [][]byte
		want   [][4]byte
	}{
		{"ARP reply and request", [][]byte{arpFrame(2, [4]byte{10, 0, 2, 15}), arpFrame(1, [4]byte{10, 0, 2, 16})}, [][4]byte{{10, 0, 2, 15}, {10, 0, 2, 16}}},
		{"IPv4 source", [][]byte{ipv4Frame([4]byte{192, 168, 1, 2})}, [][4]byte{{192, 168, 1, 2}}},
		{"each once", [][]byte{arpFrame(2, [4]byte{10, 0, 2, 15}), ipv4Frame([4]byte{10, 0, 2, 15}), ipv4Frame([4]byte{10, 0, 2, 15})}, [][4]byte{{10, 0, 2, 15}}},
		{"not this-network, loopback, multicast, broadcast", [][]byte{
			arpFrame(1, [4]byte{0, 0, 0, 0}), ipv4Frame([4]byte{127, 0, 0, 1}), ipv4Frame([4]byte{224, 0, 0, 251}), ipv4Frame([4]byte{255, 255, 255, 255}),
		}, nil},
		{"malformed and other frames", [][]byte{short, badARP, other, v6, nil, make([]byte, 13)}, nil},
		{"bounded", [][]byte{
			ipv4Frame([4]byte{10, 0, 0, 1}), ipv4Frame([4]byte{10, 0, 0, 2}), ipv4Frame([4]byte{10, 0, 0, 3}),
			ipv4Frame([4]byte{10, 0, 0, 4}), ipv4Frame([4]byte{10, 0, 0, 5}),
		}, [][4]byte{{10, 0, 0, 1}, {10, 0, 0, 2}, {10, 0, 0, 3}, {10, 0, 0, 4}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var g guestIPv4
			for _, f := range tc.frames {
				g.learn(f)
			}
			got := g.a[:g.n]
			if len(got) != len(tc.want) {
				t.Fatalf("learned %v, want %v", got, tc.want)
			}
			for i := range got {
				if got[i] != tc.want[i] {
					t.Fatalf("learned %v, want %v", got, tc.want)
				}
			}
		})
	}
	if n := testing.AllocsPerRun(100, func() {
		var g guestIPv4
		g.learn(ipv4Frame([4]byte{10, 0, 0, 1}))
	}); n > 1 { // ipv4Frame's own
		t.Fatalf("learn allocates (%v allocations a call)", n)
	}
}

// lockedPort records what is written to it; reading blocks until closed.
type lockedPort struct {
	mu     sync.Mutex
	wrote  [][]byte
	closed chan struct{}
}

func (p *lockedPort) Read([]byte) (int, error) { <-p.closed; return 0, net.ErrClosed }
func (p *lockedPort) Write(f []byte) (int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.wrote = append(p.wrote, append([]byte(nil), f...))
	return len(f), nil
}
func (p *lockedPort) Close() error { return nil }

// At a takeover the announcement rounds carry, after the RARP frame, a
// gratuitous ARP for each address the guest sent from; without a
// takeover (a primary attaching at start) nothing is announced.
func TestTakeoverAnnouncesLearnedAddresses(t *testing.T) {
	for _, takeover := range []bool{true, false} {
		port := &lockedPort{closed: make(chan struct{})}
		r := New(Options{Node: ft.Config{Role: ft.RolePrimary, Guest: ft.Identity{MemSize: simMemSize}},
			NICs: []NIC{{MAC: simMAC, Open: func() (FramePort, error) { return port, nil }}}})
		r.mu.Lock()
		r.net.addrs[0].learn(arpFrame(2, [4]byte{10, 0, 2, 15}))
		r.net.addrs[0].learn(ipv4Frame([4]byte{10, 0, 3, 15}))
		r.startNets(takeover)
		r.mu.Unlock()
		<-r.net.netAttached
		want := 0
		if takeover {
			want = 3 * announceRounds
			for deadline := time.Now().Add(time.Minute); r.NetStats().Announced < uint64(want); {
				if time.Now().After(deadline) {
					t.Fatalf("%d announcement frames sent, want %d", r.NetStats().Announced, want)
				}
				time.Sleep(time.Millisecond)
			}
		}
		r.Close()
		close(port.closed)
		port.mu.Lock()
		wrote := port.wrote
		port.mu.Unlock()
		if len(wrote) != want {
			t.Fatalf("takeover %v: %d frames written, want %d", takeover, len(wrote), want)
		}
		for i := 0; i < len(wrote); i += 3 {
			round := [][]byte{RARPAnnouncement(simMAC), GratuitousARP(simMAC, [4]byte{10, 0, 2, 15}), GratuitousARP(simMAC, [4]byte{10, 0, 3, 15})}
			for j, f := range round {
				if !bytes.Equal(wrote[i+j], f) {
					t.Fatalf("round %d, frame %d: % x, want % x", i/3+1, j, wrote[i+j], f)
				}
			}
		}
	}
}
