package devices

import (
	"reflect"
	"testing"
)

// newInitPIC runs the ICW1-ICW4 sequence Linux uses (init_8259A): ICW1 0x11
// (edge, cascade, IC4), ICW2 vector base, ICW3 0x04 / 0x02, ICW4.
func newInitPIC(masterICW4, slaveICW4 uint8) *PIC {
	p := NewPIC()
	out(p.Master(), 0, 0x11)
	out(p.Master(), 1, 0x30, 0x04, masterICW4)
	out(p.Slave(), 0, 0x11)
	out(p.Slave(), 1, 0x38, 0x02, slaveICW4)
	return p
}

func pulse(p *PIC, lines ...int) {
	for _, l := range lines {
		p.SetIRQ(l, true)
		p.SetIRQ(l, false)
	}
}

func picReg(d Device, ocw3 uint8) uint8 {
	out(d, 0, ocw3)
	return in(d, 0)
}

func isr(d Device) uint8 { return picReg(d, 0x0b) }
func irr(d Device) uint8 { return picReg(d, 0x0a) }

func ack(t *testing.T, p *PIC, want uint8) {
	t.Helper()
	if !p.HasInterrupt() {
		t.Fatalf("HasInterrupt false, want vector %#x", want)
	}
	if v := p.Acknowledge(); v != want {
		t.Fatalf("Acknowledge = %#x, want %#x", v, want)
	}
}

func noInt(t *testing.T, p *PIC) {
	t.Helper()
	if p.HasInterrupt() {
		t.Fatalf("HasInterrupt true, want false")
	}
}

// "Initialization Command Words": ICW2 T7-T3 form the vector with the IR
// number in the low three bits; the slave is reached through the master's
// IR2 (ICW3).
func TestPICVectors(t *testing.T) {
	for _, line := range []int{0, 1, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15} {
		p := newInitPIC(0x01, 0x01)
		pulse(p, line)
		var wantVec, wantMISR, wantSISR uint8
		if line < 8 {
			wantVec, wantMISR = 0x30+uint8(line), 1<<line
		} else {
			wantVec, wantMISR, wantSISR = 0x38+uint8(line-8), 0x04, 1<<(line-8)
		}
		ack(t, p, wantVec)
		if m, s := isr(p.Master()), isr(p.Slave()); m != wantMISR || s != wantSISR {
			t.Errorf("line %d: ISR master %#x slave %#x, want %#x %#x", line, m, s, wantMISR, wantSISR)
		}
		if m, s := irr(p.Master()), irr(p.Slave()); m != 0 || s != 0 {
			t.Errorf("line %d: IRR after INTA %#x %#x, want 0", line, m, s)
		}
		noInt(t, p)
		if line >= 8 {
			out(p.Slave(), 0, OCW2_NSEOI)
		}
		out(p.Master(), 0, OCW2_NSEOI)
		if m, s := isr(p.Master()), isr(p.Slave()); m != 0 || s != 0 {
			t.Errorf("line %d: ISR after EOI %#x %#x", line, m, s)
		}
	}
}

// "Fully Nested Mode": IR0 highest, IR7 lowest; an interrupt in service
// blocks equal and lower priorities until its EOI, higher ones nest.
func TestPICFullyNested(t *testing.T) {
	p := newInitPIC(0x01, 0x01)
	pulse(p, 5, 3, 1)
	if v := irr(p.Master()); v != 0x2a {
		t.Fatalf("IRR = %#x, want 0x2a", v)
	}
	ack(t, p, 0x31)
	noInt(t, p) // 3 and 5 are lower than 1
	pulse(p, 0)
	ack(t, p, 0x30) // nests
	if v := isr(p.Master()); v != 0x03 {
		t.Fatalf("ISR = %#x, want 0x03", v)
	}
	out(p.Master(), 0, OCW2_NSEOI) // clears IR0, the highest
	if v := isr(p.Master()); v != 0x02 {
		t.Fatalf("ISR = %#x, want 0x02", v)
	}
	noInt(t, p)
	out(p.Master(), 0, OCW2_NSEOI)
	ack(t, p, 0x33)
	out(p.Master(), 0, OCW2_NSEOI)
	ack(t, p, 0x35)
	out(p.Master(), 0, OCW2_NSEOI)
	noInt(t, p)
	// Slave lines share the master's IR2 priority: IRQ8-15 are above IRQ3.
	pulse(p, 3, 12)
	ack(t, p, 0x3c)
}

// OCW1 sets IMR; masked requests stay in IRR.
func TestPICMask(t *testing.T) {
	p := newInitPIC(0x01, 0x01)
	out(p.Master(), 1, 0xfa)
	if v := in(p.Master(), 1); v != 0xfa {
		t.Fatalf("IMR = %#x", v)
	}
	pulse(p, 1)
	noInt(t, p)
	if v := irr(p.Master()); v != 0x02 {
		t.Fatalf("IRR = %#x, want 0x02", v)
	}
	pulse(p, 9) // slave, through unmasked IR2
	ack(t, p, 0x39)
	out(p.Slave(), 0, OCW2_NSEOI)
	out(p.Master(), 0, OCW2_NSEOI)
	out(p.Master(), 1, 0xfe|0x04) // mask the cascade too
	pulse(p, 9)
	noInt(t, p)
	out(p.Master(), 1, 0x00)
	ack(t, p, 0x31)
}

// "Edge and Level Triggered Modes" with the PIIX ELCR selecting per line.
func TestPICEdgeLevel(t *testing.T) {
	p := newInitPIC(0x01, 0x01)
	// Edge: IRR latches on the rising edge and stays latched.
	p.SetIRQ(3, true)
	p.SetIRQ(3, false)
	p.SetIRQ(3, true)
	if v := irr(p.Master()); v != 0x08 {
		t.Fatalf("edge IRR = %#x", v)
	}
	ack(t, p, 0x33)
	out(p.Master(), 0, OCW2_NSEOI)
	noInt(t, p) // line still high, no new edge
	p.SetIRQ(3, false)
	p.SetIRQ(3, true)
	ack(t, p, 0x33)
	out(p.Master(), 0, OCW2_NSEOI)
	p.SetIRQ(3, false)

	// Level: IRR follows the line and is not cleared by INTA.
	out(p.ELCR(), 0, 0x08)
	p.SetIRQ(3, true)
	ack(t, p, 0x33)
	if v := irr(p.Master()); v != 0x08 {
		t.Fatalf("level IRR after INTA = %#x", v)
	}
	out(p.Master(), 0, OCW2_NSEOI)
	ack(t, p, 0x33) // still asserted: requested again
	out(p.Master(), 0, OCW2_NSEOI)
	p.SetIRQ(3, false)
	noInt(t, p)
	if v := irr(p.Master()); v != 0 {
		t.Fatalf("level IRR after deassert = %#x", v)
	}
}

// A level request that disappears before INTA gives the default IR7
// (spurious) vector, with no ISR bit set.
func TestPICSpurious7(t *testing.T) {
	p := newInitPIC(0x01, 0x01)
	if v := p.Acknowledge(); v != 0x37 {
		t.Fatalf("INTA with nothing pending = %#x, want 0x37", v)
	}
	out(p.ELCR(), 0, 0x20)
	p.SetIRQ(5, true)
	if !p.HasInterrupt() {
		t.Fatal("no interrupt")
	}
	p.SetIRQ(5, false)
	noInt(t, p)
	if v := p.Acknowledge(); v != 0x37 {
		t.Fatalf("spurious vector %#x, want 0x37", v)
	}
	if v := isr(p.Master()); v != 0 {
		t.Fatalf("ISR = %#x after spurious IRQ 7", v)
	}
}

// The slave's request vanishing after the master latched IR2 gives spurious
// IRQ 15 (slave base + 7) with the master's IR2 in service.
func TestPICSpurious15(t *testing.T) {
	p := newInitPIC(0x01, 0x01)
	out(p.ELCR(), 1, 0x04) // IRQ10 level
	p.SetIRQ(10, true)
	if v := irr(p.Master()); v != 0x04 {
		t.Fatalf("master IRR = %#x", v)
	}
	p.SetIRQ(10, false)
	ack(t, p, 0x3f)
	if m, s := isr(p.Master()), isr(p.Slave()); m != 0x04 || s != 0 {
		t.Fatalf("ISR master %#x slave %#x, want 0x04 0", m, s)
	}
	out(p.Master(), 0, OCW2_NSEOI)
	if v := isr(p.Master()); v != 0 {
		t.Fatalf("master ISR after EOI %#x", v)
	}
}

// ICW4 AEOI: the ISR bit is reset at the end of INTA.
func TestPICAutoEOI(t *testing.T) {
	p := newInitPIC(0x03, 0x01)
	pulse(p, 5, 3)
	ack(t, p, 0x33)
	if v := isr(p.Master()); v != 0 {
		t.Fatalf("ISR = %#x in AEOI", v)
	}
	ack(t, p, 0x35)
	noInt(t, p)
}

// "Automatic Rotation": rotate in AEOI mode (OCW2 100 set, 000 clear).
func TestPICRotateAEOI(t *testing.T) {
	p := newInitPIC(0x03, 0x01)
	out(p.Master(), 0, OCW2_RAEOIS)
	pulse(p, 3)
	ack(t, p, 0x33) // IR3 becomes lowest: IR4 highest
	pulse(p, 1, 5)
	ack(t, p, 0x35) // IR6 highest now
	ack(t, p, 0x31) // IR2 highest now
	out(p.Master(), 0, OCW2_RAEOIC)
	pulse(p, 1, 7)
	ack(t, p, 0x37) // no rotation any more
	pulse(p, 7)
	ack(t, p, 0x37)
	ack(t, p, 0x31)
}

// OCW2 commands (the OCW2 table): each case puts lines in service, issues
// the command, then checks ISR and the resulting priority order.
func TestPICOCW2(t *testing.T) {
	cases := []struct {
		name      string
		inService []int // acknowledged in this order (nesting)
		cmd       uint8
		wantISR   uint8
		pulses    []int
		order     []uint8
	}{
		{"non-specific EOI clears highest", []int{3, 1}, OCW2_NSEOI, 0x08, []int{0, 1, 3}, []uint8{0x30, 0x31, 0x33}},
		{"specific EOI", []int{3, 1}, OCW2_SEOI | 3, 0x02, []int{0, 1, 3}, []uint8{0x30, 0x31, 0x33}},
		{"rotate on non-specific EOI", []int{1}, OCW2_RNSEOI, 0x00, []int{0, 1, 3}, []uint8{0x33, 0x30, 0x31}},
		{"rotate on specific EOI", []int{3, 1}, OCW2_RSEOI | 1, 0x08, []int{0, 1, 3}, []uint8{0x33, 0x30, 0x31}},
		{"set priority", nil, OCW2_SETPRI | 4, 0x00, []int{3, 5, 6}, []uint8{0x35, 0x36, 0x33}},
		{"no operation", []int{1}, OCW2_NOP, 0x02, []int{0, 1, 3}, []uint8{0x30, 0x31, 0x33}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			p := newInitPIC(0x01, 0x01)
			for _, l := range tc.inService {
				pulse(p, l)
				ack(t, p, 0x30+uint8(l))
			}
			out(p.Master(), 0, tc.cmd)
			if v := isr(p.Master()); v != tc.wantISR {
				t.Fatalf("ISR = %#x, want %#x", v, tc.wantISR)
			}
			for l := uint8(0); l < 8; l++ {
				out(p.Master(), 0, OCW2_SEOI|l)
			}
			pulse(p, tc.pulses...)
			for _, want := range tc.order {
				v := p.Acknowledge()
				if v != want {
					t.Fatalf("order: got %#x, want %#x (order %x)", v, want, tc.order)
				}
				out(p.Master(), 0, OCW2_SEOI|(v&7))
			}
			noInt(t, p)
		})
	}
}

// "Special Mask Mode": with SMM, masking the in-service level enables all
// other unmasked levels, lower ones included; a non-specific EOI does not
// reset ISR bits masked by IMR.
func TestPICSpecialMaskMode(t *testing.T) {
	p := newInitPIC(0x01, 0x01)
	pulse(p, 3)
	ack(t, p, 0x33)
	pulse(p, 5)
	noInt(t, p)
	out(p.Master(), 1, 0x08)
	noInt(t, p) // masking alone is not enough
	out(p.Master(), 0, OCW3_SEL|OCW3_ESMM|OCW3_SMM)
	ack(t, p, 0x35)
	pulse(p, 4)
	ack(t, p, 0x34) // lower than 3 but not masked: allowed
	if v := isr(p.Master()); v != 0x38 {
		t.Fatalf("ISR = %#x, want 0x38", v)
	}
	out(p.Master(), 0, OCW2_NSEOI)
	if v := isr(p.Master()); v != 0x28 {
		t.Fatalf("ISR after SMM EOI = %#x, want 0x28 (IR3 masked stays)", v)
	}
	out(p.Master(), 0, OCW3_SEL|OCW3_ESMM) // reset SMM
	pulse(p, 6)
	noInt(t, p)
	out(p.Master(), 0, OCW3_SEL|OCW3_SMM) // SMM bit without ESMM: no change
	noInt(t, p)
}

// "Poll Command": the next read is an INTA returning 0x80|level.
func TestPICPoll(t *testing.T) {
	p := newInitPIC(0x01, 0x01)
	out(p.Master(), 1, 0x00)
	pulse(p, 4, 6)
	out(p.Master(), 0, OCW3_SEL|OCW3_P)
	if v := in(p.Master(), 0); v != 0x84 {
		t.Fatalf("poll word %#x, want 0x84", v)
	}
	if v := isr(p.Master()); v != 0x10 {
		t.Fatalf("ISR after poll %#x", v)
	}
	if v := irr(p.Master()); v != 0x40 {
		t.Fatalf("IRR after poll %#x", v)
	}
	out(p.Master(), 0, OCW3_SEL|OCW3_P)
	if v := in(p.Master(), 1); v != 0x00 { // 6 is below 4 in service
		t.Fatalf("poll word with nothing eligible %#x, want 0", v)
	}
	if v := in(p.Master(), 1); v != 0x00 { // poll consumed: IMR
		t.Fatalf("IMR %#x", v)
	}
	out(p.Master(), 0, OCW2_NSEOI)
	out(p.Master(), 0, OCW3_SEL|OCW3_P)
	if v := in(p.Master(), 0); v != 0x86 {
		t.Fatalf("poll word %#x, want 0x86", v)
	}
}

// OCW3 RR/RIS select IRR or ISR for port 0 reads until changed.
func TestPICReadRegister(t *testing.T) {
	p := newInitPIC(0x01, 0x01)
	pulse(p, 1, 6)
	ack(t, p, 0x31)
	out(p.Master(), 0, OCW3_SEL|OCW3_RR)
	if v := in(p.Master(), 0); v != 0x40 {
		t.Fatalf("IRR %#x", v)
	}
	out(p.Master(), 0, OCW3_SEL|OCW3_RR|OCW3_RIS)
	if a, b := in(p.Master(), 0), in(p.Master(), 0); a != 0x02 || b != 0x02 {
		t.Fatalf("ISR %#x %#x", a, b)
	}
	out(p.Master(), 0, OCW3_SEL|OCW3_RIS) // RR=0: no change
	if v := in(p.Master(), 0); v != 0x02 {
		t.Fatalf("ISR after RR=0 %#x", v)
	}
}

// ICW1 clears IMR and ISR and resets the edge sense: a line already high
// must go low and high again.
func TestPICICW1Reset(t *testing.T) {
	p := newInitPIC(0x01, 0x01)
	out(p.Master(), 1, 0xf0)
	pulse(p, 1)
	ack(t, p, 0x31)
	p.SetIRQ(4, true)
	out(p.Master(), 0, 0x11)
	out(p.Master(), 1, 0x40, 0x04, 0x01)
	if m, i, r := in(p.Master(), 1), isr(p.Master()), irr(p.Master()); m != 0 || i != 0 || r != 0 {
		t.Fatalf("after ICW1: IMR %#x ISR %#x IRR %#x", m, i, r)
	}
	noInt(t, p)
	p.SetIRQ(4, false)
	p.SetIRQ(4, true)
	ack(t, p, 0x44)
}

// ICW1 SNGL skips ICW3; IC4=0 skips ICW4 (MCS-80/85 mode, counted as
// unhandled).
func TestPICInitVariants(t *testing.T) {
	p := NewPIC()
	out(p.Master(), 0, ICW1_INIT|ICW1_SNGL|ICW1_IC4)
	out(p.Master(), 1, 0x40, 0x01, 0xfe)
	if v := in(p.Master(), 1); v != 0xfe {
		t.Fatalf("SNGL: IMR %#x, want 0xfe", v)
	}
	pulse(p, 1)
	noInt(t, p) // masked
	pulse(p, 0)
	ack(t, p, 0x40)

	p = NewPIC()
	out(p.Master(), 0, ICW1_INIT)
	out(p.Master(), 1, 0x50, 0x04, 0xfd)
	if v := in(p.Master(), 1); v != 0xfd {
		t.Fatalf("no IC4: IMR %#x, want 0xfd", v)
	}
	if p.Unhandled() != 1 {
		t.Fatalf("unhandled %d, want 1", p.Unhandled())
	}
	out(p.Slave(), 0, 0x11)
	out(p.Slave(), 1, 0x58, 0x03, 0x01) // slave ID 3: not the wired cascade
	if p.Unhandled() != 2 {
		t.Fatalf("unhandled %d, want 2", p.Unhandled())
	}
}

// ELCR: reserved bits (IRQ0-2, 8, 13) are always edge.
func TestPICELCR(t *testing.T) {
	p := NewPIC()
	p.ELCR().Write(0, []byte{0xff, 0xff})
	var b [2]byte
	p.ELCR().Read(0, b[:])
	if b != [2]byte{0xf8, 0xde} {
		t.Fatalf("ELCR %x, want f8 de", b)
	}
	if v := in(p.ELCR(), 2); v != 0xff || p.Unhandled() != 1 {
		t.Fatalf("ELCR offset 2 = %#x unhandled %d", v, p.Unhandled())
	}
}

// ICW4 SFNM: a higher-priority slave request nests while IR2 is in service.
func TestPICSpecialFullyNested(t *testing.T) {
	for _, sfnm := range []bool{false, true} {
		icw4 := uint8(0x01)
		if sfnm {
			icw4 |= ICW4_SFNM
		}
		p := newInitPIC(icw4, 0x01)
		pulse(p, 10)
		ack(t, p, 0x3a)
		pulse(p, 8)
		if p.HasInterrupt() != sfnm {
			t.Fatalf("sfnm=%v: HasInterrupt %v", sfnm, p.HasInterrupt())
		}
		if sfnm {
			ack(t, p, 0x38)
		}
	}
}

// With the slave in AEOI, a second slave request raises a new edge on IR2.
func TestPICCascadeSecondRequest(t *testing.T) {
	p := newInitPIC(0x01, 0x03)
	pulse(p, 9, 10)
	ack(t, p, 0x39)
	noInt(t, p) // master IR2 in service
	out(p.Master(), 0, OCW2_NSEOI)
	ack(t, p, 0x3a)
}

func TestPICUnhandled(t *testing.T) {
	p := newInitPIC(0x01, 0x01)
	p.SetIRQ(2, true)
	p.SetIRQ(16, true)
	p.SetIRQ(-1, true)
	noInt(t, p)
	if v := in(p.Master(), 2); v != 0xff {
		t.Fatalf("offset 2 = %#x", v)
	}
	if p.Unhandled() != 4 {
		t.Fatalf("unhandled %d, want 4", p.Unhandled())
	}
}

// A PIC restored from State mid-sequence behaves like the original.
func TestPICState(t *testing.T) {
	a := newInitPIC(0x01, 0x01)
	out(a.ELCR(), 1, 0x08)
	a.SetIRQ(11, true)
	pulse(a, 3, 5)
	ack(t, a, 0x3b) // the level IRQ11 through IR2 comes first
	out(a.Master(), 0, OCW3_SEL|OCW3_RR|OCW3_RIS)
	out(a.Master(), 0, OCW2_SETPRI|6)
	out(a.Slave(), 0, 0x11) // mid-initialization
	out(a.Slave(), 1, 0x78)

	b := NewPIC()
	if err := b.SetState(a.State()); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(a.State(), b.State()) {
		t.Fatalf("state differs after restore")
	}
	script := func(p *PIC) []uint8 {
		var r []uint8
		out(p.Slave(), 1, 0x02, 0x01)
		r = append(r, in(p.Master(), 0))
		out(p.Master(), 0, OCW2_NSEOI)
		pulse(p, 1, 7)
		for i := 0; i < 4; i++ {
			r = append(r, p.Acknowledge())
		}
		p.SetIRQ(11, false)
		r = append(r, irr(p.Slave()), isr(p.Slave()), irr(p.Master()))
		return r
	}
	ra, rb := script(a), script(b)
	if !reflect.DeepEqual(ra, rb) {
		t.Fatalf("restored PIC diverges: %x vs %x", ra, rb)
	}
	if !reflect.DeepEqual(a.State(), b.State()) {
		t.Fatalf("state differs at end")
	}
	bad := a.State()
	bad.Master.InitState = 4
	if err := b.SetState(bad); err == nil {
		t.Fatal("SetState accepted init state 4")
	}
}
