package devices

import "fmt"

// Device is a port-I/O device model. offset is relative to the base the
// device was registered at; len(data) is the access size (1, 2 or 4).
// Read fills data; Write consumes it.
type Device interface {
	Read(offset uint64, data []byte)
	Write(offset uint64, data []byte)
}

// Clock gives virtual time: nanoseconds since machine start. Every call is an
// environment read that a backup replica replays, so models call it only when
// a guest access needs the time.
type Clock interface{ Now() int64 }

// IRQ is an interrupt controller input: SetIRQ drives line to level. Edge
// triggered consumers latch on a false->true transition.
type IRQ interface{ SetIRQ(line int, level bool) }

// Registration describes one mapped range, for diagnostics.
type Registration struct {
	Name string
	Base uint64
	Size uint64
}

type busEntry struct {
	base, size uint64
	name       string
	dev        Device
}

// Bus maps [base, base+size) port ranges to Devices. Ranges are kept in a
// slice sorted by base and looked up by binary search, so Read and Write do
// not allocate. Register all devices before the vCPUs run; the Bus is not
// safe for concurrent use.
type Bus struct {
	entries   []busEntry
	unhandled uint64
}

// NewBus returns an empty bus.
func NewBus() *Bus { return &Bus{} }

// Register maps [base, base+size) to d. It fails if size is 0, the range
// wraps around, d is nil, or the range overlaps an existing registration.
func (b *Bus) Register(base, size uint64, name string, d Device) error {
	if size == 0 {
		return fmt.Errorf("devices: register %q: zero size", name)
	}
	if base+size < base && base+size != 0 {
		return fmt.Errorf("devices: register %q: range %#x+%#x wraps", name, base, size)
	}
	if d == nil {
		return fmt.Errorf("devices: register %q: nil device", name)
	}
	end := base + size - 1 // inclusive, cannot overflow
	i := b.upper(base)
	if i > 0 {
		p := b.entries[i-1]
		if p.base+p.size-1 >= base {
			return fmt.Errorf("devices: register %q at %#x-%#x: overlaps %q at %#x-%#x",
				name, base, end, p.name, p.base, p.base+p.size-1)
		}
	}
	if i < len(b.entries) {
		n := b.entries[i]
		if n.base <= end {
			return fmt.Errorf("devices: register %q at %#x-%#x: overlaps %q at %#x-%#x",
				name, base, end, n.name, n.base, n.base+n.size-1)
		}
	}
	b.entries = append(b.entries, busEntry{})
	copy(b.entries[i+1:], b.entries[i:])
	b.entries[i] = busEntry{base: base, size: size, name: name, dev: d}
	return nil
}

// upper returns the index of the first entry whose base is > addr.
func (b *Bus) upper(addr uint64) int {
	lo, hi := 0, len(b.entries)
	for lo < hi {
		m := int(uint(lo+hi) >> 1)
		if b.entries[m].base > addr {
			hi = m
		} else {
			lo = m + 1
		}
	}
	return lo
}

// find returns the entry containing addr, or nil.
func (b *Bus) find(addr uint64) *busEntry {
	i := b.upper(addr)
	if i == 0 {
		return nil
	}
	e := &b.entries[i-1]
	if addr-e.base >= e.size {
		return nil
	}
	return e
}

// Read dispatches a read at addr to the device whose range contains addr.
// With no device there, data is filled with 0xff (a floating ISA bus), the
// bus's unhandled counter is incremented, and Read returns false.
func (b *Bus) Read(addr uint64, data []byte) bool {
	e := b.find(addr)
	if e == nil {
		for i := range data {
			data[i] = 0xff
		}
		b.unhandled++
		return false
	}
	e.dev.Read(addr-e.base, data)
	return true
}

// Write dispatches a write at addr. With no device there it counts the access
// as unhandled and returns false.
func (b *Bus) Write(addr uint64, data []byte) bool {
	e := b.find(addr)
	if e == nil {
		b.unhandled++
		return false
	}
	e.dev.Write(addr-e.base, data)
	return true
}

// Unhandled returns the number of accesses to unmapped addresses.
func (b *Bus) Unhandled() uint64 { return b.unhandled }

// Registrations lists the mapped ranges sorted by base (for diagnostics; it
// allocates).
func (b *Bus) Registrations() []Registration {
	r := make([]Registration, len(b.entries))
	for i, e := range b.entries {
		r[i] = Registration{Name: e.name, Base: e.base, Size: e.size}
	}
	return r
}

// Lookup returns the registration containing addr (for diagnostics).
func (b *Bus) Lookup(addr uint64) (Registration, bool) {
	e := b.find(addr)
	if e == nil {
		return Registration{}, false
	}
	return Registration{Name: e.name, Base: e.base, Size: e.size}, true
}

// Index returns the position of the registration containing addr in
// Registrations' order, or -1 if none does. It does not allocate: the exit
// profile (vmm) calls it on every port or MMIO exit to count per device.
// Indices are stable only while nothing new is registered.
func (b *Bus) Index(addr uint64) int {
	i := b.upper(addr)
	if i == 0 || addr-b.entries[i-1].base >= b.entries[i-1].size {
		return -1
	}
	return i - 1
}
