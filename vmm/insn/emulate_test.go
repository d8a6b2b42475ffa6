package insn

import (
	"testing"

	"github.com/ftkvm/ftkvm/kvm"
)

func TestEmulate(t *testing.T) {
	const tsc = 0x1122_3344_5566_7788
	const aux = 0xabcd
	start := kvm.Regs{RAX: ^uint64(0), RCX: ^uint64(0), RDX: ^uint64(0), R9: ^uint64(0), RIP: 0x1000}
	all := Features{RDTSCP: true, RDRAND: true, RDSEED: true, RDPID: true}
	for _, tc := range []struct {
		name   string
		code   []byte
		mode   Mode
		cpl    uint8
		cr4    uint64
		f      Features
		rip    uint64
		out    Outcome
		source bool
		check  func(r kvm.Regs) bool
	}{
		{"rdtsc", []byte{0x0f, 0x31}, Mode64, 0, 0, Features{}, 0x1002, Retired, false,
			func(r kvm.Regs) bool { return r.RAX == 0x5566_7788 && r.RDX == 0x1122_3344 && r.RCX == ^uint64(0) }},
		{"rdtsc at ring 3", []byte{0x0f, 0x31}, Mode64, 3, 0, Features{}, 0x1002, Retired, false, nil},
		{"rdtsc at ring 3 with CR4.TSD", []byte{0x0f, 0x31}, Mode64, 3, cr4TSD, Features{}, 0x1000, FaultGP, false, nil},
		{"rdtsc at ring 0 with CR4.TSD", []byte{0x0f, 0x31}, Mode64, 0, cr4TSD, Features{}, 0x1002, Retired, false, nil},
		{"rdtscp hidden", []byte{0x0f, 0x01, 0xf9}, Mode64, 0, 0, Features{}, 0x1000, FaultUD, false, nil},
		{"rdtscp", []byte{0x0f, 0x01, 0xf9}, Mode64, 0, 0, all, 0x1003, Retired, false,
			func(r kvm.Regs) bool { return r.RAX == 0x5566_7788 && r.RDX == 0x1122_3344 && r.RCX == aux }},
		{"rdpid hidden", []byte{0xf3, 0x0f, 0xc7, 0xf9}, Mode64, 0, 0, Features{}, 0x1000, FaultUD, false, nil},
		{"rdpid rcx", []byte{0xf3, 0x0f, 0xc7, 0xf9}, Mode64, 0, 0, all, 0x1004, Retired, false,
			func(r kvm.Regs) bool { return r.RCX == aux }},
		{"rdpid r9", []byte{0xf3, 0x41, 0x0f, 0xc7, 0xf9}, Mode64, 0, 0, all, 0x1005, Retired, false,
			func(r kvm.Regs) bool { return r.R9 == aux && r.RCX == ^uint64(0) }},
		{"rdrand hidden", []byte{0x0f, 0xc7, 0xf0}, Mode64, 0, 0, Features{}, 0x1000, FaultUD, false, nil},
		{"rdseed hidden", []byte{0x0f, 0xc7, 0xf8}, Mode64, 0, 0, Features{}, 0x1000, FaultUD, false, nil},
		{"rdrand exposed: no source", []byte{0x0f, 0xc7, 0xf0}, Mode64, 0, 0, all, 0x1000, FaultUD, true, nil},
		{"lock rdtsc", []byte{0xf0, 0x0f, 0x31}, Mode64, 0, 0, all, 0x1000, FaultUD, false, nil},
		{"rdtsc wraps IP in 16-bit mode", []byte{0x0f, 0x31}, Mode16, 0, 0, Features{}, 0x0001, Retired, false, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := start
			if tc.name == "rdtsc wraps IP in 16-bit mode" {
				r.RIP = 0xffff
			}
			in := Decode(tc.code, tc.mode)
			if !in.Kind.Environment() && in.Kind != Undefined {
				t.Fatalf("%x decodes as %+v", tc.code, in)
			}
			out, source := Emulate(in, tc.mode, &r, tc.cpl, tc.cr4, tc.f, tsc, aux)
			if out != tc.out || source != tc.source || r.RIP != tc.rip {
				t.Fatalf("Emulate = %v, %v, rip %#x; want %v, %v, rip %#x", out, source, r.RIP, tc.out, tc.source, tc.rip)
			}
			if out != Retired && r != start {
				t.Fatalf("a fault changed registers: %+v", r)
			}
			if tc.check != nil && !tc.check(r) {
				t.Fatalf("registers after %s: %+v", tc.name, r)
			}
		})
	}
}

func TestFeaturesFromCPUID(t *testing.T) {
	f := FeaturesFromCPUID([]kvm.CPUIDEntry{
		{Function: 1, Ecx: 1 << 30},
		{Function: 7, Index: 0, Ebx: 1 << 18, Ecx: 1 << 22},
		{Function: 7, Index: 1, Ebx: 0, Ecx: 0},
		{Function: 0x80000001, Edx: 1 << 27},
	})
	if f != (Features{RDTSCP: true, RDRAND: true, RDSEED: true, RDPID: true}) {
		t.Fatalf("%+v", f)
	}
	if f := FeaturesFromCPUID(nil); f != (Features{}) {
		t.Fatalf("%+v", f)
	}
}

func TestModeAndCPL(t *testing.T) {
	for _, tc := range []struct {
		name   string
		s      kvm.Sregs
		rflags uint64
		mode   Mode
		cpl    uint8
	}{
		{"real mode", kvm.Sregs{SS: kvm.Segment{DPL: 3}}, 0, Mode16, 0},
		{"protected 32", kvm.Sregs{CR0: cr0PE, CS: kvm.Segment{DB: 1}, SS: kvm.Segment{DPL: 0}}, 0, Mode32, 0},
		{"protected 16", kvm.Sregs{CR0: cr0PE}, 0, Mode16, 0},
		{"virtual-8086", kvm.Sregs{CR0: cr0PE, CS: kvm.Segment{DB: 1}}, rflagsVM, Mode16, 3},
		{"long mode ring 3", kvm.Sregs{CR0: cr0PE | cr0PG, EFER: lma, CS: kvm.Segment{L: 1}, SS: kvm.Segment{DPL: 3}}, 0, Mode64, 3},
		{"compatibility mode", kvm.Sregs{CR0: cr0PE | cr0PG, EFER: lma, CS: kvm.Segment{DB: 1}}, 0, Mode32, 0},
	} {
		if m, c := CodeMode(&tc.s, tc.rflags), CPL(&tc.s, tc.rflags); m != tc.mode || c != tc.cpl {
			t.Errorf("%s: mode %d cpl %d, want %d %d", tc.name, m, c, tc.mode, tc.cpl)
		}
	}
}

func TestTargetCPL(t *testing.T) {
	mem := pt(make([]byte, 1<<20))
	long := kvm.Sregs{CR0: cr0PE, EFER: lma, CS: kvm.Segment{L: 1}}
	prot := kvm.Sregs{CR0: cr0PE, CS: kvm.Segment{DB: 1}, SS: kvm.Segment{DB: 1, Base: 0x10000}}
	// 64-bit iretq frame at 0x8000: rip, cs=0x2b, rflags, rsp, ss.
	mem.e64(0x8000, 0x1234)
	mem.e64(0x8008, 0x2b)
	// 64-bit retf (32-bit slots) at 0x9000: eip, cs=0x08.
	mem.e32(0x9000, 0x1234)
	mem.e32(0x9004, 0x08)
	// 32-bit iretd frame at SS.base+0x100: eip, cs=0x08, eflags with VM.
	mem.e32(0x10100, 0x1234)
	mem.e32(0x10104, 0x08)
	mem.e32(0x10108, rflagsVM|2)
	for _, tc := range []struct {
		name string
		code []byte
		mode Mode
		s    kvm.Sregs
		rsp  uint64
		cpl  uint8
		ok   bool
	}{
		{"iretq to ring 3", []byte{0x48, 0xcf}, Mode64, long, 0x8000, 3, true},
		{"retf to ring 0", []byte{0xcb}, Mode64, long, 0x9000, 0, true},
		{"iretd to virtual-8086", []byte{0xcf}, Mode32, prot, 0x100, 3, true},
		{"sysret", []byte{0x48, 0x0f, 0x07}, Mode64, long, 0, 3, true},
		{"sysexit", []byte{0x0f, 0x35}, Mode32, prot, 0, 3, true},
		{"stack unreadable", []byte{0x48, 0xcf}, Mode64, long, 1 << 30, 0, false},
		{"real mode", []byte{0xcf}, Mode16, kvm.Sregs{}, 0x8000, 0, false},
		{"not a return", []byte{0x90}, Mode64, long, 0x8000, 0, false},
	} {
		regs := kvm.Regs{RSP: tc.rsp}
		cpl, ok := TargetCPL(Decode(tc.code, tc.mode), tc.mode, &tc.s, &regs, mem)
		if cpl != tc.cpl || ok != tc.ok {
			t.Errorf("%s: target CPL %d %v, want %d %v", tc.name, cpl, ok, tc.cpl, tc.ok)
		}
	}
}

func TestNext(t *testing.T) {
	mem := pt(make([]byte, 1<<20))
	// GDT at 0x1000: 0x08 64-bit code, 0x10 32-bit code with base 0x10000.
	mem.e64(0x1008, 0x00af9a000000ffff)
	mem.e64(0x1010, 0x00cf9a010000ffff)
	long := kvm.Sregs{CR0: cr0PE, EFER: lma, CS: kvm.Segment{L: 1}, GDT: kvm.DTable{Base: 0x1000, Limit: 0x17}}
	prot := kvm.Sregs{CR0: cr0PE, CS: kvm.Segment{DB: 1}, SS: kvm.Segment{DB: 1}, GDT: kvm.DTable{Base: 0x1000, Limit: 0x17}}
	real := kvm.Sregs{CS: kvm.Segment{Base: 0x20000}}
	mem.e64(0x8000, 0x4242) // iretq frame: rip, cs 0x08
	mem.e64(0x8008, 0x08)
	mem.e64(0x8100, 0x4242) // iretq frame to compatibility mode: cs 0x10
	mem.e64(0x8108, 0x10)
	mem.e64(0x8200, 0x4242) // iretq frame with an LDT selector
	mem.e64(0x8208, 0x0c)
	mem.e32(0x9000, 0x100) // iretd frame: eip, cs 0x10, eflags
	mem.e32(0x9004, 0x10)
	mem.e32(0x9008, 2)
	mem.e32(0x9100, 0x100) // iretd frame into virtual-8086 mode: cs 0x2000
	mem.e32(0x9104, 0x2000)
	mem.e32(0x9108, rflagsVM|2)
	binary16 := []byte{0x34, 0x12, 0x00, 0x30} // real-mode frame: ip 0x1234, cs 0x3000
	copy(mem[0x7000:], binary16)
	msrs := map[uint32]uint64{MSRLSTAR: 0xffff_8000_0000_1000, MSRSysenterIP: 0x1_0000_5000}
	msr := func(i uint32) (uint64, bool) { v, ok := msrs[i]; return v, ok }
	for _, tc := range []struct {
		name string
		code []byte
		mode Mode
		s    kvm.Sregs
		regs kvm.Regs
		want uint64
		ok   bool
	}{
		{"swapgs", []byte{0x0f, 0x01, 0xf8}, Mode64, long, kvm.Regs{RIP: 0x5000}, 0x5003, true},
		{"mfence in 32-bit code with a CS base", []byte{0x0f, 0xae, 0xf0}, Mode32, kvm.Sregs{CR0: cr0PE, CS: kvm.Segment{Base: 0x10000, DB: 1}}, kvm.Regs{RIP: 0x10}, 0x10013, true},
		{"syscall", []byte{0x0f, 0x05}, Mode64, long, kvm.Regs{}, 0xffff_8000_0000_1000, true},
		{"sysenter, legacy mode", []byte{0x0f, 0x34}, Mode32, prot, kvm.Regs{}, 0x5000, true},
		{"sysretq", []byte{0x48, 0x0f, 0x07}, Mode64, long, kvm.Regs{RCX: 0x1_0000_0000}, 0x1_0000_0000, true},
		{"sysret to 32-bit", []byte{0x0f, 0x07}, Mode64, long, kvm.Regs{RCX: 0x1_0000_0010}, 0x10, true},
		{"sysexit", []byte{0x0f, 0x35}, Mode32, prot, kvm.Regs{RDX: 0x1_0000_0020}, 0x20, true},
		{"iretq to 64-bit code", []byte{0x48, 0xcf}, Mode64, long, kvm.Regs{RSP: 0x8000}, 0x4242, true},
		{"iretq to compatibility mode", []byte{0x48, 0xcf}, Mode64, long, kvm.Regs{RSP: 0x8100}, 0x14242, true},
		{"iretq with an LDT selector", []byte{0x48, 0xcf}, Mode64, long, kvm.Regs{RSP: 0x8200}, 0, false},
		{"iretq, stack beyond memory", []byte{0x48, 0xcf}, Mode64, long, kvm.Regs{RSP: 1<<20 - 8}, 0, false},
		{"iretd", []byte{0xcf}, Mode32, prot, kvm.Regs{RSP: 0x9000}, 0x10100, true},
		{"iretd to virtual-8086", []byte{0xcf}, Mode32, prot, kvm.Regs{RSP: 0x9100}, 0x20100, true},
		{"real-mode iret", []byte{0xcf}, Mode16, real, kvm.Regs{RSP: 0x7000}, 0x31234, true},
	} {
		in := Decode(tc.code, tc.mode)
		if !in.Kind.MergesNext() {
			t.Fatalf("%s: %+v does not merge", tc.name, in)
		}
		got, ok := Next(in, tc.mode, &tc.s, &tc.regs, mem, msr)
		if ok != tc.ok || (ok && got != tc.want) {
			t.Errorf("%s: Next = %#x, %v; want %#x, %v", tc.name, got, ok, tc.want, tc.ok)
		}
	}
}
