package test

import (
	"net"
	"strings"
	"testing"
	"time"
)

// Strangers on a waiting backup's port, as an operator's port scanner or
// health check makes them: one that closes at once, one that sends random
// bytes, one that holds the connection open and sends nothing, and the
// primary of another guest. None of them becomes the backup's primary:
// the real primary then pairs, the guest runs to its end on the primary
// with the backup following, both exit with the guest's status, and the
// backup never took over.
func TestBackupStrangers(t *testing.T) {
	requireKVM(t)
	w := workloadNamed(t, "counter")
	// A long peer timeout: this test is about strangers, and a loaded
	// test host must not fail it with a real (timeout) takeover.
	args := append(replicaArgs(w), "--timeout", "10s")
	b := start(t, append([]string{"--log-level", "info", "backup", "--listen", "127.0.0.1:0"}, args...)...)
	addr := b.backupAddr()
	dial := func() net.Conn {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	c := dial()
	time.Sleep(300 * time.Millisecond) // longer than --timeout's default: the old takeover
	c.Close()
	c = dial()
	c.Write([]byte("\x00\x01random bytes, not a hello\r\n"))
	c.Close()
	silent := dial()
	defer silent.Close()
	foreign := ftkvm(t, time.Minute, "", "primary", "--backup", addr, "--kernel", testosELF, "--mem", "32",
		"--cmdline", "workload=counter lines=1", "--timeout", "1s")
	if foreign.status != 125 || !strings.Contains(foreign.stderr, "different command line") {
		t.Fatalf("the other guest's primary: status %d\n%s", foreign.status, foreign.stderr)
	}
	b.waitUntil("three strangers logged", func() bool { return strings.Count(b.stderr(), "is not this backup's primary") >= 3 })

	p := start(t, append([]string{"--log-level", "info", "primary", "--backup", addr}, args...)...)
	pres := p.wait()
	bres := b.wait()
	if pres.status != 0 || bres.status != 0 {
		t.Fatalf("status: primary %d, backup %d\nprimary:\n%s\nbackup:\n%s", pres.status, bres.status, pres.stderr, bres.stderr)
	}
	w.checkComplete(t, pres.stdout)
	if bres.stdout != "" {
		t.Fatalf("the backup performed output:\n%s\nbackup:\n%s\nprimary:\n%s", bres.stdout, bres.stderr, pres.stderr)
	}
	for _, bad := range []string{"taking over", "primary lost", "this replica is the primary"} {
		if strings.Contains(bres.stderr, bad) {
			t.Fatalf("the backup logged %q:\n%s", bad, bres.stderr)
		}
	}
	// The silent one is logged when its hello time (the 10 s timeout)
	// runs out, if the guest is still running then.
	if n := strings.Count(bres.stderr, "is not this backup's primary"); n != 3 && n != 4 {
		t.Errorf("want one line for each stranger, got %d:\n%s", n, bres.stderr)
	}
}

// A stray connection on receive's port does not abort the awaited
// migration: it is logged, and the real migration then arrives.
func TestReceiveStranger(t *testing.T) {
	requireKVM(t)
	w := transferWorkloads[0]
	dst := start(t, "receive", "--listen", "127.0.0.1:0")
	addr := dst.listenAddr()
	for _, junk := range []string{"", "GET / HTTP/1.0\r\n\r\n"} {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		c.Write([]byte(junk))
		c.Close()
	}
	dst.waitUntil("the strangers logged", func() bool { return strings.Count(dst.stderr(), "was not a migration") == 2 })
	sock := tempSocket(t)
	src := start(t, "run", "--kernel", testosELF, "--mem", "64", "--cmdline", w.cmdline, "--api", sock)
	src.waitLines(2)
	if ctl := ftkvm(t, time.Minute, "", "ctl", "--api", sock, "migrate", addr); ctl.status != 0 {
		t.Fatalf("ctl migrate: status %d\n%s", ctl.status, ctl.stderr)
	}
	before := src.wait()
	after := dst.wait()
	if before.status != 0 || after.status != 0 {
		t.Fatalf("statuses %d %d\n%s\n%s", before.status, after.status, before.stderr, after.stderr)
	}
	w.checkComplete(t, before.stdout+after.stdout)
}

// receive --timeout gives up when no migration begins in time.
func TestReceiveTimeout(t *testing.T) {
	res := ftkvm(t, time.Minute, "", "receive", "--listen", "127.0.0.1:0", "--timeout", "300ms")
	if res.status != 125 || !strings.Contains(res.stderr, "no migration began within 300ms") {
		t.Fatalf("status %d\n%s", res.status, res.stderr)
	}
}
