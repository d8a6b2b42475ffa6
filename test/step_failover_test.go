package test

import (
	"fmt"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

// Failover drills under the step clock (docs/STEP-CLOCK.md): on this host single-step
// works at ring 0 only, so the workloads run at ring 0 (testos ring=0),
// small, since every instruction is a KVM exit (~1e5 steps/s).

var stepFlags = []string{"--epoch", "step"}

var stepWorkloads = []workload{
	{
		name: "interleave", cmdline: "workload=interleave ring=0 lines=3 work=2000 hz=100", lines: 8, flags: stepFlags,
		check: checkInterleave(3),
	},
	{
		// RDTSC at ring 0, an environment instruction under the step
		// clock: the guest hashes every value it read, so output joined
		// across a failover is consistent only if the backup replayed the
		// primary's values.
		name: "tsc", cmdline: "workload=tsc ring=0 samples=8 work=200", lines: 10, flags: stepFlags,
		check: checkTSC(8),
	},
}

// checkTSC checks the tsc workload's lines: increasing values, deltas that
// match, and the guest's FNV-1a hash over the printed values.
func checkTSC(samples int) func(t *testing.T, body []string) {
	return func(t *testing.T, body []string) {
		re := regexp.MustCompile(`^tsc (\d+) value=(\d+) delta=(\d+)$`)
		if len(body) != samples+1 {
			t.Fatalf("%d lines, want %d:\n%s", len(body), samples+1, strings.Join(body, "\n"))
		}
		h := uint64(0xcbf29ce484222325)
		var prev uint64
		for i, l := range body[:samples] {
			m := re.FindStringSubmatch(l)
			if m == nil || m[1] != strconv.Itoa(i+1) {
				t.Fatalf("line %q", l)
			}
			v, _ := strconv.ParseUint(m[2], 10, 64)
			d, _ := strconv.ParseUint(m[3], 10, 64)
			if i > 0 && (v < prev || d != v-prev) {
				t.Fatalf("value %d after %d with delta %d", v, prev, d)
			}
			prev = v
			for b := 0; b < 8; b++ {
				h ^= (v >> (8 * b)) & 0xff
				h *= 0x100000001b3
			}
		}
		if want := fmt.Sprintf("tsc hash=%016x", h); body[samples] != want {
			t.Fatalf("%q, but the printed values hash to %q: the values are not those the guest read", body[samples], want)
		}
	}
}

func TestStepClockFailoverDrills(t *testing.T) {
	requireKVM(t)
	for _, w := range stepWorkloads {
		t.Run(w.name, func(t *testing.T) {
			// The workloads' drills run side by side: most of a drill is
			// waiting (guest timer ticks, process start), not computing.
			t.Parallel()
			r := newRand(t)
			// Undisturbed, in verify mode: the backup compares a state
			// hash at every epoch end and each output with the primary's.
			pr := startPair(t, w, "--verify", "--epoch-instructions", "4096")
			begin := time.Now()
			res := pr.primary.wait()
			whole := time.Since(begin)
			bres := pr.backup.wait()
			if res.status != 0 || bres.status != 0 {
				t.Fatalf("undisturbed run: primary status %d, backup %d\nprimary stderr:\n%s\nbackup stderr:\n%s", res.status, bres.status, res.stderr, bres.stderr)
			}
			w.checkComplete(t, res.stdout)
			if strings.Contains(bres.stderr, "DIVERGENCE") || !strings.Contains(bres.stderr, "0 divergences") {
				t.Fatalf("verify mode saw a divergence:\n%s", bres.stderr)
			}
			failovers := 0
			for i := range drillMoments {
				pr := startPair(t, w)
				time.Sleep(time.Duration(r.Int64N(int64(whole))))
				pr.primary.kill()
				bres := pr.backup.wait()
				out, _ := mergeSeam(t, pr.primary.stdout(), bres)
				if strings.Contains(bres.stderr, "taking over") {
					failovers++
				}
				if bres.status != 0 {
					t.Fatalf("moment %d: the backup exited with status %d\nbackup stderr:\n%s", i, bres.status, bres.stderr)
				}
				t.Run(fmt.Sprint(i), func(t *testing.T) {
					defer func() {
						if t.Failed() {
							t.Logf("primary stdout:\n%s\nbackup stdout:\n%s\nbackup stderr:\n%s", pr.primary.stdout(), bres.stdout, bres.stderr)
						}
					}()
					w.checkComplete(t, out)
				})
			}
			t.Logf("%d moments over a %v run: %d failovers", drillMoments, whole.Round(time.Millisecond), failovers)
			if failovers == 0 {
				t.Errorf("no moment fell before the guest's end: nothing was drilled")
			}
		})
	}
}
