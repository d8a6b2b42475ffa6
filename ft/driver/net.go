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
// that switches learn the guest's new port, then performs the uncertain
// frames (duplicates allowed).
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
	Announced  uint64 // RARP announcements sent after a takeover
	OpenErrors uint64 // host sides that could not be attached
}

// netState is the replica's part for its network interfaces.
type netState struct {
	started     bool // attachNets was started (r.mu)
	ports       []FramePort
	netAttached chan struct{} // closed once attachNets has tried every port
	txBuf       []byte        // a KindNetTx output being built (vCPU thread)

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
	r.mu.Unlock()
	for i, p := range ports {
		if p == nil {
			continue
		}
		if announce {
			frame := RARPAnnouncement(r.opts.NICs[i].MAC)
			r.sendAnnouncement(i, p, frame)
			go r.announceRounds(i, p, frame)
		}
		go r.readFrames(i, p)
	}
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

func (r *Replica) announceRounds(nic int, p FramePort, frame []byte) {
	for k := 1; k < announceRounds; k++ {
		select {
		case <-time.After(min(announceInitial+time.Duration(k-1)*announceStep, announceMax)):
		case <-r.done:
			return
		}
		r.sendAnnouncement(nic, p, frame)
	}
}

func (r *Replica) sendAnnouncement(nic int, p FramePort, frame []byte) {
	if _, err := p.Write(frame); err != nil {
		r.net.txErrors.Add(1)
		r.log.Warnf("replica: network interface %d: announcing the guest's address: %v", nic, err)
		return
	}
	r.net.announced.Add(1)
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
