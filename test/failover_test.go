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

// Failover drills (ft/doc.go, "Failover"): a primary and a backup ftkvm on this machine,
// over loopback, the primary killed with SIGKILL at random moments of the
// guest's progress (after a random console line). The primary's console
// up to its death joined with the backup's at the console offset the
// backup logged must be the workload's complete output: the bytes the
// backup performed that the primary's console already shows must repeat
// identically, and no byte may be missing.

// drillMoments is how many random kill moments each workload gets.
const drillMoments = 20

// pair is a primary and its backup.
type pair struct {
	primary, backup *proc
}

// replicaArgs are the guest flags both replicas get. The peer timeout
// (drillPeerTimeout) is a hang guard, not the default 100 ms: a kill closes
// the connection, so a failover never waits for it, and on a loaded 2-core
// machine a replica's process can be silent for a while: 100 ms stalls
// are common, and with 1 s the drills saw pairs split before the kill
// (each side declaring the other dead after 1 s of silence) at load
// averages of 15-20. The link-cut test keeps the default.
func replicaArgs(w workload) []string {
	return append([]string{"--kernel", testosELF, "--mem", "32", "--cmdline", w.cmdline, "--timeout", drillPeerTimeout}, w.flags...)
}

const drillPeerTimeout = "5s"

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

// seamRE matches a promoted backup's takeover line: the console byte
// offset (bytes of the guest's console output since boot) from which it
// performs output, and how many bytes from there the dead primary may
// have written already.
var seamRE = regexp.MustCompile(`replica: performing from console byte offset (\d+) \((\d+) bytes uncertain`)

// seamOf reads the takeover line from a backup's log.
func seamOf(stderr string) (seam, uncertain int, ok bool) {
	m := seamRE.FindAllStringSubmatch(stderr, -1)
	if len(m) != 1 {
		return 0, 0, false
	}
	seam, _ = strconv.Atoi(m[0][1])
	uncertain, _ = strconv.Atoi(m[0][2])
	return seam, uncertain, true
}

// joinAt joins a dead primary's console p and its promoted backup's b,
// which starts at byte seam of the guest's console stream. Every byte
// before the seam the primary confirmed, so p holds it; the bytes of p
// from the seam on are outputs it had not confirmed, which the backup
// performed again: they must be among the uncertain ones and identical to
// the backup's. It returns the joined console and how many bytes
// repeated, or says which byte was lost or differs.
func joinAt(p, b string, seam, uncertain int) (string, int, error) {
	if seam > len(p) {
		return "", 0, fmt.Errorf("bytes lost at the seam: the backup performs from console byte %d, the primary's console ends at byte %d (it confirmed bytes it does not show)", seam, len(p))
	}
	rep := len(p) - seam
	if rep > uncertain {
		return "", 0, fmt.Errorf("the primary's console shows %d bytes past the seam at byte %d; only %d were uncertain", rep, seam, uncertain)
	}
	if rep > len(b) {
		return "", 0, fmt.Errorf("bytes lost at the seam: the primary's console shows %d bytes past the seam at byte %d, the backup performed only %d", rep, seam, len(b))
	}
	for i := range rep {
		if p[seam+i] != b[i] {
			return "", 0, fmt.Errorf("console byte %d differs at the seam: the primary wrote %q, the backup %q (the seam is at byte %d, %d bytes repeated)",
				seam+i, p[seam+i:min(len(p), seam+i+16)], b[i:min(len(b), i+16)], seam, rep)
		}
	}
	return p[:seam] + b, rep, nil
}

// mergeSeam joins a dead primary's console p with its backup's (b's
// stdout) at the console offset the backup logged when it took over. A
// backup that did not take over must have printed nothing. A lost or
// differing byte fails the test. It returns the joined console and how
// many bytes repeated at the seam.
func mergeSeam(t testing.TB, p string, b result) (string, int) {
	t.Helper()
	seam, uncertain, ok := seamOf(b.stderr)
	if !ok {
		if b.stdout != "" {
			t.Fatalf("the backup printed %d bytes without one takeover line (%q) in its log:\n%s", len(b.stdout), "performing from console byte offset", b.stderr)
		}
		return p, 0
	}
	out, rep, err := joinAt(p, b.stdout, seam, uncertain)
	if err != nil {
		t.Fatalf("joining the consoles: %v\nprimary stdout:\n%s\nbackup stdout:\n%s\nbackup stderr:\n%s", err, p, b.stdout, b.stderr)
	}
	t.Logf("consoles joined at byte %d: %d bytes repeated identically (%d uncertain)", seam, rep, uncertain)
	return out, rep
}

// lateKill reports whether a kill came after the guest's end: the
// primary's console shows the workload's end (pass), and the backup got
// the primary's goodbye and took nothing over. A guest that ended early
// is no late kill.
func lateKill(pstdout string, b result) bool {
	return strings.HasSuffix(pstdout, "testos: PASS\n") &&
		strings.Contains(b.stderr, "ended on the primary") && !strings.Contains(b.stderr, "taking over")
}

// killAfterLine starts a pair (start), kills its primary once its console
// shows line k, and returns both results. A kill that came after the
// guest's end (lateKill) drilled nothing: it is neither a pass nor a
// failure but a retry, with the kill after an earlier line, at most
// killRetries times.
func killAfterLine(t *testing.T, start func() (p, b *proc), k int) (pres, bres result) {
	t.Helper()
	for try := 0; ; try++ {
		p, b := start()
		p.waitLinesOrEnd(k)
		p.kill()
		pres, bres := p.wait(), b.wait()
		if strings.Contains(pres.stderr, "backup lost") {
			// Each side went on alone before the kill: no failover to
			// drill, and two consoles that do not join.
			t.Fatalf("the primary lost its backup before the kill\nprimary stderr:\n%s\nbackup stderr:\n%s", pres.stderr, bres.stderr)
		}
		if !lateKill(pres.stdout, bres) {
			return pres, bres
		}
		if try == killRetries {
			t.Fatalf("%d kills, the last after line %d, all came after the guest's end: nothing was drilled\nbackup stderr:\n%s", try+1, k, bres.stderr)
		}
		t.Logf("the kill after line %d came after the guest's end; again, after line %d", k, k/2)
		k /= 2
	}
}

// killRetries bounds killAfterLine's retries.
const killRetries = 3

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
	// Joined at the backup's seam (the final join checks the repeated
	// bytes). Until the backup has written again what the primary's
	// console shows past the seam, the primary's console is the longer
	// view: a client that looked only at the backup's would send a line
	// the guest had answered.
	merged := func() string {
		p, b := pr.primary.stdout(), pr.backup.stdout()
		if seam, _, ok := seamOf(pr.backup.stderr()); ok && seam <= len(p) && len(b) > len(p)-seam {
			return p[:seam] + b
		}
		return p
	}
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
			// and the backup ends with the primary's status.
			pr := startPair(t, w)
			begin := time.Now()
			if w.input != nil {
				w.feed(pr.primary, 0, len(w.input))
			}
			res := pr.primary.wait()
			whole := time.Since(begin)
			bres := pr.backup.wait()
			lines := strings.Count(res.stdout, "\n")
			if res.status != 0 || bres.status != 0 {
				t.Fatalf("undisturbed run: primary status %d, backup %d\nprimary stderr:\n%s\nbackup stderr:\n%s", res.status, bres.status, res.stderr, bres.stderr)
			}
			w.checkComplete(t, res.stdout)
			if bres.stdout != "" {
				t.Fatalf("the backup printed guest output without a failover:\n%s\nbackup stderr:\n%s\nprimary stderr:\n%s", bres.stdout, bres.stderr, res.stderr)
			}
			failovers, late, repeated := 0, 0, 0
			for i := range drillMoments {
				var pr pair
				var bres result
				if w.input != nil {
					pr = startPair(t, w)
					drillEcho(t, w, pr, r.IntN(len(w.input)+1), time.Duration(r.IntN(20))*time.Millisecond)
					bres = pr.backup.wait()
				} else {
					// After line k of the guest's console (0: as soon as
					// the handshake is done), then a few milliseconds. The
					// console lags the guest (outputs wait for the
					// backup's acknowledgement), so a kill may come after
					// the guest's end: then again after an earlier line
					// (killAfterLine's rule). A moment still late after
					// killRetries checks the goodbye instead: the backup
					// ends with the primary's status, printing nothing.
					k, delay := r.IntN(lines+1), time.Duration(r.IntN(20))*time.Millisecond
					for try := 0; ; try++ {
						pr = startPair(t, w)
						pr.primary.waitLinesOrEnd(k)
						time.Sleep(delay)
						pr.primary.kill()
						bres = pr.backup.wait()
						if try == killRetries || !lateKill(pr.primary.stdout(), bres) {
							break
						}
						k, delay = k/2, 0
					}
				}
				if pe := pr.primary.stderr(); strings.Contains(pe, "backup lost") {
					// The pair split before the kill (a replica heard
					// nothing from its peer for --timeout): each side
					// ran the guest alone, and their consoles do not join.
					t.Fatalf("moment %d: the primary lost its backup before the kill\nprimary stderr:\n%s\nbackup stderr:\n%s", i, pe, bres.stderr)
				}
				out, k := mergeSeam(t, pr.primary.stdout(), bres)
				switch {
				case strings.Contains(bres.stderr, "taking over"):
					failovers++
				case lateKill(pr.primary.stdout(), bres):
					late++
				default:
					t.Fatalf("moment %d: the backup neither took over nor saw the guest end on the primary\nbackup stderr:\n%s", i, bres.stderr)
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
			t.Logf("%d moments over a %v run (%d lines): %d failovers, %d after the guest ended, %d bytes repeated at seams",
				drillMoments, whole.Round(time.Millisecond), lines, failovers, late, repeated)
			if failovers == 0 {
				t.Errorf("no moment fell before the guest's end: nothing was drilled")
			}
		})
	}
}
