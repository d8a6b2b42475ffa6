package devices

import (
	"encoding/binary"
	"testing"
)

func TestPMTimer(t *testing.T) {
	for _, tc := range []struct {
		now  int64
		want uint32
	}{
		{0, 0},
		{1e9, ACPIPMTimerHz},                  // one second
		{279, 0},                              // less than one tick (279.4 ns)
		{280, 1},                              // one tick
		{5e9, (5 * ACPIPMTimerHz) & 0xffffff}, // wraps at 24 bits
		{-5, 0},
		{1 << 62, uint32((uint64(1<<62)/1e9*ACPIPMTimerHz + (uint64(1<<62)%1e9)*ACPIPMTimerHz/1e9) & 0xffffff)},
	} {
		if got := PMTimer(tc.now); got != tc.want {
			t.Errorf("PMTimer(%d) = %#x, want %#x", tc.now, got, tc.want)
		}
	}
}

func TestACPIPMTimerReadsClockOncePerAccess(t *testing.T) {
	clk := &fakeClock{now: 2e9}
	p := NewACPIPM(clk, nil)
	var b [4]byte
	p.Read(8, b[:])
	if got := binary.LittleEndian.Uint32(b[:]); got != PMTimer(2e9) || clk.reads != 1 {
		t.Fatalf("timer %#x after %d clock reads, want %#x after 1", got, clk.reads, PMTimer(2e9))
	}
	var w [2]byte
	p.Read(4, w[:]) // PM1_CNT: no clock read
	if clk.reads != 1 || binary.LittleEndian.Uint16(w[:]) != PM1_CNT_SCI_EN {
		t.Fatalf("PM1_CNT = %#x, clock reads %d", binary.LittleEndian.Uint16(w[:]), clk.reads)
	}
}

func TestACPIPMPowerOff(t *testing.T) {
	off := 0
	p := NewACPIPM(&fakeClock{}, func() { off++ })
	le := binary.LittleEndian
	var w [2]byte
	// Linux writes SLP_TYP first, then SLP_TYP|SLP_EN (ACPICA
	// acpi_hw_legacy_sleep).
	le.PutUint16(w[:], PM1_CNT_SCI_EN|ACPISlpTypS5<<10)
	p.Write(4, w[:])
	if off != 0 {
		t.Fatal("power off without SLP_EN")
	}
	le.PutUint16(w[:], PM1_CNT_SCI_EN|ACPISlpTypS5<<10|PM1_CNT_SLP_EN)
	p.Write(4, w[:])
	if off != 1 {
		t.Fatal("no power off on SLP_EN with SLP_TYP S5")
	}
	p.Read(4, w[:])
	if le.Uint16(w[:])&PM1_CNT_SLP_EN != 0 {
		t.Fatal("SLP_EN reads back")
	}
	// Another sleep type: unhandled, no power off.
	before := p.Unhandled()
	le.PutUint16(w[:], 3<<10|PM1_CNT_SLP_EN)
	p.Write(4, w[:])
	if off != 1 || p.Unhandled() != before+1 {
		t.Fatalf("S3 request: power offs %d, unhandled %d", off, p.Unhandled()-before)
	}
}

func TestACPIPMStatusEnable(t *testing.T) {
	p := NewACPIPM(&fakeClock{}, nil)
	p.sts = 0x8001
	le := binary.LittleEndian
	var w [2]byte
	le.PutUint16(w[:], 0x0001)
	p.Write(0, w[:]) // write 1 to clear TMR_STS
	p.Read(0, w[:])
	if le.Uint16(w[:]) != 0x8000 {
		t.Fatalf("PM1_STS = %#x, want 0x8000", le.Uint16(w[:]))
	}
	le.PutUint16(w[:], 0)
	p.Write(2, w[:])
	if p.Unhandled() != 0 {
		t.Fatal("disabling all events counted as unhandled")
	}
	le.PutUint16(w[:], PM1_PWRBTN_EN)
	p.Write(2, w[:])
	if p.Unhandled() != 1 || p.State().En != PM1_PWRBTN_EN {
		t.Fatalf("enabling an event: unhandled %d, state %+v", p.Unhandled(), p.State())
	}
	var b [1]byte
	p.Read(6, b[:])
	p.Write(9, b[:])
	if p.Unhandled() != 3 {
		t.Fatalf("reserved and read-only accesses: unhandled %d, want 3", p.Unhandled())
	}
}
