package kvm

import "unsafe"

// The structs below mirror linux/kvm.h and asm/kvm.h for x86_64 field for
// field (sizes and offsets are asserted in abi_test.go), so they are passed to
// the kernel directly, without marshalling. Padding the kernel ignores is a
// blank field; padding the kernel checks or may use later is named.

// MemoryRegion is struct kvm_userspace_memory_region.
type MemoryRegion struct {
	Slot          uint32
	Flags         uint32
	GuestPhysAddr uint64
	MemorySize    uint64 // bytes
	UserspaceAddr uint64 // start of the host mapping backing the slot
}

// Memory region flags (KVM_MEM_*).
const (
	MemLogDirtyPages = 1 << 0 // KVM_MEM_LOG_DIRTY_PAGES
	MemReadonly      = 1 << 1 // KVM_MEM_READONLY
)

// Regs is struct kvm_regs.
type Regs struct {
	RAX, RBX, RCX, RDX uint64
	RSI, RDI, RSP, RBP uint64
	R8, R9, R10, R11   uint64
	R12, R13, R14, R15 uint64
	RIP, RFLAGS        uint64
}

// Segment is struct kvm_segment.
type Segment struct {
	Base     uint64
	Limit    uint32
	Selector uint16
	Type     uint8
	Present  uint8
	DPL      uint8
	DB       uint8
	S        uint8
	L        uint8
	G        uint8
	AVL      uint8
	Unusable uint8
	_        uint8
}

// DTable is struct kvm_dtable (GDTR/IDTR).
type DTable struct {
	Base  uint64
	Limit uint16
	_     [3]uint16
}

// Sregs is struct kvm_sregs.
type Sregs struct {
	CS, DS, ES, FS, GS, SS Segment
	TR, LDT                Segment
	GDT, IDT               DTable
	CR0, CR2, CR3, CR4     uint64
	CR8                    uint64
	EFER                   uint64
	ApicBase               uint64
	// InterruptBitmap has one bit per vector (KVM_NR_INTERRUPTS = 256): the
	// interrupt injected but not yet delivered, if any (at most one bit set).
	InterruptBitmap [4]uint64
}

// FPU is struct kvm_fpu (legacy FXSAVE-style view of the x87/SSE state).
//
// KVM_GET_FPU/KVM_SET_FPU do not transfer MXCSR (the kernel ignores the field
// both ways) and KVM_SET_FPU does not update XSTATE_BV, so on an XSAVE host a
// value it writes into a component still in its initial state may not reach
// the guest. Use GetXSave/SetXSave to save and restore FPU/SSE state.
type FPU struct {
	FPR        [8][16]uint8
	FCW        uint16
	FSW        uint16
	FTWX       uint8 // in fxsave format
	_          uint8
	LastOpcode uint16
	LastIP     uint64
	LastDP     uint64
	XMM        [16][16]uint8
	MXCSR      uint32
	_          uint32
}

// XSave is struct kvm_xsave: the 4096-byte XSAVE area in the host's standard
// (non-compacted) format, offsets as in the host's CPUID leaf 0xD.
type XSave struct {
	Region [1024]uint32
}

// XCR is struct kvm_xcr.
type XCR struct {
	XCR      uint32
	Reserved uint32
	Value    uint64
}

// MaxXCRs is KVM_MAX_XCRS.
const MaxXCRs = 16

// XCRs is struct kvm_xcrs.
type XCRs struct {
	NrXCRs  uint32
	Flags   uint32
	XCRs    [MaxXCRs]XCR
	Padding [16]uint64
}

// MSREntry is one model-specific register for GetMSRs/SetMSRs. It is not the
// kernel struct (which has a reserved word); the package copies through a
// buffer of kvm_msr_entry.
type MSREntry struct {
	Index uint32
	Data  uint64
}

// msrEntry is struct kvm_msr_entry.
type msrEntry struct {
	Index    uint32
	Reserved uint32
	Data     uint64
}

// msrsHeader is struct kvm_msrs without its flexible array of entries.
type msrsHeader struct {
	NMSRs uint32
	Pad   uint32
}

// msrList is struct kvm_msr_list without its flexible array of indices.
type msrList struct {
	NMSRs uint32
}

// CPUIDEntry is one CPUID leaf/subleaf (struct kvm_cpuid_entry2 without its
// padding).
type CPUIDEntry struct {
	Function, Index, Flags, Eax, Ebx, Ecx, Edx uint32
}

// CPUIDFlagSignificantIndex (KVM_CPUID_FLAG_SIGNIFCANT_INDEX) marks entries
// whose Index (ECX input) selects the subleaf.
const CPUIDFlagSignificantIndex = 1

// cpuidEntry2 is struct kvm_cpuid_entry2.
type cpuidEntry2 struct {
	Function, Index, Flags, Eax, Ebx, Ecx, Edx uint32
	Padding                                    [3]uint32
}

// cpuid2 is struct kvm_cpuid2 without its flexible array of entries.
type cpuid2 struct {
	Nent    uint32
	Padding uint32
}

// ExceptionState is the exception part of struct kvm_vcpu_events.
type ExceptionState struct {
	Injected     uint8
	Nr           uint8
	HasErrorCode uint8
	Pending      uint8
	ErrorCode    uint32
}

// InterruptState is the interrupt part of struct kvm_vcpu_events.
type InterruptState struct {
	Injected uint8
	Nr       uint8
	Soft     uint8
	Shadow   uint8 // KVM_X86_SHADOW_INT_*
}

// NMIState is the nmi part of struct kvm_vcpu_events.
type NMIState struct {
	Injected uint8
	Pending  uint8
	Masked   uint8
	Pad      uint8
}

// SMIState is the smi part of struct kvm_vcpu_events.
type SMIState struct {
	SMM          uint8
	Pending      uint8
	SMMInsideNMI uint8
	LatchedInit  uint8
}

// VCPUEvents is struct kvm_vcpu_events: pending/injected exceptions,
// interrupts, NMIs and SMIs plus the interrupt shadow.
type VCPUEvents struct {
	Exception           ExceptionState
	Interrupt           InterruptState
	NMI                 NMIState
	SIPIVector          uint32
	Flags               uint32 // VCPUEventValid*
	SMI                 SMIState
	TripleFaultPending  uint8 // triple_fault.pending
	Reserved            [26]uint8
	ExceptionHasPayload uint8
	ExceptionPayload    uint64
}

// VCPUEvents.Flags (KVM_VCPUEVENT_VALID_*) and interrupt shadow bits.
const (
	VCPUEventValidNMIPending  = 0x01
	VCPUEventValidSIPIVector  = 0x02
	VCPUEventValidShadow      = 0x04
	VCPUEventValidSMM         = 0x08
	VCPUEventValidPayload     = 0x10
	VCPUEventValidTripleFault = 0x20

	ShadowIntMovSS = 0x01 // KVM_X86_SHADOW_INT_MOV_SS
	ShadowIntSTI   = 0x02 // KVM_X86_SHADOW_INT_STI
)

// DebugRegs is struct kvm_debugregs.
type DebugRegs struct {
	DB       [4]uint64
	DR6      uint64
	DR7      uint64
	Flags    uint64
	Reserved [9]uint64
}

// MPState is struct kvm_mp_state.
type MPState struct {
	State uint32
}

// MPState.State values (KVM_MP_STATE_*).
const (
	MPStateRunnable      = 0
	MPStateUninitialized = 1
	MPStateInitReceived  = 2
	MPStateHalted        = 3
	MPStateSIPIReceived  = 4
)

// GuestDebug is struct kvm_guest_debug (x86: DebugReg holds DR0-DR7 for
// hardware breakpoints when GuestDebugUseHWBP is set).
type GuestDebug struct {
	Control  uint32
	Pad      uint32
	DebugReg [8]uint64
}

// GuestDebug.Control bits (KVM_GUESTDBG_*).
const (
	GuestDebugEnable     = 0x00000001
	GuestDebugSingleStep = 0x00000002
	GuestDebugUseSWBP    = 0x00010000
	GuestDebugUseHWBP    = 0x00020000
	GuestDebugInjectDB   = 0x00040000
	GuestDebugInjectBP   = 0x00080000
	GuestDebugBlockIRQ   = 0x00100000
)

// interrupt is struct kvm_interrupt.
type interrupt struct {
	IRQ uint32
}

// enableCap is struct kvm_enable_cap.
type enableCap struct {
	Cap   uint32
	Flags uint32
	Args  [4]uint64
	Pad   [64]uint8
}

// dirtyLog is struct kvm_dirty_log. The bitmap pointer is an unsafe.Pointer
// so the garbage collector sees the Go slice it points to.
type dirtyLog struct {
	Slot   uint32
	_      uint32
	Bitmap unsafe.Pointer
}

// MSR filter (KVM_X86_SET_MSR_FILTER) constants.
const (
	MSRFilterDefaultAllow = 0 // KVM_MSR_FILTER_DEFAULT_ALLOW
	MSRFilterDefaultDeny  = 1 // KVM_MSR_FILTER_DEFAULT_DENY
	MSRFilterRead         = 1 // KVM_MSR_FILTER_READ (range flag)
	MSRFilterWrite        = 2 // KVM_MSR_FILTER_WRITE (range flag)
	MSRFilterMaxRanges    = 16
	// MSRFilterMaxBitmapSize is KVM_MSR_FILTER_MAX_BITMAP_SIZE in bytes,
	// i.e. at most 0x3000 MSRs per range.
	MSRFilterMaxBitmapSize = 0x600
)

// Reasons for KVM_CAP_X86_USER_SPACE_MSR (VM.EnableUserSpaceMSR) and
// MSRExit.Reason (KVM_MSR_EXIT_REASON_*).
const (
	MSRExitReasonInval   = 1 << 0 // the MSR access would #GP in KVM
	MSRExitReasonUnknown = 1 << 1 // KVM does not know the MSR
	MSRExitReasonFilter  = 1 << 2 // the MSR filter denied the access
)

// MSRFilter describes KVM_X86_SET_MSR_FILTER. Accesses an MSR filter denies
// exit to user space (KVM_EXIT_X86_RDMSR/WRMSR) when MSRExitReasonFilter is
// enabled, and raise #GP in the guest otherwise.
type MSRFilter struct {
	Flags  uint32 // MSRFilterDefaultAllow or MSRFilterDefaultDeny
	Ranges []MSRFilterRange
}

// MSRFilterRange covers MSRs Base..Base+NMSRs-1 for the access kinds in
// Flags. Bit i of Bitmap (LSB first) is 1 to allow MSR Base+i, 0 to deny it.
// Bitmap needs at least (NMSRs+7)/8 bytes.
type MSRFilterRange struct {
	Flags  uint32 // MSRFilterRead | MSRFilterWrite
	NMSRs  uint32
	Base   uint32
	Bitmap []byte
}

// msrFilterRange is struct kvm_msr_filter_range.
type msrFilterRange struct {
	Flags  uint32
	NMSRs  uint32
	Base   uint32
	_      uint32
	Bitmap unsafe.Pointer
}

// msrFilter is struct kvm_msr_filter.
type msrFilter struct {
	Flags  uint32
	_      uint32
	Ranges [MSRFilterMaxRanges]msrFilterRange
}

// Translation is struct kvm_translation (KVM_TRANSLATE).
type Translation struct {
	LinearAddress   uint64
	PhysicalAddress uint64
	Valid           uint8
	Writeable       uint8
	UserMode        uint8
	_               [5]uint8
}

// ClockData is struct kvm_clock_data (KVM_GET_CLOCK/KVM_SET_CLOCK).
type ClockData struct {
	Clock    uint64 // kvmclock nanoseconds
	Flags    uint32 // ClockTSCStable, ClockRealtime, ClockHostTSC
	_        uint32
	Realtime uint64
	HostTSC  uint64
	_        [4]uint32
}

// ClockData.Flags (KVM_CLOCK_*).
const (
	ClockTSCStable = 1 << 1
	ClockRealtime  = 1 << 2
	ClockHostTSC   = 1 << 3
)

// SyncRegs is struct kvm_sync_regs for x86, the register block shared through
// kvm_run when KVM_CAP_SYNC_REGS is used (see Run.ValidRegs/DirtyRegs).
type SyncRegs struct {
	Regs   Regs
	Sregs  Sregs
	Events VCPUEvents
}

// Bits of Run.ValidRegs and Run.DirtyRegs (KVM_SYNC_X86_*).
const (
	SyncX86Regs   = 1 << 0
	SyncX86Sregs  = 1 << 1
	SyncX86Events = 1 << 2
)
