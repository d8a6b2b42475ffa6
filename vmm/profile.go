package vmm

import (
	"cmp"
	"fmt"
	"io"
	"slices"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/ftkvm/ftkvm/devices"
	"github.com/ftkvm/ftkvm/kvm"
)

// The exit profile: where the vCPU thread's time goes, per exit reason and
// per device, so that a slow guest shows which exits to cut.
//
// It is kept by the vCPU loop itself, on the exit path, so it follows that
// path's rules: fixed arrays indexed by exit reason, by a device's index
// on its bus (devices.Bus.Index) and by port, plain integers written only
// by the vCPU thread (read them after Run or inside Do), no allocation, no
// lock. Each KVM_RUN costs three monotonic clock reads (before, after, and
// after ftkvm handled the exit); BenchmarkExitProfile measures what that
// costs against a loop without them.

// Slots of the per-reason table: every reason package kvm names, the step
// clock's emulated pseudo reason, and one for anything else.
const (
	profEmulated = int(kvm.ExitMemoryFault) + 1
	profOther    = profEmulated + 1
	profReasons  = profOther + 1

	// profDevices is the number of devices counted one by one per bus;
	// later registrations share the last of these slots, and the slot
	// after it counts accesses no device claims.
	profDevices   = 31
	profUnhandled = profDevices
)

type profCount struct {
	n        uint64
	runNs    int64 // in KVM_RUN before these exits (the guest ran, KVM worked)
	handleNs int64 // in ftkvm after them: dispatch, devices, the environment, injection
}

type profDev struct {
	profCount
	reads, writes uint64
}

type profile struct {
	off  bool      // no clock reads and no counts (BenchmarkExitProfile's baseline)
	base time.Time // monotonic origin of the clock reads

	reasons   [profReasons]profCount
	pio, mmio [profDevices + 1]profDev
	// ports counts port exits by port and direction (0 in, 1 out).
	// Allocated once with the machine; untouched pages cost no memory.
	ports   *[1 << 16][2]uint64
	vectors [256]uint64 // interrupts injected, by vector
	windows uint64      // interrupt windows requested (RequestInterruptWindow set)
	halts   uint64      // waits in the environment's Halt
	haltNs  int64
	wallNs  int64 // Run's time so far (set when Run returns and by the report)
	runAt   int64 // clock at Run's start

	dev *profDev // the device of the exit being handled
}

func (p *profile) init() {
	p.base = time.Now()
	p.ports = new([1 << 16][2]uint64)
}

// now is the profile's clock: monotonic ns since init. time.Since of a
// time with a monotonic reading is one runtime clock read (vDSO).
func (p *profile) now() int64 {
	if p.off {
		return 0
	}
	return int64(time.Since(p.base))
}

// record accounts one return from KVM_RUN: entered at t0, returned at t1
// with reason, handled by t2.
func (p *profile) record(reason kvm.ExitReason, t0, t1, t2 int64) {
	if p.off {
		return
	}
	s := profOther
	switch {
	case int(reason) < profEmulated:
		s = int(reason)
	case reason == exitEmulated:
		s = profEmulated
	}
	c := &p.reasons[s]
	c.n++
	c.runNs += t1 - t0
	c.handleNs += t2 - t1
	if d := p.dev; d != nil {
		d.n++
		d.runNs += t1 - t0
		d.handleNs += t2 - t1
		p.dev = nil
	}
}

// access notes the device a port (pio) or MMIO exit went to.
func (p *profile) access(devs *[profDevices + 1]profDev, bus *devices.Bus, addr uint64, write bool) {
	if p.off {
		return
	}
	i := bus.Index(addr)
	switch {
	case i < 0:
		i = profUnhandled
	case i >= profDevices:
		i = profDevices - 1
	}
	d := &devs[i]
	if write {
		d.writes++
	} else {
		d.reads++
	}
	p.dev = d
}

func (p *profile) port(port uint16, write bool) {
	if p.off {
		return
	}
	dir := 0
	if write {
		dir = 1
	}
	p.ports[port][dir]++
}

// ExitProfile is the exit profile as a report: counts and times since the
// machine's Run started in this process (a restored or received guest
// starts from zero; Stats carry the guest's whole life). Times are wall
// time on the vCPU thread in ns. docs/PROFILE.md explains every field.
type ExitProfile struct {
	WallNs   int64 `json:"wall_ns"`   // Run's wall time
	RunNs    int64 `json:"run_ns"`    // in KVM_RUN
	HandleNs int64 `json:"handle_ns"` // in ftkvm handling exits (the environment's At included)
	HaltNs   int64 `json:"halt_ns"`   // in the environment's Halt: the guest idle in HLT
	// OtherNs is the rest: control requests, the step clock's own work
	// before entering the guest, the loop.
	OtherNs int64  `json:"other_ns"`
	Halts   uint64 `json:"halts"`

	Exits   uint64          `json:"exits"` // every return from KVM_RUN, kicks included
	Reasons []ReasonProfile `json:"reasons"`
	Devices []DeviceProfile `json:"devices"`
	Ports   []PortProfile   `json:"ports"`

	// Injected counts interrupts injected here (Stats.Injected is the
	// guest's whole life, and an installed checkpoint replaces it).
	Injected         uint64          `json:"injected"`
	Vectors          []VectorProfile `json:"vectors"`
	WindowsRequested uint64          `json:"windows_requested"`
	// KickRequests counts kicks asked for (by the environment's timer,
	// the control API, a replica's node); Kicks (KVM_EXIT_INTR in
	// Reasons) the ones that made KVM_RUN return. Several requests can end
	// one KVM_RUN, and a kick that lands outside it costs no exit.
	KickRequests uint64 `json:"kick_requests"`
}

// ReasonProfile is one exit reason's line.
type ReasonProfile struct {
	Reason   string `json:"reason"` // the kernel's name, e.g. KVM_EXIT_IO
	Exits    uint64 `json:"exits"`
	RunNs    int64  `json:"run_ns"`
	HandleNs int64  `json:"handle_ns"`
}

// DeviceProfile is one device's line: the exits to its registered range.
type DeviceProfile struct {
	Bus      string `json:"bus"`    // "pio" or "mmio"
	Device   string `json:"device"` // its registration name; "(unhandled)" for no device, "(others)" past the table
	Base     uint64 `json:"base"`
	Size     uint64 `json:"size"`
	Exits    uint64 `json:"exits"`
	Reads    uint64 `json:"reads"`
	Writes   uint64 `json:"writes"`
	RunNs    int64  `json:"run_ns"`
	HandleNs int64  `json:"handle_ns"`
}

// PortProfile counts one I/O port's exits.
type PortProfile struct {
	Port   uint16 `json:"port"`
	Device string `json:"device"`
	Reads  uint64 `json:"reads"`
	Writes uint64 `json:"writes"`
}

// VectorProfile counts the interrupts injected with one vector.
type VectorProfile struct {
	Vector uint8  `json:"vector"`
	Count  uint64 `json:"count"`
}

// ExitProfile returns the exit profile. Call it on the vCPU thread (inside
// Do) or after Run returned; it allocates.
func (m *Machine) ExitProfile() ExitProfile {
	p := &m.prof
	r := ExitProfile{
		WallNs:           p.wallNs,
		HaltNs:           p.haltNs,
		Halts:            p.halts,
		WindowsRequested: p.windows,
		KickRequests:     m.kicks.Load(),
	}
	if m.ctl.started.Load() && !m.ctlDone() {
		r.WallNs = p.now() - p.runAt // Run is under way: this is inside Do
	}
	for s, c := range p.reasons {
		if c.n == 0 {
			continue
		}
		name := "(other)"
		switch {
		case s < profEmulated:
			name = kvm.ExitReason(s).String()
		case s == profEmulated:
			name = "FTKVM_EMULATED"
		}
		r.Reasons = append(r.Reasons, ReasonProfile{Reason: name, Exits: c.n, RunNs: c.runNs, HandleNs: c.handleNs})
		r.Exits += c.n
		r.RunNs += c.runNs
		r.HandleNs += c.handleNs
	}
	slices.SortStableFunc(r.Reasons, func(a, b ReasonProfile) int {
		return cmp.Compare(b.RunNs+b.HandleNs, a.RunNs+a.HandleNs)
	})
	r.OtherNs = max(0, r.WallNs-r.RunNs-r.HandleNs-r.HaltNs)
	add := func(bus string, b *devices.Bus, devs *[profDevices + 1]profDev) {
		if b == nil {
			return
		}
		regs := b.Registrations()
		for i, d := range devs {
			if d.n == 0 && d.reads == 0 && d.writes == 0 {
				continue
			}
			dp := DeviceProfile{Bus: bus, Exits: d.n, Reads: d.reads, Writes: d.writes, RunNs: d.runNs, HandleNs: d.handleNs}
			switch {
			case i == profUnhandled:
				dp.Device = "(unhandled)"
			case i == profDevices-1 && len(regs) > profDevices:
				dp.Device = "(others)"
			case i < len(regs):
				dp.Device, dp.Base, dp.Size = regs[i].Name, regs[i].Base, regs[i].Size
			}
			r.Devices = append(r.Devices, dp)
		}
	}
	add("pio", m.pio, &p.pio)
	add("mmio", m.mmio, &p.mmio)
	slices.SortStableFunc(r.Devices, func(a, b DeviceProfile) int {
		return cmp.Compare(b.RunNs+b.HandleNs, a.RunNs+a.HandleNs)
	})
	if p.ports != nil {
		for port, c := range p.ports {
			if c[0] == 0 && c[1] == 0 {
				continue
			}
			name := "(unhandled)"
			if reg, ok := m.pio.Lookup(uint64(port)); ok {
				name = reg.Name
			}
			r.Ports = append(r.Ports, PortProfile{Port: uint16(port), Device: name, Reads: c[0], Writes: c[1]})
		}
	}
	slices.SortStableFunc(r.Ports, func(a, b PortProfile) int {
		return cmp.Compare(b.Reads+b.Writes, a.Reads+a.Writes)
	})
	for v, n := range p.vectors {
		if n != 0 {
			r.Vectors = append(r.Vectors, VectorProfile{Vector: uint8(v), Count: n})
			r.Injected += n
		}
	}
	return r
}

// ctlDone reports whether Run has returned (or the machine was closed).
func (m *Machine) ctlDone() bool {
	select {
	case <-m.ctl.done:
		return true
	default:
		return false
	}
}

// WriteTable prints the profile as aligned tables for a person: totals,
// then exit reasons, devices and ports by cost, then interrupts. Times are
// shown in ms with their share of the wall time; µs/exit is the average
// cost of one exit (in KVM_RUN before it, and in ftkvm after).
func (p ExitProfile) WriteTable(w io.Writer) error {
	e := &errWriter{w: w}
	wall := p.WallNs
	e.printf("exit profile: %s wall, %d exits (%.0f/s)\n", fmtDur(wall), p.Exits, perSec(p.Exits, wall))
	e.table(1, []string{"where", "ms", "%wall"}, [][]string{
		{"in KVM_RUN", ms(p.RunNs), pct(p.RunNs, wall)},
		{"ftkvm handling exits", ms(p.HandleNs), pct(p.HandleNs, wall)},
		{fmt.Sprintf("halted (idle, %d waits)", p.Halts), ms(p.HaltNs), pct(p.HaltNs, wall)},
		{"other", ms(p.OtherNs), pct(p.OtherNs, wall)},
	})
	rows := make([][]string, 0, len(p.Reasons))
	for _, r := range p.Reasons {
		rows = append(rows, []string{strings.TrimPrefix(r.Reason, "KVM_EXIT_"), strconv.FormatUint(r.Exits, 10),
			pctU(r.Exits, p.Exits), ms(r.RunNs), ms(r.HandleNs), us(r.RunNs, r.Exits), us(r.HandleNs, r.Exits),
			pct(r.RunNs+r.HandleNs, wall)})
	}
	e.printf("\n")
	e.table(1, []string{"reason", "exits", "%exits", "run ms", "handle ms", "µs/exit run", "µs/exit handle", "%wall"}, rows)
	if len(p.Devices) > 0 {
		rows = rows[:0]
		for _, d := range p.Devices {
			rng := d.Bus
			if d.Size > 0 {
				rng = fmt.Sprintf("%s %#x-%#x", d.Bus, d.Base, d.Base+d.Size-1)
			}
			rows = append(rows, []string{d.Device, rng, strconv.FormatUint(d.Exits, 10), strconv.FormatUint(d.Reads, 10),
				strconv.FormatUint(d.Writes, 10), ms(d.RunNs), ms(d.HandleNs), us(d.HandleNs, d.Exits), pct(d.RunNs+d.HandleNs, wall)})
		}
		e.printf("\n")
		e.table(2, []string{"device", "range", "exits", "reads", "writes", "run ms", "handle ms", "µs/exit handle", "%wall"}, rows)
	}
	if len(p.Ports) > 0 {
		rows = rows[:0]
		for _, pp := range p.Ports {
			rows = append(rows, []string{fmt.Sprintf("%#x", pp.Port), pp.Device, strconv.FormatUint(pp.Reads, 10), strconv.FormatUint(pp.Writes, 10)})
		}
		e.printf("\n")
		e.table(2, []string{"port", "device", "in", "out"}, rows)
	}
	vecs := make([]string, 0, len(p.Vectors))
	for _, v := range p.Vectors {
		vecs = append(vecs, fmt.Sprintf("%#x:%d", v.Vector, v.Count))
	}
	e.printf("\ninterrupts injected: %d (by vector: %s); windows requested: %d; kicks requested: %d\n",
		p.Injected, orNone(strings.Join(vecs, " ")), p.WindowsRequested, p.KickRequests)
	return e.err
}

// errWriter keeps the first write error.
type errWriter struct {
	w   io.Writer
	err error
}

func (e *errWriter) printf(format string, args ...any) {
	if e.err == nil {
		_, e.err = fmt.Fprintf(e.w, format, args...)
	}
}

// table prints rows under a header, indented by two spaces: the first
// left columns (names) aligned left, the others (numbers) right.
func (e *errWriter) table(left int, header []string, rows [][]string) {
	width := make([]int, len(header))
	for _, r := range append([][]string{header}, rows...) {
		for i, c := range r {
			width[i] = max(width[i], utf8.RuneCountInString(c))
		}
	}
	for _, r := range append([][]string{header}, rows...) {
		var b strings.Builder
		b.WriteString(" ")
		for i, c := range r {
			pad := strings.Repeat(" ", width[i]-utf8.RuneCountInString(c))
			b.WriteString(" ")
			if i < left {
				b.WriteString(c + pad)
			} else {
				b.WriteString(" " + pad + c)
			}
		}
		e.printf("%s\n", strings.TrimRight(b.String(), " "))
	}
}

func ms(ns int64) string { return fmt.Sprintf("%.1f", float64(ns)/1e6) }

func us(ns int64, n uint64) string {
	if n == 0 {
		return "-"
	}
	return fmt.Sprintf("%.1f", float64(ns)/1e3/float64(n))
}

func pct(part, whole int64) string {
	if whole <= 0 {
		return "-"
	}
	return fmt.Sprintf("%.1f", 100*float64(part)/float64(whole))
}

func pctU(part, whole uint64) string {
	if whole == 0 {
		return "-"
	}
	return fmt.Sprintf("%.1f", 100*float64(part)/float64(whole))
}

func perSec(n uint64, ns int64) float64 {
	if ns <= 0 {
		return 0
	}
	return float64(n) / (float64(ns) / 1e9)
}

func fmtDur(ns int64) string { return time.Duration(ns).Round(time.Millisecond).String() }

func orNone(s string) string {
	if s == "" {
		return "none"
	}
	return s
}
