package devices

import "testing"

// fakeClock is a Clock the test sets; it counts reads so tests can check
// that models read the clock only when an access needs it.
type fakeClock struct {
	now   int64
	reads int
}

func (c *fakeClock) Now() int64 { c.reads++; return c.now }

type irqEvent struct {
	line  int
	level bool
}

// irqRec records SetIRQ calls.
type irqRec struct {
	ev    []irqEvent
	level [16]bool
}

func (r *irqRec) SetIRQ(line int, level bool) {
	r.ev = append(r.ev, irqEvent{line, level})
	if line >= 0 && line < 16 {
		r.level[line] = level
	}
}

func (r *irqRec) take() []irqEvent {
	e := r.ev
	r.ev = nil
	return e
}

// out writes bytes one at a time to offset off.
func out(d Device, off uint64, v ...uint8) {
	for _, b := range v {
		d.Write(off, []byte{b})
	}
}

// in reads one byte at offset off.
func in(d Device, off uint64) uint8 {
	var b [1]byte
	d.Read(off, b[:])
	return b[0]
}

func eqEvents(t *testing.T, what string, got, want []irqEvent) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("%s: IRQ events %v, want %v", what, got, want)
	}
	for i := range got {
		if got[i] != want[i] {
			t.Fatalf("%s: IRQ events %v, want %v", what, got, want)
		}
	}
}
