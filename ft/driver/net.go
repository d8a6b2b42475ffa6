package driver

// Network interfaces: frames received on the host side are asynchronous
// events of the node (wire.KindNetRx, P1), delivered at epoch ends into the
// machine (Target.ReceiveFrame); frames the guest transmits are outputs
// (wire.KindNetTx) that the performer writes to the host side once the
// policy releases them (ft/doc.go, "Output policies").
//
// The host sides are attached only where the replica acts for the guest:
// the primary when its guest starts, a backup when it takes over
// (NoteTakeover; P4: while a backup it neither reads nor writes its own).
// A promoted backup first announces the guest's MAC addresses as QEMU does
// after a migration (RARP frames, a few rounds with a growing pause), so
// that switches learn the guest's new port, and with them a gratuitous
// ARP for each IPv4 address the guest was seen sending from (learned from
// the frames it transmits, on either replica: at most maxGuestIPv4 per
// interface), so that hosts whose ARP caches hold the address learn it
// again; then it performs the uncertain frames (duplicates allowed).
//
// Locking: the readers take r.mu to post a frame. attachNets opens the
// host sides without it and publishes them under it; netAttached is
// closed after that, so the performer reads r.net.ports without the lock.

import (
	"errors"
	"fmt"
	"io"
	"net"
	"sync/atomic"
	"time"

	"github.com/ftkvm/ftkvm/devices"
	"github.com/ftkvm/ftkvm/ft"
	"github.com/ftkvm/ftkvm/ft/wire"
)

// FramePort is a network interface's host side: each Read returns one
// frame and each Write sends one (a tap device does).
type FramePort interface {
	Read(frame []byte) (int, error)
	Write(frame []byte) (int, error)
}

// NIC is one of the guest's network interfaces, as the replica serves it.
type NIC struct {
	// MAC is the guest's address on it, announced at a takeover.
	MAC net.HardwareAddr
	// Open attaches the host side (a tap): on the primary when its guest
	// starts, on a backup when it takes over. A port that implements
	// io.Closer is closed with the replica.
	Open func() (FramePort, error)
}

// NetStats counts what the replica's network interfaces did (all
// interfaces together); the node counts the frames it dropped
// (ft.Status.FramesDropped).
type NetStats struct {
	RxFrames   uint64 // frames read from the host sides and posted to the node
	RxBad      uint64 // frames read outside [devices.NetMinFrame, devices.NetMaxFrame]: dropped
	RxErrors   uint64 // host sides whose reading failed (gone): no more frames from them
	TxFrames   uint64 // frames written to the host sides
	TxErrors   uint64 // frames a host side refused, or for an interface not attached
	Announced  uint64 // announcement frames (RARP, gratuitous ARP) sent after a takeover
	OpenErrors uint64 // host sides that could not be attached
}

// netState is the replica's part for its network interfaces.
type netState struct {
	started     bool // attachNets was started (r.mu)
	ports       []FramePort
	netAttached chan struct{} // closed once attachNets has tried every port
	txBuf       []byte        // a KindNetTx output being built (vCPU thread)
	addrs       []guestIPv4   // per interface, the guest's sender addresses (r.mu)

	rxFrames, rxBad, rxErrors     atomic.Uint64
	txFrames, txErrors, announced atomic.Uint64
	openErrors                    atomic.Uint64
}

// NetStats returns the network interfaces' counters.
func (r *Replica) NetStats() NetStats {
	n := &r.net
	return NetStats{
		RxFrames: n.rxFrames.Load(), RxBad: n.rxBad.Load(), RxErrors: n.rxErrors.Load(),
		TxFrames: n.txFrames.Load(), TxErrors: n.txErrors.Load(), Announced: n.announced.Load(),
		OpenErrors: n.openErrors.Load(),
	}
}

// NetTx is the writer to give the machine as network interface nic's
// transmit side (vmm.NIC.Tx): every frame becomes an output of the node,
// performed when the policy allows. vCPU thread only.
func (r *Replica) NetTx(nic int) io.Writer { return netTx{r, nic} }

type netTx struct {
	r   *Replica
	nic int
}

func (t netTx) Write(p []byte) (int, error) {
	r := t.r
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.finished || r.fatal != nil || r.quit.Load() {
		return len(p), nil
	}
	if t.nic < len(r.net.addrs) {
		r.net.addrs[t.nic].learn(p)
	}
	r.net.txBuf = wire.NetTxData(r.net.txBuf, t.nic, p) // the node copies what it keeps
	a := r.node.Output(r.handling(), wire.KindNetTx, r.net.txBuf)
	if _, err := r.carry(a, false); err != nil && !errors.Is(err, errFinished) {
		r.setFatal(err)
	}
	return len(p), nil
}

// startNets attaches the host sides once, in the background: on the
// primary at Start, on a backup at its takeover (announce). mu is held.
func (r *Replica) startNets(announce bool) {
	if r.net.started || len(r.opts.NICs) == 0 {
		return
	}
	r.net.started = true
	go r.attachNets(announce)
}

// attachNets opens each host side, announces the guest's addresses after
// a takeover, and starts a reader for each. Then the performer may write.
func (r *Replica) attachNets(announce bool) {
	defer close(r.net.netAttached)
	ports := make([]FramePort, len(r.opts.NICs))
	for i, nic := range r.opts.NICs {
		p, err := nic.Open()
		if err != nil {
			r.net.openErrors.Add(1)
			r.log.Errorf("replica: network interface %d: %v; the guest's frames on it are lost", i, err)
			continue
		}
		ports[i] = p
	}
	r.mu.Lock()
	select {
	case <-r.done:
		r.mu.Unlock()
		closePorts(ports)
		return
	default:
	}
	r.net.ports = ports
	addrs := append([]guestIPv4(nil), r.net.addrs...)
	r.mu.Unlock()
	for i, p := range ports {
		if p == nil {
			continue
		}
		if announce {
			mac := r.opts.NICs[i].MAC
			frames := [][]byte{RARPAnnouncement(mac)}
			if i < len(addrs) {
				for _, ip := range addrs[i].a[:addrs[i].n] {
					frames = append(frames, GratuitousARP(mac, ip))
				}
			}
			r.sendAnnouncement(i, p, frames)
			go r.announceRounds(i, p, frames)
		}
		go r.readFrames(i, p)
	}
}

// maxGuestIPv4 bounds the addresses announced per interface: a guest
// that sends from more has the first ones announced.
const maxGuestIPv4 = 4

// guestIPv4 is the IPv4 addresses a guest sent from on one interface.
type guestIPv4 struct {
	n int
	a [maxGuestIPv4][4]byte
}

// learn notes the sender protocol address of an ARP request or reply
// (RFC 826) or the source of an IPv4 packet (RFC 791) in a frame the guest
// transmits: a unicast address not seen before, while there is room. It
// allocates nothing (the vCPU thread calls it for every frame).
func (g *guestIPv4) learn(f []byte) {
	if len(f) < 14 {
		return
	}
	var ip []byte
	switch {
	case f[12] == 0x08 && f[13] == 0x06 && len(f) >= 42:
		// Ethernet/IPv4 ARP with 6- and 4-byte addresses.
		if f[14] != 0 || f[15] != 1 || f[16] != 0x08 || f[17] != 0 || f[18] != 6 || f[19] != 4 {
			return
		}
		ip = f[28:32]
	case f[12] == 0x08 && f[13] == 0x00 && len(f) >= 34 && f[14]>>4 == 4:
		ip = f[26:30]
	default:
		return
	}
	// Not 0.0.0.0/8 (this network: an address being probed), loopback,
	// multicast, or broadcast.
	if ip[0] == 0 || ip[0] == 127 || ip[0] >= 224 {
		return
	}
	for _, a := range g.a[:g.n] {
		if [4]byte(ip) == a {
			return
		}
	}
	if g.n < maxGuestIPv4 {
		g.a[g.n] = [4]byte(ip)
		g.n++
	}
}

// GratuitousARP is an ARP announcement (RFC 5227 §2.3) of ip at mac: a
// broadcast ARP request whose sender and target protocol addresses are
// both ip, padded to the 60-byte Ethernet minimum. Hosts that hold ip in
// their ARP caches update its entry.
func GratuitousARP(mac net.HardwareAddr, ip [4]byte) []byte {
	f := make([]byte, 60)
	copy(f[0:6], []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff})
	copy(f[6:12], mac)
	f[12], f[13] = 0x08, 0x06 // ETH_P_ARP
	f[14], f[15] = 0x00, 0x01 // hardware: Ethernet
	f[16], f[17] = 0x08, 0x00 // protocol: IPv4
	f[18], f[19] = 6, 4       // address lengths
	f[20], f[21] = 0x00, 0x01 // request
	copy(f[22:28], mac)       // sender hardware address
	copy(f[28:32], ip[:])     // sender protocol address
	// target hardware address zero (RFC 5227: ignored)
	copy(f[38:42], ip[:]) // target protocol address
	return f
}

// Announcement rounds, as QEMU's defaults (announce-initial 50 ms,
// announce-max 550 ms, announce-rounds 5, announce-step 100 ms): the
// first at once, each later one after a pause 100 ms longer.
const (
	announceRounds  = 5
	announceInitial = 50 * time.Millisecond
	announceStep    = 100 * time.Millisecond
	announceMax     = 550 * time.Millisecond
)

func (r *Replica) announceRounds(nic int, p FramePort, frames [][]byte) {
	for k := 1; k < announceRounds; k++ {
		select {
		case <-time.After(min(announceInitial+time.Duration(k-1)*announceStep, announceMax)):
		case <-r.done:
			return
		}
		r.sendAnnouncement(nic, p, frames)
	}
}

// sendAnnouncement sends one round: the RARP frame, then the gratuitous
// ARPs.
func (r *Replica) sendAnnouncement(nic int, p FramePort, frames [][]byte) {
	for _, f := range frames {
		if _, err := p.Write(f); err != nil {
			r.net.txErrors.Add(1)
			r.log.Warnf("replica: network interface %d: announcing the guest's address: %v", nic, err)
			return
		}
		r.net.announced.Add(1)
	}
}

// RARPAnnouncement is the frame QEMU sends for a guest's MAC address after
// a migration (its announce_self_create): a broadcast reverse-ARP request
// (RFC 903) from and about mac, with no protocol addresses, padded to the
// 60-byte Ethernet minimum. Switches learn the address's new port from it.
func RARPAnnouncement(mac net.HardwareAddr) []byte {
	f := make([]byte, 60)
	copy(f[0:6], []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff})
	copy(f[6:12], mac)
	f[12], f[13] = 0x80, 0x35 // ETH_P_RARP
	f[14], f[15] = 0x00, 0x01 // hardware: Ethernet
	f[16], f[17] = 0x08, 0x00 // protocol: IPv4
	f[18], f[19] = 6, 4       // address lengths
	f[20], f[21] = 0x00, 0x03 // reverse request
	copy(f[22:28], mac)       // sender hardware address; sender IP 0
	copy(f[32:38], mac)       // target hardware address; target IP 0
	return f
}

// readFrames posts the frames of one host side to the node (P1; the node
// bounds what waits for an epoch end). A frame of a wrong length is
// counted and dropped; a failed read (the tap vanished) ends the reader,
// loudly.
func (r *Replica) readFrames(nic int, p FramePort) {
	buf := make([]byte, devices.NetMaxFrame+1) // one more: an oversized frame shows as such
	for {
		n, err := p.Read(buf)
		select {
		case <-r.done:
			return
		default:
		}
		if err != nil {
			r.net.rxErrors.Add(1)
			r.log.Errorf("replica: network interface %d: %v; no more frames reach the guest from it", nic, err)
			return
		}
		if n < devices.NetMinFrame || n > devices.NetMaxFrame {
			r.net.rxBad.Add(1)
			continue
		}
		r.net.rxFrames.Add(1)
		r.mu.Lock()
		r.node.Async(ft.Event{Kind: wire.KindNetRx, Value: uint64(nic), Data: buf[:n]}) // copied by the node
		r.drain()
		r.mu.Unlock()
	}
}

// transmit writes a released KindNetTx output to its host side. Performer
// only.
func (r *Replica) transmit(o ft.Out) {
	nic, frame, ok := wire.NetTxFrame(o.Data)
	if !ok || nic >= len(r.opts.NICs) {
		r.net.txErrors.Add(1)
		return
	}
	select {
	case <-r.net.netAttached:
	case <-r.done:
		return
	}
	if nic >= len(r.net.ports) || r.net.ports[nic] == nil {
		r.net.txErrors.Add(1)
		return
	}
	if _, err := r.net.ports[nic].Write(frame); err != nil {
		r.net.txErrors.Add(1)
		return
	}
	r.net.txFrames.Add(1)
}

func closePorts(ports []FramePort) {
	for _, p := range ports {
		if c, ok := p.(io.Closer); ok {
			c.Close()
		}
	}
}

func (s NetStats) String() string {
	return fmt.Sprintf("%d frames received (%d bad, %d read failures), %d sent (%d errors), %d announcements, %d interfaces not attached",
		s.RxFrames, s.RxBad, s.RxErrors, s.TxFrames, s.TxErrors, s.Announced, s.OpenErrors)
}
