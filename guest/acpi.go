package guest

import "fmt"

// Where a loaded kernel learns the ACPI RSDP's address: PVH's
// hvm_start_info.rsdp_paddr (offset 32) and, for the Linux 64-bit boot
// protocol, boot_params.acpi_rsdp_addr (zero-page offset 0x070, boot
// protocol 2.14; older kernels ignore it and find the RSDP by scanning
// 0xe0000-0xfffff, where ftkvm puts it too).
const (
	startInfoRSDP = 32
	bpACPIRSDP    = 0x070
)

// SetRSDP records rsdp, the guest physical address of the ACPI RSDP, in the
// boot structures of a kernel that Load returned e for.
func SetRSDP(mem []byte, e *Entry, rsdp uint64) error {
	switch {
	case e.Mode == Protected32 && e.RBX == startInfoAddr:
		putU64(mem[startInfoAddr+startInfoRSDP:], rsdp)
	case e.Mode == Long64 && e.RSI == bootParamsAddr:
		putU64(mem[bootParamsAddr+bpACPIRSDP:], rsdp)
	default:
		return fmt.Errorf("%w: entry %+v has no boot structure for the RSDP", ErrUnsupported, *e)
	}
	return nil
}
