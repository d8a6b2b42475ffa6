package test

import (
	"fmt"
	"regexp"
	"strconv"
	"testing"
	"time"
)

// A guest that keeps time by counting its timer interrupts must count as
// many as the elapsed time holds, replicated as well as alone: ticks may
// arrive late (only at epoch ends both replicas find), but none may be
// lost. The clock workload samples its tick count and the CMOS time every
// few ticks; the test compares the two clocks over at least 10 s of guest
// time. It is a ratio of two guest clocks, not a timed assertion.

// The clock workload as the tests run it: a 100 Hz timer, a sample every
// 200 ticks, 12 samples (about 22 s of guest time). A sample costs the
// guest about a third of a second here (its CMOS reads run at ring 0,
// which this KVM emulates, with interrupts off), and more when a strict
// primary waits for an acknowledgement at each of its clock reads and
// console bytes; samples two seconds apart leave the guest most of its
// time to take its ticks in. The replicas must get their CPU: a guest
// computing without exits takes one tick per checkpoint epoch, and on a
// host so loaded that a kick, a capture and a delivery take longer than a
// timer period, the guest falls behind (measured here at a load average of
// 14 on 2 cores: about 75 ticks per CMOS second replicated, 99 alone).
const (
	clockHz      = 100
	clockCmdline = "workload=clock hz=100 wait=200 samples=12"
)

type clockSample struct {
	cmos  time.Time
	ticks int64
}

var clockLine = regexp.MustCompile(`^clock pit=\d+ cmos=(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) ticks=(\d+)$`)

func parseClock(t *testing.T, body []string) []clockSample {
	t.Helper()
	var s []clockSample
	for _, l := range body {
		m := clockLine.FindStringSubmatch(l)
		if m == nil {
			t.Fatalf("line %q does not match %v", l, clockLine)
		}
		ts, err := time.Parse("2006-01-02 15:04:05", m[1])
		if err != nil {
			t.Fatal(err)
		}
		n, _ := strconv.ParseInt(m[2], 10, 64)
		s = append(s, clockSample{ts, n})
	}
	return s
}

// tickRate is the guest's tick count per second of CMOS time: the slope of
// a least-squares line through the samples (CMOS time has whole seconds
// only; the line averages that out). It also returns the spans of CMOS
// time and of ticks the samples cover.
func tickRate(s []clockSample) (rate float64, secs, ticks int64, err error) {
	if len(s) < 3 {
		return 0, 0, 0, fmt.Errorf("%d samples", len(s))
	}
	var sx, sy, sxx, sxy float64
	for i, c := range s {
		if i > 0 && c.cmos.Before(s[i-1].cmos) {
			return 0, 0, 0, fmt.Errorf("CMOS time went backwards: %v after %v", c.cmos, s[i-1].cmos)
		}
		if i > 0 && c.ticks < s[i-1].ticks {
			return 0, 0, 0, fmt.Errorf("tick count went backwards: %d after %d", c.ticks, s[i-1].ticks)
		}
		x := c.cmos.Sub(s[0].cmos).Seconds()
		y := float64(c.ticks - s[0].ticks)
		sx, sy, sxx, sxy = sx+x, sy+y, sxx+x*x, sxy+x*y
	}
	n := float64(len(s))
	d := n*sxx - sx*sx
	if d == 0 {
		return 0, 0, 0, fmt.Errorf("CMOS time stood still over %d samples", len(s))
	}
	last := s[len(s)-1]
	return (n*sxy - sx*sy) / d, int64(last.cmos.Sub(s[0].cmos) / time.Second), last.ticks - s[0].ticks, nil
}

func checkTicks(t *testing.T, body []string) {
	t.Helper()
	rate, secs, ticks, err := tickRate(parseClock(t, body))
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%d ticks of a %d Hz timer in %d s of CMOS time: %.1f ticks per CMOS second (%.3f)", ticks, clockHz, secs, rate, rate/clockHz)
	if secs < 10 {
		t.Fatalf("only %d s of CMOS time, want at least 10", secs)
	}
	if rate < clockHz*0.95 || rate > clockHz*1.05 {
		t.Fatalf("the guest counted %.1f ticks per second of CMOS time, want %d within 5%%", rate, clockHz)
	}
}

func TestClockTicksKeepTime(t *testing.T) {
	if testing.Short() {
		t.Skip("runs the guest for 20 s per case")
	}
	w := workload{name: "clock", cmdline: clockCmdline}
	t.Run("run", func(t *testing.T) {
		checkTicks(t, expectPass(t, runTestOS(t, "", clockCmdline), "clock"))
	})
	for _, policy := range []string{"output-commit", "strict"} {
		t.Run(policy, func(t *testing.T) {
			pr := startPair(t, w, "--policy", policy)
			res := pr.primary.wait()
			if b := pr.backup.wait(); res.status != 0 || b.status != 0 {
				t.Fatalf("status: primary %d, backup %d\nprimary:\n%s\nbackup:\n%s", res.status, b.status, res.stderr, b.stderr)
			}
			checkTicks(t, expectPass(t, res, "clock"))
		})
	}
}
