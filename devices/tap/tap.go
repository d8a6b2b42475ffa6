// Package tap is the host side of a guest's network interface: a Linux
// tap device (Documentation/networking/tuntap.rst), opened or created
// through /dev/net/tun and brought up with netlink. Frames are whole
// Ethernet frames without the packet-information header (IFF_NO_PI) and
// without a virtio-net header (no offloads are offered to the guest).
//
// The file descriptor is non-blocking and served by Go's poller, so reads
// honour deadlines and Close wakes a blocked Read.
package tap

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"net"
	"os"
	"time"
	"unsafe"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// MaxFrame is the largest frame a Tap reads or writes: an Ethernet frame
// of the default 1500-byte MTU with its 14-byte header and a VLAN tag.
// Longer frames are refused on write and truncated on read (the kernel
// drops the rest), so a buffer of MaxFrame bytes always suffices.
const MaxFrame = 1500 + 14 + 4

// tunDevice is where tap devices are opened.
var tunDevice = "/dev/net/tun"

// Tap is an open tap device.
type Tap struct {
	name    string
	f       *os.File
	created bool // ftkvm created the interface (it goes when the fd closes)
}

// ifreq is struct ifreq with ifr_flags (linux/if.h).
type ifreq struct {
	name  [unix.IFNAMSIZ]byte
	flags uint16
	_     [22]byte
}

// Open opens the tap device name, creating it if no interface of that
// name exists, and brings it up. It fails with one clear error when it
// cannot: no /dev/net/tun, no permission (CAP_NET_ADMIN), the name taken
// by an interface that is not a tap, or a tap another process holds.
func Open(name string) (*Tap, error) {
	if name == "" || len(name) >= unix.IFNAMSIZ {
		return nil, fmt.Errorf("tap %q: a name of 1 to %d bytes is needed", name, unix.IFNAMSIZ-1)
	}
	created := true
	if l, err := netlink.LinkByName(name); err == nil {
		if _, ok := l.(*netlink.Tuntap); !ok || l.Type() != "tuntap" {
			return nil, fmt.Errorf("tap %s: the name is taken by a %s interface", name, l.Type())
		}
		created = false
	}
	fd, err := unix.Open(tunDevice, unix.O_RDWR|unix.O_CLOEXEC|unix.O_NONBLOCK, 0)
	if err != nil {
		switch {
		case errors.Is(err, unix.ENOENT), errors.Is(err, unix.ENODEV):
			return nil, fmt.Errorf("tap %s: %s: %w (load the tun module)", name, tunDevice, err)
		case errors.Is(err, unix.EACCES), errors.Is(err, unix.EPERM):
			return nil, fmt.Errorf("tap %s: %s: %w (needs root or CAP_NET_ADMIN)", name, tunDevice, err)
		}
		return nil, fmt.Errorf("tap %s: %s: %w", name, tunDevice, err)
	}
	var req ifreq
	copy(req.name[:], name)
	req.flags = unix.IFF_TAP | unix.IFF_NO_PI
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), unix.TUNSETIFF, uintptr(unsafe.Pointer(&req))); errno != 0 {
		unix.Close(fd)
		switch errno {
		case unix.EBUSY:
			return nil, fmt.Errorf("tap %s: TUNSETIFF: %w (another process holds it)", name, errno)
		case unix.EPERM, unix.EACCES:
			return nil, fmt.Errorf("tap %s: TUNSETIFF: %w (needs CAP_NET_ADMIN, or a persistent tap owned by this user)", name, errno)
		case unix.EINVAL:
			return nil, fmt.Errorf("tap %s: TUNSETIFF: %w (the name is taken by a tun device, not a tap)", name, errno)
		}
		return nil, fmt.Errorf("tap %s: TUNSETIFF: %w", name, errno)
	}
	t := &Tap{name: name, f: os.NewFile(uintptr(fd), tunDevice), created: created}
	l, err := netlink.LinkByName(name)
	if err == nil {
		err = netlink.LinkSetUp(l)
	}
	if err != nil {
		t.Close()
		return nil, fmt.Errorf("tap %s: bring it up: %w", name, err)
	}
	return t, nil
}

// Name is the interface's name.
func (t *Tap) Name() string { return t.name }

// Created reports whether Open created the interface (it disappears when
// the Tap is closed) rather than opening an existing persistent one.
func (t *Tap) Created() bool { return t.created }

// Read reads one frame into b (MaxFrame bytes suffice). It blocks until a
// frame arrives, the deadline passes or the Tap is closed.
func (t *Tap) Read(b []byte) (int, error) { return t.f.Read(b) }

// Write sends one frame to the host.
func (t *Tap) Write(frame []byte) (int, error) {
	if len(frame) < 14 || len(frame) > MaxFrame {
		return 0, fmt.Errorf("tap %s: a frame of %d bytes (need 14 to %d)", t.name, len(frame), MaxFrame)
	}
	return t.f.Write(frame)
}

// SetReadDeadline bounds the next Reads (the zero time: no bound).
func (t *Tap) SetReadDeadline(d time.Time) error { return t.f.SetReadDeadline(d) }

// Close closes the device; a tap Open created goes away with it.
func (t *Tap) Close() error { return t.f.Close() }

// DefaultMAC is the MAC address of a guest's interface number index when
// none is given: a locally administered unicast address derived from
// seed (what identifies the guest: its kernel, initrd and command line),
// so that both replicas of a guest give it the same one.
func DefaultMAC(seed []byte, index int) net.HardwareAddr {
	h := sha256.New()
	h.Write([]byte("ftkvm mac\x00"))
	h.Write(seed)
	h.Write([]byte{byte(index), byte(index >> 8)})
	s := h.Sum(nil)
	mac := net.HardwareAddr(s[:6])
	mac[0] = mac[0]&^0x01 | 0x02 // unicast, locally administered
	return mac
}
