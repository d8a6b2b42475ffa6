package test

import (
	"fmt"
	"regexp"
	"strconv"
	"testing"
	"time"
)

// Replication benchmarks, ratios within one run:
//
//	go test -run '^$' -bench Replica -benchtime 3x ./test/
//
// BenchmarkReplicaOverhead: per workload, the guest's wall time under each
// output policy against a plain `ftkvm run` of the same guest, and the log
// bytes the primary sent per second of guest time. BenchmarkReplicaFailover:
// from the SIGKILL of the primary to the first output the backup adds.

// replicaStats reads the primary's "replica stopped" log line.
var replicaStopped = regexp.MustCompile(`elapsed=([0-9.]+[a-zµ]+) .*link_bytes=(\d+)`)

// Both kinds of run are timed from the start of the (primary's) process to
// its end; the backup is already listening. Timing from the guest's first
// line instead is distorted: under replication a guest's early ticks each
// wait for a kick and a checkpoint, so its first line comes late.
func runPlain(b *testing.B, w workload) time.Duration {
	b.Helper()
	begin := time.Now()
	p := start(b, append([]string{"run"}, "--kernel", testosELF, "--mem", "32", "--cmdline", w.cmdline)...)
	if w.input != nil {
		w.feed(p, 0, len(w.input))
	}
	if res := p.wait(); res.status != 0 {
		b.Fatalf("run: status %d\n%s", res.status, res.stderr)
	}
	return time.Since(begin)
}

// runReplicated runs a pair and returns the primary's wall time, and the
// bytes it sent on the link per second of its run.
func runReplicated(b *testing.B, w workload, flags ...string) (time.Duration, float64) {
	b.Helper()
	bk := start(b, append([]string{"--log-level", "info", "backup", "--listen", "127.0.0.1:0"}, replicaArgs(w)...)...)
	addr := bk.backupAddr()
	begin := time.Now()
	p := start(b, append(append([]string{"--log-level", "info", "primary", "--backup", addr}, flags...), replicaArgs(w)...)...)
	pr := pair{primary: p, backup: bk}
	if w.input != nil {
		w.feed(pr.primary, 0, len(w.input))
	}
	res := pr.primary.wait()
	elapsed := time.Since(begin)
	if res.status != 0 {
		b.Fatalf("primary: status %d\n%s", res.status, res.stderr)
	}
	pr.backup.wait()
	m := replicaStopped.FindStringSubmatch(res.stderr)
	if m == nil {
		b.Fatalf("no summary line:\n%s", res.stderr)
	}
	d, err := time.ParseDuration(m[1])
	if err != nil {
		b.Fatal(err)
	}
	bytes, _ := strconv.ParseFloat(m[2], 64)
	return elapsed, bytes / d.Seconds()
}

func BenchmarkReplicaOverhead(b *testing.B) {
	requireKVM(b)
	for _, w := range transferWorkloads {
		b.Run(w.name, func(b *testing.B) {
			var plain, oc, strict time.Duration
			var ocRate, strictRate float64
			for range b.N {
				plain += runPlain(b, w)
				d, r := runReplicated(b, w)
				oc, ocRate = oc+d, ocRate+r
				d, r = runReplicated(b, w, "--policy", "strict")
				strict, strictRate = strict+d, strictRate+r
			}
			n := float64(b.N)
			b.ReportMetric(plain.Seconds()/n, "run-s")
			b.ReportMetric(oc.Seconds()/plain.Seconds(), "output-commit/run")
			b.ReportMetric(strict.Seconds()/plain.Seconds(), "strict/run")
			b.ReportMetric(ocRate/n/1024, "output-commit-log-KiB/s")
			b.ReportMetric(strictRate/n/1024, "strict-log-KiB/s")
		})
	}
}

func BenchmarkReplicaFailover(b *testing.B) {
	requireKVM(b)
	w := workloadNamed(b, "interleave")
	var total time.Duration
	for range b.N {
		pr := startPair(b, w)
		pr.primary.waitLines(10)
		before := pr.primary.stdout()
		kill := time.Now()
		pr.primary.kill()
		// The first byte the backup adds to what the dead primary showed.
		pr.backup.waitUntil("new output from the backup", func() bool {
			seam, _, ok := seamOf(pr.backup.stderr())
			return ok && seam+len(pr.backup.stdout()) > len(before)
		})
		total += time.Since(kill)
		if res := pr.backup.wait(); res.status != 0 {
			b.Fatalf("backup status %d", res.status)
		}
	}
	b.ReportMetric(float64(total.Microseconds())/1000/float64(b.N), "ms/failover")
	b.ReportMetric(0, "ns/op")
}

// BenchmarkDiskWrites: the test guest's disk workload (one 512-byte
// record written and flushed at a time, then all read back and verified:
// guest/testos/README.md) plain and replicated under each policy, each
// replica with its own copy of the image, with the records written in
// order (seq) and at the workload's fixed permutation (random,
// order=random). Each sub-benchmark reports the written records per
// second of each run's wall time, the ratios to the plain run, and the log
// bytes the primary sent per byte the guest wrote (a backup performs the
// guest's writes on its own copy: the log carries the exits and
// checkpoints, not the data).
//
//	go test -run '^$' -bench DiskWrites -benchtime 2x ./test/
func BenchmarkDiskWrites(b *testing.B) {
	requireKVM(b)
	b.Run("seq", func(b *testing.B) { diskWrites(b, false) })
	b.Run("random", func(b *testing.B) { diskWrites(b, true) })
}

// diskWrites is one sub-benchmark of BenchmarkDiskWrites.
func diskWrites(b *testing.B, random bool) {
	const records = 400
	w := workload{name: "disk", cmdline: fmt.Sprintf("workload=disk records=%d hz=100", records)}
	if random {
		w.cmdline += " order=random"
	}
	run := func(flags ...string) (time.Duration, float64) {
		img := diskImage(b, "p.img", records+8)
		if flags == nil {
			begin := time.Now()
			p := start(b, "run", "--kernel", testosELF, "--mem", "32", "--cmdline", w.cmdline, "--disk", img)
			if res := p.wait(); res.status != 0 {
				b.Fatalf("run: status %d\n%s", res.status, res.stderr)
			}
			return time.Since(begin), 0
		}
		bimg := copyImage(b, img, "b.img")
		bk := start(b, append([]string{"--log-level", "info", "backup", "--listen", "127.0.0.1:0", "--disk", bimg}, replicaArgs(w)...)...)
		addr := bk.backupAddr()
		begin := time.Now()
		p := start(b, append(append([]string{"--log-level", "info", "primary", "--backup", addr, "--disk", img}, flags...), replicaArgs(w)...)...)
		res := p.wait()
		elapsed := time.Since(begin)
		if res.status != 0 {
			b.Fatalf("primary: status %d\n%s", res.status, res.stderr)
		}
		bk.wait()
		m := replicaStopped.FindStringSubmatch(res.stderr)
		if m == nil {
			b.Fatalf("no summary line:\n%s", res.stderr)
		}
		n, _ := strconv.ParseFloat(m[2], 64)
		return elapsed, n
	}
	var plain, oc, strict time.Duration
	var ocLog, strictLog float64
	for range b.N {
		d, _ := run()
		plain += d
		d, l := run("--policy", "output-commit")
		oc, ocLog = oc+d, ocLog+l
		d, l = run("--policy", "strict")
		strict, strictLog = strict+d, strictLog+l
	}
	n := float64(b.N)
	written := float64(records*512) * n
	b.ReportMetric(records*n/plain.Seconds(), "run-records/s")
	b.ReportMetric(oc.Seconds()/plain.Seconds(), "output-commit/run")
	b.ReportMetric(strict.Seconds()/plain.Seconds(), "strict/run")
	b.ReportMetric(ocLog/written, "output-commit-log-B/written-B")
	b.ReportMetric(strictLog/written, "strict-log-B/written-B")
	b.ReportMetric(0, "ns/op")
}
