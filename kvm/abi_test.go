package kvm

import (
	"testing"
	"unsafe"
)

// The expected values below were printed by a C program compiled against
// this host's linux/kvm.h (x86_64); they do not depend on /dev/kvm.

func TestIoctlNumbers(t *testing.T) {
	cases := []struct {
		name string
		got  uintptr
		want uintptr
	}{
		{"KVM_GET_API_VERSION", kvmGetAPIVersion, 0xae00},
		{"KVM_CREATE_VM", kvmCreateVM, 0xae01},
		{"KVM_GET_MSR_INDEX_LIST", kvmGetMSRIndexList, 0xc004ae02},
		{"KVM_CHECK_EXTENSION", kvmCheckExtension, 0xae03},
		{"KVM_GET_VCPU_MMAP_SIZE", kvmGetVCPUMmapSize, 0xae04},
		{"KVM_GET_SUPPORTED_CPUID", kvmGetSupportedCPUID, 0xc008ae05},
		{"KVM_GET_MSR_FEATURE_INDEX_LIST", kvmGetMSRFeatureIndexList, 0xc004ae0a},
		{"KVM_CREATE_VCPU", kvmCreateVCPU, 0xae41},
		{"KVM_GET_DIRTY_LOG", kvmGetDirtyLog, 0x4010ae42},
		{"KVM_SET_USER_MEMORY_REGION", kvmSetUserMemoryRegion, 0x4020ae46},
		{"KVM_SET_TSS_ADDR", kvmSetTSSAddr, 0xae47},
		{"KVM_SET_IDENTITY_MAP_ADDR", kvmSetIdentityMapAddr, 0x4008ae48},
		{"KVM_SET_CLOCK", kvmSetClock, 0x4030ae7b},
		{"KVM_GET_CLOCK", kvmGetClock, 0x8030ae7c},
		{"KVM_RUN", kvmRun, 0xae80},
		{"KVM_GET_REGS", kvmGetRegs, 0x8090ae81},
		{"KVM_SET_REGS", kvmSetRegs, 0x4090ae82},
		{"KVM_GET_SREGS", kvmGetSregs, 0x8138ae83},
		{"KVM_SET_SREGS", kvmSetSregs, 0x4138ae84},
		{"KVM_TRANSLATE", kvmTranslate, 0xc018ae85},
		{"KVM_INTERRUPT", kvmInterrupt, 0x4004ae86},
		{"KVM_GET_MSRS", kvmGetMSRs, 0xc008ae88},
		{"KVM_SET_MSRS", kvmSetMSRs, 0x4008ae89},
		{"KVM_GET_FPU", kvmGetFPU, 0x81a0ae8c},
		{"KVM_SET_FPU", kvmSetFPU, 0x41a0ae8d},
		{"KVM_SET_CPUID2", kvmSetCPUID2, 0x4008ae90},
		{"KVM_GET_CPUID2", kvmGetCPUID2, 0xc008ae91},
		{"KVM_GET_MP_STATE", kvmGetMPState, 0x8004ae98},
		{"KVM_SET_MP_STATE", kvmSetMPState, 0x4004ae99},
		{"KVM_NMI", kvmNMI, 0xae9a},
		{"KVM_SET_GUEST_DEBUG", kvmSetGuestDebug, 0x4048ae9b},
		{"KVM_GET_VCPU_EVENTS", kvmGetVCPUEvents, 0x8040ae9f},
		{"KVM_SET_VCPU_EVENTS", kvmSetVCPUEvents, 0x4040aea0},
		{"KVM_GET_DEBUGREGS", kvmGetDebugRegs, 0x8080aea1},
		{"KVM_SET_DEBUGREGS", kvmSetDebugRegs, 0x4080aea2},
		{"KVM_SET_TSC_KHZ", kvmSetTSCKHz, 0xaea2},
		{"KVM_GET_TSC_KHZ", kvmGetTSCKHz, 0xaea3},
		{"KVM_ENABLE_CAP", kvmEnableCap, 0x4068aea3},
		{"KVM_GET_XSAVE", kvmGetXSave, 0x9000aea4},
		{"KVM_SET_XSAVE", kvmSetXSave, 0x5000aea5},
		{"KVM_GET_XCRS", kvmGetXCRs, 0x8188aea6},
		{"KVM_SET_XCRS", kvmSetXCRs, 0x4188aea7},
		{"KVM_X86_SET_MSR_FILTER", kvmX86SetMSRFilter, 0x4188aec6},
	}
	for _, c := range cases {
		if c.got != c.want {
			t.Errorf("%s = %#x, want %#x", c.name, c.got, c.want)
		}
	}
}

func TestStructSizes(t *testing.T) {
	cases := []struct {
		name string
		got  uintptr
		want uintptr
	}{
		{"kvm_regs", unsafe.Sizeof(Regs{}), 144},
		{"kvm_sregs", unsafe.Sizeof(Sregs{}), 312},
		{"kvm_segment", unsafe.Sizeof(Segment{}), 24},
		{"kvm_dtable", unsafe.Sizeof(DTable{}), 16},
		{"kvm_fpu", unsafe.Sizeof(FPU{}), 416},
		{"kvm_xsave", unsafe.Sizeof(XSave{}), 4096},
		{"kvm_xcr", unsafe.Sizeof(XCR{}), 16},
		{"kvm_xcrs", unsafe.Sizeof(XCRs{}), 392},
		{"kvm_msrs", unsafe.Sizeof(msrsHeader{}), 8},
		{"kvm_msr_entry", unsafe.Sizeof(msrEntry{}), 16},
		{"kvm_msr_list", unsafe.Sizeof(msrList{}), 4},
		{"kvm_vcpu_events", unsafe.Sizeof(VCPUEvents{}), 64},
		{"kvm_debugregs", unsafe.Sizeof(DebugRegs{}), 128},
		{"kvm_mp_state", unsafe.Sizeof(MPState{}), 4},
		{"kvm_guest_debug", unsafe.Sizeof(GuestDebug{}), 72},
		{"kvm_msr_filter", unsafe.Sizeof(msrFilter{}), 392},
		{"kvm_msr_filter_range", unsafe.Sizeof(msrFilterRange{}), 24},
		{"kvm_enable_cap", unsafe.Sizeof(enableCap{}), 104},
		{"kvm_dirty_log", unsafe.Sizeof(dirtyLog{}), 16},
		{"kvm_userspace_memory_region", unsafe.Sizeof(MemoryRegion{}), 32},
		{"kvm_cpuid2", unsafe.Sizeof(cpuid2{}), 8},
		{"kvm_cpuid_entry2", unsafe.Sizeof(cpuidEntry2{}), 40},
		{"kvm_interrupt", unsafe.Sizeof(interrupt{}), 4},
		{"kvm_run", unsafe.Sizeof(Run{}), 2352},
		{"kvm_clock_data", unsafe.Sizeof(ClockData{}), 48},
		{"kvm_translation", unsafe.Sizeof(Translation{}), 24},
		{"kvm_debug_exit_arch", unsafe.Sizeof(DebugExit{}), 32},
		{"kvm_sync_regs (x86 part)", unsafe.Sizeof(SyncRegs{}), 144 + 312 + 64},
		// Union members must fit the 256-byte union.
		{"kvm_run.io", unsafe.Sizeof(IOExit{}), 16},
		{"kvm_run.mmio", unsafe.Sizeof(MMIOExit{}), 24},
		{"kvm_run.msr", unsafe.Sizeof(MSRExit{}), 24},
		{"kvm_run.internal", unsafe.Sizeof(InternalErrorExit{}), 136},
		{"kvm_run.fail_entry", unsafe.Sizeof(FailEntryExit{}), 16},
		{"kvm_run.system_event", unsafe.Sizeof(SystemEventExit{}), 136},
		{"kvm_run.hypercall", unsafe.Sizeof(HypercallExit{}), 72},
		{"kvm_run.ex", unsafe.Sizeof(ExceptionExit{}), 8},
	}
	for _, c := range cases {
		if c.got != c.want {
			t.Errorf("sizeof(%s) = %d, want %d", c.name, c.got, c.want)
		}
	}
}

func TestStructOffsets(t *testing.T) {
	var r Run
	u := unsafe.Offsetof(r.ExitData)
	var ev VCPUEvents
	var s Sregs
	var f FPU
	var d DebugRegs
	var x XCRs
	var mf msrFilter
	var mr msrFilterRange
	cases := []struct {
		name string
		got  uintptr
		want uintptr
	}{
		{"kvm_run.request_interrupt_window", unsafe.Offsetof(r.RequestInterruptWindow), 0},
		{"kvm_run.immediate_exit", unsafe.Offsetof(r.ImmediateExit), 1},
		{"kvm_run.exit_reason", unsafe.Offsetof(r.ExitReason), 8},
		{"kvm_run.ready_for_interrupt_injection", unsafe.Offsetof(r.ReadyForInterruptInjection), 12},
		{"kvm_run.if_flag", unsafe.Offsetof(r.IfFlag), 13},
		{"kvm_run.flags", unsafe.Offsetof(r.Flags), 14},
		{"kvm_run.cr8", unsafe.Offsetof(r.CR8), 16},
		{"kvm_run.apic_base", unsafe.Offsetof(r.ApicBase), 24},
		{"kvm_run.io", u, 32},
		{"kvm_run.kvm_valid_regs", unsafe.Offsetof(r.ValidRegs), 288},
		{"kvm_run.kvm_dirty_regs", unsafe.Offsetof(r.DirtyRegs), 296},
		{"kvm_run.s", unsafe.Offsetof(r.SyncRegsData), 304},
		{"kvm_run.io.direction", u + unsafe.Offsetof(IOExit{}.Direction), 32},
		{"kvm_run.io.size", u + unsafe.Offsetof(IOExit{}.Size), 33},
		{"kvm_run.io.port", u + unsafe.Offsetof(IOExit{}.Port), 34},
		{"kvm_run.io.count", u + unsafe.Offsetof(IOExit{}.Count), 36},
		{"kvm_run.io.data_offset", u + unsafe.Offsetof(IOExit{}.DataOffset), 40},
		{"kvm_run.mmio.phys_addr", u + unsafe.Offsetof(MMIOExit{}.PhysAddr), 32},
		{"kvm_run.mmio.data", u + unsafe.Offsetof(MMIOExit{}.Data), 40},
		{"kvm_run.mmio.len", u + unsafe.Offsetof(MMIOExit{}.Len), 48},
		{"kvm_run.mmio.is_write", u + unsafe.Offsetof(MMIOExit{}.IsWrite), 52},
		{"kvm_run.msr.error", u + unsafe.Offsetof(MSRExit{}.Error), 32},
		{"kvm_run.msr.reason", u + unsafe.Offsetof(MSRExit{}.Reason), 40},
		{"kvm_run.msr.index", u + unsafe.Offsetof(MSRExit{}.Index), 44},
		{"kvm_run.msr.data", u + unsafe.Offsetof(MSRExit{}.Data), 48},
		{"kvm_run.debug.arch.exception", u + unsafe.Offsetof(DebugExit{}.Exception), 32},
		{"kvm_run.debug.arch.pc", u + unsafe.Offsetof(DebugExit{}.PC), 40},
		{"kvm_run.debug.arch.dr6", u + unsafe.Offsetof(DebugExit{}.DR6), 48},
		{"kvm_run.debug.arch.dr7", u + unsafe.Offsetof(DebugExit{}.DR7), 56},
		{"kvm_run.internal.suberror", u + unsafe.Offsetof(InternalErrorExit{}.Suberror), 32},
		{"kvm_run.internal.ndata", u + unsafe.Offsetof(InternalErrorExit{}.NData), 36},
		{"kvm_run.internal.data", u + unsafe.Offsetof(InternalErrorExit{}.Data), 40},
		{"kvm_run.fail_entry.cpu", u + unsafe.Offsetof(FailEntryExit{}.CPU), 40},
		{"kvm_run.system_event.type", u + unsafe.Offsetof(SystemEventExit{}.Type), 32},
		{"kvm_run.system_event.ndata", u + unsafe.Offsetof(SystemEventExit{}.NData), 36},
		{"kvm_run.system_event.data", u + unsafe.Offsetof(SystemEventExit{}.Data), 40},
		{"kvm_run.hypercall.args", u + unsafe.Offsetof(HypercallExit{}.Args), 40},
		{"kvm_run.hypercall.ret", u + unsafe.Offsetof(HypercallExit{}.Ret), 88},
		{"kvm_run.hypercall.longmode", u + unsafe.Offsetof(HypercallExit{}.LongMode), 96},
		{"kvm_run.ex.error_code", u + unsafe.Offsetof(ExceptionExit{}.ErrorCode), 36},
		{"kvm_vcpu_events.interrupt", unsafe.Offsetof(ev.Interrupt), 8},
		{"kvm_vcpu_events.nmi", unsafe.Offsetof(ev.NMI), 12},
		{"kvm_vcpu_events.sipi_vector", unsafe.Offsetof(ev.SIPIVector), 16},
		{"kvm_vcpu_events.flags", unsafe.Offsetof(ev.Flags), 20},
		{"kvm_vcpu_events.smi", unsafe.Offsetof(ev.SMI), 24},
		{"kvm_vcpu_events.triple_fault", unsafe.Offsetof(ev.TripleFaultPending), 28},
		{"kvm_vcpu_events.reserved", unsafe.Offsetof(ev.Reserved), 29},
		{"kvm_vcpu_events.exception_has_payload", unsafe.Offsetof(ev.ExceptionHasPayload), 55},
		{"kvm_vcpu_events.exception_payload", unsafe.Offsetof(ev.ExceptionPayload), 56},
		{"kvm_sregs.gdt", unsafe.Offsetof(s.GDT), 192},
		{"kvm_sregs.cr0", unsafe.Offsetof(s.CR0), 224},
		{"kvm_sregs.efer", unsafe.Offsetof(s.EFER), 264},
		{"kvm_sregs.interrupt_bitmap", unsafe.Offsetof(s.InterruptBitmap), 280},
		{"kvm_fpu.fcw", unsafe.Offsetof(f.FCW), 128},
		{"kvm_fpu.last_opcode", unsafe.Offsetof(f.LastOpcode), 134},
		{"kvm_fpu.last_ip", unsafe.Offsetof(f.LastIP), 136},
		{"kvm_fpu.xmm", unsafe.Offsetof(f.XMM), 152},
		{"kvm_fpu.mxcsr", unsafe.Offsetof(f.MXCSR), 408},
		{"kvm_debugregs.dr6", unsafe.Offsetof(d.DR6), 32},
		{"kvm_debugregs.dr7", unsafe.Offsetof(d.DR7), 40},
		{"kvm_debugregs.flags", unsafe.Offsetof(d.Flags), 48},
		{"kvm_debugregs.reserved", unsafe.Offsetof(d.Reserved), 56},
		{"kvm_xcrs.xcrs", unsafe.Offsetof(x.XCRs), 8},
		{"kvm_xcrs.padding", unsafe.Offsetof(x.Padding), 264},
		{"kvm_msr_filter.ranges", unsafe.Offsetof(mf.Ranges), 8},
		{"kvm_msr_filter_range.bitmap", unsafe.Offsetof(mr.Bitmap), 16},
		{"kvm_cpuid_entry2.padding", unsafe.Offsetof(cpuidEntry2{}.Padding), 28},
	}
	for _, c := range cases {
		if c.got != c.want {
			t.Errorf("offsetof(%s) = %d, want %d", c.name, c.got, c.want)
		}
	}
}

func TestConstants(t *testing.T) {
	// Values from linux/kvm.h.
	cases := []struct {
		name      string
		got, want uint64
	}{
		{"KVM_GUESTDBG_ENABLE", GuestDebugEnable, 0x1},
		{"KVM_GUESTDBG_SINGLESTEP", GuestDebugSingleStep, 0x2},
		{"KVM_GUESTDBG_USE_SW_BP", GuestDebugUseSWBP, 0x10000},
		{"KVM_GUESTDBG_USE_HW_BP", GuestDebugUseHWBP, 0x20000},
		{"KVM_GUESTDBG_INJECT_DB", GuestDebugInjectDB, 0x40000},
		{"KVM_GUESTDBG_INJECT_BP", GuestDebugInjectBP, 0x80000},
		{"KVM_GUESTDBG_BLOCKIRQ", GuestDebugBlockIRQ, 0x100000},
		{"KVM_MSR_FILTER_READ", MSRFilterRead, 1},
		{"KVM_MSR_FILTER_WRITE", MSRFilterWrite, 2},
		{"KVM_MSR_FILTER_DEFAULT_ALLOW", MSRFilterDefaultAllow, 0},
		{"KVM_MSR_FILTER_DEFAULT_DENY", MSRFilterDefaultDeny, 1},
		{"KVM_MSR_FILTER_MAX_BITMAP_SIZE", MSRFilterMaxBitmapSize, 0x600},
		{"KVM_MSR_EXIT_REASON_INVAL", MSRExitReasonInval, 1},
		{"KVM_MSR_EXIT_REASON_UNKNOWN", MSRExitReasonUnknown, 2},
		{"KVM_MSR_EXIT_REASON_FILTER", MSRExitReasonFilter, 4},
		{"KVM_MEM_LOG_DIRTY_PAGES", MemLogDirtyPages, 1},
		{"KVM_VCPUEVENT_VALID_TRIPLE_FAULT", VCPUEventValidTripleFault, 0x20},
		{"KVM_MP_STATE_HALTED", MPStateHalted, 3},
		{"KVM_EXIT_X86_RDMSR", uint64(ExitX86RDMSR), 29},
		{"KVM_EXIT_NOTIFY", uint64(ExitNotify), 37},
		{"KVM_CAP_X86_MSR_FILTER", uint64(CapX86MSRFilter), 189},
		{"KVM_CAP_IMMEDIATE_EXIT", uint64(CapImmediateExit), 136},
	}
	for _, c := range cases {
		if c.got != c.want {
			t.Errorf("%s = %#x, want %#x", c.name, c.got, c.want)
		}
	}
}

func TestNames(t *testing.T) {
	if s := ExitIO.String(); s != "KVM_EXIT_IO" {
		t.Errorf("ExitIO.String() = %q", s)
	}
	if s := ExitX86WRMSR.String(); s != "KVM_EXIT_X86_WRMSR" {
		t.Errorf("ExitX86WRMSR.String() = %q", s)
	}
	if s := ExitReason(1000).String(); s != "KVM_EXIT_1000" {
		t.Errorf("ExitReason(1000).String() = %q", s)
	}
	if s := CapX86UserSpaceMSR.String(); s != "KVM_CAP_X86_USER_SPACE_MSR" {
		t.Errorf("CapX86UserSpaceMSR.String() = %q", s)
	}
	if s := Cap(9999).String(); s != "KVM_CAP_9999" {
		t.Errorf("Cap(9999).String() = %q", s)
	}
	for c, name := range capNames {
		if c.String() != name {
			t.Errorf("Cap %d: %q", c, c.String())
		}
	}
	if n := testing.AllocsPerRun(100, func() { _ = ExitHLT.String() }); n != 0 {
		t.Errorf("ExitReason.String allocates %v times", n)
	}
}
