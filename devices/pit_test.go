package devices

import (
	"reflect"
	"testing"
)

func newTestPIT() (*PIT, *fakeClock, *irqRec) {
	c := &fakeClock{}
	r := &irqRec{}
	return NewPIT(c, r), c, r
}

// at sets the clock to the instant counter ticks reach k, for a count loaded
// at start.
func at(c *fakeClock, start, k int64) { c.now = start + pitNanos(k) }

// latchRead latches counter ch (Counter Latch Command) and reads it in
// LSB-then-MSB access mode.
func latchRead(p *PIT, ch uint8) uint16 {
	out(p, 3, ch<<6)
	lo := in(p, uint64(ch))
	hi := in(p, uint64(ch))
	return uint16(lo) | uint16(hi)<<8
}

// status uses the Read-Back Command to latch and read counter ch's status.
func status(p *PIT, ch uint8) uint8 {
	out(p, 3, 0xc0|PIT_RB_COUNT|PIT_RB_CNT0<<ch)
	return in(p, uint64(ch))
}

func load16(p *PIT, ch uint8, v uint16) { out(p, uint64(ch), uint8(v), uint8(v>>8)) }

// The tick/time conversion both ways: 1193182 Hz.
func TestPITTickConversion(t *testing.T) {
	for _, tc := range []struct{ k, ns int64 }{
		{0, 0}, {1, 839}, {100, 83810}, {1000, 838096}, {1001, 838934},
		{11931, 9999313}, {1193182, 1000000000},
	} {
		if got := pitNanos(tc.k); got != tc.ns {
			t.Errorf("pitNanos(%d) = %d, want %d", tc.k, got, tc.ns)
		}
		if got := pitTicks(tc.ns); got != tc.k {
			t.Errorf("pitTicks(%d) = %d, want %d", tc.ns, got, tc.k)
		}
		if tc.k > 0 {
			if got := pitTicks(tc.ns - 1); got != tc.k-1 {
				t.Errorf("pitTicks(%d) = %d, want %d", tc.ns-1, got, tc.k-1)
			}
		}
	}
	// No overflow after a long uptime (about 100 days).
	if got := pitTicks(100 * 86400 * 1e9); got != 100*86400*PITFrequency {
		t.Errorf("pitTicks(100 days) = %d", got)
	}
}

type pitPoint struct {
	tick  int64
	count uint16
	out   bool
}

func checkPoints(t *testing.T, p *PIT, c *fakeClock, ch uint8, start int64, pts []pitPoint) {
	t.Helper()
	for _, pt := range pts {
		at(c, start, pt.tick)
		if v := latchRead(p, ch); v != pt.count {
			t.Errorf("tick %d: count %#x (%d), want %#x (%d)", pt.tick, v, v, pt.count, pt.count)
		}
		if o := status(p, ch)&PIT_STATUS_OUTPUT != 0; o != pt.out {
			t.Errorf("tick %d: OUT %v, want %v", pt.tick, o, pt.out)
		}
	}
}

// "Mode 0: Interrupt on Terminal Count": OUT low until the count reaches 0,
// then high until a new count or control word; the counter wraps on.
func TestPITMode0(t *testing.T) {
	p, c, r := newTestPIT()
	out(p, 3, 0x30) // counter 0, LSB/MSB, mode 0, binary
	if _, ok := p.Deadline(); ok {
		t.Fatal("deadline before a count is written")
	}
	load16(p, 0, 1000)
	checkPoints(t, p, c, 0, 0, []pitPoint{
		{0, 1000, false}, {1, 999, false}, {400, 600, false}, {999, 1, false},
		{1000, 0, true}, {1001, 0xffff, true}, {1500, 0xfe0c, true},
	})
	reads := c.reads
	dl, ok := p.Deadline()
	if !ok || dl != 838096 {
		t.Fatalf("Deadline = %d %v, want 838096", dl, ok)
	}
	p.Fire(838095)
	if len(r.ev) != 0 {
		t.Fatalf("Fire before the deadline raised %v", r.ev)
	}
	p.Fire(838096)
	eqEvents(t, "fire", r.take(), []irqEvent{{0, true}, {0, false}})
	if _, ok := p.Deadline(); ok {
		t.Fatal("mode 0 deadline after firing")
	}
	p.Fire(10e9)
	if len(r.ev) != 0 {
		t.Fatal("mode 0 fired twice")
	}
	if c.reads != reads {
		t.Fatalf("Deadline/Fire read the clock %d times", c.reads-reads)
	}
}

// "Mode 2: Rate Generator": N, N-1, ..., 1 (OUT low for that CLK), reload.
func TestPITMode2(t *testing.T) {
	p, c, r := newTestPIT()
	c.now = 5000
	out(p, 3, 0x34)
	load16(p, 0, 100)
	checkPoints(t, p, c, 0, 5000, []pitPoint{
		{0, 100, true}, {1, 99, true}, {98, 2, true}, {99, 1, false},
		{100, 100, true}, {150, 50, true}, {199, 1, false}, {200, 100, true},
	})
	if dl, ok := p.Deadline(); !ok || dl != 5000+83810 {
		t.Fatalf("Deadline = %d %v, want %d", dl, ok, 5000+83810)
	}
	// Firing late catches up: each Fire delivers one edge, and the
	// deadline is the next edge even when it is due already.
	for _, next := range []int64{200, 300, 400} {
		p.Fire(5000 + 293334) // tick 350
		eqEvents(t, "fire", r.take(), []irqEvent{{0, true}, {0, false}})
		if dl, ok := p.Deadline(); !ok || dl != 5000+pitNanos(next) {
			t.Fatalf("Deadline = %d %v, want %d (tick %d)", dl, ok, 5000+pitNanos(next), next)
		}
	}
	p.Fire(5000 + 293334)
	if ev := r.take(); len(ev) != 0 {
		t.Fatalf("caught up, yet Fire raised %v", ev)
	}
	p.Fire(5000 + 335239)
	if dl, _ := p.Deadline(); dl != 5000+pitNanos(500) {
		t.Fatalf("Deadline = %d, want tick 500", dl)
	}
	// A control word stops the counter: no deadline.
	out(p, 3, 0x34)
	if _, ok := p.Deadline(); ok {
		t.Fatal("deadline after control word")
	}
}

// "Mode 3: Square Wave": even N high N/2 low N/2; odd N high (N+1)/2 low
// (N-1)/2, loading N-1 and decrementing by two. Counter 2 via port 0x61.
func TestPITMode3(t *testing.T) {
	for _, tc := range []struct {
		n   uint16
		pts []pitPoint
	}{
		{10, []pitPoint{{0, 10, true}, {1, 8, true}, {4, 2, true}, {5, 10, false},
			{6, 8, false}, {9, 2, false}, {10, 10, true}, {15, 10, false}}},
		{5, []pitPoint{{0, 4, true}, {1, 2, true}, {2, 0, true}, {3, 4, false},
			{4, 2, false}, {5, 4, true}}},
	} {
		p, c, _ := newTestPIT()
		out(p.Speaker(), 0, PORT61_GATE2)
		out(p, 3, 0xb6) // counter 2, LSB/MSB, mode 3
		load16(p, 2, tc.n)
		checkPoints(t, p, c, 2, 0, tc.pts)
		for _, pt := range tc.pts {
			at(c, 0, pt.tick)
			if o := in(p.Speaker(), 0)&PORT61_OUT2 != 0; o != pt.out {
				t.Errorf("N=%d tick %d: port 0x61 OUT2 %v, want %v", tc.n, pt.tick, o, pt.out)
			}
		}
	}
}

// "Mode 1: Hardware Retriggerable One-Shot", "Mode 4: Software Triggered
// Strobe", "Mode 5: Hardware Triggered Strobe".
func TestPITModes145(t *testing.T) {
	// Mode 1 on counter 2: waits for a gate rising edge.
	p, c, _ := newTestPIT()
	out(p, 3, 0xb2)
	load16(p, 2, 10)
	if status(p, 2) != PIT_STATUS_OUTPUT|PIT_STATUS_NULLCOUNT|0x30|0x02 {
		t.Fatalf("mode 1 status before trigger %#x", status(p, 2))
	}
	at(c, 0, 5)
	out(p.Speaker(), 0, PORT61_GATE2)
	start := c.now
	checkPoints(t, p, c, 2, start, []pitPoint{{0, 10, false}, {3, 7, false}, {9, 1, false}, {10, 0, true}})
	// Retrigger reloads.
	out(p.Speaker(), 0, 0)
	at(c, start, 12)
	out(p.Speaker(), 0, PORT61_GATE2)
	checkPoints(t, p, c, 2, c.now, []pitPoint{{0, 10, false}, {10, 0, true}})

	// Mode 4 on counter 0: OUT low for one CLK at count 0; IRQ0 edge when it
	// rises again.
	p, c, r := newTestPIT()
	out(p, 3, 0x38)
	load16(p, 0, 10)
	checkPoints(t, p, c, 0, 0, []pitPoint{{0, 10, true}, {9, 1, true}, {10, 0, false}, {11, 0xffff, true}})
	if dl, ok := p.Deadline(); !ok || dl != pitNanos(11) {
		t.Fatalf("mode 4 deadline %d %v, want %d", dl, ok, pitNanos(11))
	}
	p.Fire(pitNanos(11))
	eqEvents(t, "mode 4", r.take(), []irqEvent{{0, true}, {0, false}})
	if _, ok := p.Deadline(); ok {
		t.Fatal("mode 4 deadline after firing")
	}

	// Mode 5 on counter 2.
	p, c, _ = newTestPIT()
	out(p, 3, 0xba)
	load16(p, 2, 10)
	out(p.Speaker(), 0, PORT61_GATE2)
	checkPoints(t, p, c, 2, 0, []pitPoint{{0, 10, true}, {10, 0, false}, {11, 0xffff, true}})
}

// "Counter Latch Command": the latched count is held until read, and a
// second latch before the read is ignored. Unlatched reads are live, each
// byte read at its own time.
func TestPITLatch(t *testing.T) {
	p, c, _ := newTestPIT()
	out(p, 3, 0x34)
	load16(p, 0, 1000)
	at(c, 0, 100)
	out(p, 3, 0x00)
	at(c, 0, 200)
	out(p, 3, 0x00) // ignored
	at(c, 0, 300)
	if lo, hi := in(p, 0), in(p, 0); lo != 0x84 || hi != 0x03 { // 900
		t.Fatalf("latched %#x %#x, want 0x84 0x03", lo, hi)
	}
	if v := latchRead(p, 0); v != 700 {
		t.Fatalf("new latch %d, want 700", v)
	}
	lo := in(p, 0) // 700 = 0x2bc
	at(c, 0, 301)
	hi := in(p, 0) // 699 = 0x2bb
	if lo != 0xbc || hi != 0x02 {
		t.Fatalf("live read %#x %#x, want 0xbc 0x02", lo, hi)
	}
}

// "Read-Back Command" and "Status Byte": OUTPUT, NULL COUNT, RW, mode, BCD;
// status is read before the count; several counters at once; existing
// latches are kept.
func TestPITReadBack(t *testing.T) {
	p, c, _ := newTestPIT()
	out(p, 3, 0x34)
	if s := status(p, 0); s != 0xf4 {
		t.Fatalf("mode 2 status after control word %#x, want 0xf4", s)
	}
	out(p, 3, 0x30)
	if s := status(p, 0); s != 0x70 {
		t.Fatalf("mode 0 status after control word %#x, want 0x70", s)
	}
	out(p, 3, 0x34)
	load16(p, 0, 1000)
	if s := status(p, 0); s != 0xb4 {
		t.Fatalf("mode 2 status after count %#x, want 0xb4", s)
	}
	out(p, 3, 0x70) // counter 1 mode 0
	load16(p, 1, 500)
	out(p, 3, 0x97) // counter 2, LSB only, mode 3, BCD; gate low
	out(p, 2, 0x50)

	at(c, 0, 100)
	out(p, 3, 0xc0|PIT_RB_CNT0|PIT_RB_CNT1|PIT_RB_CNT2) // count and status
	at(c, 0, 150)
	out(p, 3, 0xc0|PIT_RB_CNT0) // ignored: already latched
	at(c, 0, 200)
	got := []uint8{
		in(p, 0), in(p, 0), in(p, 0),
		in(p, 1), in(p, 1), in(p, 1),
		in(p, 2), in(p, 2),
	}
	want := []uint8{
		0xb4, 0x84, 0x03, // status, 900
		0x30, 0x90, 0x01, // mode 0 OUT low, 400
		0x97, 0x50, // gate low: OUT high, count held; LSB only
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("read-back bytes % x, want % x", got, want)
	}
	// Count only (STATUS bit set = don't latch status).
	out(p, 3, 0xc0|PIT_RB_STATUS|PIT_RB_CNT0)
	at(c, 0, 250)
	if lo, hi := in(p, 0), in(p, 0); lo != 0x20 || hi != 0x03 { // 800
		t.Fatalf("count-only read-back %#x %#x", lo, hi)
	}
}

// "Control Word Format" RW: LSB only, MSB only, LSB then MSB.
func TestPITAccessModes(t *testing.T) {
	p, c, _ := newTestPIT()
	out(p, 3, 0x10) // LSB only
	out(p, 0, 0x34)
	at(c, 0, 4)
	if a, b := in(p, 0), in(p, 0); a != 0x30 || b != 0x30 {
		t.Fatalf("LSB only reads %#x %#x", a, b)
	}
	out(p, 3, 0x20) // MSB only
	out(p, 0, 0x12) // 0x1200
	start := c.now
	at(c, start, 0x100)
	if a, b := in(p, 0), in(p, 0); a != 0x11 || b != 0x11 {
		t.Fatalf("MSB only reads %#x %#x", a, b)
	}
	out(p, 3, 0x30) // LSB then MSB
	out(p, 0, 0x78)
	if _, ok := p.Deadline(); ok {
		t.Fatal("counting after the first byte only")
	}
	out(p, 0, 0x56)
	start = c.now
	at(c, start, 0x10)
	if a, b, d := in(p, 0), in(p, 0), in(p, 0); a != 0x68 || b != 0x56 || d != 0x68 {
		t.Fatalf("LSB/MSB reads %#x %#x %#x", a, b, d)
	}
}

// BCD counting: a count of 0 is 10000, values wrap at 9999.
func TestPITBCD(t *testing.T) {
	p, c, _ := newTestPIT()
	out(p, 3, 0x31)
	load16(p, 0, 0x1000)
	checkPoints(t, p, c, 0, 0, []pitPoint{{1, 0x0999, false}, {1000, 0x0000, true}, {1001, 0x9999, true}})
	if dl, _ := p.Deadline(); dl != pitNanos(1000) {
		t.Fatalf("BCD deadline %d", dl)
	}
	load16(p, 0, 0)
	start := c.now
	checkPoints(t, p, c, 0, start, []pitPoint{{1, 0x9999, false}, {9999, 0x0001, false}})
	if s := status(p, 0); s&PIT_CW_BCD == 0 {
		t.Fatalf("status %#x lacks BCD", s)
	}
}

// Mode 0: writing the first byte of a two-byte count stops counting and
// sets OUT low; the second byte restarts with the new count.
func TestPITMode0Rewrite(t *testing.T) {
	p, c, _ := newTestPIT()
	out(p, 3, 0x30)
	load16(p, 0, 1000)
	at(c, 0, 500)
	out(p, 0, 0x10)
	if _, ok := p.Deadline(); ok {
		t.Fatal("deadline while the count is half written")
	}
	if s := status(p, 0); s != 0x70 {
		t.Fatalf("status %#x, want 0x70", s)
	}
	at(c, 0, 600)
	out(p, 0, 0x00)
	if dl, ok := p.Deadline(); !ok || dl != 502858+pitNanos(16) {
		t.Fatalf("deadline %d %v, want %d", dl, ok, 502858+pitNanos(16))
	}
}

// Mode 2: a count written while counting is used from the end of the
// current period; NULL COUNT is set until then.
func TestPITMode2NewCount(t *testing.T) {
	p, c, r := newTestPIT()
	out(p, 3, 0x34)
	load16(p, 0, 100)
	p.Fire(pitNanos(100))
	r.take()
	at(c, 0, 150)
	load16(p, 0, 40)
	if s := status(p, 0); s&PIT_STATUS_NULLCOUNT == 0 {
		t.Fatalf("status %#x: NULL COUNT clear before the reload", s)
	}
	checkPoints(t, p, c, 0, 0, []pitPoint{{199, 1, false}, {200, 40, true}, {201, 39, true}, {240, 40, true}})
	if s := status(p, 0); s&PIT_STATUS_NULLCOUNT != 0 {
		t.Fatalf("status %#x: NULL COUNT set after the reload", s)
	}
	if dl, _ := p.Deadline(); dl != 167620 {
		t.Fatalf("deadline %d, want 167620 (tick 200)", dl)
	}
	p.Fire(167620)
	if dl, _ := p.Deadline(); dl != 201143 {
		t.Fatalf("deadline %d, want 201143 (tick 240)", dl)
	}
}

// "Gate": in mode 0 a low gate suspends counting.
func TestPITGatePause(t *testing.T) {
	p, c, _ := newTestPIT()
	out(p.Speaker(), 0, PORT61_GATE2)
	out(p, 3, 0xb0)
	load16(p, 2, 1000)
	at(c, 0, 100)
	out(p.Speaker(), 0, 0)
	at(c, 0, 300)
	if v := latchRead(p, 2); v != 900 {
		t.Fatalf("paused count %d, want 900", v)
	}
	out(p.Speaker(), 0, PORT61_GATE2)
	checkPoints(t, p, c, 2, c.now, []pitPoint{{100, 800, false}, {899, 1, false}, {900, 0, true}})

	// Mode 2: gate low forces OUT high; the rising edge reloads.
	p, c, _ = newTestPIT()
	out(p.Speaker(), 0, PORT61_GATE2)
	out(p, 3, 0xb4)
	load16(p, 2, 10)
	at(c, 0, 9)
	if in(p.Speaker(), 0)&PORT61_OUT2 != 0 {
		t.Fatal("OUT2 high at count 1")
	}
	out(p.Speaker(), 0, 0)
	if in(p.Speaker(), 0)&PORT61_OUT2 == 0 {
		t.Fatal("OUT2 low with gate low in mode 2")
	}
	at(c, 0, 20)
	out(p.Speaker(), 0, PORT61_GATE2)
	checkPoints(t, p, c, 2, c.now, []pitPoint{{0, 10, true}, {4, 6, true}})
}

// Linux's pit_calibrate_tsc: gate high, speaker off, counter 2 mode 0 with
// a 10 ms count, then poll port 0x61 until OUT2 rises.
func TestPITLinuxCalibration(t *testing.T) {
	p, c, _ := newTestPIT()
	v := in(p.Speaker(), 0)
	out(p.Speaker(), 0, (v&^PORT61_SPKR)|PORT61_GATE2)
	out(p, 3, 0xb0)
	const latch = PITFrequency / 100 // 11931
	out(p, 2, latch&0xff, latch>>8)
	reads := c.reads
	n := 0
	for in(p.Speaker(), 0)&PORT61_OUT2 == 0 {
		c.now += 1000
		n++
		if n > 1e6 {
			t.Fatal("OUT2 never rose")
		}
	}
	if c.now != 10000000 { // first multiple of 1 us >= 9999313 ns
		t.Fatalf("OUT2 rose at %d ns, want 10000000", c.now)
	}
	if c.reads-reads != n+1 {
		t.Fatalf("%d clock reads for %d port reads", c.reads-reads, n+1)
	}
	// quick_pit_calibrate reads the live counter MSB from 0xffff.
	out(p, 3, 0xb0)
	out(p, 2, 0xff, 0xff)
	start := c.now
	if lo, hi := in(p, 2), in(p, 2); lo != 0xff || hi != 0xff {
		t.Fatalf("first read %#x %#x", lo, hi)
	}
	at(c, start, 256)
	if lo, hi := in(p, 2), in(p, 2); lo != 0xff || hi != 0xfe {
		t.Fatalf("read after 256 ticks %#x %#x", lo, hi)
	}
}

// Port 0x61: bits 0-3 read back, 4-7 are read only; refresh toggles on each
// read; reading it does not read the clock when counter 2 is idle.
func TestPITPort61(t *testing.T) {
	p, c, _ := newTestPIT()
	if a, b := in(p.Speaker(), 0), in(p.Speaker(), 0); a != 0x10 || b != 0x00 {
		t.Fatalf("port 0x61 reads %#x %#x, want 0x10 0x00", a, b)
	}
	out(p.Speaker(), 0, 0xff)
	if a, b := in(p.Speaker(), 0), in(p.Speaker(), 0); a != 0x1f || b != 0x0f {
		t.Fatalf("port 0x61 reads %#x %#x, want 0x1f 0x0f", a, b)
	}
	if c.reads != 0 {
		t.Fatalf("%d clock reads with counter 2 idle", c.reads)
	}
	// Control words, Deadline and reads of an idle counter don't read it.
	out(p, 3, 0x34)
	p.Deadline()
	in(p, 0)
	if c.reads != 0 {
		t.Fatalf("%d clock reads", c.reads)
	}
	load16(p, 0, 5)
	if c.reads != 1 {
		t.Fatalf("%d clock reads for a count load, want 1", c.reads)
	}
}

func TestPITUnhandled(t *testing.T) {
	p, _, _ := newTestPIT()
	if v := in(p, 3); v != 0xff {
		t.Fatalf("read 0x43 = %#x", v)
	}
	out(p, 4, 0)
	if p.Unhandled() != 2 {
		t.Fatalf("unhandled %d, want 2", p.Unhandled())
	}
}

// A PIT restored from State mid-sequence behaves like the original.
func TestPITState(t *testing.T) {
	a, ca, ra := newTestPIT()
	out(a, 3, 0x34)
	load16(a, 0, 100)
	at(ca, 0, 150)
	out(a, 0, 40) // half of a rewrite
	out(a.Speaker(), 0, PORT61_GATE2|PORT61_SPKR)
	out(a, 3, 0xb0)
	load16(a, 2, 1000)
	at(ca, 0, 170)
	out(a, 3, 0x80) // latch counter 2
	in(a, 2)        // LSB read, MSB pending
	in(a.Speaker(), 0)

	b, cb, rb := newTestPIT()
	if err := b.SetState(a.State()); err != nil {
		t.Fatal(err)
	}
	cb.now = ca.now
	script := func(p *PIT, c *fakeClock, r *irqRec) []uint64 {
		var res []uint64
		out(p, 0, 0) // MSB: count 40 pending at tick 200
		res = append(res, uint64(in(p, 2)))
		for _, k := range []int64{199, 200, 230} {
			at(c, 0, k)
			res = append(res, uint64(latchRead(p, 0)), uint64(in(p.Speaker(), 0)))
		}
		for i := 0; i < 3; i++ {
			dl, _ := p.Deadline()
			p.Fire(dl)
			res = append(res, uint64(dl))
		}
		res = append(res, uint64(len(r.take())))
		return res
	}
	sa, sb := script(a, ca, ra), script(b, cb, rb)
	if !reflect.DeepEqual(sa, sb) {
		t.Fatalf("restored PIT diverges:\n%v\n%v", sa, sb)
	}
	if !reflect.DeepEqual(a.State(), b.State()) {
		t.Fatal("states differ at end")
	}
	bad := a.State()
	bad.Channels[1].RW = 0
	if err := b.SetState(bad); err == nil {
		t.Fatal("SetState accepted RW 0")
	}
}

// A late tick is not lost: every edge of counter 0 reaches the CPU, one
// per acknowledgement, however late the environment fires (up to
// pitMaxLag). The PIT and PIC are the machine's: an edge while the PIC
// still holds the previous one would merge with it, so Fire waits.
func TestPITCatchUpThroughPIC(t *testing.T) {
	const N = 11932 // 100 Hz
	period := pitNanos(N)
	for _, tc := range []struct {
		name      string
		late      int64 // virtual ns past the first edge when Fire starts
		mask      bool  // IRQ0 masked at the PIC
		wantTicks int64 // interrupts the CPU takes by the end
	}{
		{"on time", 0, false, 1},
		{"late by 5.5 periods", 5*period + period/2, false, 6},
		{"late by 3 s", 3e9, false, pitTicks(1e9)/N + 1}, // the due edge, then pitMaxLag of edges
		{"masked", 5*period + period/2, true, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := &fakeClock{}
			pic := NewPIC()
			out(pic.Master(), 0, 0x11)             // ICW1
			out(pic.Master(), 1, 0x20, 0x04, 0x01) // ICW2-4: vectors 0x20
			if tc.mask {
				out(pic.Master(), 1, 0x01) // OCW1: IRQ0 masked
			}
			p := NewPIT(c, pic)
			out(p, 3, 0x34) // counter 0, mode 2
			load16(p, 0, N)
			now := period + tc.late
			var ticks int64
			for i := 0; i < 1000; i++ {
				// The environment fires at every point while the deadline
				// is due; the CPU takes the interrupt every other point.
				if dl, ok := p.Deadline(); ok && dl <= now {
					p.Fire(now)
				}
				if i%2 == 1 && pic.HasInterrupt() {
					if v := pic.Acknowledge(); v != 0x20 {
						t.Fatalf("vector %#x", v)
					}
					out(pic.Master(), 0, 0x20) // EOI
					ticks++
				}
			}
			if ticks != tc.wantTicks {
				t.Errorf("the CPU took %d ticks, want %d", ticks, tc.wantTicks)
			}
			if dl, ok := p.Deadline(); !ok || dl <= now {
				t.Errorf("deadline %d %v, want after %d", dl, ok, now)
			}
		})
	}
}
