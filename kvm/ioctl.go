package kvm

import (
	"unsafe"

	"golang.org/x/sys/unix"
)

// Error is returned by every failing call in this package. Op names the
// ioctl (or system call) that failed, exactly as linux/kvm.h spells it, so a
// log line alone tells which request the kernel refused; Err is usually a
// unix.Errno and can be tested with errors.Is (e.g. errors.Is(err, unix.EINVAL)).
type Error struct {
	Op  string
	Err error
}

func (e *Error) Error() string { return e.Op + ": " + e.Err.Error() }

// Unwrap lets errors.Is/As see the errno.
func (e *Error) Unwrap() error { return e.Err }

// The ioctl number encoding of asm-generic/ioctl.h, which x86_64 uses:
// bits 0-7 number, 8-15 type, 16-29 argument size, 30-31 direction.
const (
	iocNone  = 0
	iocWrite = 1
	iocRead  = 2

	iocNRShift   = 0
	iocTypeShift = 8
	iocSizeShift = 16
	iocDirShift  = 30
	iocSizeMask  = 1<<14 - 1

	kvmio = 0xAE // KVMIO
)

func ioc(dir, nr, size uintptr) uintptr {
	// A size that does not fit the 14-bit field would silently produce a
	// different request number; that is a programming error in this file.
	if size > iocSizeMask {
		panic("kvm: ioctl argument too large for the size field")
	}
	return dir<<iocDirShift | kvmio<<iocTypeShift | nr<<iocNRShift | size<<iocSizeShift
}

func _IO(nr uintptr) uintptr         { return ioc(iocNone, nr, 0) }
func _IOR(nr, size uintptr) uintptr  { return ioc(iocRead, nr, size) }
func _IOW(nr, size uintptr) uintptr  { return ioc(iocWrite, nr, size) }
func _IOWR(nr, size uintptr) uintptr { return ioc(iocRead|iocWrite, nr, size) }

// Request numbers, derived from the Go mirrors of the kernel structs so that a
// layout mistake shows up as a wrong number in the unit test as well.
var (
	kvmGetAPIVersion          = _IO(0x00)
	kvmCreateVM               = _IO(0x01)
	kvmGetMSRIndexList        = _IOWR(0x02, unsafe.Sizeof(msrList{}))
	kvmCheckExtension         = _IO(0x03)
	kvmGetVCPUMmapSize        = _IO(0x04)
	kvmGetSupportedCPUID      = _IOWR(0x05, unsafe.Sizeof(cpuid2{}))
	kvmGetMSRFeatureIndexList = _IOWR(0x0a, unsafe.Sizeof(msrList{}))
	kvmSetUserMemoryRegion    = _IOW(0x46, unsafe.Sizeof(MemoryRegion{}))
	kvmSetTSSAddr             = _IO(0x47)
	kvmSetIdentityMapAddr     = _IOW(0x48, unsafe.Sizeof(uint64(0)))
	kvmCreateVCPU             = _IO(0x41)
	kvmGetDirtyLog            = _IOW(0x42, unsafe.Sizeof(dirtyLog{}))
	kvmSetClock               = _IOW(0x7b, unsafe.Sizeof(ClockData{}))
	kvmGetClock               = _IOR(0x7c, unsafe.Sizeof(ClockData{}))
	kvmEnableCap              = _IOW(0xa3, unsafe.Sizeof(enableCap{}))
	kvmX86SetMSRFilter        = _IOW(0xc6, unsafe.Sizeof(msrFilter{}))
	kvmRun                    = _IO(0x80)
	kvmGetRegs                = _IOR(0x81, unsafe.Sizeof(Regs{}))
	kvmSetRegs                = _IOW(0x82, unsafe.Sizeof(Regs{}))
	kvmGetSregs               = _IOR(0x83, unsafe.Sizeof(Sregs{}))
	kvmSetSregs               = _IOW(0x84, unsafe.Sizeof(Sregs{}))
	kvmTranslate              = _IOWR(0x85, unsafe.Sizeof(Translation{}))
	kvmInterrupt              = _IOW(0x86, unsafe.Sizeof(interrupt{}))
	kvmGetMSRs                = _IOWR(0x88, unsafe.Sizeof(msrsHeader{}))
	kvmSetMSRs                = _IOW(0x89, unsafe.Sizeof(msrsHeader{}))
	kvmGetFPU                 = _IOR(0x8c, unsafe.Sizeof(FPU{}))
	kvmSetFPU                 = _IOW(0x8d, unsafe.Sizeof(FPU{}))
	kvmSetCPUID2              = _IOW(0x90, unsafe.Sizeof(cpuid2{}))
	kvmGetCPUID2              = _IOWR(0x91, unsafe.Sizeof(cpuid2{}))
	kvmGetMPState             = _IOR(0x98, unsafe.Sizeof(MPState{}))
	kvmSetMPState             = _IOW(0x99, unsafe.Sizeof(MPState{}))
	kvmNMI                    = _IO(0x9a)
	kvmSetGuestDebug          = _IOW(0x9b, unsafe.Sizeof(GuestDebug{}))
	kvmGetVCPUEvents          = _IOR(0x9f, unsafe.Sizeof(VCPUEvents{}))
	kvmSetVCPUEvents          = _IOW(0xa0, unsafe.Sizeof(VCPUEvents{}))
	kvmGetDebugRegs           = _IOR(0xa1, unsafe.Sizeof(DebugRegs{}))
	kvmSetDebugRegs           = _IOW(0xa2, unsafe.Sizeof(DebugRegs{}))
	kvmSetTSCKHz              = _IO(0xa2)
	kvmGetTSCKHz              = _IO(0xa3)
	kvmGetXSave               = _IOR(0xa4, unsafe.Sizeof(XSave{}))
	kvmSetXSave               = _IOW(0xa5, unsafe.Sizeof(XSave{}))
	kvmGetXCRs                = _IOR(0xa6, unsafe.Sizeof(XCRs{}))
	kvmSetXCRs                = _IOW(0xa7, unsafe.Sizeof(XCRs{}))
)

// ioctl issues a request whose argument is a plain integer (or nothing).
// The result is the ioctl's non-negative return value.
func ioctl(fd int, req, arg uintptr) (int, error) {
	r, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), req, arg)
	if e != 0 {
		return 0, e
	}
	return int(r), nil
}

// ioctlPtr issues a request whose argument is a pointer. Taking p as an
// unsafe.Pointer (not a uintptr) keeps the pointee alive and unmoved for the
// duration of the call, as the unsafe.Pointer rules require.
func ioctlPtr(fd int, req uintptr, p unsafe.Pointer) (int, error) {
	r, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), req, uintptr(p))
	if e != 0 {
		return 0, e
	}
	return int(r), nil
}

// wrap names the failing ioctl; nil stays nil.
func wrap(op string, err error) error {
	if err == nil {
		return nil
	}
	return &Error{Op: op, Err: err}
}
