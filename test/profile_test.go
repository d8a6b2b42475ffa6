package test

import (
	"regexp"
	"strconv"
	"testing"
	"time"
)

// `ftkvm run --exit-stats` prints the exit profile after the guest's
// output: a header whose exit count the reason lines add up to, and the
// test OS's console port among the ports. (The counting itself is checked
// against the machine's Stats in vmm's TestExitProfileAddsUp.)
func TestRunExitStats(t *testing.T) {
	requireKVM(t)
	r := ftkvm(t, 3*time.Minute, "", "run", "--kernel", testosELF, "--mem", "64",
		"--cmdline", "workload=counter lines=3 hz=200", "--exit-stats")
	expectPass(t, r, "counter")
	head := regexp.MustCompile(`(?m)^exit profile: \S+ wall, (\d+) exits`).FindStringSubmatch(r.stderr)
	if head == nil {
		t.Fatalf("no exit profile on stderr:\n%s", r.stderr)
	}
	total, _ := strconv.ParseUint(head[1], 10, 64)
	var sum uint64
	reasons := regexp.MustCompile(`(?m)^  (IO|MMIO|HLT|IRQ_WINDOW_OPEN|INTR|X86_RDMSR|X86_WRMSR) +(\d+) `).FindAllStringSubmatch(r.stderr, -1)
	for _, m := range reasons {
		n, _ := strconv.ParseUint(m[2], 10, 64)
		sum += n
	}
	if len(reasons) == 0 || sum != total {
		t.Fatalf("reason lines sum to %d exits, the header says %d:\n%s", sum, total, r.stderr)
	}
	if !regexp.MustCompile(`(?m)^  0x3f8 +com1 +\d+ +[1-9]\d*$`).MatchString(r.stderr) {
		t.Fatalf("no console port writes in the port table:\n%s", r.stderr)
	}
}
