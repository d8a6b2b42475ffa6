package devices

import (
	"reflect"
	"testing"
)

// Reset control register (PIIX "RC" at 0xcf9): RST_CPU initiates a reset;
// reads return the last value written.
func TestResetControl(t *testing.T) {
	n := 0
	r := NewResetControl(func() { n++ })
	for _, tc := range []struct {
		v      uint8
		resets int
	}{
		{RC_SYS_RST, 0},              // Linux reboot=pci: select hard reset
		{RC_SYS_RST | RC_RST_CPU, 1}, // then initiate it
		{0x00, 1},
		{RC_RST_CPU, 2}, // soft reset
		{RC_FULL_RST | RC_SYS_RST, 2},
	} {
		out(r, 0, tc.v)
		if n != tc.resets {
			t.Fatalf("after %#x: %d resets, want %d", tc.v, n, tc.resets)
		}
		if v := in(r, 0); v != tc.v {
			t.Fatalf("read %#x, want %#x", v, tc.v)
		}
	}
	s := r.State()
	r2 := NewResetControl(nil)
	if err := r2.SetState(s); err != nil || in(r2, 0) != RC_FULL_RST|RC_SYS_RST {
		t.Fatalf("restored register reads %#x (%v)", in(r2, 0), err)
	}
	out(r2, 0, RC_RST_CPU) // nil callback is fine
	var b [2]byte
	r.Read(0, b[:])
	if b[1] != 0xff || r.Unhandled() != 1 {
		t.Fatalf("wide read % x, unhandled %d", b, r.Unhandled())
	}
}

// Debug exit: byte v -> onExit(v); wider writes use the low byte; reads are
// unhandled.
func TestDebugExit(t *testing.T) {
	var got []uint8
	d := NewDebugExit(func(v uint8) { got = append(got, v) })
	d.Write(0, []byte{0})
	d.Write(0, []byte{1})
	d.Write(0, []byte{0x2a, 0x01})             // outw 0x012a: low byte
	d.Write(0, []byte{0x07, 0x00, 0x00, 0x00}) // outl
	if !reflect.DeepEqual(got, []uint8{0, 1, 0x2a, 7}) {
		t.Fatalf("exit codes %v", got)
	}
	if v := in(d, 0); v != 0xff {
		t.Fatalf("read %#x", v)
	}
	d.Write(1, []byte{3})
	if d.Unhandled() != 2 || len(got) != 4 {
		t.Fatalf("unhandled %d, calls %d", d.Unhandled(), len(got))
	}
	if err := d.SetState(d.State()); err != nil {
		t.Fatal(err)
	}
	NewDebugExit(nil).Write(0, []byte{1})
}

func kbcCmd(k *I8042, v uint8) { out(k.Command(), 0, v) }

// 8042: status reads, controller commands at probe time, reset pulse.
func TestI8042(t *testing.T) {
	resets := 0
	k := NewI8042(func() { resets++ })
	if v := in(k.Command(), 0); v != I8042_STR_KEYLOCK|I8042_STR_SYSFLAG {
		t.Fatalf("status %#x, want 0x14 (buffers empty)", v)
	}
	for _, tc := range []struct {
		name   string
		cmd    uint8
		data   []uint8 // data bytes written after the command
		reply  int     // -1: none
		status uint8
	}{
		{"read CTR", I8042_CMD_CTL_RCTR, nil, 0x45, 0x1d},
		{"write CTR", I8042_CMD_CTL_WCTR, []uint8{0x61}, -1, 0x10}, // SYS flag from CTR
		{"read CTR back", I8042_CMD_CTL_RCTR, nil, 0x61, 0x19},
		{"self test sets SYS", I8042_CMD_CTL_TEST, nil, 0x55, 0x1d},
		{"kbd test", I8042_CMD_KBD_TEST, nil, 0x00, 0x1d},
		{"kbd disable", I8042_CMD_KBD_DIS, nil, -1, 0x1c},
		{"CTR has KBDDIS", I8042_CMD_CTL_RCTR, nil, 0x75, 0x1d},
		{"kbd enable", I8042_CMD_KBD_EN, nil, -1, 0x1c},
		{"CTR lacks KBDDIS", I8042_CMD_CTL_RCTR, nil, 0x65, 0x1d},
		{"read output port", I8042_CMD_RD_OUTP, nil, 0x03, 0x1d},
		{"write output port (A20 off)", I8042_CMD_WR_OUTP, []uint8{0x01}, -1, 0x14},
		{"read output port back", I8042_CMD_RD_OUTP, nil, 0x01, 0x1d},
	} {
		kbcCmd(k, tc.cmd)
		for _, d := range tc.data {
			out(k.Data(), 0, d)
		}
		st := in(k.Command(), 0)
		if st != tc.status {
			t.Fatalf("%s: status %#x, want %#x", tc.name, st, tc.status)
		}
		if tc.reply >= 0 {
			if v := in(k.Data(), 0); v != uint8(tc.reply) {
				t.Fatalf("%s: reply %#x, want %#x", tc.name, v, tc.reply)
			}
			if in(k.Command(), 0)&I8042_STR_OBF != 0 {
				t.Fatalf("%s: OBF still set after reading", tc.name)
			}
		}
	}
	if resets != 0 || k.Unhandled() != 0 {
		t.Fatalf("resets %d unhandled %d", resets, k.Unhandled())
	}
	kbcCmd(k, 0xa9)        // aux test: no aux port
	out(k.Data(), 0, 0xff) // keyboard reset: no keyboard
	kbcCmd(k, 0xff)        // pulse nothing
	if k.Unhandled() != 2 || resets != 0 {
		t.Fatalf("unhandled %d resets %d", k.Unhandled(), resets)
	}
	s := k.State()
	kbcCmd(k, I8042_CMD_RESET)
	if resets != 1 {
		t.Fatalf("0xfe: %d resets", resets)
	}
	kbcCmd(k, I8042_CMD_WR_OUTP)
	out(k.Data(), 0, 0x02) // bit 0 low: reset
	if resets != 2 {
		t.Fatalf("output port reset: %d resets", resets)
	}
	k2 := NewI8042(nil)
	if err := k2.SetState(s); err != nil {
		t.Fatal(err)
	}
	kbcCmd(k2, I8042_CMD_CTL_RCTR)
	if v := in(k2.Data(), 0); v != 0x65 {
		t.Fatalf("restored CTR %#x", v)
	}
	kbcCmd(k2, I8042_CMD_RESET) // nil callback
}

// Mid-sequence restore: a pending "write CTR" command survives.
func TestI8042State(t *testing.T) {
	a := NewI8042(nil)
	kbcCmd(a, I8042_CMD_CTL_TEST)
	kbcCmd(a, I8042_CMD_CTL_WCTR)
	b := NewI8042(nil)
	if err := b.SetState(a.State()); err != nil {
		t.Fatal(err)
	}
	for _, k := range []*I8042{a, b} {
		out(k.Data(), 0, 0x20)
		kbcCmd(k, I8042_CMD_CTL_RCTR)
	}
	if va, vb := in(a.Data(), 0), in(b.Data(), 0); va != 0x20 || vb != 0x20 {
		t.Fatalf("CTR %#x %#x, want 0x20", va, vb)
	}
	if !reflect.DeepEqual(a.State(), b.State()) {
		t.Fatal("states differ")
	}
	if err := b.SetState(I8042State{PendingCmd: 0x99}); err == nil {
		t.Fatal("SetState accepted pending command 0x99")
	}
}
