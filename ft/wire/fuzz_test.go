package wire

import (
	"bytes"
	"errors"
	"io"
	"reflect"
	"testing"
)

func addSeeds(f *testing.F) {
	var all []byte
	for _, m := range samples() {
		fr := Marshal(m)
		f.Add(fr)
		all = append(all, fr...)
	}
	f.Add(all)
	f.Add([]byte{})
	f.Add([]byte("fT"))
}

// FuzzDecoder: the incremental decoder, fed any bytes in any chunking,
// never panics, hands out only messages that re-encode to exactly the
// bytes they came from, and the chunking does not change what it yields.
func FuzzDecoder(f *testing.F) {
	addSeeds(f)
	f.Fuzz(func(t *testing.T, data []byte) {
		whole, wholeErr := decodeAll(data, len(data)+1)
		for _, chunk := range []int{1, 3, 17} {
			got, err := decodeAll(data, chunk)
			if !reflect.DeepEqual(got, whole) || (err == nil) != (wholeErr == nil) {
				t.Fatalf("chunk %d: %d msgs err %v; whole: %d msgs err %v", chunk, len(got), err, len(whole), wholeErr)
			}
		}
		var re []byte
		for _, m := range whole {
			re = Append(re, m)
		}
		if !bytes.HasPrefix(data, re) {
			t.Fatal("decoded messages do not re-encode to the input's prefix")
		}
	})
}

func decodeAll(data []byte, chunk int) ([]Msg, error) {
	d := NewDecoder(1 << 20)
	var out []Msg
	for off := 0; off < len(data); off += chunk {
		d.Write(data[off:min(off+chunk, len(data))])
		for {
			m, err := d.Next()
			if err != nil {
				return out, err
			}
			if m == nil {
				break
			}
			out = append(out, m)
		}
	}
	return out, nil
}

// FuzzUnmarshal: one frame. A frame that decodes re-encodes identically.
func FuzzUnmarshal(f *testing.F) {
	addSeeds(f)
	f.Fuzz(func(t *testing.T, data []byte) {
		m, err := Unmarshal(data)
		if err != nil {
			if m != nil {
				t.Fatal("message with error")
			}
			return
		}
		if !bytes.Equal(Marshal(m), data) {
			t.Fatalf("%v: re-encoding differs", m.Type())
		}
	})
}

// FuzzBody: every message body decoder (the type byte picks it). A body
// that decodes has exactly one encoding, and a decoded message round-trips.
func FuzzBody(f *testing.F) {
	for _, m := range samples() {
		f.Add(byte(m.Type()), m.appendBody(nil))
	}
	f.Fuzz(func(t *testing.T, typ byte, body []byte) {
		m, err := DecodeBody(Type(typ), body)
		if err != nil {
			return
		}
		if m.Type() != Type(typ) {
			t.Fatalf("type %d decoded as %v", typ, m.Type())
		}
		if !bytes.Equal(m.appendBody(nil), body) {
			t.Fatalf("%v: body re-encoding differs", m.Type())
		}
		back, err := Unmarshal(Marshal(m))
		if err != nil || !reflect.DeepEqual(back, m) {
			t.Fatalf("%v: frame round trip: %v", m.Type(), err)
		}
	})
}

// FuzzReader: the blocking reader over a stream that may end anywhere:
// it ends with io.EOF, ErrTruncated or a decoding error, never panics.
func FuzzReader(f *testing.F) {
	addSeeds(f)
	f.Fuzz(func(t *testing.T, data []byte) {
		r := NewReader(bytes.NewReader(data), 1<<20)
		for range len(data) + 1 {
			m, err := r.Read()
			if err != nil {
				if m != nil {
					t.Fatal("message with error")
				}
				if errors.Is(err, ErrTruncated) && r.d.Buffered() == 0 {
					t.Fatal("truncated with nothing buffered")
				}
				if err == io.EOF && r.d.Buffered() != 0 {
					t.Fatal("EOF with a partial frame buffered")
				}
				return
			}
		}
		t.Fatal("reader did not end")
	})
}

// FuzzDiskDone: a KindDiskDone event's data, whatever it holds, splits
// without a panic; what splits names a disk below MaxDisks and encodes
// back to the same bytes.
func FuzzDiskDone(f *testing.F) {
	f.Add(DiskDoneData(nil, 0, 0))
	f.Add(DiskDoneData(nil, MaxDisks-1, 2))
	f.Add([]byte{MaxDisks, 0})
	f.Add([]byte{1})
	f.Add([]byte{1, 2, 3})
	f.Fuzz(func(t *testing.T, data []byte) {
		disk, status, ok := DiskDone(data)
		if !ok {
			return
		}
		if disk < 0 || disk >= MaxDisks {
			t.Fatalf("disk %d accepted", disk)
		}
		if back := DiskDoneData(nil, disk, status); !bytes.Equal(back, data) {
			t.Fatalf("% x splits to disk %d status %d, which encodes to % x", data, disk, status, back)
		}
	})
}
