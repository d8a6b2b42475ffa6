package snapshot

import (
	"bytes"
	"errors"
	"reflect"
	"testing"
)

// FuzzReadFile feeds arbitrary bytes to the snapshot file reader: it must
// return an error or a state, never panic, hang or allocate without bound.
//
//	go test ./vmm/snapshot -run '^$' -fuzz FuzzReadFile -fuzztime 1m -fuzzminimizetime 5s
func FuzzReadFile(f *testing.F) {
	file, _ := writeSample(f, sampleState())
	f.Add(file)
	f.Add(file[:len(file)/2])
	f.Add([]byte(Magic))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		st, err := ReadFile(bytes.NewReader(b), func(h Header) ([]byte, error) {
			if h.MemSize > 8<<20 {
				return nil, errors.New("too big for fuzzing")
			}
			return make([]byte, h.MemSize), nil
		})
		if err == nil && st == nil {
			t.Fatal("nil state without error")
		}
		if err != nil && st != nil {
			t.Fatal("state with error")
		}
	})
}

// FuzzSections feeds arbitrary payloads to each section decoder. What
// decodes must encode and decode again to the same value.
//
//	go test ./vmm/snapshot -run '^$' -fuzz FuzzSections -fuzztime 1m -fuzzminimizetime 5s
func FuzzSections(f *testing.F) {
	s := sampleState()
	f.Add(uint8(FrameHeader), EncodeHeader(nil, &s.Header))
	f.Add(uint8(FrameCPUID), EncodeCPUID(nil, s.CPUID))
	f.Add(uint8(FrameVCPU), EncodeVCPU(nil, &s.VCPU))
	f.Add(uint8(FrameDevices), EncodeDevices(nil, &s.Devices))
	f.Add(uint8(FrameDisks), EncodeDisks(nil, s.Disks))
	f.Add(uint8(FrameNICs), EncodeNICs(nil, s.NICs))
	f.Add(uint8(FrameMachine), EncodeMachine(nil, &s.Machine))
	f.Add(uint8(FrameEnv), EncodeEnv(nil, &s.Env))
	f.Add(uint8(FrameEnd), EncodeEnd(nil, &End{Frames: 3, Pages: 9}))
	f.Add(uint8(FrameZeroPages), le.AppendUint64(le.AppendUint32(nil, 1), 3))
	f.Fuzz(func(t *testing.T, typ uint8, p []byte) {
		again := func(a, b any) {
			if !reflect.DeepEqual(a, b) {
				t.Fatalf("%v: decode(encode(x)) != x:\n%+v\n%+v", FrameType(typ), a, b)
			}
		}
		switch FrameType(typ) {
		case FrameHeader:
			if h, err := DecodeHeader(p); err == nil {
				h2, err := DecodeHeader(EncodeHeader(nil, &h))
				if err != nil {
					t.Fatal(err)
				}
				again(h, h2)
			}
		case FrameCPUID:
			if c, err := DecodeCPUID(p); err == nil {
				c2, err := DecodeCPUID(EncodeCPUID(nil, c))
				if err != nil {
					t.Fatal(err)
				}
				again(c, c2)
			}
		case FrameVCPU:
			var v, v2 VCPU
			if DecodeVCPU(p, &v) == nil {
				if err := DecodeVCPU(EncodeVCPU(nil, &v), &v2); err != nil {
					t.Fatal(err)
				}
				again(v, v2)
			}
		case FrameDevices:
			var d, d2 Devices
			if DecodeDevices(p, &d) == nil {
				if err := DecodeDevices(EncodeDevices(nil, &d), &d2); err != nil {
					t.Fatal(err)
				}
				again(d, d2)
			}
		case FrameDisks:
			if d, err := DecodeDisks(p, nil); err == nil {
				d2, err := DecodeDisks(EncodeDisks(nil, d), nil)
				if err != nil {
					t.Fatal(err)
				}
				again(d, d2)
			}
		case FrameNICs:
			if n, err := DecodeNICs(p, nil); err == nil {
				n2, err := DecodeNICs(EncodeNICs(nil, n), nil)
				if err != nil {
					t.Fatal(err)
				}
				again(n, n2)
			}
		case FrameMachine:
			var m, m2 Machine
			if DecodeMachine(p, &m) == nil {
				if err := DecodeMachine(EncodeMachine(nil, &m), &m2); err != nil {
					t.Fatal(err)
				}
				again(m, m2)
			}
		case FrameEnv:
			var e, e2 Env
			if DecodeEnv(p, &e) == nil {
				if err := DecodeEnv(EncodeEnv(nil, &e), &e2); err != nil {
					t.Fatal(err)
				}
				again(e, e2)
			}
		case FrameEnd:
			if e, err := DecodeEnd(p); err == nil {
				e2, _ := DecodeEnd(EncodeEnd(nil, &e))
				again(e, e2)
			}
		case FramePages, FrameZeroPages:
			if pg, err := DecodePages(p, FrameType(typ) == FrameZeroPages, 1024); err == nil {
				for i := 0; i < pg.N; i++ {
					if pg.PFN(i) >= 1024 {
						t.Fatalf("page %d out of range", pg.PFN(i))
					}
					_ = pg.Data(i)
				}
			}
		default:
			_ = DecodeError(p)
		}
	})
}

// FuzzFrames feeds arbitrary bytes to the frame reader.
//
//	go test ./vmm/snapshot -run '^$' -fuzz FuzzFrames -fuzztime 1m -fuzzminimizetime 5s
func FuzzFrames(f *testing.F) {
	file, _ := writeSample(f, sampleState())
	f.Add(file[len(Magic):])
	f.Fuzz(func(t *testing.T, b []byte) {
		r := NewReader(bytes.NewReader(b))
		for {
			_, p, err := r.Next()
			if err != nil {
				break
			}
			if len(p) > MaxPayload {
				t.Fatalf("payload of %d bytes", len(p))
			}
		}
		if r.Read() > int64(len(b)) {
			t.Fatalf("read %d of %d bytes", r.Read(), len(b))
		}
	})
}
