package vmm

import "github.com/ftkvm/ftkvm/kvm"

// CPUID bits ftkvm hides from the guest. A replica must not be able to read
// host time or randomness except through the environment, and must not see
// anything that differs between two hosts or that this project's KVM
// cannot run (docs/KVM-HOSTS.md: the ring-0 emulator rejects xsave/xrstor and
// cmpxchg16b).
const (
	// Leaf 1 ECX.
	cpuid1EcxMonitor     = 1 << 3
	cpuid1EcxFMA         = 1 << 12
	cpuid1EcxCX16        = 1 << 13
	cpuid1EcxX2APIC      = 1 << 21
	cpuid1EcxTSCDeadline = 1 << 24
	cpuid1EcxXSAVE       = 1 << 26
	cpuid1EcxOSXSAVE     = 1 << 27
	cpuid1EcxAVX         = 1 << 28
	cpuid1EcxF16C        = 1 << 29
	cpuid1EcxRDRAND      = 1 << 30
	cpuid1EcxHypervisor  = 1 << 31
	// Leaf 1 EDX.
	cpuid1EdxTSC  = 1 << 4
	cpuid1EdxAPIC = 1 << 9
	// Leaf 7.0 EBX.
	cpuid7EbxTSCAdjust = 1 << 1
	cpuid7EbxAVX2      = 1 << 5
	cpuid7EbxRDSEED    = 1 << 18
	cpuid7EbxAVX512    = 1<<16 | 1<<17 | 1<<21 | 1<<26 | 1<<27 | 1<<28 | 1<<30 | 1<<31
	// Leaf 7.0 ECX.
	cpuid7EcxAVX512 = 1<<1 | 1<<6 | 1<<11 | 1<<12 | 1<<14
	cpuid7EcxPKU    = 1<<3 | 1<<4
	cpuid7EcxRDPID  = 1 << 22
	// Leaf 7.0 EDX.
	cpuid7EdxAVX512 = 1<<2 | 1<<3 | 1<<8 | 1<<23
	// Leaf 0x80000001 EDX / ECX.
	cpuidExt1EdxRDTSCP = 1 << 27
	cpuidExt1EcxMWAITX = 1 << 29
	// Leaf 0x80000007 EDX.
	cpuidExt7EdxInvariantTSC = 1 << 8
)

// DeterministicCPUID filters what KVM supports down to what a replicated
// guest may see. Leaves that only make sense with a hidden feature (XSAVE
// state sizes, TSC and core frequencies, the KVM paravirtual leaves that
// carry kvmclock) are dropped whole; leaf 1's APIC ID is zeroed.
func DeterministicCPUID(in []kvm.CPUIDEntry) []kvm.CPUIDEntry {
	out := make([]kvm.CPUIDEntry, 0, len(in))
	for _, e := range in {
		switch {
		case e.Function == 0xd, // XSAVE state components
			e.Function == 0x15, // TSC/core crystal ratio
			e.Function == 0x16, // processor frequencies
			e.Function >= 0x40000000 && e.Function < 0x80000000: // hypervisor leaves (kvmclock)
			continue
		case e.Function == 1:
			e.Ecx &^= cpuid1EcxMonitor | cpuid1EcxFMA | cpuid1EcxCX16 | cpuid1EcxX2APIC |
				cpuid1EcxTSCDeadline | cpuid1EcxXSAVE | cpuid1EcxOSXSAVE | cpuid1EcxAVX |
				cpuid1EcxF16C | cpuid1EcxRDRAND | cpuid1EcxHypervisor
			e.Edx &^= cpuid1EdxTSC | cpuid1EdxAPIC
			e.Ebx &= 0x0000ffff // initial APIC ID and logical count: one CPU, ID 0
		case e.Function == 7 && e.Index == 0:
			e.Ebx &^= cpuid7EbxTSCAdjust | cpuid7EbxAVX2 | cpuid7EbxRDSEED | cpuid7EbxAVX512
			e.Ecx &^= cpuid7EcxAVX512 | cpuid7EcxPKU | cpuid7EcxRDPID
			e.Edx &^= cpuid7EdxAVX512
		case e.Function == 7 && e.Index == 1:
			e.Eax = 0 // AVX-VNNI, AVX512_BF16 and friends
		case e.Function == 0x80000001:
			e.Edx &^= cpuidExt1EdxRDTSCP
			e.Ecx &^= cpuidExt1EcxMWAITX
		case e.Function == 0xb || e.Function == 0x1f:
			// Extended topology: EDX is the x2APIC ID of the host CPU the
			// asking thread ran on, so two processes (two replicas) see
			// different values. One CPU, ID 0.
			e.Edx = 0
		case e.Function == 0x8000001e:
			e.Eax = 0 // AMD extended APIC ID, of the host CPU likewise
		case e.Function == 0x80000007:
			e.Edx &^= cpuidExt7EdxInvariantTSC
		}
		out = append(out, e)
	}
	return out
}

// MSRs whose values come from host time, or that would enable a host-time
// source the CPUID hides. They are filtered so that every guest access
// exits to user space: the TSC gets its value from the environment, the
// rest raise #GP as on a CPU without those features.
const (
	msrIA32TSC          = 0x10
	msrKVMWallClock     = 0x11
	msrKVMSystemTime    = 0x12
	msrIA32TSCAdjust    = 0x3b
	msrIA32MPERF        = 0xe7
	msrIA32APERF        = 0xe8
	msrIA32TSCDeadline  = 0x6e0
	msrTSCAux           = 0xc0000103
	msrKVMWallClockNew  = 0x4b564d00
	msrKVMSystemTimeNew = 0x4b564d01
	msrKVMAsyncPF       = 0x4b564d02
	msrKVMStealTime     = 0x4b564d03
	msrKVMPVEOI         = 0x4b564d04
)

var trappedMSRs = []uint32{
	msrIA32TSC, msrKVMWallClock, msrKVMSystemTime, msrIA32TSCAdjust,
	msrIA32MPERF, msrIA32APERF, msrIA32TSCDeadline, msrTSCAux,
	msrKVMWallClockNew, msrKVMSystemTimeNew, msrKVMAsyncPF, msrKVMStealTime, msrKVMPVEOI,
}
