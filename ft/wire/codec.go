package wire

import "encoding/binary"

func le32(b []byte, v uint32) []byte { return binary.LittleEndian.AppendUint32(b, v) }
func le64(b []byte, v uint64) []byte { return binary.LittleEndian.AppendUint64(b, v) }

func boolByte(v bool) byte {
	if v {
		return 1
	}
	return 0
}

func appendPos(b []byte, p Position) []byte {
	b = le64(b, p.Exits)
	return le64(b, p.Instr)
}

func appendBytes(b, s []byte) []byte {
	b = le32(b, uint32(len(s)))
	return append(b, s...)
}

func appendEvents(b []byte, evs []Event) []byte {
	b = le32(b, uint32(len(evs)))
	for _, e := range evs {
		b = append(b, byte(e.Kind))
		b = le64(b, e.Value)
		b = appendBytes(b, e.Data)
	}
	return b
}

// minEventSize is the encoded size of an event without data: a count
// larger than the bytes left could hold is malformed, checked before any
// allocation.
const minEventSize = 1 + 8 + 4

// reader decodes a body. The first short read or invalid value marks it
// bad; later reads return zero values, and the caller checks ok() once.
type reader struct {
	b   []byte
	bad bool
}

func (r *reader) take(n int) []byte {
	if r.bad || n > len(r.b) {
		r.bad = true
		return nil
	}
	s := r.b[:n]
	r.b = r.b[n:]
	return s
}

func (r *reader) u8() uint8 {
	if s := r.take(1); s != nil {
		return s[0]
	}
	return 0
}

func (r *reader) u32() uint32 {
	if s := r.take(4); s != nil {
		return binary.LittleEndian.Uint32(s)
	}
	return 0
}

func (r *reader) u64() uint64 {
	if s := r.take(8); s != nil {
		return binary.LittleEndian.Uint64(s)
	}
	return 0
}

// bool accepts only 0 and 1, so that each body has one encoding.
func (r *reader) bool() bool {
	switch r.u8() {
	case 0:
		return false
	case 1:
		return true
	}
	r.bad = true
	return false
}

func (r *reader) pos() Position {
	return Position{Exits: r.u64(), Instr: r.u64()}
}

func (r *reader) digest() (d Digest) {
	copy(d[:], r.take(len(d)))
	return d
}

// bytes copies, because the decoder's buffer is reused. Empty is nil.
func (r *reader) bytes() []byte {
	n := r.u32()
	if r.bad || uint64(n) > uint64(len(r.b)) {
		r.bad = true
		return nil
	}
	if n == 0 {
		return nil
	}
	return append([]byte(nil), r.take(int(n))...)
}

func (r *reader) events() []Event {
	n := r.u32()
	if r.bad || uint64(n)*minEventSize > uint64(len(r.b)) {
		r.bad = true
		return nil
	}
	if n == 0 {
		return nil
	}
	evs := make([]Event, n)
	for i := range evs {
		evs[i] = Event{Kind: Kind(r.u8()), Value: r.u64(), Data: r.bytes()}
	}
	return evs
}

// ok reports whether the whole body was read without error.
func (r *reader) ok() bool { return !r.bad && len(r.b) == 0 }
