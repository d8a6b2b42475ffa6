package insn

import "encoding/binary"

// Control-register bits the page walk reads.
const (
	cr0PE    = 1 << 0
	cr0PG    = 1 << 31
	cr4PSE   = 1 << 4
	cr4PAE   = 1 << 5
	cr4LA57  = 1 << 12
	eferLMA  = 1 << 10
	ptePres  = 1 << 0
	ptePS    = 1 << 7
	physMask = 0x000f_ffff_ffff_f000 // bits 51:12 of an entry
)

// Paging is the part of the vCPU's state that decides how linear addresses
// become guest-physical ones.
type Paging struct {
	CR0, CR3, CR4, EFER uint64
}

// Translate walks the guest's page tables in mem (guest-physical memory,
// index = address) for a linear address, as the CPU would for an
// instruction fetch, and returns the guest-physical address. ok is false
// when a level is not present or a table lies outside mem.
//
// The step clock reads instruction bytes with it before every stepped
// instruction. It walks the tables as they are in memory now, not what a
// TLB may still hold: a guest that changed a live mapping without
// flushing it gets what it asked for only on a CPU that happens not to
// have the old entry cached, so such a guest is already outside what the
// architecture defines. (KVM_TRANSLATE, an ioctl costing several
// microseconds here, walks memory the same way; the tests compare the two.)
// Access rights (U/S, NX) are not checked: a fetch they forbid faults in
// the guest when KVM runs it.
func (p Paging) Translate(mem []byte, linear uint64) (phys uint64, ok bool) {
	if p.CR0&cr0PG == 0 || p.CR0&cr0PE == 0 {
		return linear & 0xffff_ffff, true
	}
	switch {
	case p.EFER&eferLMA != 0:
		levels := 4
		if p.CR4&cr4LA57 != 0 {
			levels = 5
		}
		table := p.CR3 & physMask
		for l := levels; l >= 1; l-- {
			shift := 12 + 9*uint(l-1)
			e, ok := read64(mem, table+((linear>>shift)&0x1ff)*8)
			if !ok || e&ptePres == 0 {
				return 0, false
			}
			if l == 1 || (l <= 3 && e&ptePS != 0) {
				// A 4 KiB page, or a 2 MiB (l=2) or 1 GiB (l=3) one.
				pageMask := uint64(1)<<shift - 1
				return (e&physMask)&^pageMask | linear&pageMask, true
			}
			table = e & physMask
		}
		return 0, false
	case p.CR4&cr4PAE != 0:
		// PAE: a 4-entry PDPT at CR3[31:5], then 512-entry tables.
		lin := linear & 0xffff_ffff
		e, ok := read64(mem, p.CR3&0xffff_ffe0+(lin>>30)*8)
		if !ok || e&ptePres == 0 {
			return 0, false
		}
		e, ok = read64(mem, e&physMask+((lin>>21)&0x1ff)*8)
		if !ok || e&ptePres == 0 {
			return 0, false
		}
		if e&ptePS != 0 {
			return (e&physMask)&^0x1f_ffff | lin&0x1f_ffff, true
		}
		e, ok = read64(mem, e&physMask+((lin>>12)&0x1ff)*8)
		if !ok || e&ptePres == 0 {
			return 0, false
		}
		return e&physMask | lin&0xfff, true
	default:
		// 32-bit paging: 1024-entry tables of 4-byte entries, 4 MiB pages
		// with CR4.PSE (their physical bits 39:32 in entry bits 20:13).
		lin := linear & 0xffff_ffff
		e, ok := read32(mem, p.CR3&0xffff_f000+(lin>>22)*4)
		if !ok || e&ptePres == 0 {
			return 0, false
		}
		if e&ptePS != 0 && p.CR4&cr4PSE != 0 {
			hi := uint64(e>>13) & 0xff
			return hi<<32 | uint64(e&0xffc0_0000) | lin&0x3f_ffff, true
		}
		e, ok = read32(mem, uint64(e&0xffff_f000)+((lin>>12)&0x3ff)*4)
		if !ok || e&ptePres == 0 {
			return 0, false
		}
		return uint64(e&0xffff_f000) | lin&0xfff, true
	}
}

func read64(mem []byte, at uint64) (uint64, bool) {
	if at > uint64(len(mem)) || uint64(len(mem))-at < 8 {
		return 0, false
	}
	return binary.LittleEndian.Uint64(mem[at:]), true
}

func read32(mem []byte, at uint64) (uint32, bool) {
	if at > uint64(len(mem)) || uint64(len(mem))-at < 4 {
		return 0, false
	}
	return binary.LittleEndian.Uint32(mem[at:]), true
}

// Fetch copies up to len(dst) bytes of guest memory starting at a linear
// address into dst, page by page, and returns how many it copied: it stops
// at the first page that is not mapped or not in mem. It does not
// allocate.
func (p Paging) Fetch(mem []byte, linear uint64, dst []byte) int {
	n := 0
	for n < len(dst) {
		lin := linear + uint64(n)
		if p.EFER&eferLMA == 0 || p.CR0&cr0PG == 0 {
			lin &= 0xffff_ffff
		}
		phys, ok := p.Translate(mem, lin)
		if !ok || phys >= uint64(len(mem)) {
			return n
		}
		chunk := min(uint64(len(dst)-n), 4096-lin&0xfff, uint64(len(mem))-phys)
		n += copy(dst[n:n+int(chunk)], mem[phys:])
	}
	return n
}

// Read reads a little-endian value of size bytes (2, 4 or 8) at a
// linear address; ok is false if any byte is unmapped.
func (p Paging) Read(mem []byte, linear uint64, size int) (uint64, bool) {
	var buf [8]byte
	if size > 8 || p.Fetch(mem, linear, buf[:size]) != size {
		return 0, false
	}
	return binary.LittleEndian.Uint64(buf[:]), true
}
