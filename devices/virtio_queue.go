package devices

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// Split virtqueues (virtio 1.2 §2.7): a descriptor table, an available
// ring the driver writes and a used ring the device writes, all in guest
// memory. Every guest-supplied value (ring indices, descriptor addresses,
// lengths, next links, indirect tables) is checked before use: a queue or
// chain that breaks the rules is a device error (ErrVirtqueue), never a
// panic, and the work per chain is bounded by the queue size.

// GuestMemory is guest physical memory as a device sees it. Bytes is all of
// RAM, index = guest physical address. A device that writes guest memory
// calls MarkDirty for the range it wrote, so that checkpoints, migration
// and the state hash see device writes as they see the guest's own.
type GuestMemory interface {
	Bytes() []byte
	MarkDirty(gpa, n uint64)
}

// Descriptor flags (virtio 1.2 §2.7.5).
const (
	VIRTQ_DESC_F_NEXT     = 1
	VIRTQ_DESC_F_WRITE    = 2
	VIRTQ_DESC_F_INDIRECT = 4
)

// Available ring flags (§2.7.6).
const VIRTQ_AVAIL_F_NO_INTERRUPT = 1

// Sizes of the split virtqueue's parts (§2.7): a descriptor is 16 bytes; the
// available ring is flags, idx, ring[size] (2 bytes each) and used_event; the
// used ring is flags, idx, ring[size] of (id, len) (8 bytes each) and
// avail_event.
const (
	virtqDescSize = 16
	virtqUsedElem = 8
	// VirtqMaxSize is the largest queue size the split ring allows (§2.7).
	VirtqMaxSize = 32768
)

// ErrVirtqueue marks a queue or descriptor chain that breaks the virtio
// rules. The transport answers it with DEVICE_NEEDS_RESET.
var ErrVirtqueue = errors.New("virtqueue error")

func vqErr(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrVirtqueue, fmt.Sprintf(format, args...))
}

// Desc is one buffer of a descriptor chain, after indirect tables are
// resolved.
type Desc struct {
	Addr  uint64
	Len   uint32
	Write bool // device-writable
}

// Queue is one split virtqueue's configuration (written by the driver
// through the transport) and the device's position in its rings.
type Queue struct {
	Max   uint16 // QueueNumMax: the largest size the device accepts
	Size  uint16 // QueueNum
	Ready bool
	Desc  uint64 // descriptor table
	Avail uint64 // driver area
	Used  uint64 // device area

	// LastAvail is the next available ring entry the device will take;
	// UsedIdx the next used ring entry it will fill (both free running).
	LastAvail uint16
	UsedIdx   uint16
}

// reset returns the queue to its state after a device reset.
func (q *Queue) reset() { *q = Queue{Max: q.Max} }

// check verifies the queue's configuration against guest memory of memSize
// bytes: a power-of-two size no larger than Max, and each area aligned
// (§2.7: descriptors 16, available ring 2, used ring 4) and inside memory.
func (q *Queue) check(memSize uint64) error {
	if q.Size == 0 || q.Size&(q.Size-1) != 0 || q.Size > q.Max {
		return vqErr("queue size %d (not a power of two up to %d)", q.Size, q.Max)
	}
	n := uint64(q.Size)
	for _, a := range []struct {
		what       string
		addr, size uint64
		alignment  uint64
	}{
		{"descriptor table", q.Desc, n * virtqDescSize, 16},
		{"available ring", q.Avail, 6 + 2*n, 2},
		{"used ring", q.Used, 6 + virtqUsedElem*n, 4},
	} {
		if a.addr%a.alignment != 0 {
			return vqErr("%s at %#x is not %d-byte aligned", a.what, a.addr, a.alignment)
		}
		if a.addr > memSize || a.size > memSize-a.addr {
			return vqErr("%s [%#x, +%#x) is outside guest memory", a.what, a.addr, a.size)
		}
	}
	return nil
}

// Pending reports how many chains the driver has made available and the
// device has not taken yet. More than the queue size is an error: the
// driver cannot have that many outstanding (§2.7.6).
func (q *Queue) Pending(mem GuestMemory) (uint16, error) {
	b := mem.Bytes()
	if err := q.check(uint64(len(b))); err != nil {
		return 0, err
	}
	idx := binary.LittleEndian.Uint16(b[q.Avail+2:])
	n := idx - q.LastAvail
	if n > q.Size {
		return 0, vqErr("available index %d is %d entries ahead of the device's %d, more than the queue size %d",
			idx, n, q.LastAvail, q.Size)
	}
	return n, nil
}

// Pop takes the next available chain: its head index and its buffers,
// appended to buf[:0] (give a buf with capacity Size and Pop does not
// allocate). Call it only when Pending is non-zero.
func (q *Queue) Pop(mem GuestMemory, buf []Desc) (uint16, []Desc, error) {
	b := mem.Bytes()
	slot := uint64(q.LastAvail % q.Size)
	head := binary.LittleEndian.Uint16(b[q.Avail+4+2*slot:])
	q.LastAvail++
	chain, err := ReadChain(b, q.Desc, q.Size, head, buf)
	return head, chain, err
}

// PushUsed returns chain head to the driver with n bytes written into its
// device-writable buffers: one used ring element, then the used index
// (§2.7.8), both marked dirty.
func (q *Queue) PushUsed(mem GuestMemory, head uint16, n uint32) {
	b := mem.Bytes()
	slot := uint64(q.UsedIdx % q.Size)
	e := q.Used + 4 + virtqUsedElem*slot
	binary.LittleEndian.PutUint32(b[e:], uint32(head))
	binary.LittleEndian.PutUint32(b[e+4:], n)
	mem.MarkDirty(e, virtqUsedElem)
	q.UsedIdx++
	binary.LittleEndian.PutUint16(b[q.Used+2:], q.UsedIdx)
	mem.MarkDirty(q.Used+2, 2)
}

// WantsInterrupt reports whether the driver asked to be interrupted for
// used buffers: VIRTQ_AVAIL_F_NO_INTERRUPT clear (event index is not
// offered, §2.7.7).
func (q *Queue) WantsInterrupt(mem GuestMemory) bool {
	b := mem.Bytes()
	return binary.LittleEndian.Uint16(b[q.Avail:])&VIRTQ_AVAIL_F_NO_INTERRUPT == 0
}

// ReadChain decodes the descriptor chain starting at head in the table at
// table (size entries) of guest memory mem, resolving an indirect table
// (§2.7.5.3), and appends its buffers to buf[:0]. It fails (ErrVirtqueue)
// on: a head or next index outside the table; a chain longer than size
// descriptors in all, indirect ones included (which also ends any loop);
// a buffer outside guest memory; an indirect descriptor that also has NEXT,
// sits inside an indirect table, or whose table is empty, not a multiple of
// 16 bytes or outside memory; a device-readable buffer after a
// device-writable one (§2.7.4.2). Its work is bounded by size.
func ReadChain(mem []byte, table uint64, size, head uint16, buf []Desc) ([]Desc, error) {
	memSize := uint64(len(mem))
	out := buf[:0]
	if size == 0 || table > memSize || uint64(size)*virtqDescSize > memSize-table {
		return out, vqErr("descriptor table at %#x of %d entries is outside guest memory", table, size)
	}
	limit := int(size)
	idx, n := head, size // the table being walked: direct or indirect
	base := table
	indirect := false
	writable := false
	for {
		if idx >= n {
			return out, vqErr("descriptor index %d outside a table of %d", idx, n)
		}
		if len(out) >= limit {
			return out, vqErr("descriptor chain longer than the queue size %d", limit)
		}
		d := mem[base+uint64(idx)*virtqDescSize:]
		addr := binary.LittleEndian.Uint64(d[0:])
		length := binary.LittleEndian.Uint32(d[8:])
		flags := binary.LittleEndian.Uint16(d[12:])
		next := binary.LittleEndian.Uint16(d[14:])
		if flags&VIRTQ_DESC_F_INDIRECT != 0 {
			switch {
			case indirect:
				return out, vqErr("indirect descriptor inside an indirect table")
			case flags&VIRTQ_DESC_F_NEXT != 0:
				return out, vqErr("descriptor with both INDIRECT and NEXT")
			case length == 0 || length%virtqDescSize != 0:
				return out, vqErr("indirect table of %d bytes", length)
			case addr > memSize || uint64(length) > memSize-addr:
				return out, vqErr("indirect table [%#x, +%#x) is outside guest memory", addr, length)
			case length/virtqDescSize > uint32(limit):
				return out, vqErr("indirect table of %d descriptors, more than the queue size %d", length/virtqDescSize, limit)
			}
			// The chain continues in the table and ends with it.
			indirect = true
			base, n, idx = addr, uint16(length/virtqDescSize), 0
			continue
		}
		if addr > memSize || uint64(length) > memSize-addr {
			return out, vqErr("buffer [%#x, +%#x) is outside guest memory", addr, length)
		}
		w := flags&VIRTQ_DESC_F_WRITE != 0
		if !w && writable {
			return out, vqErr("device-readable buffer after a device-writable one")
		}
		writable = writable || w
		out = append(out, Desc{Addr: addr, Len: length, Write: w})
		if flags&VIRTQ_DESC_F_NEXT == 0 {
			return out, nil
		}
		idx = next
	}
}
