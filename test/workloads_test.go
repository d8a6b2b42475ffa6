package test

import (
	"fmt"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

// Each testos workload under `ftkvm run` on the real /dev/kvm, checked line
// by line against what the workload must print.

func runTestOS(t *testing.T, stdin, cmdline string) result {
	t.Helper()
	requireKVM(t)
	return ftkvm(t, 3*time.Minute, stdin, "run", "--kernel", testosELF, "--mem", "64", "--cmdline", cmdline)
}

// expectPass checks the banner, the PASS line and the exit status, and
// returns the workload's own lines.
func expectPass(t *testing.T, r result, workload string) []string {
	t.Helper()
	lines := r.lines()
	if r.status != 0 {
		t.Fatalf("exit status %d, want 0\nstdout:\n%s\nstderr:\n%s", r.status, r.stdout, r.stderr)
	}
	if len(lines) < 2 || !strings.HasPrefix(lines[0], "testos: workload="+workload) || lines[len(lines)-1] != "testos: PASS" {
		t.Fatalf("want banner and PASS, got:\n%s\nstderr:\n%s", r.stdout, r.stderr)
	}
	return lines[1 : len(lines)-1]
}

func TestCounter(t *testing.T) {
	const n = 15
	body := expectPass(t, runTestOS(t, "", fmt.Sprintf("workload=counter lines=%d hz=200", n)), "counter")
	re := regexp.MustCompile(`^counter (\d+) ticks=(\d+)$`)
	if len(body) != n {
		t.Fatalf("%d lines, want %d:\n%s", len(body), n, strings.Join(body, "\n"))
	}
	last := -1
	for i, l := range body {
		m := re.FindStringSubmatch(l)
		if m == nil {
			t.Fatalf("line %q does not match %v", l, re)
		}
		if k, _ := strconv.Atoi(m[1]); k != i+1 {
			t.Fatalf("line %d numbered %d", i+1, k)
		}
		ticks, _ := strconv.Atoi(m[2])
		if ticks < last {
			t.Fatalf("ticks went backwards: %d after %d", ticks, last)
		}
		last = ticks
	}
	if last == 0 {
		t.Fatalf("no timer tick reached the guest")
	}
}

func TestInterleave(t *testing.T) {
	const n = 12
	body := expectPass(t, runTestOS(t, "", fmt.Sprintf("workload=interleave lines=%d hz=250", n)), "interleave")
	next := map[string]int{"A": 1, "B": 1}
	for _, l := range body {
		f := strings.Fields(l)
		if len(f) != 2 || (f[0] != "A" && f[0] != "B") {
			t.Fatalf("unexpected line %q", l)
		}
		k, _ := strconv.Atoi(f[1])
		if k != next[f[0]] {
			t.Fatalf("task %s printed %d, want %d", f[0], k, next[f[0]])
		}
		next[f[0]]++
	}
	if next["A"] != n+1 || next["B"] != n+1 {
		t.Fatalf("tasks stopped early: %v", next)
	}
}

// computeSums recomputes the compute workload's checksums independently:
// an xorshift64 byte stream hashed with FNV-1a 64 (guest/testos/README.md).
func computeSums(mib, every int) map[int]string {
	x := uint64(0x9E3779B97F4A7C15)
	h := uint64(0xcbf29ce484222325)
	sums := map[int]string{}
	for k := 1; k <= mib; k++ {
		for i := 0; i < (1<<20)/8; i++ {
			x ^= x << 13
			x ^= x >> 7
			x ^= x << 17
			v := x
			for j := 0; j < 8; j++ {
				h ^= v & 0xff
				h *= 0x100000001b3
				v >>= 8
			}
		}
		if k%every == 0 || k == mib {
			sums[k] = fmt.Sprintf("%016x", h)
		}
	}
	return sums
}

func TestCompute(t *testing.T) {
	const mib, every = 12, 4
	body := expectPass(t, runTestOS(t, "", fmt.Sprintf("workload=compute mib=%d every=%d hz=100", mib, every)), "compute")
	want := computeSums(mib, every)
	re := regexp.MustCompile(`^compute mib=(\d+) sum=([0-9a-f]{16})$`)
	got := 0
	for _, l := range body {
		if strings.HasPrefix(l, "compute tick ") {
			continue
		}
		m := re.FindStringSubmatch(l)
		if m == nil {
			t.Fatalf("unexpected line %q", l)
		}
		k, _ := strconv.Atoi(m[1])
		if want[k] != m[2] {
			t.Fatalf("at %d MiB the guest says %s, the host computes %s", k, m[2], want[k])
		}
		got++
	}
	if got != len(want) {
		t.Fatalf("%d checksum lines, want %d", got, len(want))
	}
}

func TestClock(t *testing.T) {
	before := time.Now().UTC().Add(-2 * time.Second)
	body := expectPass(t, runTestOS(t, "", "workload=clock samples=4 hz=100"), "clock")
	after := time.Now().UTC().Add(2 * time.Second)
	re := regexp.MustCompile(`^clock pit=(\d+) cmos=(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) ticks=(\d+)$`)
	if len(body) != 4 {
		t.Fatalf("%d samples, want 4:\n%s", len(body), strings.Join(body, "\n"))
	}
	var prev time.Time
	for _, l := range body {
		m := re.FindStringSubmatch(l)
		if m == nil {
			t.Fatalf("line %q does not match %v", l, re)
		}
		// hz=100: counter 0 reloads at 1193182/100 = 11931.
		if pit, _ := strconv.Atoi(m[1]); pit > 11932 {
			t.Fatalf("PIT counter %d above its reload value", pit)
		}
		ts, err := time.Parse("2006-01-02 15:04:05", m[2])
		if err != nil {
			t.Fatal(err)
		}
		// The RTC is the host's UTC time when ftkvm started, advancing
		// with virtual time.
		if ts.Before(before.Truncate(time.Second)) || ts.After(after) {
			t.Fatalf("CMOS time %v outside [%v, %v]", ts, before, after)
		}
		if ts.Before(prev) {
			t.Fatalf("CMOS time went backwards: %v after %v", ts, prev)
		}
		prev = ts
	}
}

func TestEcho(t *testing.T) {
	in := "hello world\nFault Tolerance\r\nquit\n"
	body := expectPass(t, runTestOS(t, in, "workload=echo"), "echo")
	want := []string{"echo: ready", "echo: HELLO WORLD", "echo: FAULT TOLERANCE"}
	if len(body) < len(want) {
		t.Fatalf("got:\n%s", strings.Join(body, "\n"))
	}
	for i, w := range want {
		if body[i] != w {
			t.Fatalf("line %d = %q, want %q", i, body[i], w)
		}
	}
}

func TestUnknownWorkloadFails(t *testing.T) {
	r := runTestOS(t, "", "workload=nonsense")
	if r.status == 0 {
		t.Fatalf("unknown workload exited 0:\n%s", r.stdout)
	}
}
