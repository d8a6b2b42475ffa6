package api

import (
	"context"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ftkvm/ftkvm/vmm"
	"github.com/ftkvm/ftkvm/vmm/migrate"
)

func testMachine(t *testing.T) (*vmm.Machine, chan error) {
	t.Helper()
	dir := filepath.Join("..", "..", "guest", "testos")
	if out, err := exec.Command("make", "-s", "-C", dir).CombinedOutput(); err != nil {
		t.Fatalf("make testos: %v\n%s", err, out)
	}
	kernel, err := os.ReadFile(filepath.Join(dir, "testos.elf"))
	if err != nil {
		t.Fatal(err)
	}
	m, err := vmm.New(vmm.Config{Kernel: kernel, Cmdline: "workload=echo", MemSize: 16 << 20, Console: io.Discard})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { _, err := m.Run(); done <- err }()
	t.Cleanup(func() {
		m.Do(func(m *vmm.Machine) error { m.Stop("test over"); return nil })
		<-done
		m.Close()
	})
	return m, done
}

func TestAPI(t *testing.T) {
	m, _ := testMachine(t)
	dir, err := os.MkdirTemp("", "ftkvm-api-test-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	sock := filepath.Join(dir, "s")
	srv, err := Listen(sock, m)
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Shutdown(time.Second)
	if _, err := Listen(sock, m); err == nil || !strings.Contains(err.Error(), "in use") {
		t.Fatalf("second Listen: %v", err)
	}
	c := NewClient(sock)
	ctx := context.Background()

	st, err := c.Status(ctx)
	if err != nil || st.State != "running" {
		t.Fatalf("status: %+v %v", st, err)
	}
	// The exit profile comes with the status, read on the vCPU thread
	// together with Stats: its port exits are Stats'.
	if p := st.ExitProfile; p == nil || p.WallNs <= 0 {
		t.Fatalf("status without an exit profile: %+v", st.ExitProfile)
	} else {
		var io uint64
		for _, r := range p.Reasons {
			if r.Reason == "KVM_EXIT_IO" {
				io = r.Exits
			}
		}
		if io != st.Stats.IOExits {
			t.Fatalf("exit profile has %d port exits, Stats %d", io, st.Stats.IOExits)
		}
	}
	if err := c.SetState(ctx, "Resumed"); err == nil || !strings.Contains(err.Error(), "not paused") {
		t.Fatalf("resume a running guest: %v", err)
	}
	if err := c.SetState(ctx, "Frozen"); err == nil || !strings.Contains(err.Error(), "want \"Paused\"") {
		t.Fatalf("bad state: %v", err)
	}
	if err := c.SetState(ctx, "Paused"); err != nil {
		t.Fatal(err)
	}
	if st, _ := c.Status(ctx); st.State != "paused" {
		t.Fatalf("state %q after pause", st.State)
	}
	var events []migrate.Progress
	res, err := c.Snapshot(ctx, SnapshotRequest{Path: filepath.Join(dir, "snap")}, func(p migrate.Progress) { events = append(events, p) })
	if err != nil || res.Bytes == 0 || res.Stopped {
		t.Fatalf("snapshot: %+v %v", res, err)
	}
	if len(events) == 0 || events[len(events)-1].Phase != "done" {
		t.Fatalf("progress events: %+v", events)
	}
	if st, _ := c.Status(ctx); st.State != "paused" || st.BytesSent != res.Bytes || st.LastOperation == nil {
		t.Fatalf("after a snapshot of a paused guest: %+v", st)
	}
	if err := c.SetState(ctx, "Resumed"); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Snapshot(ctx, SnapshotRequest{Path: "relative"}, nil); err == nil || !strings.Contains(err.Error(), "not absolute") {
		t.Fatalf("relative path: %v", err)
	}
	if _, err := c.Migrate(ctx, MigrateRequest{Destination: "nowhere"}, nil); err == nil {
		t.Fatal("bad destination accepted")
	}
	// Raw requests: bad JSON and unknown fields are 400s.
	hc := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", sock)
	}}}
	for _, body := range []string{"{", `{"state":"Paused","extra":1}`} {
		req, _ := http.NewRequest(http.MethodPatch, "http://x/vm", strings.NewReader(body))
		resp, err := hc.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusBadRequest {
			t.Fatalf("body %q: %s", body, resp.Status)
		}
	}
}

func TestNoServer(t *testing.T) {
	_, err := NewClient(filepath.Join(t.TempDir(), "none")).Status(context.Background())
	if err == nil || !strings.Contains(err.Error(), "no ftkvm serving") {
		t.Fatalf("got %v", err)
	}
}

// A snapshot with stop of a guest paused through the API ends its Run: the
// pause does not keep a stopped guest's ftkvm alive.
func TestSnapshotStopWhilePaused(t *testing.T) {
	m, done := testMachine(t)
	dir, err := os.MkdirTemp("", "ftkvm-api-test-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	srv, err := Listen(filepath.Join(dir, "s"), m)
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Shutdown(time.Second)
	c := NewClient(filepath.Join(dir, "s"))
	if err := c.SetState(context.Background(), "Paused"); err != nil {
		t.Fatal(err)
	}
	res, err := c.Snapshot(context.Background(), SnapshotRequest{Path: filepath.Join(dir, "snap"), Stop: true}, nil)
	if err != nil || !res.Stopped {
		t.Fatalf("snapshot: %+v %v", res, err)
	}
	select {
	case err := <-done:
		done <- err // for the cleanup
		if !strings.Contains(err.Error(), "snapshot written to") {
			t.Fatalf("Run returned %v", err)
		}
	case <-time.After(time.Minute):
		t.Fatal("the stopped guest's Run did not return")
	}
}
