package driver

import (
	"bytes"
	"errors"
	"net"
	"testing"
	"time"

	"github.com/ftkvm/ftkvm/devices"
	"github.com/ftkvm/ftkvm/ft"
	"github.com/ftkvm/ftkvm/ft/wire"
)

// The announcement is QEMU's (announce_self_create): a 60-byte broadcast
// RARP request (RFC 903) from and about the guest's MAC.
func TestRARPAnnouncement(t *testing.T) {
	mac := net.HardwareAddr{0x02, 0x11, 0x22, 0x33, 0x44, 0x55}
	want := []byte{
		0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02, 0x11, 0x22, 0x33, 0x44, 0x55, 0x80, 0x35, // Ethernet, ETH_P_RARP
		0x00, 0x01, 0x08, 0x00, 6, 4, 0x00, 0x03, // Ethernet/IPv4, reverse request
		0x02, 0x11, 0x22, 0x33, 0x44, 0x55, 0, 0, 0, 0, // sender
		0x02, 0x11, 0x22, 0x33, 0x44, 0x55, 0, 0, 0, 0, // target
	}
	want = append(want, make([]byte, 18)...)
	if got := RARPAnnouncement(mac); !bytes.Equal(got, want) {
		t.Fatalf("got  % x\nwant % x", got, want)
	}
}

// scriptedPort returns its frames, then fails (a tap that vanished).
type scriptedPort struct {
	frames [][]byte
	wrote  [][]byte
}

func (p *scriptedPort) Read(b []byte) (int, error) {
	if len(p.frames) == 0 {
		return 0, errors.New("tap gone")
	}
	f := p.frames[0]
	p.frames = p.frames[1:]
	return copy(b, f), nil
}

func (p *scriptedPort) Write(f []byte) (int, error) { p.wrote = append(p.wrote, f); return len(f), nil }

// A primary's reader posts frames of valid length, counts the others
// (truncated, oversized) and ends, counted and logged, when its host side
// fails; the node holds at most MaxPendingFrames for the epoch end.
func TestNetReaderBadInput(t *testing.T) {
	port := &scriptedPort{frames: [][]byte{
		make([]byte, 60), make([]byte, 13), make([]byte, devices.NetMaxFrame+1), make([]byte, devices.NetMaxFrame),
	}}
	for range ft.MaxPendingFrames + 3 {
		port.frames = append(port.frames, make([]byte, 64))
	}
	r := New(Options{Node: ft.Config{Role: ft.RolePrimary, Guest: ft.Identity{MemSize: simMemSize}},
		NICs: []NIC{{MAC: simMAC, Open: func() (FramePort, error) { return port, nil }}}})
	defer r.Close()
	r.mu.Lock()
	r.startNets(false)
	r.mu.Unlock()
	for deadline := time.Now().Add(time.Minute); r.NetStats().RxErrors == 0; {
		if time.Now().After(deadline) {
			t.Fatalf("the reader did not end: %v", r.NetStats())
		}
		time.Sleep(time.Millisecond)
	}
	ns, st := r.NetStats(), r.Status()
	if ns.RxFrames != ft.MaxPendingFrames+5 || ns.RxBad != 2 || ns.RxErrors != 1 || st.FramesDropped != 5 {
		t.Fatalf("stats %v; node dropped %d", ns, st.FramesDropped)
	}
	// A released output for an interface that does not exist, or empty,
	// is counted, not written.
	r.transmit(ft.Out{Kind: wire.KindNetTx, Data: wire.NetTxData(nil, 3, make([]byte, 60))})
	r.transmit(ft.Out{Kind: wire.KindNetTx})
	r.transmit(ft.Out{Kind: wire.KindNetTx, Data: wire.NetTxData(nil, 0, make([]byte, 60))})
	if ns := r.NetStats(); ns.TxErrors != 2 || ns.TxFrames != 1 || len(port.wrote) != 1 {
		t.Fatalf("stats %v, wrote %d", ns, len(port.wrote))
	}
}
