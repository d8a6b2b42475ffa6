package guest

import (
	"encoding/binary"
	"testing"
)

func TestSetRSDP(t *testing.T) {
	mem := make([]byte, 4<<20)
	pvh := &Entry{Mode: Protected32, RBX: startInfoAddr}
	if err := SetRSDP(mem, pvh, 0xe0000); err != nil {
		t.Fatal(err)
	}
	// struct hvm_start_info: magic, version, flags, nr_modules,
	// modlist_paddr, cmdline_paddr, rsdp_paddr at 32.
	if got := binary.LittleEndian.Uint64(mem[startInfoAddr+32:]); got != 0xe0000 {
		t.Fatalf("rsdp_paddr = %#x", got)
	}
	linux := &Entry{Mode: Long64, RSI: bootParamsAddr}
	if err := SetRSDP(mem, linux, 0xe0000); err != nil {
		t.Fatal(err)
	}
	// struct boot_params: acpi_rsdp_addr at 0x070.
	if got := binary.LittleEndian.Uint64(mem[bootParamsAddr+0x70:]); got != 0xe0000 {
		t.Fatalf("acpi_rsdp_addr = %#x", got)
	}
	if err := SetRSDP(mem, &Entry{Mode: Long64}, 0xe0000); err == nil {
		t.Fatal("an entry without boot structures accepted")
	}
}
