package wire

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
)

// Frame layout (all integers little-endian):
//
//	offset  size  field
//	0       2     magic "fT"
//	2       1     frame format version (FrameVersion)
//	3       1     message type
//	4       4     body length n
//	8       4     CRC32C of bytes 0..7 (the header)
//	12      n     body
//	12+n    4     CRC32C of bytes 0..12+n-1 (header and body)
//
// The header has its own checksum so that a corrupt length is caught at
// once, instead of making the decoder wait for bytes that will never come.
// A frame is handed out only when both checksums verify: a record is
// applied only when its checksum verifies (ft/doc.go, Failover).
const (
	HeaderSize   = 12
	TrailerSize  = 4
	FrameVersion = 1
	magic0       = 'f'
	magic1       = 'T'
)

// DefaultMaxBody bounds a body (a full checkpoint of a 1 GiB guest is
// near it); larger frames are refused as corrupt.
const DefaultMaxBody = 1<<30 + 1<<20

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// Decoding errors. Once a stream has given one, it cannot be trusted
// again: TCP cannot resynchronize on a frame boundary, so the link is
// broken and the driver closes it.
var (
	ErrMagic          = errors.New("wire: bad magic (not an ftkvm replication stream)")
	ErrHeaderChecksum = errors.New("wire: header checksum mismatch")
	ErrVersion        = errors.New("wire: unknown frame format version")
	ErrTooLarge       = errors.New("wire: frame larger than the limit")
	ErrChecksum       = errors.New("wire: frame checksum mismatch")
	ErrType           = errors.New("wire: unknown message type")
	ErrMalformed      = errors.New("wire: malformed message body")
	// ErrTruncated: the stream ended inside a frame. The partial frame
	// was ignored, as it must be.
	ErrTruncated = errors.New("wire: stream ended inside a frame")
)

// Append appends m's frame to b.
func Append(b []byte, m Msg) []byte {
	start := len(b)
	b = append(b, magic0, magic1, FrameVersion, byte(m.Type()), 0, 0, 0, 0, 0, 0, 0, 0)
	b = m.appendBody(b)
	hdr := b[start : start+HeaderSize]
	binary.LittleEndian.PutUint32(hdr[4:], uint32(len(b)-start-HeaderSize))
	binary.LittleEndian.PutUint32(hdr[8:], crc32.Checksum(hdr[:8], castagnoli))
	return binary.LittleEndian.AppendUint32(b, crc32.Checksum(b[start:], castagnoli))
}

// WriteFrame writes m's frame (the bytes Marshal returns) to w in pieces
// of at most chunk bytes, computing its checksum as it goes. A large frame
// (a full checkpoint is the guest's whole memory) then reaches the peer
// as a stream, which it counts as a sign of life, instead of after the
// whole frame was copied and checksummed.
func WriteFrame(w io.Writer, m Msg, chunk int) (int64, error) {
	if chunk <= 0 {
		chunk = 1 << 20
	}
	// A checkpoint's state, its last field, is written from where it
	// is rather than copied into the frame first: only the fields
	// before it are encoded here.
	var tail []byte
	if cp, ok := m.(Checkpoint); ok {
		tail, cp.State = cp.State, nil
		m = cp
	}
	b := append(make([]byte, 0, HeaderSize+64), magic0, magic1, FrameVersion, byte(m.Type()), 0, 0, 0, 0, 0, 0, 0, 0)
	b = m.appendBody(b)
	if tail != nil {
		// appendBytes wrote a zero length as the body's last 4 bytes.
		binary.LittleEndian.PutUint32(b[len(b)-4:], uint32(len(tail)))
	}
	binary.LittleEndian.PutUint32(b[4:], uint32(len(b)+len(tail)-HeaderSize))
	binary.LittleEndian.PutUint32(b[8:], crc32.Checksum(b[:8], castagnoli))
	var n int64
	crc := uint32(0)
	for _, part := range [][]byte{b, tail} {
		for off := 0; off < len(part); off += chunk {
			p := part[off:min(off+chunk, len(part))]
			crc = crc32.Update(crc, castagnoli, p)
			k, err := w.Write(p)
			n += int64(k)
			if err != nil {
				return n, err
			}
		}
	}
	k, err := w.Write(binary.LittleEndian.AppendUint32(nil, crc))
	return n + int64(k), err
}

// Marshal returns m's frame.
func Marshal(m Msg) []byte { return Append(nil, m) }

// Unmarshal decodes exactly one whole frame.
func Unmarshal(frame []byte) (Msg, error) {
	m, n, err := parse(frame, DefaultMaxBody)
	if err != nil {
		return nil, err
	}
	if m == nil {
		return nil, ErrTruncated
	}
	if n != len(frame) {
		return nil, fmt.Errorf("%w: %d bytes after the frame", ErrMalformed, len(frame)-n)
	}
	return m, nil
}

// DecodeBody decodes the body of a message of type t (for tests and fuzz
// targets; streams go through Decoder).
func DecodeBody(t Type, body []byte) (Msg, error) {
	if t == 0 || t >= typeLimit {
		return nil, fmt.Errorf("%w %d", ErrType, t)
	}
	r := reader{b: body}
	m := decoders[t](&r)
	if !r.ok() {
		return nil, fmt.Errorf("%w (%v)", ErrMalformed, t)
	}
	return m, nil
}

// parse decodes the frame at the start of b: (nil, 0, nil) when b holds
// only part of it.
func parse(b []byte, maxBody int) (Msg, int, error) {
	if len(b) < HeaderSize {
		// Check what is there already, so garbage fails fast.
		if len(b) >= 1 && b[0] != magic0 || len(b) >= 2 && b[1] != magic1 {
			return nil, 0, ErrMagic
		}
		return nil, 0, nil
	}
	if b[0] != magic0 || b[1] != magic1 {
		return nil, 0, ErrMagic
	}
	if binary.LittleEndian.Uint32(b[8:]) != crc32.Checksum(b[:8], castagnoli) {
		return nil, 0, ErrHeaderChecksum
	}
	if b[2] != FrameVersion {
		return nil, 0, fmt.Errorf("%w %d (this ftkvm speaks %d)", ErrVersion, b[2], FrameVersion)
	}
	n := binary.LittleEndian.Uint32(b[4:])
	if uint64(n) > uint64(maxBody) {
		return nil, 0, fmt.Errorf("%w: %d bytes, limit %d", ErrTooLarge, n, maxBody)
	}
	total := HeaderSize + int(n) + TrailerSize
	if len(b) < total {
		return nil, 0, nil
	}
	if binary.LittleEndian.Uint32(b[total-TrailerSize:]) != crc32.Checksum(b[:total-TrailerSize], castagnoli) {
		return nil, 0, fmt.Errorf("%w (%v frame, %d bytes)", ErrChecksum, Type(b[3]), total)
	}
	m, err := DecodeBody(Type(b[3]), b[HeaderSize:total-TrailerSize])
	if err != nil {
		return nil, 0, err
	}
	return m, total, nil
}

// Decoder splits a byte stream into messages. Feed it bytes as they
// arrive (Write); Next hands out whole frames whose checksums verify, and
// nothing for a frame not complete yet.
type Decoder struct {
	buf     []byte
	off     int // start of the first undecoded byte in buf
	err     error
	maxBody int
}

// NewDecoder returns a decoder refusing bodies over maxBody bytes
// (DefaultMaxBody if <= 0).
func NewDecoder(maxBody int) *Decoder {
	if maxBody <= 0 {
		maxBody = DefaultMaxBody
	}
	return &Decoder{maxBody: maxBody}
}

// Write appends stream bytes. It never fails (io.Writer).
func (d *Decoder) Write(p []byte) (int, error) {
	if d.off > 0 && d.off >= len(d.buf)/2 {
		// Reclaim the consumed front before growing.
		d.buf = d.buf[:copy(d.buf, d.buf[d.off:])]
		d.off = 0
	}
	d.buf = append(d.buf, p...)
	return len(p), nil
}

// Next returns the next whole message, (nil, nil) if more bytes are
// needed, or an error for a corrupt stream (sticky).
func (d *Decoder) Next() (Msg, error) {
	if d.err != nil {
		return nil, d.err
	}
	m, n, err := parse(d.buf[d.off:], d.maxBody)
	if err != nil {
		d.err = err
		return nil, err
	}
	if m == nil {
		return nil, nil
	}
	d.off += n
	if d.off == len(d.buf) {
		d.buf, d.off = d.buf[:0], 0
	}
	return m, nil
}

// Buffered is the number of bytes held that do not make a whole frame yet:
// at the end of a stream, a partial frame that will be ignored.
func (d *Decoder) Buffered() int { return len(d.buf) - d.off }

// Reader reads messages from a stream (a TCP connection).
type Reader struct {
	r   io.Reader
	d   *Decoder
	buf []byte
}

// NewReader reads frames from r, refusing bodies over maxBody bytes.
func NewReader(r io.Reader, maxBody int) *Reader {
	return &Reader{r: r, d: NewDecoder(maxBody), buf: make([]byte, 64<<10)}
}

// SetMaxBody changes the bound on bodies (DefaultMaxBody if <= 0): a
// handshake reads its hello under a small one, then lifts it.
func (r *Reader) SetMaxBody(maxBody int) {
	if maxBody <= 0 {
		maxBody = DefaultMaxBody
	}
	r.d.maxBody = maxBody
}

// Read returns the next message. At the end of the stream it returns
// io.EOF after a whole frame, ErrTruncated inside one (the partial frame
// is dropped), and decoding errors as they are.
func (r *Reader) Read() (Msg, error) {
	for {
		m, err := r.d.Next()
		if m != nil || err != nil {
			return m, err
		}
		n, err := r.r.Read(r.buf)
		r.d.Write(r.buf[:n])
		if err != nil {
			if m, derr := r.d.Next(); m != nil || derr != nil {
				return m, derr
			}
			if err == io.EOF && r.d.Buffered() > 0 {
				return nil, ErrTruncated
			}
			return nil, err
		}
	}
}

func crcOf(b []byte) uint32 { return crc32.Checksum(b, castagnoli) }
