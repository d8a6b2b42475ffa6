// Command epochs runs the paper's epoch-length experiment (Bressoud and
// Schneider, section 4): the cost of replication against the epoch length,
// for a CPU-bound and a console-heavy guest, under both output policies.
//
//	go run ./tools/epochs [-out docs] [-reps 1]
//
// On a host whose KVM single-steps ring 0 only (see ftkvm probe), the
// guests are testos workloads at ring 0 under the step clock. Each
// replicated run (primary and backup on this machine, over loopback) is
// timed by its primary's process, and divided by the same guest's time
// under `ftkvm run` with the same clock, and by the time of two such runs
// started together (the slower of the two). The second ratio is the one
// plotted: a replicated pair single-steps two guests, one per process, on
// this host's two cores, so against one plain run it measures that
// doubled load as much as the protocol; against two plain runs side by
// side it measures the protocol.
// The exit clock (epochs end at guest-caused exits, no single-stepping)
// is measured the same way, for comparison. The table goes to stdout and
// OUT/epochs.md, the plot to OUT/epochs.png. Runs are timed from process
// start to end.
package main

import (
	"bufio"
	"bytes"
	"errors"
	"flag"
	"fmt"
	"image/color"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/vg"
)

type workload struct {
	name, kind, cmdline string
}

var workloads = []workload{
	{"tsc", "CPU-bound", "workload=tsc ring=0 samples=10 work=3000"},
	{"interleave", "console-heavy", "workload=interleave ring=0 lines=12 work=100 hz=100"},
}

var lengths = []uint64{1024, 4096, 16384, 32768, 65536}

var policies = []string{"output-commit", "strict"}

func main() {
	out := flag.String("out", "docs", "folder for epochs.md and epochs.png")
	reps := flag.Int("reps", 1, "runs per configuration (the median is kept)")
	bin := flag.String("ftkvm", "", "ftkvm binary (default: built from this checkout)")
	kernel := flag.String("kernel", "guest/testos/testos.elf", "the test guest (make testos)")
	flag.Parse()
	if err := run(*out, *reps, *bin, *kernel); err != nil {
		fmt.Fprintln(os.Stderr, "epochs:", err)
		os.Exit(1)
	}
}

type result struct {
	workload, policy string
	clock            string  // "step" or "exit"
	length           uint64  // instructions; 0 for the exit clock
	ratio            float64 // against one plain run
	pairRatio        float64 // against two plain runs side by side
	ft, plain, pair  time.Duration
	epochs           int
	logBytes         int
}

func run(outDir string, reps int, bin, kernel string) error {
	if bin == "" {
		dir, err := os.MkdirTemp("", "epochs-")
		if err != nil {
			return err
		}
		defer os.RemoveAll(dir)
		bin = filepath.Join(dir, "ftkvm")
		if out, err := exec.Command("go", "build", "-o", bin, "./cmd/ftkvm").CombinedOutput(); err != nil {
			return fmt.Errorf("build ftkvm: %v\n%s", err, out)
		}
	}
	if _, err := os.Stat(kernel); err != nil {
		return fmt.Errorf("test guest: %w (run make testos)", err)
	}
	x := &experiment{bin: bin, kernel: kernel, reps: reps}
	var results []result
	for _, w := range workloads {
		for _, clock := range []string{"step", "exit"} {
			plain, err := x.median(func() (time.Duration, runInfo, error) { return x.plain(w, clock) })
			if err != nil {
				return err
			}
			pair, err := x.median(func() (time.Duration, runInfo, error) { return x.plainPair(w, clock) })
			if err != nil {
				return err
			}
			ls := lengths
			if clock == "exit" {
				ls = []uint64{0}
			}
			for _, policy := range policies {
				for _, n := range ls {
					var info runInfo
					d, err := x.median(func() (time.Duration, runInfo, error) {
						d, i, err := x.replicated(w, clock, policy, n)
						info = i
						return d, i, err
					})
					if err != nil {
						return err
					}
					r := result{workload: w.name, policy: policy, clock: clock, length: n, ft: d, plain: plain, pair: pair,
						ratio: d.Seconds() / plain.Seconds(), pairRatio: d.Seconds() / pair.Seconds(),
						epochs: info.epochs, logBytes: info.logBytes}
					fmt.Fprintf(os.Stderr, "epochs: %s %s %s %d: %.2f, %.2f side by side\n", w.name, clock, policy, n, r.ratio, r.pairRatio)
					results = append(results, r)
				}
			}
		}
	}
	table := formatTable(results)
	fmt.Print(table)
	if err := os.MkdirAll(outDir, 0o755); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(outDir, "epochs.md"), []byte(table), 0o644); err != nil {
		return err
	}
	return drawPlot(results, filepath.Join(outDir, "epochs.png"))
}

type experiment struct {
	bin, kernel string
	reps        int
}

type runInfo struct {
	epochs, logBytes int
}

// median runs f reps times and keeps the median time.
func (x *experiment) median(f func() (time.Duration, runInfo, error)) (time.Duration, error) {
	var ds []time.Duration
	for range x.reps {
		d, _, err := f()
		if err != nil {
			return 0, err
		}
		ds = append(ds, d)
	}
	slices.Sort(ds)
	return ds[len(ds)/2], nil
}

func (x *experiment) guest(w workload, clock string) []string {
	return []string{"--kernel", x.kernel, "--mem", "32", "--cmdline", w.cmdline, "--epoch", clock}
}

// proc is a running ftkvm with its output collected.
type proc struct {
	cmd      *exec.Cmd
	mu       sync.Mutex
	stderr   bytes.Buffer
	first    chan time.Time // the guest's first console line
	done     chan error
	started  time.Time
	firstOne sync.Once
}

func (x *experiment) start(args ...string) (*proc, error) {
	p := &proc{cmd: exec.Command(x.bin, args...), first: make(chan time.Time, 1), done: make(chan error, 1)}
	stdout, err := p.cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	p.cmd.Stderr = lockedBuffer{&p.mu, &p.stderr}
	p.started = time.Now()
	if err := p.cmd.Start(); err != nil {
		return nil, err
	}
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			if strings.HasPrefix(sc.Text(), "testos: workload=") {
				p.firstOne.Do(func() { p.first <- time.Now() })
			}
		}
		_, _ = io.Copy(io.Discard, stdout)
		p.done <- p.cmd.Wait()
	}()
	return p, nil
}

func (p *proc) errText() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.stderr.String()
}

// timed waits for the process's end and returns its run time, from its
// start (the backup already listening, for a replicated run): set-up and
// handshake are in it, the same for every configuration of a workload.
// (Timing from the guest's first line instead was distorted: under
// output-commit that line leaves only once acknowledged.)
func (p *proc) timed() (time.Duration, error) {
	t0 := p.started
	select {
	case <-p.first:
	case err := <-p.done:
		return 0, fmt.Errorf("ftkvm ended before the guest printed (%v):\n%s", err, p.errText())
	case <-time.After(10 * time.Minute):
		p.cmd.Process.Kill()
		return 0, errors.New("ftkvm hung")
	}
	if err := <-p.done; err != nil {
		return 0, fmt.Errorf("ftkvm: %v\n%s", err, p.errText())
	}
	return time.Since(t0), nil
}

type lockedBuffer struct {
	mu *sync.Mutex
	b  *bytes.Buffer
}

func (l lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (x *experiment) plain(w workload, clock string) (time.Duration, runInfo, error) {
	p, err := x.start(append([]string{"run"}, x.guest(w, clock)...)...)
	if err != nil {
		return 0, runInfo{}, err
	}
	d, err := p.timed()
	return d, runInfo{}, err
}

// plainPair starts two plain runs together and returns the slower's time.
func (x *experiment) plainPair(w workload, clock string) (time.Duration, runInfo, error) {
	var ps [2]*proc
	for i := range ps {
		p, err := x.start(append([]string{"run"}, x.guest(w, clock)...)...)
		if err != nil {
			return 0, runInfo{}, err
		}
		ps[i] = p
	}
	var slowest time.Duration
	var firstErr error
	for _, p := range ps {
		d, err := p.timed()
		if err != nil && firstErr == nil {
			firstErr = err
		}
		slowest = max(slowest, d)
	}
	return slowest, runInfo{}, firstErr
}

var (
	waitingOn = regexp.MustCompile(`waiting for its primary on (\S+)`)
	summary   = regexp.MustCompile(` epochs=(\d+) .*link_bytes=(\d+)`)
)

func (x *experiment) replicated(w workload, clock, policy string, n uint64) (time.Duration, runInfo, error) {
	g := x.guest(w, clock)
	b, err := x.start(append([]string{"backup", "--listen", "127.0.0.1:0"}, g...)...)
	if err != nil {
		return 0, runInfo{}, err
	}
	defer b.cmd.Process.Kill()
	var addr string
	for deadline := time.Now().Add(time.Minute); addr == ""; time.Sleep(5 * time.Millisecond) {
		if m := waitingOn.FindStringSubmatch(b.errText()); m != nil {
			addr = m[1]
		}
		if time.Now().After(deadline) {
			return 0, runInfo{}, fmt.Errorf("the backup did not start:\n%s", b.errText())
		}
	}
	args := append([]string{"--log-level", "info", "primary", "--backup", addr, "--policy", policy}, g...)
	if n > 0 {
		args = append(args, "--epoch-instructions", strconv.FormatUint(n, 10))
	}
	p, err := x.start(args...)
	if err != nil {
		return 0, runInfo{}, err
	}
	d, err := p.timed()
	if err != nil {
		return 0, runInfo{}, err
	}
	var info runInfo
	if m := summary.FindStringSubmatch(p.errText()); m != nil {
		info.epochs, _ = strconv.Atoi(m[1])
		info.logBytes, _ = strconv.Atoi(m[2])
	}
	return d, info, nil
}

func formatTable(rs []result) string {
	var b strings.Builder
	fmt.Fprintf(&b, "| workload | clock | epoch length (instructions) | policy | replicated / plain run | replicated / two plain runs side by side | epochs | log bytes |\n")
	fmt.Fprintf(&b, "| --- | --- | --- | --- | --- | --- | --- | --- |\n")
	for _, r := range rs {
		length := strconv.FormatUint(r.length, 10)
		if r.clock == "exit" {
			length = "exit clock"
		}
		fmt.Fprintf(&b, "| %s (%s) | %s | %s | %s | %.2f (%.2f s / %.2f s) | %.2f (/ %.2f s) | %d | %d |\n",
			r.workload, kindOf(r.workload), r.clock, length, r.policy, r.ratio, r.ft.Seconds(), r.plain.Seconds(), r.pairRatio, r.pair.Seconds(), r.epochs, r.logBytes)
	}
	return b.String()
}

func kindOf(name string) string {
	for _, w := range workloads {
		if w.name == name {
			return w.kind
		}
	}
	return ""
}

// drawPlot: overhead against epoch length (log scale), a line per
// workload and policy; the exit clock's overhead as a dashed line.
func drawPlot(rs []result, path string) error {
	p := plot.New()
	p.Title.Text = "Replication overhead against epoch length (step clock, testos at ring 0)"
	p.X.Label.Text = "epoch length (guest instructions)"
	p.Y.Label.Text = "replicated time / two plain runs side by side"
	p.X.Scale = plot.LogScale{}
	p.X.Tick.Marker = plot.ConstantTicks(ticksFor(lengths))
	p.Legend.Top = true
	colors := []color.Color{
		color.RGBA{R: 0x1f, G: 0x77, B: 0xb4, A: 0xff}, color.RGBA{R: 0xff, G: 0x7f, B: 0x0e, A: 0xff},
		color.RGBA{R: 0x2c, G: 0xa0, B: 0x2c, A: 0xff}, color.RGBA{R: 0xd6, G: 0x27, B: 0x28, A: 0xff},
	}
	i := 0
	for _, w := range workloads {
		for _, pol := range policies {
			var pts, exit plotter.XYs
			for _, r := range rs {
				if r.workload != w.name || r.policy != pol {
					continue
				}
				if r.clock == "step" {
					pts = append(pts, plotter.XY{X: float64(r.length), Y: r.pairRatio})
				} else {
					exit = plotter.XYs{{X: float64(lengths[0]), Y: r.pairRatio}, {X: float64(lengths[len(lengths)-1]), Y: r.pairRatio}}
				}
			}
			c := colors[i%len(colors)]
			i++
			line, points, err := plotter.NewLinePoints(pts)
			if err != nil {
				return err
			}
			line.Color, points.Color = c, c
			p.Add(line, points)
			p.Legend.Add(fmt.Sprintf("%s, %s (step)", w.name, pol), line, points)
			if exit != nil {
				el, err := plotter.NewLine(exit)
				if err != nil {
					return err
				}
				el.Color, el.Dashes = c, []vg.Length{vg.Points(4), vg.Points(3)}
				p.Add(el)
				p.Legend.Add(fmt.Sprintf("%s, %s (exit clock)", w.name, pol), el)
			}
		}
	}
	p.Legend.ThumbnailWidth = vg.Points(20)
	return p.Save(8*vg.Inch, 5*vg.Inch, path)
}

func ticksFor(ls []uint64) []plot.Tick {
	var ts []plot.Tick
	for _, l := range ls {
		ts = append(ts, plot.Tick{Value: float64(l), Label: fmt.Sprintf("%dK", l/1024)})
	}
	return ts
}
