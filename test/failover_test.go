package test

import (
	"fmt"
	"io"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

// Failover drills (issue 5): a primary and a backup ftkvm on this machine,
// over loopback, the primary killed with SIGKILL at random moments. The
// primary's console up to its death followed by the backup's must be the
// workload's complete output: only bytes around the seam may repeat, and
// they must repeat identically.

// drillMoments is how many random kill moments each workload gets.
const drillMoments = 20

// pair is a primary and its backup.
type pair struct {
	primary, backup *proc
}

// replicaArgs are the guest flags both replicas get. The peer timeout is
// 1 s instead of the default 100 ms: a kill closes the connection, so a
// failover never waits for it, and on a loaded 2-core CI machine a 100 ms
// stall of the peer's process is not unusual. The link-cut test keeps the
// default.
func replicaArgs(w workload) []string {
	return append([]string{"--kernel", testosELF, "--mem", "32", "--cmdline", w.cmdline, "--timeout", "1s"}, w.flags...)
}

// backupAddr waits for `ftkvm backup` to say where it listens.
func (p *proc) backupAddr() string {
	p.t.Helper()
	re := regexp.MustCompile(`backup waiting for its primary on (\S+)`)
	var addr string
	p.waitUntil("the backup's address", func() bool {
		m := re.FindStringSubmatch(p.stderr())
		if m != nil {
			addr = m[1]
		}
		return m != nil
	})
	return addr
}

// startPair starts a backup on a free loopback port, then its primary.
func startPair(t testing.TB, w workload, primaryFlags ...string) pair {
	t.Helper()
	b := start(t, append([]string{"--log-level", "info", "backup", "--listen", "127.0.0.1:0"}, replicaArgs(w)...)...)
	addr := b.backupAddr()
	args := append([]string{"--log-level", "info", "primary", "--backup", addr}, primaryFlags...)
	p := start(t, append(args, replicaArgs(w)...)...)
	// The guest starts once the handshake is done.
	p.waitUntil("the handshake", func() bool { return strings.Contains(p.stderr(), "primary: replicating to") })
	return pair{primary: p, backup: b}
}

// merge joins the dead primary's console and the backup's: the backup
// starts with the outputs the primary had not confirmed, which the primary
// may have performed already. It returns the joined output and how many
// bytes repeated at the seam. The longest overlap is taken.
func merge(p, b string) (string, int) { return mergeAtMost(p, b, len(b)) }

// mergeAtMost is merge with the overlap bounded by what the backup says
// may repeat ("N bytes of output may repeat"): a longer coincidental match
// (the primary's last digit equal to the backup's first) is no overlap.
func mergeAtMost(p, b string, limit int) (string, int) {
	for k := min(len(p), len(b), limit); k > 0; k-- {
		if strings.HasSuffix(p, b[:k]) {
			return p + b[k:], k
		}
	}
	return p + b, 0
}

var mayRepeat = regexp.MustCompile(`(\d+) bytes of output may repeat`)

// mergeSeam joins a dead primary's output with its backup's, using the
// backup's log to bound the overlap.
func mergeSeam(p string, b result) (string, int) {
	limit := 0
	for _, m := range mayRepeat.FindAllStringSubmatch(b.stderr, -1) {
		n, _ := strconv.Atoi(m[1])
		limit += n
	}
	return mergeAtMost(p, b.stdout, limit)
}

// drillEcho feeds the echo workload's input one line at a time, to the
// primary and, once it died and the backup is live, to the backup: like a
// client that resends what was not answered. A line the primary had taken
// in but not yet passed to the backup is lost with it, as keystrokes are
// with a dead host; the client sends it again.
func drillEcho(t *testing.T, w workload, pr pair, killAt int, delay time.Duration) {
	t.Helper()
	pr.primary.waitOutput("echo: ready\n")
	for i := 0; i < killAt && i < len(w.input); i++ {
		io.WriteString(pr.primary.stdin, w.input[i]+"\n")
		if w.input[i] != "quit" {
			pr.primary.waitOutput("echo: " + strings.ToUpper(w.input[i]) + "\n")
		}
	}
	time.Sleep(delay)
	pr.primary.kill()
	// Even with every line typed (quit included, whose echo is not
	// waited for), the dead primary may not have passed the last ones to
	// the backup: the client sends what was not answered again.
	pr.backup.waitUntil("the backup goes live", func() bool {
		return strings.Contains(pr.backup.stderr(), "this replica is the primary now") ||
			strings.Contains(pr.backup.stderr(), "ended on the primary")
	})
	merged := func() string { m, _ := merge(pr.primary.stdout(), pr.backup.stdout()); return m }
	for i := 0; i < len(w.input); i++ {
		want := "echo: " + strings.ToUpper(w.input[i]) + "\n"
		if strings.Contains(merged(), want) {
			continue
		}
		io.WriteString(pr.backup.stdin, w.input[i]+"\n")
		if w.input[i] != "quit" {
			pr.backup.waitUntil(fmt.Sprintf("%q", want), func() bool { return strings.Contains(merged(), want) })
		}
	}
}

func TestFailoverDrills(t *testing.T) {
	requireKVM(t)
	for _, w := range transferWorkloads {
		t.Run(w.name, func(t *testing.T) {
			// The workloads' drills run side by side: most of a drill is
			// waiting (guest timer ticks, process start), not computing.
			t.Parallel()
			r := newRand(t)
			// An undisturbed replicated run first: its output is complete,
			// the backup ends with the primary's status, and its length
			// spreads the kill moments over the whole run.
			pr := startPair(t, w)
			begin := time.Now()
			if w.input != nil {
				w.feed(pr.primary, 0, len(w.input))
			}
			res := pr.primary.wait()
			whole := time.Since(begin)
			bres := pr.backup.wait()
			if res.status != 0 || bres.status != 0 {
				t.Fatalf("undisturbed run: primary status %d, backup %d\nprimary stderr:\n%s\nbackup stderr:\n%s", res.status, bres.status, res.stderr, bres.stderr)
			}
			w.checkComplete(t, res.stdout)
			if bres.stdout != "" {
				t.Fatalf("the backup printed guest output without a failover:\n%s\nbackup stderr:\n%s\nprimary stderr:\n%s", bres.stdout, bres.stderr, res.stderr)
			}
			failovers, repeated := 0, 0
			for i := range drillMoments {
				pr := startPair(t, w)
				if w.input != nil {
					drillEcho(t, w, pr, r.IntN(len(w.input)+1), time.Duration(r.IntN(20))*time.Millisecond)
				} else {
					time.Sleep(time.Duration(r.Int64N(int64(whole))))
					pr.primary.kill()
				}
				bres := pr.backup.wait()
				out, k := mergeSeam(pr.primary.stdout(), bres)
				tookOver := strings.Contains(bres.stderr, "taking over")
				if tookOver {
					failovers++
				}
				repeated += k
				if bres.status != 0 {
					t.Fatalf("moment %d: the backup exited with status %d\nprimary stdout:\n%s\nbackup stdout:\n%s\nbackup stderr:\n%s",
						i, bres.status, pr.primary.stdout(), bres.stdout, bres.stderr)
				}
				t.Run(fmt.Sprint(i), func(t *testing.T) {
					defer func() {
						if t.Failed() {
							t.Logf("primary stdout:\n%s\nbackup stdout:\n%s\nbackup stderr:\n%s", pr.primary.stdout(), bres.stdout, bres.stderr)
						}
					}()
					w.checkComplete(t, out)
					if strings.Contains(bres.stderr, "DIVERGENCE") {
						t.Errorf("divergence:\n%s", bres.stderr)
					}
				})
			}
			t.Logf("%d moments over a %v run: %d failovers (the others came after the guest ended), %d bytes repeated at seams",
				drillMoments, whole.Round(time.Millisecond), failovers, repeated)
			if failovers == 0 {
				t.Errorf("no moment fell before the guest's end: nothing was drilled")
			}
		})
	}
}
