package test

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/ftkvm/ftkvm/vmm/snapshot"
)

// Helpers for the snapshot, migration and control-API tests: ftkvm
// processes running in the background, and checks of each testos
// workload's complete output that hold for any execution, interrupted by
// a snapshot or a migration or not.

// proc is an ftkvm process running in the background.
type proc struct {
	t      testing.TB
	cmd    *exec.Cmd
	stdin  io.WriteCloser
	mu     sync.Mutex
	out    bytes.Buffer
	errb   bytes.Buffer
	done   chan struct{}
	status int
}

type lockedWriter struct {
	mu *sync.Mutex
	b  *bytes.Buffer
}

func (w lockedWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.b.Write(p)
}

// start runs ftkvm with args in the background. It is killed when the test
// ends.
func start(t testing.TB, args ...string) *proc {
	t.Helper()
	return startCmd(t, append([]string{ftkvmBin}, args...)...)
}

// startCmd runs a command line in the background (ftkvm under a wrapper
// such as ip netns exec).
func startCmd(t testing.TB, argv ...string) *proc {
	t.Helper()
	p := &proc{t: t, done: make(chan struct{})}
	p.cmd = exec.Command(argv[0], argv[1:]...)
	p.cmd.Stdout = lockedWriter{&p.mu, &p.out}
	p.cmd.Stderr = lockedWriter{&p.mu, &p.errb}
	var err error
	if p.stdin, err = p.cmd.StdinPipe(); err != nil {
		t.Fatal(err)
	}
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		err := p.cmd.Wait()
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			p.status = ee.ExitCode()
		} else if err != nil {
			p.status = -1
		}
		close(p.done)
	}()
	t.Cleanup(func() {
		p.cmd.Process.Kill()
		<-p.done
	})
	return p
}

func (p *proc) stdout() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.out.String()
}

func (p *proc) stderr() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.errb.String()
}

// waitUntil polls cond until it holds; the timeout is a hang guard.
func (p *proc) waitUntil(what string, cond func() bool) {
	p.t.Helper()
	deadline := time.Now().Add(2 * time.Minute)
	for !cond() {
		select {
		case <-p.done:
			if cond() {
				return
			}
			p.t.Fatalf("ftkvm exited (status %d) before %s\nstdout:\n%s\nstderr:\n%s", p.status, what, p.stdout(), p.stderr())
		default:
		}
		if time.Now().After(deadline) {
			p.t.Fatalf("still no %s\nstdout:\n%s\nstderr:\n%s", what, p.stdout(), p.stderr())
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// waitLines waits until stdout has n complete lines.
func (p *proc) waitLines(n int) {
	p.t.Helper()
	p.waitUntil(fmt.Sprintf("%d lines of output", n), func() bool { return strings.Count(p.stdout(), "\n") >= n })
}

// waitLinesOrEnd waits until stdout has n complete lines or the process
// ended: a drill's kill moment, which may come after the guest's end when
// a workload prints a varying number of lines (the compute workload's
// ticker lines); the drill then sees a late kill and retries earlier.
func (p *proc) waitLinesOrEnd(n int) {
	p.t.Helper()
	p.waitUntil(fmt.Sprintf("%d lines of output or the end", n), func() bool {
		select {
		case <-p.done:
			return true
		default:
		}
		return strings.Count(p.stdout(), "\n") >= n
	})
}

func (p *proc) waitOutput(s string) {
	p.t.Helper()
	p.waitUntil(fmt.Sprintf("%q in the output", s), func() bool { return strings.Contains(p.stdout(), s) })
}

// wait waits for the process to exit.
func (p *proc) wait() result {
	p.t.Helper()
	select {
	case <-p.done:
	case <-time.After(3 * time.Minute):
		p.t.Fatalf("ftkvm hung\nstdout:\n%s\nstderr:\n%s", p.stdout(), p.stderr())
	}
	return result{p.stdout(), p.stderr(), p.status}
}

func (p *proc) kill() {
	p.cmd.Process.Signal(syscall.SIGKILL)
	<-p.done
}

// listenAddr waits for `ftkvm receive` to say where it listens.
func (p *proc) listenAddr() string {
	p.t.Helper()
	re := regexp.MustCompile(`waiting for a migration on (\S+)`)
	var addr string
	p.waitUntil("listening address", func() bool {
		m := re.FindStringSubmatch(p.stderr())
		if m != nil {
			addr = m[1]
		}
		return m != nil
	})
	return addr
}

// snapshotConsoleBytes reads how much console output the guest had written
// when a snapshot file was taken (its Stats.ConsoleBytes).
func snapshotConsoleBytes(t *testing.T, path string) int {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	st, err := snapshot.ReadFile(f, func(h snapshot.Header) ([]byte, error) { return make([]byte, h.MemSize), nil })
	if err != nil {
		t.Fatal(err)
	}
	return int(st.Machine.Stats.ConsoleBytes)
}

// workload is a testos workload for these tests, with a check of its
// complete output.
type workload struct {
	name    string
	cmdline string
	lines   int                                  // lines printed in all (banner and PASS included), about
	input   []string                             // echo: lines fed one at a time
	check   func(t *testing.T, body []string)    // the workload's own lines
	same    func(a, b []string) (string, string) // deterministic content to compare, if any
	flags   []string                             // more ftkvm flags for the guest (--epoch step)
}

var transferWorkloads = []workload{
	{
		name: "counter", cmdline: "workload=counter lines=40 wait=6 hz=200", lines: 42,
		check: func(t *testing.T, body []string) {
			re := regexp.MustCompile(`^counter (\d+) ticks=(\d+)$`)
			if len(body) != 40 {
				t.Fatalf("%d lines, want 40:\n%s", len(body), strings.Join(body, "\n"))
			}
			last := -1
			for i, l := range body {
				m := re.FindStringSubmatch(l)
				if m == nil {
					t.Fatalf("line %q", l)
				}
				if k, _ := strconv.Atoi(m[1]); k != i+1 {
					t.Fatalf("line %d numbered %d:\n%s", i+1, k, strings.Join(body, "\n"))
				}
				ticks, _ := strconv.Atoi(m[2])
				if ticks < last+6 {
					t.Fatalf("ticks %d after %d (wait=6):\n%s", ticks, last, strings.Join(body, "\n"))
				}
				last = ticks
			}
		},
	},
	{
		name: "interleave", cmdline: "workload=interleave lines=30 work=3000000 hz=250", lines: 62,
		check: checkInterleave(30),
	},
	{
		name: "compute", cmdline: "workload=compute mib=160 every=16 hz=100", lines: 12,
		check: func(t *testing.T, body []string) {
			want := computeSums(160, 16)
			re := regexp.MustCompile(`^compute mib=(\d+) sum=([0-9a-f]{16})$`)
			got, lastTick, lastMiB := 0, -1, 0
			for _, l := range body {
				if strings.HasPrefix(l, "compute tick ") {
					tk, err := strconv.Atoi(strings.TrimPrefix(l, "compute tick "))
					if err != nil || tk <= lastTick {
						t.Fatalf("tick line %q after tick %d", l, lastTick)
					}
					lastTick = tk
					continue
				}
				m := re.FindStringSubmatch(l)
				if m == nil {
					t.Fatalf("unexpected line %q", l)
				}
				k, _ := strconv.Atoi(m[1])
				if k <= lastMiB || want[k] != m[2] {
					t.Fatalf("line %q: after mib=%d, host sum %s", l, lastMiB, want[k])
				}
				lastMiB = k
				got++
			}
			if got != len(want) {
				t.Fatalf("%d checksum lines, want %d", got, len(want))
			}
		},
		same: func(a, b []string) (string, string) { return sums(a), sums(b) },
	},
	{
		name: "clock", cmdline: "workload=clock samples=4 hz=100", lines: 6,
		check: func(t *testing.T, body []string) {
			re := regexp.MustCompile(`^clock pit=(\d+) cmos=(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) ticks=(\d+)$`)
			if len(body) != 4 {
				t.Fatalf("%d samples, want 4:\n%s", len(body), strings.Join(body, "\n"))
			}
			var prev time.Time
			lastTicks := -1
			for _, l := range body {
				m := re.FindStringSubmatch(l)
				if m == nil {
					t.Fatalf("line %q", l)
				}
				if pit, _ := strconv.Atoi(m[1]); pit > 11932 {
					t.Fatalf("PIT counter %d above its reload value", pit)
				}
				ts, err := time.Parse("2006-01-02 15:04:05", m[2])
				if err != nil {
					t.Fatal(err)
				}
				// Virtual time continues across a snapshot or migration:
				// the CMOS clock never goes back, and lags the host's by
				// at most the time the guest spent stopped.
				if ts.Before(prev) || ts.Before(testStart.Add(-2*time.Second).Truncate(time.Second)) || ts.After(time.Now().UTC().Add(2*time.Second)) {
					t.Fatalf("CMOS time %v (previous %v, test started %v):\n%s", ts, prev, testStart, strings.Join(body, "\n"))
				}
				prev = ts
				ticks, _ := strconv.Atoi(m[3])
				if lastTicks >= 0 && ticks < lastTicks+50 {
					t.Fatalf("samples %d and %d ticks apart, want hz/2 = 50:\n%s", lastTicks, ticks, strings.Join(body, "\n"))
				}
				lastTicks = ticks
			}
		},
	},
	{
		name: "echo", cmdline: "workload=echo hz=100", lines: 7,
		input: []string{"hello world", "Fault Tolerance", "snapshot", "migrate", "quit"},
		check: func(t *testing.T, body []string) {
			want := []string{"echo: ready", "echo: HELLO WORLD", "echo: FAULT TOLERANCE", "echo: SNAPSHOT", "echo: MIGRATE", "echo: QUIT"}
			if strings.Join(body, "\n") != strings.Join(want, "\n") {
				t.Fatalf("got:\n%s\nwant:\n%s", strings.Join(body, "\n"), strings.Join(want, "\n"))
			}
		},
		same: func(a, b []string) (string, string) { return strings.Join(a, "\n"), strings.Join(b, "\n") },
	},
}

var testStart = time.Now().UTC()

func sums(lines []string) string {
	var s []string
	for _, l := range lines {
		if strings.HasPrefix(l, "compute mib=") {
			s = append(s, l)
		}
	}
	return strings.Join(s, "\n")
}

// checkComplete checks a complete console output: banner, the workload's
// lines, PASS.
func (w workload) checkComplete(t *testing.T, out string) {
	t.Helper()
	lines := strings.Split(strings.TrimRight(strings.ReplaceAll(out, "\r", ""), "\n"), "\n")
	if len(lines) < 2 || !strings.HasPrefix(lines[0], "testos: workload="+w.name) || lines[len(lines)-1] != "testos: PASS" {
		t.Fatalf("want banner and PASS, got:\n%s", out)
	}
	w.check(t, lines[1:len(lines)-1])
}

func bodyLines(out string) []string {
	return strings.Split(strings.TrimRight(strings.ReplaceAll(out, "\r", ""), "\n"), "\n")
}

// feed writes input lines one at a time, each once the guest echoed the
// previous one, from line `from` (0-based) to `to`; the guest must already
// show "echo: ready".
func (w workload) feed(p *proc, from, to int) {
	p.t.Helper()
	for i := from; i < to && i < len(w.input); i++ {
		if _, err := io.WriteString(p.stdin, w.input[i]+"\n"); err != nil {
			p.t.Fatal(err)
		}
		if w.input[i] != "quit" {
			p.waitOutput("echo: " + strings.ToUpper(w.input[i]) + "\n")
		}
	}
}

// randomMoment waits until the workload is somewhere in its first third, at
// random: after a random number of its lines, then a random few
// milliseconds. (Later, a slow machine may see the guest finish before the
// transfer does.)
func (w workload) randomMoment(t *testing.T, p *proc, r *rand.Rand) {
	t.Helper()
	if w.input != nil {
		p.waitOutput("echo: ready\n")
		return
	}
	p.waitLines(1 + r.IntN(max(w.lines/3, 1)))
	time.Sleep(time.Duration(r.IntN(20)) * time.Millisecond)
}

func newRand(t *testing.T) *rand.Rand {
	seed := uint64(time.Now().UnixNano())
	t.Logf("random seed %d", seed)
	return rand.New(rand.NewPCG(seed, seed>>32))
}

func tempSocket(t *testing.T) string {
	// Unix socket paths are limited to 108 bytes; t.TempDir can be long.
	dir, err := os.MkdirTemp("", "ftkvm-api-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return filepath.Join(dir, "api.sock")
}

// checkInterleave checks the interleave workload's lines: tasks A and B
// each print 1..lines in order, in any mix.
func checkInterleave(lines int) func(t *testing.T, body []string) {
	return func(t *testing.T, body []string) {
		next := map[string]int{"A": 1, "B": 1}
		for _, l := range body {
			f := strings.Fields(l)
			if len(f) != 2 || (f[0] != "A" && f[0] != "B") {
				t.Fatalf("unexpected line %q", l)
			}
			if k, _ := strconv.Atoi(f[1]); k != next[f[0]] {
				t.Fatalf("task %s printed %d, want %d:\n%s", f[0], k, next[f[0]], strings.Join(body, "\n"))
			}
			next[f[0]]++
		}
		if next["A"] != lines+1 || next["B"] != lines+1 {
			t.Fatalf("tasks stopped early: %v", next)
		}
	}
}
