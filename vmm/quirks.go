package vmm

import (
	"crypto/sha256"
	"encoding/binary"
	"sync"

	"github.com/ftkvm/ftkvm/kvm"
)

// Interrupt windows and an emulated ring 0.
//
// On a KVM that emulates guest ring 0 (this project's development hosts,
// kvm_pvm: see docs/KVM-HOSTS.md), a requested interrupt window does not open at a
// point of the guest's own choosing: the exit comes when the in-kernel
// emulator happens to stop, which depends on host interrupts and
// scheduling. Measured here: two runs of the same guest fed the same events
// differed by one window exit and two port exits. A position that counts
// such exits would not be found again by a replica.
//
// On such a KVM, an environment that needs every point to be replayable
// (ExactPoints: record/replay, replication) gets no windows: an interrupt
// the guest cannot take at an exit waits for its next exit (port access,
// HLT, MSR), which is a point the guest chose. The live environment keeps
// windows, for latency. Ring 3 runs natively there and
// always has interrupts enabled, so only ring-0 code that disables
// interrupts and then runs long without exiting waits longer. On a KVM
// with native ring 0 (bare metal, the nested tier) windows are exact and
// used.

var ring0Probe struct {
	once     sync.Once
	emulated bool
}

// ring0Emulated reports, once per process, whether guest ring 0 runs
// emulated on this KVM: an emulator runs 1-2 million instructions/s, a
// native ring 0 (even nested under TCG) hundreds of millions. A failed
// probe counts as native (windows stay on). The best of three loops
// decides: in a loaded nested L1 one loop in five measured a native ring
// 0 at 4-11 million instructions/s, and a replica that wrongly turns
// interrupt windows off leaves a Linux guest's interrupts waiting for its
// next exit (its boot then crawls).
func ring0Emulated(sys *kvm.System) bool {
	ring0Probe.once.Do(func() {
		best, ok := 0.0, false
		for range 3 {
			ips, err := loopSpeed(sys, 0, 20_000)
			if err == nil {
				best, ok = max(best, ips), true
			}
		}
		ring0Probe.emulated = ok && best < 20e6
	})
	return ring0Probe.emulated
}

// ExactPoints is implemented by environments that must find every delivery
// point again on another run (record/replay, replication).
type ExactPoints interface {
	ExactPoints() bool
}

// Windows says whether a machine requests interrupt windows.
type Windows uint8

const (
	// WindowsAuto: requested, except for an environment that needs exact
	// points (ExactPoints) on a KVM whose ring 0 is emulated.
	WindowsAuto Windows = iota
	// WindowsOn: always requested (a replica whose primary decided so).
	WindowsOn
	// WindowsOff: never requested; an interrupt waits for the guest's
	// next exit.
	WindowsOff
)

// HostTraits are what, beyond the guest itself, decides where a guest's
// delivery points fall on a host. Replicas decide them once, on the
// primary, and agree on them in the handshake (ft/doc.go, "Handshake"):
// two replicas that measured for themselves could count different exits.
type HostTraits struct {
	// ExactWindows: interrupt windows open at points the guest's
	// execution defines (ring 0 runs natively: hardware virtualisation).
	ExactWindows bool
	// CPU is the SHA-256 of the CPUID table a guest is given here
	// (DeterministicCPUID of what this KVM supports): another CPU model
	// or KVM can make the guest take other paths.
	CPU [32]byte
}

// ProbeHost measures the KVM at path. The windows probe runs once per
// process (ring0Emulated).
func ProbeHost(path string) (HostTraits, error) {
	if path == "" {
		path = "/dev/kvm"
	}
	sys, err := kvm.Open(path)
	if err != nil {
		return HostTraits{}, err
	}
	defer sys.Close()
	supported, err := sys.SupportedCPUID()
	if err != nil {
		return HostTraits{}, err
	}
	return HostTraits{ExactWindows: !ring0Emulated(sys), CPU: CPUIDDigest(DeterministicCPUID(supported))}, nil
}

// CPUIDDigest is the SHA-256 of a CPUID table, in its order.
func CPUIDDigest(entries []kvm.CPUIDEntry) [32]byte {
	h := sha256.New()
	var b [28]byte
	for _, e := range entries {
		for i, v := range []uint32{e.Function, e.Index, e.Flags, e.Eax, e.Ebx, e.Ecx, e.Edx} {
			binary.LittleEndian.PutUint32(b[4*i:], v)
		}
		h.Write(b[:])
	}
	var d [32]byte
	h.Sum(d[:0])
	return d
}
