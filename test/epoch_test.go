package test

import (
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

// The epoch clocks of `ftkvm run --epoch` (the step clock's record/replay
// tests are in vmm/step_test.go).

var tscLine = regexp.MustCompile(`^tsc (\d+) value=(\d+) delta=(\d+)$`)

// TestEpochStepRDTSC runs testos's RDTSC workload at ring 0 under the step
// clock: every RDTSC is served by ftkvm from virtual time (nanoseconds since
// the guest started, 1 GHz), so the values are small, increasing, and end
// in a hash line; the guest passes.
func TestEpochStepRDTSC(t *testing.T) {
	requireKVM(t)
	r := ftkvm(t, 3*time.Minute, "", "--log-level", "info", "run", "--epoch", "step", "--kernel", testosELF, "--mem", "64",
		"--cmdline", "workload=tsc ring=0 samples=3 work=100")
	body := expectPass(t, r, "tsc")
	if len(body) != 4 || !strings.HasPrefix(body[3], "tsc hash=") {
		t.Fatalf("want 3 tsc lines and the hash, got:\n%s", strings.Join(body, "\n"))
	}
	var last uint64
	for i, l := range body[:3] {
		m := tscLine.FindStringSubmatch(l)
		if m == nil {
			t.Fatalf("line %q", l)
		}
		v, _ := strconv.ParseUint(m[2], 10, 64)
		// Virtual time: the guest ran for seconds at most, while the
		// host's own TSC counts from its boot.
		if v <= last || v > uint64(10*time.Minute) {
			t.Fatalf("sample %d = %d (previous %d): not the environment's virtual time", i+1, v, last)
		}
		last = v
	}
	// The log line at the end counts the emulated reads: four (one before
	// the loop), and the instructions stepped.
	if !regexp.MustCompile(`emulated=4 `).MatchString(r.stderr) || !regexp.MustCompile(`steps=[1-9]\d{4,}`).MatchString(r.stderr) {
		t.Fatalf("stats on stderr do not show 4 emulated RDTSCs and the steps:\n%s", r.stderr)
	}
}

// TestEpochStepRing3 runs a ring-3 workload under the step clock. Where
// `ftkvm probe` finds single-step works at ring 3 it passes; where it does
// not (this project's hosts), ftkvm stops before the guest's first ring-3
// instruction with one error line and status 125, and the workload prints
// nothing.
func TestEpochStepRing3(t *testing.T) {
	requireKVM(t)
	probe := ftkvm(t, time.Minute, "", "probe")
	ring3 := regexp.MustCompile(`(?m)^single-step ring 3\s+yes`).MatchString(probe.stdout)
	r := ftkvm(t, 3*time.Minute, "", "run", "--epoch", "step", "--kernel", testosELF, "--mem", "64", "--cmdline", "workload=tsc samples=1 work=10")
	if ring3 {
		expectPass(t, r, "tsc")
		return
	}
	lines := strings.Split(strings.TrimSpace(r.stderr), "\n")
	if r.status != 125 || len(lines) != 1 || !strings.HasPrefix(lines[0], "ftkvm: the step clock cannot count ring-3 instructions") ||
		!strings.Contains(lines[0], "about to enter ring 3") {
		t.Fatalf("status %d, stderr:\n%s", r.status, r.stderr)
	}
	if strings.Contains(r.stdout, "tsc ") {
		t.Fatalf("ring-3 code ran:\n%s", r.stdout)
	}
}

// TestEpochPerfRefused: the vCPU loop does not run the perf clock, and no
// host of this project has performance counters; `--epoch perf` fails with
// one `ftkvm:` line and status 125 before any guest code runs, naming the
// first missing piece, and `ftkvm probe` names the same one.
func TestEpochPerfRefused(t *testing.T) {
	requireKVM(t)
	r := ftkvm(t, time.Minute, "", "run", "--epoch", "perf", "--kernel", testosELF, "--mem", "64", "--cmdline", "workload=tsc")
	lines := strings.Split(strings.TrimSpace(r.stderr), "\n")
	if r.status != 125 || len(lines) != 1 || !strings.HasPrefix(lines[0], "ftkvm: --epoch perf: ") || r.stdout != "" {
		t.Fatalf("status %d, stdout %q, stderr:\n%s", r.status, r.stdout, r.stderr)
	}
	probe := ftkvm(t, time.Minute, "", "probe")
	m := regexp.MustCompile(`(?m)^epoch clock perf\s+no \((.+)\)$`).FindStringSubmatch(probe.stdout)
	if m == nil {
		t.Fatalf("probe does not say the perf clock is unusable:\n%s", probe.stdout)
	}
	// The piece is what comes before its details in parentheses (a
	// measured skid may differ between the two runs).
	piece, _, _ := strings.Cut(m[1], "(")
	if !strings.HasPrefix(lines[0], "ftkvm: --epoch perf: the perf epoch clock cannot run here: "+piece) {
		t.Fatalf("probe (%s) and run (%s) disagree about the missing piece", m[1], lines[0])
	}
	if !regexp.MustCompile(`(?m)^epoch clock step\s+(yes|no) \(`).MatchString(probe.stdout) {
		t.Fatalf("probe does not report the step clock:\n%s", probe.stdout)
	}
}

// TestEpochUnknown: a clock that does not exist is a usage error.
func TestEpochUnknown(t *testing.T) {
	r := ftkvm(t, time.Minute, "", "run", "--epoch", "sundial", "--kernel", testosELF)
	if r.status == 0 || !strings.Contains(r.stderr, "--epoch") {
		t.Fatalf("status %d, stderr:\n%s", r.status, r.stderr)
	}
}
