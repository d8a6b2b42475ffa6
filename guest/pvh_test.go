package guest

import (
	"bytes"
	"encoding/binary"
	"errors"
	"testing"

	"github.com/ftkvm/ftkvm/guest/pvhtest"
)

func TestLoadPVH(t *testing.T) {
	code := []byte{0xf4, 0xeb, 0xfd} // hlt; jmp back
	for _, tc := range []struct {
		name    string
		class64 bool
	}{{"elf32", false}, {"elf64", true}} {
		t.Run(tc.name, func(t *testing.T) {
			img := pvhtest.Build(tc.class64, 0x200000, code, 0x200000, true)
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
		{"no note", pvhtest.Build(true, 0x200000, code, 0x200000, false), 64 << 20, ErrNoPVHNote},
		{"truncated", pvhtest.Build(true, 0x200000, code, 0x200000, true)[:70], 64 << 20, ErrBadKernel},
		{"memory too small", pvhtest.Build(true, 0x8000000, code, 0x8000000, true), 64 << 20, ErrTooSmall},
		{"entry outside", pvhtest.Build(false, 0x200000, code, 0x900000, true), 64 << 20, ErrBadKernel},
		{"below 1MiB", pvhtest.Build(false, 0x1000, code, 0x1000, true), 64 << 20, ErrUnsupported},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := LoadPVH(make([]byte, tc.mem), tc.img, nil, "")
			if !errors.Is(err, tc.want) {
				t.Fatalf("err = %v, want %v", err, tc.want)
			}
		})
	}
	// An initrd that cannot fit.
	img := pvhtest.Build(true, 0x200000, code, 0x200000, true)
	if _, err := LoadPVH(make([]byte, 4<<20), img, make([]byte, 3<<20), ""); !errors.Is(err, ErrTooSmall) {
		t.Fatalf("big initrd: err = %v", err)
	}
}

func FuzzLoadPVH(f *testing.F) {
	f.Add(pvhtest.Build(true, 0x200000, []byte{0xf4}, 0x200000, true))
	f.Add(pvhtest.Build(false, 0x200000, []byte{0xf4}, 0x200000, true))
	f.Add([]byte("\x7fELF"))
	mem := make([]byte, 8<<20)
	f.Fuzz(func(t *testing.T, img []byte) {
		clear(mem[:1<<20])
		LoadPVH(mem, img, []byte{1, 2, 3}, "x=y") // must not panic
	})
}
