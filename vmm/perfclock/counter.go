package perfclock

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"strings"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Errors of Open, each naming one missing piece (vmm turns them into the
// one line `ftkvm probe` and `--epoch perf` print).
var (
	// ErrNoPMU: the kernel offers no hardware counter (perf_event_open
	// fails with ENOENT or ENODEV: no PMU driver, or a VM without a
	// virtual PMU).
	ErrNoPMU = errors.New("no hardware performance counters")
	// ErrNoGuestOnly: the event opens, but not restricted to guest
	// execution (exclude_host): the PMU or its driver cannot tell guest
	// events from host ones.
	ErrNoGuestOnly = errors.New("no guest-only counting")
	// ErrPermission: perf_event_paranoid or missing capabilities forbid
	// the counter.
	ErrPermission = errors.New("performance counters not permitted")
)

// neverPeriod is the sample period of a counter that should not overflow:
// perf_event_open rejects periods with bit 63 set; x86 programs at most
// its counter width at a time and raises no overflow for the partial ones.
const neverPeriod = 1 << 62

// Counter counts an Event for one thread and, once Overflow armed it,
// sends a signal to that same thread when the count passes the period: a
// KVM_RUN blocked in that thread then returns EINTR, which is how the perf
// clock gets the vCPU back near a target. The signal goes to the thread,
// not the process (F_SETOWN_EX with F_OWNER_TID), because KVM_RUN only
// returns for a signal pending on the thread that runs it.
//
// Count and Overflow are the clock's per-run calls: they allocate nothing,
// log nothing and take no locks.
type Counter struct {
	fd     int
	ev     Event
	buf    [8]byte
	period uint64 // the argument of PERF_EVENT_IOC_PERIOD (a pointer to it)
}

// fOwnerTID is F_OWNER_TID of <fcntl.h>, which x/sys/unix lacks.
const fOwnerTID = 0

// fOwnerEx is struct f_owner_ex.
type fOwnerEx struct {
	Type int32
	PID  int32
}

// Open opens ev for thread tid (the thread that will call KVM_RUN; perf
// counts the events of that one thread wherever it runs) and has its
// overflows signal that thread with sig. The counter starts counting at
// once, with no overflow armed.
func Open(ev Event, tid int, sig unix.Signal) (*Counter, error) {
	fd, err := openEvent(ev, tid)
	if err != nil {
		if ev.GuestOnly && !errors.Is(err, ErrPermission) {
			// Does the same event open when it may count the host too?
			// Then what is missing is guest-only counting.
			plain := ev
			plain.GuestOnly = false
			if pfd, perr := openEvent(plain, tid); perr == nil {
				unix.Close(pfd)
				return nil, fmt.Errorf("%w (the event opens, but not with exclude_host: %v)", ErrNoGuestOnly, unwrapErrno(err))
			}
		}
		return nil, err
	}
	c := &Counter{fd: fd, ev: ev}
	owner := fOwnerEx{Type: fOwnerTID, PID: int32(tid)}
	if _, _, e := unix.Syscall(unix.SYS_FCNTL, uintptr(fd), unix.F_SETOWN_EX, uintptr(unsafe.Pointer(&owner))); e != 0 {
		c.Close()
		return nil, fmt.Errorf("perf counter: fcntl(F_SETOWN_EX, thread %d): %w", tid, e)
	}
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_SETSIG, int(sig)); err != nil {
		c.Close()
		return nil, fmt.Errorf("perf counter: fcntl(F_SETSIG, %v): %w", sig, err)
	}
	fl, err := unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0)
	if err == nil {
		_, err = unix.FcntlInt(uintptr(fd), unix.F_SETFL, fl|unix.O_ASYNC)
	}
	if err != nil {
		c.Close()
		return nil, fmt.Errorf("perf counter: fcntl(F_SETFL, O_ASYNC): %w", err)
	}
	return c, nil
}

// openEvent is perf_event_open for ev on thread tid, its errors sorted
// into the missing pieces.
func openEvent(ev Event, tid int) (int, error) {
	attr := unix.PerfEventAttr{
		Type:   ev.Type,
		Size:   uint32(unsafe.Sizeof(unix.PerfEventAttr{})),
		Config: ev.Config,
		Sample: neverPeriod,
		// Pinned: never multiplexed off the PMU with other events (a
		// pinned event that loses its counter goes to an error state,
		// which Count reports, instead of silently missing events).
		Bits: unix.PerfBitPinned,
	}
	if ev.GuestOnly {
		attr.Bits |= unix.PerfBitExcludeHost | unix.PerfBitExcludeHv
	}
	fd, err := unix.PerfEventOpen(&attr, tid, -1, -1, unix.PERF_FLAG_FD_CLOEXEC)
	if err == nil {
		return fd, nil
	}
	switch {
	case errors.Is(err, unix.EACCES) || errors.Is(err, unix.EPERM):
		return -1, fmt.Errorf("%w (perf_event_open: %v; %s)", ErrPermission, err, paranoidHint())
	case errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ENODEV):
		return -1, fmt.Errorf("%w (perf_event_open: %w)", ErrNoPMU, err)
	}
	return -1, fmt.Errorf("perf_event_open (%s): %w", ev.Name, err)
}

// paranoidHint names the setting that usually refuses the counter: a
// guest-only counter counts guest ring 0, which perf treats as kernel
// counting (exclude_kernel is clear).
func paranoidHint() string {
	b, err := os.ReadFile("/proc/sys/kernel/perf_event_paranoid")
	if err != nil {
		return "see /proc/sys/kernel/perf_event_paranoid"
	}
	return paranoidAdvice(strings.TrimSpace(string(b)))
}

func paranoidAdvice(level string) string {
	return fmt.Sprintf("/proc/sys/kernel/perf_event_paranoid is %s; counting guest kernel code needs 1 or lower, or CAP_PERFMON", level)
}

func unwrapErrno(err error) error {
	var e unix.Errno
	if errors.As(err, &e) {
		return e
	}
	return err
}

// Event returns the event the counter counts.
func (c *Counter) Event() Event { return c.ev }

// Count returns the events counted so far.
func (c *Counter) Count() (uint64, error) {
	n, err := unix.Read(c.fd, c.buf[:])
	if err != nil {
		return 0, fmt.Errorf("perf counter: read: %w", err)
	}
	if n != len(c.buf) {
		// A pinned event that could not keep its PMU counter reads as
		// end of file.
		return 0, errors.New("perf counter: read returned no count: the counter lost its place on the PMU (another pinned user?)")
	}
	return binary.LittleEndian.Uint64(c.buf[:]), nil
}

// Overflow arms the counter to signal its thread after n more events (n >
// 0), or disarms it (n == 0). The interrupt that sends the signal may land
// some events later (skid); the count itself is exact. A signal of an
// earlier period can still be pending: callers treat every signal as "look
// at the count", never as "the period has passed".
func (c *Counter) Overflow(n uint64) error {
	if n == 0 || n > neverPeriod {
		n = neverPeriod
	}
	c.period = n
	// PERF_EVENT_IOC_PERIOD restarts the period from the current count
	// (the kernel zeroes period_left and reprograms the counter) without
	// resetting the count. Kernels before 4.7 applied it only after the
	// next overflow (rr checks for that); ftkvm's KVM requirements (the
	// user-space MSR exits and filter) need a far newer one.
	if _, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(c.fd), unix.PERF_EVENT_IOC_PERIOD, uintptr(unsafe.Pointer(&c.period))); e != 0 {
		return fmt.Errorf("perf counter: PERF_EVENT_IOC_PERIOD %d: %w", n, e)
	}
	return nil
}

// Close closes the counter.
func (c *Counter) Close() error {
	if c.fd < 0 {
		return nil
	}
	err := unix.Close(c.fd)
	c.fd = -1
	return err
}
