package vmm

import (
	"io"
	"testing"
	"time"

	"github.com/ftkvm/ftkvm/guest"
	"github.com/ftkvm/ftkvm/guest/pvhtest"
	"github.com/ftkvm/ftkvm/kvm"
)

// exitLoop is 32-bit code that does n port writes to 0x80 (each a KVM_EXIT_IO)
// and then writes 0 to the debug-exit port.
func exitLoop(n uint32) []byte {
	return []byte{
		0xb9, byte(n), byte(n >> 8), byte(n >> 16), byte(n >> 24), // mov ecx, n
		0xe6, 0x80, // 1: out 0x80, al
		0x49,       // dec ecx
		0x75, 0xfb, // jnz 1b
		0x66, 0xba, 0x01, 0x05, // mov dx, 0x501
		0x30, 0xc0, // xor al, al
		0xee, // out dx, al
		0xf4, // hlt
	}
}

// rawExits runs the loop on a bare kvm/ VM whose loop does nothing but
// KVM_RUN: the floor under ftkvm's exit path.
func rawExits(b *testing.B, kernel []byte) (uint64, time.Duration) {
	sys, err := kvm.Open("/dev/kvm")
	if err != nil {
		b.Fatal(err)
	}
	defer sys.Close()
	mem, err := NewMemory(16 << 20)
	if err != nil {
		b.Fatal(err)
	}
	defer mem.Close()
	entry, err := guest.LoadPVH(mem.Bytes(), kernel, nil, "")
	if err != nil {
		b.Fatal(err)
	}
	vm, err := sys.CreateVM()
	if err != nil {
		b.Fatal(err)
	}
	defer vm.Close()
	if err := vm.SetTSSAddr(0xfffbd000); err != nil {
		b.Fatal(err)
	}
	if err := vm.SetUserMemoryRegion(kvm.MemoryRegion{MemorySize: mem.Size(), UserspaceAddr: mem.Addr()}); err != nil {
		b.Fatal(err)
	}
	vcpu, err := vm.CreateVCPU(0)
	if err != nil {
		b.Fatal(err)
	}
	if err := setupCPU(vcpu, entry); err != nil {
		b.Fatal(err)
	}
	run := vcpu.RunData()
	var exits uint64
	start := time.Now()
	for {
		reason, err := vcpu.Run()
		if err != nil {
			b.Fatal(err)
		}
		if reason == kvm.ExitIntr {
			continue // Go's preemption signal landed in KVM_RUN: not an exit
		}
		exits++
		if reason != kvm.ExitIO {
			b.Fatalf("exit %v", reason)
		}
		if run.IO().Port == 0x501 {
			return exits, time.Since(start)
		}
	}
}

func ftkvmExits(b *testing.B, kernel []byte) (uint64, time.Duration) {
	m, err := New(Config{Kernel: kernel, MemSize: 16 << 20, Console: io.Discard})
	if err != nil {
		b.Fatal(err)
	}
	defer m.Close()
	start := time.Now()
	if _, err := m.Run(); err != nil {
		b.Fatal(err)
	}
	return m.Stats.Exits + 1, time.Since(start) // +1: the debug-exit write stops before counting
}

// BenchmarkExitPath compares ftkvm's full exit path (bus dispatch, the
// environment's At, interrupt injection checks) with a bare KVM_RUN loop on
// the same kvm/ package, same guest, in one run. On this host the guest's
// ring 0 is emulated, so both include KVM's emulator.
func BenchmarkExitPath(b *testing.B) {
	const n = 50_000
	kernel := pvhtest.Build(false, 0x200000, exitLoop(n), 0x200000, true)
	var rawN, ftN uint64
	var rawT, ftT time.Duration
	for range b.N {
		e, d := rawExits(b, kernel)
		rawN, rawT = rawN+e, rawT+d
		e, d = ftkvmExits(b, kernel)
		ftN, ftT = ftN+e, ftT+d
	}
	raw := float64(rawN) / rawT.Seconds()
	ft := float64(ftN) / ftT.Seconds()
	b.ReportMetric(raw, "raw-exits/s")
	b.ReportMetric(ft, "ftkvm-exits/s")
	b.ReportMetric(ft/raw, "ftkvm/raw")
}

// TestExitPathAllocs checks that the exit loop does not allocate: a guest
// doing 20000 port exits costs (almost) no more allocations than one doing 10.
func TestExitPathAllocs(t *testing.T) {
	allocs := func(n uint32) float64 {
		kernel := pvhtest.Build(false, 0x200000, exitLoop(n), 0x200000, true)
		return testing.AllocsPerRun(1, func() {
			m, err := New(Config{Kernel: kernel, MemSize: 16 << 20, Console: io.Discard})
			if err != nil {
				t.Fatal(err)
			}
			defer m.Close()
			if _, err := m.Run(); err != nil {
				t.Fatal(err)
			}
		})
	}
	small, large := allocs(10), allocs(20_000)
	if large > small+10 {
		t.Fatalf("20000 exits allocate %.0f times, 10 exits %.0f: the exit path allocates", large, small)
	}
	t.Logf("allocations: %.0f for 10 exits, %.0f for 20000", small, large)
}

// stepLoop is 32-bit code that does n rounds of rdtsc and a port write,
// then writes 0 to the debug-exit port.
func stepLoop(n uint32) []byte {
	return []byte{
		0xb9, byte(n), byte(n >> 8), byte(n >> 16), byte(n >> 24), // mov ecx, n
		0x0f, 0x31, // 1: rdtsc
		0xe6, 0x80, // out 0x80, al
		0x49,       // dec ecx
		0x75, 0xf9, // jnz 1b
		0x66, 0xba, 0x01, 0x05, // mov dx, 0x501
		0x30, 0xc0, // xor al, al
		0xee, // out dx, al
		0xf4, // hlt
	}
}

// TestStepPathAllocs is TestExitPathAllocs for the step clock: single
// steps, the look at every instruction and RDTSC's emulation allocate
// nothing either.
func TestStepPathAllocs(t *testing.T) {
	allocs := func(n uint32) (float64, uint64) {
		kernel := pvhtest.Build(false, 0x200000, stepLoop(n), 0x200000, true)
		var steps uint64
		a := testing.AllocsPerRun(1, func() {
			m, err := New(Config{Kernel: kernel, MemSize: 16 << 20, Console: io.Discard, Epoch: EpochStep})
			if err != nil {
				t.Fatal(err)
			}
			defer m.Close()
			if _, err := m.Run(); err != nil {
				t.Fatal(err)
			}
			steps = m.Stats.Steps
		})
		return a, steps
	}
	small, _ := allocs(10)
	large, steps := allocs(2_000)
	if large > small+10 {
		t.Fatalf("%d steps allocate %.0f times, a few dozen %.0f: the step path allocates", steps, large, small)
	}
	t.Logf("allocations: %.0f for 10 rounds, %.0f for 2000 (%d steps)", small, large, steps)
}
