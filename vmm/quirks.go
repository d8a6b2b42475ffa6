package vmm

import (
	"sync"

	"github.com/ftkvm/ftkvm/kvm"
)

// Interrupt windows and an emulated ring 0.
//
// On a KVM that emulates guest ring 0 (this project's development hosts,
// kvm_pvm: see README), a requested interrupt window does not open at a
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
