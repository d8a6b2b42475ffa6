package devices

import (
	"encoding/binary"
	"fmt"
	"io"
	"net"
)

// virtio-net (virtio 1.2 §5.1): one receive queue (receiveq1, index 0) and
// one transmit queue (transmitq1, index 1), the MAC address in the
// configuration space (VIRTIO_NET_F_MAC), and no offloads: no checksum,
// segmentation or merged receive buffers are offered, so every frame is a
// whole Ethernet frame behind a 12-byte struct virtio_net_hdr (num_buffers
// included, since VIRTIO_F_VERSION_1 is always negotiated, §5.1.6).
//
// Transmit is served inside the guest's QueueNotify, on the vCPU thread:
// each chain is one frame, written to the device's output (Tx) at that
// guest-defined moment. Tx is the machine's output path for the frame; a
// replica puts its own writer there to hold frames (output commit).
//
// Receive is driven by the environment: Receive hands the device one frame
// at a delivery point (vmm.Target.ReceiveFrame), never from another
// goroutine. A frame waits in a fixed queue of NetRxPending frames until
// the driver has a receive chain for it; beyond that it is dropped and
// counted, so a guest that never posts buffers cannot make memory grow.

// Device ID (§5) and feature bits (§5.1.3).
const (
	VIRTIO_ID_NET = 1

	VIRTIO_NET_F_MAC = 5
)

const (
	// VirtioNetHdrSize is struct virtio_net_hdr with num_buffers
	// (§5.1.6): flags, gso_type, hdr_len, gso_size, csum_start,
	// csum_offset, num_buffers.
	VirtioNetHdrSize = 12
	// NetMinFrame is the shortest frame: an Ethernet header.
	NetMinFrame = 14
	// NetMaxFrame is the longest frame: 1500 bytes of payload, the
	// Ethernet header and a VLAN tag (the host side's limit too).
	NetMaxFrame = 1500 + 14 + 4
	// NetRxPending bounds the received frames waiting for a receive
	// chain.
	NetRxPending = 64

	netQueueSize  = 256
	netConfigSize = 6 // mac (§5.1.4); status and the rest need features not offered
	netRxQueue    = 0
	netTxQueue    = 1
)

// NetCounters are a virtio-net device's counters (diagnostics).
type NetCounters struct {
	TxFrames, TxBytes uint64
	// TxBadLength counts transmit chains whose frame was shorter than
	// NetMinFrame or longer than NetMaxFrame: dropped, never sent.
	TxBadLength uint64
	// TxErrors counts frames the output refused.
	TxErrors uint64

	RxFrames, RxBytes uint64
	// RxBadLength counts received frames outside [NetMinFrame,
	// NetMaxFrame]: dropped.
	RxBadLength uint64
	// RxOverflow counts frames dropped because NetRxPending frames were
	// already waiting for receive buffers.
	RxOverflow uint64
	// RxTooSmall counts frames dropped because the receive chain the
	// driver offered could not hold the header and the frame.
	RxTooSmall uint64
	// RxReset counts waiting frames discarded by a device reset.
	RxReset uint64
}

// Net is a virtio-net device.
type Net struct {
	mac net.HardwareAddr
	tx  io.Writer // one Write per frame

	bufs          []Desc               // chain buffer, capacity netQueueSize
	frame         [NetMaxFrame]byte    // a transmit frame being gathered
	rx            [NetRxPending][]byte // ring of waiting frames, each backed by rxMem
	rxMem         [NetRxPending][NetMaxFrame]byte
	rxHead, rxLen int

	unhandled uint64
	NetCounters
}

// NewNet returns a virtio-net device with address mac (6 bytes) whose
// transmitted frames go to tx, one Write per frame.
func NewNet(mac net.HardwareAddr, tx io.Writer) *Net {
	return &Net{mac: append(net.HardwareAddr(nil), mac...), tx: tx, bufs: make([]Desc, 0, netQueueSize)}
}

// SetMAC changes the device's address: for a machine restoring a captured
// device, which takes the captured address with its state.
func (n *Net) SetMAC(mac net.HardwareAddr) { n.mac = append(n.mac[:0], mac...) }

// MAC is the device's address.
func (n *Net) MAC() net.HardwareAddr { return n.mac }

// DeviceID implements VirtioDevice.
func (n *Net) DeviceID() uint32 { return VIRTIO_ID_NET }

// Features implements VirtioDevice.
func (n *Net) Features() uint64 {
	return 1<<VIRTIO_NET_F_MAC | 1<<VIRTIO_RING_F_INDIRECT_DESC
}

// QueueMax implements VirtioDevice: receiveq1 and transmitq1.
func (n *Net) QueueMax() []uint16 { return []uint16{netQueueSize, netQueueSize} }

// Unhandled implements VirtioDevice.
func (n *Net) Unhandled() uint64 { return n.unhandled }

// Reset implements VirtioDevice: frames waiting for the old driver's
// buffers are discarded (and counted).
func (n *Net) Reset() {
	n.RxReset += uint64(n.rxLen)
	n.rxHead, n.rxLen = 0, 0
}

// Pending is the number of received frames waiting for receive chains.
func (n *Net) Pending() int { return n.rxLen }

// ReadConfig implements VirtioDevice: struct virtio_net_config's mac
// (§5.1.4). Bytes past it read 0 and count as unhandled.
func (n *Net) ReadConfig(offset uint64, data []byte) {
	for i := range data {
		o := offset + uint64(i)
		if o < netConfigSize && int(o) < len(n.mac) {
			data[i] = n.mac[o]
		} else {
			data[i] = 0
			n.unhandled++
		}
	}
}

// WriteConfig implements VirtioDevice: the driver must not write the mac
// (§5.1.4.1, VIRTIO_NET_F_CTRL_MAC_ADDR is not offered).
func (n *Net) WriteConfig(offset uint64, data []byte) { n.unhandled++ }

// Notify implements VirtioDevice: on transmitq1, send every available
// frame; on receiveq1 (new buffers), place waiting frames.
func (n *Net) Notify(index int, q *Queue, mem GuestMemory) (bool, error) {
	switch index {
	case netTxQueue:
		return n.transmit(q, mem)
	case netRxQueue:
		return n.fill(q, mem)
	}
	n.unhandled++
	return false, nil
}

// transmit sends every available transmit chain.
func (n *Net) transmit(q *Queue, mem GuestMemory) (bool, error) {
	cnt, err := q.Pending(mem)
	if err != nil {
		return false, err
	}
	for range cnt {
		head, chain, err := q.Pop(mem, n.bufs)
		if err != nil {
			return false, err
		}
		if frame, ok := n.decodeTx(mem.Bytes(), chain); ok {
			if _, err := n.tx.Write(frame); err != nil {
				n.TxErrors++
			} else {
				n.TxFrames++
				n.TxBytes += uint64(len(frame))
			}
		}
		// Nothing is written to a transmit chain (§5.1.6.2).
		q.PushUsed(mem, head, 0)
	}
	return cnt > 0, nil
}

// decodeTx gathers the frame of one transmit chain into n.frame: the
// device-readable bytes after the header; device-writable buffers carry
// nothing for the device and are ignored. The header's fields ask for
// offloads that were not negotiated and are ignored (§5.1.6.2: flags and
// gso_type are 0 without them). A frame outside [NetMinFrame,
// NetMaxFrame] is counted and not returned.
func (n *Net) decodeTx(g []byte, chain []Desc) ([]byte, bool) {
	var total uint64
	for _, d := range chain {
		if !d.Write {
			total += uint64(d.Len)
		}
	}
	if total < VirtioNetHdrSize+NetMinFrame || total-VirtioNetHdrSize > NetMaxFrame {
		n.TxBadLength++
		return nil, false
	}
	skip, w := uint64(VirtioNetHdrSize), 0
	for _, d := range chain {
		if d.Write {
			continue
		}
		b := g[d.Addr : d.Addr+uint64(d.Len)] // ReadChain checked the bounds
		if s := min(skip, uint64(len(b))); s > 0 {
			b, skip = b[s:], skip-s
		}
		w += copy(n.frame[w:], b)
	}
	return n.frame[:w], true
}

// Receive takes one frame arriving from the network. It waits for a
// receive chain (at most NetRxPending frames wait; more are dropped and
// counted); call Fill on the receive queue afterwards to place it.
func (n *Net) Receive(frame []byte) {
	switch {
	case len(frame) < NetMinFrame || len(frame) > NetMaxFrame:
		n.RxBadLength++
	case n.rxLen == NetRxPending:
		n.RxOverflow++
	default:
		i := (n.rxHead + n.rxLen) % NetRxPending
		n.rx[i] = n.rxMem[i][:copy(n.rxMem[i][:], frame)]
		n.rxLen++
	}
}

// fill places waiting frames into available receive chains, one frame per
// chain (no VIRTIO_NET_F_MRG_RXBUF, §5.1.6.3.1: each buffer must hold the
// header and a whole frame). For a chain too small for the header and the
// frame, the frame is dropped and counted and the chain stays available
// for the next one: a frame is never truncated.
func (n *Net) fill(q *Queue, mem GuestMemory) (bool, error) {
	used := false
	for n.rxLen > 0 {
		cnt, err := q.Pending(mem)
		if err != nil {
			return used, err
		}
		if cnt == 0 {
			return used, nil
		}
		frame := n.rx[n.rxHead]
		// Peek at the chain before taking it.
		last := q.LastAvail
		head, chain, err := q.Pop(mem, n.bufs)
		if err != nil {
			return used, err
		}
		n.rxHead = (n.rxHead + 1) % NetRxPending
		n.rxLen--
		var room uint64
		for _, d := range chain {
			if d.Write {
				room += uint64(d.Len)
			}
		}
		if room < VirtioNetHdrSize+uint64(len(frame)) {
			n.RxTooSmall++
			q.LastAvail = last // the chain stays available for a smaller frame
			continue
		}
		n.writeRx(mem, chain, frame)
		q.PushUsed(mem, head, uint32(VirtioNetHdrSize+len(frame)))
		n.RxFrames++
		n.RxBytes += uint64(len(frame))
		used = true
	}
	return used, nil
}

// writeRx writes the header and frame into the chain's device-writable
// buffers, marking what it wrote dirty. The header is all zero (no
// offloads: flags 0, gso_type VIRTIO_NET_HDR_GSO_NONE) but for
// num_buffers, which is 1 without VIRTIO_NET_F_MRG_RXBUF (§5.1.6.4).
func (n *Net) writeRx(mem GuestMemory, chain []Desc, frame []byte) {
	var hdr [VirtioNetHdrSize]byte
	binary.LittleEndian.PutUint16(hdr[10:], 1)
	g := mem.Bytes()
	src := [2][]byte{hdr[:], frame}
	part := 0
	for _, d := range chain {
		if !d.Write {
			continue
		}
		dst := g[d.Addr : d.Addr+uint64(d.Len)]
		off := 0
		for off < len(dst) && part < len(src) {
			c := copy(dst[off:], src[part])
			src[part] = src[part][c:]
			off += c
			if len(src[part]) == 0 {
				part++
			}
		}
		if off > 0 {
			mem.MarkDirty(d.Addr, uint64(off))
		}
		if part == len(src) {
			return
		}
	}
}

// NetState is a virtio-net device's own state (its transport's is
// separate, MMIOTransportState): the received frames waiting for receive
// chains, oldest first. They were delivered to the device at points of
// the guest's execution, so a snapshot, checkpoint or migration must carry
// them: the guest takes them when it next posts buffers. The counters are
// the host's diagnostics and stay with each device.
type NetState struct {
	Pending [][]byte
}

// State returns the device's state. The frames are copies.
func (n *Net) State() NetState {
	var s NetState
	for i := range n.rxLen {
		s.Pending = append(s.Pending, append([]byte(nil), n.rx[(n.rxHead+i)%NetRxPending]...))
	}
	return s
}

// SetState replaces the frames waiting for receive chains. At most
// NetRxPending frames, each of NetMinFrame to NetMaxFrame bytes.
func (n *Net) SetState(s NetState) error {
	if len(s.Pending) > NetRxPending {
		return fmt.Errorf("virtio-net state: %d waiting frames, at most %d", len(s.Pending), NetRxPending)
	}
	for i, f := range s.Pending {
		if len(f) < NetMinFrame || len(f) > NetMaxFrame {
			return fmt.Errorf("virtio-net state: waiting frame %d has %d bytes (%d to %d)", i, len(f), NetMinFrame, NetMaxFrame)
		}
	}
	n.rxHead, n.rxLen = 0, len(s.Pending)
	for i, f := range s.Pending {
		n.rx[i] = n.rxMem[i][:copy(n.rxMem[i][:], f)]
	}
	return nil
}
