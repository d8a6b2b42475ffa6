package perfclock

import (
	"errors"
	"os"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
)

func TestParseCPUInfo(t *testing.T) {
	const two = `processor	: 0
vendor_id	: AuthenticAMD
cpu family	: 25
model		: 17
model name	: AMD EPYC 9B14
flags		: fpu vme hypervisor lahf_lm

processor	: 1
vendor_id	: GenuineIntel
cpu family	: 6
model		: 85
`
	for _, tc := range []struct {
		name, in string
		want     CPU
		err      bool
	}{
		{"first block only", two, CPU{Vendor: "AuthenticAMD", Family: 25, Model: 17, Name: "AMD EPYC 9B14", Hypervisor: true, RawFamilyModel: "family 0x19 model 0x11"}, false},
		{"intel", "vendor_id : GenuineIntel\ncpu family : 6\nmodel : 94\n", CPU{Vendor: "GenuineIntel", Family: 6, Model: 94, RawFamilyModel: "family 0x6 model 0x5e"}, false},
		{"no model", "vendor_id : GenuineIntel\ncpu family : 6\n", CPU{}, true},
		{"bad family", "vendor_id : GenuineIntel\ncpu family : six\nmodel : 1\n", CPU{}, true},
		{"empty", "", CPU{}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := parseCPUInfo(strings.NewReader(tc.in))
			if (err != nil) != tc.err {
				t.Fatalf("err %v, want error %v", err, tc.err)
			}
			if err == nil && got != tc.want {
				t.Fatalf("got %+v, want %+v", got, tc.want)
			}
		})
	}
}

func TestBranchEvent(t *testing.T) {
	for _, tc := range []struct {
		name   string
		cpu    CPU
		config uint64
		margin uint64
	}{
		{"Skylake: BR_INST_RETIRED.CONDITIONAL", CPU{Vendor: "GenuineIntel", Family: 6, Model: 0x5e}, 0x01c4, 100},
		{"Haswell", CPU{Vendor: "GenuineIntel", Family: 6, Model: 0x3c}, 0x01c4, 100},
		{"Ice Lake: BR_INST_RETIRED.COND", CPU{Vendor: "GenuineIntel", Family: 6, Model: 0x7e}, 0x11c4, 100},
		{"Sapphire Rapids", CPU{Vendor: "GenuineIntel", Family: 6, Model: 0x8f}, 0x11c4, 125},
		{"Tremont: JCC", CPU{Vendor: "GenuineIntel", Family: 6, Model: 0x9c}, 0x7ec4, 100},
		{"Zen 2", CPU{Vendor: "AuthenticAMD", Family: 0x17, Model: 0x31}, 0xd1, 10000},
		{"Zen 4", CPU{Vendor: "AuthenticAMD", Family: 0x19, Model: 0x11}, 0xd1, 10000},
		{"Merom: no conditional branch event", CPU{Vendor: "GenuineIntel", Family: 6, Model: 0x0f}, 0, 0},
		{"AMD family 15h: rr counts taken branches there", CPU{Vendor: "AuthenticAMD", Family: 0x15, Model: 2}, 0, 0},
		{"another vendor", CPU{Vendor: "HygonGenuine", Family: 0x18}, 0, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ev, err := BranchEvent(tc.cpu)
			if tc.config == 0 {
				if err == nil {
					t.Fatalf("got %+v, want no event", ev)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if ev.Type != unix.PERF_TYPE_RAW || ev.Config != tc.config || ev.Margin != tc.margin || !ev.GuestOnly {
				t.Fatalf("got %+v, want raw %#x margin %d guest-only", ev, tc.config, tc.margin)
			}
		})
	}
}

// A thread without CAP_PERFMON and CAP_SYS_ADMIN may count kernel code
// (which a guest-only counter of guest ring 0 is, to perf) only when
// perf_event_paranoid is 1 or lower; above, Open fails with ErrPermission
// and a message naming the setting and its value. The capabilities are
// dropped from one locked thread only, which ends with its goroutine.
func TestCounterPermissionNamesParanoid(t *testing.T) {
	b, err := os.ReadFile("/proc/sys/kernel/perf_event_paranoid")
	if err != nil {
		t.Fatal(err)
	}
	level, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		t.Fatal(err)
	}
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread exits with the goroutine
		hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
		var data [2]unix.CapUserData
		if err := unix.Capget(&hdr, &data[0]); err != nil {
			errc <- err
			return
		}
		for _, c := range []uint{unix.CAP_SYS_ADMIN, unix.CAP_PERFMON} {
			data[c/32].Effective &^= 1 << (c % 32)
		}
		if err := unix.Capset(&hdr, &data[0]); err != nil {
			errc <- err
			return
		}
		c, err := Open(TaskClock, unix.Gettid(), unix.SIGURG)
		if err == nil {
			c.Close()
		}
		errc <- err
	}()
	err = <-errc
	if level <= 1 {
		if err != nil {
			t.Fatalf("perf_event_paranoid %d: %v", level, err)
		}
		return
	}
	if !errors.Is(err, ErrPermission) || !strings.Contains(err.Error(), "perf_event_paranoid is "+strconv.Itoa(level)) {
		t.Fatalf("perf_event_paranoid %d, no CAP_PERFMON: %v", level, err)
	}
	t.Log(err)
}

// A task-clock counter opens on every Linux: its signal is owned by the
// thread that opened it, with the signal asked for, and it counts.
func TestCounterOwnerAndCount(t *testing.T) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	tid := unix.Gettid()
	c, err := Open(TaskClock, tid, unix.SIGURG)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var owner fOwnerEx
	if _, _, e := unix.Syscall(unix.SYS_FCNTL, uintptr(c.fd), unix.F_GETOWN_EX, uintptr(unsafe.Pointer(&owner))); e != 0 {
		t.Fatal(e)
	}
	if owner.Type != fOwnerTID || int(owner.PID) != tid {
		t.Fatalf("owner %+v, want thread %d", owner, tid)
	}
	if sig, err := unix.FcntlInt(uintptr(c.fd), unix.F_GETSIG, 0); err != nil || sig != int(unix.SIGURG) {
		t.Fatalf("F_GETSIG %d %v", sig, err)
	}
	if fl, err := unix.FcntlInt(uintptr(c.fd), unix.F_GETFL, 0); err != nil || fl&unix.O_ASYNC == 0 {
		t.Fatalf("flags %#x %v: no O_ASYNC", fl, err)
	}
	a, err := c.Count()
	if err != nil {
		t.Fatal(err)
	}
	x := uint64(1)
	for i := 0; i < 1_000_000; i++ {
		x = x*6364136223846793005 + 1
	}
	b, err := c.Count()
	if err != nil {
		t.Fatal(err)
	}
	if b <= a {
		t.Fatalf("task-clock did not advance over a million multiplications (%d, %d; %d)", a, b, x)
	}
	for _, n := range []uint64{10_000_000, 0, 1 << 63} {
		if err := c.Overflow(n); err != nil {
			t.Fatalf("Overflow(%d): %v", n, err)
		}
	}
	if allocs := testing.AllocsPerRun(100, func() {
		_, _ = c.Count()
		_ = c.Overflow(1 << 40)
	}); allocs != 0 {
		t.Fatalf("Count and Overflow allocate (%v per call)", allocs)
	}
}

// The retired-branch event of this host's CPU either opens or fails with
// an error that names the missing piece.
func TestBranchEventOnThisHost(t *testing.T) {
	cpu, err := HostCPU()
	if err != nil {
		t.Fatal(err)
	}
	ev, err := BranchEvent(cpu)
	if err != nil {
		t.Logf("%v", err)
		return
	}
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	c, err := Open(ev, unix.Gettid(), unix.SIGURG)
	if err != nil {
		if !errors.Is(err, ErrNoPMU) && !errors.Is(err, ErrNoGuestOnly) && !errors.Is(err, ErrPermission) {
			t.Fatalf("%v: not one of the missing pieces", err)
		}
		t.Logf("%s: %v", ev.Name, err)
		return
	}
	c.Close()
	t.Logf("%s opened", ev.Name)
}

// FuzzParseCPUInfo: any text gives a CPU with a vendor or an error, never
// a panic; a parsed CPU's event lookup never panics either.
func FuzzParseCPUInfo(f *testing.F) {
	f.Add("vendor_id : GenuineIntel\ncpu family : 6\nmodel : 94\n")
	f.Add("vendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\nflags\t\t: hypervisor\n\nvendor_id : x\n")
	f.Add("model : -1\ncpu family : 99999999999999999999\n")
	f.Fuzz(func(t *testing.T, in string) {
		cpu, err := parseCPUInfo(strings.NewReader(in))
		if err != nil {
			return
		}
		if cpu.Vendor == "" || cpu.RawFamilyModel == "" {
			t.Fatalf("parsed %+v from %q", cpu, in)
		}
		_, _ = BranchEvent(cpu)
	})
}
