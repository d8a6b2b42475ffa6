package kvm

import (
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// KickSignal is the signal Kick sends to the thread bound with BindThread.
//
// SIGURG is the one signal a Go program can send to its own threads without
// installing a handler or disturbing the runtime: the runtime already
// handles it (it is its asynchronous-preemption signal) and by design
// tolerates spurious ones, and signal.Notify users rarely want it. Any
// handled signal makes a blocked KVM_RUN return EINTR: KVM returns -EINTR,
// not -ERESTARTSYS, so the runtime's SA_RESTART does not restart it. Tests
// check both the ring-0 (emulated) and ring-3 (native) cases on this host.
const KickSignal = unix.SIGURG

// VCPU is a virtual CPU (the fd returned by KVM_CREATE_VCPU) with its mapped
// struct kvm_run.
type VCPU struct {
	fd  int
	id  int
	vm  *VM
	mem []byte // the whole KVM_GET_VCPU_MMAP_SIZE mapping
	run *Run   // = &mem[0]
	pid int

	tid    atomic.Int32 // bound thread for Kick; 0 = none
	kickMu sync.Mutex   // orders Kick against close (munmap)
	closed bool         // under kickMu
}

// ID returns the vCPU id given to CreateVCPU.
func (v *VCPU) ID() int { return v.id }

// Close unmaps kvm_run and closes the vCPU. Any goroutine still inside Run
// or using RunData/IOData must have stopped first.
func (v *VCPU) Close() error {
	v.kickMu.Lock()
	if v.closed {
		v.kickMu.Unlock()
		return os.ErrClosed
	}
	v.kickMu.Unlock()
	err := v.close()
	v.vm.forget(v)
	return err
}

// close is Close without the VM bookkeeping (VM.Close holds the VM lock).
func (v *VCPU) close() error {
	v.kickMu.Lock()
	defer v.kickMu.Unlock()
	if v.closed {
		return nil
	}
	v.closed = true
	var first error
	if err := unix.Munmap(v.mem); err != nil {
		first = wrap("munmap kvm_run", err)
	}
	v.mem, v.run = nil, nil
	if err := unix.Close(v.fd); err != nil && first == nil {
		first = wrap("close", err)
	}
	v.fd = -1
	return first
}

// Run enters the guest (KVM_RUN) and returns why it stopped; details are in
// RunData(). It does not allocate, lock or log: it is the per-exit hot path.
//
// A host-side interruption (a signal such as Kick's, or ImmediateExit set)
// returns (ExitIntr, nil). Run leaves ImmediateExit as it found it: while it
// is set every Run returns ExitIntr at once, so the caller clears it (see
// ClearImmediateExit) when it has acted on the kick. Other failures are
// returned as an *Error with Op "KVM_RUN".
//
// ExitIntr also happens without a Kick: the Go runtime sends its own SIGURG
// to preempt goroutines (asynchronous preemption; GODEBUG=asyncpreemptoff=1
// turns it off), and now and then one lands during KVM_RUN. It is a host-side
// event; the caller simply calls Run again. A Kick is recognisable by
// RunData().ImmediateExit being set, which only Kick does.
func (v *VCPU) Run() (ExitReason, error) {
	_, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(v.fd), kvmRun, 0)
	if e != 0 {
		if e == unix.EINTR {
			return ExitIntr, nil
		}
		return ExitUnknown, &Error{Op: "KVM_RUN", Err: e}
	}
	return v.run.ExitReason, nil
}

// RunData returns the vCPU's struct kvm_run, shared with the kernel.
func (v *VCPU) RunData() *Run { return v.run }

// IOData returns the data of the current KVM_EXIT_IO as a slice of the shared
// mapping (Size*Count bytes at DataOffset), without copying: for OUT it holds
// what the guest wrote; for IN, fill it before the next Run. It returns nil
// if the kernel's offset and length do not fit the mapping.
func (v *VCPU) IOData() []byte {
	io := v.run.IO()
	off := io.DataOffset
	n := uint64(io.Size) * uint64(io.Count)
	if off > uint64(len(v.mem)) || n > uint64(len(v.mem))-off {
		return nil
	}
	return v.mem[off : off+n : off+n]
}

// BindThread records the calling OS thread as the one Kick signals. Call it
// from the goroutine that calls Run, after runtime.LockOSThread, and
// UnbindThread before that goroutine unlocks its thread.
func (v *VCPU) BindThread() { v.tid.Store(int32(unix.Gettid())) }

// UnbindThread forgets the bound thread; Kick then only sets ImmediateExit.
func (v *VCPU) UnbindThread() { v.tid.Store(0) }

// Kick makes the vCPU's current or next Run return ExitIntr soon. Safe from
// any goroutine. It sets ImmediateExit (covering a Run that is about to
// start) and then sends KickSignal to the bound thread (covering a Run
// already inside the guest). If the signal reaches the thread outside
// KVM_RUN the runtime ignores it, and ImmediateExit stops the next Run.
// After Close it does nothing.
func (v *VCPU) Kick() {
	v.kickMu.Lock()
	defer v.kickMu.Unlock()
	if v.closed {
		return
	}
	setImmediateExit(v.run, 1)
	if tid := v.tid.Load(); tid != 0 {
		// ESRCH (thread gone) is the only plausible failure, and then there
		// is no Run to interrupt: ignore it.
		_ = unix.Tgkill(v.pid, int(tid), KickSignal)
	}
}

// Refresh makes KVM rewrite kvm_run's status fields (if_flag,
// ready_for_interrupt_injection, cr8, apic_base) from the vCPU's current
// state without entering the guest: one KVM_RUN with ImmediateExit set,
// which returns EINTR at once. After state was set (KVM_SET_REGS and the
// rest) these fields still describe the state replaced until the next
// KVM_RUN. Call it on the bound thread; it leaves ImmediateExit clear, so a
// Kick that arrives during the call is absorbed by it.
func (v *VCPU) Refresh() error {
	setImmediateExit(v.run, 1)
	reason, err := v.Run()
	setImmediateExit(v.run, 0)
	if err != nil {
		return fmt.Errorf("KVM_RUN (refresh): %w", err)
	}
	if reason != ExitIntr {
		return fmt.Errorf("KVM_RUN (refresh): with immediate_exit set it returned %v, not EINTR", reason)
	}
	return nil
}

// ClearImmediateExit resets ImmediateExit so the next Run enters the guest
// again. It is atomic with respect to a concurrent Kick.
func (v *VCPU) ClearImmediateExit() { setImmediateExit(v.run, 0) }

// setImmediateExit stores one byte of kvm_run's first word with a
// compare-and-swap on the whole aligned word: Go has no 8-bit atomic store,
// and a plain store from Kick's goroutine would race (in the Go memory model)
// with the vCPU thread writing RequestInterruptWindow, the byte next to it.
func setImmediateExit(r *Run, val uint8) {
	w := (*uint32)(unsafe.Pointer(r)) // bytes 0-3: request_interrupt_window, immediate_exit, padding
	const shift = 8                   // immediate_exit is byte 1 (little-endian)
	for {
		old := atomic.LoadUint32(w)
		nw := old&^(0xff<<shift) | uint32(val)<<shift
		if atomic.CompareAndSwapUint32(w, old, nw) {
			return
		}
	}
}

// Interrupt queues an external interrupt vector (KVM_INTERRUPT), for VMs
// without an in-kernel irqchip. It is taken on the next entry if the guest
// can accept it (RunData().ReadyForInterruptInjection); otherwise request an
// interrupt window first.
func (v *VCPU) Interrupt(vector uint8) error {
	irq := interrupt{IRQ: uint32(vector)}
	_, err := ioctlPtr(v.fd, kvmInterrupt, unsafe.Pointer(&irq))
	return wrap("KVM_INTERRUPT", err)
}

// NMI queues a non-maskable interrupt (KVM_NMI).
func (v *VCPU) NMI() error {
	_, err := ioctl(v.fd, kvmNMI, 0)
	return wrap("KVM_NMI", err)
}

// GetRegs reads the general-purpose registers (KVM_GET_REGS) into r.
func (v *VCPU) GetRegs(r *Regs) error {
	_, err := ioctlPtr(v.fd, kvmGetRegs, unsafe.Pointer(r))
	return wrap("KVM_GET_REGS", err)
}

// SetRegs writes the general-purpose registers (KVM_SET_REGS).
func (v *VCPU) SetRegs(r *Regs) error {
	_, err := ioctlPtr(v.fd, kvmSetRegs, unsafe.Pointer(r))
	return wrap("KVM_SET_REGS", err)
}

// GetSregs reads the special registers (KVM_GET_SREGS) into s.
func (v *VCPU) GetSregs(s *Sregs) error {
	_, err := ioctlPtr(v.fd, kvmGetSregs, unsafe.Pointer(s))
	return wrap("KVM_GET_SREGS", err)
}

// SetSregs writes the special registers (KVM_SET_SREGS).
func (v *VCPU) SetSregs(s *Sregs) error {
	_, err := ioctlPtr(v.fd, kvmSetSregs, unsafe.Pointer(s))
	return wrap("KVM_SET_SREGS", err)
}

// GetFPU reads the x87/SSE state (KVM_GET_FPU) into f.
func (v *VCPU) GetFPU(f *FPU) error {
	_, err := ioctlPtr(v.fd, kvmGetFPU, unsafe.Pointer(f))
	return wrap("KVM_GET_FPU", err)
}

// SetFPU writes the x87/SSE state (KVM_SET_FPU).
func (v *VCPU) SetFPU(f *FPU) error {
	_, err := ioctlPtr(v.fd, kvmSetFPU, unsafe.Pointer(f))
	return wrap("KVM_SET_FPU", err)
}

// GetXSave reads the XSAVE area (KVM_GET_XSAVE) into x.
func (v *VCPU) GetXSave(x *XSave) error {
	_, err := ioctlPtr(v.fd, kvmGetXSave, unsafe.Pointer(x))
	return wrap("KVM_GET_XSAVE", err)
}

// SetXSave writes the XSAVE area (KVM_SET_XSAVE).
func (v *VCPU) SetXSave(x *XSave) error {
	_, err := ioctlPtr(v.fd, kvmSetXSave, unsafe.Pointer(x))
	return wrap("KVM_SET_XSAVE", err)
}

// GetXCRs reads the extended control registers (KVM_GET_XCRS) into x.
func (v *VCPU) GetXCRs(x *XCRs) error {
	_, err := ioctlPtr(v.fd, kvmGetXCRs, unsafe.Pointer(x))
	return wrap("KVM_GET_XCRS", err)
}

// SetXCRs writes the extended control registers (KVM_SET_XCRS).
func (v *VCPU) SetXCRs(x *XCRs) error {
	_, err := ioctlPtr(v.fd, kvmSetXCRs, unsafe.Pointer(x))
	return wrap("KVM_SET_XCRS", err)
}

// GetVCPUEvents reads pending/injected events (KVM_GET_VCPU_EVENTS) into e.
func (v *VCPU) GetVCPUEvents(e *VCPUEvents) error {
	_, err := ioctlPtr(v.fd, kvmGetVCPUEvents, unsafe.Pointer(e))
	return wrap("KVM_GET_VCPU_EVENTS", err)
}

// SetVCPUEvents writes events (KVM_SET_VCPU_EVENTS); e.Flags says which
// optional parts are valid.
func (v *VCPU) SetVCPUEvents(e *VCPUEvents) error {
	_, err := ioctlPtr(v.fd, kvmSetVCPUEvents, unsafe.Pointer(e))
	return wrap("KVM_SET_VCPU_EVENTS", err)
}

// GetDebugRegs reads DR0-3, DR6, DR7 (KVM_GET_DEBUGREGS) into d.
func (v *VCPU) GetDebugRegs(d *DebugRegs) error {
	_, err := ioctlPtr(v.fd, kvmGetDebugRegs, unsafe.Pointer(d))
	return wrap("KVM_GET_DEBUGREGS", err)
}

// SetDebugRegs writes DR0-3, DR6, DR7 (KVM_SET_DEBUGREGS).
func (v *VCPU) SetDebugRegs(d *DebugRegs) error {
	_, err := ioctlPtr(v.fd, kvmSetDebugRegs, unsafe.Pointer(d))
	return wrap("KVM_SET_DEBUGREGS", err)
}

// GetMPState reads the multiprocessing state (KVM_GET_MP_STATE) into m.
func (v *VCPU) GetMPState(m *MPState) error {
	_, err := ioctlPtr(v.fd, kvmGetMPState, unsafe.Pointer(m))
	return wrap("KVM_GET_MP_STATE", err)
}

// SetMPState writes the multiprocessing state (KVM_SET_MP_STATE).
func (v *VCPU) SetMPState(m *MPState) error {
	_, err := ioctlPtr(v.fd, kvmSetMPState, unsafe.Pointer(m))
	return wrap("KVM_SET_MP_STATE", err)
}

// SetGuestDebug is KVM_SET_GUEST_DEBUG (single-step, breakpoints).
func (v *VCPU) SetGuestDebug(d *GuestDebug) error {
	_, err := ioctlPtr(v.fd, kvmSetGuestDebug, unsafe.Pointer(d))
	return wrap("KVM_SET_GUEST_DEBUG", err)
}

// Translate is KVM_TRANSLATE: it walks the guest's page tables for
// t.LinearAddress and fills in the rest of t.
func (v *VCPU) Translate(t *Translation) error {
	_, err := ioctlPtr(v.fd, kvmTranslate, unsafe.Pointer(t))
	return wrap("KVM_TRANSLATE", err)
}

// GetTSCKHz returns the guest TSC frequency (KVM_GET_TSC_KHZ).
func (v *VCPU) GetTSCKHz() (uint32, error) {
	khz, err := ioctl(v.fd, kvmGetTSCKHz, 0)
	return uint32(khz), wrap("KVM_GET_TSC_KHZ", err)
}

// SetTSCKHz sets the guest TSC frequency (KVM_SET_TSC_KHZ).
func (v *VCPU) SetTSCKHz(khz uint32) error {
	_, err := ioctl(v.fd, kvmSetTSCKHz, uintptr(khz))
	return wrap("KVM_SET_TSC_KHZ", err)
}

// SetCPUID2 sets the CPUID leaves the guest sees (KVM_SET_CPUID2). Call it
// before the first Run.
func (v *VCPU) SetCPUID2(entries []CPUIDEntry) error {
	buf := newCPUID2Buf(len(entries))
	_, ents := cpuid2View(buf)
	for i, e := range entries {
		ents[i] = cpuidEntry2{Function: e.Function, Index: e.Index, Flags: e.Flags,
			Eax: e.Eax, Ebx: e.Ebx, Ecx: e.Ecx, Edx: e.Edx}
	}
	_, err := ioctlPtr(v.fd, kvmSetCPUID2, unsafe.Pointer(&buf[0]))
	return wrap("KVM_SET_CPUID2", err)
}

// GetCPUID2 returns the CPUID leaves set on this vCPU (KVM_GET_CPUID2).
func (v *VCPU) GetCPUID2() ([]CPUIDEntry, error) {
	return getCPUID(v.fd, kvmGetCPUID2, "KVM_GET_CPUID2")
}

// GetMSRs reads the MSRs named by entries[i].Index into entries[i].Data
// (KVM_GET_MSRS). It returns how many were read; they are processed in
// order and KVM stops at the first it refuses, in which case the error is an
// *Error wrapping an *MSRError naming that MSR.
func (v *VCPU) GetMSRs(entries []MSREntry) (int, error) {
	return msrIO(v.fd, kvmGetMSRs, "KVM_GET_MSRS", entries, true)
}

// SetMSRs writes entries (KVM_SET_MSRS); results as for GetMSRs.
func (v *VCPU) SetMSRs(entries []MSREntry) (int, error) {
	return msrIO(v.fd, kvmSetMSRs, "KVM_SET_MSRS", entries, false)
}

// MSRError reports the MSR at which KVM_GET_MSRS/KVM_SET_MSRS stopped.
type MSRError struct {
	Index       uint32
	Done, Total int
}

func (e *MSRError) Error() string {
	return fmt.Sprintf("MSR %#x not accepted (%d of %d done)", e.Index, e.Done, e.Total)
}

// msrIO builds a struct kvm_msrs (header + kvm_msr_entry array) in a
// []uint64, which gives the alignment both need, runs the ioctl and copies
// results back. The allocation is acceptable: MSR access is not per-exit.
func msrIO(fd int, req uintptr, op string, entries []MSREntry, read bool) (int, error) {
	if len(entries) == 0 {
		return 0, nil
	}
	const entryWords = int(unsafe.Sizeof(msrEntry{}) / 8)
	buf := make([]uint64, 1+len(entries)*entryWords)
	(*msrsHeader)(unsafe.Pointer(&buf[0])).NMSRs = uint32(len(entries))
	ents := unsafe.Slice((*msrEntry)(unsafe.Pointer(&buf[1])), len(entries))
	for i, e := range entries {
		ents[i] = msrEntry{Index: e.Index, Data: e.Data}
	}
	n, err := ioctlPtr(fd, req, unsafe.Pointer(&buf[0]))
	if err != nil {
		return 0, wrap(op, err)
	}
	if read {
		for i := 0; i < n && i < len(entries); i++ {
			entries[i].Data = ents[i].Data
		}
	}
	if n < len(entries) {
		return n, &Error{Op: op, Err: &MSRError{Index: entries[n].Index, Done: n, Total: len(entries)}}
	}
	return n, nil
}
