package devices

import (
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"

	"golang.org/x/sys/unix"
)

// virtio-blk (virtio 1.2 §5.2) over a raw image file: one request queue;
// read, write, flush and get-id. Discard, write-zeroes, multiple queues and
// the writeback toggle are not offered.
//
// Requests are served synchronously inside Notify, that is inside the
// guest's QueueNotify write, on the vCPU thread: the guest waits for the
// file I/O. The request's effect on guest memory and on the image happens at
// that guest-defined moment, so two replicas that start from identical
// images and run the same guest stay identical; but the vCPU does not run
// while the host does the I/O (a flush included).

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
	// blkSizeMax bounds one buffer (VIRTIO_BLK_F_SIZE_MAX).
	blkSizeMax = 1 << 20
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

// Block is a virtio-blk device.
type Block struct {
	img  *DiskImage
	id   [VIRTIO_BLK_ID_BYTES]byte
	bufs []Desc // chain buffer, capacity blkQueueSize: Notify does not allocate

	unhandled uint64
	// Counters of requests, for diagnostics.
	Reads, Writes, Flushes, IOErrors, Unsupported, Malformed uint64
}

// Path is the image's file name.
func (b *Block) Path() string { return b.img.path }

// NewBlock returns a virtio-blk device over img; id is its serial number
// (GET_ID, at most 20 bytes are used).
func NewBlock(img *DiskImage, id string) *Block {
	b := &Block{img: img, bufs: make([]Desc, 0, blkQueueSize)}
	copy(b.id[:], id)
	return b
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

// Reset implements VirtioDevice: the device keeps no per-driver state.
func (b *Block) Reset() {}

// config renders struct virtio_blk_config (§5.2.4) up to blkConfigSize.
func (b *Block) config() [blkConfigSize]byte {
	var c [blkConfigSize]byte
	le := binary.LittleEndian
	le.PutUint64(c[0:], b.img.size/blkSectorSize) // capacity
	le.PutUint32(c[8:], blkSizeMax)               // size_max
	le.PutUint32(c[12:], blkQueueSize-2)          // seg_max: header and status take two
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

// Notify implements VirtioDevice: serve every available request.
func (b *Block) Notify(index int, q *Queue, mem GuestMemory) (bool, error) {
	n, err := q.Pending(mem)
	if err != nil {
		return false, err
	}
	for range n {
		head, chain, err := q.Pop(mem, b.bufs)
		if err != nil {
			return false, err
		}
		q.PushUsed(mem, head, b.serve(mem, chain))
	}
	return n > 0, nil
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

// serve carries out one request and returns the number of bytes written to
// its device-writable buffers (the used length). A request too short to
// hold a header and a status byte is counted as malformed and returned
// with 0 bytes: there is nowhere to put a status (§5.2.6.1 requires both).
func (b *Block) serve(mem GuestMemory, chain []Desc) uint32 {
	s := newBlkStreams(chain)
	if s.nRead < blkHeaderSize || s.nWrite < 1 {
		b.Malformed++
		return 0
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

	status, written := byte(VIRTIO_BLK_S_OK), uint64(0)
	switch typ {
	case VIRTIO_BLK_T_IN:
		b.Reads++
		if !b.inRange(sector, dataIn) {
			status = VIRTIO_BLK_S_IOERR
			break
		}
		written = dataIn
		for it := s.segs(true, 0, dataIn); it.next(); {
			_, err := b.img.f.ReadAt(g[it.gpa:it.gpa+it.n], int64(sector*blkSectorSize+it.at))
			mem.MarkDirty(it.gpa, it.n)
			if err != nil {
				status, written = VIRTIO_BLK_S_IOERR, 0
				break
			}
		}
	case VIRTIO_BLK_T_OUT:
		b.Writes++
		if b.img.readOnly || !b.inRange(sector, dataOut) {
			status = VIRTIO_BLK_S_IOERR
			break
		}
		for it := s.segs(false, blkHeaderSize, dataOut); it.next(); {
			if _, err := b.img.f.WriteAt(g[it.gpa:it.gpa+it.n], int64(sector*blkSectorSize+it.at)); err != nil {
				status = VIRTIO_BLK_S_IOERR
				break
			}
		}
	case VIRTIO_BLK_T_FLUSH:
		b.Flushes++
		if !b.img.readOnly {
			if err := b.img.f.Sync(); err != nil {
				status = VIRTIO_BLK_S_IOERR
			}
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
	// The status byte is the last device-writable byte.
	for it := s.segs(true, s.nWrite-1, 1); it.next(); {
		g[it.gpa] = status
		mem.MarkDirty(it.gpa, 1)
	}
	return uint32(written + 1)
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
