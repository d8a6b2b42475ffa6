package vmm

import (
	"testing"

	"github.com/ftkvm/ftkvm/kvm"
)

// Two replicas are two processes on different host CPUs: every CPUID
// field that reports the asking CPU's APIC ID must be made the same.
func TestDeterministicCPUIDHidesHostAPICIDs(t *testing.T) {
	tests := []struct {
		name string
		in   kvm.CPUIDEntry
		want kvm.CPUIDEntry
	}{
		{"leaf 1 initial APIC ID", kvm.CPUIDEntry{Function: 1, Ebx: 0x01020800}, kvm.CPUIDEntry{Function: 1, Ebx: 0x0800}},
		{"leaf 0xb x2APIC ID", kvm.CPUIDEntry{Function: 0xb, Flags: 1, Ecx: 0x100, Edx: 1}, kvm.CPUIDEntry{Function: 0xb, Flags: 1, Ecx: 0x100}},
		{"leaf 0x1f x2APIC ID", kvm.CPUIDEntry{Function: 0x1f, Index: 1, Edx: 3}, kvm.CPUIDEntry{Function: 0x1f, Index: 1}},
		{"leaf 0x8000001e extended APIC ID", kvm.CPUIDEntry{Function: 0x8000001e, Eax: 5, Ebx: 0x100}, kvm.CPUIDEntry{Function: 0x8000001e, Ebx: 0x100}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := DeterministicCPUID([]kvm.CPUIDEntry{tt.in})
			if len(got) != 1 || got[0] != tt.want {
				t.Errorf("DeterministicCPUID(%+v) = %+v, want %+v", tt.in, got, tt.want)
			}
		})
	}
}
