package acpi

import (
	"bytes"
	"encoding/binary"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

const testBase = 0xe0000

func testConfig() Config {
	return Config{
		PM1aEvent: 0x600, PM1aControl: 0x604, PMTimer: 0x608, SCI: 9,
		ResetPort: 0xcf9, ResetValue: 6, SlpTypS5: 5,
		Virtio: []Virtio{{0xd0000000, 0x1000, 5}, {0xd0001000, 0x1000, 10}},
	}
}

func sum(b []byte) byte {
	var s byte
	for _, v := range b {
		s += v
	}
	return s
}

// table returns the table at guest address gpa in blob b, checking its
// signature, length and checksum.
func table(t *testing.T, b []byte, gpa uint64, sig string) []byte {
	t.Helper()
	off := gpa - testBase
	if off+headerSize > uint64(len(b)) {
		t.Fatalf("%s at %#x is outside the tables", sig, gpa)
	}
	n := uint64(binary.LittleEndian.Uint32(b[off+4:]))
	if off+n > uint64(len(b)) || n < headerSize {
		t.Fatalf("%s: length %d", sig, n)
	}
	tb := b[off : off+n]
	if string(tb[:4]) != sig {
		t.Fatalf("table at %#x is %q, want %q", gpa, tb[:4], sig)
	}
	if sum(tb) != 0 {
		t.Fatalf("%s: checksum does not sum to 0", sig)
	}
	return tb
}

func TestTablesParseBack(t *testing.T) {
	b, err := Build(testBase, testConfig())
	if err != nil {
		t.Fatal(err)
	}
	le := binary.LittleEndian
	r := b[:rsdpSize]
	if string(r[:8]) != "RSD PTR " || r[15] != 2 || sum(r[:20]) != 0 || sum(r) != 0 || le.Uint32(r[20:]) != rsdpSize {
		t.Fatalf("RSDP % x", r)
	}
	xsdt := table(t, b, le.Uint64(r[24:]), "XSDT")
	if len(xsdt) != headerSize+8 {
		t.Fatalf("XSDT has %d entries, want the FADT only", (len(xsdt)-headerSize)/8)
	}
	fadt := table(t, b, le.Uint64(xsdt[headerSize:]), "FACP")
	if len(fadt) != 276 || fadt[8] != 6 || fadt[fadtMinorVersion] != 5 {
		t.Fatalf("FADT length %d revision %d.%d", len(fadt), fadt[8], fadt[fadtMinorVersion])
	}
	for _, f := range []struct {
		name string
		got  uint64
		want uint64
	}{
		{"SCI_INT", uint64(le.Uint16(fadt[fadtSCIInt:])), 9},
		{"SMI_CMD", uint64(le.Uint32(fadt[fadtSMICmd:])), 0},
		{"PM1a_EVT_BLK", uint64(le.Uint32(fadt[fadtPM1aEvtBlk:])), 0x600},
		{"PM1a_CNT_BLK", uint64(le.Uint32(fadt[fadtPM1aCntBlk:])), 0x604},
		{"PM_TMR_BLK", uint64(le.Uint32(fadt[fadtPMTmrBlk:])), 0x608},
		{"PM1_EVT_LEN", uint64(fadt[fadtPM1EvtLen]), 4},
		{"PM1_CNT_LEN", uint64(fadt[fadtPM1CntLen]), 2},
		{"PM_TMR_LEN", uint64(fadt[fadtPMTmrLen]), 4},
		{"X_PM_TMR_BLK address", le.Uint64(fadt[fadtXPMTmrBlk+4:]), 0x608},
		{"X_PM_TMR_BLK space", uint64(fadt[fadtXPMTmrBlk]), gasSystemIO},
		{"X_PM1a_CNT_BLK address", le.Uint64(fadt[fadtXPM1aCntBlk+4:]), 0x604},
		{"X_PM1a_EVT_BLK address", le.Uint64(fadt[fadtXPM1aEvtBlk+4:]), 0x600},
		{"RESET_REG address", le.Uint64(fadt[fadtResetReg+4:]), 0xcf9},
		{"RESET_VALUE", uint64(fadt[fadtResetValue]), 6},
		{"TMR_VAL_EXT (24-bit timer)", uint64(le.Uint32(fadt[fadtFlags:]) >> 8 & 1), 0},
		{"HW_REDUCED_ACPI", uint64(le.Uint32(fadt[fadtFlags:]) >> 20 & 1), 0},
		{"RESET_REG_SUP", uint64(le.Uint32(fadt[fadtFlags:]) >> 10 & 1), 1},
		{"IAPC_BOOT_ARCH 8042 (no keyboard controller)", uint64(le.Uint16(fadt[fadtIAPCBootArch:]) & bootArch8042), 0},
		{"IAPC_BOOT_ARCH LEGACY_DEVICES", uint64(le.Uint16(fadt[fadtIAPCBootArch:]) & bootArchLegacyDevices), 1},
	} {
		if f.got != f.want {
			t.Errorf("FADT %s = %#x, want %#x", f.name, f.got, f.want)
		}
	}
	facsAddr := uint64(le.Uint32(fadt[fadtFirmwareCtrl:]))
	if facsAddr%64 != 0 || string(b[facsAddr-testBase:][:4]) != "FACS" || le.Uint32(b[facsAddr-testBase+4:]) != 64 {
		t.Fatalf("FACS at %#x", facsAddr)
	}
	dsdtAddr := le.Uint64(fadt[fadtXDSDT:])
	if uint64(le.Uint32(fadt[fadtDSDT:])) != dsdtAddr {
		t.Fatal("DSDT and X_DSDT differ")
	}
	dsdt := table(t, b, dsdtAddr, "DSDT")
	aml := dsdt[headerSize:]

	// \_S5_: Name(_S5_, Package(4){5, 5, 0, 0}), byte for byte
	// (§20.2.5.1 NameOp, §20.2.5.4 PackageOp, BytePrefix, ZeroOp).
	wantS5 := []byte{0x08, '_', 'S', '5', '_', 0x12, 0x08, 0x04, 0x0a, 0x05, 0x0a, 0x05, 0x00, 0x00}
	if !bytes.HasPrefix(aml, wantS5) {
		t.Fatalf("AML starts % x, want \\_S5 % x", aml[:min(len(aml), 16)], wantS5)
	}
	// The first device's _CRS resource template, byte for byte (§6.4.3.4
	// Memory32Fixed, §6.4.3.6 Extended Interrupt: consumer, edge, active
	// high, exclusive; §6.4.2.9 End Tag).
	wantCRS := []byte{
		0x86, 0x09, 0x00, 0x01, 0x00, 0x00, 0x00, 0xd0, 0x00, 0x10, 0x00, 0x00,
		0x89, 0x06, 0x00, 0x03, 0x01, 0x05, 0x00, 0x00, 0x00,
		0x79, 0x00,
	}
	// Name(_CRS, Buffer(23){...}): BufferOp, PkgLength, BytePrefix 23.
	wantName := append([]byte{0x08, '_', 'C', 'R', 'S', 0x11, byte(1 + 2 + len(wantCRS)), 0x0a, byte(len(wantCRS))}, wantCRS...)
	if !bytes.Contains(aml, wantName) {
		t.Fatalf("AML lacks the first device's _CRS % x", wantName)
	}
	// Each device: Device(VRnn) in Scope(\_SB_) with _HID "LNRO0005".
	// DeviceOp (0x5b 0x82), a two-byte PkgLength (lead byte 0x4n), then
	// the name.
	for _, name := range []string{"VR00", "VR01"} {
		i := bytes.Index(aml, []byte(name))
		if i < 4 || aml[i-4] != 0x5b || aml[i-3] != 0x82 || aml[i-2]>>6 != 1 {
			t.Fatalf("AML lacks Device(%s)", name)
		}
	}
	if n := bytes.Count(aml, []byte("\x08_HID\x0dLNRO0005\x00")); n != 2 {
		t.Fatalf("%d LNRO0005 devices, want 2", n)
	}
	if !bytes.Contains(aml, []byte("\x10")) || !bytes.Contains(aml, []byte("\\_SB_")) {
		t.Fatal("AML lacks Scope(\\_SB_)")
	}
}

func TestPkgLength(t *testing.T) {
	for _, tc := range []struct {
		n    int
		want []byte
	}{
		{0, []byte{0x01}},
		{62, []byte{0x3f}},
		{63, []byte{0x41, 0x04}},         // 65 = 0x41: lead 0x40|1, then 0x04
		{4093, []byte{0x4f, 0xff}},       // 4095
		{4094, []byte{0x81, 0x00, 0x01}}, // 4097 = 0x1001: nibble 1, then 0x100
	} {
		if got := pkgLength(nil, tc.n); !bytes.Equal(got, tc.want) {
			t.Errorf("pkgLength(%d) = % x, want % x", tc.n, got, tc.want)
		}
	}
}

func TestBuildRefuses(t *testing.T) {
	if _, err := Build(0xe0010, testConfig()); err == nil {
		t.Error("unaligned base accepted")
	}
	c := testConfig()
	c.Virtio = append(c.Virtio, Virtio{0xfffff000, 0x2000, 5})
	if _, err := Build(testBase, c); err == nil {
		t.Error("a window past 4 GiB accepted")
	}
}

// TestTablesIASL disassembles the tables with ACPICA's iasl, the reference
// AML disassembler, where it is installed (Debian: acpica-tools), and
// checks that it finds no errors and sees the devices.
func TestTablesIASL(t *testing.T) {
	iasl, err := exec.LookPath("iasl")
	if err != nil {
		if os.Getenv("FTKVM_TEST_STRICT") != "" {
			t.Fatal("iasl (acpica-tools) is not installed; test/setup-deps.sh installs it")
		}
		t.Skip("iasl (acpica-tools) is not installed")
	}
	b, err := Build(testBase, testConfig())
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	le := binary.LittleEndian
	for _, tb := range []struct {
		name string
		off  uint64
	}{{"dsdt", offDSDT}, {"facp", offFADT}, {"xsdt", offXSDT}} {
		n := le.Uint32(b[tb.off+4:])
		p := filepath.Join(dir, tb.name+".dat")
		if err := os.WriteFile(p, b[tb.off:tb.off+uint64(n)], 0o600); err != nil {
			t.Fatal(err)
		}
		out, err := exec.Command(iasl, "-d", p).CombinedOutput()
		if err != nil {
			t.Fatalf("iasl -d %s: %v\n%s", tb.name, err, out)
		}
		dsl, err := os.ReadFile(filepath.Join(dir, tb.name+".dsl"))
		if err != nil {
			t.Fatalf("iasl wrote no %s.dsl: %v\n%s", tb.name, err, out)
		}
		s := string(dsl)
		if strings.Contains(s, "Error") || strings.Contains(strings.ToLower(string(out)), "error ") {
			t.Fatalf("iasl reports errors for %s:\n%s\n%s", tb.name, out, s)
		}
		if tb.name == "dsdt" {
			for _, want := range []string{`Name (_S5, Package (0x04)`, `Device (VR00)`, `Device (VR01)`,
				`Name (_HID, "LNRO0005")`, `Memory32Fixed (ReadWrite,`, `0xD0001000`,
				`Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, )`, `0x0000000A,`} {
				if !strings.Contains(s, want) {
					t.Errorf("DSDT disassembly lacks %q:\n%s", want, s)
				}
			}
		}
		if tb.name == "facp" && !strings.Contains(s, "PM Timer Block Address : 00000608") {
			t.Errorf("FADT disassembly lacks the PM timer:\n%s", s)
		}
	}
}
