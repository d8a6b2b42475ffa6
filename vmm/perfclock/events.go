package perfclock

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Event is a perf_event_open event a Counter counts.
type Event struct {
	// Name says what the event is, for `ftkvm probe`.
	Name   string
	Type   uint32 // perf_event_attr.type: unix.PERF_TYPE_RAW, _SOFTWARE, ...
	Config uint64 // perf_event_attr.config
	// GuestOnly counts only while the thread runs guest code
	// (exclude_host): the event is then a property of the guest's
	// execution, never of ftkvm's or the host kernel's work between
	// KVM_RUNs. Guest ring 0 and ring 3 are both counted (neither
	// exclude_kernel nor exclude_user).
	GuestOnly bool
	// Margin is the skid allowance rr settled on for this CPU family:
	// how far past the programmed overflow the counter's interrupt may
	// land, in events. The margin in use is the larger of this and twice
	// the skid measured at start (vmm.MeasureSkid).
	Margin uint64
}

// TaskClock is the software task-clock event (nanoseconds of the thread's
// CPU time, guest time included). It counts no guest events, but it can
// be opened on every Linux, with or without a PMU: the tests drive the
// counter's overflow signal, the kick out of KVM_RUN and the step after it
// with it.
var TaskClock = Event{Name: "task-clock (software)", Type: unix.PERF_TYPE_SOFTWARE, Config: unix.PERF_COUNT_SW_TASK_CLOCK}

// CPU identifies the host processor the way the event tables need it.
type CPU struct {
	Vendor         string // CPUID vendor string: GenuineIntel, AuthenticAMD
	Family, Model  int    // display family and model (extended fields folded in)
	Name           string // model name, for messages
	Hypervisor     bool   // CPUID's hypervisor bit: this host is itself a guest
	RawFamilyModel string // "family 0x19 model 0x11", for messages
}

// HostCPU reads the boot processor's identification from /proc/cpuinfo.
func HostCPU() (CPU, error) {
	f, err := os.Open("/proc/cpuinfo")
	if err != nil {
		return CPU{}, fmt.Errorf("read the CPU's identification: %w", err)
	}
	defer f.Close()
	return parseCPUInfo(f)
}

// parseCPUInfo reads the first processor's block of /proc/cpuinfo.
func parseCPUInfo(r io.Reader) (CPU, error) {
	var c CPU
	var haveFamily, haveModel bool
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		line := sc.Text()
		if strings.TrimSpace(line) == "" {
			if c.Vendor != "" {
				break // the end of the first processor's block
			}
			continue
		}
		key, val, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		key, val = strings.TrimSpace(key), strings.TrimSpace(val)
		switch key {
		case "vendor_id":
			c.Vendor = val
		case "cpu family":
			n, err := strconv.Atoi(val)
			if err != nil {
				return c, fmt.Errorf("/proc/cpuinfo: cpu family %q: %w", val, err)
			}
			c.Family, haveFamily = n, true
		case "model":
			n, err := strconv.Atoi(val)
			if err != nil {
				return c, fmt.Errorf("/proc/cpuinfo: model %q: %w", val, err)
			}
			c.Model, haveModel = n, true
		case "model name":
			c.Name = val
		case "flags":
			c.Hypervisor = slicesContains(strings.Fields(val), "hypervisor")
		}
	}
	if err := sc.Err(); err != nil {
		return c, fmt.Errorf("/proc/cpuinfo: %w", err)
	}
	if c.Vendor == "" || !haveFamily || !haveModel {
		return c, fmt.Errorf("/proc/cpuinfo names no x86 vendor, family and model")
	}
	c.RawFamilyModel = fmt.Sprintf("family %#x model %#x", c.Family, c.Model)
	return c, nil
}

func slicesContains(s []string, v string) bool {
	for _, x := range s {
		if x == v {
			return true
		}
	}
	return false
}

// Retired conditional branches, the event rr counts. rr found it exact
// where retired instructions are not (on Intel, an interrupt or a fault
// can add one to instructions retired, so the same execution counts
// differently from run to run), and a conditional branch count plus the
// registers (RIP first) identifies a point of a program's execution: the
// count orders the stretches between branches, the registers place the
// instruction inside one (Position). The raw codes are rr's (its PmuConfig
// table, per microarchitecture), written as perf's raw x86 config, event
// select | unit mask << 8; rr writes them with 0x51 in bits 16-23, the
// enable, interrupt and user-mode bits of IA32_PERFEVTSELx, which the
// kernel sets itself from the attributes and masks out of a raw config.
const (
	// Intel BR_INST_RETIRED.CONDITIONAL: event 0xc4, unit mask 0x01
	// (Nehalem to Comet Lake).
	intelCondBranches = 0x01c4
	// Intel BR_INST_RETIRED.COND: event 0xc4, unit mask 0x11 (Ice Lake
	// and later big cores, where 0x01 means something else).
	intelCondBranchesICL = 0x11c4
	// Intel Atom cores (Silvermont, Goldmont, Tremont):
	// BR_INST_RETIRED.JCC, event 0xc4 unit mask 0x7e.
	intelCondBranchesAtom = 0x7ec4
	// AMD Zen (families 17h, 19h, 1Ah): PMCx0D1, retired conditional
	// branch instructions, unit mask 0.
	amdCondBranches = 0x00d1
)

// Intel family 6 models (CPUID display model) by rr's grouping.
var intelModels = map[int]struct {
	name   string
	config uint64
	margin uint64
}{
	0x1a: {"Nehalem", intelCondBranches, 100}, 0x1e: {"Nehalem", intelCondBranches, 100}, 0x2e: {"Nehalem", intelCondBranches, 100},
	0x25: {"Westmere", intelCondBranches, 100}, 0x2c: {"Westmere", intelCondBranches, 100}, 0x2f: {"Westmere", intelCondBranches, 100},
	0x2a: {"Sandy Bridge", intelCondBranches, 100}, 0x2d: {"Sandy Bridge", intelCondBranches, 100}, 0x3e: {"Ivy Bridge", intelCondBranches, 100},
	0x3a: {"Ivy Bridge", intelCondBranches, 100},
	0x3c: {"Haswell", intelCondBranches, 100}, 0x3f: {"Haswell", intelCondBranches, 100}, 0x45: {"Haswell", intelCondBranches, 100}, 0x46: {"Haswell", intelCondBranches, 100},
	0x3d: {"Broadwell", intelCondBranches, 100}, 0x47: {"Broadwell", intelCondBranches, 100}, 0x4f: {"Broadwell", intelCondBranches, 100}, 0x56: {"Broadwell", intelCondBranches, 100},
	0x4e: {"Skylake", intelCondBranches, 100}, 0x55: {"Skylake", intelCondBranches, 100}, 0x5e: {"Skylake", intelCondBranches, 100},
	0x8e: {"Kaby Lake", intelCondBranches, 100}, 0x9e: {"Kaby Lake", intelCondBranches, 100},
	0xa5: {"Comet Lake", intelCondBranches, 100}, 0xa6: {"Comet Lake", intelCondBranches, 100},
	0x37: {"Silvermont", intelCondBranchesAtom, 100}, 0x4c: {"Silvermont", intelCondBranchesAtom, 100}, 0x57: {"Silvermont", intelCondBranchesAtom, 100},
	0x5c: {"Goldmont", intelCondBranchesAtom, 100}, 0x5f: {"Goldmont", intelCondBranchesAtom, 100}, 0x7a: {"Goldmont", intelCondBranchesAtom, 100},
	0x9c: {"Tremont", intelCondBranchesAtom, 100},
	0x6a: {"Ice Lake", intelCondBranchesICL, 100}, 0x7e: {"Ice Lake", intelCondBranchesICL, 100}, 0x86: {"Ice Lake", intelCondBranchesICL, 100},
	0x8c: {"Tiger Lake", intelCondBranchesICL, 100}, 0x8d: {"Tiger Lake", intelCondBranchesICL, 100},
	0xa7: {"Rocket Lake", intelCondBranchesICL, 100},
	0x97: {"Alder Lake", intelCondBranchesICL, 125}, 0x9a: {"Alder Lake", intelCondBranchesICL, 125},
	0xb7: {"Raptor Lake", intelCondBranchesICL, 125}, 0xba: {"Raptor Lake", intelCondBranchesICL, 125}, 0xbf: {"Raptor Lake", intelCondBranchesICL, 125},
	0x8f: {"Sapphire Rapids", intelCondBranchesICL, 125}, 0xcf: {"Emerald Rapids", intelCondBranchesICL, 125}, 0xad: {"Granite Rapids", intelCondBranchesICL, 125},
	0xaa: {"Meteor Lake", intelCondBranchesICL, 125}, 0xbd: {"Lunar Lake", intelCondBranchesICL, 125}, 0xc6: {"Arrow Lake", intelCondBranchesICL, 125},
}

// BranchEvent returns the guest-only retired-conditional-branch event for
// cpu, or an error naming the CPU when no exact event is known for it (as
// rr, ftkvm refuses rather than guess: an event that miscounts once makes
// a replica diverge).
func BranchEvent(cpu CPU) (Event, error) {
	switch cpu.Vendor {
	case "GenuineIntel":
		if m, ok := intelModels[cpu.Model]; ok && cpu.Family == 6 {
			return Event{
				Name:      fmt.Sprintf("Intel %s: retired conditional branches (BR_INST_RETIRED, raw %#x)", m.name, m.config),
				Type:      unix.PERF_TYPE_RAW,
				Config:    m.config,
				GuestOnly: true,
				Margin:    m.margin,
			}, nil
		}
	case "AuthenticAMD":
		if cpu.Family >= 0x17 && cpu.Family <= 0x1a {
			// rr's margin for Zen is 10000: its overflow interrupt skids
			// far more than Intel's.
			return Event{
				Name:      fmt.Sprintf("AMD Zen (family %#x): retired conditional branches (PMCx0D1, raw %#x)", cpu.Family, uint64(amdCondBranches)),
				Type:      unix.PERF_TYPE_RAW,
				Config:    amdCondBranches,
				GuestOnly: true,
				Margin:    10000,
			}, nil
		}
	}
	return Event{}, fmt.Errorf("no exact retired-conditional-branch event is known for %s %s (%s)", cpu.Vendor, cpu.RawFamilyModel, cpu.Name)
}
