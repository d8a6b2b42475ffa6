package vmm

import (
	"crypto/sha256"
	"fmt"
	"io"
	"net"
	"slices"
	"strings"

	"github.com/ftkvm/ftkvm/devices"
	"github.com/ftkvm/ftkvm/devices/tap"
	"github.com/ftkvm/ftkvm/vmm/snapshot"
)

// Network interfaces: virtio-net devices (devices/virtio_net.go) in the
// virtio-mmio windows after the disks (virtio.go, docs/DEVICES.md).
//
// A frame reaches the guest only through the environment
// (Target.ReceiveFrame, at a delivery point), like a byte on the UART: the
// host side (a tap) feeds the environment, never the device. A frame the
// guest transmits is output: it goes to NIC.Tx inside the guest's queue
// notification, as the UART's bytes go to Config.Console. A replica holds
// output by giving its own writers there.

// NIC is a virtio-net device's configuration.
type NIC struct {
	// MAC is the interface's address; nil derives one from the guest
	// (kernel, initrd and command line) and the interface's position,
	// identical on every replica of that guest (tap.DefaultMAC).
	MAC net.HardwareAddr
	// Tx receives the frames the guest transmits, one Write per frame
	// (14 to devices.NetMaxFrame bytes). A Write error counts the frame
	// as a transmit error; the guest does not see it (as on a wire).
	Tx io.Writer
}

// NICError is a network interface configuration that cannot be used.
type NICError struct{ Err error }

func (e *NICError) Error() string { return e.Err.Error() }
func (e *NICError) Unwrap() error { return e.Err }

// macSeed identifies the guest for default MAC addresses.
func macSeed(cfg Config) []byte {
	k, i := sha256.Sum256(cfg.Kernel), sha256.Sum256(cfg.Initrd)
	return append(append(k[:], i[:]...), cfg.Cmdline...)
}

// NICAddrs returns the MAC addresses the machine cfg describes gives its
// network interfaces, in order: those given, or those derived from the
// guest (what the replicas' handshake compares, before either machine
// exists).
func NICAddrs(cfg Config) []net.HardwareAddr {
	var out []net.HardwareAddr
	var seed []byte
	for i, c := range cfg.NICs {
		mac := c.MAC
		if mac == nil {
			if seed == nil {
				seed = macSeed(cfg)
			}
			mac = tap.DefaultMAC(seed, i)
		}
		out = append(out, mac)
	}
	return out
}

// wireNICs puts a virtio-net device for each NIC in the windows after the
// disks'. wireVirtio has checked that there are lines for all.
func (m *Machine) wireNICs(cfg Config) error {
	macs := NICAddrs(cfg)
	for i, c := range cfg.NICs {
		mac := macs[i]
		adopt := cfg.empty && c.MAC == nil
		if adopt {
			mac = net.HardwareAddr{0x02, 0, 0, 0, 0, 0} // until Install sets the captured one
		}
		if len(mac) != 6 || mac[0]&1 != 0 {
			return &NICError{fmt.Errorf("network interface %d: MAC %s is not a 6-byte unicast address", i, mac)}
		}
		if c.Tx == nil {
			c.Tx = io.Discard
		}
		n := len(m.virtio)
		v := &virtioDev{base: virtioMMIOBase + uint64(n)*devices.VirtioMMIOWindow, irq: virtioIRQs[n], net: devices.NewNet(mac, c.Tx), adoptMAC: adopt}
		v.t = devices.NewMMIOTransport(v.net, guestMemory{m}, m.pic, v.irq)
		m.virtio = append(m.virtio, v)
		m.nics = append(m.nics, v)
		if err := m.mmio.Register(v.base, devices.VirtioMMIOWindow, fmt.Sprintf("virtio-net%d", i), v.t); err != nil {
			return fmt.Errorf("wire network interface %d: %w", i, err)
		}
	}
	return nil
}

// ReceiveFrame delivers a frame arriving on network interface nic
// (Target): the device takes it and places it in a receive chain if the
// driver has one available, interrupting the guest.
func (m *Machine) ReceiveFrame(nic int, frame []byte) {
	if nic < 0 || nic >= len(m.nics) {
		return
	}
	v := m.nics[nic]
	v.net.Receive(frame)
	v.t.Service(0) // receiveq1
	m.point.Delivered = true
}

// NICs is the number of network interfaces.
func (m *Machine) NICs() int { return len(m.nics) }

// NICStats is one network interface's counters (diagnostics).
type NICStats struct {
	MAC string
	devices.NetCounters
	// Pending is the frames waiting for receive buffers.
	Pending                 int
	DeviceErrors, Unhandled uint64
}

// NICStats returns the network interfaces' counters. Call it when Run has
// returned or on the vCPU thread.
func (m *Machine) NICStats() []NICStats {
	var out []NICStats
	for _, v := range m.nics {
		out = append(out, NICStats{
			MAC: v.net.MAC().String(), NetCounters: v.net.NetCounters, Pending: v.net.Pending(),
			DeviceErrors: v.t.Errors(), Unhandled: v.t.Unhandled(),
		})
	}
	return out
}

// NICMismatchError is a state installed into a machine whose network
// interfaces differ from those of the machine it was captured from (count
// or address): the guest's driver knows the captured ones.
type NICMismatchError struct{ Msg string }

func (e *NICMismatchError) Error() string { return e.Msg }

// CheckNICs compares the machine's network interfaces with those a state
// recorded: the same number, with the same addresses, in order.
// Interfaces of a machine from NewEmpty given no MAC match any address.
func (m *Machine) CheckNICs(want []snapshot.NIC) error {
	var have, rec []string
	for i, v := range m.nics {
		if v.adoptMAC && i < len(want) {
			have = append(have, net.HardwareAddr(want[i].MAC[:]).String())
			continue
		}
		have = append(have, v.net.MAC().String())
	}
	for _, n := range want {
		rec = append(rec, net.HardwareAddr(n.MAC[:]).String())
	}
	if slices.Equal(have, rec) {
		return nil
	}
	list := func(l []string) string {
		switch len(l) {
		case 0:
			return "no network interfaces"
		case 1:
			return "1 network interface (" + l[0] + ")"
		}
		return fmt.Sprintf("%d network interfaces (%s)", len(l), strings.Join(l, ", "))
	}
	return &NICMismatchError{fmt.Sprintf("the guest was captured with %s; this machine was given %s (pass as many --net, in order, with the captured addresses: mac=)",
		list(rec), list(have))}
}

// NICMACs returns the network interfaces' addresses, in order (what the
// replicas' handshake compares).
func (m *Machine) NICMACs() []net.HardwareAddr {
	var out []net.HardwareAddr
	for _, v := range m.nics {
		out = append(out, v.net.MAC())
	}
	return out
}
