package tap

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"net"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
)

// requireTun skips where tap devices cannot be made (not root, no tun).
func requireTun(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("tap devices need root")
	}
	if _, err := os.Stat(tunDevice); err != nil {
		t.Skipf("no %s: %v", tunDevice, err)
	}
}

func testName(t *testing.T, n int) string {
	return fmt.Sprintf("ftkt%d_%d", os.Getpid()%100000, n)
}

// A tap is created, brought up, and carries frames both ways: the host
// kernel's ARP request for an address on the tap's subnet is read from it,
// and a UDP datagram written to it reaches a host socket.
func TestTapFrames(t *testing.T) {
	requireTun(t)
	name := testName(t, 1)
	tp, err := Open(name)
	if err != nil {
		t.Fatal(err)
	}
	defer tp.Close()
	if !tp.Created() {
		t.Fatal("a new name was not created")
	}
	l, err := netlink.LinkByName(name)
	if err != nil {
		t.Fatal(err)
	}
	if l.Attrs().Flags&net.FlagUp == 0 {
		t.Fatalf("%s is not up: %v", name, l.Attrs().Flags)
	}
	host := net.IPv4(10, 213, 77, 1)
	guest := net.IPv4(10, 213, 77, 2)
	if err := netlink.AddrAdd(l, &netlink.Addr{IPNet: &net.IPNet{IP: host, Mask: net.CIDRMask(24, 32)}}); err != nil {
		t.Fatal(err)
	}
	// The host asks who has the guest's address: an ARP request leaves
	// through the tap.
	c, err := net.ListenUDP("udp4", &net.UDPAddr{IP: host})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	go c.WriteToUDP([]byte("ping"), &net.UDPAddr{IP: guest, Port: 9})
	buf := make([]byte, MaxFrame)
	tp.SetReadDeadline(time.Now().Add(10 * time.Second))
	for {
		n, err := tp.Read(buf)
		if err != nil {
			t.Fatalf("no ARP request from the host: %v", err)
		}
		f := buf[:n]
		if n >= 42 && binary.BigEndian.Uint16(f[12:]) == 0x0806 && bytes.Equal(f[38:42], guest.To4()) {
			break // ethertype ARP, target protocol address = the guest's
		}
	}
	// A datagram from the guest's address reaches the host's socket.
	hostMAC := l.Attrs().HardwareAddr
	port := c.LocalAddr().(*net.UDPAddr).Port
	frame := udpFrame(hostMAC, DefaultMAC([]byte("test"), 0), guest, host, 4000, port, []byte("pong"))
	if _, err := tp.Write(frame); err != nil {
		t.Fatal(err)
	}
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	n, from, err := c.ReadFromUDP(buf)
	if err != nil || string(buf[:n]) != "pong" || !from.IP.Equal(guest) {
		t.Fatalf("host read %q from %v: %v", buf[:n], from, err)
	}
	// Frames of impossible sizes are refused before they reach the kernel.
	for _, size := range []int{0, 13, MaxFrame + 1} {
		if _, err := tp.Write(make([]byte, size)); err == nil {
			t.Errorf("a %d-byte frame was written", size)
		}
	}
	tp.Close()
	if _, err := netlink.LinkByName(name); err == nil {
		t.Error("the tap Open created outlived its Close")
	}
}

// Opening fails with one clear error for each reason it can.
func TestTapErrors(t *testing.T) {
	requireTun(t)
	busy := testName(t, 2)
	held, err := Open(busy)
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	for _, tc := range []struct {
		name, dev, want string
	}{
		{"", tunDevice, "a name of 1 to 15 bytes"},
		{"a-name-far-too-long", tunDevice, "a name of 1 to 15 bytes"},
		{"lo", tunDevice, "taken by a device interface"},
		{busy, tunDevice, "another process holds it"},
		{testName(t, 3), "/nonexistent/tun", "load the tun module"},
	} {
		old := tunDevice
		tunDevice = tc.dev
		tp, err := Open(tc.name)
		tunDevice = old
		if err == nil {
			tp.Close()
			t.Errorf("Open(%q) succeeded", tc.name)
			continue
		}
		if !strings.Contains(err.Error(), tc.want) || strings.Contains(err.Error(), "\n") {
			t.Errorf("Open(%q): %v, want one line with %q", tc.name, err, tc.want)
		}
	}
}

func TestDefaultMAC(t *testing.T) {
	a, b := DefaultMAC([]byte("guest"), 0), DefaultMAC([]byte("guest"), 0)
	if a.String() != b.String() {
		t.Fatal("not deterministic")
	}
	if a[0]&1 != 0 || a[0]&2 == 0 {
		t.Fatalf("%v is not a locally administered unicast address", a)
	}
	if DefaultMAC([]byte("guest"), 1).String() == a.String() || DefaultMAC([]byte("other"), 0).String() == a.String() {
		t.Fatal("interfaces or guests share a MAC")
	}
}

// udpFrame builds an Ethernet/IPv4/UDP frame (UDP checksum 0: none).
func udpFrame(dst, src net.HardwareAddr, sip, dip net.IP, sport, dport int, payload []byte) []byte {
	f := make([]byte, 14+20+8+len(payload))
	copy(f[0:], dst)
	copy(f[6:], src)
	binary.BigEndian.PutUint16(f[12:], 0x0800)
	ip := f[14:34]
	ip[0], ip[8], ip[9] = 0x45, 64, 17
	binary.BigEndian.PutUint16(ip[2:], uint16(20+8+len(payload)))
	copy(ip[12:], sip.To4())
	copy(ip[16:], dip.To4())
	var sum uint32
	for i := 0; i < 20; i += 2 {
		sum += uint32(binary.BigEndian.Uint16(ip[i:]))
	}
	for sum > 0xffff {
		sum = sum&0xffff + sum>>16
	}
	binary.BigEndian.PutUint16(ip[10:], ^uint16(sum))
	udp := f[34:42]
	binary.BigEndian.PutUint16(udp[0:], uint16(sport))
	binary.BigEndian.PutUint16(udp[2:], uint16(dport))
	binary.BigEndian.PutUint16(udp[4:], uint16(8+len(payload)))
	copy(f[42:], payload)
	return f
}
