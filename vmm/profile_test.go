package vmm

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"regexp"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ftkvm/ftkvm/devices"
	"github.com/ftkvm/ftkvm/guest/pvhtest"
	"github.com/ftkvm/ftkvm/kvm"
)

// TestExitProfileAddsUp runs the test OS's clock workload (PIT latches and
// counter reads, CMOS reads, console output, timer interrupts) on
// /dev/kvm and checks that the exit profile accounts for every exit the
// loop counted: per reason against Stats, per device and per port against
// their reason, interrupts by vector against Stats.Injected.
func TestExitProfileAddsUp(t *testing.T) {
	kernel := buildTestOS(t)
	var console bytes.Buffer
	m, err := New(Config{Kernel: kernel, MemSize: 64 << 20, Cmdline: "workload=clock samples=3 hz=200", Console: &console})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	status, err := m.Run()
	if err != nil || status != 0 {
		t.Fatalf("run: status %d, %v\n%s", status, err, console.String())
	}
	if !strings.Contains(console.String(), "testos: PASS") {
		t.Fatalf("the workload did not pass:\n%s", console.String())
	}
	p := m.ExitProfile()
	s := m.Stats

	byReason := map[string]uint64{}
	var sum uint64
	for _, r := range p.Reasons {
		if _, dup := byReason[r.Reason]; dup {
			t.Fatalf("reason %s listed twice", r.Reason)
		}
		byReason[r.Reason] = r.Exits
		sum += r.Exits
		if r.RunNs < 0 || r.HandleNs < 0 {
			t.Errorf("%s: negative time %+v", r.Reason, r)
		}
	}
	if sum != p.Exits {
		t.Errorf("reasons sum to %d exits, the profile says %d", sum, p.Exits)
	}
	for _, c := range []struct {
		reason string
		want   uint64
	}{
		{"KVM_EXIT_IO", s.IOExits},
		{"KVM_EXIT_MMIO", s.MMIOExits},
		{"KVM_EXIT_HLT", s.HaltExits},
		{"KVM_EXIT_IRQ_WINDOW_OPEN", s.WindowExits},
		{"KVM_EXIT_INTR", s.Kicks},
	} {
		if got := byReason[c.reason]; got != c.want {
			t.Errorf("%s: profile %d, Stats %d", c.reason, got, c.want)
		}
	}
	if got := byReason["KVM_EXIT_X86_RDMSR"] + byReason["KVM_EXIT_X86_WRMSR"]; got != s.MSRExits {
		t.Errorf("MSR exits: profile %d, Stats %d", got, s.MSRExits)
	}
	// Stats.Exits counts positions: the guest's last exit (its write to
	// the debug-exit port) stops the machine before it is counted.
	if want := s.Exits + 1 + s.Kicks; p.Exits != want {
		t.Errorf("profile has %d exits, Stats %d guest-caused (+1 final) and %d kicks", p.Exits, s.Exits, s.Kicks)
	}
	if s.IOExits == 0 || s.Injected == 0 {
		t.Fatalf("the clock workload made no port exits or got no interrupts: %+v", s)
	}

	// Devices: their exits add up to their reason's, and each device's
	// reads and writes to its ports' counts.
	var pioExits, mmioExits uint64
	devRW := map[string][2]uint64{}
	for _, d := range p.Devices {
		if d.Reads+d.Writes != d.Exits {
			t.Errorf("%s: %d reads + %d writes != %d exits", d.Device, d.Reads, d.Writes, d.Exits)
		}
		switch d.Bus {
		case "pio":
			pioExits += d.Exits
			devRW[d.Device] = [2]uint64{d.Reads, d.Writes}
		case "mmio":
			mmioExits += d.Exits
		}
	}
	if pioExits != s.IOExits || mmioExits != s.MMIOExits {
		t.Errorf("devices: %d port and %d MMIO exits, Stats %d and %d", pioExits, mmioExits, s.IOExits, s.MMIOExits)
	}
	portRW := map[string][2]uint64{}
	ports := map[uint16]PortProfile{}
	var portExits uint64
	for _, pp := range p.Ports {
		rw := portRW[pp.Device]
		portRW[pp.Device] = [2]uint64{rw[0] + pp.Reads, rw[1] + pp.Writes}
		ports[pp.Port] = pp
		portExits += pp.Reads + pp.Writes
	}
	if portExits != s.IOExits {
		t.Errorf("ports sum to %d exits, Stats.IOExits %d", portExits, s.IOExits)
	}
	for name, rw := range devRW {
		if portRW[name] != rw {
			t.Errorf("%s: device reads/writes %v, its ports' %v", name, rw, portRW[name])
		}
	}
	// The workload reads the PIT's counter (latch on 0x43, read 0x40) and
	// ends with one write to the debug-exit port.
	if ports[0x43].Writes == 0 || ports[0x40].Reads == 0 {
		t.Errorf("no PIT latch and read seen: 0x43 %+v, 0x40 %+v", ports[0x43], ports[0x40])
	}
	if pp := ports[0x501]; pp.Writes != 1 || pp.Device != "debug-exit" && pp.Device == "(unhandled)" {
		t.Errorf("debug-exit port: %+v", pp)
	}

	var vecs uint64
	for _, v := range p.Vectors {
		vecs += v.Count
	}
	if vecs != s.Injected || p.Injected != s.Injected {
		t.Errorf("vectors sum to %d, profile %d, Stats.Injected %d", vecs, p.Injected, s.Injected)
	}
	// Time is accounted in disjoint intervals of Run's wall time.
	if p.WallNs <= 0 || p.RunNs+p.HandleNs+p.HaltNs > p.WallNs || p.OtherNs < 0 {
		t.Errorf("times do not fit the wall time: %+v", p)
	}
	var out bytes.Buffer
	if err := p.WriteTable(&out); err != nil {
		t.Fatal(err)
	}
	t.Logf("\n%s", out.String())
}

// sampleProfile is a profile with known figures for the formatting tests.
func sampleProfile() ExitProfile {
	return ExitProfile{
		WallNs: 2_000_000_000, RunNs: 1_200_000_000, HandleNs: 500_000_000, HaltNs: 250_000_000, OtherNs: 50_000_000,
		Halts: 7, Exits: 1500,
		Reasons: []ReasonProfile{
			{Reason: "KVM_EXIT_IO", Exits: 1000, RunNs: 1_000_000_000, HandleNs: 400_000_000},
			{Reason: "KVM_EXIT_HLT", Exits: 400, RunNs: 150_000_000, HandleNs: 80_000_000},
			{Reason: "KVM_EXIT_INTR", Exits: 100, RunNs: 50_000_000, HandleNs: 20_000_000},
		},
		Devices: []DeviceProfile{
			{Bus: "pio", Device: "pit", Base: 0x40, Size: 4, Exits: 900, Reads: 600, Writes: 300, RunNs: 900_000_000, HandleNs: 360_000_000},
			{Bus: "pio", Device: "(unhandled)", Exits: 100, Reads: 100, RunNs: 100_000_000, HandleNs: 40_000_000},
		},
		Ports: []PortProfile{
			{Port: 0x40, Device: "pit", Reads: 600},
			{Port: 0x43, Device: "pit", Writes: 300},
			{Port: 0x80, Device: "(unhandled)", Reads: 100},
		},
		Injected: 42, Vectors: []VectorProfile{{Vector: 0x20, Count: 40}, {Vector: 0x24, Count: 2}},
		WindowsRequested: 5, KickRequests: 120,
	}
}

func TestExitProfileTable(t *testing.T) {
	var b bytes.Buffer
	if err := sampleProfile().WriteTable(&b); err != nil {
		t.Fatal(err)
	}
	out := b.String()
	for _, re := range []string{
		`(?m)^exit profile: 2s wall, 1500 exits \(750/s\)$`,
		`(?m)^ +in KVM_RUN +1200\.0 +60\.0 *$`,
		`(?m)^ +ftkvm handling exits +500\.0 +25\.0 *$`,
		`(?m)^ +halted \(idle, 7 waits\) +250\.0 +12\.5 *$`,
		`(?m)^ +other +50\.0 +2\.5 *$`,
		// reason, exits, %exits, run ms, handle ms, µs/exit run and handle, %wall
		`(?m)^ +IO +1000 +66\.7 +1000\.0 +400\.0 +1000\.0 +400\.0 +70\.0 *$`,
		`(?m)^ +HLT +400 +26\.7 +150\.0 +80\.0 +375\.0 +200\.0 +11\.5 *$`,
		`(?m)^ +INTR +100 +6\.7 +50\.0 +20\.0 +500\.0 +200\.0 +3\.5 *$`,
		`(?m)^ +pit +pio 0x40-0x43 +900 +600 +300 +900\.0 +360\.0 +400\.0 +63\.0 *$`,
		`(?m)^ +\(unhandled\) +pio +100 +100 +0 +100\.0 +40\.0 +400\.0 +7\.0 *$`,
		`(?m)^ +0x40 +pit +600 +0 *$`,
		`(?m)^ +0x80 +\(unhandled\) +100 +0 *$`,
		`(?m)^interrupts injected: 42 \(by vector: 0x20:40 0x24:2\); windows requested: 5; kicks requested: 120$`,
	} {
		if !regexp.MustCompile(re).MatchString(out) {
			t.Errorf("no line matches %s in:\n%s", re, out)
		}
	}
}

// An empty profile (a machine that never ran) prints without dividing by
// zero.
func TestExitProfileTableEmpty(t *testing.T) {
	var b bytes.Buffer
	if err := (ExitProfile{}).WriteTable(&b); err != nil {
		t.Fatal(err)
	}
	out := b.String()
	if strings.Contains(out, "NaN") || strings.Contains(out, "Inf") {
		t.Fatalf("empty profile prints NaN or Inf:\n%s", out)
	}
	if !strings.Contains(out, "0 exits") || !strings.Contains(out, "by vector: none") {
		t.Fatalf("unexpected empty profile:\n%s", out)
	}
}

// The JSON names are the control API's (ctl status) and docs/PROFILE.md's.
func TestExitProfileJSON(t *testing.T) {
	b, err := json.Marshal(sampleProfile())
	if err != nil {
		t.Fatal(err)
	}
	for _, key := range []string{`"wall_ns":2000000000`, `"reasons":[{"reason":"KVM_EXIT_IO","exits":1000,`,
		`"devices":[{"bus":"pio","device":"pit","base":64,"size":4,"exits":900,"reads":600,"writes":300,`,
		`"ports":[{"port":64,"device":"pit","reads":600,"writes":0}`, `"windows_requested":5`, `"kick_requests":120`,
		`"vectors":[{"vector":32,"count":40}`} {
		if !bytes.Contains(b, []byte(key)) {
			t.Errorf("JSON lacks %s:\n%s", key, b)
		}
	}
	var back ExitProfile
	if err := json.Unmarshal(b, &back); err != nil {
		t.Fatal(err)
	}
	if back.Reasons[1] != sampleProfile().Reasons[1] || back.Ports[2] != sampleProfile().Ports[2] {
		t.Fatalf("round trip: %+v", back)
	}
}

// profileExits is ftkvmExits with the profile on or off. It also returns
// the vCPU thread's CPU time (user and system, KVM_RUN included), which
// other load on the host disturbs less than wall time.
func profileExits(b *testing.B, kernel []byte, off bool) (uint64, time.Duration, time.Duration) {
	m, err := New(Config{Kernel: kernel, MemSize: 16 << 20, Console: io.Discard})
	if err != nil {
		b.Fatal(err)
	}
	defer m.Close()
	m.prof.off = off
	// Run locks its thread; locking it here first keeps this goroutine
	// on the same thread around it, for RUSAGE_THREAD.
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	cpu := func() time.Duration {
		var ru unix.Rusage
		if err := unix.Getrusage(unix.RUSAGE_THREAD, &ru); err != nil {
			b.Fatal(err)
		}
		return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
	}
	c0, start := cpu(), time.Now()
	if _, err := m.Run(); err != nil {
		b.Fatal(err)
	}
	return m.Stats.Exits + 1, time.Since(start), cpu() - c0
}

// BenchmarkExitProfile measures what the exit profile costs the exit path:
// the same port-exit loop with the profile (three clock reads per
// KVM_RUN, the counters) and without, alternating, in one run. It reports
// the ratio of exit rates by wall time (on/off: below 1 means the profile
// slows the loop), the ratio of the vCPU thread's CPU time per exit
// (cpu-per-exit-on/off, the median of the pairs' ratios, which other load
// on the host disturbs less: above 1 means the profile costs), and what
// one clock read costs.
func BenchmarkExitProfile(b *testing.B) {
	const n = 50_000
	kernel := pvhtest.Build(false, 0x200000, exitLoop(n), 0x200000, true)
	var offN, onN uint64
	var offT, onT time.Duration
	var cpuRatios []float64
	for range b.N {
		e0, d0, c0 := profileExits(b, kernel, true)
		e1, d1, c1 := profileExits(b, kernel, false)
		offN, offT = offN+e0, offT+d0
		onN, onT = onN+e1, onT+d1
		// CPU time per exit, on over off: above 1 means the profile costs.
		cpuRatios = append(cpuRatios, (float64(c1)/float64(e1))/(float64(c0)/float64(e0)))
	}
	off := float64(offN) / offT.Seconds()
	on := float64(onN) / onT.Seconds()
	b.ReportMetric(off, "off-exits/s")
	b.ReportMetric(on, "on-exits/s")
	b.ReportMetric(on/off, "on/off")
	slices.Sort(cpuRatios)
	b.ReportMetric(cpuRatios[len(cpuRatios)/2], "cpu-per-exit-on/off")
	// The clock reads alone, outside the loop: what three cost.
	var p profile
	p.init()
	const reads = 1_000_000
	start := time.Now()
	var sink int64
	for range reads {
		sink += p.now()
	}
	b.ReportMetric(float64(time.Since(start).Nanoseconds())/reads, "ns/clock-read")
	_ = sink
}

// BenchmarkProfileExitWork is the profile's own work for one port exit, in
// isolation: three clock reads, the bus lookup, the port and reason counts.
// Next to the cost of an exit (BenchmarkExitPath) it bounds the overhead
// without the noise of running a guest.
func BenchmarkProfileExitWork(b *testing.B) {
	var p profile
	p.init()
	bus := devices.NewBus()
	for i, base := range []uint64{0x20, 0x40, 0x60, 0x64, 0x70, 0x3f8, 0xa0, 0x501} {
		if err := bus.Register(base, 2, fmt.Sprint("dev", i), nopDevice{}); err != nil {
			b.Fatal(err)
		}
	}
	// Wall time per op is what a loaded host lends this thread; the
	// thread's CPU time per op is the work itself.
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	var r0, r1 unix.Rusage
	_ = unix.Getrusage(unix.RUSAGE_THREAD, &r0)
	b.ResetTimer()
	for i := range b.N {
		port := uint16(0x3f8 + i&1)
		t0 := p.now()
		t1 := p.now()
		p.access(&p.pio, bus, uint64(port), true)
		p.port(port, true)
		p.record(kvm.ExitIO, t0, t1, p.now())
	}
	b.StopTimer()
	_ = unix.Getrusage(unix.RUSAGE_THREAD, &r1)
	cpu := r1.Utime.Nano() + r1.Stime.Nano() - r0.Utime.Nano() - r0.Stime.Nano()
	b.ReportMetric(float64(cpu)/float64(b.N), "cpu-ns/op")
}

type nopDevice struct{}

func (nopDevice) Read(uint64, []byte)  {}
func (nopDevice) Write(uint64, []byte) {}
