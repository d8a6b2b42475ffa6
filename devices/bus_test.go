package devices

import (
	"io"
	"reflect"
	"testing"
)

// recDev records accesses.
type recDev struct {
	reads, writes []uint64
	last          []byte
}

func (d *recDev) Read(off uint64, data []byte) {
	d.reads = append(d.reads, off)
	for i := range data {
		data[i] = uint8(off) + uint8(i)
	}
}

func (d *recDev) Write(off uint64, data []byte) {
	d.writes = append(d.writes, off)
	d.last = append([]byte(nil), data...)
}

func TestBusRegisterOverlap(t *testing.T) {
	for _, tc := range []struct {
		name       string
		base, size uint64
		ok         bool
	}{
		{"same range", 0x100, 0x10, false},
		{"overlaps start", 0xf8, 0x10, false},
		{"overlaps end", 0x10f, 0x4, false},
		{"inside", 0x104, 0x2, false},
		{"contains", 0xf0, 0x40, false},
		{"overlaps second", 0x1ff, 0x2, false},
		{"adjacent below", 0xf0, 0x10, true},
		{"adjacent above", 0x110, 0x10, true},
		{"between", 0x120, 0xe0, true},
		{"zero size", 0x300, 0, false},
		{"wraps", 0xffffffff_fffffff0, 0x20, false},
		{"ends at 2^64", 0xffffffff_fffffff0, 0x10, true},
	} {
		b := NewBus()
		if err := b.Register(0x100, 0x10, "a", &recDev{}); err != nil {
			t.Fatal(err)
		}
		if err := b.Register(0x200, 0x10, "b", &recDev{}); err != nil {
			t.Fatal(err)
		}
		err := b.Register(tc.base, tc.size, "new", &recDev{})
		if (err == nil) != tc.ok {
			t.Errorf("%s: Register(%#x, %#x) err=%v, want ok=%v", tc.name, tc.base, tc.size, err, tc.ok)
		}
	}
	if err := NewBus().Register(0, 1, "nil", nil); err == nil {
		t.Error("nil device accepted")
	}
}

func TestBusDispatch(t *testing.T) {
	b := NewBus()
	d1, d2, d3 := &recDev{}, &recDev{}, &recDev{}
	for _, r := range []struct {
		base, size uint64
		name       string
		d          *recDev
	}{{0x3f8, 8, "com1", d1}, {0x20, 2, "pic", d2}, {0x70, 2, "rtc", d3}} {
		if err := b.Register(r.base, r.size, r.name, r.d); err != nil {
			t.Fatal(err)
		}
	}
	var buf [2]byte
	if !b.Read(0x3fd, buf[:]) || buf != [2]byte{5, 6} {
		t.Fatalf("read 0x3fd: % x", buf)
	}
	if !b.Write(0x21, []byte{0xaa}) || !reflect.DeepEqual(d2.writes, []uint64{1}) || d2.last[0] != 0xaa {
		t.Fatalf("write 0x21: %v % x", d2.writes, d2.last)
	}
	if !b.Write(0x70, []byte{1}) || !reflect.DeepEqual(d3.writes, []uint64{0}) {
		t.Fatalf("write 0x70: %v", d3.writes)
	}
	// Unmapped: 0xff, false, counted.
	buf = [2]byte{}
	if b.Read(0x3f7, buf[:]) || buf != [2]byte{0xff, 0xff} {
		t.Fatalf("unmapped read returned data % x", buf)
	}
	if b.Write(0x22, []byte{0}) || b.Write(0x80, []byte{0}) || b.Read(0x400, buf[:1]) {
		t.Fatal("unmapped access reported handled")
	}
	if b.Unhandled() != 4 {
		t.Fatalf("unhandled %d, want 4", b.Unhandled())
	}
	want := []Registration{{"pic", 0x20, 2}, {"rtc", 0x70, 2}, {"com1", 0x3f8, 8}}
	if got := b.Registrations(); !reflect.DeepEqual(got, want) {
		t.Fatalf("registrations %v", got)
	}
	if r, ok := b.Lookup(0x3ff); !ok || r.Name != "com1" {
		t.Fatalf("Lookup(0x3ff) = %v %v", r, ok)
	}
	if _, ok := b.Lookup(0x400); ok {
		t.Fatal("Lookup(0x400) found a device")
	}
}

type pcSet struct {
	bus   *Bus
	clock *fakeClock
	pic   *PIC
	pit   *PIT
	uart  *UART
	rtc   *RTC
}

func newPC(t testing.TB) pcSet {
	c := &fakeClock{}
	pic := NewPIC()
	s := pcSet{bus: NewBus(), clock: c, pic: pic, pit: NewPIT(c, pic),
		uart: NewUART(pic, IRQCOM1, io.Discard), rtc: NewRTC(c, rtcBase)}
	err := RegisterPC(s.bus, PCDevices{PIC: pic, PIT: s.pit, COM1: s.uart, RTC: s.rtc,
		Reset: NewResetControl(nil), I8042: NewI8042(nil), DebugExit: NewDebugExit(nil)})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestRegisterPC(t *testing.T) {
	s := newPC(t)
	var names []string
	for _, r := range s.bus.Registrations() {
		names = append(names, r.Name)
	}
	want := []string{"pic-master", "pit", "i8042-data", "port61", "i8042-cmd", "rtc",
		"pic-slave", "com1", "elcr", "debug-exit", "reset"}
	if !reflect.DeepEqual(names, want) {
		t.Fatalf("registrations %v", names)
	}
	// The PIC, PIT and UART work together through the bus.
	for _, w := range [][2]uint64{{0x20, 0x11}, {0x21, 0x30}, {0x21, 0x04}, {0x21, 0x01},
		{0xa0, 0x11}, {0xa1, 0x38}, {0xa1, 0x02}, {0xa1, 0x01}, {0x21, 0x00},
		{0x43, 0x34}, {0x40, 100}, {0x40, 0}, {0x3fc, 0x08}, {0x3f9, 0x02}} {
		s.bus.Write(w[0], []byte{uint8(w[1])})
	}
	if !s.pic.HasInterrupt() || s.pic.Acknowledge() != 0x34 {
		t.Fatal("COM1 THRE interrupt not delivered as vector 0x34")
	}
	dl, ok := s.pit.Deadline()
	s.pit.Fire(dl)
	if !ok || s.pic.Acknowledge() != 0x30 {
		t.Fatal("PIT interrupt not delivered as vector 0x30")
	}
}

// The vCPU exit path: bus Read/Write to the PIC, PIT, UART and RTC must not
// allocate.
func TestBusNoAlloc(t *testing.T) {
	s := newPC(t)
	b := s.bus
	var buf [1]byte
	w := func(port uint64, v uint8) { buf[0] = v; b.Write(port, buf[:]) }
	// Program the PIT and UART so the paths below do real work.
	w(0x43, 0x34)
	w(0x40, 0)
	w(0x40, 0)
	w(0x3fa, 0xc7)
	w(0x3f9, 0x0f)
	w(0x3fc, 0x0b)
	allocs := testing.AllocsPerRun(1000, func() {
		s.clock.now += 1000
		w(0x43, 0x00) // latch
		b.Read(0x40, buf[:])
		b.Read(0x40, buf[:])
		b.Read(0x61, buf[:])
		w(0x3f8, 'x') // THR -> io.Discard, THRE interrupt -> PIC
		b.Read(0x3fa, buf[:])
		s.uart.Receive('y')
		b.Read(0x3f8, buf[:])
		b.Read(0x3fd, buf[:])
		w(0x20, 0x0b)
		b.Read(0x20, buf[:])
		w(0x20, 0x20)
		w(0x70, RTC_SECONDS)
		b.Read(0x71, buf[:])
		w(0x70, RTC_REG_A)
		b.Read(0x71, buf[:])
		b.Read(0x1234, buf[:]) // unmapped
		if dl, ok := s.pit.Deadline(); ok {
			s.pit.Fire(dl)
		}
		s.pic.Acknowledge()
	})
	if allocs != 0 {
		t.Fatalf("%v allocations per run, want 0", allocs)
	}
}

func TestBusIndex(t *testing.T) {
	b := NewBus()
	for _, r := range []struct {
		base, size uint64
		name       string
	}{{0x3f8, 8, "com1"}, {0x20, 2, "pic"}, {0x70, 2, "rtc"}} {
		if err := b.Register(r.base, r.size, r.name, &recDev{}); err != nil {
			t.Fatal(err)
		}
	}
	regs := b.Registrations()
	for _, tc := range []struct {
		addr uint64
		name string // "" for unmapped
	}{
		{0x1f, ""}, {0x20, "pic"}, {0x21, "pic"}, {0x22, ""}, {0x70, "rtc"}, {0x71, "rtc"},
		{0x3f7, ""}, {0x3f8, "com1"}, {0x3ff, "com1"}, {0x400, ""}, {0, ""}, {^uint64(0), ""},
	} {
		i := b.Index(tc.addr)
		got := ""
		if i >= 0 {
			got = regs[i].Name
		}
		if got != tc.name {
			t.Errorf("Index(%#x) = %d (%q), want %q", tc.addr, i, got, tc.name)
		}
	}
	if n := testing.AllocsPerRun(100, func() { b.Index(0x3fd) }); n != 0 {
		t.Fatalf("Index allocates %.0f times", n)
	}
}
