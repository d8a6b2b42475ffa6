// Package pvhtest builds minimal PVH ELF kernels for tests and benchmarks
// of the loaders and the machine.
package pvhtest

import (
	"bytes"
	"encoding/binary"
)

// Build makes a minimal ELF kernel: one PT_LOAD of code at paddr and,
// if withNote, one PT_NOTE holding the Xen PVH entry note.
func Build(class64 bool, paddr uint64, code []byte, entry uint32, withNote bool) []byte {
	le := binary.LittleEndian
	var note bytes.Buffer
	if withNote {
		// An unrelated note first, to check the walker skips it.
		binary.Write(&note, le, []uint32{4, 4, 1})
		note.WriteString("GNU\x00")
		binary.Write(&note, le, uint32(0))
		binary.Write(&note, le, []uint32{4, 4, 18})
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
