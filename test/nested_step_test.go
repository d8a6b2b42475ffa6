package test

import (
	"context"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/ftkvm/ftkvm/test/nested"
)

// TestNestedStepClock runs the step clock on the nested tier's KVM (kvm_amd
// in an L1 under QEMU TCG), which single-steps at every ring. Whether the
// step clock may run there is what `ftkvm probe` finds: with exact
// single-stepping the RDTSC workload passes at ring 3 as well as ring 0,
// every RDTSC served from virtual time; without it (measured: this L1's
// kvm_amd, loaded with nrips=0, runs on without single-step traps after a
// port write) `ftkvm run --epoch step` refuses with one line and status 125
// before the guest runs. Either way probe and run must agree.
func TestNestedStepClock(t *testing.T) {
	nestedTest(t)
	ctx, cancel := context.WithTimeout(context.Background(), 25*time.Minute)
	defer cancel()
	stepRun := func(cmdline string) string {
		return l1FTKVM + " --log-level info run --epoch step --kernel " + l1TestOS + " --mem 32 --cmdline '" + cmdline + "'"
	}
	res := runNested(ctx, t, nested.Config{
		Files: map[string]string{l1FTKVM: ftkvmBin, l1TestOS: testosELF},
		Commands: []nested.Command{
			{Name: "probe", Cmd: l1FTKVM + " probe"},
			// The lowest timer rate: stepping there runs ~1k instructions/s,
			// and every tick costs ~100.
			{Name: "step-ring0", Cmd: stepRun("workload=tsc ring=0 samples=2 work=10 hz=19"), Timeout: 8 * time.Minute},
			{Name: "step-ring3", Cmd: stepRun("workload=tsc samples=2 work=10 hz=19"), Timeout: 8 * time.Minute},
		},
	})
	probe := res.Command("probe")
	if probe == nil || !probe.OK() {
		t.Fatalf("probe in L1: %v", probe)
	}
	m := regexp.MustCompile(`(?m)^epoch clock step\s+(yes|no) \((.*)\)$`).FindStringSubmatch(probe.Output)
	if m == nil {
		t.Fatalf("probe does not report the step clock:\n%s", probe.Output)
	}
	t.Logf("L1 probe: epoch clock step %s (%s)", m[1], m[2])
	for _, name := range []string{"step-ring0", "step-ring3"} {
		c := res.Command(name)
		if c == nil {
			t.Fatalf("%s did not run", name)
		}
		if m[1] == "no" {
			if c.OK() || !strings.Contains(c.Output, "ftkvm: step clock: single-step on this KVM is not exact") || strings.Contains(c.Output, "tsc 1 ") {
				t.Errorf("%s: the probe refuses the step clock, but run did not refuse it cleanly:\n%s", name, c.Output)
			}
			continue
		}
		if !c.OK() || !strings.Contains(c.Output, "testos: PASS") || !strings.Contains(c.Output, "tsc hash=") ||
			!regexp.MustCompile("emulated(\x1b\\[0m)?=3 ").MatchString(c.Output) { // logrus colours a terminal
			t.Errorf("%s: %v\n%s", name, c.Err(), c.Output)
			continue
		}
		for _, v := range regexp.MustCompile(`(?m)^tsc \d+ value=(\d+) `).FindAllStringSubmatch(c.Output, -1) {
			if len(v[1]) > 12 { // virtual nanoseconds, not a host TSC
				t.Errorf("%s: RDTSC value %s is not virtual time", name, v[1])
			}
		}
	}
}
