package kvm

import (
	"strconv"
	"unsafe"
)

// ExitReason is kvm_run.exit_reason (KVM_EXIT_*).
type ExitReason uint32

// Exit reasons from linux/kvm.h. Only the x86 ones are ever produced here;
// the rest are named so String never prints a bare number for a real value.
const (
	ExitUnknown        ExitReason = 0
	ExitException      ExitReason = 1
	ExitIO             ExitReason = 2
	ExitHypercall      ExitReason = 3
	ExitDebug          ExitReason = 4
	ExitHLT            ExitReason = 5
	ExitMMIO           ExitReason = 6
	ExitIRQWindowOpen  ExitReason = 7
	ExitShutdown       ExitReason = 8
	ExitFailEntry      ExitReason = 9
	ExitIntr           ExitReason = 10
	ExitSetTPR         ExitReason = 11
	ExitTPRAccess      ExitReason = 12
	ExitS390SIEIC      ExitReason = 13
	ExitS390Reset      ExitReason = 14
	ExitDCR            ExitReason = 15
	ExitNMI            ExitReason = 16
	ExitInternalError  ExitReason = 17
	ExitOSI            ExitReason = 18
	ExitPAPRHcall      ExitReason = 19
	ExitS390UControl   ExitReason = 20
	ExitWatchdog       ExitReason = 21
	ExitS390TSCH       ExitReason = 22
	ExitEPR            ExitReason = 23
	ExitSystemEvent    ExitReason = 24
	ExitS390STSI       ExitReason = 25
	ExitIOAPICEOI      ExitReason = 26
	ExitHyperV         ExitReason = 27
	ExitARMNISV        ExitReason = 28
	ExitX86RDMSR       ExitReason = 29
	ExitX86WRMSR       ExitReason = 30
	ExitDirtyRingFull  ExitReason = 31
	ExitAPResetHold    ExitReason = 32
	ExitX86BusLock     ExitReason = 33
	ExitXen            ExitReason = 34
	ExitRISCVSBI       ExitReason = 35
	ExitRISCVCSR       ExitReason = 36
	ExitNotify         ExitReason = 37
	ExitLoongArchIOCSR ExitReason = 38
	ExitMemoryFault    ExitReason = 39
)

var exitNames = [...]string{
	ExitUnknown:        "KVM_EXIT_UNKNOWN",
	ExitException:      "KVM_EXIT_EXCEPTION",
	ExitIO:             "KVM_EXIT_IO",
	ExitHypercall:      "KVM_EXIT_HYPERCALL",
	ExitDebug:          "KVM_EXIT_DEBUG",
	ExitHLT:            "KVM_EXIT_HLT",
	ExitMMIO:           "KVM_EXIT_MMIO",
	ExitIRQWindowOpen:  "KVM_EXIT_IRQ_WINDOW_OPEN",
	ExitShutdown:       "KVM_EXIT_SHUTDOWN",
	ExitFailEntry:      "KVM_EXIT_FAIL_ENTRY",
	ExitIntr:           "KVM_EXIT_INTR",
	ExitSetTPR:         "KVM_EXIT_SET_TPR",
	ExitTPRAccess:      "KVM_EXIT_TPR_ACCESS",
	ExitS390SIEIC:      "KVM_EXIT_S390_SIEIC",
	ExitS390Reset:      "KVM_EXIT_S390_RESET",
	ExitDCR:            "KVM_EXIT_DCR",
	ExitNMI:            "KVM_EXIT_NMI",
	ExitInternalError:  "KVM_EXIT_INTERNAL_ERROR",
	ExitOSI:            "KVM_EXIT_OSI",
	ExitPAPRHcall:      "KVM_EXIT_PAPR_HCALL",
	ExitS390UControl:   "KVM_EXIT_S390_UCONTROL",
	ExitWatchdog:       "KVM_EXIT_WATCHDOG",
	ExitS390TSCH:       "KVM_EXIT_S390_TSCH",
	ExitEPR:            "KVM_EXIT_EPR",
	ExitSystemEvent:    "KVM_EXIT_SYSTEM_EVENT",
	ExitS390STSI:       "KVM_EXIT_S390_STSI",
	ExitIOAPICEOI:      "KVM_EXIT_IOAPIC_EOI",
	ExitHyperV:         "KVM_EXIT_HYPERV",
	ExitARMNISV:        "KVM_EXIT_ARM_NISV",
	ExitX86RDMSR:       "KVM_EXIT_X86_RDMSR",
	ExitX86WRMSR:       "KVM_EXIT_X86_WRMSR",
	ExitDirtyRingFull:  "KVM_EXIT_DIRTY_RING_FULL",
	ExitAPResetHold:    "KVM_EXIT_AP_RESET_HOLD",
	ExitX86BusLock:     "KVM_EXIT_X86_BUS_LOCK",
	ExitXen:            "KVM_EXIT_XEN",
	ExitRISCVSBI:       "KVM_EXIT_RISCV_SBI",
	ExitRISCVCSR:       "KVM_EXIT_RISCV_CSR",
	ExitNotify:         "KVM_EXIT_NOTIFY",
	ExitLoongArchIOCSR: "KVM_EXIT_LOONGARCH_IOCSR",
	ExitMemoryFault:    "KVM_EXIT_MEMORY_FAULT",
}

// String returns the kernel's name, e.g. "KVM_EXIT_IO". Known reasons do not
// allocate, so it is safe to use in exit-statistics code.
func (r ExitReason) String() string {
	if int(r) < len(exitNames) && exitNames[r] != "" {
		return exitNames[r]
	}
	return "KVM_EXIT_" + strconv.FormatUint(uint64(r), 10)
}

// Run is struct kvm_run, overlaid on the vCPU's shared mapping: reads and
// writes go straight to the memory the kernel uses on the next KVM_RUN.
// It is valid until VCPU.Close.
type Run struct {
	// In: ask for KVM_EXIT_IRQ_WINDOW_OPEN as soon as the guest can accept
	// an interrupt (used without an in-kernel irqchip).
	RequestInterruptWindow uint8
	// In: if nonzero, KVM_RUN returns EINTR at once without entering the
	// guest. Set by VCPU.Kick; clearing it is the caller's decision.
	ImmediateExit uint8
	_             [6]uint8

	// Out.
	ExitReason                 ExitReason
	ReadyForInterruptInjection uint8
	IfFlag                     uint8
	Flags                      uint16

	// In (before KVM_RUN) and out (after).
	CR8      uint64
	ApicBase uint64

	// ExitData is the 256-byte exit-information union; use the typed
	// accessors (IO, MMIO, MSR, ...) matching ExitReason.
	ExitData [256]byte

	// ValidRegs (out) and DirtyRegs (in) select SyncX86* blocks of
	// SyncRegsData shared with the kernel (KVM_CAP_SYNC_REGS).
	ValidRegs    uint64
	DirtyRegs    uint64
	SyncRegsData [2048]byte
}

// IOExit is the io member of the kvm_run union (KVM_EXIT_IO).
type IOExit struct {
	Direction  uint8 // IOIn or IOOut
	Size       uint8 // bytes per access: 1, 2 or 4
	Port       uint16
	Count      uint32 // > 1 for string I/O (rep ins/outs)
	DataOffset uint64 // of the data, from the start of kvm_run; see VCPU.IOData
}

// IOExit.Direction values.
const (
	IOIn  = 0 // KVM_EXIT_IO_IN
	IOOut = 1 // KVM_EXIT_IO_OUT
)

// MMIOExit is the mmio member (KVM_EXIT_MMIO). For a read, fill Data[:Len]
// before the next Run.
type MMIOExit struct {
	PhysAddr uint64
	Data     [8]uint8
	Len      uint32
	IsWrite  uint8
	_        [3]uint8
}

// MSRExit is the msr member (KVM_EXIT_X86_RDMSR/WRMSR). For a read, set Data
// (or Error=1 to inject #GP) before the next Run.
type MSRExit struct {
	Error  uint8 // user -> kernel: nonzero injects #GP
	_      [7]uint8
	Reason uint32 // MSRExitReason*
	Index  uint32
	Data   uint64
}

// DebugExit is the debug member (KVM_EXIT_DEBUG, struct kvm_debug_exit_arch).
type DebugExit struct {
	Exception uint32 // 1 = #DB, 3 = #BP
	Pad       uint32
	PC        uint64 // linear RIP
	DR6       uint64
	DR7       uint64
}

// InternalErrorExit is the internal member (KVM_EXIT_INTERNAL_ERROR).
type InternalErrorExit struct {
	Suberror uint32 // InternalError*
	NData    uint32
	Data     [16]uint64
}

// InternalErrorExit.Suberror values (KVM_INTERNAL_ERROR_*).
const (
	InternalErrorEmulation            = 1
	InternalErrorSimulEx              = 2
	InternalErrorDeliveryEv           = 3
	InternalErrorUnexpectedExitReason = 4
)

// FailEntryExit is the fail_entry member (KVM_EXIT_FAIL_ENTRY).
type FailEntryExit struct {
	HardwareEntryFailureReason uint64
	CPU                        uint32
	_                          uint32
}

// SystemEventExit is the system_event member (KVM_EXIT_SYSTEM_EVENT).
type SystemEventExit struct {
	Type  uint32 // SystemEvent*
	NData uint32
	Data  [16]uint64 // Data[0] is the legacy "flags" field
}

// SystemEventExit.Type values (KVM_SYSTEM_EVENT_*).
const (
	SystemEventShutdown = 1
	SystemEventReset    = 2
	SystemEventCrash    = 3
	SystemEventWakeup   = 4
	SystemEventSuspend  = 5
	SystemEventSEVTerm  = 6
)

// HypercallExit is the hypercall member (KVM_EXIT_HYPERCALL).
type HypercallExit struct {
	Nr       uint64
	Args     [6]uint64
	Ret      uint64
	LongMode uint32 // newer headers: low half of a u64 "flags"
	_        uint32
}

// ExceptionExit is the ex member (KVM_EXIT_EXCEPTION).
type ExceptionExit struct {
	Exception uint32
	ErrorCode uint32
}

// HardwareExit is the hw member (KVM_EXIT_UNKNOWN).
type HardwareExit struct {
	HardwareExitReason uint64
}

// The accessors reinterpret ExitData in place: no copy, no allocation. They
// are only meaningful for the matching ExitReason.

// IO returns the KVM_EXIT_IO data.
func (r *Run) IO() *IOExit { return (*IOExit)(unsafe.Pointer(&r.ExitData)) }

// MMIO returns the KVM_EXIT_MMIO data.
func (r *Run) MMIO() *MMIOExit { return (*MMIOExit)(unsafe.Pointer(&r.ExitData)) }

// MSR returns the KVM_EXIT_X86_RDMSR/WRMSR data.
func (r *Run) MSR() *MSRExit { return (*MSRExit)(unsafe.Pointer(&r.ExitData)) }

// Debug returns the KVM_EXIT_DEBUG data.
func (r *Run) Debug() *DebugExit { return (*DebugExit)(unsafe.Pointer(&r.ExitData)) }

// InternalError returns the KVM_EXIT_INTERNAL_ERROR data.
func (r *Run) InternalError() *InternalErrorExit {
	return (*InternalErrorExit)(unsafe.Pointer(&r.ExitData))
}

// FailEntry returns the KVM_EXIT_FAIL_ENTRY data.
func (r *Run) FailEntry() *FailEntryExit { return (*FailEntryExit)(unsafe.Pointer(&r.ExitData)) }

// SystemEvent returns the KVM_EXIT_SYSTEM_EVENT data.
func (r *Run) SystemEvent() *SystemEventExit {
	return (*SystemEventExit)(unsafe.Pointer(&r.ExitData))
}

// Hypercall returns the KVM_EXIT_HYPERCALL data.
func (r *Run) Hypercall() *HypercallExit { return (*HypercallExit)(unsafe.Pointer(&r.ExitData)) }

// Exception returns the KVM_EXIT_EXCEPTION data.
func (r *Run) Exception() *ExceptionExit { return (*ExceptionExit)(unsafe.Pointer(&r.ExitData)) }

// Hardware returns the KVM_EXIT_UNKNOWN data.
func (r *Run) Hardware() *HardwareExit { return (*HardwareExit)(unsafe.Pointer(&r.ExitData)) }

// SyncRegs returns the register block shared through kvm_run
// (KVM_CAP_SYNC_REGS); which parts are meaningful is given by ValidRegs, and
// the parts the kernel must load on the next KVM_RUN by DirtyRegs.
func (r *Run) SyncRegs() *SyncRegs { return (*SyncRegs)(unsafe.Pointer(&r.SyncRegsData)) }
