package snapshot

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"reflect"
	"strings"
	"testing"

	"github.com/ftkvm/ftkvm/devices"
	"github.com/ftkvm/ftkvm/kvm"
)

const testMem = 4 << 20

// sampleState is a state with something in every section.
func sampleState() *State {
	s := &State{Header: Header{Version: Version, Kind: KindSnapshot, MemSize: testMem}}
	s.CPUID = []kvm.CPUIDEntry{{Function: 1, Eax: 0x806f8}, {Function: 7, Index: 0, Flags: 1, Ebx: 42}}
	s.VCPU.Regs = kvm.Regs{RAX: 1, RIP: 0x100000, RFLAGS: 0x202, R15: ^uint64(0)}
	s.VCPU.Sregs.CR0 = 0x80050033
	s.VCPU.Sregs.CS = kvm.Segment{Base: 0, Limit: 0xffffffff, Selector: 0x8, Type: 0xb, Present: 1, L: 1}
	s.VCPU.Sregs.InterruptBitmap[1] = 1 << 3
	s.VCPU.FPU.FCW = 0x37f
	s.VCPU.FPU.XMM[3][7] = 9
	s.VCPU.XSave.Region[0] = 0x37f
	s.VCPU.XSave.Region[1023] = 7
	s.VCPU.XCRs = kvm.XCRs{NrXCRs: 1}
	s.VCPU.XCRs.XCRs[0].Value = 1
	s.VCPU.Events.Interrupt = kvm.InterruptState{Injected: 1, Nr: 0x20, Shadow: kvm.ShadowIntSTI}
	s.VCPU.Events.Flags = kvm.VCPUEventValidShadow | kvm.VCPUEventValidNMIPending
	s.VCPU.DebugRegs.DR7 = 0x400
	s.VCPU.MSRs = []kvm.MSREntry{{Index: 0x10, Data: 12345}, {Index: 0xc0000082, Data: 0xffff800000001000}}
	s.Devices.PIC.Master = devices.PICChipState{IMR: 0xfe, VectorBase: 0x20, AutoEOI: true}
	s.Devices.PIT.Channels[0] = devices.PITChannelState{Mode: 2, RW: 3, CR: 11931, CRN: 11931, Count: 5, HasCount: true, StartTime: 77}
	s.Devices.UART.RxFIFO[3] = 'x'
	s.Devices.UART.RxCount = 1
	s.Devices.RTC.RAM[0x0b] = 2
	s.Devices.RTC.RefSec = 1_795_000_000
	s.Devices.I8042.CTR = 0x47
	s.Devices.ACPIPM = devices.ACPIPMState{En: 0x20, Cnt: 1}
	s.Disks = []Disk{{Size: 1 << 20, ReadOnly: true, Transport: devices.MMIOTransportState{
		Status: 0xf, DriverFeatures: 1<<32 | 1<<9, NumQueues: 1, IntStatus: 1, Line: true,
	}}}
	s.Disks[0].Transport.Queues[0] = devices.Queue{Max: 256, Size: 128, Ready: true, Desc: 0x10000, Avail: 0x11000, Used: 0x12000, LastAvail: 7, UsedIdx: 7}
	s.NICs = []NIC{{MAC: [6]byte{2, 0, 0, 0, 0, 1}, Transport: devices.MMIOTransportState{Status: 0xf, NumQueues: 2},
		Pending: [][]byte{bytes.Repeat([]byte{0xab}, 60), bytes.Repeat([]byte{0xcd}, devices.NetMaxFrame)}}}
	s.NICs[0].Transport.Queues[1] = devices.Queue{Max: 256, Size: 256, Ready: true, Desc: 0x20000, LastAvail: 3, UsedIdx: 3}
	s.Machine = Machine{TSCOffset: 99, Halted: true, RequestInterruptWindow: true, PointKind: 2, PointExits: 1234}
	s.Machine.Stats.Exits = 1234
	s.Machine.Stats.ConsoleBytes = 77
	s.Machine.Stats.Steps, s.Machine.Stats.Instrs, s.Machine.Stats.Emulated = 5000, 17, 3
	s.Env = Env{Now: 5_000_000_000, Input: []byte("quit\n")}
	return s
}

// writeSample writes a snapshot file of s with a few pages of memory, and
// returns the file and the memory it describes.
func writeSample(t testing.TB, s *State) ([]byte, []byte) {
	var buf bytes.Buffer
	w, err := WriteFile(&buf)
	if err != nil {
		t.Fatal(err)
	}
	sw, err := NewStreamWriter(w, s.Header)
	if err != nil {
		t.Fatal(err)
	}
	mem := make([]byte, s.Header.MemSize)
	r := rand.New(rand.NewPCG(1, 2))
	for _, pfn := range []uint64{0, 1, 7, 300, 301, 1023} {
		page := mem[pfn*PageSize : (pfn+1)*PageSize]
		for i := range page {
			page[i] = byte(r.Uint32())
		}
		if err := sw.Page(pfn, page, true); err != nil {
			t.Fatal(err)
		}
	}
	// A zero page is skipped in a first pass, recorded otherwise.
	if err := sw.Page(5, mem[5*PageSize:6*PageSize], true); err != nil {
		t.Fatal(err)
	}
	if err := sw.Page(6, mem[6*PageSize:7*PageSize], false); err != nil {
		t.Fatal(err)
	}
	if err := sw.State(s); err != nil {
		t.Fatal(err)
	}
	if err := sw.End(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes(), mem
}

func readSample(b []byte) (*State, []byte, error) {
	var mem []byte
	st, err := ReadFile(bytes.NewReader(b), func(h Header) ([]byte, error) {
		if h.MemSize > 64<<20 {
			return nil, errors.New("too big for a test")
		}
		mem = make([]byte, h.MemSize)
		return mem, nil
	})
	return st, mem, err
}

func TestRoundTrip(t *testing.T) {
	s := sampleState()
	file, mem := writeSample(t, s)
	got, gotMem, err := readSample(file)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(s, got) {
		t.Fatalf("state differs:\nwrote %+v\nread  %+v", s, got)
	}
	if !bytes.Equal(mem, gotMem) {
		t.Fatal("memory differs")
	}
}

// Every truncation of a snapshot is an error that says so; no prefix reads
// as a complete snapshot.
func TestTruncated(t *testing.T) {
	file, _ := writeSample(t, sampleState())
	for n := 0; n < len(file); n += 1 + n/64 {
		_, _, err := readSample(file[:n])
		if err == nil {
			t.Fatalf("%d of %d bytes read without error", n, len(file))
		}
		if n >= len(Magic) && !errors.Is(err, ErrTruncated) {
			t.Fatalf("%d of %d bytes: %v, want a truncation error", n, len(file), err)
		}
	}
	if _, _, err := readSample(file[:0]); !errors.Is(err, ErrNotSnapshot) {
		t.Fatalf("empty file: %v", err)
	}
}

// Every single-byte corruption after the magic is caught (CRC32C detects
// all of them) and reported as corruption, truncation or another version.
func TestCorrupt(t *testing.T) {
	file, _ := writeSample(t, sampleState())
	r := rand.New(rand.NewPCG(3, 4))
	for i := 0; i < 500; i++ {
		b := bytes.Clone(file)
		at := len(Magic) + r.IntN(len(b)-len(Magic))
		b[at] ^= byte(1 + r.IntN(255))
		_, _, err := readSample(b)
		var ve *VersionError
		if err == nil || !(errors.Is(err, ErrCorrupt) || errors.Is(err, ErrTruncated) || errors.As(err, &ve)) {
			t.Fatalf("byte %d changed: %v", at, err)
		}
	}
	b := bytes.Clone(file)
	b[0] = 'X'
	if _, _, err := readSample(b); !errors.Is(err, ErrNotSnapshot) {
		t.Fatalf("bad magic: %v", err)
	}
	if _, _, err := readSample(append(bytes.Clone(file), 0)); err == nil {
		t.Fatal("trailing byte accepted")
	}
}

// A snapshot of another version is refused with a message naming both.
func TestOtherVersion(t *testing.T) {
	file, _ := writeSample(t, sampleState())
	b := bytes.Clone(file)
	// Rewrite the first frame as the next version with a valid checksum: a
	// future ftkvm's file, not a corrupt one.
	const other = Version + 1
	h := b[len(Magic):]
	size := binary.LittleEndian.Uint32(h)
	h[6] = other
	payload := h[HeaderSize : HeaderSize+int(size)]
	binary.LittleEndian.PutUint32(payload, other)
	var fw bytes.Buffer
	w := NewWriter(&fw)
	if err := w.WriteFrame(FrameHeader, payload); err != nil {
		t.Fatal(err)
	}
	copy(h, fw.Bytes())
	h[6] = other
	_, _, err := readSample(b)
	var ve *VersionError
	want := fmt.Sprintf("version %d; this ftkvm reads version %d", other, Version)
	if !errors.As(err, &ve) || ve.Got != other || !strings.Contains(err.Error(), want) {
		t.Fatalf("got %v", err)
	}
}

// Streams are checked for structure, not only checksums.
func TestStructure(t *testing.T) {
	s := sampleState()
	frames := func(build func(w *Writer)) []byte {
		var buf bytes.Buffer
		w, _ := WriteFile(&buf)
		build(w)
		return buf.Bytes()
	}
	hdr := EncodeHeader(nil, &s.Header)
	state := func(w *Writer, skip FrameType) uint64 {
		n := uint64(0)
		for _, f := range []struct {
			t FrameType
			p []byte
		}{
			{FrameCPUID, EncodeCPUID(nil, s.CPUID)},
			{FrameVCPU, EncodeVCPU(nil, &s.VCPU)},
			{FrameDevices, EncodeDevices(nil, &s.Devices)},
			{FrameDisks, EncodeDisks(nil, s.Disks)},
			{FrameNICs, EncodeNICs(nil, s.NICs)},
			{FrameMachine, EncodeMachine(nil, &s.Machine)},
			{FrameEnv, EncodeEnv(nil, &s.Env)},
		} {
			if f.t != skip {
				w.WriteFrame(f.t, f.p)
				n++
			}
		}
		return n
	}
	for _, tc := range []struct {
		name  string
		file  []byte
		error string
	}{
		{"no header", frames(func(w *Writer) { state(w, 0) }), "not a header"},
		{"missing vcpu", frames(func(w *Writer) {
			w.WriteFrame(FrameHeader, hdr)
			n := state(w, FrameVCPU)
			w.WriteFrame(FrameEnd, EncodeEnd(nil, &End{Frames: n + 1}))
		}), "no vcpu frame"},
		{"missing network interfaces", frames(func(w *Writer) {
			w.WriteFrame(FrameHeader, hdr)
			n := state(w, FrameNICs)
			w.WriteFrame(FrameEnd, EncodeEnd(nil, &End{Frames: n + 1}))
		}), "no network interfaces frame"},
		{"oversized waiting frame", frames(func(w *Writer) {
			w.WriteFrame(FrameHeader, hdr)
			big := *s
			big.NICs = []NIC{{Transport: devices.MMIOTransportState{NumQueues: 2}, Pending: [][]byte{make([]byte, devices.NetMaxFrame+1)}}}
			w.WriteFrame(FrameNICs, EncodeNICs(nil, big.NICs))
		}), "count 1519 exceeds 1518"},
		{"twice", frames(func(w *Writer) {
			w.WriteFrame(FrameHeader, hdr)
			state(w, 0)
			state(w, 0)
		}), "second cpuid frame"},
		{"wrong count", frames(func(w *Writer) {
			w.WriteFrame(FrameHeader, hdr)
			n := state(w, 0)
			w.WriteFrame(FrameEnd, EncodeEnd(nil, &End{Frames: n}))
		}), "end frame counts"},
		{"no end", frames(func(w *Writer) {
			w.WriteFrame(FrameHeader, hdr)
			state(w, 0)
		}), "without its end frame"},
		{"page beyond memory", frames(func(w *Writer) {
			w.WriteFrame(FrameHeader, hdr)
			w.WriteFrame(FrameZeroPages, le.AppendUint64(le.AppendUint32(nil, 1), testMem/PageSize))
		}), "beyond guest memory"},
		{"odd memory size", frames(func(w *Writer) {
			h := s.Header
			h.MemSize = 3 << 20
			w.WriteFrame(FrameHeader, EncodeHeader(nil, &h))
		}), "multiple of 2 MiB"},
		{"wire frame", frames(func(w *Writer) {
			w.WriteFrame(FrameHeader, hdr)
			w.WriteFrame(FrameCommit, nil)
		}), "unexpected commit frame"},
		{"remote error", frames(func(w *Writer) {
			w.WriteFrame(FrameHeader, hdr)
			w.WriteFrame(FrameError, EncodeError(nil, "disk full\n"))
		}), "reported: disk full?"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, _, err := readSample(tc.file)
			if err == nil || !strings.Contains(err.Error(), tc.error) {
				t.Fatalf("got %v, want an error containing %q", err, tc.error)
			}
		})
	}
}

// The payload layouts are fixed by Version. If one of these sizes changes
// (a device model or a kvm struct grew a field), bump Version.
func TestLayout(t *testing.T) {
	for _, tc := range []struct {
		name string
		v    any
		size int
	}{
		{"Header", Header{}, 24},
		{"kvm.CPUIDEntry", kvm.CPUIDEntry{}, 28},
		{"kvm.Regs", kvm.Regs{}, 144},
		{"kvm.Sregs", kvm.Sregs{}, 312},
		{"kvm.FPU", kvm.FPU{}, 416},
		{"kvm.XSave", kvm.XSave{}, 4096},
		{"kvm.XCRs", kvm.XCRs{}, 392},
		{"kvm.VCPUEvents", kvm.VCPUEvents{}, 64},
		{"kvm.DebugRegs", kvm.DebugRegs{}, 128},
		{"kvm.MPState", kvm.MPState{}, 4},
		{"Devices", Devices{}, -1},
		{"Disk", Disk{}, 311},
		{"Machine", Machine{}, -1},
		{"End", End{}, 16},
	} {
		got := binary.Size(tc.v)
		if tc.size >= 0 && got != tc.size {
			t.Errorf("%s encodes in %d bytes, the format says %d: bump snapshot.Version and update this test", tc.name, got, tc.size)
		}
		if got <= 0 {
			t.Errorf("%s has no fixed size", tc.name)
		}
	}
	// Devices and Machine: pin the sizes too.
	if got, want := binary.Size(Devices{}), devicesSize; got != want {
		t.Errorf("Devices encodes in %d bytes, the format says %d: bump snapshot.Version and update devicesSize", got, want)
	}
	if got, want := binary.Size(Machine{}), machineSize; got != want {
		t.Errorf("Machine encodes in %d bytes, the format says %d: bump snapshot.Version and update machineSize", got, want)
	}
}

func TestFrameReaderEOF(t *testing.T) {
	r := NewReader(bytes.NewReader(nil))
	if _, _, err := r.Next(); err != io.EOF {
		t.Fatalf("empty input: %v", err)
	}
	var buf bytes.Buffer
	w := NewWriter(&buf)
	w.WriteFrame(FrameCommit, nil)
	w.WriteFrame(FrameError, []byte("x"))
	r = NewReader(&buf)
	for _, want := range []FrameType{FrameCommit, FrameError} {
		if typ, _, err := r.Next(); err != nil || typ != want {
			t.Fatalf("got %v %v, want %v", typ, err, want)
		}
	}
	if _, _, err := r.Next(); err != io.EOF {
		t.Fatalf("at end: %v", err)
	}
}

// Encoded sizes of the device and machine sections in format version 3.
const (
	devicesSize = 415
	machineSize = 139
)
