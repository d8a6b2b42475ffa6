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

// A replicated pair with --exit-stats: the backup received the epoch ends
// its primary sent, each kind as many, and the primary's checkpoint
// epochs are its checkpoints at kicks plus its full ones.
func TestReplicaExitStats(t *testing.T) {
	requireKVM(t)
	w := workloadNamed(t, "counter")
	w.flags = append(append([]string(nil), w.flags...), "--exit-stats")
	pr := startPair(t, w)
	p := pr.primary.wait()
	if p.status != 0 {
		t.Fatalf("primary status %d\n%s", p.status, p.stderr)
	}
	w.checkComplete(t, p.stdout)
	b := pr.backup.wait()
	if b.status != 0 {
		t.Fatalf("backup status %d\n%s", b.status, b.stderr)
	}
	ends := func(role, dir, stderr string) [4]uint64 {
		t.Helper()
		m := regexp.MustCompile(`(?m)^epoch ends ` + dir + `: (\d+) at an exit, (\d+) at a halt, (\d+) by a checkpoint at a kick, (\d+) full checkpoints$`).FindStringSubmatch(stderr)
		if m == nil || !regexp.MustCompile(`(?m)^exit profile: `).MatchString(stderr) {
			t.Fatalf("%s: no exit and replica profile on stderr:\n%s", role, stderr)
		}
		var e [4]uint64
		for i := range e {
			e[i], _ = strconv.ParseUint(m[i+1], 10, 64)
		}
		return e
	}
	sent, recv := ends("primary", "sent", p.stderr), ends("backup", "received", b.stderr)
	if sent != recv || sent[0]+sent[2] == 0 {
		t.Fatalf("epoch ends sent %v, received %v\nprimary:\n%s\nbackup:\n%s", sent, recv, p.stderr, b.stderr)
	}
	m := regexp.MustCompile(`(?m)^replica profile \(primary\): \d+ epochs, (\d+) ended by a checkpoint`).FindStringSubmatch(p.stderr)
	if m == nil {
		t.Fatalf("no replica profile header:\n%s", p.stderr)
	}
	if k, _ := strconv.ParseUint(m[1], 10, 64); k != sent[2]+sent[3] {
		t.Fatalf("%d checkpoint epochs, %d checkpoints sent at kicks and %d full", k, sent[2], sent[3])
	}
}
