package guest

import (
	"bytes"
	"encoding/binary"
	"errors"
	"testing"
)

// buildELF makes a minimal ELF kernel: one PT_LOAD of code at paddr and,
// if withNote, one PT_NOTE holding the Xen PVH entry note.
func buildELF(class64 bool, paddr uint64, code []byte, entry uint32, withNote bool) []byte {
	le := binary.LittleEndian
	var note bytes.Buffer
	if withNote {
		// An unrelated note first, to check the walker skips it.
		binary.Write(&note, le, []uint32{4, 4, 1})
		note.WriteString("GNU\x00")
		binary.Write(&note, le, uint32(0))
		binary.Write(&note, le, []uint32{4, 4, xenElfnotePhys32Entry})
		note.WriteString("Xen\x00")
		binary.Write(&note, le, entry)
	}
	var ehsz, phsz int
	if class64 {
		ehsz, phsz = 64, 56
	} else {
		ehsz, phsz = 52, 32
	}
	nph := 1
	if withNote {
		nph = 2
	}
	codeOff := ehsz + nph*phsz
	noteOff := codeOff + len(code)
	var b bytes.Buffer
	ident := []byte{0x7f, 'E', 'L', 'F', 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0}
	if class64 {
		ident[4] = 2
	}
	b.Write(ident)
	machine := uint16(3) // EM_386
	if class64 {
		machine = 62 // EM_X86_64
	}
	if class64 {
		binary.Write(&b, le, struct {
			Type, Machine              uint16
			Version                    uint32
			Entry, Phoff, Shoff        uint64
			Flags                      uint32
			Ehsize, Phentsize, Phnum   uint16
			Shentsize, Shnum, Shstrndx uint16
		}{2, machine, 1, uint64(entry), uint64(ehsz), 0, 0, uint16(ehsz), uint16(phsz), uint16(nph), 64, 0, 0})
		binary.Write(&b, le, struct {
			Type, Flags                             uint32
			Off, Vaddr, Paddr, Filesz, Memsz, Align uint64
		}{1, 5, uint64(codeOff), paddr, paddr, uint64(len(code)), uint64(len(code)) + 0x1000, 0x1000})
		if withNote {
			binary.Write(&b, le, struct {
				Type, Flags                             uint32
				Off, Vaddr, Paddr, Filesz, Memsz, Align uint64
			}{4, 4, uint64(noteOff), 0, 0, uint64(note.Len()), uint64(note.Len()), 4})
		}
	} else {
		binary.Write(&b, le, struct {
			Type, Machine              uint16
			Version                    uint32
			Entry, Phoff, Shoff        uint32
			Flags                      uint32
			Ehsize, Phentsize, Phnum   uint16
			Shentsize, Shnum, Shstrndx uint16
		}{2, machine, 1, entry, uint32(ehsz), 0, 0, uint16(ehsz), uint16(phsz), uint16(nph), 40, 0, 0})
		binary.Write(&b, le, struct {
			Type, Off, Vaddr, Paddr, Filesz, Memsz, Flags, Align uint32
		}{1, uint32(codeOff), uint32(paddr), uint32(paddr), uint32(len(code)), uint32(len(code)) + 0x1000, 5, 0x1000})
		if withNote {
			binary.Write(&b, le, struct {
				Type, Off, Vaddr, Paddr, Filesz, Memsz, Flags, Align uint32
			}{4, uint32(noteOff), 0, 0, uint32(note.Len()), uint32(note.Len()), 4, 4})
		}
	}
	b.Write(code)
	b.Write(note.Bytes())
	return b.Bytes()
}

func TestLoadPVH(t *testing.T) {
	code := []byte{0xf4, 0xeb, 0xfd} // hlt; jmp back
	for _, tc := range []struct {
		name    string
		class64 bool
	}{{"elf32", false}, {"elf64", true}} {
		t.Run(tc.name, func(t *testing.T) {
			img := buildELF(tc.class64, 0x200000, code, 0x200000, true)
			mem := make([]byte, 64<<20)
			initrd := bytes.Repeat([]byte{0xab}, 5000)
			e, err := LoadPVH(mem, img, initrd, "console=ttyS0 workload=counter")
			if err != nil {
				t.Fatal(err)
			}
			if e.Mode != Protected32 || e.RIP != 0x200000 || e.RBX != startInfoAddr {
				t.Fatalf("entry = %+v", e)
			}
			if !bytes.Equal(mem[0x200000:0x200003], code) {
				t.Fatalf("code not loaded")
			}
			if mem[0x200003] != 0 || mem[0x200000+0x1000] != 0 {
				t.Fatalf("bss not zeroed")
			}
			le := binary.LittleEndian
			si := mem[startInfoAddr:]
			if le.Uint32(si) != startInfoMagic || le.Uint32(si[4:]) != 1 {
				t.Fatalf("bad start info header % x", si[:8])
			}
			cl := le.Uint64(si[24:])
			if got := string(mem[cl : cl+uint64(bytes.IndexByte(mem[cl:], 0))]); got != "console=ttyS0 workload=counter" {
				t.Fatalf("cmdline %q", got)
			}
			if le.Uint32(si[12:]) != 1 {
				t.Fatalf("nr_modules = %d", le.Uint32(si[12:]))
			}
			ml := le.Uint64(si[16:])
			ia, isz := le.Uint64(mem[ml:]), le.Uint64(mem[ml+8:])
			if isz != 5000 || ia%4096 != 0 || ia+isz > uint64(len(mem)) || !bytes.Equal(mem[ia:ia+isz], initrd) {
				t.Fatalf("initrd at %#x size %d", ia, isz)
			}
			mm, n := le.Uint64(si[40:]), le.Uint32(si[48:])
			if n != 3 {
				t.Fatalf("memmap entries = %d", n)
			}
			last := mem[mm+2*memmapEntSize:]
			if le.Uint64(last) != 0x100000 || le.Uint64(last[8:]) != uint64(len(mem))-0x100000 || le.Uint32(last[16:]) != E820RAM {
				t.Fatalf("bad high RAM entry % x", last[:24])
			}
		})
	}
}

func TestLoadPVHErrors(t *testing.T) {
	code := []byte{0xf4}
	for _, tc := range []struct {
		name string
		img  []byte
		mem  int
		want error
	}{
		{"empty", nil, 64 << 20, ErrEmpty},
		{"garbage", []byte("MZ this is not a kernel at all"), 64 << 20, ErrBadKernel},
		{"no note", buildELF(true, 0x200000, code, 0x200000, false), 64 << 20, ErrNoPVHNote},
		{"truncated", buildELF(true, 0x200000, code, 0x200000, true)[:70], 64 << 20, ErrBadKernel},
		{"memory too small", buildELF(true, 0x8000000, code, 0x8000000, true), 64 << 20, ErrTooSmall},
		{"entry outside", buildELF(false, 0x200000, code, 0x900000, true), 64 << 20, ErrBadKernel},
		{"below 1MiB", buildELF(false, 0x1000, code, 0x1000, true), 64 << 20, ErrUnsupported},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := LoadPVH(make([]byte, tc.mem), tc.img, nil, "")
			if !errors.Is(err, tc.want) {
				t.Fatalf("err = %v, want %v", err, tc.want)
			}
		})
	}
	// An initrd that cannot fit.
	img := buildELF(true, 0x200000, code, 0x200000, true)
	if _, err := LoadPVH(make([]byte, 4<<20), img, make([]byte, 3<<20), ""); !errors.Is(err, ErrTooSmall) {
		t.Fatalf("big initrd: err = %v", err)
	}
}

func FuzzLoadPVH(f *testing.F) {
	f.Add(buildELF(true, 0x200000, []byte{0xf4}, 0x200000, true))
	f.Add(buildELF(false, 0x200000, []byte{0xf4}, 0x200000, true))
	f.Add([]byte("\x7fELF"))
	mem := make([]byte, 8<<20)
	f.Fuzz(func(t *testing.T, img []byte) {
		clear(mem[:1<<20])
		LoadPVH(mem, img, []byte{1, 2, 3}, "x=y") // must not panic
	})
}
