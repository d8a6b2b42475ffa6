package test

import (
	"bufio"
	"fmt"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

// BenchmarkRing3Compute compares the test guest's ring-3 compute loop
// under ftkvm with the very same loop on the host: guest/testos/hash.h,
// compiled for the host with the guest's code-generation flags. The guest
// rate is taken between its first and last checksum lines, so boot is not
// counted; the guest's timer ticks (100 Hz, a kick each) are. Run it
// with -benchtime 5x or more on a quiet machine:
//
//	go test -run '^$' -bench Ring3Compute -benchtime 5x ./test/
func BenchmarkRing3Compute(b *testing.B) {
	const mib, every = 256, 32
	host := filepath.Join(b.TempDir(), "hostloop")
	flags := "-O2 -mno-red-zone -mgeneral-regs-only -mno-mmx -mno-sse -mno-sse2 -mno-80387 -fno-tree-loop-distribute-patterns"
	build := fmt.Sprintf("cd %s/test/hostloop && gcc %s -c -o %s.o hash.c && gcc -O2 -o %s main.c %s.o", repoRoot, flags, host, host, host)
	if out, err := exec.Command("sh", "-c", build).CombinedOutput(); err != nil {
		b.Fatalf("%s: %v\n%s", build, err, out)
	}
	re := regexp.MustCompile(`^compute mib=(\d+) sum=([0-9a-f]+)`)
	want := computeSums(mib, every)
	// The best rate of each over b.N alternating runs: a loaded 2-core
	// machine slows either side at random, never speeds it up.
	var hostBest, guestBest float64
	for range b.N {
		out, err := exec.Command(host, strconv.Itoa(mib-every)).Output()
		if err != nil {
			b.Fatal(err)
		}
		f := strings.Fields(string(out))
		ns, _ := strconv.ParseFloat(strings.TrimPrefix(f[3], "ns="), 64)
		hostRate := float64(mib-every) / (ns / 1e9)

		cmd := exec.Command(ftkvmBin, "run", "--kernel", testosELF, "--mem", "32",
			"--cmdline", fmt.Sprintf("workload=compute mib=%d every=%d hz=100", mib, every))
		stdout, _ := cmd.StdoutPipe()
		if err := cmd.Start(); err != nil {
			b.Fatal(err)
		}
		var first, last time.Time
		var firstMiB, lastMiB int
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			m := re.FindStringSubmatch(sc.Text())
			if m == nil {
				continue
			}
			now := time.Now()
			k, _ := strconv.Atoi(m[1])
			if m[2] != want[k] {
				b.Fatalf("guest sum at %d MiB is %s, want %s", k, m[2], want[k])
			}
			if first.IsZero() {
				first, firstMiB = now, k
			}
			last, lastMiB = now, k
		}
		if err := cmd.Wait(); err != nil || lastMiB != mib {
			b.Fatalf("guest run: %v (last line at %d MiB)", err, lastMiB)
		}
		guestRate := float64(lastMiB-firstMiB) / last.Sub(first).Seconds()
		hostBest, guestBest = max(hostBest, hostRate), max(guestBest, guestRate)
	}
	b.ReportMetric(hostBest, "host-MiB/s")
	b.ReportMetric(guestBest, "guest-MiB/s")
	b.ReportMetric(guestBest/hostBest, "guest/host")
}
