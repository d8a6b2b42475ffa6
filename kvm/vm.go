package kvm

import (
	"fmt"
	"os"
	"sync"
	"unsafe"

	"golang.org/x/sys/unix"
)

// VM is a KVM virtual machine (the fd returned by KVM_CREATE_VM).
type VM struct {
	fd       int
	mmapSize int // KVM_GET_VCPU_MMAP_SIZE, needed to map each vCPU's kvm_run

	mu     sync.Mutex
	vcpus  []*VCPU
	slots  map[uint32]MemoryRegion // to size-check GetDirtyLog bitmaps
	closed bool
}

// pageSize is the granularity of KVM's dirty bitmap on x86 (4 KiB pages).
const pageSize = 4096

// Close closes every vCPU created from this VM (see VCPU.Close), then the VM.
// Guest memory stays mapped: it belongs to the caller.
func (vm *VM) Close() error {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	if vm.closed {
		return os.ErrClosed
	}
	vm.closed = true
	var first error
	for _, v := range vm.vcpus {
		if err := v.close(); err != nil && first == nil {
			first = err
		}
	}
	vm.vcpus = nil
	if err := unix.Close(vm.fd); err != nil && first == nil {
		first = wrap("close", err)
	}
	vm.fd = -1
	return first
}

// CheckExtension is KVM_CHECK_EXTENSION on the VM fd
// (KVM_CAP_CHECK_EXTENSION_VM): the answer for this VM, which can differ
// from the system-wide one (e.g. CapXSave2's size, CapNrMemslots).
func (vm *VM) CheckExtension(c Cap) (int, error) {
	v, err := ioctl(vm.fd, kvmCheckExtension, uintptr(c))
	return v, wrap("KVM_CHECK_EXTENSION", err)
}

// SetUserMemoryRegion is KVM_SET_USER_MEMORY_REGION. A MemorySize of 0
// deletes the slot.
func (vm *VM) SetUserMemoryRegion(r MemoryRegion) error {
	if _, err := ioctlPtr(vm.fd, kvmSetUserMemoryRegion, unsafe.Pointer(&r)); err != nil {
		return wrap("KVM_SET_USER_MEMORY_REGION", err)
	}
	vm.mu.Lock()
	if r.MemorySize == 0 {
		delete(vm.slots, r.Slot)
	} else {
		vm.slots[r.Slot] = r
	}
	vm.mu.Unlock()
	return nil
}

// SetTSSAddr is KVM_SET_TSS_ADDR: three pages of guest-physical space, not
// used by the guest, that Intel hosts need for real-mode emulation.
func (vm *VM) SetTSSAddr(addr uint64) error {
	_, err := ioctl(vm.fd, kvmSetTSSAddr, uintptr(addr))
	return wrap("KVM_SET_TSS_ADDR", err)
}

// SetIdentityMapAddr is KVM_SET_IDENTITY_MAP_ADDR: one page of
// guest-physical space for the identity page table Intel hosts use for
// unpaged guest mode. Must be called before creating vCPUs.
func (vm *VM) SetIdentityMapAddr(addr uint64) error {
	_, err := ioctlPtr(vm.fd, kvmSetIdentityMapAddr, unsafe.Pointer(&addr))
	return wrap("KVM_SET_IDENTITY_MAP_ADDR", err)
}

// EnableCap is KVM_ENABLE_CAP on the VM fd with up to four arguments.
func (vm *VM) EnableCap(c Cap, args ...uint64) error {
	if len(args) > 4 {
		return &Error{Op: "KVM_ENABLE_CAP", Err: fmt.Errorf("%v: %d arguments, at most 4", c, len(args))}
	}
	ec := enableCap{Cap: uint32(c)}
	copy(ec.Args[:], args)
	if _, err := ioctlPtr(vm.fd, kvmEnableCap, unsafe.Pointer(&ec)); err != nil {
		// Name the capability too: EINVAL alone does not say which one.
		return &Error{Op: "KVM_ENABLE_CAP", Err: fmt.Errorf("%v: %w", c, err)}
	}
	return nil
}

// EnableUserSpaceMSR enables KVM_CAP_X86_USER_SPACE_MSR: guest RDMSR/WRMSR
// that would fail for the given reasons (MSRExitReason* bits) exit with
// ExitX86RDMSR/ExitX86WRMSR instead of raising #GP.
func (vm *VM) EnableUserSpaceMSR(reasons uint64) error {
	return vm.EnableCap(CapX86UserSpaceMSR, reasons)
}

// SetMSRFilter is KVM_X86_SET_MSR_FILTER. An empty filter with
// MSRFilterDefaultAllow removes filtering.
func (vm *VM) SetMSRFilter(f MSRFilter) error {
	const op = "KVM_X86_SET_MSR_FILTER"
	if len(f.Ranges) > MSRFilterMaxRanges {
		return &Error{Op: op, Err: fmt.Errorf("%d ranges, at most %d", len(f.Ranges), MSRFilterMaxRanges)}
	}
	kf := msrFilter{Flags: f.Flags}
	for i, r := range f.Ranges {
		if need := (int(r.NMSRs) + 7) / 8; len(r.Bitmap) < need {
			return &Error{Op: op, Err: fmt.Errorf("range %d: bitmap has %d bytes, %d MSRs need %d", i, len(r.Bitmap), r.NMSRs, need)}
		}
		if r.NMSRs > MSRFilterMaxBitmapSize*8 {
			return &Error{Op: op, Err: fmt.Errorf("range %d: %d MSRs, at most %d", i, r.NMSRs, MSRFilterMaxBitmapSize*8)}
		}
		// The kernel copies BITS_TO_LONGS(nmsrs) longs, which can be more
		// bytes than the caller's bitmap holds; copy into a buffer of
		// exactly that size so it never reads past the slice.
		bm := make([]uint64, (r.NMSRs+63)/64)
		if len(bm) > 0 {
			copy(unsafe.Slice((*byte)(unsafe.Pointer(&bm[0])), len(bm)*8), r.Bitmap)
			kf.Ranges[i].Bitmap = unsafe.Pointer(&bm[0])
		}
		kf.Ranges[i].Flags = r.Flags
		kf.Ranges[i].NMSRs = r.NMSRs
		kf.Ranges[i].Base = r.Base
	}
	_, err := ioctlPtr(vm.fd, kvmX86SetMSRFilter, unsafe.Pointer(&kf))
	return wrap(op, err)
}

// GetDirtyLog is KVM_GET_DIRTY_LOG: it fills bitmap with one bit per 4 KiB
// page of the slot (bit i of bitmap[i/64] = page i, relative to the slot's
// GuestPhysAddr) for pages the guest wrote since the previous call, and
// resets the log. The slot must have been registered through this VM with
// MemLogDirtyPages; bitmap needs at least ceil(pages/64) words, which is
// checked because the kernel writes that much regardless.
func (vm *VM) GetDirtyLog(slot uint32, bitmap []uint64) error {
	const op = "KVM_GET_DIRTY_LOG"
	vm.mu.Lock()
	r, ok := vm.slots[slot]
	vm.mu.Unlock()
	if !ok {
		return &Error{Op: op, Err: fmt.Errorf("slot %d: %w", slot, unix.ENOENT)}
	}
	pages := (r.MemorySize + pageSize - 1) / pageSize
	if need := (pages + 63) / 64; uint64(len(bitmap)) < need {
		return &Error{Op: op, Err: fmt.Errorf("slot %d: bitmap has %d words, %d pages need %d", slot, len(bitmap), pages, need)}
	}
	dl := dirtyLog{Slot: slot, Bitmap: unsafe.Pointer(&bitmap[0])}
	_, err := ioctlPtr(vm.fd, kvmGetDirtyLog, unsafe.Pointer(&dl))
	return wrap(op, err)
}

// GetClock is KVM_GET_CLOCK (the VM's kvmclock).
func (vm *VM) GetClock(c *ClockData) error {
	_, err := ioctlPtr(vm.fd, kvmGetClock, unsafe.Pointer(c))
	return wrap("KVM_GET_CLOCK", err)
}

// SetClock is KVM_SET_CLOCK.
func (vm *VM) SetClock(c *ClockData) error {
	_, err := ioctlPtr(vm.fd, kvmSetClock, unsafe.Pointer(c))
	return wrap("KVM_SET_CLOCK", err)
}

// CreateVCPU creates vCPU id (KVM_CREATE_VCPU) and maps its kvm_run. The VM
// keeps track of it and closes it in VM.Close.
func (vm *VM) CreateVCPU(id int) (*VCPU, error) {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	if vm.closed {
		return nil, &Error{Op: "KVM_CREATE_VCPU", Err: os.ErrClosed}
	}
	fd, err := ioctl(vm.fd, kvmCreateVCPU, uintptr(id))
	if err != nil {
		return nil, wrap("KVM_CREATE_VCPU", err)
	}
	mem, err := unix.Mmap(fd, 0, vm.mmapSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		unix.Close(fd)
		return nil, wrap("mmap kvm_run", err)
	}
	v := &VCPU{
		fd:  fd,
		id:  id,
		vm:  vm,
		mem: mem,
		run: (*Run)(unsafe.Pointer(&mem[0])),
		pid: unix.Getpid(),
	}
	vm.vcpus = append(vm.vcpus, v)
	return v, nil
}

// forget drops a closed vCPU from the VM's list.
func (vm *VM) forget(v *VCPU) {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	for i, w := range vm.vcpus {
		if w == v {
			vm.vcpus = append(vm.vcpus[:i], vm.vcpus[i+1:]...)
			return
		}
	}
}
