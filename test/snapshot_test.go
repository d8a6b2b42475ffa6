package test

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ftkvm/ftkvm/guest/pvhtest"
	"github.com/ftkvm/ftkvm/vmm/api"
	"github.com/ftkvm/ftkvm/vmm/snapshot"
)

// Snapshots of every testos workload, taken through the control API at a
// random moment while the guest runs on the real /dev/kvm, then restored
// with `ftkvm restore`.

// TestSnapshotRestore: the source keeps running after the snapshot and
// finishes; the restored guest finishes too. The source's output up to the
// snapshot followed by the restored guest's output must be a complete,
// valid run, and the deterministic parts must equal the source's own.
func TestSnapshotRestore(t *testing.T) {
	requireKVM(t)
	for _, w := range transferWorkloads {
		t.Run(w.name, func(t *testing.T) {
			r := newRand(t)
			sock := tempSocket(t)
			file := filepath.Join(t.TempDir(), "snap")
			src := start(t, "run", "--kernel", testosELF, "--mem", "64", "--cmdline", w.cmdline, "--api", sock)
			w.randomMoment(t, src, r)
			cut := r.IntN(max(len(w.input), 1)) // echo: lines fed before the snapshot ("quit" never)
			w.feed(src, 0, cut)
			ctl := ftkvm(t, time.Minute, "", "ctl", "--api", sock, "snapshot", file)
			if ctl.status != 0 || !strings.Contains(ctl.stdout, "snapshot to "+file) {
				t.Fatalf("ctl snapshot: status %d\n%s%s", ctl.status, ctl.stdout, ctl.stderr)
			}
			w.feed(src, cut, len(w.input))
			full := src.wait()
			if full.status != 0 {
				t.Fatalf("source: status %d\n%s\n%s", full.status, full.stdout, full.stderr)
			}
			w.checkComplete(t, full.stdout)

			k := snapshotConsoleBytes(t, file)
			if k > len(full.stdout) {
				t.Fatalf("snapshot says %d console bytes, the source wrote %d", k, len(full.stdout))
			}
			var input string
			for _, l := range w.input[min(cut, len(w.input)):] {
				input += l + "\n"
			}
			rest := ftkvm(t, 2*time.Minute, input, "restore", file)
			if rest.status != 0 {
				t.Fatalf("restore: status %d\n%s\n%s", rest.status, rest.stdout, rest.stderr)
			}
			w.checkComplete(t, full.stdout[:k]+rest.stdout)
			if w.same != nil {
				a, b := w.same(bodyLines(full.stdout[k:]), bodyLines(rest.stdout))
				if a != b {
					t.Fatalf("restored output differs from the source's after the snapshot:\nsource:\n%s\nrestored:\n%s", a, b)
				}
			}
			t.Logf("snapshot after %d console bytes; %s", k, strings.TrimSpace(ctl.stdout))
		})
	}
}

// TestSnapshotStop: with --stop the source ends at the snapshot (status 0,
// saying so), and the restored guest continues exactly where it stopped.
func TestSnapshotStop(t *testing.T) {
	requireKVM(t)
	for _, w := range []workload{transferWorkloads[0], transferWorkloads[2]} {
		t.Run(w.name, func(t *testing.T) {
			r := newRand(t)
			sock := tempSocket(t)
			file := filepath.Join(t.TempDir(), "snap")
			src := start(t, "run", "--kernel", testosELF, "--mem", "64", "--cmdline", w.cmdline, "--api", sock)
			w.randomMoment(t, src, r)
			ctl := ftkvm(t, time.Minute, "", "ctl", "--api", sock, "snapshot", "--stop", file)
			if ctl.status != 0 || !strings.Contains(ctl.stdout, "the guest stopped") {
				t.Fatalf("ctl snapshot --stop: status %d\n%s%s", ctl.status, ctl.stdout, ctl.stderr)
			}
			before := src.wait()
			if before.status != 0 || !strings.Contains(before.stderr, "ftkvm: snapshot written to "+file) {
				t.Fatalf("source: status %d\nstderr:\n%s", before.status, before.stderr)
			}
			if k := snapshotConsoleBytes(t, file); k != len(before.stdout) {
				t.Fatalf("snapshot says %d console bytes, the source wrote %d", k, len(before.stdout))
			}
			after := ftkvm(t, 2*time.Minute, "", "restore", file)
			if after.status != 0 {
				t.Fatalf("restore: status %d\n%s\n%s", after.status, after.stdout, after.stderr)
			}
			w.checkComplete(t, before.stdout+after.stdout)
			// A second restore of the same file continues the same way.
			again := ftkvm(t, 2*time.Minute, "", "restore", file)
			w.checkComplete(t, before.stdout+again.stdout)
		})
	}
}

// TestSnapshotExitStatus: a restored guest's exit status is its own, as
// with run. The guest does 150000 port exits, then writes 42 to the
// debug-exit port; it is snapshotted (with --stop) in the middle.
func TestSnapshotExitStatus(t *testing.T) {
	requireKVM(t)
	n := uint32(150_000)
	code := []byte{
		0xb9, byte(n), byte(n >> 8), byte(n >> 16), byte(n >> 24), // mov ecx, n
		0xe6, 0x80, // 1: out 0x80, al
		0x49,       // dec ecx
		0x75, 0xfb, // jnz 1b
		0x66, 0xba, 0x01, 0x05, // mov dx, 0x501
		0xb0, 42, // mov al, 42
		0xee, // out dx, al
		0xf4, // hlt
	}
	kernel := filepath.Join(t.TempDir(), "exit42.elf")
	if err := os.WriteFile(kernel, pvhtest.Build(false, 0x200000, code, 0x200000, true), 0o644); err != nil {
		t.Fatal(err)
	}
	sock := tempSocket(t)
	file := filepath.Join(t.TempDir(), "snap")
	src := start(t, "run", "--kernel", kernel, "--mem", "16", "--api", sock)
	var st *api.Status
	src.waitUntil("a few thousand exits", func() bool {
		var err error
		st, err = api.NewClient(sock).Status(context.Background())
		return err == nil && st.Stats.Exits > 2000
	})
	if ctl := ftkvm(t, time.Minute, "", "ctl", "--api", sock, "snapshot", "--stop", file); ctl.status != 0 {
		t.Fatalf("ctl snapshot: %s", ctl.stderr)
	}
	if r := src.wait(); r.status != 0 {
		t.Fatalf("source stopped by the snapshot exited %d:\n%s", r.status, r.stderr)
	}
	rest := ftkvm(t, time.Minute, "", "restore", file)
	if rest.status != 42 {
		t.Fatalf("restored guest exited %d, want 42; stderr:\n%s", rest.status, rest.stderr)
	}
}

// Bad snapshot files: one clear error line, exit status 125, nothing on
// stdout, no guest run.
func TestRestoreBadInput(t *testing.T) {
	requireKVM(t)
	dir := t.TempDir()
	sock := tempSocket(t)
	good := filepath.Join(dir, "good")
	src := start(t, "run", "--kernel", testosELF, "--mem", "64", "--cmdline", "workload=echo", "--api", sock)
	src.waitOutput("echo: ready\n")
	if ctl := ftkvm(t, time.Minute, "", "ctl", "--api", sock, "snapshot", "--stop", good); ctl.status != 0 {
		t.Fatalf("ctl snapshot: %s", ctl.stderr)
	}
	src.wait()
	b, err := os.ReadFile(good)
	if err != nil {
		t.Fatal(err)
	}
	write := func(name string, data []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, data, 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	corrupt := bytes.Clone(b)
	corrupt[len(corrupt)/2] ^= 0x40
	for _, tc := range []struct {
		name, file, want string
	}{
		{"missing", filepath.Join(dir, "missing"), "no such file"},
		{"empty", write("empty", nil), "not an ftkvm snapshot"},
		{"text", write("text", []byte("hello, I am not a snapshot\n")), "not an ftkvm snapshot"},
		{"truncated", write("truncated", b[:len(b)*2/3]), "truncated"},
		{"cut at the end", write("cut", b[:len(b)-3]), "truncated"},
		{"corrupt", write("corrupt", corrupt), "checksum mismatch"},
		{"other version", write("version", otherVersion(t, b)), fmt.Sprintf("snapshot format version %d; this ftkvm reads version %d", snapshot.Version+1, snapshot.Version)},
		{"kernel not snapshot", testosELF, "not an ftkvm snapshot"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := ftkvm(t, time.Minute, "", "restore", tc.file)
			if r.status != 125 {
				t.Fatalf("exit status %d, want 125; stderr:\n%s", r.status, r.stderr)
			}
			lines := strings.Split(strings.TrimSpace(r.stderr), "\n")
			if len(lines) != 1 || !strings.HasPrefix(lines[0], "ftkvm: ") || !strings.Contains(lines[0], tc.want) {
				t.Fatalf("want one line \"ftkvm: ...%s...\", got:\n%s", tc.want, r.stderr)
			}
			if strings.Contains(r.stderr, "panic") || r.stdout != "" {
				t.Fatalf("stdout %q stderr %q", r.stdout, r.stderr)
			}
		})
	}
}

// otherVersion rewrites a snapshot file's header frame as the next format
// version, with valid checksums: what a future ftkvm might write.
func otherVersion(t *testing.T, file []byte) []byte {
	t.Helper()
	b := bytes.Clone(file)
	h := b[len(snapshot.Magic):]
	size := binary.LittleEndian.Uint32(h)
	payload := h[snapshot.HeaderSize : snapshot.HeaderSize+int(size)]
	binary.LittleEndian.PutUint32(payload, snapshot.Version+1) // Header.Version
	h[6] = snapshot.Version + 1                                // frame version
	crc := crc32.Update(0, crc32.MakeTable(crc32.Castagnoli), h[:8])
	crc = crc32.Update(crc, crc32.MakeTable(crc32.Castagnoli), payload)
	binary.LittleEndian.PutUint32(h[8:], crc)
	return b
}
