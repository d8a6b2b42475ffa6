package kvm

import (
	"errors"
	"os"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Helpers that build tiny guests on the real /dev/kvm. On this host ring-0
// guest code (including real mode) is emulated by KVM at ~2M instr/s, so the
// ring-0 guests are a handful of instructions; the ring-3 long-mode guest
// runs natively.

// openSystem opens /dev/kvm or skips the test if it cannot be opened; any
// other failure (e.g. a wrong API version) fails the test.
func openSystem(t testing.TB) *System {
	t.Helper()
	s, err := Open("/dev/kvm")
	var pe *os.PathError
	if errors.As(err, &pe) {
		t.Skipf("skipping: cannot open /dev/kvm: %v", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

type guest struct {
	t   testing.TB
	sys *System
	vm  *VM
	cpu *VCPU
	mem []byte
}

// newGuest creates a VM with memSize bytes of guest memory at physical
// address 0 (slot 0, with the given region flags), one vCPU with the host's
// supported CPUID, and registers cleanup.
func newGuest(t testing.TB, memSize int, flags uint32) *guest {
	t.Helper()
	sys := openSystem(t)
	vm, err := sys.CreateVM()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { vm.Close() })
	if n, _ := sys.CheckExtension(CapSetTSSAddr); n > 0 {
		if err := vm.SetTSSAddr(0xfffbd000); err != nil {
			t.Fatal(err)
		}
	}
	mem, err := unix.Mmap(-1, 0, memSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		t.Fatal(err)
	}
	// Runs after vm.Close (cleanups are LIFO), so the kernel no longer
	// references the pages.
	t.Cleanup(func() { unix.Munmap(mem) })
	err = vm.SetUserMemoryRegion(MemoryRegion{
		Slot:          0,
		Flags:         flags,
		GuestPhysAddr: 0,
		MemorySize:    uint64(memSize),
		UserspaceAddr: uint64(uintptr(unsafe.Pointer(&mem[0]))),
	})
	if err != nil {
		t.Fatal(err)
	}
	cpu, err := vm.CreateVCPU(0)
	if err != nil {
		t.Fatal(err)
	}
	cpuid, err := sys.SupportedCPUID()
	if err != nil {
		t.Fatal(err)
	}
	if err := cpu.SetCPUID2(cpuid); err != nil {
		t.Fatal(err)
	}
	return &guest{t: t, sys: sys, vm: vm, cpu: cpu, mem: mem}
}

// realMode loads code at guest address at and points the vCPU at it in real
// mode with all segment bases 0, IF=0 and the stack at 0:0x8000.
func (g *guest) realMode(at uint64, code []byte) {
	g.t.Helper()
	copy(g.mem[at:], code)
	var s Sregs
	if err := g.cpu.GetSregs(&s); err != nil {
		g.t.Fatal(err)
	}
	for _, seg := range []*Segment{&s.CS, &s.DS, &s.ES, &s.FS, &s.GS, &s.SS} {
		seg.Base, seg.Selector = 0, 0
	}
	if err := g.cpu.SetSregs(&s); err != nil {
		g.t.Fatal(err)
	}
	r := Regs{RIP: at, RFLAGS: 2, RSP: 0x8000}
	if err := g.cpu.SetRegs(&r); err != nil {
		g.t.Fatal(err)
	}
}

// Layout of the ring-3 long-mode guest.
const (
	lmGDT   = 0x1000
	lmPML4  = 0x2000
	lmPDPT  = 0x3000
	lmPD    = 0x4000
	lmTSS   = 0x5000
	lmCode  = 0x10000
	lmStack = 0x20000
)

// longMode3 loads code at lmCode and starts the vCPU in 64-bit mode at CPL 3
// with IOPL 3 (so IN/OUT do not fault), identity-mapping the first 2 MiB with
// one user-accessible large page. No IDT: any exception shuts the guest down.
func (g *guest) longMode3(code []byte) {
	g.t.Helper()
	if len(g.mem) < 2<<20 {
		g.t.Fatal("longMode3 needs 2 MiB of guest memory")
	}
	le := func(off int, v uint64) {
		for i := 0; i < 8; i++ {
			g.mem[off+i] = byte(v >> (8 * i))
		}
	}
	le(lmGDT+0x08, 0x00af9b000000ffff) // kernel code64
	le(lmGDT+0x10, 0x00cf93000000ffff) // kernel data
	le(lmGDT+0x18, 0x00affb000000ffff) // user code64, DPL 3
	le(lmGDT+0x20, 0x00cff3000000ffff) // user data, DPL 3
	// 64-bit TSS descriptor (busy), base lmTSS, limit 0x67.
	le(lmGDT+0x28, 0x0000_8b00_0000_0067|uint64(lmTSS)<<16)
	le(lmPML4, lmPDPT|0x7) // present, writable, user
	le(lmPDPT, lmPD|0x7)
	le(lmPD, 0x87) // 2 MiB page at 0: present, writable, user, PS
	copy(g.mem[lmCode:], code)

	var s Sregs
	if err := g.cpu.GetSregs(&s); err != nil {
		g.t.Fatal(err)
	}
	code3 := Segment{Base: 0, Limit: 0xffffffff, Selector: 0x18 | 3, Type: 11, Present: 1, DPL: 3, S: 1, L: 1, G: 1}
	data3 := Segment{Base: 0, Limit: 0xffffffff, Selector: 0x20 | 3, Type: 3, Present: 1, DPL: 3, S: 1, DB: 1, G: 1}
	s.CS = code3
	s.DS, s.ES, s.FS, s.GS, s.SS = data3, data3, data3, data3, data3
	s.TR = Segment{Base: lmTSS, Limit: 0x67, Selector: 0x28, Type: 11, Present: 1}
	s.GDT = DTable{Base: lmGDT, Limit: 0x37}
	s.CR0 = 0x80010033 // PG WP NE ET MP PE
	s.CR3 = lmPML4
	s.CR4 = 0x620  // OSXMMEXCPT OSFXSR PAE
	s.EFER = 0x500 // LMA LME
	if err := g.cpu.SetSregs(&s); err != nil {
		g.t.Fatal(err)
	}
	r := Regs{RIP: lmCode, RSP: lmStack, RFLAGS: 0x3002} // IOPL 3
	if err := g.cpu.SetRegs(&r); err != nil {
		g.t.Fatal(err)
	}
}

// run runs the vCPU once and fails the test, with diagnostics, unless it
// stops for the wanted reason.
func (g *guest) run(want ExitReason) *Run {
	g.t.Helper()
	reason, err := g.cpu.Run()
	// A Go runtime preemption signal can interrupt KVM_RUN at any time
	// (ExitIntr); like a VMM, re-enter the guest.
	for reason == ExitIntr && err == nil && want != ExitIntr {
		reason, err = g.cpu.Run()
	}
	if err != nil {
		g.t.Fatal(err)
	}
	rd := g.cpu.RunData()
	if reason != want {
		var r Regs
		g.cpu.GetRegs(&r)
		switch reason {
		case ExitInternalError:
			ie := rd.InternalError()
			g.t.Fatalf("exit %v, want %v: suberror %d data %x; rip %#x", reason, want, ie.Suberror, ie.Data[:ie.NData], r.RIP)
		case ExitIO:
			io := rd.IO()
			g.t.Fatalf("exit %v, want %v: port %#x dir %d size %d data %x; rip %#x", reason, want, io.Port, io.Direction, io.Size, g.cpu.IOData(), r.RIP)
		case ExitMMIO:
			m := rd.MMIO()
			g.t.Fatalf("exit %v, want %v: gpa %#x write %d; rip %#x", reason, want, m.PhysAddr, m.IsWrite, r.RIP)
		}
		g.t.Fatalf("exit %v, want %v; rip %#x", reason, want, r.RIP)
	}
	return rd
}

// expectOut runs to an OUT of size bytes to port and returns its data.
func (g *guest) expectOut(port uint16, size uint8) []byte {
	g.t.Helper()
	rd := g.run(ExitIO)
	io := rd.IO()
	if io.Direction != IOOut || io.Port != port || io.Size != size || io.Count != 1 {
		g.t.Fatalf("IO exit dir %d port %#x size %d count %d, want OUT port %#x size %d count 1",
			io.Direction, io.Port, io.Size, io.Count, port, size)
	}
	return g.cpu.IOData()
}

func (g *guest) regs() Regs {
	g.t.Helper()
	var r Regs
	if err := g.cpu.GetRegs(&r); err != nil {
		g.t.Fatal(err)
	}
	return r
}
