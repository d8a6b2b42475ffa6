package guest

import (
	"bytes"
	"debug/elf"
	"encoding/binary"
	"fmt"
)

// The Xen PVH boot ABI (xen/include/public/arch-x86/hvm/start_info.h and
// docs/misc/pvh.pandoc): the kernel advertises a 32-bit physical entry point
// in an ELF note; it is entered in flat 32-bit protected mode, paging off,
// with %ebx holding the physical address of struct hvm_start_info.
const (
	xenNoteName           = "Xen"
	xenElfnotePhys32Entry = 18

	startInfoMagic   = 0x336ec578
	startInfoVersion = 1 // version 1 adds the memory map

	startInfoSize = 56 // sizeof(struct hvm_start_info), version 1
	modlistSize   = 32 // sizeof(struct hvm_modlist_entry)
	memmapEntSize = 24 // sizeof(struct hvm_memmap_table_entry)
)

// IsELF reports whether image starts with the ELF magic.
func IsELF(image []byte) bool { return len(image) >= 4 && bytes.Equal(image[:4], []byte(elf.ELFMAG)) }

// PVHEntry returns the PVH entry point advertised by an ELF kernel.
func PVHEntry(image []byte) (uint32, error) {
	f, err := elf.NewFile(bytes.NewReader(image))
	if err != nil {
		return 0, fmt.Errorf("%w: %v", ErrBadKernel, err)
	}
	defer f.Close()
	return pvhEntry(f)
}

func pvhEntry(f *elf.File) (uint32, error) {
	// Notes may be reachable through program headers (what a loader sees)
	// or only through sections; look at both, program headers first.
	var blobs [][]byte
	for _, p := range f.Progs {
		if p.Type == elf.PT_NOTE {
			b := make([]byte, min(p.Filesz, 1<<20))
			if n, _ := p.ReadAt(b, 0); n > 0 {
				blobs = append(blobs, b[:n])
			}
		}
	}
	for _, s := range f.Sections {
		if s.Type == elf.SHT_NOTE {
			if b, err := s.Data(); err == nil {
				blobs = append(blobs, b)
			}
		}
	}
	for _, b := range blobs {
		if e, ok := findXenEntry(b, f.ByteOrder); ok {
			return e, nil
		}
	}
	return 0, ErrNoPVHNote
}

// findXenEntry walks an ELF note blob: namesz, descsz, type, name, desc,
// each of name and desc padded to 4 bytes (ELF64 notes use 4-byte alignment
// too, as Linux and Xen emit them).
func findXenEntry(b []byte, bo binary.ByteOrder) (uint32, bool) {
	for len(b) >= 12 {
		namesz := uint64(bo.Uint32(b[0:]))
		descsz := uint64(bo.Uint32(b[4:]))
		typ := bo.Uint32(b[8:])
		b = b[12:]
		nameEnd := (namesz + 3) &^ 3
		descEnd := (descsz + 3) &^ 3
		if nameEnd > uint64(len(b)) || nameEnd+descEnd > uint64(len(b)) {
			return 0, false
		}
		name := b[:namesz]
		desc := b[nameEnd : nameEnd+descsz]
		b = b[nameEnd+descEnd:]
		if typ != xenElfnotePhys32Entry || string(bytes.TrimRight(name, "\x00")) != xenNoteName {
			continue
		}
		switch len(desc) {
		case 4:
			return bo.Uint32(desc), true
		case 8: // some kernels emit the entry as a pointer-sized value
			v := bo.Uint64(desc)
			if v>>32 != 0 {
				return 0, false
			}
			return uint32(v), true
		}
		return 0, false
	}
	return 0, false
}

// LoadPVH loads an ELF32 or ELF64 kernel with a PVH note into mem, places
// the initrd (if any) as module 0 and the command line, writes
// hvm_start_info and the memory map, and returns the entry state.
func LoadPVH(mem, image, initrd []byte, cmdline string) (*Entry, error) {
	if len(image) == 0 {
		return nil, ErrEmpty
	}
	f, err := elf.NewFile(bytes.NewReader(image))
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrBadKernel, err)
	}
	defer f.Close()
	if f.Machine != elf.EM_X86_64 && f.Machine != elf.EM_386 {
		return nil, fmt.Errorf("%w: ELF machine %v is not x86", ErrUnsupported, f.Machine)
	}
	entry, err := pvhEntry(f)
	if err != nil {
		return nil, err
	}
	if len(mem) < highStart*2 {
		return nil, fmt.Errorf("%w: %d bytes", ErrTooSmall, len(mem))
	}

	// Load PT_LOAD segments at their physical addresses (a Linux vmlinux
	// links at 0xffffffff81000000 but its p_paddr is the physical 16 MiB).
	var kernelEnd uint64
	loaded := 0
	for i, p := range f.Progs {
		if p.Type != elf.PT_LOAD || p.Memsz == 0 {
			continue
		}
		if p.Filesz > p.Memsz {
			return nil, fmt.Errorf("%w: segment %d has filesz %#x > memsz %#x", ErrBadKernel, i, p.Filesz, p.Memsz)
		}
		if p.Paddr < highStart {
			return nil, fmt.Errorf("%w: segment %d loads at %#x, below 1 MiB where the boot structures live", ErrUnsupported, i, p.Paddr)
		}
		if err := checkMem(mem, p.Paddr, p.Memsz, fmt.Sprintf("kernel segment %d", i)); err != nil {
			return nil, err
		}
		dst := mem[p.Paddr : p.Paddr+p.Memsz]
		n, err := p.ReadAt(dst[:p.Filesz], 0)
		if uint64(n) != p.Filesz {
			return nil, fmt.Errorf("%w: segment %d truncated (%d of %d bytes): %v", ErrBadKernel, i, n, p.Filesz, err)
		}
		clear(dst[p.Filesz:])
		kernelEnd = max(kernelEnd, p.Paddr+p.Memsz)
		loaded++
	}
	if loaded == 0 {
		return nil, fmt.Errorf("%w: no loadable segments", ErrBadKernel)
	}
	if uint64(entry) < highStart || uint64(entry) >= kernelEnd {
		return nil, fmt.Errorf("%w: PVH entry %#x is outside the loaded kernel", ErrBadKernel, entry)
	}

	if err := writeCmdline(mem, cmdline); err != nil {
		return nil, err
	}

	si := mem[startInfoAddr : startInfoAddr+startInfoSize]
	clear(si)
	putU32(si[0:], startInfoMagic)
	putU32(si[4:], startInfoVersion)
	putU64(si[16:], 0) // modlist_paddr, set below
	putU64(si[24:], cmdlineAddr)
	putU64(si[32:], 0) // rsdp_paddr: SetRSDP (acpi.go) fills it in
	if len(initrd) > 0 {
		addr, err := placeInitrd(mem, kernelEnd, uint64(len(initrd)), uint64(len(mem)))
		if err != nil {
			return nil, err
		}
		copy(mem[addr:], initrd)
		ml := mem[modlistAddr : modlistAddr+modlistSize]
		clear(ml)
		putU64(ml[0:], addr)
		putU64(ml[8:], uint64(len(initrd)))
		putU32(si[12:], 1) // nr_modules
		putU64(si[16:], modlistAddr)
	}
	mm := MemoryMap(uint64(len(mem)))
	for i, r := range mm {
		e := mem[memmapAddr+i*memmapEntSize:]
		putU64(e[0:], r.Addr)
		putU64(e[8:], r.Size)
		putU32(e[16:], r.Type)
		putU32(e[20:], 0)
	}
	putU64(si[40:], memmapAddr)
	putU32(si[48:], uint32(len(mm)))

	base, limit := writeGDT(mem, Protected32)
	return &Entry{
		Mode:     Protected32,
		RIP:      uint64(entry),
		RBX:      startInfoAddr,
		GDTBase:  base,
		GDTLimit: limit,
	}, nil
}

func writeCmdline(mem []byte, cmdline string) error {
	if len(cmdline)+1 > cmdlineMax {
		return fmt.Errorf("%w: command line is %d bytes, at most %d", ErrUnsupported, len(cmdline), cmdlineMax-1)
	}
	n := copy(mem[cmdlineAddr:], cmdline)
	mem[cmdlineAddr+n] = 0
	return nil
}

// placeInitrd puts the initrd at the highest page-aligned address below
// limit that is above the kernel, as boot loaders conventionally do.
func placeInitrd(mem []byte, kernelEnd, size, limit uint64) (uint64, error) {
	limit = min(limit, uint64(len(mem)))
	if size > limit {
		return 0, fmt.Errorf("%w: initrd of %d bytes does not fit in %d bytes of memory", ErrTooSmall, size, len(mem))
	}
	addr := (limit - size) &^ 0xfff
	floor := (kernelEnd + 0xfff) &^ 0xfff
	if addr < floor {
		return 0, fmt.Errorf("%w: initrd of %d bytes does not fit between the kernel end %#x and %#x",
			ErrTooSmall, size, kernelEnd, limit)
	}
	return addr, nil
}
