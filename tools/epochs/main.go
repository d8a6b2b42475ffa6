// Command epochs runs the paper's epoch-length experiment (Bressoud and
// Schneider, section 4): the cost of replication against the epoch length,
// for a CPU-bound and an I/O-bound guest, under both output policies.
//
//	go run ./tools/epochs [-out docs] [-reps 3]   # or: make epochs
//	go run ./tools/epochs -replot                 # redraw the figure from the table
//
// The clock is the exit clock (`--epoch exits`, ftkvm's default), whose
// epoch length is `--epoch-length` (time): the guest runs natively between
// epoch ends, so the cost of an epoch end is not hidden under the cost of
// single-stepping every instruction, as it is under the step clock on a
// host whose KVM steps ring 0 only. The guests are testos workloads at
// ring 3 (guest/testos/README.md):
//
//   - compute (CPU-bound): one task hashes a stream of MiB, a second prints
//     a line every second of guest time; the guest makes almost no exits,
//     so its epochs end by a kick and a checkpoint (ft/doc.go, the kick
//     bound);
//   - counter with wait=0 (I/O-bound): a line per loop, each a write
//     syscall and a UART transmission, thousands of exits a second;
//   - the same counter with the primary in verify mode (see workloads).
//
// Each round runs, per workload, two plain `ftkvm run`s side by side (the
// baseline: a replicated pair runs two guests, one per process, so on a
// two-core host against one plain run it would measure that doubled load
// as much as the protocol), then every replicated configuration (primary
// and backup on this machine, over loopback), in ascending length order
// in even rounds and descending in odd ones, so that a drift of the
// host's load does not fall on one end of the curve. A replicated run's
// ratio is its time over the same round's baseline; each point is the
// median of the rounds' ratios, with their minimum and maximum. Runs are
// timed from process start to end; the CPU time is the processes' user
// and system time (primary and backup, or both plain runs), which on a
// host shared with other work is far steadier than the wall time. The
// table goes to stdout and OUT/epochs.md (between the markers, if the
// file has them), the plot to OUT/epochs.png. docs/epochs.md explains
// the figures.
package main

import (
	"bufio"
	"bytes"
	"errors"
	"flag"
	"fmt"
	"image/color"
	"io"
	"math"
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
	"gonum.org/v1/plot/vg/draw"
	"gonum.org/v1/plot/vg/vgimg"
)

type workload struct {
	name, kind, cmdline string
	primary             []string // more flags for the primary
}

// The guest timer runs at 1000 Hz: a tick is these guests' only
// asynchronous event, and an epoch with nothing to deliver is not ended
// (ft/doc.go), so the timer bounds how many epochs a second there can be.
//
// The third series is the I/O-bound guest's primary in verify mode, where
// an epoch ends at the first exit after its length whether or not it has
// something to deliver (with a state hash the backup compares): the
// nearest the exit clock comes to the paper's fixed-length epochs.
var workloads = []workload{
	{"compute", "CPU-bound", "workload=compute mib=160 every=160 hz=1000", nil},
	{"counter", "I/O-bound", "workload=counter lines=300 wait=0 hz=1000", nil},
	{"counter --verify", "I/O-bound", "workload=counter lines=300 wait=0 hz=1000", []string{"--verify"}},
}

var lengths = []time.Duration{
	100 * time.Microsecond, 300 * time.Microsecond, time.Millisecond, 3 * time.Millisecond,
	10 * time.Millisecond, 30 * time.Millisecond, 100 * time.Millisecond,
}

var policies = []string{"output-commit", "strict"}

func main() {
	out := flag.String("out", "docs", "folder for epochs.md and epochs.png")
	reps := flag.Int("reps", 3, "rounds: runs per configuration (the median is plotted, with the minimum and maximum)")
	bin := flag.String("ftkvm", "", "ftkvm binary (default: built from this checkout)")
	kernel := flag.String("kernel", "guest/testos/testos.elf", "the test guest (make testos)")
	replot := flag.Bool("replot", false, "only redraw OUT/epochs.png from the table in OUT/epochs.md (no runs)")
	only := flag.String("lengths", "", "comma-separated epoch lengths instead of the default set (a quick check; the figure uses the default)")
	flag.Parse()
	if *only != "" {
		lengths = nil
		for _, f := range strings.Split(*only, ",") {
			d, err := time.ParseDuration(f)
			if err != nil || d <= 0 {
				fmt.Fprintf(os.Stderr, "epochs: -lengths: %q is not a positive duration\n", f)
				os.Exit(2)
			}
			lengths = append(lengths, d)
		}
	}
	if *reps < 1 {
		fmt.Fprintln(os.Stderr, "epochs: -reps must be at least 1")
		os.Exit(2)
	}
	if *replot {
		if err := redraw(*out); err != nil {
			fmt.Fprintln(os.Stderr, "epochs:", err)
			os.Exit(1)
		}
		return
	}
	if err := run(*out, *reps, *bin, *kernel); err != nil {
		fmt.Fprintln(os.Stderr, "epochs:", err)
		os.Exit(1)
	}
}

// key names one replicated configuration.
type key struct {
	workload, policy string
	length           time.Duration
}

// measure is a run's wall time and its processes' CPU time (user and
// system; on this project's KVM the guest's own time is in neither, so
// it is the host's work: exits, devices, the protocol).
type measure struct {
	wall, cpu time.Duration
	ticks     int // timer interrupts (vector 0x20) the guest took; a pair's: their mean
}

// sample is one replicated run and its round's baselines.
type sample struct {
	ft, pair measure
	info     runInfo
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
	x := &experiment{bin: bin, kernel: kernel}
	samples := map[key][]sample{}
	start := time.Now()
	for round := range reps {
		for _, w := range workloads {
			pair, err := x.plainPair(w)
			if err != nil {
				return err
			}
			fmt.Fprintf(os.Stderr, "epochs: round %d %s: two plain runs side by side %.2f s (CPU %.2f s)\n",
				round+1, w.name, pair.wall.Seconds(), pair.cpu.Seconds())
			ls := slices.Clone(lengths)
			if round%2 == 1 {
				slices.Reverse(ls)
			}
			for _, l := range ls {
				for _, policy := range policies {
					d, info, err := x.replicated(w, policy, l)
					if err != nil {
						return fmt.Errorf("%s %s %v: %w", w.name, policy, l, err)
					}
					k := key{w.name, policy, l}
					samples[k] = append(samples[k], sample{ft: d, pair: pair, info: info})
					fmt.Fprintf(os.Stderr, "epochs: round %d %s %s %v: %.2f s, %.2f of the baseline (CPU %.2f), %d epochs\n",
						round+1, w.name, policy, l, d.wall.Seconds(), d.wall.Seconds()/pair.wall.Seconds(), d.cpu.Seconds()/pair.cpu.Seconds(), info.epochs)
				}
			}
		}
	}
	rs := summarize(samples)
	table := formatTable(rs, reps, time.Since(start)) + formatFits(samples)
	fmt.Print(table)
	if err := os.MkdirAll(outDir, 0o755); err != nil {
		return err
	}
	if err := writeTable(filepath.Join(outDir, "epochs.md"), table); err != nil {
		return err
	}
	return drawPlot(rs, reps, filepath.Join(outDir, "epochs.png"))
}

// Markers in epochs.md between which the table is replaced; a file
// without them is written whole.
const (
	beginMark = "<!-- epochs table: generated by go run ./tools/epochs -->"
	endMark   = "<!-- end of the epochs table -->"
)

func writeTable(path, table string) error {
	old, err := os.ReadFile(path)
	if err == nil {
		s := string(old)
		i, j := strings.Index(s, beginMark), strings.Index(s, endMark)
		if i >= 0 && j > i {
			return os.WriteFile(path, []byte(s[:i+len(beginMark)]+"\n"+table+s[j:]), 0o644)
		}
	}
	return os.WriteFile(path, []byte(beginMark+"\n"+table+endMark+"\n"), 0o644)
}

// result is one configuration's summary over the rounds.
type result struct {
	key
	ratio, lo, hi     float64 // wall time, replicated over two plain runs side by side: median, min, max
	cpu, cpuLo, cpuHi float64 // the same for the processes' CPU time
	ft, pair          time.Duration
	epochs            int     // of the run with the median wall ratio
	meanEpoch         float64 // ms: that run's guest run time (its vCPU loop's) over its epochs
	perEpoch          float64 // µs: (replicated - baseline) / epochs, wall time, median over rounds
	cpuPerEpoch       float64 // µs: the same in CPU time
	ticks, pairTicks  int     // timer interrupts taken: the median run, a plain run of its round

	atExit, atHalt, byCheckpoint int
	checkpointMiB                float64
}

func summarize(samples map[key][]sample) []result {
	var rs []result
	for _, w := range workloads {
		for _, pol := range policies {
			for _, l := range lengths {
				ss := samples[key{w.name, pol, l}]
				if len(ss) == 0 {
					continue
				}
				r := result{key: key{w.name, pol, l}}
				var ratios, cpus, costs, cpuCosts []float64
				for _, s := range ss {
					ratios = append(ratios, s.ft.wall.Seconds()/s.pair.wall.Seconds())
					cpus = append(cpus, s.ft.cpu.Seconds()/s.pair.cpu.Seconds())
					if s.info.epochs > 0 {
						costs = append(costs, (s.ft.wall-s.pair.wall).Seconds()*1e6/float64(s.info.epochs))
						cpuCosts = append(cpuCosts, (s.ft.cpu-s.pair.cpu).Seconds()*1e6/float64(s.info.epochs))
					}
				}
				r.ratio, r.lo, r.hi = median(ratios), slices.Min(ratios), slices.Max(ratios)
				r.cpu, r.cpuLo, r.cpuHi = median(cpus), slices.Min(cpus), slices.Max(cpus)
				if len(costs) > 0 {
					r.perEpoch, r.cpuPerEpoch = median(costs), median(cpuCosts)
				}
				// The run whose ratio is the median gives the counts.
				slices.SortFunc(ss, func(a, b sample) int {
					return cmpFloat(a.ft.wall.Seconds()/a.pair.wall.Seconds(), b.ft.wall.Seconds()/b.pair.wall.Seconds())
				})
				m := ss[len(ss)/2]
				r.ft, r.pair = m.ft.wall, m.pair.wall
				r.ticks, r.pairTicks = m.ft.ticks, m.pair.ticks
				r.epochs = m.info.epochs
				if m.info.epochs > 0 {
					r.meanEpoch = m.info.guestWall.Seconds() * 1e3 / float64(m.info.epochs)
				}
				r.atExit, r.atHalt, r.byCheckpoint = m.info.atExit, m.info.atHalt, m.info.byCheckpoint
				r.checkpointMiB = m.info.checkpointMiB
				rs = append(rs, r)
			}
		}
	}
	return rs
}

func cmpFloat(a, b float64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

func median(v []float64) float64 {
	s := slices.Clone(v)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

type experiment struct {
	bin, kernel string
}

// runInfo is what the primary's --exit-stats said about its epochs.
type runInfo struct {
	guestWall                    time.Duration // the vCPU loop's run, without start-up and handshake
	epochs                       int
	atExit, atHalt, byCheckpoint int
	checkpointMiB                float64
}

func (x *experiment) guest(w workload) []string {
	return []string{"--kernel", x.kernel, "--mem", "32", "--cmdline", w.cmdline}
}

// proc is a running ftkvm with its output collected.
type proc struct {
	cmd      *exec.Cmd
	mu       sync.Mutex
	stderr   bytes.Buffer
	first    chan time.Time // the guest's first console line
	done     chan error
	started  time.Time
	ended    time.Time // set before done is sent
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
		err := p.cmd.Wait()
		p.ended = time.Now()
		p.done <- err
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
// It may be called after the process ended (the second of a pair).
func (p *proc) timed() (time.Duration, error) {
	var err error
	select {
	case err = <-p.done:
	case <-time.After(5 * time.Minute):
		p.cmd.Process.Kill()
		return 0, errors.New("ftkvm hung")
	}
	select {
	case <-p.first:
	default:
		return 0, fmt.Errorf("ftkvm ended before the guest printed (%v):\n%s", err, p.errText())
	}
	if err != nil {
		return 0, fmt.Errorf("ftkvm: %v\n%s", err, p.errText())
	}
	return p.ended.Sub(p.started), nil
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

// ticksOf reads the timer interrupts (IRQ 0 at vector 0x20, testos's
// PIC base) from --exit-stats output.
func ticksOf(stderr string) int {
	m := timerVec.FindStringSubmatch(stderr)
	if m == nil {
		return 0
	}
	n, _ := strconv.Atoi(m[1])
	return n
}

func cpuOf(p *proc) time.Duration {
	if p.cmd.ProcessState == nil {
		return 0
	}
	return p.cmd.ProcessState.UserTime() + p.cmd.ProcessState.SystemTime()
}

// plainPair starts two plain runs together and returns the slower's time.
func (x *experiment) plainPair(w workload) (measure, error) {
	var ps [2]*proc
	for i := range ps {
		p, err := x.start(append([]string{"run", "--exit-stats"}, x.guest(w)...)...)
		if err != nil {
			return measure{}, err
		}
		ps[i] = p
	}
	var m measure
	var firstErr error
	for _, p := range ps {
		d, err := p.timed()
		if err != nil && firstErr == nil {
			firstErr = err
		}
		m.wall = max(m.wall, d)
		m.cpu += cpuOf(p)
		m.ticks += ticksOf(p.errText()) / len(ps)
	}
	return m, firstErr
}

var (
	waitingOn = regexp.MustCompile(`waiting for its primary on (\S+)`)
	profile   = regexp.MustCompile(`replica profile \(primary\): (\d+) epochs, \d+ ended by a checkpoint \(([0-9.]+) MiB\)`)
	guestWall = regexp.MustCompile(`exit profile: (\S+) wall`)
	timerVec  = regexp.MustCompile(`by vector: [^)]*\b0x20:(\d+)`)
	ends      = regexp.MustCompile(`epoch ends sent: (\d+) at an exit, (\d+) at a halt, (\d+) by a checkpoint at a kick`)
)

// replicated runs a replicated configuration until a run stays
// protected to its end: on a loaded host a replica can be descheduled for
// longer than the peers' timeout, and the rest of such a run is a plain
// run that measures nothing of the protocol.
func (x *experiment) replicated(w workload, policy string, l time.Duration) (measure, runInfo, error) {
	var err error
	for try := 1; try <= 3; try++ {
		var d measure
		var info runInfo
		d, info, err = x.replicatedOnce(w, policy, l)
		if !errors.Is(err, errUnprotected) {
			return d, info, err
		}
		fmt.Fprintf(os.Stderr, "epochs: %s %s %v: the pair split (try %d); again\n", w.name, policy, l, try)
	}
	return measure{}, runInfo{}, err
}

var errUnprotected = errors.New("the primary ended unprotected (it lost its backup)")

// timeout is the replicas' --timeout: far above the stalls of a loaded
// host, which otherwise split the pair.
const timeout = "10s"

func (x *experiment) replicatedOnce(w workload, policy string, l time.Duration) (measure, runInfo, error) {
	g := append(x.guest(w), "--timeout", timeout)
	b, err := x.start(append([]string{"backup", "--listen", "127.0.0.1:0"}, g...)...)
	if err != nil {
		return measure{}, runInfo{}, err
	}
	defer b.cmd.Process.Kill()
	var addr string
	for deadline := time.Now().Add(time.Minute); addr == ""; time.Sleep(5 * time.Millisecond) {
		if m := waitingOn.FindStringSubmatch(b.errText()); m != nil {
			addr = m[1]
		}
		if time.Now().After(deadline) {
			return measure{}, runInfo{}, fmt.Errorf("the backup did not start:\n%s", b.errText())
		}
	}
	args := append([]string{"--log-level", "info", "primary", "--backup", addr, "--policy", policy,
		"--epoch-length", l.String(), "--exit-stats"}, append(g, w.primary...)...)
	p, err := x.start(args...)
	if err != nil {
		return measure{}, runInfo{}, err
	}
	d, err := p.timed()
	if err != nil {
		return measure{}, runInfo{}, err
	}
	// The backup ends when its guest does (it replays to the end).
	select {
	case err := <-b.done:
		if err != nil {
			return measure{}, runInfo{}, fmt.Errorf("the backup: %v\n%s", err, b.errText())
		}
	case <-time.After(time.Minute):
		return measure{}, runInfo{}, fmt.Errorf("the backup did not end with its primary:\n%s", b.errText())
	}
	m := measure{wall: d, cpu: cpuOf(p) + cpuOf(b), ticks: ticksOf(p.errText())}
	var info runInfo
	text := p.errText()
	if !strings.Contains(text, "replica stopped: primary, protected") {
		return measure{}, runInfo{}, errUnprotected
	}
	pm := profile.FindStringSubmatch(text)
	e := ends.FindStringSubmatch(text)
	if pm == nil || e == nil {
		return measure{}, runInfo{}, fmt.Errorf("no replica profile in the primary's output:\n%s", text)
	}
	info.epochs, _ = strconv.Atoi(pm[1])
	info.checkpointMiB, _ = strconv.ParseFloat(pm[2], 64)
	if g := guestWall.FindStringSubmatch(text); g != nil {
		info.guestWall, _ = time.ParseDuration(g[1])
	}
	info.atExit, _ = strconv.Atoi(e[1])
	info.atHalt, _ = strconv.Atoi(e[2])
	info.byCheckpoint, _ = strconv.Atoi(e[3])
	return m, info, nil
}

func formatTable(rs []result, reps int, took time.Duration) string {
	var b strings.Builder
	fmt.Fprintf(&b, "Measured %s, %d rounds in %.1f minutes: `go run ./tools/epochs -reps %d`.\n\n",
		time.Now().UTC().Format("2006-01-02 15:04 MST"), reps, took.Minutes(), reps)
	fmt.Fprintf(&b, "| workload | policy | `--epoch-length` | wall time / baseline: median (min–max) | CPU time / baseline: median (min–max) | epochs | mean epoch (ms) | cost per epoch, wall / CPU (µs) | epoch ends: exit / halt / checkpoint (MiB) | timer interrupts: replicated / plain |\n")
	fmt.Fprintf(&b, "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n")
	for _, r := range rs {
		fmt.Fprintf(&b, "| %s (%s) | %s | %v | %.2f (%.2f–%.2f; %.2f s / %.2f s) | %.2f (%.2f–%.2f) | %d | %.2f | %.0f / %.0f | %d / %d / %d (%.1f) | %d / %d |\n",
			r.workload, kindOf(r.workload), r.policy, r.length, r.ratio, r.lo, r.hi, r.ft.Seconds(), r.pair.Seconds(),
			r.cpu, r.cpuLo, r.cpuHi, r.epochs, r.meanEpoch, r.perEpoch, r.cpuPerEpoch,
			r.atExit, r.atHalt, r.byCheckpoint, r.checkpointMiB, r.ticks, r.pairTicks)
	}
	return b.String()
}

var (
	rowRe    = regexp.MustCompile(`^\| (.+?) \((.+?)\) \| (\S+) \| (\S+) \| ([\d.]+) \(([\d.]+)–([\d.]+);[^|]*\| ([\d.]+) \(([\d.]+)–([\d.]+)\) \| (\d+) \| ([\d.]+) \|`)
	roundsRe = regexp.MustCompile(`, (\d+) rounds in `)
)

// redraw draws the plot again from the table formatTable wrote, so that
// a change to the drawing needs no new runs.
func redraw(outDir string) error {
	b, err := os.ReadFile(filepath.Join(outDir, "epochs.md"))
	if err != nil {
		return err
	}
	rs, reps, err := parseTable(string(b))
	if err != nil {
		return err
	}
	return drawPlot(rs, reps, filepath.Join(outDir, "epochs.png"))
}

// parseTable reads back what drawPlot needs from formatTable's rows.
func parseTable(text string) (rs []result, reps int, err error) {
	for _, line := range strings.Split(text, "\n") {
		if m := roundsRe.FindStringSubmatch(line); m != nil && reps == 0 {
			reps, _ = strconv.Atoi(m[1])
		}
		m := rowRe.FindStringSubmatch(line)
		if m == nil {
			continue
		}
		l, err := time.ParseDuration(m[4])
		if err != nil {
			return nil, 0, fmt.Errorf("epochs.md: %q: %w", line, err)
		}
		f := func(i int) float64 { v, _ := strconv.ParseFloat(m[i], 64); return v }
		r := result{key: key{m[1], m[3], l}, ratio: f(5), lo: f(6), hi: f(7), cpu: f(8), cpuLo: f(9), cpuHi: f(10), meanEpoch: f(12)}
		r.epochs, _ = strconv.Atoi(m[11])
		rs = append(rs, r)
	}
	if len(rs) == 0 {
		return nil, 0, errors.New("epochs.md has no table rows")
	}
	return rs, reps, nil
}

// formatFits: per workload and policy, a least-squares line through all
// replicated runs (every length, every round) of a time against the
// run's epochs. Its slope is the cost of one epoch measured without the
// plain baseline: what an epoch end adds, whatever the host's load did
// to the runs' other work.
func formatFits(samples map[key][]sample) string {
	var b strings.Builder
	fmt.Fprintf(&b, "\nCost per epoch fitted over every replicated run of a workload and policy (time = a + b × epochs, least squares):\n\n")
	fmt.Fprintf(&b, "| workload | policy | runs | b: CPU time of both processes (µs per epoch) | r² | b: the primary's vCPU loop time (µs per epoch) | r² |\n")
	fmt.Fprintf(&b, "| --- | --- | --- | --- | --- | --- | --- |\n")
	for _, w := range workloads {
		for _, pol := range policies {
			var ep, cpu, loop []float64
			for _, l := range lengths {
				for _, s := range samples[key{w.name, pol, l}] {
					ep = append(ep, float64(s.info.epochs))
					cpu = append(cpu, s.ft.cpu.Seconds()*1e6)
					loop = append(loop, s.info.guestWall.Seconds()*1e6)
				}
			}
			if len(ep) < 3 {
				continue
			}
			bc, rc := fit(ep, cpu)
			bl, rl := fit(ep, loop)
			fmt.Fprintf(&b, "| %s (%s) | %s | %d | %.0f | %.2f | %.0f | %.2f |\n", w.name, w.kind, pol, len(ep), bc, rc, bl, rl)
		}
	}
	return b.String()
}

// fit returns the least-squares slope of y on x and the r².
func fit(x, y []float64) (slope, r2 float64) {
	n := float64(len(x))
	var sx, sy, sxx, sxy, syy float64
	for i := range x {
		sx, sy = sx+x[i], sy+y[i]
		sxx, sxy, syy = sxx+x[i]*x[i], sxy+x[i]*y[i], syy+y[i]*y[i]
	}
	vx, vy, cxy := sxx-sx*sx/n, syy-sy*sy/n, sxy-sx*sy/n
	if vx == 0 || vy == 0 {
		return 0, 0
	}
	return cxy / vx, cxy * cxy / (vx * vy)
}

func kindOf(name string) string {
	for _, w := range workloads {
		if w.name == name {
			return w.kind
		}
	}
	return ""
}

// drawPlot: three panels against the epoch length (log scale), a line per
// workload and policy: the wall-time and CPU-time ratios to the baseline
// (medians with min–max bars; the baseline at 1), and the mean epoch the
// runs achieved (with the line where it equals the length asked for). The
// legend is below them, off the data.
func drawPlot(rs []result, reps int, path string) error {
	wall := plot.New()
	wall.Title.Text = fmt.Sprintf("Replication overhead against epoch length (exit clock; median of %d runs, bars min–max, cut at 3;\nthe series drawn side by side around each length)", reps)
	wall.Y.Label.Text = "wall time / two plain runs side by side"
	cpu := plot.New()
	cpu.Title.Text = "Host CPU time of the two processes (the guest's own time is not in it)"
	cpu.Y.Label.Text = "CPU time / two plain runs"
	cpu.Title.Text += ", bars cut at 3"
	achieved := plot.New()
	achieved.Title.Text = "Epochs the runs achieved: the primary's vCPU loop time / its epochs"
	achieved.Y.Label.Text = "mean epoch (ms)"
	achieved.Y.Scale = plot.LogScale{}
	achieved.Y.Tick.Marker = plot.LogTicks{Prec: -1}
	for _, p := range []*plot.Plot{wall, cpu, achieved} {
		p.X.Label.Text = "--epoch-length (ms)"
		p.X.Scale = plot.LogScale{}
		p.X.Tick.Marker = plot.ConstantTicks(ticksFor(lengths))
		p.Add(plotter.NewGrid())
	}
	legend := plot.NewLegend()
	legend.Top, legend.Left = true, true

	lo, hi := float64(lengths[0])/1e6, float64(lengths[len(lengths)-1])/1e6
	dashed := func(xys plotter.XYs) (*plotter.Line, error) {
		l, err := plotter.NewLine(xys)
		if err != nil {
			return nil, err
		}
		l.Color, l.Dashes = color.Gray{Y: 0x60}, []vg.Length{vg.Points(4), vg.Points(3)}
		return l, nil
	}
	for _, p := range []*plot.Plot{wall, cpu} {
		base, err := dashed(plotter.XYs{{X: lo, Y: 1}, {X: hi, Y: 1}})
		if err != nil {
			return err
		}
		p.Add(base)
	}
	ident, err := dashed(plotter.XYs{{X: lo, Y: lo}, {X: hi, Y: hi}})
	if err != nil {
		return err
	}
	achieved.Add(ident)
	legend.Add("the plain baseline (ratio 1); bottom: mean epoch = --epoch-length", ident)

	colors := []color.Color{
		color.RGBA{R: 0x1f, G: 0x77, B: 0xb4, A: 0xff}, color.RGBA{R: 0xff, G: 0x7f, B: 0x0e, A: 0xff},
		color.RGBA{R: 0x2c, G: 0xa0, B: 0x2c, A: 0xff}, color.RGBA{R: 0xd6, G: 0x27, B: 0x28, A: 0xff},
		color.RGBA{R: 0x94, G: 0x67, B: 0xbd, A: 0xff}, color.RGBA{R: 0x8c, G: 0x56, B: 0x4b, A: 0xff},
	}
	i := 0
	series := len(workloads) * len(policies)
	for _, w := range workloads {
		for _, pol := range policies {
			// Each series a little to the side of the length it was run
			// at, so that the bars of one length do not cover each other.
			shift := math.Pow(1.06, float64(i)-float64(series-1)/2)
			var wpts, cpts errXYs
			var ach plotter.XYs
			for _, r := range rs {
				if r.workload != w.name || r.policy != pol {
					continue
				}
				x := float64(r.length) / 1e6 * shift
				wpts = append(wpts, errXY{x: x, y: r.ratio, lo: r.ratio - r.lo, hi: r.hi - r.ratio})
				cpts = append(cpts, errXY{x: x, y: r.cpu, lo: r.cpu - r.cpuLo, hi: r.cpuHi - r.cpu})
				if r.meanEpoch > 0 {
					ach = append(ach, plotter.XY{X: x / shift, Y: r.meanEpoch})
				}
			}
			if len(wpts) == 0 {
				continue
			}
			c := colors[i%len(colors)]
			i++
			var dashes []vg.Length
			if pol == "strict" {
				dashes = []vg.Length{vg.Points(6), vg.Points(2)}
			}
			var first *plotter.Line
			var firstPts *plotter.Scatter
			for _, d := range []struct {
				p   *plot.Plot
				pts errXYs
			}{{wall, wpts}, {cpu, cpts}} {
				line, points, err := plotter.NewLinePoints(d.pts)
				if err != nil {
					return err
				}
				line.Color, points.Color, line.Dashes = c, c, dashes
				bars, err := plotter.NewYErrorBars(d.pts)
				if err != nil {
					return err
				}
				bars.Color = c
				d.p.Add(line, points, bars)
				if first == nil {
					first, firstPts = line, points
				}
			}
			legend.Add(fmt.Sprintf("%s (%s), %s", w.name, w.kind, pol), first, firstPts)
			if len(ach) > 0 {
				al, ap, err := plotter.NewLinePoints(ach)
				if err != nil {
					return err
				}
				al.Color, ap.Color, al.Dashes = c, c, dashes
				achieved.Add(al, ap)
			}
		}
	}

	// Single runs of a loaded host reach 9x (the table has them): the
	// ranges are fixed after the data, which would widen them.
	wall.Y.Min, wall.Y.Max = 0, 3
	cpu.Y.Min, cpu.Y.Max = 0, 3
	achieved.Y.Min, achieved.Y.Max = 0.05, 300

	const width, height = 9 * vg.Inch, 13 * vg.Inch
	img := vgimg.New(width, height)
	dc := draw.New(img)
	legendH := vg.Length(len(workloads)*len(policies)+1)*legend.TextStyle.Font.Size*1.3 + vg.Points(30)
	plots := draw.Crop(dc, 0, 0, legendH, 0)
	tiles := draw.Tiles{Rows: 3, Cols: 1, PadY: vg.Points(14), PadTop: vg.Points(4)}
	cs := plot.Align([][]*plot.Plot{{wall}, {cpu}, {achieved}}, tiles, plots)
	wall.Draw(cs[0][0])
	cpu.Draw(cs[1][0])
	achieved.Draw(cs[2][0])
	legend.Draw(draw.Crop(dc, vg.Points(60), 0, vg.Points(4), -(height - legendH + vg.Points(14))))
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if _, err := (vgimg.PngCanvas{Canvas: img}).WriteTo(f); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// errXY is a point with its error bar's extent below and above it.
type errXY struct{ x, y, lo, hi float64 }

type errXYs []errXY

func (e errXYs) Len() int                    { return len(e) }
func (e errXYs) XY(i int) (float64, float64) { return e[i].x, e[i].y }
func (e errXYs) YError(i int) (float64, float64) {
	return math.Max(e[i].lo, 0), math.Max(e[i].hi, 0)
}

func ticksFor(ls []time.Duration) []plot.Tick {
	var ts []plot.Tick
	for _, l := range ls {
		ms := float64(l) / 1e6
		ts = append(ts, plot.Tick{Value: ms, Label: strconv.FormatFloat(ms, 'f', -1, 64)})
	}
	return ts
}
