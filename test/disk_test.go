package test

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/ftkvm/ftkvm/vmm/api"
)

// Disks across snapshots and between replicas. The guest here leaves its
// disk configured-but-idle (the counter workload); testos's disk workload
// writes to it in devices_test.go. The device state's round trip with
// requests served is covered by devices.TestTransportStateRoundTrip and
// vmm.TestCaptureInstallWithDisk.

// diskImage writes an image of n sectors with a pattern and returns its
// path.
func diskImage(t testing.TB, name string, sectors int) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	b := make([]byte, sectors*512)
	for i := range b {
		b[i] = byte(i / 512)
	}
	if err := os.WriteFile(p, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// copyImage copies an image, as a user copies it for another machine.
func copyImage(t testing.TB, from, name string) string {
	t.Helper()
	b, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// oneLine checks that stderr is one ftkvm line containing want.
func oneLine(t *testing.T, who, stderr, want string) {
	t.Helper()
	if !strings.HasPrefix(stderr, "ftkvm: ") || !strings.Contains(stderr, want) || strings.Count(strings.TrimSpace(stderr), "\n") > 0 {
		t.Errorf("%s: want one line with %q, got:\n%s", who, want, stderr)
	}
}

// TestSnapshotRestoreWithDisk: a guest with a disk is snapshotted (--stop)
// at a random moment and restored with a copy of the image: it continues
// to the end. Restored without the disk, or with one of another size or
// read-only, restore refuses with one line and runs no guest.
func TestSnapshotRestoreWithDisk(t *testing.T) {
	requireKVM(t)
	w := transferWorkloads[0]
	img := diskImage(t, "disk.img", 64)
	r := newRand(t)
	sock := tempSocket(t)
	file := filepath.Join(t.TempDir(), "snap")
	src := start(t, "run", "--kernel", testosELF, "--mem", "64", "--cmdline", w.cmdline, "--api", sock, "--disk", img)
	w.randomMoment(t, src, r)
	ctl := ftkvm(t, time.Minute, "", "ctl", "--api", sock, "snapshot", "--stop", file)
	if ctl.status != 0 {
		t.Fatalf("ctl snapshot --stop: status %d\n%s%s", ctl.status, ctl.stdout, ctl.stderr)
	}
	before := src.wait()
	if before.status != 0 {
		t.Fatalf("source: status %d\n%s", before.status, before.stderr)
	}
	cp := copyImage(t, img, "copy.img")
	small := diskImage(t, "small.img", 32)
	for _, tc := range []struct {
		name  string
		disks []string
		want  string
	}{
		{"no disk", nil, "the guest was captured with 1 disk (32768 bytes read-write); this machine was given no disks"},
		{"other size", []string{"--disk", small}, "this machine was given 1 disk (16384 bytes read-write)"},
		{"read-only", []string{"--disk", cp + ",ro"}, "this machine was given 1 disk (32768 bytes read-only)"},
		{"missing image", []string{"--disk", filepath.Join(t.TempDir(), "none.img")}, "--disk: disk "},
	} {
		res := ftkvm(t, time.Minute, "", append([]string{"restore", file}, tc.disks...)...)
		if res.status != 125 || res.stdout != "" {
			t.Errorf("restore with %s: status %d, output %q", tc.name, res.status, res.stdout)
		}
		oneLine(t, "restore with "+tc.name, res.stderr, tc.want)
	}
	after := ftkvm(t, 2*time.Minute, "", "restore", file, "--disk", cp)
	if after.status != 0 {
		t.Fatalf("restore: status %d\n%s\n%s", after.status, after.stdout, after.stderr)
	}
	w.checkComplete(t, before.stdout+after.stdout)
}

// TestReplicaDisks: primary and backup with --disk on their own copies of
// one image pair and run the guest to its end in verify mode (every epoch
// end compares state hashes: no divergence); the backup takes over from a killed primary with its own copy;
// with copies that differ in one byte, the handshake refuses with
// one line on both sides, and the backup goes on waiting.
func TestReplicaDisks(t *testing.T) {
	requireKVM(t)
	w := workloadNamed(t, "counter")
	img := diskImage(t, "disk.img", 64)
	bimg := copyImage(t, img, "backup.img")

	b := start(t, append([]string{"--log-level", "info", "backup", "--listen", "127.0.0.1:0", "--disk", bimg}, replicaArgs(w)...)...)
	p := start(t, append([]string{"--log-level", "info", "primary", "--verify", "--backup", b.backupAddr(), "--disk", img}, replicaArgs(w)...)...)
	res, bres := p.wait(), b.wait()
	if res.status != 0 || bres.status != 0 {
		t.Fatalf("status: primary %d, backup %d\nprimary:\n%s\nbackup:\n%s", res.status, bres.status, res.stderr, bres.stderr)
	}
	w.checkComplete(t, res.stdout)
	if m := regexp.MustCompile(`(\d+) divergences, (\d+) repairs`).FindStringSubmatch(bres.stderr); m == nil || m[1] != "0" {
		t.Errorf("backup counters: %v\n%s", m, bres.stderr)
	}

	// A failover: the backup takes over on its own copy and finishes.
	img2, bimg2 := copyImage(t, img, "p2.img"), copyImage(t, img, "b2.img")
	b = start(t, append([]string{"--log-level", "info", "backup", "--listen", "127.0.0.1:0", "--disk", bimg2}, replicaArgs(w)...)...)
	p = start(t, append([]string{"--log-level", "info", "primary", "--backup", b.backupAddr(), "--disk", img2}, replicaArgs(w)...)...)
	p.waitLines(5)
	p.kill()
	bres = b.wait()
	if bres.status != 0 || !strings.Contains(bres.stderr, "taking over") {
		t.Fatalf("backup after the failover: status %d\n%s", bres.status, bres.stderr)
	}
	out, _ := mergeSeam(t, p.stdout(), bres)
	w.checkComplete(t, out)

	// One byte different: refused.
	other := copyImage(t, img, "other.img")
	f, err := os.OpenFile(other, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte{0xff}, 5000); err != nil {
		t.Fatal(err)
	}
	f.Close()
	const want = "different disks: disk 0's contents differ"
	b = start(t, append([]string{"backup", "--listen", "127.0.0.1:0", "--disk", other}, replicaArgs(w)...)...)
	pr := ftkvm(t, time.Minute, "", append([]string{"primary", "--backup", b.backupAddr(), "--disk", img}, replicaArgs(w)...)...)
	if pr.status != 125 {
		t.Fatalf("primary status %d\n%s", pr.status, pr.stderr)
	}
	oneLine(t, "primary", pr.stderr, want)
	b.waitUntil("the refusal logged", func() bool { return strings.Contains(b.stderr(), want) })
	time.Sleep(100 * time.Millisecond)
	select {
	case <-b.done:
		t.Fatalf("the backup exited (status %d) after refusing a primary with another image\n%s", b.status, b.stderr())
	default:
	}
	lines := strings.Split(strings.TrimSpace(b.stderr()), "\n")
	if len(lines) != 2 || !strings.Contains(lines[1], want) || !strings.Contains(lines[1], "still waiting") {
		t.Errorf("backup: want one line with %q, got:\n%s", want, b.stderr())
	}
}

// TestReplicaJoinRefusedWithDisks: a primary with a disk that lost its
// backup is asked to protect itself with a backup that joins the running
// guest (ctl protect) with an image of another size: the primary's
// contents cannot be copied onto it, so the handshake refuses it with one
// line on each side. The new backup goes on waiting and the primary
// finishes the guest unprotected. (A join with an image of the same size
// and other contents: TestReplicaJoinWithDisk.)
func TestReplicaJoinRefusedWithDisks(t *testing.T) {
	requireKVM(t)
	const lines = 400
	w := workload{name: "counter", cmdline: fmt.Sprintf("workload=counter lines=%d wait=2 hz=200", lines),
		check: func(t *testing.T, body []string) {
			if len(body) != lines || !strings.HasPrefix(body[lines-1], fmt.Sprintf("counter %d ticks=", lines)) {
				t.Fatalf("%d lines, want %d", len(body), lines)
			}
		}}
	img := diskImage(t, "disk.img", 64)
	b1img, b2img := copyImage(t, img, "b1.img"), diskImage(t, "b2.img", 128)
	sock := tempSocket(t)
	b1 := start(t, append([]string{"backup", "--listen", "127.0.0.1:0", "--disk", b1img}, replicaArgs(w)...)...)
	p := start(t, append([]string{"--log-level", "info", "primary", "--backup", b1.backupAddr(), "--api", sock, "--disk", img}, replicaArgs(w)...)...)
	p.waitLines(3)
	b1.kill()
	p.waitUntil("the backup lost", func() bool { return strings.Contains(p.stderr(), "running unprotected") })

	b2 := start(t, append([]string{"backup", "--listen", "127.0.0.1:0", "--join", "--disk", b2img}, replicaArgs(w)...)...)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := api.NewClient(sock).Protect(ctx, b2.backupAddr()); err != nil {
		// ctl protect may answer before the handshake's outcome; the
		// refusal is checked in the logs below.
		t.Logf("protect: %v", err)
	}
	const want = "different disks: disk 0 has "
	p.waitUntil("the refusal", func() bool { return strings.Contains(p.stderr(), want) })
	b2.waitUntil("the refusal", func() bool { return strings.Contains(b2.stderr(), want) })
	res := p.wait()
	if res.status != 0 {
		t.Fatalf("primary: status %d\n%s", res.status, res.stderr)
	}
	w.checkComplete(t, res.stdout)
	if n := strings.Count(res.stderr, want); n != 1 {
		t.Errorf("primary: %d refusal lines, want 1:\n%s", n, res.stderr)
	}
	select {
	case <-b2.done:
		t.Fatalf("the refused backup exited (status %d)\n%s", b2.status, b2.stderr())
	default:
	}
	bl := strings.Split(strings.TrimSpace(b2.stderr()), "\n")
	if len(bl) != 2 || !strings.Contains(bl[1], want) || !strings.Contains(bl[1], "still waiting") {
		t.Errorf("refused backup: want one line with %q, got:\n%s", want, b2.stderr())
	}
}

// recordsImage is the image the disk workload leaves on a zeroed disk of
// sectors sectors when it runs undisturbed: records 1..records from
// sector 0 (guest/testos/README.md, "disk"), zeros after them.
func recordsImage(sectors, records int) []byte {
	img := make([]byte, sectors*recordSize)
	for i := 1; i <= records; i++ {
		copy(img[(i-1)*recordSize:], diskRecord(uint64(i), uint64(records)))
	}
	return img
}

// zeroImage writes a zeroed image of n sectors and returns its path.
func zeroImage(t testing.TB, name string, sectors int) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, make([]byte, sectors*recordSize), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// waitProtectedAcked waits until the primary at sock holds a backup that
// acknowledged everything sent so far (the join's full state included).
func waitProtectedAcked(t *testing.T, sock string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for {
		st, err := api.NewClient(sock).Status(ctx)
		if err != nil || st.Replica == nil {
			t.Fatalf("status: %v", err)
		}
		if st.Replica.Protected && st.Replica.LogAcked >= st.Replica.LogSent {
			return
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// stopLine is the primary's log line saying how long the join's disk
// transfer stopped the guest.
var stopLine = regexp.MustCompile(`sent (\d+) bytes of disk images to the joining backup in (\S+), the guest stopped`)

// TestReplicaJoinWithDisk: a backup joining a running guest with disks
// (ctl protect) is given a zeroed image of the right size; the primary
// sends its image with the full state (ft/doc.go, "Checkpoint epochs,
// repair, re-protection").
//   - Undisturbed after the join: the primary lost its first backup, a
//     new one joins, the guest ends; both images are byte for byte the
//     undisturbed run's (every record from sector 0, zeros after).
//   - Failovers around the join: the primary is killed, the promoted
//     backup is joined by a new backup with a zeroed image, then killed
//     too; the guest finishes on the last replica, whose image is the
//     undisturbed run's, and the joined console is complete.
func TestReplicaJoinWithDisk(t *testing.T) {
	requireKVM(t)
	// Enough records that the guest still runs through the joins and the
	// kills (each record is a write and a flush on both replicas).
	const records, sectors = 2000, 8192 // a 4 MiB image
	w := diskWorkload(records)
	want := recordsImage(sectors, records)

	t.Run("undisturbed after the join", func(t *testing.T) {
		sock := tempSocket(t)
		pimg, b1img, b2img := zeroImage(t, "p.img", sectors), zeroImage(t, "b1.img", sectors), zeroImage(t, "b2.img", sectors)
		b1 := start(t, append([]string{"--log-level", "info", "backup", "--listen", "127.0.0.1:0", "--disk", b1img}, replicaArgs(w)...)...)
		p := start(t, append([]string{"--log-level", "info", "primary", "--backup", b1.backupAddr(), "--api", sock, "--disk", pimg}, replicaArgs(w)...)...)
		p.waitLines(20)
		b1.kill()
		p.waitUntil("the backup lost", func() bool { return strings.Contains(p.stderr(), "running unprotected") })
		p.waitLines(40) // the primary writes records unprotected

		b2 := start(t, append([]string{"--log-level", "info", "backup", "--listen", "127.0.0.1:0", "--join", "--disk", b2img}, replicaArgs(w)...)...)
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if err := api.NewClient(sock).Protect(ctx, b2.backupAddr()); err != nil {
			t.Fatalf("protect: %v\nprimary:\n%s", err, p.stderr())
		}
		res, bres := p.wait(), b2.wait()
		if res.status != 0 || bres.status != 0 {
			t.Fatalf("primary status %d, joined backup %d\nprimary:\n%s\nbackup:\n%s", res.status, bres.status, res.stderr, bres.stderr)
		}
		if !strings.Contains(res.stderr, "protected: the backup holds") || !strings.Contains(bres.stderr, "received 4194304 bytes of the primary's disk images") {
			t.Fatalf("no join with the image\nprimary:\n%s\nbackup:\n%s", res.stderr, bres.stderr)
		}
		w.checkComplete(t, res.stdout)
		if bres.stdout != "" {
			t.Fatalf("the joined backup printed guest output without a failover:\n%s", bres.stdout)
		}
		m := stopLine.FindStringSubmatch(res.stderr)
		if m == nil || m[1] != "4194304" {
			t.Fatalf("the primary did not say it sent the 4 MiB image:\n%s", res.stderr)
		}
		t.Logf("join: %s bytes of disk image sent in %s with the guest stopped", m[1], m[2])
		for who, path := range map[string]string{"primary": pimg, "joined backup": b2img} {
			if got, _ := os.ReadFile(path); !bytes.Equal(got, want) {
				t.Errorf("the %s's image is not the undisturbed run's: %v", who, badRecords(t, path, 0, records, records, false))
			}
		}
	})

	t.Run("failovers around the join", func(t *testing.T) {
		sock := tempSocket(t)
		pimg, b1img, b2img := zeroImage(t, "p.img", sectors), zeroImage(t, "b1.img", sectors), zeroImage(t, "b2.img", sectors)
		b1 := start(t, append([]string{"--log-level", "info", "backup", "--listen", "127.0.0.1:0", "--api", sock, "--disk", b1img}, replicaArgs(w)...)...)
		p1 := start(t, append([]string{"--log-level", "info", "primary", "--backup", b1.backupAddr(), "--disk", pimg}, replicaArgs(w)...)...)
		p1.waitLines(20)
		p1.kill()
		b1.waitUntil("the first failover", func() bool { return strings.Contains(b1.stderr(), "this replica is the primary now") })
		printed := func(p *proc) int { return strings.Count(p.stdout(), "disk record ") }
		n := printed(b1)
		b1.waitUntil("records after the takeover", func() bool { return printed(b1) >= n+20 })

		b2 := start(t, append([]string{"--log-level", "info", "backup", "--listen", "127.0.0.1:0", "--join", "--disk", b2img}, replicaArgs(w)...)...)
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if err := api.NewClient(sock).Protect(ctx, b2.backupAddr()); err != nil {
			t.Fatalf("protect: %v\nfirst backup:\n%s", err, b1.stderr())
		}
		waitProtectedAcked(t, sock)
		n = printed(b1)
		b1.waitUntil("records under the new protection", func() bool { return printed(b1) >= n+20 })
		b1.kill()
		res := b2.wait()
		if res.status != 0 || !strings.Contains(res.stderr, "taking over") {
			t.Fatalf("joined backup: status %d (a takeover is needed: the guest ended before the second kill?)\n%s", res.status, res.stderr)
		}
		b1res := b1.wait()
		if m := stopLine.FindStringSubmatch(b1res.stderr); m != nil {
			t.Logf("join: %s bytes of disk image sent in %s with the guest stopped", m[1], m[2])
		} else {
			t.Fatalf("the promoted primary did not say it sent the image:\n%s", b1res.stderr)
		}
		out, _ := mergeSeam(t, p1.stdout(), b1res)
		out, _ = mergeSeam(t, out, res)
		w.checkComplete(t, out)
		if bad := badRecords(t, b2img, 0, records, records, false); len(bad) > 0 {
			t.Fatalf("the last replica's image lacks:\n%s", strings.Join(bad, "\n"))
		}
		if got, _ := os.ReadFile(b2img); !bytes.Equal(got, want) {
			t.Fatal("the last replica's image differs from the undisturbed run's")
		}
	})
}
