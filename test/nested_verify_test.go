package test

import (
	"context"
	"fmt"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/ftkvm/ftkvm/test/nested"
)

// Replicated Linux guests in the nested tier without a fault: a pair's
// boot and workload are compared with a plain run of the same guest, and
// a pair in verify mode with a short peer timeout must run the workload
// to its end with every divergence repaired (BenchmarkNestedReplica). It
// is a benchmark, not a test of the suite: verify mode with a 1 s timeout
// does not yet survive the nested tier (docs/LINUX.md, "Verify mode on a
// Linux guest"), and a suite that fails at every run hides other failures. Both run the
// Debian guest (PVH) with the busybox lines workload over loopback in one
// L1, each command printing its consoles, its stderr (the replicas' logs
// and --exit-stats profiles) and its L1 times between the markers
// nestedKillDrill.script uses.

const (
	nestedPairLines = 6
	nestedPairSpin  = 2000
	nestedPairAddr  = "127.0.0.1:7200"
	// Verify mode must live with a peer timeout a user would choose: the
	// state hashes at attach and at epoch ends must not starve the
	// heartbeats, in an L1 where both replicas share one TCG vCPU.
	nestedVerifyTimeout = "1s"
)

func nestedPairCmdline() string {
	return fmt.Sprintf("quiet ftkvm.workload=lines ftkvm.lines=%d ftkvm.spin=%d", nestedPairLines, nestedPairSpin)
}

// nestedPlainScript runs the guest under `ftkvm run --exit-stats` and
// prints x.out, x.err, its status and its start and end times.
func nestedPlainScript() string {
	return nestedShellLib + fmt.Sprintf(`mkdir -p /tmp; cd /tmp
echo "@@@ t start=$(up)"
%s run --mem 128 --kernel %s --initrd %s --cmdline '%s' --exit-stats >x.out 2>x.err
echo "@@@ rc run=$?"
echo "@@@ t end=$(up)"
showx x.out
show x.err
`, l1FTKVM, nested.GuestVmlinux, nested.GuestInitramfs, nestedPairCmdline())
}

// nestedPairScript runs a backup and a primary of the guest over loopback
// with the peer timeout and the primary's extra flags, both with
// --exit-stats, waits for both (bounded), and prints p.out, p.err, b.out,
// b.err, their statuses and the times of the primary's start and of each
// replica's end.
func nestedPairScript(timeout, primaryFlags string, waitSecs int) string {
	return nestedShellLib + fmt.Sprintf(`F=%[1]s
mkdir -p /tmp; cd /tmp
ip link set lo up 2>/dev/null || ifconfig lo 127.0.0.1 up
guest="--timeout %[2]s --mem 128 --kernel %[3]s --initrd %[4]s --exit-stats"
cmdline='%[5]s'
rm -f p.out p.err b.out b.err
$F --log-level info backup --listen %[6]s $guest --cmdline "$cmdline" >b.out 2>b.err &
b=$!
i=0
until grep -q 'backup waiting for its primary' b.err; do
	if ! alive $b || [ $i -ge 60 ]; then echo "@@@ no backup after $i s"; break; fi
	sleep 1; i=$((i + 1))
done
echo "@@@ t start=$(up)"
$F --log-level info primary --backup %[6]s %[7]s $guest --cmdline "$cmdline" >p.out 2>p.err &
p=$!
waitpid $p %[8]d primary
echo "@@@ t pend=$(up)"
waitpid $b 120 backup
echo "@@@ t end=$(up)"
for f in p.out b.out; do showx $f; done
for f in p.err b.err; do show $f; done
`, l1FTKVM, timeout, nested.GuestVmlinux, nested.GuestInitramfs, nestedPairCmdline(), nestedPairAddr, primaryFlags, waitSecs)
}

// stoppedFields returns the fields of the "replica stopped" log line in a
// replica's stderr (logrus text: key=value), or nil.
func stoppedFields(stderr string) map[string]string {
	for _, l := range strings.Split(stderr, "\n") {
		if !strings.Contains(l, "replica stopped") {
			continue
		}
		f := map[string]string{}
		for _, m := range regexp.MustCompile(`(\w+)=("[^"]*"|\S+)`).FindAllStringSubmatch(l, -1) {
			f[m[1]] = strings.Trim(m[2], `"`)
		}
		return f
	}
	return nil
}

// checkNestedPair checks a pair's run: both replicas exited 0, the
// primary never lost its backup nor the backup its primary, and the
// primary's console is the whole workload. It returns the primary's
// "replica stopped" fields.
func checkNestedPair(t testing.TB, name string, o nestedFailoverOutput) map[string]string {
	t.Helper()
	pErr, bErr := o.files["p.err"], o.files["b.err"]
	dump := func() string {
		var b strings.Builder
		for _, f := range []string{"p.out", "p.err", "b.out", "b.err"} {
			fmt.Fprintf(&b, "--- %s:\n%s\n", f, o.files[f])
		}
		for _, n := range o.notes {
			fmt.Fprintln(&b, n)
		}
		return b.String()
	}
	for _, who := range []string{"primary", "backup"} {
		if rc, ok := o.rc[who]; !ok || rc != 0 {
			t.Fatalf("%s: %s exited with %d (reported: %v), want 0\n%s", name, who, rc, ok, dump())
		}
	}
	if strings.Contains(pErr, "backup lost") || strings.Contains(bErr, "taking over") {
		t.Fatalf("%s: the replicas lost each other without a fault\n%s", name, dump())
	}
	if !strings.Contains(bErr, "the guest ended on the primary with status 0") {
		t.Fatalf("%s: the backup did not see the guest end on the primary\n%s", name, dump())
	}
	if err := checkLinesConsole(strings.ReplaceAll(o.files["p.out"], "\r", ""), nestedPairLines); err != nil {
		t.Fatalf("%s: the primary's console: %v\n%s", name, err, dump())
	}
	p := stoppedFields(pErr)
	if p == nil {
		t.Fatalf("%s: no \"replica stopped\" line from the primary\n%s", name, dump())
	}
	return p
}

// logReplicaFigures logs what a pair's replicas reported when they
// stopped, and the verify-mode lines (divergences, repairs) of both.
func logReplicaFigures(t testing.TB, name string, o nestedFailoverOutput) {
	t.Helper()
	for _, f := range []string{"p.err", "b.err"} {
		for _, l := range strings.Split(o.files[f], "\n") {
			if strings.Contains(l, "replica stopped") || strings.Contains(l, "DIVERGENCE") || strings.Contains(l, "repaired") ||
				strings.Contains(l, "lost") || strings.Contains(l, "differ") {
				t.Logf("%s %s: %s", name, f, l)
			}
		}
	}
}

var (
	// The primary's line for each page repair it sent (ft/driver/state.go).
	pageRepairSentRE = regexp.MustCompile(`page repair: (\d+) of (\d+) pages differ from the backup's; sending them with the rest of the state \((\d+) KiB\)`)
	// The backup's line for each repair it installed (ft/driver/state.go).
	repairInstalledRE = regexp.MustCompile(`the repair \((a page repair|the full state), (\d+) KiB\) replaced (\d+) pages that differed from the primary's \(\d+ KiB\); first page numbers: \[([^\]]*)\]`)
)

// verifyFigures is what a verify-mode pair reported about its
// divergences and their repairs, from the replicas' logs.
type verifyFigures struct {
	divergences, repairs     string // the backup's "replica stopped" fields
	pageRepairsSent          int    // the primary's "page repair" lines
	pagesSent                int    // pages those lines said differ
	sentKiB                  int    // their states' sizes
	pageRepairs, fullRepairs int    // the backup's installed repairs, by kind
	installedKiB             int    // their states' sizes
	replacedPages            int    // pages they replaced
	pageNumbers              []string
	protected                bool // neither replica lost the other
}

func parseVerifyFigures(o nestedFailoverOutput) verifyFigures {
	atoi := func(s string) int { n, _ := strconv.Atoi(s); return n }
	bs := stoppedFields(o.files["b.err"])
	v := verifyFigures{divergences: bs["divergences"], repairs: bs["repairs"],
		protected: !strings.Contains(o.files["p.err"], "backup lost") && !strings.Contains(o.files["b.err"], "taking over")}
	for _, m := range pageRepairSentRE.FindAllStringSubmatch(o.files["p.err"], -1) {
		v.pageRepairsSent++
		v.pagesSent += atoi(m[1])
		v.sentKiB += atoi(m[3])
	}
	for _, m := range repairInstalledRE.FindAllStringSubmatch(o.files["b.err"], -1) {
		if m[1] == "a page repair" {
			v.pageRepairs++
		} else {
			v.fullRepairs++
		}
		v.installedKiB += atoi(m[2])
		v.replacedPages += atoi(m[3])
		v.pageNumbers = append(v.pageNumbers, "["+m[4]+"]")
	}
	return v
}

func (v verifyFigures) String() string {
	return fmt.Sprintf("backup: %s divergences, %s repairs (%d page repairs, %d full states) installed %d KiB and replaced %d pages; "+
		"primary: %d page repairs sent, %d pages, %d KiB; protected to the end: %v; page numbers per repair: %s",
		v.divergences, v.repairs, v.pageRepairs, v.fullRepairs, v.installedKiB, v.replacedPages,
		v.pageRepairsSent, v.pagesSent, v.sentKiB, v.protected, strings.Join(v.pageNumbers, " "))
}

// pairSummary is one line on a pair's run: its divergences and repairs,
// whether it stayed protected, whether the primary's console shows the
// whole workload, and the primary's time from its start to its end.
func pairSummary(o nestedFailoverOutput) string {
	workload := "finished"
	if err := checkLinesConsole(strings.ReplaceAll(o.files["p.out"], "\r", ""), nestedPairLines); err != nil {
		workload = err.Error()
	}
	return fmt.Sprintf("--timeout %s; %v; workload on the primary: %s; primary %.1f s from its start to its end",
		nestedVerifyTimeout, parseVerifyFigures(o), workload, o.times["pend"]-o.times["start"])
}

// profileOf is the --exit-stats tables at the end of a replica's stderr.
func profileOf(stderr string) string {
	if i := strings.Index(stderr, "exit profile:"); i >= 0 {
		return stderr[i:]
	}
	return "(none)"
}

// BenchmarkNestedReplica compares, in one L1, a replicated boot and
// workload of the Debian guest (primary and backup over loopback, the
// drills' epoch length) with a plain `ftkvm run` of the same guest, and
// runs the pair in verify mode too: the time from the primary's start to
// its end against the plain run's, with both profiles. Run it with:
//
//	go test -run '^$' -bench NestedReplica -benchtime 1x -v ./test/
func BenchmarkNestedReplica(b *testing.B) {
	if _, err := nested.QEMUAvailable(); err != nil {
		b.Skipf("nested tier needs QEMU: %v", err)
	}
	cmds := []nested.Command{
		{Name: "plain", Cmd: nestedPlainScript(), Timeout: 10 * time.Minute},
		{Name: "replicated", Cmd: nestedPairScript(nestedVerifyTimeout, "--epoch-length "+nestedFailoverEpoch, 1200), Timeout: 25 * time.Minute},
		{Name: "verify", Cmd: nestedPairScript(nestedVerifyTimeout, "--verify --epoch-length "+nestedFailoverEpoch, 1200), Timeout: 25 * time.Minute},
	}
	for range b.N {
		cfg := nested.Config{Files: map[string]string{l1FTKVM: ftkvmBin}, GuestImages: true, Commands: cmds}
		logNestedConsole(b, &cfg)
		res, err := nested.Run(context.Background(), cfg)
		if err != nil {
			b.Fatal(err)
		}
		b.Logf("L1 boot %v", res.BootTime.Round(time.Second))
		// Both pairs' figures before any check: a replicated pair that
		// split must not hide the verify pair's.
		for _, c := range cmds[1:] {
			if r := res.Command(c.Name); r != nil {
				b.Logf("%s: %v", c.Name, pairSummary(parseNestedFailover(r.Output)))
			}
		}
		secs := map[string]float64{}
		for _, c := range cmds {
			r := res.Command(c.Name)
			if r == nil || r.Err() != nil {
				b.Fatalf("%s: %v\n%s", c.Name, r.Err(), r.Output)
			}
			o := parseNestedFailover(r.Output)
			end := "pend"
			if c.Name == "plain" {
				end = "end"
				if o.rc["run"] != 0 {
					b.Fatalf("plain: status %d\n%s", o.rc["run"], r.Output)
				}
				if err := checkLinesConsole(strings.ReplaceAll(o.files["x.out"], "\r", ""), nestedPairLines); err != nil {
					b.Fatalf("plain: %v\n%s", err, r.Output)
				}
				b.Logf("plain profile:\n%s", profileOf(o.files["x.err"]))
			} else {
				logReplicaFigures(b, c.Name, o)
				if c.Name == "verify" {
					v := parseVerifyFigures(o)
					b.ReportMetric(float64(v.pageRepairs+v.fullRepairs), "verify-repairs")
					b.ReportMetric(float64(v.pageRepairs), "verify-page-repairs")
					b.ReportMetric(float64(v.replacedPages), "verify-repaired-pages")
					b.ReportMetric(float64(v.installedKiB), "verify-repair-KiB")
				}
				checkNestedPair(b, c.Name, o)
				if c.Name == "verify" {
					// Without a fault every divergence is repaired (a
					// Linux guest diverges in replayed epochs:
					// docs/LINUX.md, "RDTSC and replicas").
					if bs := stoppedFields(o.files["b.err"]); bs["divergences"] != bs["repairs"] {
						b.Errorf("verify: the backup found %s divergences and repaired %s", bs["divergences"], bs["repairs"])
					}
				}
				b.Logf("%s primary's profile:\n%s", c.Name, profileOf(o.files["p.err"]))
				b.Logf("%s backup's profile:\n%s", c.Name, profileOf(o.files["b.err"]))
			}
			secs[c.Name] = o.times[end] - o.times["start"]
			b.ReportMetric(secs[c.Name], c.Name+"-s")
		}
		b.ReportMetric(secs["replicated"]/secs["plain"], "replicated/plain")
		b.ReportMetric(secs["verify"]/secs["plain"], "verify/plain")
	}
}
