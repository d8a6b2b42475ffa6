package guest

import (
	"encoding/binary"
	"fmt"
)

// The Linux x86 boot protocol (Documentation/arch/x86/boot.rst). Offsets
// are into the zero page (struct boot_params), whose setup header starts
// at 0x1f1 and is also found at that offset in the bzImage file.
const (
	bpExtRamdiskImage = 0x0c0
	bpExtRamdiskSize  = 0x0c4
	bpExtCmdLinePtr   = 0x0c8
	bpE820Entries     = 0x1e8
	bpSetupSects      = 0x1f1
	bpBootFlag        = 0x1fe
	bpJump            = 0x200
	bpHeader          = 0x202
	bpVersion         = 0x206
	bpTypeOfLoader    = 0x210
	bpLoadflags       = 0x211
	bpRamdiskImage    = 0x218
	bpRamdiskSize     = 0x21c
	bpHeapEndPtr      = 0x224
	bpCmdLinePtr      = 0x228
	bpInitrdAddrMax   = 0x22c
	bpKernelAlignment = 0x230
	bpRelocatable     = 0x234
	bpXloadflags      = 0x236
	bpCmdlineSize     = 0x238
	bpPrefAddress     = 0x258
	bpInitSize        = 0x260
	bpE820Table       = 0x2d0
	e820Max           = 128

	hdrMagic              = 0x53726448 // "HdrS"
	loadedHigh            = 0x01
	canUseHeap            = 0x80
	xlfKernel64           = 0x01
	xlfCanBeLoadedAbove4G = 0x02
	minProtocol           = 0x020c // 2.12: xloadflags, the 64-bit entry
	entry64Offset         = 0x200
)

// IsBzImage reports whether image has a Linux setup header.
func IsBzImage(image []byte) bool {
	return len(image) >= 0x264 && binary.LittleEndian.Uint32(image[bpHeader:]) == hdrMagic
}

// LoadBzImage loads a bzImage by the 64-bit boot protocol: the protected-
// mode kernel at its preferred address, boot_params at bootParamsAddr with
// the e820 map, the command line and the initrd, identity page tables for
// the first 4 GiB, and an entry at load address + 0x200 in long mode with
// %rsi pointing to boot_params.
func LoadBzImage(mem, image, initrd []byte, cmdline string) (*Entry, error) {
	le := binary.LittleEndian
	if !IsBzImage(image) {
		return nil, fmt.Errorf("%w: no Linux setup header", ErrNotKernel)
	}
	if le.Uint16(image[bpBootFlag:]) != 0xaa55 {
		return nil, fmt.Errorf("%w: bzImage boot flag is %#x, not 0xaa55", ErrBadKernel, le.Uint16(image[bpBootFlag:]))
	}
	version := le.Uint16(image[bpVersion:])
	if version < minProtocol {
		return nil, fmt.Errorf("%w: bzImage boot protocol %d.%02d is too old; ftkvm needs 2.12 or later for the 64-bit entry",
			ErrUnsupported, version>>8, version&0xff)
	}
	if image[bpLoadflags]&loadedHigh == 0 {
		return nil, fmt.Errorf("%w: a zImage (not loaded high) cannot be booted", ErrUnsupported)
	}
	xlf := le.Uint16(image[bpXloadflags:])
	if xlf&xlfKernel64 == 0 {
		return nil, fmt.Errorf("%w: bzImage has no 64-bit entry point (xloadflags %#x)", ErrUnsupported, xlf)
	}
	setupSects := int(image[bpSetupSects])
	if setupSects == 0 {
		setupSects = 4
	}
	kernelOff := (setupSects + 1) * 512
	if kernelOff >= len(image) {
		return nil, fmt.Errorf("%w: bzImage truncated: %d bytes, setup alone is %d", ErrBadKernel, len(image), kernelOff)
	}
	payload := image[kernelOff:]
	if len(mem) < highStart*2 {
		return nil, fmt.Errorf("%w: %d bytes", ErrTooSmall, len(mem))
	}

	initSize := uint64(le.Uint32(image[bpInitSize:]))
	initSize = max(initSize, uint64(len(payload)))
	align := uint64(le.Uint32(image[bpKernelAlignment:]))
	relocatable := image[bpRelocatable] != 0
	load := le.Uint64(image[bpPrefAddress:])
	if load < highStart {
		load = highStart
	}
	if load+initSize > uint64(len(mem)) {
		if !relocatable {
			return nil, fmt.Errorf("%w: the kernel is not relocatable and needs [%#x, %#x); guest memory ends at %#x",
				ErrTooSmall, load, load+initSize, len(mem))
		}
		if align == 0 || align&(align-1) != 0 {
			align = 2 << 20
		}
		load = (highStart + align - 1) &^ (align - 1)
	}
	if err := checkMem(mem, load, initSize, "kernel (init_size)"); err != nil {
		return nil, err
	}
	copy(mem[load:], payload)
	clear(mem[load+uint64(len(payload)) : load+initSize])

	bp := mem[bootParamsAddr : bootParamsAddr+0x1000]
	clear(bp)
	hdrEnd := bpHeader + int(image[bpJump+1]) // the jump at 0x200 skips the header
	if hdrEnd > 0x1000 || hdrEnd > len(image) || hdrEnd < bpInitSize+4 {
		hdrEnd = bpInitSize + 4
	}
	copy(bp[bpSetupSects:hdrEnd], image[bpSetupSects:hdrEnd])
	bp[bpTypeOfLoader] = 0xff // undefined boot loader
	bp[bpLoadflags] |= canUseHeap
	le.PutUint16(bp[bpHeapEndPtr:], 0xfe00)

	cmdlineLimit := uint64(le.Uint32(image[bpCmdlineSize:]))
	if cmdlineLimit == 0 {
		cmdlineLimit = 255
	}
	if uint64(len(cmdline)) > cmdlineLimit {
		return nil, fmt.Errorf("%w: command line is %d bytes; this kernel takes at most %d", ErrUnsupported, len(cmdline), cmdlineLimit)
	}
	if err := writeCmdline(mem, cmdline); err != nil {
		return nil, err
	}
	le.PutUint32(bp[bpCmdLinePtr:], cmdlineAddr)

	if len(initrd) > 0 {
		limit := uint64(le.Uint32(image[bpInitrdAddrMax:])) + 1
		if xlf&xlfCanBeLoadedAbove4G != 0 {
			limit = uint64(len(mem))
		}
		addr, err := placeInitrd(mem, load+initSize, uint64(len(initrd)), min(limit, 1<<32))
		if err != nil {
			return nil, err
		}
		copy(mem[addr:], initrd)
		le.PutUint32(bp[bpRamdiskImage:], uint32(addr))
		le.PutUint32(bp[bpRamdiskSize:], uint32(len(initrd)))
		le.PutUint32(bp[bpExtRamdiskImage:], uint32(addr>>32))
		le.PutUint32(bp[bpExtRamdiskSize:], uint32(uint64(len(initrd))>>32))
	}

	mm := MemoryMap(uint64(len(mem)))
	for i, r := range mm {
		e := bp[bpE820Table+20*i:]
		le.PutUint64(e[0:], r.Addr)
		le.PutUint64(e[8:], r.Size)
		le.PutUint32(e[16:], r.Type)
	}
	bp[bpE820Entries] = byte(len(mm))

	writeIdentityPageTables(mem)
	base, limit := writeGDT(mem, Long64)
	return &Entry{
		Mode:     Long64,
		RIP:      load + entry64Offset,
		RSI:      bootParamsAddr,
		RSP:      bootStackTop,
		GDTBase:  base,
		GDTLimit: limit,
		CR3:      pml4Addr,
	}, nil
}

// writeIdentityPageTables maps the first 4 GiB 1:1 with 2 MiB pages, which
// covers everything the 64-bit entry must reach (kernel, boot_params,
// command line, initrd).
func writeIdentityPageTables(mem []byte) {
	const present, rw, ps = 1, 2, 0x80
	clear(mem[pml4Addr : pdAddr+4*0x1000])
	putU64(mem[pml4Addr:], pdptAddr|present|rw)
	for i := uint64(0); i < 4; i++ {
		putU64(mem[pdptAddr+8*i:], (pdAddr+0x1000*i)|present|rw)
	}
	for i := uint64(0); i < 4*512; i++ {
		putU64(mem[pdAddr+8*i:], (i<<21)|present|rw|ps)
	}
}
