package test

import (
	"encoding/json"
	"fmt"
	"net"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/ftkvm/ftkvm/ft"
)

// The command line as an operator's tooling uses it: --version, probe
// --json, JSON logs, and ctl status's exit status and the control
// socket's mode on a replicated pair.
func TestCLI(t *testing.T) {
	t.Run("version", func(t *testing.T) {
		r := ftkvm(t, time.Minute, "", "--version")
		if r.status != 0 || !strings.Contains(r.stdout, fmt.Sprintf("replication protocol %d", ft.ProtocolVersion)) || !strings.Contains(r.stdout, "snapshot format") {
			t.Fatalf("status %d\n%s%s", r.status, r.stdout, r.stderr)
		}
	})
	t.Run("probe json", func(t *testing.T) {
		requireKVM(t)
		r := ftkvm(t, time.Minute, "", "probe", "--json")
		var v struct {
			APIVersion int
			StepClock  struct{ Usable bool } `json:"step_clock"`
			Caps       []struct{ Cap string }
		}
		if err := json.Unmarshal([]byte(r.stdout), &v); err != nil || r.status != 0 || v.APIVersion != 12 ||
			len(v.Caps) == 0 || !strings.HasPrefix(v.Caps[0].Cap, "KVM_CAP_") {
			t.Fatalf("status %d, %v: %+v\n%s", r.status, err, v, r.stdout)
		}
	})
	t.Run("json logs", func(t *testing.T) {
		rc := start(t, "--log-format", "json", "receive", "--listen", "127.0.0.1:0", "--timeout", "5s")
		addr := rc.listenAddr()
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		c.Close()
		r := rc.wait()
		// ftkvm's own messages are plain "ftkvm: " lines; logs are JSON.
		logs := 0
		for _, l := range strings.Split(strings.TrimSpace(r.stderr), "\n") {
			if strings.HasPrefix(l, "ftkvm: ") {
				continue
			}
			var v struct{ Level, Msg string }
			if err := json.Unmarshal([]byte(l), &v); err != nil || v.Level == "" {
				t.Fatalf("not a JSON log line: %q", l)
			}
			if strings.Contains(v.Msg, "was not a migration") {
				logs++
			}
		}
		if logs != 1 {
			t.Fatalf("want the stranger logged once, in JSON:\n%s", r.stderr)
		}
	})
}

// ctl status exits 0 for a protected primary and 1 once its backup is
// gone, and the control socket is its owner's only.
func TestCtlStatusHealth(t *testing.T) {
	requireKVM(t)
	w := workload{name: "counter", cmdline: "workload=counter lines=400 wait=4 hz=200"}
	sock := tempSocket(t)
	b := start(t, append([]string{"--log-level", "info", "backup", "--listen", "127.0.0.1:0"}, replicaArgs(w)...)...)
	p := start(t, append([]string{"--log-level", "info", "primary", "--backup", b.backupAddr(), "--api", sock}, replicaArgs(w)...)...)
	p.waitLines(2)
	fi, err := os.Stat(sock)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("control socket mode %v, want 0600", fi.Mode().Perm())
	}
	if r := ftkvm(t, time.Minute, "", "ctl", "--api", sock, "status"); r.status != 0 || strings.Contains(r.stdout, "NOT PROTECTED") {
		t.Fatalf("protected primary: status %d\n%s%s", r.status, r.stdout, r.stderr)
	}
	b.kill()
	p.waitUntil("the backup lost", func() bool { return strings.Contains(p.stderr(), "running unprotected") })
	r := ftkvm(t, time.Minute, "", "ctl", "--api", sock, "status")
	if r.status != 1 || !strings.Contains(r.stdout, "NOT PROTECTED: unprotected") {
		t.Fatalf("unprotected primary: status %d\n%s%s", r.status, r.stdout, r.stderr)
	}
}
