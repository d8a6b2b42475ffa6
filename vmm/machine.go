// Package vmm is the machine: guest memory, one vCPU, its exit loop and
// dispatch, the device buses, and the environment seam through which every
// nondeterministic input reaches the guest.
package vmm

import (
	"errors"
	"fmt"
	"io"
	"os"
	"sync/atomic"
	"time"

	"github.com/ftkvm/ftkvm/devices"
	"github.com/ftkvm/ftkvm/guest"
	"github.com/ftkvm/ftkvm/kvm"
	"github.com/ftkvm/ftkvm/vmm/snapshot"
)

// Config describes a guest.
type Config struct {
	Kernel  []byte // PVH ELF or bzImage
	Initrd  []byte
	Cmdline string
	MemSize uint64 // bytes, a multiple of 2 MiB

	Console io.Writer   // UART output
	Env     Environment // nil: a LiveEnv with no input
	// WallClock is the RTC's time at virtual time zero. It is an input of
	// the environment too: replicas agree on it at the handshake.
	WallClock time.Time
	// KVMPath is the KVM device, "/dev/kvm" if empty.
	KVMPath string
	// Epoch is how positions in the guest's execution are measured
	// (epoch.go): EpochExit (the zero value) counts guest-caused exits,
	// EpochStep single-steps every instruction.
	Epoch EpochClock
	// Windows says whether the vCPU loop requests interrupt windows
	// (quirks.go). WindowsAuto decides by measuring this KVM; replicas set
	// it explicitly, to the primary's decision (ft/doc.go, "Handshake").
	Windows Windows
	// Disks are virtio-blk devices, in order (virtio.go).
	Disks []Disk
	// NICs are virtio-net devices, in order, after the disks (net.go).
	NICs []NIC

	empty bool // NewEmpty: NICs without a MAC adopt the installed state's
}

// Stats counts what the vCPU loop did; it is part of a snapshot's machine
// state (snapshot.Stats documents the fields).
type Stats = snapshot.Stats

// Machine is one guest with one vCPU.
type Machine struct {
	sys   *kvm.System
	vm    *kvm.VM
	vcpu  *kvm.VCPU
	kvcpu *kvm.VCPU // = vcpu, never cleared: Kick is safe after Close
	run   *kvm.Run
	mem   *Memory
	env   Environment

	pio, mmio *devices.Bus
	pic       *devices.PIC
	pit       *devices.PIT
	uart      *devices.UART
	rtc       *devices.RTC
	reset     *devices.ResetControl
	i8042     *devices.I8042
	debugExit *devices.DebugExit
	acpiPM    *devices.ACPIPM
	virtio    []*virtioDev
	nics      []*virtioDev // the network interfaces among virtio, in Config.NICs order

	// tscOffset makes the guest's TSC MSR read tscOffset + virtual ns.
	tscOffset uint64

	cpuid      []kvm.CPUIDEntry // what the vCPU was given
	msrIndices []uint32         // the MSRs a capture saves (probed)

	// noWindows: never request interrupt windows, because this KVM
	// emulates ring 0 and its window exits are host-timed (quirks.go).
	noWindows bool

	// installed is false for a machine from NewEmpty until Install.
	installed bool
	// halted: the guest waits in HLT for an interrupt (see Run).
	halted bool
	// quiescent: the last KVM_RUN returned EINTR, so KVM holds no
	// half-done instruction (a port read whose value user space has not
	// given back yet, say). State can be read or set only then.
	quiescent bool

	stopped    bool
	exitStatus int
	stopReason string
	stopErr    error

	ctl control
	dl  dirtyLog

	point Point // the current delivery point
	Stats Stats

	step *stepper // the step clock's state; nil with the exit clock

	prof  profile       // the exit profile (profile.go); vCPU thread only
	kicks atomic.Uint64 // kicks requested (kick), from any goroutine
}

// Exit statuses that are not the guest's own debug-exit byte.
const (
	StatusReset = 0 // the guest asked for a reset; ftkvm has no reboot, it stops
)

// New creates the VM, loads the kernel and wires the devices. On error
// everything acquired is released.
func New(cfg Config) (_ *Machine, err error) {
	m, err := newMachine(&cfg)
	if err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			m.Close()
		}
	}()
	entry, err := guest.Load(m.mem.Bytes(), cfg.Kernel, cfg.Initrd, cfg.Cmdline)
	if err != nil {
		return nil, fmt.Errorf("load kernel: %w", err)
	}
	supported, err := m.sys.SupportedCPUID()
	if err != nil {
		return nil, err
	}
	if err = m.setCPUID(DeterministicCPUID(supported)); err != nil {
		return nil, err
	}
	if err = m.writeACPI(entry); err != nil {
		return nil, fmt.Errorf("ACPI tables: %w", err)
	}
	if err = setupCPU(m.vcpu, entry); err != nil {
		return nil, err
	}
	m.firmwareInit()
	m.installed = true
	return m, nil
}

// NewEmpty creates a machine with zeroed memory of cfg.MemSize bytes, its
// devices and a vCPU, but no guest: cfg.Kernel, Initrd and Cmdline are
// ignored. It is for restoring a snapshot: fill Memory(), then Install the
// state. Run refuses to start until Install succeeded. A network interface
// given without a MAC takes the captured one at Install (there is no guest
// to derive one from).
func NewEmpty(cfg Config) (*Machine, error) {
	cfg.empty = true
	return newMachine(&cfg)
}

// newMachine acquires KVM, memory, the VM and its vCPU, and the devices.
func newMachine(cfg *Config) (_ *Machine, err error) {
	if cfg.Env == nil {
		cfg.Env = NewLiveEnv(nil)
	}
	if cfg.Console == nil {
		cfg.Console = io.Discard
	}
	if cfg.KVMPath == "" {
		cfg.KVMPath = "/dev/kvm"
	}
	if cfg.WallClock.IsZero() {
		cfg.WallClock = time.Unix(0, 0)
	}
	m := &Machine{env: cfg.Env, quiescent: true}
	m.ctl.init()
	m.prof.init()
	defer func() {
		if err != nil {
			m.Close()
		}
	}()

	if m.sys, err = kvm.Open(cfg.KVMPath); err != nil {
		if errors.Is(err, os.ErrNotExist) || errors.Is(err, os.ErrPermission) {
			return nil, fmt.Errorf("%w (ftkvm needs read/write access to a KVM device: load kvm_intel or kvm_amd, and run as root or in the kvm group)", err)
		}
		return nil, err
	}
	if v, err := m.sys.APIVersion(); err != nil {
		return nil, err
	} else if v != 12 {
		return nil, fmt.Errorf("%s: KVM API version %d, ftkvm needs 12", cfg.KVMPath, v)
	}
	for _, c := range []kvm.Cap{kvm.CapUserMemory, kvm.CapImmediateExit, kvm.CapX86UserSpaceMSR, kvm.CapX86MSRFilter} {
		if n, err := m.sys.CheckExtension(c); err != nil {
			return nil, err
		} else if n == 0 {
			return nil, fmt.Errorf("%s lacks %v, which ftkvm needs", cfg.KVMPath, c)
		}
	}
	switch cfg.Windows {
	case WindowsOn:
		m.noWindows = false
	case WindowsOff:
		m.noWindows = true
	default:
		if ep, ok := cfg.Env.(ExactPoints); ok && ep.ExactPoints() {
			m.noWindows = ring0Emulated(m.sys)
		}
	}
	if m.mem, err = NewMemory(cfg.MemSize); err != nil {
		return nil, err
	}
	if m.vm, err = m.sys.CreateVM(); err != nil {
		return nil, err
	}
	if err = m.vm.SetTSSAddr(0xfffbd000); err != nil {
		return nil, err
	}
	if err = m.setSlot(0); err != nil {
		return nil, err
	}
	if err = m.setupMSRFilter(); err != nil {
		return nil, err
	}
	if m.vcpu, err = m.vm.CreateVCPU(0); err != nil {
		return nil, err
	}
	m.kvcpu = m.vcpu
	m.run = m.vcpu.RunData()
	if err = m.wireDevices(*cfg); err != nil {
		return nil, err
	}
	if err = m.initEpoch(cfg); err != nil {
		return nil, err
	}
	return m, nil
}

// setSlot registers guest memory as KVM slot 0 with the given flags.
func (m *Machine) setSlot(flags uint32) error {
	return m.vm.SetUserMemoryRegion(kvm.MemoryRegion{
		Slot:          0,
		Flags:         flags,
		GuestPhysAddr: 0,
		MemorySize:    m.mem.Size(),
		UserspaceAddr: m.mem.Addr(),
	})
}

// setCPUID gives the vCPU its CPUID and finds the MSRs a capture saves,
// which depend on it.
func (m *Machine) setCPUID(entries []kvm.CPUIDEntry) error {
	if err := m.vcpu.SetCPUID2(entries); err != nil {
		return err
	}
	m.cpuid = append([]kvm.CPUIDEntry(nil), entries...)
	var err error
	m.msrIndices, err = m.probeMSRs()
	return err
}

func (m *Machine) setupMSRFilter() error {
	if err := m.vm.EnableUserSpaceMSR(kvm.MSRExitReasonFilter); err != nil {
		return err
	}
	f := kvm.MSRFilter{Flags: kvm.MSRFilterDefaultAllow}
	for _, idx := range trappedMSRs {
		// A bitmap bit of 0 denies the access, which with the FILTER exit
		// reason enabled sends it to user space.
		f.Ranges = append(f.Ranges, kvm.MSRFilterRange{
			Flags:  kvm.MSRFilterRead | kvm.MSRFilterWrite,
			NMSRs:  1,
			Base:   idx,
			Bitmap: []byte{0},
		})
	}
	return m.vm.SetMSRFilter(f)
}

func (m *Machine) wireDevices(cfg Config) error {
	m.pio = devices.NewBus()
	m.mmio = devices.NewBus()
	m.pic = devices.NewPIC()
	m.pit = devices.NewPIT(m.env, m.pic)
	m.uart = devices.NewUART(m.pic, 4, &consoleCounter{w: cfg.Console, n: &m.Stats.ConsoleBytes})
	m.rtc = devices.NewRTC(m.env, cfg.WallClock)
	reset := func() { m.stop(StatusReset, "guest requested a reset") }
	m.reset = devices.NewResetControl(reset)
	m.i8042 = devices.NewI8042(reset)
	m.debugExit = devices.NewDebugExit(func(v uint8) {
		m.stop(int(v), fmt.Sprintf("guest wrote %d to the debug-exit port", v))
	})
	err := devices.RegisterPC(m.pio, devices.PCDevices{
		PIC:       m.pic,
		PIT:       m.pit,
		COM1:      m.uart,
		RTC:       m.rtc,
		Reset:     m.reset,
		I8042:     m.i8042,
		DebugExit: m.debugExit,
	})
	if err != nil {
		return fmt.Errorf("wire devices: %w", err)
	}
	if err := m.wireACPI(); err != nil {
		return err
	}
	return m.wireVirtio(cfg)
}

func (m *Machine) stop(status int, reason string) {
	if !m.stopped {
		m.stopped, m.exitStatus, m.stopReason = true, status, reason
	}
}

// Close releases the vCPU, the VM, KVM and guest memory. Run must have
// returned (or never been called).
func (m *Machine) Close() error {
	m.ctl.finish()
	var errs []error
	if m.vcpu != nil {
		errs = append(errs, m.vcpu.Close())
		m.vcpu = nil
	}
	if m.vm != nil {
		errs = append(errs, m.vm.Close())
		m.vm = nil
	}
	if m.sys != nil {
		errs = append(errs, m.sys.Close())
		m.sys = nil
	}
	if m.mem != nil {
		errs = append(errs, m.mem.Close())
		m.mem = nil
	}
	errs = append(errs, m.closeVirtio())
	return errors.Join(errs...)
}

// Memory exposes guest memory (for loaders, snapshots and tests).
func (m *Machine) Memory() []byte { return m.mem.Bytes() }

// StopReason says why Run returned.
func (m *Machine) StopReason() string { return m.stopReason }

// MemSize is the guest memory size in bytes.
func (m *Machine) MemSize() uint64 { return m.mem.Size() }

// Steps is Stats.Steps: guest instructions retired under the step clock.
// vCPU thread only.
func (m *Machine) Steps() uint64 { return m.Stats.Steps }

// consoleCounter counts the bytes the guest writes to its console.
type consoleCounter struct {
	w io.Writer
	n *uint64
}

func (c *consoleCounter) Write(p []byte) (int, error) {
	*c.n += uint64(len(p))
	return c.w.Write(p)
}

// VirtualClock is an environment whose virtual time can be looked at
// without it being an environment read: a replica logs every Now, so the
// control API's status must not call it.
type VirtualClock interface {
	VirtualNow() int64
}

// VirtualTime is the environment's virtual time. Call it on the vCPU
// thread, inside Do: for an environment that is not a VirtualClock it is
// an environment read.
func (m *Machine) VirtualTime() int64 {
	if vc, ok := m.env.(VirtualClock); ok {
		return vc.VirtualNow()
	}
	return m.env.Now()
}
