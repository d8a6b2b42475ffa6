package kvm

import "strconv"

// Cap is a KVM_CAP_* extension number for CheckExtension and EnableCap.
type Cap uint32

// Extensions ftkvm checks for or enables (values from linux/kvm.h).
const (
	CapIRQChip                Cap = 0
	CapHLT                    Cap = 1
	CapUserMemory             Cap = 3
	CapSetTSSAddr             Cap = 4
	CapVAPIC                  Cap = 6
	CapExtCPUID               Cap = 7
	CapClocksource            Cap = 8
	CapNrVCPUs                Cap = 9
	CapNrMemslots             Cap = 10
	CapPIT                    Cap = 11
	CapNopIODelay             Cap = 12
	CapMPState                Cap = 14
	CapCoalescedMMIO          Cap = 15
	CapSyncMMU                Cap = 16
	CapUserNMI                Cap = 22
	CapSetGuestDebug          Cap = 23
	CapReinjectControl        Cap = 24
	CapIRQRouting             Cap = 25
	CapMCE                    Cap = 31
	CapIRQFD                  Cap = 32
	CapPIT2                   Cap = 33
	CapPITState2              Cap = 35
	CapIOEventFD              Cap = 36
	CapSetIdentityMapAddr     Cap = 37
	CapAdjustClock            Cap = 39
	CapInternalErrorData      Cap = 40
	CapVCPUEvents             Cap = 41
	CapIntrShadow             Cap = 49
	CapDebugRegs              Cap = 50
	CapX86RobustSinglestep    Cap = 51
	CapEnableCap              Cap = 54
	CapXSave                  Cap = 55
	CapXCRs                   Cap = 56
	CapAsyncPF                Cap = 59
	CapTSCControl             Cap = 60
	CapGetTSCKHz              Cap = 61
	CapMaxVCPUs               Cap = 66
	CapOneReg                 Cap = 70
	CapTSCDeadlineTimer       Cap = 72
	CapSyncRegs               Cap = 74
	CapKVMClockCtrl           Cap = 76
	CapSignalMSI              Cap = 77
	CapReadonlyMem            Cap = 81
	CapExtEmulCPUID           Cap = 95
	CapEnableCapVM            Cap = 98
	CapCheckExtensionVM       Cap = 105
	CapDisableQuirks          Cap = 116
	CapX86SMM                 Cap = 117
	CapMultiAddressSpace      Cap = 118
	CapGuestDebugHWBPs        Cap = 119
	CapGuestDebugHWWPs        Cap = 120
	CapSplitIRQChip           Cap = 121
	CapMaxVCPUID              Cap = 128
	CapX2APICAPI              Cap = 129
	CapImmediateExit          Cap = 136
	CapX86DisableExits        Cap = 143
	CapGetMSRFeatures         Cap = 153
	CapNestedState            Cap = 157
	CapMSRPlatformInfo        Cap = 159
	CapCoalescedPIO           Cap = 162
	CapExceptionPayload       Cap = 164
	CapManualDirtyLogProtect2 Cap = 168
	CapPMUEventFilter         Cap = 173
	CapHaltPoll               Cap = 182
	CapLastCPU                Cap = 184
	CapSmallerMaxPhyAddr      Cap = 185
	CapStealTime              Cap = 187
	CapX86UserSpaceMSR        Cap = 188
	CapX86MSRFilter           Cap = 189
	CapEnforcePVFeatureCPUID  Cap = 190
	CapDirtyLogRing           Cap = 192
	CapX86BusLockExit         Cap = 193
	CapSetGuestDebug2         Cap = 195
	CapSregs2                 Cap = 200
	CapExitHypercall          Cap = 201
	CapBinaryStatsFD          Cap = 203
	CapExitOnEmulationFailure Cap = 204
	CapVMGPABits              Cap = 207
	CapXSave2                 Cap = 208
	CapSysAttributes          Cap = 209
	CapPMUCapability          Cap = 212
	CapDisableQuirks2         Cap = 213
	CapVMTSCControl           Cap = 214
	CapSystemEventData        Cap = 215
	CapX86TripleFaultEvent    Cap = 218
	CapX86NotifyVMExit        Cap = 219
	CapVMDisableNXHugePages   Cap = 220
	CapDirtyLogRingAcqRel     Cap = 223
)

var capNames = map[Cap]string{
	CapIRQChip:                "KVM_CAP_IRQCHIP",
	CapHLT:                    "KVM_CAP_HLT",
	CapUserMemory:             "KVM_CAP_USER_MEMORY",
	CapSetTSSAddr:             "KVM_CAP_SET_TSS_ADDR",
	CapVAPIC:                  "KVM_CAP_VAPIC",
	CapExtCPUID:               "KVM_CAP_EXT_CPUID",
	CapClocksource:            "KVM_CAP_CLOCKSOURCE",
	CapNrVCPUs:                "KVM_CAP_NR_VCPUS",
	CapNrMemslots:             "KVM_CAP_NR_MEMSLOTS",
	CapPIT:                    "KVM_CAP_PIT",
	CapNopIODelay:             "KVM_CAP_NOP_IO_DELAY",
	CapMPState:                "KVM_CAP_MP_STATE",
	CapCoalescedMMIO:          "KVM_CAP_COALESCED_MMIO",
	CapSyncMMU:                "KVM_CAP_SYNC_MMU",
	CapUserNMI:                "KVM_CAP_USER_NMI",
	CapSetGuestDebug:          "KVM_CAP_SET_GUEST_DEBUG",
	CapReinjectControl:        "KVM_CAP_REINJECT_CONTROL",
	CapIRQRouting:             "KVM_CAP_IRQ_ROUTING",
	CapMCE:                    "KVM_CAP_MCE",
	CapIRQFD:                  "KVM_CAP_IRQFD",
	CapPIT2:                   "KVM_CAP_PIT2",
	CapPITState2:              "KVM_CAP_PIT_STATE2",
	CapIOEventFD:              "KVM_CAP_IOEVENTFD",
	CapSetIdentityMapAddr:     "KVM_CAP_SET_IDENTITY_MAP_ADDR",
	CapAdjustClock:            "KVM_CAP_ADJUST_CLOCK",
	CapInternalErrorData:      "KVM_CAP_INTERNAL_ERROR_DATA",
	CapVCPUEvents:             "KVM_CAP_VCPU_EVENTS",
	CapIntrShadow:             "KVM_CAP_INTR_SHADOW",
	CapDebugRegs:              "KVM_CAP_DEBUGREGS",
	CapX86RobustSinglestep:    "KVM_CAP_X86_ROBUST_SINGLESTEP",
	CapEnableCap:              "KVM_CAP_ENABLE_CAP",
	CapXSave:                  "KVM_CAP_XSAVE",
	CapXCRs:                   "KVM_CAP_XCRS",
	CapAsyncPF:                "KVM_CAP_ASYNC_PF",
	CapTSCControl:             "KVM_CAP_TSC_CONTROL",
	CapGetTSCKHz:              "KVM_CAP_GET_TSC_KHZ",
	CapMaxVCPUs:               "KVM_CAP_MAX_VCPUS",
	CapOneReg:                 "KVM_CAP_ONE_REG",
	CapTSCDeadlineTimer:       "KVM_CAP_TSC_DEADLINE_TIMER",
	CapSyncRegs:               "KVM_CAP_SYNC_REGS",
	CapKVMClockCtrl:           "KVM_CAP_KVMCLOCK_CTRL",
	CapSignalMSI:              "KVM_CAP_SIGNAL_MSI",
	CapReadonlyMem:            "KVM_CAP_READONLY_MEM",
	CapExtEmulCPUID:           "KVM_CAP_EXT_EMUL_CPUID",
	CapEnableCapVM:            "KVM_CAP_ENABLE_CAP_VM",
	CapCheckExtensionVM:       "KVM_CAP_CHECK_EXTENSION_VM",
	CapDisableQuirks:          "KVM_CAP_DISABLE_QUIRKS",
	CapX86SMM:                 "KVM_CAP_X86_SMM",
	CapMultiAddressSpace:      "KVM_CAP_MULTI_ADDRESS_SPACE",
	CapGuestDebugHWBPs:        "KVM_CAP_GUEST_DEBUG_HW_BPS",
	CapGuestDebugHWWPs:        "KVM_CAP_GUEST_DEBUG_HW_WPS",
	CapSplitIRQChip:           "KVM_CAP_SPLIT_IRQCHIP",
	CapMaxVCPUID:              "KVM_CAP_MAX_VCPU_ID",
	CapX2APICAPI:              "KVM_CAP_X2APIC_API",
	CapImmediateExit:          "KVM_CAP_IMMEDIATE_EXIT",
	CapX86DisableExits:        "KVM_CAP_X86_DISABLE_EXITS",
	CapGetMSRFeatures:         "KVM_CAP_GET_MSR_FEATURES",
	CapNestedState:            "KVM_CAP_NESTED_STATE",
	CapMSRPlatformInfo:        "KVM_CAP_MSR_PLATFORM_INFO",
	CapCoalescedPIO:           "KVM_CAP_COALESCED_PIO",
	CapExceptionPayload:       "KVM_CAP_EXCEPTION_PAYLOAD",
	CapManualDirtyLogProtect2: "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2",
	CapPMUEventFilter:         "KVM_CAP_PMU_EVENT_FILTER",
	CapHaltPoll:               "KVM_CAP_HALT_POLL",
	CapLastCPU:                "KVM_CAP_LAST_CPU",
	CapSmallerMaxPhyAddr:      "KVM_CAP_SMALLER_MAXPHYADDR",
	CapStealTime:              "KVM_CAP_STEAL_TIME",
	CapX86UserSpaceMSR:        "KVM_CAP_X86_USER_SPACE_MSR",
	CapX86MSRFilter:           "KVM_CAP_X86_MSR_FILTER",
	CapEnforcePVFeatureCPUID:  "KVM_CAP_ENFORCE_PV_FEATURE_CPUID",
	CapDirtyLogRing:           "KVM_CAP_DIRTY_LOG_RING",
	CapX86BusLockExit:         "KVM_CAP_X86_BUS_LOCK_EXIT",
	CapSetGuestDebug2:         "KVM_CAP_SET_GUEST_DEBUG2",
	CapSregs2:                 "KVM_CAP_SREGS2",
	CapExitHypercall:          "KVM_CAP_EXIT_HYPERCALL",
	CapBinaryStatsFD:          "KVM_CAP_BINARY_STATS_FD",
	CapExitOnEmulationFailure: "KVM_CAP_EXIT_ON_EMULATION_FAILURE",
	CapVMGPABits:              "KVM_CAP_VM_GPA_BITS",
	CapXSave2:                 "KVM_CAP_XSAVE2",
	CapSysAttributes:          "KVM_CAP_SYS_ATTRIBUTES",
	CapPMUCapability:          "KVM_CAP_PMU_CAPABILITY",
	CapDisableQuirks2:         "KVM_CAP_DISABLE_QUIRKS2",
	CapVMTSCControl:           "KVM_CAP_VM_TSC_CONTROL",
	CapSystemEventData:        "KVM_CAP_SYSTEM_EVENT_DATA",
	CapX86TripleFaultEvent:    "KVM_CAP_X86_TRIPLE_FAULT_EVENT",
	CapX86NotifyVMExit:        "KVM_CAP_X86_NOTIFY_VMEXIT",
	CapVMDisableNXHugePages:   "KVM_CAP_VM_DISABLE_NX_HUGE_PAGES",
	CapDirtyLogRingAcqRel:     "KVM_CAP_DIRTY_LOG_RING_ACQ_REL",
}

// String returns the kernel's name, e.g. "KVM_CAP_USER_MEMORY".
func (c Cap) String() string {
	if s, ok := capNames[c]; ok {
		return s
	}
	return "KVM_CAP_" + strconv.FormatUint(uint64(c), 10)
}

// MarshalText names the capability in JSON (KVM_CAP_...).
func (c Cap) MarshalText() ([]byte, error) { return []byte(c.String()), nil }
