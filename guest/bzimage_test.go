package guest

import (
	"encoding/binary"
	"errors"
	"testing"
)

// fakeBzImage builds a bzImage with a 2.15 setup header (as Linux 6.1's),
// 4 setup sectors and a payload.
func fakeBzImage(version uint16, xloadflags uint16, relocatable bool, payload []byte) []byte {
	le := binary.LittleEndian
	img := make([]byte, 5*512+len(payload))
	img[bpSetupSects] = 4
	le.PutUint16(img[bpBootFlag:], 0xaa55)
	img[bpJump], img[bpJump+1] = 0xeb, 0x66 // jmp over the header: header ends at 0x268
	le.PutUint32(img[bpHeader:], hdrMagic)
	le.PutUint16(img[bpVersion:], version)
	img[bpLoadflags] = loadedHigh
	le.PutUint32(img[bpInitrdAddrMax:], 0x7fffffff)
	le.PutUint32(img[bpKernelAlignment:], 0x200000)
	if relocatable {
		img[bpRelocatable] = 1
	}
	le.PutUint16(img[bpXloadflags:], xloadflags)
	le.PutUint32(img[bpCmdlineSize:], 2047)
	le.PutUint64(img[bpPrefAddress:], 0x1000000)
	le.PutUint32(img[bpInitSize:], 0x400000)
	copy(img[5*512:], payload)
	return img
}

func TestLoadBzImage(t *testing.T) {
	le := binary.LittleEndian
	payload := []byte{0xf4, 0x90, 0x90}
	img := fakeBzImage(0x020f, xlfKernel64|xlfCanBeLoadedAbove4G, true, payload)
	mem := make([]byte, 64<<20)
	initrd := []byte("initrd-bytes")
	e, err := Load(mem, img, initrd, "console=ttyS0 quiet")
	if err != nil {
		t.Fatal(err)
	}
	if e.Mode != Long64 || e.RIP != 0x1000000+0x200 || e.RSI != bootParamsAddr || e.CR3 != pml4Addr {
		t.Fatalf("entry %+v", e)
	}
	if string(mem[0x1000000:0x1000003]) != string(payload) {
		t.Fatal("payload not at pref_address")
	}
	bp := mem[bootParamsAddr:]
	if le.Uint32(bp[bpHeader:]) != hdrMagic || bp[bpTypeOfLoader] != 0xff || bp[bpLoadflags]&canUseHeap == 0 {
		t.Fatal("setup header not copied or not filled in")
	}
	cl := le.Uint32(bp[bpCmdLinePtr:])
	if string(mem[cl:cl+19]) != "console=ttyS0 quiet" || mem[cl+19] != 0 {
		t.Fatalf("command line %q", mem[cl:cl+20])
	}
	ri, rs := uint64(le.Uint32(bp[bpRamdiskImage:]))|uint64(le.Uint32(bp[bpExtRamdiskImage:]))<<32, le.Uint32(bp[bpRamdiskSize:])
	if rs != uint32(len(initrd)) || string(mem[ri:ri+uint64(rs)]) != string(initrd) || ri < 0x1400000 {
		t.Fatalf("initrd at %#x size %d", ri, rs)
	}
	if bp[bpE820Entries] != 3 || le.Uint64(bp[bpE820Table+40:]) != 0x100000 {
		t.Fatalf("e820: %d entries", bp[bpE820Entries])
	}
	// The identity map covers the kernel and the top of memory.
	pd := le.Uint64(mem[pdAddr+8*(0x1000000>>21):])
	if pd&^0xfff != 0x1000000 || pd&0x83 != 0x83 {
		t.Fatalf("PD entry for the kernel: %#x", pd)
	}
}

func TestLoadBzImageErrors(t *testing.T) {
	payload := []byte{0xf4}
	for _, tc := range []struct {
		name string
		img  []byte
		mem  int
		want error
	}{
		{"protocol too old", fakeBzImage(0x0206, xlfKernel64, true, payload), 64 << 20, ErrUnsupported},
		{"no 64-bit entry", fakeBzImage(0x020f, 0, true, payload), 64 << 20, ErrUnsupported},
		{"not relocatable and too big", fakeBzImage(0x020f, xlfKernel64, false, payload), 16 << 20, ErrTooSmall},
		{"truncated", fakeBzImage(0x020f, xlfKernel64, true, payload)[:5*512], 64 << 20, ErrBadKernel},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := Load(make([]byte, tc.mem), tc.img, nil, ""); !errors.Is(err, tc.want) {
				t.Fatalf("err = %v, want %v", err, tc.want)
			}
		})
	}
	// Relocatable: a small memory moves the kernel down to 2 MiB.
	img := fakeBzImage(0x020f, xlfKernel64, true, payload)
	e, err := Load(make([]byte, 16<<20), img, nil, "")
	if err != nil || e.RIP != 0x200000+0x200 {
		t.Fatalf("relocated load: %+v, %v", e, err)
	}
}

func TestLinuxCmdline(t *testing.T) {
	for _, tc := range []struct{ user, want string }{
		{"", "console=ttyS0 lpj=250000 randomize_kstack_offset=off"},
		{"quiet", "console=ttyS0 lpj=250000 randomize_kstack_offset=off quiet"},
		{"console=tty0 init=/bin/sh", "lpj=250000 randomize_kstack_offset=off console=tty0 init=/bin/sh"},
		{"lpj=0", "console=ttyS0 randomize_kstack_offset=off lpj=0"},
		{"randomize_kstack_offset=on", "console=ttyS0 lpj=250000 randomize_kstack_offset=on"},
	} {
		if got := LinuxCmdline(tc.user); got != tc.want {
			t.Errorf("LinuxCmdline(%q) = %q, want %q", tc.user, got, tc.want)
		}
	}
}

func FuzzLoad(f *testing.F) {
	f.Add(fakeBzImage(0x020f, xlfKernel64, true, []byte{0xf4}))
	f.Add(fakeBzImage(0x020c, xlfKernel64, false, []byte{0xf4}))
	mem := make([]byte, 24<<20)
	f.Fuzz(func(t *testing.T, img []byte) {
		Load(mem, img, []byte{1}, "x") // must not panic
	})
}
