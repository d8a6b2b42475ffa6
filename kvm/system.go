// Package kvm is a typed wrapper over the Linux KVM API (/dev/kvm) for
// x86_64. It is the only package of ftkvm that issues KVM ioctls.
//
// The model is the standard library's os package: values own their file
// descriptors (which never leak out), every method maps to one ioctl, and
// every error is an *Error naming that ioctl as linux/kvm.h spells it.
// Structures are the kernel's own layouts (asserted by tests), so nothing is
// marshalled on the way in or out.
//
// Ownership: a System, VM and VCPU are independent kernel objects once
// created (a VM keeps working after its System is closed). VM.Close also
// closes every VCPU created from it. Guest memory is never owned by this
// package: the caller maps it, registers it with VM.SetUserMemoryRegion, and
// unmaps it after VM.Close.
//
// Concurrency: a VCPU's methods must be called from one goroutine at a time
// (normally its own locked OS thread), except Kick, which any goroutine may
// call. VM and System methods may be called concurrently, except Close.
package kvm

import (
	"errors"
	"fmt"
	"os"
	"unsafe"

	"golang.org/x/sys/unix"
)

// APIVersion is the only KVM API version there has ever been (KVM_API_VERSION).
const APIVersion = 12

// System is an open /dev/kvm.
type System struct {
	fd int
}

// Open opens the KVM device (usually "/dev/kvm") and checks that it speaks
// API version 12, as Documentation/virt/kvm/api.rst requires callers to do.
func Open(path string) (*System, error) {
	fd, err := unix.Open(path, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, &os.PathError{Op: "open", Path: path, Err: err}
	}
	s := &System{fd: fd}
	v, err := s.APIVersion()
	if err != nil {
		s.Close()
		return nil, err
	}
	if v != APIVersion {
		s.Close()
		return nil, &Error{Op: "KVM_GET_API_VERSION", Err: fmt.Errorf("API version %d, want %d", v, APIVersion)}
	}
	return s, nil
}

// Close closes /dev/kvm. VMs already created keep working.
func (s *System) Close() error {
	if s.fd < 0 {
		return os.ErrClosed
	}
	err := unix.Close(s.fd)
	s.fd = -1
	return wrap("close", err)
}

// APIVersion returns KVM_GET_API_VERSION (always 12 on any real kernel).
func (s *System) APIVersion() (int, error) {
	v, err := ioctl(s.fd, kvmGetAPIVersion, 0)
	return v, wrap("KVM_GET_API_VERSION", err)
}

// CheckExtension returns KVM_CHECK_EXTENSION for c: 0 if unsupported,
// otherwise 1 or a capability-specific value (e.g. a count or bitmask).
func (s *System) CheckExtension(c Cap) (int, error) {
	v, err := ioctl(s.fd, kvmCheckExtension, uintptr(c))
	return v, wrap("KVM_CHECK_EXTENSION", err)
}

// VCPUMmapSize returns KVM_GET_VCPU_MMAP_SIZE, the size of the shared
// kvm_run region (kvm_run itself plus the PIO data page and more).
func (s *System) VCPUMmapSize() (int, error) {
	v, err := ioctl(s.fd, kvmGetVCPUMmapSize, 0)
	return v, wrap("KVM_GET_VCPU_MMAP_SIZE", err)
}

// SupportedCPUID returns KVM_GET_SUPPORTED_CPUID: the CPUID leaves KVM can
// present to a guest, a starting point for VCPU.SetCPUID2.
func (s *System) SupportedCPUID() ([]CPUIDEntry, error) {
	return getCPUID(s.fd, kvmGetSupportedCPUID, "KVM_GET_SUPPORTED_CPUID")
}

// getCPUID runs a kvm_cpuid2-returning ioctl, growing the buffer on E2BIG.
func getCPUID(fd int, req uintptr, op string) ([]CPUIDEntry, error) {
	for n := 256; ; n *= 2 {
		buf := newCPUID2Buf(n)
		_, err := ioctlPtr(fd, req, unsafe.Pointer(&buf[0]))
		if errors.Is(err, unix.E2BIG) && n < 1<<16 {
			continue
		}
		if err != nil {
			return nil, wrap(op, err)
		}
		hdr, ents := cpuid2View(buf)
		out := make([]CPUIDEntry, hdr.Nent)
		for i := range out {
			e := &ents[i]
			out[i] = CPUIDEntry{e.Function, e.Index, e.Flags, e.Eax, e.Ebx, e.Ecx, e.Edx}
		}
		return out, nil
	}
}

// newCPUID2Buf allocates a struct kvm_cpuid2 with room for n entries.
// []uint64 gives the 8-byte alignment the header needs; 40-byte entries keep
// the size a multiple of 8.
func newCPUID2Buf(n int) []uint64 {
	const words = unsafe.Sizeof(cpuidEntry2{}) / 8
	buf := make([]uint64, 1+n*int(words))
	(*cpuid2)(unsafe.Pointer(&buf[0])).Nent = uint32(n)
	return buf
}

func cpuid2View(buf []uint64) (*cpuid2, []cpuidEntry2) {
	hdr := (*cpuid2)(unsafe.Pointer(&buf[0]))
	n := (len(buf) - 1) * 8 / int(unsafe.Sizeof(cpuidEntry2{}))
	return hdr, unsafe.Slice((*cpuidEntry2)(unsafe.Pointer(&buf[1])), n)
}

// MSRIndexList returns KVM_GET_MSR_INDEX_LIST: the MSRs KVM saves and
// restores for a guest (what a checkpoint must capture with GetMSRs).
func (s *System) MSRIndexList() ([]uint32, error) {
	return s.msrList(kvmGetMSRIndexList, "KVM_GET_MSR_INDEX_LIST")
}

// MSRFeatureIndexList returns KVM_GET_MSR_FEATURE_INDEX_LIST
// (KVM_CAP_GET_MSR_FEATURES): the feature MSRs KVM can report.
func (s *System) MSRFeatureIndexList() ([]uint32, error) {
	return s.msrList(kvmGetMSRFeatureIndexList, "KVM_GET_MSR_FEATURE_INDEX_LIST")
}

func (s *System) msrList(req uintptr, op string) ([]uint32, error) {
	// The first call with room for nothing fails with E2BIG and reports the
	// count; loop in case the list grows in between.
	n := 0
	for {
		buf := make([]uint32, 1+n)
		buf[0] = uint32(n)
		_, err := ioctlPtr(s.fd, req, unsafe.Pointer(&buf[0]))
		if errors.Is(err, unix.E2BIG) && int(buf[0]) > n {
			n = int(buf[0])
			continue
		}
		if err != nil {
			return nil, wrap(op, err)
		}
		return buf[1 : 1+buf[0]], nil
	}
}

// GetMSRFeatures reads feature MSRs (KVM_GET_MSRS on /dev/kvm) into
// entries[i].Data; see VCPU.GetMSRs for the result convention.
func (s *System) GetMSRFeatures(entries []MSREntry) (int, error) {
	return msrIO(s.fd, kvmGetMSRs, "KVM_GET_MSRS", entries, true)
}

// CreateVM creates a VM (KVM_CREATE_VM, default machine type).
func (s *System) CreateVM() (*VM, error) {
	size, err := s.VCPUMmapSize()
	if err != nil {
		return nil, err
	}
	if size < int(unsafe.Sizeof(Run{})) {
		return nil, &Error{Op: "KVM_GET_VCPU_MMAP_SIZE", Err: fmt.Errorf("size %d smaller than struct kvm_run", size)}
	}
	var fd int
	for {
		fd, err = ioctl(s.fd, kvmCreateVM, 0)
		// KVM_CREATE_VM can fail with EINTR when a signal arrives while it
		// sets up the MMU; it has no side effect then, so retry.
		if !errors.Is(err, unix.EINTR) {
			break
		}
	}
	if err != nil {
		return nil, wrap("KVM_CREATE_VM", err)
	}
	// The kernel creates VM and vCPU fds with O_CLOEXEC already.
	return &VM{fd: fd, mmapSize: size, slots: make(map[uint32]MemoryRegion)}, nil
}
