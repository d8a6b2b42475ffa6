package devices

import (
	"cmp"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"sync"

	"golang.org/x/sys/unix"
)

// virtio-blk (virtio 1.2 §5.2) over a raw image file: one request queue;
// read, write, flush and get-id. Discard, write-zeroes, multiple queues and
// the writeback toggle are not offered.
//
// Requests are served off the vCPU thread, and their completion is an
// event the environment delivers, so that its moment is replayable
// (docs/REPLICATION.md, "Disks"):
//
//   - At the guest's QueueNotify (vCPU thread) the device pops available
//     chains while it has a free slot (BlockSlots; the others wait in the
//     available ring) and checks each. A request it can answer at once
//     (malformed, outside the image, a write to a read-only image, larger
//     than SEG_MAX x SIZE_MAX, GET_ID, an unknown type, a flush of a
//     read-only image) is completed there. Any other takes a slot: the
//     chain's buffers and, for a write, its data are copied out of guest
//     memory (a guest that scribbles on a buffer in flight cannot make two
//     replicas write different data), the request gets the disk's next
//     sequence number, and it goes to the disk's I/O goroutine.
//   - The I/O goroutine performs the requests in order on host buffers (a
//     read lands in the slot, not in guest memory) and reports each
//     finished one (sequence number and status) through the hook given to
//     SetAsync. It never touches guest memory.
//   - The environment delivers the completion at a delivery point of its
//     choosing (Deliver, then a Service of the queue, on the vCPU thread):
//     the read data are copied into guest memory (marked dirty), the
//     status byte written, the chain put in the used ring and the driver
//     interrupted. Only then is the slot free again, and chains waiting in
//     the available ring are popped. A replica's log names the request by
//     its sequence number; a backup delivers it at the same point, waiting
//     for its own I/O goroutine if need be.
//   - Captures (checkpoints, snapshots, migration) Settle first: wait for
//     the I/O goroutine and complete every request in flight at the
//     capture point, in sequence order, so that a state never has requests
//     in flight and the image holds all their writes. Chains waiting in
//     the available ring are not taken then (SetHold): a replica's backup,
//     which performs the requests on its own image, takes them after
//     installing the state, where the primary takes them after its
//     capture (vmm.Machine.SettleDisks, ServiceDisks). An install Drops
//     the requests in flight (once performed): the installed state has
//     their completions. A completion delivered for a request no longer
//     in flight does nothing.
//
// Without a hook (SetAsync not called) Notify performs each request before
// it returns, on the vCPU thread: the device as a plain model (tests).
// Device ID (§5) and feature bits (§5.2.3).
const (
	VIRTIO_ID_BLOCK = 2

	VIRTIO_BLK_F_SIZE_MAX = 1
	VIRTIO_BLK_F_SEG_MAX  = 2
	VIRTIO_BLK_F_RO       = 5
	VIRTIO_BLK_F_BLK_SIZE = 6
	VIRTIO_BLK_F_FLUSH    = 9
)

// Request types and status values (§5.2.6).
const (
	VIRTIO_BLK_T_IN     = 0
	VIRTIO_BLK_T_OUT    = 1
	VIRTIO_BLK_T_FLUSH  = 4
	VIRTIO_BLK_T_GET_ID = 8

	VIRTIO_BLK_S_OK     = 0
	VIRTIO_BLK_S_IOERR  = 1
	VIRTIO_BLK_S_UNSUPP = 2

	// VIRTIO_BLK_ID_BYTES is the size of a GET_ID answer.
	VIRTIO_BLK_ID_BYTES = 20
)

const (
	blkSectorSize = 512
	blkHeaderSize = 16 // le32 type, le32 reserved, le64 sector
	blkQueueSize  = 256
	// blkSizeMax bounds one buffer (VIRTIO_BLK_F_SIZE_MAX) and, with
	// SEG_MAX, one request's data: a slot's host buffer holds it.
	blkSizeMax = 4096
	blkSegMax  = blkQueueSize - 2 // header and status take two
	// BlockRequestMax is the most data one request may carry.
	BlockRequestMax = blkSegMax * blkSizeMax
	// BlockSlots bounds the requests a disk has in flight (popped, not
	// yet completed), and so the host memory they hold.
	BlockSlots = 8
	// blkConfigSize covers struct virtio_blk_config up to blk_size and
	// the topology fields (§5.2.4), all that the offered features use.
	blkConfigSize = 32
)

// ErrDiskImage marks a disk image ftkvm cannot use.
var ErrDiskImage = errors.New("unusable disk image")

// DiskImage is a raw image file opened for a virtio-blk device.
type DiskImage struct {
	f        *os.File
	path     string
	size     uint64
	readOnly bool
}

// OpenDiskImage opens a raw image: read-write, or read-only with ro. It
// must be a regular file or block device of at least one 512-byte sector
// and a whole number of sectors. It takes an advisory lock (exclusive, or
// shared when read-only) so two machines cannot write one image.
func OpenDiskImage(path string, ro bool) (*DiskImage, error) {
	flags := os.O_RDWR
	if ro {
		flags = os.O_RDONLY
	}
	f, err := os.OpenFile(path, flags, 0)
	if err != nil {
		return nil, fmt.Errorf("disk %s: %w", path, err)
	}
	d := &DiskImage{f: f, path: path, readOnly: ro}
	if err := d.check(); err != nil {
		f.Close()
		return nil, err
	}
	return d, nil
}

func (d *DiskImage) check() error {
	fi, err := d.f.Stat()
	if err != nil {
		return fmt.Errorf("disk %s: %w", d.path, err)
	}
	if !fi.Mode().IsRegular() && fi.Mode()&os.ModeDevice == 0 {
		return fmt.Errorf("disk %s: %w: not a regular file or block device", d.path, ErrDiskImage)
	}
	end, err := d.f.Seek(0, io.SeekEnd)
	if err != nil {
		return fmt.Errorf("disk %s: size: %w", d.path, err)
	}
	switch {
	case end < blkSectorSize:
		return fmt.Errorf("disk %s: %w: %d bytes, smaller than one %d-byte sector", d.path, ErrDiskImage, end, blkSectorSize)
	case end%blkSectorSize != 0:
		return fmt.Errorf("disk %s: %w: %d bytes is not a whole number of %d-byte sectors", d.path, ErrDiskImage, end, blkSectorSize)
	}
	d.size = uint64(end)
	how := unix.LOCK_EX
	if d.readOnly {
		how = unix.LOCK_SH
	}
	if err := unix.Flock(int(d.f.Fd()), how|unix.LOCK_NB); err != nil {
		return fmt.Errorf("disk %s: in use by another process (lock: %w)", d.path, err)
	}
	return nil
}

// Size is the image size in bytes.
func (d *DiskImage) Size() uint64 { return d.size }

// ReadOnly reports whether the image was opened read-only.
func (d *DiskImage) ReadOnly() bool { return d.readOnly }

// Path is the image's file name.
func (d *DiskImage) Path() string { return d.path }

// Digest returns the SHA-256 of the image's contents, reading all of it
// (replicas compare it: each must start from an identical copy).
func (d *DiskImage) Digest() ([sha256.Size]byte, error) {
	var sum [sha256.Size]byte
	h := sha256.New()
	// 1 MiB reads: a big image is read in fewer system calls.
	n, err := io.CopyBuffer(h, io.NewSectionReader(d.f, 0, int64(d.size)), make([]byte, 1<<20))
	if err != nil {
		return sum, fmt.Errorf("disk %s: reading it for its digest: %w", d.path, err)
	}
	if uint64(n) != d.size {
		return sum, fmt.Errorf("disk %s: %w: read %d of %d bytes for its digest", d.path, ErrDiskImage, n, d.size)
	}
	copy(sum[:], h.Sum(nil))
	return sum, nil
}

// ReadAt reads the image at off (a replica sending its image to a joining
// backup).
func (d *DiskImage) ReadAt(p []byte, off int64) (int, error) { return d.f.ReadAt(p, off) }

// WriteAt writes p at off, within the image: a joining backup's copy
// receiving the primary's contents. A read-only image is not written.
func (d *DiskImage) WriteAt(p []byte, off int64) error {
	switch {
	case d.readOnly:
		return fmt.Errorf("disk %s: read-only", d.path)
	case off < 0 || uint64(off) > d.size || uint64(len(p)) > d.size-uint64(off):
		return fmt.Errorf("disk %s: %d bytes at %d are outside its %d bytes", d.path, len(p), off, d.size)
	}
	if _, err := d.f.WriteAt(p, off); err != nil {
		return fmt.Errorf("disk %s: %w", d.path, err)
	}
	return nil
}

// Sync makes what was written durable.
func (d *DiskImage) Sync() error {
	if err := d.f.Sync(); err != nil {
		return fmt.Errorf("disk %s: sync: %w", d.path, err)
	}
	return nil
}

// Close closes the image (and drops its lock).
func (d *DiskImage) Close() error { return d.f.Close() }

// Slot states. A slot goes free -> queued (Notify) -> done (the I/O
// goroutine) -> delivering (Deliver, Settle) -> free (completed in the
// guest, or dropped).
const (
	slotFree = iota
	slotQueued
	slotDone
	slotDelivering
)

// blkReq is one request in flight.
type blkReq struct {
	seq    uint64
	head   uint16
	typ    uint32
	sector uint64
	chain  []Desc // a copy of the chain, capacity blkQueueSize
	n      uint64 // data bytes
	buf    []byte // the write's data or the read's result
	status byte   // set by the I/O goroutine
	state  uint8  // guarded by mu
}

// Block is a virtio-blk device.
type Block struct {
	img  *DiskImage
	id   [VIRTIO_BLK_ID_BYTES]byte
	bufs []Desc // chain buffer, capacity blkQueueSize: Notify does not allocate

	slots   [BlockSlots]blkReq
	next    uint64 // the next request's sequence number
	deliver []int  // slots to complete in the guest, in delivery order

	mu      sync.Mutex
	cond    sync.Cond // a slot became done
	work    chan int  // slots for the I/O goroutine; nil without SetAsync
	stopped chan struct{}
	hook    func(seq uint64, status byte)
	hold    bool // Notify completes but takes no request (SetHold)

	unhandled uint64
	BlockCounters
}

// BlockCounters count a virtio-blk device's requests, for diagnostics.
// The vCPU thread updates them.
type BlockCounters struct {
	Reads, Writes, Flushes, IOErrors, Unsupported, Malformed uint64
}

// Path is the image's file name.
func (b *Block) Path() string { return b.img.path }

// NewBlock returns a virtio-blk device over img; id is its serial number
// (GET_ID, at most 20 bytes are used).
func NewBlock(img *DiskImage, id string) *Block {
	b := &Block{img: img, bufs: make([]Desc, 0, blkQueueSize), deliver: make([]int, 0, BlockSlots)}
	b.cond.L = &b.mu
	for i := range b.slots {
		b.slots[i].chain = make([]Desc, 0, blkQueueSize)
	}
	copy(b.id[:], id)
	return b
}

// SetAsync starts the disk's I/O goroutine: from now on requests are
// performed there and completed in the guest only when Deliver says so.
// done hears of each finished request, on the I/O goroutine: it must
// return quickly and must not call the device. Call it once, before the
// guest runs; Close stops the goroutine.
func (b *Block) SetAsync(done func(seq uint64, status byte)) {
	b.hook = done
	b.work = make(chan int, BlockSlots)
	b.stopped = make(chan struct{})
	go b.worker()
}

// Close waits for the requests in flight to be performed and stops the
// I/O goroutine. The device serves nothing more. Call it once, when the
// vCPU no longer runs.
func (b *Block) Close() {
	if b.work != nil {
		close(b.work)
		<-b.stopped
	}
}

func (b *Block) worker() {
	defer close(b.stopped)
	for i := range b.work {
		r := &b.slots[i]
		st := b.perform(r)
		b.mu.Lock()
		r.status, r.state = st, slotDone
		seq := r.seq
		b.cond.Broadcast()
		b.mu.Unlock()
		b.hook(seq, st)
	}
}

// perform does a request's file I/O: on the I/O goroutine, or on the vCPU
// thread without SetAsync.
func (b *Block) perform(r *blkReq) byte {
	off := int64(r.sector * blkSectorSize)
	var err error
	switch r.typ {
	case VIRTIO_BLK_T_IN:
		_, err = b.img.f.ReadAt(r.buf[:r.n], off)
	case VIRTIO_BLK_T_OUT:
		_, err = b.img.f.WriteAt(r.buf[:r.n], off)
	case VIRTIO_BLK_T_FLUSH:
		err = b.img.f.Sync()
	}
	if err != nil {
		return VIRTIO_BLK_S_IOERR
	}
	return VIRTIO_BLK_S_OK
}

// DeviceID implements VirtioDevice.
func (b *Block) DeviceID() uint32 { return VIRTIO_ID_BLOCK }

// Features implements VirtioDevice.
func (b *Block) Features() uint64 {
	f := uint64(1)<<VIRTIO_BLK_F_SIZE_MAX | 1<<VIRTIO_BLK_F_SEG_MAX | 1<<VIRTIO_BLK_F_BLK_SIZE |
		1<<VIRTIO_BLK_F_FLUSH | 1<<VIRTIO_RING_F_INDIRECT_DESC
	if b.img.readOnly {
		f |= 1 << VIRTIO_BLK_F_RO
	}
	return f
}

// QueueMax implements VirtioDevice: one request queue.
func (b *Block) QueueMax() []uint16 { return []uint16{blkQueueSize} }

// Unhandled implements VirtioDevice.
func (b *Block) Unhandled() uint64 { return b.unhandled }

// Reset implements VirtioDevice: the requests in flight are dropped once
// performed (their completions would go to the old driver's rings).
func (b *Block) Reset() { b.Drop() }

// config renders struct virtio_blk_config (§5.2.4) up to blkConfigSize.
func (b *Block) config() [blkConfigSize]byte {
	var c [blkConfigSize]byte
	le := binary.LittleEndian
	le.PutUint64(c[0:], b.img.size/blkSectorSize) // capacity
	le.PutUint32(c[8:], blkSizeMax)               // size_max
	le.PutUint32(c[12:], blkSegMax)               // seg_max
	le.PutUint32(c[20:], blkSectorSize)           // blk_size
	return c
}

// ReadConfig implements VirtioDevice. Bytes past the configuration read 0
// and count as unhandled.
func (b *Block) ReadConfig(offset uint64, data []byte) {
	c := b.config()
	for i := range data {
		o := offset + uint64(i)
		if o < blkConfigSize {
			data[i] = c[o]
		} else {
			data[i] = 0
			b.unhandled++
		}
	}
}

// WriteConfig implements VirtioDevice: nothing offered is writable
// (VIRTIO_BLK_F_CONFIG_WCE is not offered).
func (b *Block) WriteConfig(offset uint64, data []byte) { b.unhandled++ }

// Notify implements VirtioDevice: complete the requests delivered, then
// take available requests while a slot is free.
func (b *Block) Notify(index int, q *Queue, mem GuestMemory) (bool, error) {
	used := b.complete(q, mem)
	for !b.hold {
		slot := b.freeSlot()
		if slot < 0 {
			return used, nil
		}
		n, err := q.Pending(mem)
		if err != nil || n == 0 {
			return used, err
		}
		head, chain, err := q.Pop(mem, b.bufs)
		if err != nil {
			return used, err
		}
		r := &b.slots[slot]
		if w, now := b.prepare(r, mem, head, chain); now {
			q.PushUsed(mem, head, w)
			used = true
			continue
		}
		if b.work == nil {
			r.status = b.perform(r)
			b.apply(q, mem, r)
			used = true
			continue
		}
		b.mu.Lock()
		r.state = slotQueued
		b.mu.Unlock()
		b.work <- slot // never blocks: at most BlockSlots are queued
	}
	return used, nil
}

// SetHold makes Notify complete the delivered requests without taking
// available ones (true), or take them again (false): a capture settles
// the requests in flight without starting others, which a replica whose
// own image must see them submits itself after installing the state.
func (b *Block) SetHold(h bool) { b.hold = h }

// freeSlot is a free slot's index, or -1.
func (b *Block) freeSlot() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	for i := range b.slots {
		if b.slots[i].state == slotFree {
			return i
		}
	}
	return -1
}

// Deliver marks request seq for completion in the guest, waiting for the
// I/O goroutine to finish it; a Service of the queue then completes it.
// It returns the request's status, and false if no such request is in
// flight (a completion for a request dropped or settled already). vCPU
// thread only.
func (b *Block) Deliver(seq uint64) (byte, bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	for i := range b.slots {
		r := &b.slots[i]
		if (r.state == slotQueued || r.state == slotDone) && r.seq == seq {
			for r.state != slotDone {
				b.cond.Wait()
			}
			r.state = slotDelivering
			b.deliver = append(b.deliver, i)
			return r.status, true
		}
	}
	return 0, false
}

// Wait waits until request seq is performed, or returns at once if it is
// not in flight. Any goroutine.
func (b *Block) Wait(seq uint64) {
	b.mu.Lock()
	defer b.mu.Unlock()
	for i := range b.slots {
		r := &b.slots[i]
		if r.state == slotQueued && r.seq == seq {
			for r.state == slotQueued && r.seq == seq {
				b.cond.Wait()
			}
			return
		}
	}
}

// Settle waits for every request in flight and marks them all for
// completion, in sequence order: a Service of the queue then completes
// them (a capture's rule, above). vCPU thread only.
func (b *Block) Settle() {
	b.mu.Lock()
	defer b.mu.Unlock()
	start := len(b.deliver)
	for i := range b.slots {
		r := &b.slots[i]
		if r.state == slotQueued || r.state == slotDone {
			for r.state != slotDone {
				b.cond.Wait()
			}
			r.state = slotDelivering
			b.deliver = append(b.deliver, i)
		}
	}
	slices.SortFunc(b.deliver[start:], func(x, y int) int { return cmp.Compare(b.slots[x].seq, b.slots[y].seq) })
}

// Drop waits for every request in flight to be performed and forgets them
// (an install, a reset). vCPU thread only.
func (b *Block) Drop() {
	b.mu.Lock()
	defer b.mu.Unlock()
	for i := range b.slots {
		r := &b.slots[i]
		for r.state == slotQueued {
			b.cond.Wait()
		}
		r.state = slotFree
	}
	b.deliver = b.deliver[:0]
}

// InFlight calls fn for each request performed and not yet delivered, in
// no order: what a replica that goes live must deliver itself (the others
// are reported to the hook when performed). Any goroutine.
func (b *Block) InFlight(fn func(seq uint64, status byte)) {
	b.mu.Lock()
	defer b.mu.Unlock()
	for i := range b.slots {
		if r := &b.slots[i]; r.state == slotDone {
			fn(r.seq, r.status)
		}
	}
}

// Busy is the number of requests in flight.
func (b *Block) Busy() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	n := 0
	for i := range b.slots {
		if b.slots[i].state != slotFree {
			n++
		}
	}
	return n
}

// NextSeq is the sequence number the next request gets; SetNextSeq sets it
// (an install: the numbers are part of the guest's state, since logs name
// requests by them).
func (b *Block) NextSeq() uint64 { return b.next }

// SetNextSeq: see NextSeq.
func (b *Block) SetNextSeq(n uint64) { b.next = n }

// complete completes the delivered requests in the guest, in delivery
// order, and frees their slots.
func (b *Block) complete(q *Queue, mem GuestMemory) bool {
	if len(b.deliver) == 0 {
		return false
	}
	for _, i := range b.deliver {
		b.apply(q, mem, &b.slots[i])
	}
	b.mu.Lock()
	for _, i := range b.deliver {
		b.slots[i].state = slotFree
	}
	b.mu.Unlock()
	b.deliver = b.deliver[:0]
	return true
}

// apply writes a performed request's result into its chain and returns
// the chain to the driver.
func (b *Block) apply(q *Queue, mem GuestMemory, r *blkReq) {
	q.PushUsed(mem, r.head, b.finish(mem, r))
}

// finish writes a performed request's result into its chain: the read
// data, then the status byte (the last device-writable byte). It returns
// the used length.
func (b *Block) finish(mem GuestMemory, r *blkReq) uint32 {
	s := newBlkStreams(r.chain)
	g := mem.Bytes()
	written := uint64(0)
	if r.typ == VIRTIO_BLK_T_IN && r.status == VIRTIO_BLK_S_OK {
		for it := s.segs(true, 0, r.n); it.next(); {
			copy(g[it.gpa:it.gpa+it.n], r.buf[it.at:it.at+it.n])
			mem.MarkDirty(it.gpa, it.n)
		}
		written = r.n
	}
	if r.status == VIRTIO_BLK_S_IOERR {
		b.IOErrors++
	}
	for it := s.segs(true, s.nWrite-1, 1); it.next(); {
		g[it.gpa] = r.status
		mem.MarkDirty(it.gpa, 1)
	}
	return uint32(written + 1)
}

// blkStreams views a chain as the two byte streams virtio-blk defines
// (§5.2.6): the device-readable bytes (header, then data for a write) and
// the device-writable bytes (data for a read, then the status byte). The
// spec allows any split of these into buffers (§2.7.4).
type blkStreams struct {
	chain         []Desc
	nRead, nWrite uint64
}

func newBlkStreams(chain []Desc) blkStreams {
	s := blkStreams{chain: chain}
	for _, d := range chain {
		if d.Write {
			s.nWrite += uint64(d.Len)
		} else {
			s.nRead += uint64(d.Len)
		}
	}
	return s
}

// blkSegs iterates over the parts of the readable (write false) or
// writable stream in [off, end), in order: next sets gpa (guest address),
// at (offset from off) and n (length). It is a value type, so serving a
// request does not allocate.
type blkSegs struct {
	chain      []Desc
	write      bool
	off, end   uint64
	i          int
	pos        uint64
	gpa, at, n uint64
}

func (s blkStreams) segs(write bool, off, n uint64) blkSegs {
	return blkSegs{chain: s.chain, write: write, off: off, end: off + n}
}

func (it *blkSegs) next() bool {
	for it.i < len(it.chain) {
		d := it.chain[it.i]
		it.i++
		if d.Write != it.write {
			continue
		}
		pos, dl := it.pos, uint64(d.Len)
		it.pos += dl
		if pos+dl > it.off && pos < it.end {
			start, end := max(it.off, pos), min(it.end, pos+dl)
			it.gpa, it.at, it.n = d.Addr+start-pos, start-it.off, end-start
			return true
		}
	}
	return false
}

// prepare checks a popped request. One that can be answered at once is
// answered (its status written) and now is true, with the used length w;
// any other is set up in r (chain, data of a write, sequence number) for
// the file I/O. A request too short to hold a header and a status byte is
// counted as malformed and returned with 0 bytes: there is nowhere to put
// a status (§5.2.6.1 requires both).
func (b *Block) prepare(r *blkReq, mem GuestMemory, head uint16, chain []Desc) (w uint32, now bool) {
	s := newBlkStreams(chain)
	if s.nRead < blkHeaderSize || s.nWrite < 1 {
		b.Malformed++
		return 0, true
	}
	g := mem.Bytes()
	var hdr [blkHeaderSize]byte
	for it := s.segs(false, 0, blkHeaderSize); it.next(); {
		copy(hdr[it.at:it.at+it.n], g[it.gpa:it.gpa+it.n])
	}
	typ := binary.LittleEndian.Uint32(hdr[0:])
	sector := binary.LittleEndian.Uint64(hdr[8:])
	dataIn := s.nWrite - 1 // device-writable bytes before the status byte
	dataOut := s.nRead - blkHeaderSize

	status, written, n := byte(VIRTIO_BLK_S_OK), uint64(0), uint64(0)
	switch typ {
	case VIRTIO_BLK_T_IN:
		b.Reads++
		if !b.inRange(sector, dataIn) || dataIn > BlockRequestMax {
			status = VIRTIO_BLK_S_IOERR
			break
		}
		n = dataIn
		goto async
	case VIRTIO_BLK_T_OUT:
		b.Writes++
		if b.img.readOnly || !b.inRange(sector, dataOut) || dataOut > BlockRequestMax {
			status = VIRTIO_BLK_S_IOERR
			break
		}
		n = dataOut
		goto async
	case VIRTIO_BLK_T_FLUSH:
		b.Flushes++
		if !b.img.readOnly {
			goto async
		}
	case VIRTIO_BLK_T_GET_ID:
		written = min(dataIn, VIRTIO_BLK_ID_BYTES)
		for it := s.segs(true, 0, written); it.next(); {
			copy(g[it.gpa:it.gpa+it.n], b.id[it.at:])
			mem.MarkDirty(it.gpa, it.n)
		}
	default:
		b.Unsupported++
		status = VIRTIO_BLK_S_UNSUPP
	}
	if status == VIRTIO_BLK_S_IOERR {
		b.IOErrors++
	}
	for it := s.segs(true, s.nWrite-1, 1); it.next(); {
		g[it.gpa] = status
		mem.MarkDirty(it.gpa, 1)
	}
	return uint32(written + 1), true

async:
	r.seq, r.head, r.typ, r.sector, r.n = b.next, head, typ, sector, n
	b.next++
	r.chain = append(r.chain[:0], chain...)
	if uint64(cap(r.buf)) < n {
		// Grown at most a few times per slot, to at most
		// BlockRequestMax: then reused.
		r.buf = make([]byte, max(n, min(2*uint64(cap(r.buf)), BlockRequestMax)))
	}
	r.buf = r.buf[:cap(r.buf)]
	if typ == VIRTIO_BLK_T_OUT {
		for it := s.segs(false, blkHeaderSize, n); it.next(); {
			copy(r.buf[it.at:it.at+it.n], g[it.gpa:it.gpa+it.n])
		}
	}
	return 0, false
}

// inRange reports whether n bytes from sector are whole sectors inside the
// image (§5.2.6.2: the device fails reads and writes that are not).
func (b *Block) inRange(sector, n uint64) bool {
	if n%blkSectorSize != 0 {
		return false
	}
	capacity := b.img.size / blkSectorSize
	return sector <= capacity && n/blkSectorSize <= capacity-sector
}
