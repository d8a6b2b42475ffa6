package test

import (
	"encoding/json"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ftkvm/ftkvm/vmm/api"
)

// The control API through `ftkvm ctl`: pause, resume, status, and its
// errors.

func ctlStatus(t *testing.T, sock string) api.Status {
	t.Helper()
	r := ftkvm(t, time.Minute, "", "ctl", "--api", sock, "status", "--json")
	if r.status != 0 {
		t.Fatalf("ctl status: %d %s", r.status, r.stderr)
	}
	var st api.Status
	if err := json.Unmarshal([]byte(r.stdout), &st); err != nil {
		t.Fatalf("ctl status --json: %v\n%s", err, r.stdout)
	}
	return st
}

func TestCtlPauseResume(t *testing.T) {
	requireKVM(t)
	w := longCounter
	sock := tempSocket(t)
	src := start(t, "run", "--kernel", testosELF, "--mem", "64", "--cmdline", w.cmdline, "--api", sock)
	src.waitLines(3)
	if st := ctlStatus(t, sock); st.State != "running" || st.Stats.Exits == 0 || st.VirtualTimeNs <= 0 {
		t.Fatalf("status of a running guest: %+v", st)
	}
	for i := 0; i < 2; i++ { // pausing a paused guest is no error
		if r := ftkvm(t, time.Minute, "", "ctl", "--api", sock, "pause"); r.status != 0 {
			t.Fatalf("ctl pause: %d %s", r.status, r.stderr)
		}
	}
	st1 := ctlStatus(t, sock)
	out := src.stdout()
	time.Sleep(300 * time.Millisecond)
	st2 := ctlStatus(t, sock)
	// A paused guest does nothing, and its virtual time stands still.
	if st1.State != "paused" || st2.State != "paused" {
		t.Fatalf("states %q %q, want paused", st1.State, st2.State)
	}
	if src.stdout() != out {
		t.Fatalf("a paused guest printed:\n%s", strings.TrimPrefix(src.stdout(), out))
	}
	if st1.VirtualTimeNs != st2.VirtualTimeNs || st1.Stats.Exits != st2.Stats.Exits {
		t.Fatalf("virtual time or exits moved while paused: %d -> %d ns, %d -> %d exits",
			st1.VirtualTimeNs, st2.VirtualTimeNs, st1.Stats.Exits, st2.Stats.Exits)
	}
	text := ftkvm(t, time.Minute, "", "ctl", "--api", sock, "status")
	if !strings.Contains(text.stdout, "state         paused") {
		t.Fatalf("ctl status:\n%s", text.stdout)
	}
	if r := ftkvm(t, time.Minute, "", "ctl", "--api", sock, "resume"); r.status != 0 {
		t.Fatalf("ctl resume: %d %s", r.status, r.stderr)
	}
	st3 := ctlStatus(t, sock)
	if st3.State != "running" || st3.Pauses != 1 || time.Duration(st3.LastPauseNs) < 300*time.Millisecond {
		t.Fatalf("status after the pause: %+v", st3)
	}
	r := ftkvm(t, time.Minute, "", "ctl", "--api", sock, "resume")
	if r.status != 125 || strings.TrimSpace(r.stderr) != "ftkvm: the guest is not paused" {
		t.Fatalf("resuming a running guest: %d %q", r.status, r.stderr)
	}
	full := src.wait()
	if full.status != 0 {
		t.Fatalf("guest: %d %s", full.status, full.stderr)
	}
	w.checkComplete(t, full.stdout)
}

// Control errors: one line, status 125; the guest is not disturbed.
func TestCtlErrors(t *testing.T) {
	requireKVM(t)
	sock := tempSocket(t)
	w := longCounter
	src := start(t, "run", "--kernel", testosELF, "--mem", "64", "--cmdline", w.cmdline, "--api", sock)
	src.waitLines(2)
	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"no such socket", []string{"ctl", "--api", filepath.Join(t.TempDir(), "none"), "status"}, "no ftkvm serving"},
		{"socket in use", []string{"run", "--kernel", testosELF, "--api", sock}, "in use by another ftkvm"},
		{"snapshot into nowhere", []string{"ctl", "--api", sock, "snapshot", "/nonexistent/dir/snap"}, "no such file or directory"},
		{"bad bandwidth", []string{"ctl", "--api", sock, "migrate", "--bandwidth", "fast", "127.0.0.1:1"}, "--bandwidth"},
		{"bad destination", []string{"ctl", "--api", sock, "migrate", "nowhere"}, "destination \"nowhere\""},
		{"bad listen address", []string{"receive", "--listen", "256.0.0.1:x"}, "receive:"},
		{"missing api flag", []string{"ctl", "status"}, "--api"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := ftkvm(t, time.Minute, "", tc.args...)
			lines := strings.Split(strings.TrimSpace(r.stderr), "\n")
			if r.status == 0 || len(lines) != 1 || !strings.HasPrefix(lines[0], "ftkvm: ") || !strings.Contains(lines[0], tc.want) {
				t.Fatalf("status %d, stderr:\n%s\nwant one line mentioning %q", r.status, r.stderr, tc.want)
			}
		})
	}
	full := src.wait()
	if full.status != 0 {
		t.Fatalf("guest: %d %s", full.status, full.stderr)
	}
	w.checkComplete(t, full.stdout)
}
