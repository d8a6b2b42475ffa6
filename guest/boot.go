// Package guest loads guest kernels into guest memory and describes the CPU
// state they expect at entry. It knows boot protocols (PVH, Linux); it does not
// know KVM: the vmm turns an Entry into registers.
package guest

import (
	"errors"
	"fmt"
)

// Mode is the CPU mode a boot protocol enters the kernel in.
type Mode int

const (
	// Protected32 is flat 32-bit protected mode with paging off (PVH).
	Protected32 Mode = iota
	// Long64 is 64-bit long mode with identity-mapped page tables (Linux 64-bit boot).
	Long64
)

func (m Mode) String() string {
	switch m {
	case Protected32:
		return "32-bit protected mode"
	case Long64:
		return "64-bit long mode"
	}
	return fmt.Sprintf("Mode(%d)", int(m))
}

// Entry is the register state a loaded kernel must be started with.
type Entry struct {
	Mode Mode
	RIP  uint64
	RSP  uint64
	RBX  uint64 // PVH: physical address of hvm_start_info
	RSI  uint64 // Linux: physical address of boot_params
	// GDT the loader wrote into guest memory; the vmm loads it into GDTR and
	// derives segment registers from it (flat code at selector 0x10, flat
	// data at 0x18, TSS at 0x20).
	GDTBase  uint64
	GDTLimit uint16
	// CR3 is the page-table root for Long64; zero otherwise.
	CR3 uint64
}

// Errors a caller may want to tell apart (all are returned wrapped).
var (
	ErrEmpty       = errors.New("kernel image is empty")
	ErrNotKernel   = errors.New("not an ELF or bzImage kernel")
	ErrNoPVHNote   = errors.New("ELF kernel has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)")
	ErrTooSmall    = errors.New("guest memory too small")
	ErrBadKernel   = errors.New("malformed kernel image")
	ErrUnsupported = errors.New("unsupported kernel")
)

// Fixed low-memory layout shared by the loaders. Everything below 1 MiB
// that the loaders use lies in conventional RAM (below 0x9fc00).
const (
	gdtAddr        = 0x500
	startInfoAddr  = 0x6000
	modlistAddr    = 0x6100
	memmapAddr     = 0x7000
	pml4Addr       = 0x9000
	pdptAddr       = 0xa000
	pdAddr         = 0xb000 // 4 pages: identity map of the first 4 GiB with 2 MiB pages
	bootParamsAddr = 0x10000
	cmdlineAddr    = 0x20000
	cmdlineMax     = 0x10000
	bootStackTop   = 0x8ff0

	ebdaStart = 0x9fc00
	highStart = 0x100000
)

// E820 memory types.
const (
	E820RAM      = 1
	E820Reserved = 2
)

// MemRange is one entry of the guest's physical memory map.
type MemRange struct {
	Addr, Size uint64
	Type       uint32
}

// MemoryMap is the layout ftkvm gives every guest: conventional RAM, the
// EBDA/BIOS hole as reserved, then RAM from 1 MiB to the end of memory.
func MemoryMap(memSize uint64) []MemRange {
	return []MemRange{
		{0, ebdaStart, E820RAM},
		{ebdaStart, highStart - ebdaStart, E820Reserved},
		{highStart, memSize - highStart, E820RAM},
	}
}

// writeGDT writes the boot GDT: null, unused, flat code, flat data, TSS.
// The code descriptor is 32-bit (D=1) or 64-bit (L=1) as the mode needs.
func writeGDT(mem []byte, mode Mode) (uint64, uint16) {
	code := uint64(0x00cf9b000000ffff) // base 0, limit 4G, G, D, P, exec/read, accessed
	if mode == Long64 {
		code = 0x00af9b000000ffff // L=1, D=0
	}
	gdt := []uint64{
		0,
		0,
		code,
		0x00cf93000000ffff, // flat data, read/write, accessed
		0x00008b0000000067, // 32-bit busy TSS, base 0, limit 0x67
	}
	for i, d := range gdt {
		putU64(mem[gdtAddr+8*i:], d)
	}
	return gdtAddr, uint16(8*len(gdt) - 1)
}

// checkMem reports whether [addr, addr+size) lies inside guest memory.
func checkMem(mem []byte, addr, size uint64, what string) error {
	end := addr + size
	if end < addr || end > uint64(len(mem)) {
		return fmt.Errorf("%w: %s needs [%#x, %#x) but guest memory ends at %#x",
			ErrTooSmall, what, addr, end, len(mem))
	}
	return nil
}

func putU16(b []byte, v uint16) { b[0] = byte(v); b[1] = byte(v >> 8) }
func putU32(b []byte, v uint32) {
	b[0] = byte(v)
	b[1] = byte(v >> 8)
	b[2] = byte(v >> 16)
	b[3] = byte(v >> 24)
}
func putU64(b []byte, v uint64) { putU32(b, uint32(v)); putU32(b[4:], uint32(v>>32)) }
