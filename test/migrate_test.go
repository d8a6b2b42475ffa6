package test

import (
	"context"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/ftkvm/ftkvm/vmm/api"
)

// Live migration of every testos workload over 127.0.0.1 between two ftkvm
// processes on the real /dev/kvm, started at a random moment with
// `ftkvm ctl migrate`, and its failures.

// TestMigrate: the source's output up to the migration followed by the
// destination's must be one complete, valid run; the source exits 0 saying
// where the guest went.
func TestMigrate(t *testing.T) {
	requireKVM(t)
	for _, w := range transferWorkloads {
		t.Run(w.name, func(t *testing.T) {
			r := newRand(t)
			dst := start(t, "receive", "--listen", "127.0.0.1:0")
			addr := dst.listenAddr()
			sock := tempSocket(t)
			src := start(t, "run", "--kernel", testosELF, "--mem", "64", "--cmdline", w.cmdline, "--api", sock)
			w.randomMoment(t, src, r)
			cut := r.IntN(max(len(w.input), 1)) // echo: lines fed before the migration ("quit" never)
			w.feed(src, 0, cut)
			ctl := ftkvm(t, time.Minute, "", "ctl", "--api", sock, "migrate", addr)
			if ctl.status != 0 || !strings.Contains(ctl.stdout, "migration to "+addr) {
				t.Fatalf("ctl migrate: status %d\n%s%s", ctl.status, ctl.stdout, ctl.stderr)
			}
			before := src.wait()
			if before.status != 0 || !strings.Contains(before.stderr, "ftkvm: guest migrated to "+addr) {
				t.Fatalf("source: status %d\nstderr:\n%s", before.status, before.stderr)
			}
			w.feed(dst, cut, len(w.input))
			after := dst.wait()
			if after.status != 0 {
				t.Fatalf("destination: status %d\n%s\n%s", after.status, after.stdout, after.stderr)
			}
			w.checkComplete(t, before.stdout+after.stdout)
			t.Logf("%d lines before, %d after; %s", strings.Count(before.stdout, "\n"),
				strings.Count(after.stdout, "\n"), strings.TrimSpace(ctl.stdout))
		})
	}
}

// TestMigrateTwice: there and back again, the second time from the
// destination's own control API.
func TestMigrateTwice(t *testing.T) {
	requireKVM(t)
	w := transferWorkloads[2] // compute: deterministic sums
	sockA, sockB := tempSocket(t), tempSocket(t)
	b := start(t, "receive", "--listen", "127.0.0.1:0", "--api", sockB)
	addrB := b.listenAddr()
	a := start(t, "run", "--kernel", testosELF, "--mem", "64", "--cmdline", w.cmdline, "--api", sockA)
	a.waitLines(3)
	if ctl := ftkvm(t, time.Minute, "", "ctl", "--api", sockA, "migrate", addrB); ctl.status != 0 {
		t.Fatalf("first migration: %s", ctl.stderr)
	}
	first := a.wait()
	c := start(t, "receive", "--listen", "127.0.0.1:0")
	addrC := c.listenAddr()
	b.waitLines(2)
	if ctl := ftkvm(t, time.Minute, "", "ctl", "--api", sockB, "migrate", addrC); ctl.status != 0 {
		t.Fatalf("second migration: %s", ctl.stderr)
	}
	second := b.wait()
	third := c.wait()
	if first.status != 0 || second.status != 0 || third.status != 0 {
		t.Fatalf("statuses %d %d %d\n%s\n%s\n%s", first.status, second.status, third.status, first.stderr, second.stderr, third.stderr)
	}
	w.checkComplete(t, first.stdout+second.stdout+third.stdout)
}

// TestMigrateDestinationDies: the destination is killed mid-transfer; the
// source reports the error, keeps running, and finishes its run.
func TestMigrateDestinationDies(t *testing.T) {
	requireKVM(t)
	w := longCounter
	dst := start(t, "receive", "--listen", "127.0.0.1:0")
	addr := dst.listenAddr()
	sock := tempSocket(t)
	src := start(t, "run", "--kernel", testosELF, "--mem", "64", "--cmdline", w.cmdline, "--api", sock)
	src.waitLines(2)
	// 16 KiB/s: the ~80 KiB of this guest would take five seconds.
	ctl := start(t, "ctl", "--api", sock, "migrate", "--bandwidth", "16K", addr)
	client := api.NewClient(sock)
	var st *api.Status
	ctl.waitUntil("a migration sending", func() bool {
		var err error
		st, err = client.Status(context.Background())
		return err == nil && st.State == "migrating" && st.BytesSent > 0
	})
	dst.kill()
	res := ctl.wait()
	if res.status != 125 || !strings.Contains(res.stderr, "ftkvm: migration to "+addr+": the destination went away mid-migration") {
		t.Fatalf("ctl migrate: status %d\nstdout:\n%s\nstderr:\n%s", res.status, res.stdout, res.stderr)
	}
	t.Logf("while migrating: %+v; ctl: %s", *st.Operation.Progress, strings.TrimSpace(res.stderr))
	after, err := client.Status(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if after.State != "running" || after.LastOperation == nil || after.LastOperation.Error == "" {
		t.Fatalf("status after the failed migration: %+v", after)
	}
	full := src.wait()
	if full.status != 0 {
		t.Fatalf("source: status %d\n%s", full.status, full.stderr)
	}
	w.checkComplete(t, full.stdout)
}

// TestMigrateSourceDies: the source is killed mid-transfer; the destination
// discards what it received and exits with a clear error, running nothing.
func TestMigrateSourceDies(t *testing.T) {
	requireKVM(t)
	w := longCounter
	dst := start(t, "receive", "--listen", "127.0.0.1:0")
	addr := dst.listenAddr()
	sock := tempSocket(t)
	src := start(t, "run", "--kernel", testosELF, "--mem", "64", "--cmdline", w.cmdline, "--api", sock)
	src.waitLines(2)
	ctl := start(t, "ctl", "--api", sock, "migrate", "--bandwidth", "16K", addr)
	client := api.NewClient(sock)
	ctl.waitUntil("a migration sending", func() bool {
		st, err := client.Status(context.Background())
		return err == nil && st.State == "migrating" && st.BytesSent > 0
	})
	time.Sleep(300 * time.Millisecond) // some of the stream reaches the destination
	src.kill()
	res := dst.wait()
	if res.status != 125 || res.stdout != "" {
		t.Fatalf("destination: status %d\nstdout:\n%s\nstderr:\n%s", res.status, res.stdout, res.stderr)
	}
	errLines := strings.Split(strings.TrimSpace(res.stderr), "\n")
	last := errLines[len(errLines)-1]
	if !strings.Contains(last, "the source went away mid-migration") || !strings.Contains(last, "no guest was run") {
		t.Fatalf("destination's error: %q", last)
	}
	if c := ctl.wait(); c.status == 0 {
		t.Fatalf("ctl migrate succeeded with its source killed:\n%s", c.stdout)
	}
	t.Logf("destination: %s", last)
}

// TestMigrateNowhere: nothing listens at the destination; ctl reports it,
// the guest runs on.
func TestMigrateNowhere(t *testing.T) {
	requireKVM(t)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	w := transferWorkloads[0]
	sock := tempSocket(t)
	src := start(t, "run", "--kernel", testosELF, "--mem", "64", "--cmdline", w.cmdline, "--api", sock)
	src.waitLines(2)
	ctl := ftkvm(t, time.Minute, "", "ctl", "--api", sock, "migrate", addr)
	lines := strings.Split(strings.TrimSpace(ctl.stderr), "\n")
	if ctl.status != 125 || len(lines) != 1 || !strings.Contains(lines[0], "connection refused") {
		t.Fatalf("ctl migrate: status %d\n%s", ctl.status, ctl.stderr)
	}
	full := src.wait()
	if full.status != 0 {
		t.Fatalf("source: %d %s", full.status, full.stderr)
	}
	w.checkComplete(t, full.stdout)
}

// longCounter runs for about 1.5 s: longer than the time it takes to kill
// a migration's peer.
var longCounter = func() workload {
	w := transferWorkloads[0]
	w.cmdline = "workload=counter lines=40 wait=6 hz=160"
	return w
}()
