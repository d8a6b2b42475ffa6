package test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// ftkvm drill on the test guest: it kills the primary twice, prints its
// table, writes its PNG, and finds nothing lost.
func TestDrillCommand(t *testing.T) {
	requireKVM(t)
	png := filepath.Join(t.TempDir(), "drill.png")
	r := ftkvm(t, 10*time.Minute, "", "drill", "--kernel", testosELF, "--mem", "32",
		"--cmdline", "workload=counter lines=800 wait=4 hz=200", "--kills", "2", "--timeout", "5s", "--plot", png)
	if r.status != 0 || !strings.Contains(r.stdout, "drill passed") {
		t.Fatalf("status %d\n%s\n%s", r.status, r.stdout, r.stderr)
	}
	if !strings.Contains(r.stdout, "detected") || strings.Count(r.stdout, "\n") < 3 {
		t.Fatalf("no table:\n%s", r.stdout)
	}
	if fi, err := os.Stat(png); err != nil || fi.Size() == 0 {
		t.Fatalf("no plot: %v", err)
	}
	t.Logf("\n%s", r.stdout)
}
