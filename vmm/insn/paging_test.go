package insn

import (
	"encoding/binary"
	"testing"
)

// pt is a guest memory under construction, with helpers to write entries.
type pt []byte

func (m pt) e64(at, v uint64)        { binary.LittleEndian.PutUint64(m[at:], v) }
func (m pt) e32(at uint64, v uint32) { binary.LittleEndian.PutUint32(m[at:], v) }

const (
	pg   = cr0PE | cr0PG
	lma  = eferLMA | 1<<8
	pres = 0x3 // present, writable
)

func TestTranslate(t *testing.T) {
	mem := pt(make([]byte, 16<<20))
	// 4-level: PML4 at 0x1000; linear 0x40_0000_1000 (PML4 0, PDPT 1, PD 0, PT 1) ...
	mem.e64(0x1000+0*8, 0x2000|pres)                // PML4[0] -> PDPT 0x2000
	mem.e64(0x2000+1*8, 0x3000|pres)                // PDPT[1] -> PD 0x3000 (linear 1 GiB..2 GiB)
	mem.e64(0x3000+0*8, 0x4000|pres)                // PD[0] -> PT 0x4000
	mem.e64(0x4000+1*8, 0x9000|pres)                // PT[1] -> page 0x9000
	mem.e64(0x3000+1*8, 0x600000|pres|ptePS)        // PD[1]: 2 MiB page at 6 MiB
	mem.e64(0x2000+2*8, 0x40000000|pres|ptePS)      // PDPT[2]: 1 GiB page at 1 GiB (outside mem)
	mem.e64(0x4000+2*8, 0x8000_0000_0000_a000|pres) // NX set: ignored for the address
	mem.e64(0x1000+1*8, 0x00ff_f000)                // PML4[1]: not present
	mem.e64(0x1000+2*8, 0x7fff_ffff_f000|pres)      // PML4[2]: table outside memory
	// 5-level: PML5 at 0x5000, PML5[0] -> the PML4 above.
	mem.e64(0x5000, 0x1000|pres)
	// PAE (32-bit): PDPT at 0x6000 (4 entries), PD at 0x7000, PT at 0x8000.
	mem.e64(0x6000+1*8, 0x7000|1) // PDPT[1]: linear 1 GiB..2 GiB
	mem.e64(0x7000+0*8, 0x8000|pres)
	mem.e64(0x8000+3*8, 0xb000|pres)
	mem.e64(0x7000+2*8, 0xc00000|pres|ptePS) // 2 MiB page at 12 MiB
	// 32-bit paging: PD at 0xd000, PT at 0xe000.
	mem.e32(0xd000+1*4, 0xe000|pres)                 // linear 4 MiB..8 MiB
	mem.e32(0xe000+5*4, 0xf000|pres)                 // -> page 0xf000
	mem.e32(0xd000+2*4, 0x00c00000|pres|ptePS)       // 4 MiB page at 12 MiB (with PSE)
	mem.e32(0xd000+3*4, 0x00c00000|pres|ptePS|1<<13) // physical bits 39:32 = 1

	long4 := Paging{CR0: pg, CR3: 0x1000, CR4: cr4PAE, EFER: lma}
	long5 := Paging{CR0: pg, CR3: 0x5000, CR4: cr4PAE | cr4LA57, EFER: lma}
	pae := Paging{CR0: pg, CR3: 0x6000, CR4: cr4PAE}
	p32 := Paging{CR0: pg, CR3: 0xd000, CR4: cr4PSE}
	p32NoPSE := Paging{CR0: pg, CR3: 0xd000}
	for _, tc := range []struct {
		name   string
		p      Paging
		linear uint64
		phys   uint64
		ok     bool
	}{
		{"real mode", Paging{}, 0xf_fff0, 0xf_fff0, true},
		{"protected, no paging", Paging{CR0: cr0PE}, 0x1_2345_6789, 0x2345_6789, true},
		{"4-level 4 KiB", long4, 1<<30 | 0x1234, 0x9234, true},
		{"4-level 2 MiB", long4, 1<<30 | 2<<20 | 0x12345, 0x612345, true},
		{"4-level 1 GiB", long4, 2<<30 | 0x123456, 0x40123456, true},
		{"4-level NX bit ignored", long4, 1<<30 | 2<<12 | 7, 0xa007, true},
		{"4-level not present", long4, 1 << 39, 0, false},
		{"4-level table outside memory", long4, 2 << 39, 0, false},
		{"4-level PT not present", long4, 1<<30 | 9<<12, 0, false},
		{"5-level", long5, 1<<30 | 0x1234, 0x9234, true},
		{"5-level PML5[1] not present", long5, 1 << 48, 0, false},
		{"PAE 4 KiB", pae, 1<<30 | 3<<12 | 0x10, 0xb010, true},
		{"PAE 2 MiB", pae, 1<<30 | 2<<21 | 0x1_0000, 0xc10000, true},
		{"PAE PDPT entry not present", pae, 0x1000, 0, false},
		{"32-bit 4 KiB", p32, 4<<20 | 5<<12 | 0x77, 0xf077, true},
		{"32-bit 4 MiB (PSE)", p32, 8<<20 | 0x12345, 0xc12345, true},
		{"32-bit 4 MiB above 4 GiB (PSE-36)", p32, 12<<20 | 0x10, 1<<32 | 0xc00010, true},
		{"32-bit PS without CR4.PSE is a table pointer", p32NoPSE, 8<<20 | 0x1000 | 0x10, 0, false},
		{"32-bit not present", p32, 0, 0, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			phys, ok := tc.p.Translate(mem, tc.linear)
			if ok != tc.ok || (ok && phys != tc.phys) {
				t.Fatalf("Translate(%#x) = %#x, %v; want %#x, %v", tc.linear, phys, ok, tc.phys, tc.ok)
			}
		})
	}
}

func TestFetchAcrossPages(t *testing.T) {
	mem := pt(make([]byte, 4<<20))
	// Linear 0x1000 -> 0x9000, linear 0x2000 -> 0x5000: an instruction
	// that starts 3 bytes before the end of the first page.
	mem.e64(0x100000, 0x101000|pres)
	mem.e64(0x101000, 0x102000|pres)
	mem.e64(0x102000, 0x103000|pres)
	mem.e64(0x103000+1*8, 0x9000|pres)
	mem.e64(0x103000+2*8, 0x5000|pres)
	copy(mem[0x9ffd:], []byte{0x48, 0x0f, 0xc7})
	copy(mem[0x5000:], []byte{0xf0, 0x90})
	p := Paging{CR0: pg, CR3: 0x100000, CR4: cr4PAE, EFER: lma}
	var buf [MaxLen]byte
	if n := p.Fetch(mem, 0x1ffd, buf[:]); n != MaxLen {
		t.Fatalf("fetched %d bytes, want %d", n, MaxLen)
	}
	if in := Decode(buf[:], Mode64); in.Kind != RDRAND || in.Len != 4 {
		t.Fatalf("across the page boundary: %+v", in)
	}
	// The next page unmapped: only the bytes of the first one.
	if n := p.Fetch(mem, 0x2ffd, buf[:]); n != 3 {
		t.Fatalf("fetched %d bytes up to an unmapped page, want 3", n)
	}
	if v, ok := p.Read(mem, 0x1ffe, 4); !ok || v != 0x90f0c70f {
		t.Fatalf("Read = %#x %v", v, ok)
	}
	if n := testing.AllocsPerRun(100, func() { p.Fetch(mem, 0x1ffd, buf[:]) }); n != 0 {
		t.Fatalf("Fetch allocates %v times", n)
	}
}

// FuzzTranslate walks arbitrary page tables: no panic, and an address it
// returns for a mapped page keeps the page offset.
func FuzzTranslate(f *testing.F) {
	f.Add([]byte{0x03, 0x10}, uint64(0x1234), uint8(0))
	f.Fuzz(func(t *testing.T, tables []byte, linear uint64, m uint8) {
		mem := make([]byte, 64<<10)
		copy(mem, tables)
		p := []Paging{
			{CR0: pg, CR4: cr4PAE, EFER: lma},
			{CR0: pg, CR4: cr4PAE | cr4LA57, EFER: lma},
			{CR0: pg, CR4: cr4PAE},
			{CR0: pg, CR4: cr4PSE},
		}[int(m)%4]
		if phys, ok := p.Translate(mem, linear); ok && phys&0xfff != linear&0xfff {
			t.Fatalf("Translate(%#x) = %#x: page offset lost", linear, phys)
		}
		var buf [MaxLen]byte
		if n := p.Fetch(mem, linear, buf[:]); n < 0 || n > MaxLen {
			t.Fatalf("Fetch = %d", n)
		}
	})
}
