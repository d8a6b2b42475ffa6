package devices

import (
	"reflect"
	"testing"
	"time"
)

// 2024-02-29 (a Thursday) 23:59:58.5 UTC.
var rtcBase = time.Date(2024, 2, 29, 23, 59, 58, 500000000, time.UTC)

func newTestRTC() (*RTC, *fakeClock) {
	c := &fakeClock{}
	return NewRTC(c, rtcBase), c
}

func cmosRead(r *RTC, idx uint8) uint8 {
	out(r, 0, idx)
	return in(r, 1)
}

func cmosWrite(r *RTC, idx, v uint8) {
	out(r, 0, idx)
	out(r, 1, v)
}

var rtcTimeRegs = []uint8{RTC_SECONDS, RTC_MINUTES, RTC_HOURS, RTC_DAY_OF_WEEK,
	RTC_DAY_OF_MONTH, RTC_MONTH, RTC_YEAR, RTC_CENTURY}

func readTime(r *RTC) []uint8 {
	var v []uint8
	for _, i := range rtcTimeRegs {
		v = append(v, cmosRead(r, i))
	}
	return v
}

func checkTime(t *testing.T, what string, r *RTC, want ...uint8) {
	t.Helper()
	if got := readTime(r); !reflect.DeepEqual(got, want) {
		t.Fatalf("%s: time registers % x, want % x", what, got, want)
	}
}

// "Time, Calendar and Alarm Locations" in BCD (DM=0) and binary (DM=1);
// day of week 1 = Sunday; the clock rolls over at midnight, end of month.
func TestRTCTime(t *testing.T) {
	r, c := newTestRTC()
	checkTime(t, "BCD", r, 0x58, 0x59, 0x23, 0x05, 0x29, 0x02, 0x24, 0x20)
	c.now = 1.5e9
	checkTime(t, "BCD +1.5s", r, 0x00, 0x00, 0x00, 0x06, 0x01, 0x03, 0x24, 0x20)
	cmosWrite(r, RTC_REG_B, RTC_B_DM|RTC_B_24H)
	c.now = 0
	checkTime(t, "binary", r, 58, 59, 23, 5, 29, 2, 24, 20)
	if v := cmosRead(r, RTC_REG_B); v != 0x06 {
		t.Fatalf("register B %#x", v)
	}
}

// 12-hour mode: hours 1-12, bit 7 = PM; 0 h is 12 AM, 12 h is 12 PM.
func TestRTC12Hour(t *testing.T) {
	for _, tc := range []struct {
		hour int
		b    uint8
		want uint8
	}{
		{23, 0x00, 0x91}, {0, 0x00, 0x12}, {12, 0x00, 0x92}, {1, 0x00, 0x01},
		{11, 0x00, 0x11}, {23, RTC_B_DM, 0x8b}, {0, RTC_B_DM, 12},
	} {
		r := NewRTC(&fakeClock{}, time.Date(2024, 1, 1, tc.hour, 30, 0, 0, time.UTC))
		cmosWrite(r, RTC_REG_B, tc.b)
		if v := cmosRead(r, RTC_HOURS); v != tc.want {
			t.Errorf("%d h, B=%#x: hours %#x, want %#x", tc.hour, tc.b, v, tc.want)
		}
	}
	// Writing 12 PM in 12-hour BCD, read back in 24-hour mode.
	r, _ := newTestRTC()
	cmosWrite(r, RTC_REG_B, 0x00)
	cmosWrite(r, RTC_HOURS, 0x92)
	cmosWrite(r, RTC_REG_B, RTC_B_24H)
	if v := cmosRead(r, RTC_HOURS); v != 0x12 {
		t.Fatalf("hours %#x, want 0x12", v)
	}
}

// "Register C": UF is set by an update and the register clears on read;
// IRQF when a flag and its enable are both set.
func TestRTCRegisterC(t *testing.T) {
	r, c := newTestRTC()
	for _, tc := range []struct {
		now  int64
		want uint8
	}{
		{0, 0x00}, {0.4e9, 0x00}, {0.6e9, RTC_C_UF}, {0.7e9, 0x00}, {3e9, RTC_C_UF}, {3e9, 0x00},
	} {
		c.now = tc.now
		if v := cmosRead(r, RTC_REG_C); v != tc.want {
			t.Fatalf("t=%d: register C %#x, want %#x", tc.now, v, tc.want)
		}
	}
	cmosWrite(r, RTC_REG_B, RTC_B_24H|RTC_B_UIE)
	c.now = 4e9
	if v := cmosRead(r, RTC_REG_C); v != RTC_C_IRQF|RTC_C_UF {
		t.Fatalf("register C %#x, want 0x90", v)
	}
	cmosWrite(r, RTC_REG_C, 0xff) // read only
	if v := cmosRead(r, RTC_REG_C); v != 0 {
		t.Fatalf("register C %#x after write", v)
	}
}

// "Register A" UIP: set during the 244 us before each update, 0 while SET.
func TestRTCUIP(t *testing.T) {
	r, c := newTestRTC()
	for _, tc := range []struct {
		now  int64
		want uint8
	}{
		{0, 0x26}, {499_700_000, 0x26}, {499_755_859, 0x26}, {499_755_860, 0xa6},
		{499_999_999, 0xa6}, {500_000_000, 0x26},
	} {
		c.now = tc.now
		if v := cmosRead(r, RTC_REG_A); v != tc.want {
			t.Fatalf("t=%d: register A %#x, want %#x", tc.now, v, tc.want)
		}
	}
	cmosWrite(r, RTC_REG_B, RTC_B_SET|RTC_B_24H)
	c.now = 1_499_900_000
	if v := cmosRead(r, RTC_REG_A); v != 0x26 {
		t.Fatalf("register A %#x with SET", v)
	}
	cmosWrite(r, RTC_REG_A, 0xa6) // UIP is read only
	if v := cmosRead(r, RTC_REG_A); v != 0x26 {
		t.Fatalf("register A %#x after writing UIP", v)
	}
}

// "Register B" SET: updates stop, the guest writes the time, and the clock
// runs from it when SET is cleared, with the divider's phase unchanged.
func TestRTCSet(t *testing.T) {
	r, c := newTestRTC()
	cmosWrite(r, RTC_REG_B, RTC_B_SET|RTC_B_24H)
	for _, w := range [][2]uint8{{RTC_SECONDS, 0x00}, {RTC_MINUTES, 0x00}, {RTC_HOURS, 0x12},
		{RTC_DAY_OF_MONTH, 0x01}, {RTC_MONTH, 0x01}, {RTC_YEAR, 0x00}, {RTC_CENTURY, 0x20}} {
		cmosWrite(r, w[0], w[1])
	}
	c.now = 5e9
	checkTime(t, "stopped", r, 0x00, 0x00, 0x12, 0x05, 0x01, 0x01, 0x00, 0x20)
	c.now = 5.3e9
	cmosWrite(r, RTC_REG_B, RTC_B_24H)
	c.now = 5.4e9
	checkTime(t, "resumed", r, 0x00, 0x00, 0x12, 0x07, 0x01, 0x01, 0x00, 0x20) // a Saturday
	// The divider's boundary (the base was .5 s into a second).
	c.now = 5.5e9
	if v := cmosRead(r, RTC_SECONDS); v != 0x01 {
		t.Fatalf("seconds %#x at the first update, want 0x01", v)
	}
	c.now = 7.5e9
	if v := cmosRead(r, RTC_SECONDS); v != 0x03 {
		t.Fatalf("seconds %#x, want 0x03", v)
	}
	// SET clears UIE.
	cmosWrite(r, RTC_REG_B, RTC_B_SET|RTC_B_UIE|RTC_B_24H)
	if v := cmosRead(r, RTC_REG_B); v != RTC_B_SET|RTC_B_24H {
		t.Fatalf("register B %#x, want 0x82", v)
	}
}

// Writing a time register while the clock runs changes the clock.
func TestRTCWriteRunning(t *testing.T) {
	r, c := newTestRTC()
	cmosWrite(r, RTC_MINUTES, 0x30)
	checkTime(t, "minutes set", r, 0x58, 0x30, 0x23, 0x05, 0x29, 0x02, 0x24, 0x20)
	c.now = 1.5e9
	checkTime(t, "+1.5s", r, 0x00, 0x31, 0x23, 0x05, 0x29, 0x02, 0x24, 0x20)
	cmosWrite(r, RTC_CENTURY, 0x21)
	checkTime(t, "century", r, 0x00, 0x31, 0x23, 0x03, 0x29, 0x02, 0x24, 0x21) // 2124-02-29 is a Tuesday
	cmosWrite(r, RTC_DAY_OF_WEEK, 0x01)                                        // derived from the date: ignored
	if v := cmosRead(r, RTC_DAY_OF_WEEK); v != 0x03 {
		t.Fatalf("day of week %#x", v)
	}
}

// DV2-DV0 = 11x holds the divider in reset; the first update comes 500 ms
// after it returns to 010.
func TestRTCDividerReset(t *testing.T) {
	r, c := newTestRTC()
	c.now = 0.7e9 // 23:59:59.2
	cmosWrite(r, RTC_REG_A, 0x76)
	c.now = 3e9
	if v := cmosRead(r, RTC_SECONDS); v != 0x59 {
		t.Fatalf("seconds %#x in divider reset", v)
	}
	cmosWrite(r, RTC_REG_A, 0x26)
	c.now = 3.4999e9
	if v := cmosRead(r, RTC_SECONDS); v != 0x59 {
		t.Fatalf("seconds %#x before the first update", v)
	}
	c.now = 3.5e9
	checkTime(t, "first update", r, 0x00, 0x00, 0x00, 0x06, 0x01, 0x03, 0x24, 0x20)
}

// Register D (VRT), CMOS RAM, the NMI mask bit, unmodelled accesses, and
// that only time-dependent reads read the clock.
func TestRTCMisc(t *testing.T) {
	r, c := newTestRTC()
	if v := cmosRead(r, RTC_REG_D); v != RTC_D_VRT {
		t.Fatalf("register D %#x", v)
	}
	cmosWrite(r, RTC_REG_D, 0)
	if v := cmosRead(r, RTC_REG_D); v != RTC_D_VRT {
		t.Fatalf("register D %#x after write", v)
	}
	cmosWrite(r, 0x40, 0xab)
	cmosWrite(r, 0x7f, 0xcd)
	out(r, 0, RTC_NMI_DISABLE|0x40)
	if v := in(r, 1); v != 0xab || !r.NMIDisabled() {
		t.Fatalf("RAM 0x40 = %#x, NMI disabled %v", v, r.NMIDisabled())
	}
	if v := cmosRead(r, 0x7f); v != 0xcd || r.NMIDisabled() {
		t.Fatalf("RAM 0x7f = %#x, NMI disabled %v", v, r.NMIDisabled())
	}
	if !r.SetCMOS(0x10, 5) || r.SetCMOS(0x00, 1) || r.SetCMOS(RTC_CENTURY, 1) || r.SetCMOS(0x80, 1) {
		t.Fatal("SetCMOS index checks")
	}
	if v := cmosRead(r, 0x10); v != 5 {
		t.Fatalf("RAM 0x10 = %#x", v)
	}
	if c.reads != 0 {
		t.Fatalf("%d clock reads for RAM and register D", c.reads)
	}
	cmosRead(r, RTC_SECONDS)
	if c.reads != 1 {
		t.Fatalf("%d clock reads for a seconds read, want 1", c.reads)
	}
	if v := in(r, 0); v != 0xff {
		t.Fatalf("port 0x70 read %#x", v)
	}
	cmosWrite(r, RTC_REG_B, RTC_B_PIE|RTC_B_24H)
	if r.Unhandled() != 2 {
		t.Fatalf("unhandled %d, want 2", r.Unhandled())
	}
}

// The base time's wall-clock fields are used in its own location.
func TestRTCBaseLocation(t *testing.T) {
	base := time.Date(2030, 6, 15, 10, 20, 30, 0, time.FixedZone("X", 3600))
	r := NewRTC(&fakeClock{}, base)
	checkTime(t, "zone", r, 0x30, 0x20, 0x10, 0x07, 0x15, 0x06, 0x30, 0x20)
}

// An RTC restored from State mid-sequence behaves like the original, even
// if constructed with another base.
func TestRTCState(t *testing.T) {
	a, ca := newTestRTC()
	cmosWrite(a, 0x20, 0x77)
	ca.now = 2.2e9
	cmosRead(a, RTC_REG_C)
	cmosWrite(a, RTC_REG_B, RTC_B_SET|RTC_B_24H)
	cmosWrite(a, RTC_HOURS, 0x08)
	out(a, 0, RTC_NMI_DISABLE|RTC_MINUTES)

	cb := &fakeClock{now: ca.now}
	b := NewRTC(cb, time.Date(1999, 1, 1, 0, 0, 0, 0, time.UTC))
	if err := b.SetState(a.State()); err != nil {
		t.Fatal(err)
	}
	script := func(r *RTC, c *fakeClock) []uint8 {
		var res []uint8
		res = append(res, in(r, 1))
		out(r, 1, 0x15)
		c.now = 3.1e9
		cmosWrite(r, RTC_REG_B, RTC_B_24H)
		for _, n := range []int64{3.4e9, 3.5e9, 9e9} {
			c.now = n
			res = append(res, readTime(r)...)
			res = append(res, cmosRead(r, RTC_REG_C), cmosRead(r, RTC_REG_A), cmosRead(r, 0x20))
		}
		return res
	}
	sa, sb := script(a, ca), script(b, cb)
	if !reflect.DeepEqual(sa, sb) {
		t.Fatalf("restored RTC diverges:\n% x\n% x", sa, sb)
	}
	if !reflect.DeepEqual(a.State(), b.State()) {
		t.Fatal("states differ at end")
	}
	bad := a.State()
	bad.Running = false
	if err := b.SetState(bad); err == nil {
		t.Fatal("SetState accepted an inconsistent running flag")
	}
}
