// Package test holds ftkvm's integration tests: they build the ftkvm binary
// and the test guest, and run real guests on the real /dev/kvm.
package test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"
)

var (
	repoRoot  string
	ftkvmBin  string
	testosELF string
)

func TestMain(m *testing.M) {
	_, file, _, _ := runtime.Caller(0)
	repoRoot = filepath.Dir(filepath.Dir(file))
	dir, err := os.MkdirTemp("", "ftkvm-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	ftkvmBin = filepath.Join(dir, "ftkvm")
	testosELF = filepath.Join(repoRoot, "guest", "testos", "testos.elf")
	build := [][]string{
		{"go", "build", "-o", ftkvmBin, "./cmd/ftkvm"},
		{"make", "-s", "-C", "guest/testos"},
	}
	for _, args := range build {
		cmd := exec.Command(args[0], args[1:]...)
		cmd.Dir = repoRoot
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			fmt.Fprintf(os.Stderr, "%s: %v\n%s", strings.Join(args, " "), err, out)
			os.Exit(1)
		}
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// result is what a finished ftkvm process left behind.
type result struct {
	stdout, stderr string
	status         int
}

// lines returns stdout split into lines with carriage returns removed.
func (r result) lines() []string {
	s := strings.ReplaceAll(r.stdout, "\r", "")
	return strings.Split(strings.TrimRight(s, "\n"), "\n")
}

// ftkvm runs the binary with args and stdin, killing it after timeout. The
// timeout is a hang guard, not an assertion on speed.
func ftkvm(t *testing.T, timeout time.Duration, stdin string, args ...string) result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, ftkvmBin, args...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	cmd.Stdin = strings.NewReader(stdin)
	err := cmd.Run()
	if ctx.Err() != nil {
		t.Fatalf("ftkvm %s: hung for %v; stdout:\n%s\nstderr:\n%s", strings.Join(args, " "), timeout, out.String(), errb.String())
	}
	status := 0
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		status = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("ftkvm: %v", err)
	}
	return result{out.String(), errb.String(), status}
}

func requireKVM(t testing.TB) {
	t.Helper()
	f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0)
	if err != nil {
		t.Fatalf("this test needs /dev/kvm: %v", err)
	}
	f.Close()
}
