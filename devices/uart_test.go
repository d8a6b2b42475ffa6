package devices

import (
	"bytes"
	"reflect"
	"testing"
)

func newTestUART() (*UART, *irqRec, *bytes.Buffer) {
	r := &irqRec{}
	var b bytes.Buffer
	return NewUART(r, IRQCOM1, &b), r, &b
}

// Reset values ("Table IV").
func TestUARTReset(t *testing.T) {
	u, _, _ := newTestUART()
	for _, tc := range []struct {
		off  uint64
		want uint8
	}{
		{UART_IER, 0x00}, {UART_IIR, 0x01}, {UART_LCR, 0x00}, {UART_MCR, 0x00},
		{UART_LSR, 0x60}, {UART_MSR, 0xb0}, {UART_SCR, 0x00},
	} {
		if v := in(u, tc.off); v != tc.want {
			t.Errorf("reg %d = %#x, want %#x", tc.off, v, tc.want)
		}
	}
}

// LCR DLAB selects the divisor latch at offsets 0 and 1.
func TestUARTDLAB(t *testing.T) {
	u, _, w := newTestUART()
	out(u, UART_IER, 0x05)
	out(u, UART_LCR, UART_LCR_DLAB|0x03)
	if lo, hi := in(u, UART_DLL), in(u, UART_DLM); lo != 12 || hi != 0 {
		t.Fatalf("reset divisor %d %d, want 12 0", lo, hi)
	}
	out(u, UART_DLL, 0x01)
	out(u, UART_DLM, 0x02)
	if lo, hi := in(u, UART_DLL), in(u, UART_DLM); lo != 1 || hi != 2 {
		t.Fatalf("divisor %d %d", lo, hi)
	}
	if w.Len() != 0 {
		t.Fatal("DLL write transmitted")
	}
	out(u, UART_LCR, 0x03)
	if v := in(u, UART_IER); v != 0x05 {
		t.Fatalf("IER %#x after DLAB, want 0x05", v)
	}
	if v := in(u, UART_LCR); v != 0x03 {
		t.Fatalf("LCR %#x", v)
	}
}

// Transmit is instantaneous; THRE interrupt (IIR 0x02) when ETBEI is set
// while THR is empty and after each THR write; cleared by reading IIR.
func TestUARTTransmitTHRE(t *testing.T) {
	u, r, w := newTestUART()
	out(u, UART_THR, 'h', 'i')
	if w.String() != "hi" {
		t.Fatalf("output %q", w.String())
	}
	if v := in(u, UART_IIR); v != 0x01 {
		t.Fatalf("IIR %#x without ETBEI", v)
	}
	out(u, UART_MCR, UART_MCR_OUT2)
	out(u, UART_IER, UART_IER_THRI)
	eqEvents(t, "ETBEI", r.take(), []irqEvent{{4, true}})
	if v := in(u, UART_LSR); v != UART_LSR_THRE|UART_LSR_TEMT {
		t.Fatalf("LSR %#x", v)
	}
	if v := in(u, UART_IIR); v != 0x02 {
		t.Fatalf("IIR %#x, want 0x02", v)
	}
	eqEvents(t, "IIR read", r.take(), []irqEvent{{4, false}})
	if v := in(u, UART_IIR); v != 0x01 {
		t.Fatalf("IIR %#x after clearing read, want 0x01", v)
	}
	out(u, UART_THR, '!')
	eqEvents(t, "THR write", r.take(), []irqEvent{{4, true}})
	out(u, UART_IER, 0)
	eqEvents(t, "IER 0", r.take(), []irqEvent{{4, false}})
	if w.String() != "hi!" {
		t.Fatalf("output %q", w.String())
	}

	// Linux serial8250_do_startup's THRE re-assertion test.
	out(u, UART_IER, UART_IER_THRI)
	iir1 := in(u, UART_IIR)
	out(u, UART_IER, 0)
	out(u, UART_IER, UART_IER_THRI)
	iir := in(u, UART_IIR)
	out(u, UART_IER, 0)
	if iir1 != 0x02 || iir != 0x02 {
		t.Fatalf("THRE test IIRs %#x %#x, want 0x02 0x02", iir1, iir)
	}
}

// MCR OUT2 gates the interrupt line; SetIRQ only on level changes.
func TestUARTOut2Gating(t *testing.T) {
	u, r, _ := newTestUART()
	out(u, UART_IER, UART_IER_RDI)
	u.Receive('a')
	if len(r.ev) != 0 {
		t.Fatalf("IRQ with OUT2 clear: %v", r.ev)
	}
	if v := in(u, UART_IIR); v != 0x04 {
		t.Fatalf("IIR %#x, want 0x04", v)
	}
	out(u, UART_MCR, UART_MCR_OUT2|UART_MCR_DTR|UART_MCR_RTS)
	eqEvents(t, "OUT2 set", r.take(), []irqEvent{{4, true}})
	out(u, UART_MCR, UART_MCR_OUT2) // still pending: no change
	out(u, UART_SCR, 0x55)
	if len(r.ev) != 0 {
		t.Fatalf("redundant SetIRQ %v", r.ev)
	}
	out(u, UART_MCR, 0)
	eqEvents(t, "OUT2 clear", r.take(), []irqEvent{{4, false}})
	out(u, UART_MCR, UART_MCR_OUT2)
	in(u, UART_RBR)
	eqEvents(t, "RBR read", r.take(), []irqEvent{{4, true}, {4, false}})
}

// 16450 mode: one-byte RBR, DR, overrun (OE) and the line status interrupt,
// which has priority over received data (Table II).
func TestUARTReceiveNoFIFO(t *testing.T) {
	u, _, _ := newTestUART()
	out(u, UART_IER, UART_IER_RDI|UART_IER_RLSI)
	if u.RxSpace() != 1 {
		t.Fatalf("RxSpace %d", u.RxSpace())
	}
	if !u.Receive('x') {
		t.Fatal("Receive refused")
	}
	if u.RxSpace() != 0 {
		t.Fatalf("RxSpace %d", u.RxSpace())
	}
	if v := in(u, UART_IIR); v != 0x04 {
		t.Fatalf("IIR %#x, want 0x04", v)
	}
	if u.Receive('y') {
		t.Fatal("Receive into a full RBR succeeded")
	}
	if v := in(u, UART_IIR); v != 0x06 {
		t.Fatalf("IIR %#x, want 0x06 (line status)", v)
	}
	if v := in(u, UART_LSR); v != 0x63 {
		t.Fatalf("LSR %#x, want 0x63 (DR|OE|THRE|TEMT)", v)
	}
	if v := in(u, UART_LSR); v != 0x61 {
		t.Fatalf("LSR %#x, want OE cleared", v)
	}
	if v := in(u, UART_RBR); v != 'y' {
		t.Fatalf("RBR %q, want the overwriting byte", v)
	}
	if v, l := in(u, UART_IIR), in(u, UART_LSR); v != 0x01 || l != 0x60 {
		t.Fatalf("IIR %#x LSR %#x after read", v, l)
	}
}

// FIFO mode ("8.5"): trigger levels 1, 4, 8, 14 select between received
// data available (IIR 0xc4) and the character timeout (0xcc).
func TestUARTFIFOTrigger(t *testing.T) {
	for _, tc := range []struct {
		fcr  uint8
		trig int
	}{
		{0x01, 1}, {0x41, 4}, {0x81, 8}, {0xc1, 14},
	} {
		u, _, _ := newTestUART()
		out(u, UART_FCR, tc.fcr)
		out(u, UART_IER, UART_IER_RDI)
		if v := in(u, UART_IIR); v != 0xc1 {
			t.Fatalf("FCR %#x: IIR %#x, want 0xc1", tc.fcr, v)
		}
		for i := 1; i <= UARTFIFOSize; i++ {
			if !u.Receive(byte(i)) {
				t.Fatalf("FCR %#x: byte %d refused", tc.fcr, i)
			}
			want := uint8(0xcc)
			if i >= tc.trig {
				want = 0xc4
			}
			if v := in(u, UART_IIR); v != want {
				t.Fatalf("FCR %#x, %d bytes: IIR %#x, want %#x", tc.fcr, i, v, want)
			}
			if u.RxSpace() != UARTFIFOSize-i {
				t.Fatalf("RxSpace %d after %d bytes", u.RxSpace(), i)
			}
		}
		if u.Receive(0xee) {
			t.Fatal("17th byte accepted")
		}
		if v := in(u, UART_LSR); v != 0x63 {
			t.Fatalf("LSR %#x, want DR|OE", v)
		}
		for i := 1; i <= UARTFIFOSize; i++ {
			if v := in(u, UART_RBR); v != byte(i) {
				t.Fatalf("byte %d read %d", i, v)
			}
		}
		if v := in(u, UART_LSR); v != 0x60 {
			t.Fatalf("LSR %#x after draining", v)
		}
	}
}

// FCR: RX clear, toggling FCR0 clears, FCR0=0 ignores the other bits, and
// IIR bits 6-7 follow FCR0.
func TestUARTFIFOControl(t *testing.T) {
	u, _, _ := newTestUART()
	out(u, UART_FCR, 0xc1)
	u.Receive(1)
	u.Receive(2)
	out(u, UART_FCR, 0xc3)
	if v := in(u, UART_LSR); v&UART_LSR_DR != 0 {
		t.Fatal("RX FIFO not cleared")
	}
	u.Receive(3)
	out(u, UART_FCR, 0xc0) // FCR0=0: FIFO off, cleared
	if v, l := in(u, UART_IIR), in(u, UART_LSR); v != 0x01 || l != 0x60 {
		t.Fatalf("IIR %#x LSR %#x after disabling FIFO", v, l)
	}
	if u.RxSpace() != 1 {
		t.Fatalf("RxSpace %d in 16450 mode", u.RxSpace())
	}
	out(u, UART_FCR, 0x01)
	out(u, UART_IER, UART_IER_RDI)
	u.Receive(4)
	if v := in(u, UART_IIR); v != 0xc4 {
		t.Fatalf("IIR %#x, want 0xc4 (trigger 1 after re-enable)", v)
	}
}

// Interrupt priorities (Table II) as the sources are cleared one by one.
func TestUARTIIRPriority(t *testing.T) {
	u, _, _ := newTestUART()
	out(u, UART_IER, 0x0f)
	// THRE pending from enabling ETBEI; make the other three pending too.
	u.Receive('a')
	u.Receive('b') // overrun
	out(u, UART_MCR, UART_MCR_LOOP)
	out(u, UART_MCR, 0) // modem status deltas
	steps := []struct {
		want  uint8
		clear func()
	}{
		{0x06, func() { in(u, UART_LSR) }},
		{0x04, func() { in(u, UART_RBR) }},
		{0x02, func() {}}, // the IIR read itself clears THRE
		{0x00, func() { in(u, UART_MSR) }},
		{0x01, func() {}},
	}
	for i, s := range steps {
		if v := in(u, UART_IIR); v != s.want {
			t.Fatalf("step %d: IIR %#x, want %#x", i, v, s.want)
		}
		s.clear()
	}
}

// Loopback (MCR bit 4): MSR reflects DTR/RTS/OUT1/OUT2, THR goes to RBR,
// the serial input is disconnected and the IRQ line is not driven.
func TestUARTLoopback(t *testing.T) {
	u, r, w := newTestUART()
	// Linux 8250 autoconfig: MCR = LOOP | 0x0a, MSR status must be DCD|CTS.
	out(u, UART_MCR, UART_MCR_LOOP|0x0a)
	if v := in(u, UART_MSR) & 0xf0; v != UART_MSR_DCD|UART_MSR_CTS {
		t.Fatalf("loopback MSR status %#x, want 0x90", v)
	}
	out(u, UART_MCR, UART_MCR_LOOP|0x0f)
	if v := in(u, UART_MSR); v != 0xf0|UART_MSR_DDSR {
		t.Fatalf("MSR %#x, want 0xf2", v)
	}
	out(u, UART_MCR, UART_MCR_LOOP|0x0b) // OUT1 (RI) falls: TERI
	if v := in(u, UART_MSR); v != 0xb0|UART_MSR_TERI {
		t.Fatalf("MSR %#x, want 0xb4", v)
	}
	out(u, UART_IER, UART_IER_RDI)
	out(u, UART_THR, 'L')
	if w.Len() != 0 {
		t.Fatalf("loopback byte reached the output: %q", w.String())
	}
	if v := in(u, UART_IIR); v != 0x04 {
		t.Fatalf("IIR %#x, want 0x04", v)
	}
	if len(r.ev) != 0 {
		t.Fatalf("IRQ driven in loopback: %v", r.ev)
	}
	if u.RxSpace() != 0 || u.Receive('z') {
		t.Fatal("serial input accepted in loopback")
	}
	if v := in(u, UART_RBR); v != 'L' {
		t.Fatalf("RBR %q, want 'L'", v)
	}
	out(u, UART_MCR, UART_MCR_OUT2)
	if v := in(u, UART_MSR); v != 0xb0 { // same levels as the looped DTR/RTS/OUT2
		t.Fatalf("MSR %#x after leaving loopback, want 0xb0", v)
	}
	out(u, UART_THR, 'o')
	if w.String() != "o" {
		t.Fatalf("output %q", w.String())
	}
}

// Modem status interrupt and MSR delta clearing.
func TestUARTModemStatusInterrupt(t *testing.T) {
	u, r, _ := newTestUART()
	out(u, UART_MCR, UART_MCR_OUT2)
	out(u, UART_IER, UART_IER_MSI)
	if len(r.ev) != 0 {
		t.Fatal("spurious IRQ")
	}
	out(u, UART_MCR, UART_MCR_LOOP|UART_MCR_OUT2) // CTS, DSR fall: deltas
	out(u, UART_MCR, UART_MCR_OUT2)               // back: deltas stay until read
	eqEvents(t, "MSI", r.take(), []irqEvent{{4, true}})
	if v := in(u, UART_IIR); v != 0x00 {
		t.Fatalf("IIR %#x, want 0x00", v)
	}
	if v := in(u, UART_MSR); v != 0xb3 {
		t.Fatalf("MSR %#x, want 0xb3", v)
	}
	eqEvents(t, "MSR read", r.take(), []irqEvent{{4, false}})
}

// Linux's existence test: IER keeps only bits 0-3; scratch register; the
// output sink can be swapped; LSR/MSR writes are not modelled.
func TestUARTMisc(t *testing.T) {
	u, _, w := newTestUART()
	out(u, UART_IER, 0)
	if v := in(u, UART_IER); v != 0 {
		t.Fatalf("IER %#x", v)
	}
	out(u, UART_IER, 0xff)
	if v := in(u, UART_IER); v != 0x0f {
		t.Fatalf("IER %#x, want 0x0f", v)
	}
	out(u, UART_SCR, 0xa5)
	if v := in(u, UART_SCR); v != 0xa5 {
		t.Fatalf("SCR %#x", v)
	}
	var w2 bytes.Buffer
	u.SetOutput(&w2)
	out(u, UART_THR, 'q')
	u.SetOutput(nil)
	out(u, UART_THR, 'r')
	if w.Len() != 0 || w2.String() != "q" {
		t.Fatalf("outputs %q %q", w.String(), w2.String())
	}
	out(u, UART_LSR, 0)
	out(u, UART_MSR, 0)
	in(u, 8)
	if u.Unhandled() != 3 {
		t.Fatalf("unhandled %d, want 3", u.Unhandled())
	}
	// A 2-byte access splits across registers (ISA byte lanes).
	var b [2]byte
	u.Read(UART_LCR, b[:])
	if b != [2]byte{0x00, 0x00} {
		t.Fatalf("LCR/MCR pair %x", b)
	}
}

// A UART restored from State mid-sequence behaves like the original.
func TestUARTState(t *testing.T) {
	a, ra, wa := newTestUART()
	out(a, UART_FCR, 0x81)
	out(a, UART_MCR, UART_MCR_OUT2|UART_MCR_RTS)
	out(a, UART_IER, UART_IER_RDI|UART_IER_THRI)
	for i := 0; i < 20; i++ {
		a.Receive(byte('A' + i))
	}
	in(a, UART_RBR)
	in(a, UART_RBR)
	out(a, UART_LCR, UART_LCR_DLAB)
	out(a, UART_DLL, 3)
	out(a, UART_LCR, 0x03)

	b, rb, wb := newTestUART()
	if err := b.SetState(a.State()); err != nil {
		t.Fatal(err)
	}
	ra.take()
	script := func(u *UART, r *irqRec) []uint8 {
		var res []uint8
		res = append(res, in(u, UART_IIR), in(u, UART_LSR))
		for i := 0; i < 3; i++ {
			u.Receive(byte('a' + i))
		}
		out(u, UART_THR, 'T')
		for in(u, UART_LSR)&UART_LSR_DR != 0 {
			res = append(res, in(u, UART_RBR), in(u, UART_IIR))
		}
		res = append(res, in(u, UART_IIR), in(u, UART_IIR), uint8(len(r.take())))
		return res
	}
	sa, sb := script(a, ra), script(b, rb)
	if !reflect.DeepEqual(sa, sb) {
		t.Fatalf("restored UART diverges:\n%q\n%q", sa, sb)
	}
	if wa.String() != "T" || wb.String() != "T" {
		t.Fatalf("outputs %q %q", wa.String(), wb.String())
	}
	if !reflect.DeepEqual(a.State(), b.State()) {
		t.Fatal("states differ at end")
	}
	bad := a.State()
	bad.RxCount = 17
	if err := b.SetState(bad); err == nil {
		t.Fatal("SetState accepted 17 bytes")
	}
}
