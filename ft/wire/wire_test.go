package wire

import (
	"bytes"
	"errors"
	"io"
	"reflect"
	"strings"
	"testing"
)

func digest(b byte) (d Digest) {
	for i := range d {
		d[i] = b + byte(i)
	}
	return d
}

// samples has one message of every type, with every field set, and some
// with empty lists: the round-trip and corruption tests use them all.
func samples() []Msg {
	pos := Position{Exits: 1234567, Instr: 89}
	evs := []Event{{Kind: KindTimer, Value: 1_000_000}, {Kind: KindUART, Value: 'x'}, {Kind: 99, Value: 7, Data: []byte("blk")},
		{Kind: KindNetRx, Value: 1, Data: bytes.Repeat([]byte{0xee}, 60)}, {Kind: KindDiskDone, Value: 41, Data: DiskDoneData(nil, 2, 1)}}
	return []Msg{
		Hello{Version: 1, Role: RolePrimary, Policy: PolicyStrict, Clock: ClockExits, Verify: true, Started: true,
			MemSize: 256 << 20, WallClock: -5, Kernel: digest(1), Initrd: digest(2), Cmdline: digest(3)},
		Hello{},
		Hello{Version: 2, Role: RoleBackup, Policy: PolicyOutputCommit, Clock: ClockStep, MemSize: 64 << 20,
			Kernel: digest(4), Initrd: digest(5), Cmdline: digest(6), Instance: digest(7), Witness: digest(8)},
		Hello{Version: 3, Role: RolePrimary, Instance: digest(7), Windows: true, CPU: digest(10)},
		Hello{Version: 4, Role: RoleBackup, Instance: digest(7), CPU: digest(11),
			Disks: []Disk{{Size: 1 << 30, Digest: digest(12)}, {Size: 512, ReadOnly: true, Digest: digest(13)}}},
		Hello{Version: 5, Role: RolePrimary, Instance: digest(7), CPU: digest(11), Disks: []Disk{{Size: 4096, Digest: digest(14)}},
			NICs: []NIC{{MAC: [6]byte{2, 0, 0, 0, 0, 1}}, {MAC: [6]byte{2, 0, 0, 0, 0, 2}}}},
		Hello{Version: 6, Role: RolePrimary, Instance: digest(7), CPU: digest(11), Disks: []Disk{{Size: 4096, Digest: digest(14)}},
			NICs: []NIC{{MAC: [6]byte{2, 0, 0, 0, 0, 3}}}, Rest: []byte("fields of a later version")},
		Refuse{Reason: RefuseKernel, Text: "different kernel: ab12 here, cd34 there"},
		Refuse{Reason: RefuseBusy},
		Record{Seq: 1, Epoch: 2, Pos: pos, Kind: KindClock, Value: 1<<63 + 5},
		Record{Seq: 9, Epoch: 9, Pos: pos, Kind: 42, Value: 3, Data: []byte{0, 1, 2}},
		EpochEnd{Seq: 3, Epoch: 2, Pos: pos, Halt: true, Events: evs, Verify: true, Hash: digest(9)},
		EpochEnd{Seq: 4, Epoch: 3, Pos: pos},
		Checkpoint{Seq: 5, Epoch: 4, Pos: pos, Full: true, OutSeq: 77, Events: evs[:1], State: bytes.Repeat([]byte{0xab}, 5000)},
		Checkpoint{Seq: 6, Epoch: 5},
		Checkpoint{Seq: 7, Epoch: 6, Pos: pos, Repair: true, OutSeq: 3, OutBytes: 9, State: []byte{1, 2, 3}},
		Output{Seq: 7, Epoch: 5, Pos: pos, OutSeq: 78, Done: 77, Kind: KindConsole, Data: []byte("hello\n")},
		Output{Seq: 8, Epoch: 5, Pos: pos, OutSeq: 79, Done: 78, Kind: KindNetTx, Offset: 6, Data: NetTxData(nil, 0, bytes.Repeat([]byte{0x5a}, 64))},
		Performed{OutSeq: 78},
		Ack{Seq: 7},
		CheckpointRequest{Epoch: 5, Pos: pos, Reason: "state hash differs"},
		CheckpointRequest{Epoch: 5, Pos: pos, Pages: true, Reason: "state hash differs"},
		PageHashes{Epoch: 5, Pos: pos, First: 0, Total: 3, Hashes: []uint64{1, 1 << 63, 7}, Last: true, Regs: digest(16)},
		PageHashes{Epoch: 5, Pos: pos, First: 1 << 16, Total: 1 << 18, Hashes: []uint64{9}},
		Heartbeat{Epoch: 6, Pos: pos},
		Goodbye{Seq: 8, Status: -1},
		Goodbye{Seq: 9, Status: 3},
		DiskData{Disk: 1, Offset: 1 << 20, Data: bytes.Repeat([]byte{0x33}, 4096)},
		DiskData{Disk: 0, Offset: 512, Last: true, Digest: digest(15), Data: []byte{1, 2, 3}},
	}
}

func TestRoundTrip(t *testing.T) {
	for _, m := range samples() {
		t.Run(m.Type().String(), func(t *testing.T) {
			frame := Marshal(m)
			got, err := Unmarshal(frame)
			if err != nil {
				t.Fatalf("Unmarshal: %v", err)
			}
			if !reflect.DeepEqual(got, m) {
				t.Fatalf("round trip:\n got %#v\nwant %#v", got, m)
			}
			if again := Marshal(got); !bytes.Equal(again, frame) {
				t.Fatal("re-encoding differs")
			}
		})
	}
}

// A stream is decoded the same whatever its chunking: byte by byte, in
// odd chunks, or whole.
func TestDecoderChunking(t *testing.T) {
	var stream []byte
	msgs := samples()
	for _, m := range msgs {
		stream = Append(stream, m)
	}
	for _, chunk := range []int{1, 2, 3, 7, 11, 64, 4096, len(stream)} {
		d := NewDecoder(0)
		var got []Msg
		for off := 0; off < len(stream); off += chunk {
			d.Write(stream[off:min(off+chunk, len(stream))])
			for {
				m, err := d.Next()
				if err != nil {
					t.Fatalf("chunk %d: %v", chunk, err)
				}
				if m == nil {
					break
				}
				got = append(got, m)
			}
		}
		if !reflect.DeepEqual(got, msgs) {
			t.Fatalf("chunk %d: got %d messages, want %d", chunk, len(got), len(msgs))
		}
		if d.Buffered() != 0 {
			t.Fatalf("chunk %d: %d bytes left", chunk, d.Buffered())
		}
	}
}

// Rule (ft/doc.go, failover): "If a message arrives only in
// part, the backup ignores the incomplete record. A record is applied only
// when its checksum verifies." Every proper prefix of a frame yields
// nothing, and no error.
func TestTruncatedFrameYieldsNothing(t *testing.T) {
	for _, m := range samples() {
		frame := Marshal(m)
		for n := 0; n < len(frame); n++ {
			d := NewDecoder(0)
			d.Write(frame[:n])
			got, err := d.Next()
			if got != nil || err != nil {
				t.Fatalf("%v: prefix of %d/%d bytes gave %v, %v", m.Type(), n, len(frame), got, err)
			}
			if d.Buffered() != n {
				t.Fatalf("%v: buffered %d, want %d", m.Type(), d.Buffered(), n)
			}
		}
	}
}

// Every single-bit error in a frame, wherever it is, is a clear error and
// never a message: the header checksum covers the length, the trailer
// covers the rest.
func TestCorruptFrameIsAnError(t *testing.T) {
	for _, m := range samples() {
		frame := Marshal(m)
		if len(frame) > 600 {
			frame = Marshal(Checkpoint{Seq: 1, State: []byte("small")})
		}
		for i := range frame {
			for bit := range 8 {
				bad := bytes.Clone(frame)
				bad[i] ^= 1 << bit
				d := NewDecoder(0)
				d.Write(bad)
				// A flipped length may ask for more bytes: give them.
				d.Write(make([]byte, 64))
				got, err := d.Next()
				if got != nil {
					t.Fatalf("%v: bit %d of byte %d flipped, decoded %#v", m.Type(), bit, i, got)
				}
				if err == nil {
					t.Fatalf("%v: bit %d of byte %d flipped, no error", m.Type(), bit, i)
				}
				if _, err2 := d.Next(); err2 != err {
					t.Fatalf("error not sticky: %v then %v", err, err2)
				}
			}
		}
	}
}

func TestDecodeErrors(t *testing.T) {
	good := Marshal(Ack{Seq: 1})
	withHeader := func(ver, typ byte, n uint32) []byte {
		b := []byte{magic0, magic1, ver, typ, byte(n), byte(n >> 8), byte(n >> 16), byte(n >> 24), 0, 0, 0, 0}
		c := crc32c(b[:8])
		b[8], b[9], b[10], b[11] = byte(c), byte(c>>8), byte(c>>16), byte(c>>24)
		return b
	}
	withTrailer := func(b []byte) []byte {
		c := crc32c(b)
		return append(b, byte(c), byte(c>>8), byte(c>>16), byte(c>>24))
	}
	for _, tc := range []struct {
		name  string
		in    []byte
		limit int
		want  error
	}{
		{"garbage", []byte("GET / HTTP/1.1\r\n"), 0, ErrMagic},
		{"garbage first byte", []byte("G"), 0, ErrMagic},
		{"future version", withTrailer(withHeader(2, byte(TypeAck), 0)), 0, ErrVersion},
		{"unknown type", withTrailer(withHeader(1, 200, 0)), 0, ErrType},
		{"type zero", withTrailer(withHeader(1, 0, 0)), 0, ErrType},
		{"over the limit", withHeader(1, byte(TypeCheckpoint), 1<<20), 1000, ErrTooLarge},
		{"short body", withTrailer(withHeader(1, byte(TypeAck), 0)), 0, ErrMalformed},
		{"long body", withTrailer(append(withHeader(1, byte(TypeAck), 9), make([]byte, 9)...)), 0, ErrMalformed},
		{"all-zero heartbeat is valid", withTrailer(append(withHeader(1, byte(TypeHeartbeat), 24), make([]byte, 24)...)), 0, nil},
		{"trailer", append(good[:len(good)-1], good[len(good)-1]^0xff), 0, ErrChecksum},
		{"huge event count", withTrailer(append(withHeader(1, byte(TypeEpochEnd), 45),
			append(make([]byte, 33), 0xff, 0xff, 0xff, 0x0f, 0, 0, 0, 0, 0, 0, 0, 0)...)), 0, ErrMalformed},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := NewDecoder(tc.limit)
			d.Write(tc.in)
			m, err := d.Next()
			if tc.want == nil {
				if err != nil || m == nil {
					t.Fatalf("got %v, %v; want a message", m, err)
				}
				return
			}
			if !errors.Is(err, tc.want) {
				t.Fatalf("got %v, %v; want %v", m, err, tc.want)
			}
		})
	}
	// A bool byte other than 0 or 1 is malformed.
	body := Hello{}.appendBody(nil)
	body[7] = 2 // Verify
	if _, err := DecodeBody(TypeHello, body); !errors.Is(err, ErrMalformed) {
		t.Fatalf("bool 2: %v", err)
	}
	// Versions 1 to 5 have no fields after theirs; later ones may.
	for _, v := range []uint32{1, 2, 3, 4, 5} {
		body := append(Hello{Version: v}.appendBody(nil), 0)
		if _, err := DecodeBody(TypeHello, body); !errors.Is(err, ErrMalformed) {
			t.Fatalf("version %d hello with a byte more: %v", v, err)
		}
	}
}

func crc32c(b []byte) uint32 { return crcOf(b) }

// The Reader tells a clean end of stream from one inside a frame.
func TestReaderEOF(t *testing.T) {
	a, b := Marshal(Ack{Seq: 1}), Marshal(Heartbeat{Epoch: 2})
	for _, tc := range []struct {
		name   string
		stream []byte
		n      int
		end    error
	}{
		{"clean", append(bytes.Clone(a), b...), 2, io.EOF},
		{"partial last frame", append(bytes.Clone(a), b[:len(b)-3]...), 1, ErrTruncated},
		{"partial header", append(bytes.Clone(a), b[:5]...), 1, ErrTruncated},
		{"corrupt", append(bytes.Clone(a), append([]byte{'f', 'T', 9}, b[3:]...)...), 1, ErrHeaderChecksum},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := NewReader(iotestOneByte{bytes.NewReader(tc.stream)}, 0)
			for i := range tc.n {
				if m, err := r.Read(); err != nil || m == nil {
					t.Fatalf("message %d: %v, %v", i, m, err)
				}
			}
			if m, err := r.Read(); m != nil || !errors.Is(err, tc.end) {
				t.Fatalf("end: %v, %v; want %v", m, err, tc.end)
			}
		})
	}
}

type iotestOneByte struct{ r io.Reader }

func (o iotestOneByte) Read(p []byte) (int, error) {
	if len(p) > 1 {
		p = p[:1]
	}
	return o.r.Read(p)
}

func TestPositionOrder(t *testing.T) {
	ps := []Position{{0, 0}, {0, 1}, {0, 1 << 60}, {1, 0}, {1, 5}, {2, 0}, {1 << 63, 0}}
	for i, p := range ps {
		for j, q := range ps {
			want := 0
			if i < j {
				want = -1
			} else if i > j {
				want = 1
			}
			if got := p.Compare(q); got != want {
				t.Errorf("%v.Compare(%v) = %d, want %d", p, q, got, want)
			}
			if p.Less(q) != (want < 0) {
				t.Errorf("%v.Less(%v) wrong", p, q)
			}
			if (p == q) != (want == 0) {
				t.Errorf("%v == %v disagrees with Compare", p, q)
			}
		}
	}
	if s := (Position{Exits: 12, Instr: 3}).String(); s != "12+3" {
		t.Errorf("String: %q", s)
	}
	if s := (Position{Exits: 12}).String(); s != "12" {
		t.Errorf("String: %q", s)
	}
}

func TestStrings(t *testing.T) {
	for _, s := range []interface{ String() string }{Type(0), Type(99), TypeCheckpointRequest, Kind(0), KindUART,
		Role(0), RoleBackup, Policy(0), PolicyStrict, Clock(3), RefuseReason(0), RefuseMemory} {
		if s.String() == "" || strings.Contains(s.String(), "%!") {
			t.Errorf("%T: %q", s, s.String())
		}
	}
}

// A version 5 Hello with more network interfaces than MaxNICs, or fewer
// bytes than its count says, is malformed.
func TestHelloNICsBounded(t *testing.T) {
	ok := Hello{Version: 5, NICs: make([]NIC, MaxNICs)}.appendBody(nil)
	if _, err := DecodeBody(TypeHello, ok); err != nil {
		t.Fatalf("%d NICs: %v", MaxNICs, err)
	}
	over := Hello{Version: 5, NICs: make([]NIC, MaxNICs+1)}.appendBody(nil)
	if _, err := DecodeBody(TypeHello, over); !errors.Is(err, ErrMalformed) {
		t.Fatalf("%d NICs: %v", MaxNICs+1, err)
	}
	if _, err := DecodeBody(TypeHello, ok[:len(ok)-1]); !errors.Is(err, ErrMalformed) {
		t.Fatalf("truncated: %v", err)
	}
}

func TestNetTxData(t *testing.T) {
	d := NetTxData(nil, 3, []byte("frame"))
	nic, f, ok := NetTxFrame(d)
	if !ok || nic != 3 || string(f) != "frame" {
		t.Fatalf("%d %q %v", nic, f, ok)
	}
	if _, _, ok := NetTxFrame(nil); ok {
		t.Fatal("empty data split")
	}
}

// WriteFrame writes exactly Marshal's bytes, whatever the piece size, and
// stops at the writer's first error.
func TestWriteFrame(t *testing.T) {
	big := Checkpoint{Seq: 9, Epoch: 3, Full: true, State: bytes.Repeat([]byte{1, 2, 3, 4, 5}, 100_000)}
	for _, chunk := range []int{0, 1, 7, 4096, 1 << 20} {
		for _, m := range append(samples(), big) {
			var buf bytes.Buffer
			n, err := WriteFrame(&buf, m, chunk)
			want := Marshal(m)
			if err != nil || n != int64(len(want)) || !bytes.Equal(buf.Bytes(), want) {
				t.Fatalf("chunk %d, %v: wrote %d bytes (%v), differing from Marshal's %d: %v", chunk, m.Type(), n, err, len(want), !bytes.Equal(buf.Bytes(), want))
			}
		}
	}
	w := &failingWriter{left: 10_000}
	if n, err := WriteFrame(w, big, 4096); err == nil || n != 10_000 {
		t.Fatalf("a writer failing after 10000 bytes: wrote %d, error %v", n, err)
	}
}

type failingWriter struct{ left int }

func (w *failingWriter) Write(p []byte) (int, error) {
	if len(p) > w.left {
		n := w.left
		w.left = 0
		return n, io.ErrShortWrite
	}
	w.left -= len(p)
	return len(p), nil
}

// A DiskData over MaxDiskData bytes, or for a disk past MaxDisks, does
// not decode.
func TestDiskDataBounds(t *testing.T) {
	for _, m := range []DiskData{{Data: make([]byte, MaxDiskData+1)}, {Disk: MaxDisks}} {
		if _, err := Unmarshal(Marshal(m)); err == nil {
			t.Errorf("disk %d, %d bytes: decoded", m.Disk, len(m.Data))
		}
	}
	if _, err := Unmarshal(Marshal(DiskData{Disk: MaxDisks - 1, Data: make([]byte, MaxDiskData)})); err != nil {
		t.Errorf("the largest DiskData: %v", err)
	}
}

// A PageHashes frame over MaxPageHashes hashes does not decode; one at
// the bound does.
func TestPageHashesBounds(t *testing.T) {
	if _, err := Unmarshal(Marshal(PageHashes{Hashes: make([]uint64, MaxPageHashes+1)})); err == nil {
		t.Error("PageHashes over the bound decoded")
	}
	if _, err := Unmarshal(Marshal(PageHashes{Total: MaxPageHashes, Last: true, Hashes: make([]uint64, MaxPageHashes)})); err != nil {
		t.Errorf("the largest PageHashes: %v", err)
	}
}
