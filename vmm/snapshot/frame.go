// Package snapshot is ftkvm's format for a guest's captured state: snapshot
// files, live-migration streams and incremental checkpoints all use it.
//
// # Frames
//
// Everything travels in frames. A frame is a 12-byte header and a payload:
//
//	offset size field
//	0      4    payload length (little-endian), at most MaxPayload
//	4      2    frame type (FrameType)
//	6      1    format version (Version)
//	7      1    flags, 0
//	8      4    CRC32C (Castagnoli) of bytes 0-7 and the payload
//
// A frame whose checksum does not verify is never applied.
//
// # Streams
//
// A snapshot file is the 8-byte Magic followed by one stream; a migration
// connection carries one stream among its handshake frames. A stream is:
//
//	FrameHeader                 version, guest memory size, kind
//	FramePages / FrameZeroPages any number, in any order; a later copy of a page wins
//	FrameCPUID, FrameVCPU, FrameDevices, FrameDisks, FrameNICs,
//	FrameMachine, FrameEnv      once each
//	FrameEnd                    the counts of frames and pages before it
//
// Pages and state frames may interleave; the end frame closes the stream, and
// a stream that lacks it is truncated. Guest memory not sent is zero.
package snapshot

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
)

// Version is the format version this package writes and the only one it
// reads. Any change to a frame's layout (including the device and register
// structs it embeds, see TestLayout in snapshot_test.go) needs a new version.
//
// Version 2: the machine frame's Stats carry the step clock's counters
// (Steps, Instrs, Emulated), and its PointKind may be a step point.
//
// Version 3: the devices frame carries the ACPI PM device, and a disks
// frame (required, once) the virtio-blk devices: each one's virtio-mmio
// transport with its queues, and its image's size and read-only flag.
//
// Version 4: a network interfaces frame (required, once) carries the
// virtio-net devices: each one's address, virtio-mmio transport and the
// received frames waiting for receive chains.
//
// Version 5: each disk carries the sequence number of its device's next
// request (NextSeq): disk requests complete as events naming them.
const Version = 5

// Magic starts every snapshot file.
const Magic = "FTKVMSNP"

// HeaderSize is the size of a frame header.
const HeaderSize = 12

// MaxPayload bounds a frame's payload, so that a corrupt length cannot make a
// reader allocate without limit. A full pages frame is the largest.
const MaxPayload = 4 + MaxPagesPerFrame*(8+PageSize) + 64

// FrameType says what a frame's payload holds.
type FrameType uint16

// Frame types. 1-15 make up a stream; 16 and up are the migration protocol's.
const (
	FrameHeader    FrameType = 1
	FrameCPUID     FrameType = 2
	FrameVCPU      FrameType = 3
	FrameDevices   FrameType = 4
	FrameMachine   FrameType = 5
	FrameEnv       FrameType = 6
	FramePages     FrameType = 7
	FrameZeroPages FrameType = 8
	FrameEnd       FrameType = 9
	FrameDisks     FrameType = 10
	FrameNICs      FrameType = 11

	FrameReady     FrameType = 16 // destination: machine built, send the stream
	FrameInstalled FrameType = 17 // destination: state verified and installed, not running
	FrameCommit    FrameType = 18 // source: it will never run the guest again; run it
	FrameStarted   FrameType = 19 // destination: running the guest
	FrameError     FrameType = 20 // either side: a message, then it closes
)

var frameNames = map[FrameType]string{
	FrameHeader: "header", FrameCPUID: "cpuid", FrameVCPU: "vcpu", FrameDevices: "devices",
	FrameMachine: "machine", FrameEnv: "environment", FramePages: "pages",
	FrameZeroPages: "zero-pages", FrameEnd: "end", FrameDisks: "disks", FrameNICs: "network interfaces", FrameReady: "ready",
	FrameInstalled: "installed", FrameCommit: "commit", FrameStarted: "started", FrameError: "error",
}

func (t FrameType) String() string {
	if s, ok := frameNames[t]; ok {
		return s
	}
	return fmt.Sprintf("frame type %d", uint16(t))
}

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// Errors a reader returns; they are wrapped with the frame's position.
var (
	ErrTruncated = errors.New("truncated")
	ErrCorrupt   = errors.New("corrupt")
)

// VersionError is a frame or header of another format version.
type VersionError struct{ Got uint32 }

func (e *VersionError) Error() string {
	return fmt.Sprintf("snapshot format version %d; this ftkvm reads version %d", e.Got, Version)
}

// Writer writes frames.
type Writer struct {
	w       io.Writer
	hdr     [HeaderSize]byte
	written int64
	frames  uint64
}

// NewWriter returns a Writer on w. Buffering is the caller's (bufio).
func NewWriter(w io.Writer) *Writer { return &Writer{w: w} }

// WriteFrame writes one frame. The payload may be reused after it returns.
func (w *Writer) WriteFrame(t FrameType, payload []byte) error {
	return w.WriteFrameParts(t, payload, nil)
}

// WriteFrameParts writes one frame whose payload is a followed by b,
// without joining them.
func (w *Writer) WriteFrameParts(t FrameType, a, b []byte) error {
	size := len(a) + len(b)
	if size > MaxPayload {
		return fmt.Errorf("snapshot: %v frame of %d bytes exceeds %d", t, size, MaxPayload)
	}
	h := w.hdr[:]
	binary.LittleEndian.PutUint32(h[0:], uint32(size))
	binary.LittleEndian.PutUint16(h[4:], uint16(t))
	h[6] = Version
	h[7] = 0
	crc := crc32.Update(0, castagnoli, h[:8])
	crc = crc32.Update(crc, castagnoli, a)
	crc = crc32.Update(crc, castagnoli, b)
	binary.LittleEndian.PutUint32(h[8:], crc)
	for _, p := range [][]byte{h, a, b} {
		if len(p) == 0 {
			continue
		}
		if _, err := w.w.Write(p); err != nil {
			return err
		}
	}
	w.written += int64(HeaderSize + size)
	w.frames++
	return nil
}

// Written is the number of bytes written so far.
func (w *Writer) Written() int64 { return w.written }

// Frames is the number of frames written so far.
func (w *Writer) Frames() uint64 { return w.frames }

// Reader reads frames, verifying each one's length, version and checksum.
type Reader struct {
	r      io.Reader
	hdr    [HeaderSize]byte
	buf    []byte
	read   int64
	frames uint64
}

// NewReader returns a Reader on r.
func NewReader(r io.Reader) *Reader { return &Reader{r: r} }

// Next reads the next frame. The payload is valid until the next call. At a
// clean end of input (no byte of a further frame) it returns io.EOF; input
// that ends inside a frame gives an error wrapping ErrTruncated; a bad
// checksum or length, one wrapping ErrCorrupt; another version, a
// *VersionError.
func (r *Reader) Next() (FrameType, []byte, error) {
	at := r.read
	n, err := io.ReadFull(r.r, r.hdr[:])
	r.read += int64(n)
	if err == io.EOF {
		return 0, nil, io.EOF
	}
	if err == io.ErrUnexpectedEOF {
		return 0, nil, fmt.Errorf("frame %d at byte %d: header cut short after %d bytes: %w", r.frames+1, at, n, ErrTruncated)
	}
	if err != nil {
		return 0, nil, err
	}
	h := r.hdr[:]
	size := binary.LittleEndian.Uint32(h[0:])
	t := FrameType(binary.LittleEndian.Uint16(h[4:]))
	if h[6] != Version {
		return 0, nil, fmt.Errorf("frame %d at byte %d: %w", r.frames+1, at, &VersionError{Got: uint32(h[6])})
	}
	if h[7] != 0 || size > MaxPayload {
		return 0, nil, fmt.Errorf("frame %d at byte %d: bad header (flags %#x, length %d): %w", r.frames+1, at, h[7], size, ErrCorrupt)
	}
	if cap(r.buf) < int(size) {
		r.buf = make([]byte, size)
	}
	p := r.buf[:size]
	n, err = io.ReadFull(r.r, p)
	r.read += int64(n)
	if err == io.EOF || err == io.ErrUnexpectedEOF {
		return 0, nil, fmt.Errorf("frame %d (%v) at byte %d: payload cut short after %d of %d bytes: %w", r.frames+1, t, at, n, size, ErrTruncated)
	}
	if err != nil {
		return 0, nil, err
	}
	crc := crc32.Update(0, castagnoli, h[:8])
	crc = crc32.Update(crc, castagnoli, p)
	if crc != binary.LittleEndian.Uint32(h[8:]) {
		return 0, nil, fmt.Errorf("frame %d (%v) at byte %d: checksum mismatch: %w", r.frames+1, t, at, ErrCorrupt)
	}
	r.frames++
	return t, p, nil
}

// Read is the number of bytes read so far.
func (r *Reader) Read() int64 { return r.read }

// Frames is the number of good frames read so far.
func (r *Reader) Frames() uint64 { return r.frames }
