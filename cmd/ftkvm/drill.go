package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"text/tabwriter"
	"time"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/vg"

	"github.com/ftkvm/ftkvm/vmm/api"
)

// drillCmd rehearses failovers of a guest on this machine: a witness, a
// backup and a primary as child processes; the primary SIGKILLed at
// random moments, a new backup brought in after each takeover; the
// consoles joined at the offsets the promoted backups logged and checked
// for lost or differing bytes.
type drillCmd struct {
	guestFlags
	Kills   int           `help:"How many primaries to kill." default:"5"`
	Seed    uint64        `help:"Seed of the kill moments (0: from the clock; printed)."`
	Plot    string        `help:"Write a PNG of the detection and takeover times here (empty: none)." default:"drill.png" placeholder:"FILE"`
	Policy  string        `help:"Output policy of the pair." enum:"strict,output-commit" default:"output-commit"`
	Timeout time.Duration `help:"The replicas' peer timeout (--timeout)." default:"1s"`
	Device  string        `help:"KVM device." default:"/dev/kvm"`
	Within  time.Duration `help:"Kill at a random moment up to this long after the pair is protected." default:"1500ms"`
}

// child is one ftkvm process of the drill.
type child struct {
	name     string
	cmd      *exec.Cmd
	mu       sync.Mutex
	out, err bytes.Buffer
	done     chan struct{}
	status   int
}

type lockedBuf struct {
	mu *sync.Mutex
	b  *bytes.Buffer
}

func (w lockedBuf) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.b.Write(p)
}

func startChild(name, self string, args ...string) (*child, error) {
	c := &child{name: name, done: make(chan struct{})}
	c.cmd = exec.Command(self, args...)
	c.cmd.Stdout = lockedBuf{&c.mu, &c.out}
	c.cmd.Stderr = lockedBuf{&c.mu, &c.err}
	c.cmd.Stdin = nil
	if err := c.cmd.Start(); err != nil {
		return nil, fmt.Errorf("drill: start the %s: %w", name, err)
	}
	go func() {
		err := c.cmd.Wait()
		var ee *exec.ExitError
		switch {
		case errors.As(err, &ee):
			c.status = ee.ExitCode()
		case err != nil:
			c.status = -1
		}
		close(c.done)
	}()
	return c, nil
}

func (c *child) stdout() string { c.mu.Lock(); defer c.mu.Unlock(); return c.out.String() }
func (c *child) stderr() string { c.mu.Lock(); defer c.mu.Unlock(); return c.err.String() }

func (c *child) exited() bool {
	select {
	case <-c.done:
		return true
	default:
		return false
	}
}

func (c *child) kill() {
	_ = c.cmd.Process.Signal(syscall.SIGKILL)
	<-c.done
}

// waitFor polls c's stderr for re until it matches (its submatches), the
// child exits, or the bound passes.
func (c *child) waitFor(re *regexp.Regexp, bound time.Duration) ([]string, error) {
	deadline := time.Now().Add(bound)
	for {
		if m := re.FindStringSubmatch(c.stderr()); m != nil {
			return m, nil
		}
		if c.exited() {
			if m := re.FindStringSubmatch(c.stderr()); m != nil {
				return m, nil
			}
			return nil, fmt.Errorf("the %s exited (status %d) before %q:\n%s", c.name, c.status, re, c.stderr())
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("no %q from the %s in %v:\n%s", re, c.name, bound, c.stderr())
		}
		time.Sleep(time.Millisecond)
	}
}

var (
	drillWitnessRE = regexp.MustCompile(`witness serving claims on (\S+)`)
	drillBackupRE  = regexp.MustCompile(`backup waiting for its primary on (\S+)`)
	drillLostRE    = regexp.MustCompile(`primary lost \(`)
	drillSeamRE    = regexp.MustCompile(`performing from console byte offset (\d+) \((\d+) bytes uncertain`)
	drillLiveRE    = regexp.MustCompile(`this replica is the primary now`)
)

// segment is the console of one replica that acted as the primary: its
// bytes start at byte seam of the guest's console stream.
type segment struct {
	out       string
	seam      int
	uncertain int
}

// joinSegments joins the consoles of the replicas that were the primary
// in turn. Each promoted backup performs from the offset it logged; the
// bytes of the previous console past that offset were not confirmed, so
// they must be among the uncertain ones and equal the backup's. It
// returns the joined console and the bytes repeated at each seam, or says
// where a byte was lost or differs.
func joinSegments(segs []segment) (string, []int, error) {
	if len(segs) == 0 {
		return "", nil, nil
	}
	joined := segs[0].out
	var reps []int
	for i, s := range segs[1:] {
		if s.seam > len(joined) {
			return "", nil, fmt.Errorf("takeover %d: bytes lost: the backup performs from console byte %d, the console before it ends at byte %d", i+1, s.seam, len(joined))
		}
		rep := len(joined) - s.seam
		if rep > s.uncertain {
			return "", nil, fmt.Errorf("takeover %d: the console shows %d bytes past the seam at byte %d; only %d were uncertain", i+1, rep, s.seam, s.uncertain)
		}
		if rep > len(s.out) {
			return "", nil, fmt.Errorf("takeover %d: bytes lost: %d bytes past the seam at byte %d, the backup performed only %d", i+1, rep, s.seam, len(s.out))
		}
		if joined[s.seam:] != s.out[:rep] {
			return "", nil, fmt.Errorf("takeover %d: the bytes repeated at the seam (byte %d) differ: %q, then %q", i+1, s.seam, joined[s.seam:], s.out[:rep])
		}
		joined = joined[:s.seam] + s.out
		reps = append(reps, rep)
	}
	return joined, reps, nil
}

var counterLineRE = regexp.MustCompile(`^counter (\d+) ticks=(\d+)$`)

// checkConsole checks what a drill can know of the test guest's output
// (guest/testos, workload=counter): every line is the guest's own
// ("testos: ...") or exactly "counter N ticks=T", numbered from 1 without a gap or a
// repeat, with T rising (the guest waits at least one tick between lines),
// and a console that has counter lines ends with the guest's verdict,
// "testos: PASS". A byte lost anywhere in the counter lines, at a seam or
// not, breaks one of these (the test drops each byte in turn); only the
// digits of the first line's tick count have nothing to compare with.
func checkConsole(out string) error {
	if !strings.HasPrefix(out, "counter ") && !strings.Contains(out, "\ncounter ") {
		return nil // not the counter workload: nothing to check
	}
	prevN, prevT := 0, -1
	lines := strings.Split(out, "\n")
	for i, l := range lines {
		if i == len(lines)-1 && l == "" {
			break
		}
		if strings.HasPrefix(l, "testos: ") {
			continue
		}
		m := counterLineRE.FindStringSubmatch(l)
		if m == nil || (i == len(lines)-1 && !strings.HasSuffix(out, "\n")) {
			return fmt.Errorf("console line %d is neither the guest's nor a whole counter line: %q", i+1, l)
		}
		n, err1 := strconv.Atoi(m[1])
		t, err2 := strconv.Atoi(m[2])
		switch {
		case err1 != nil || err2 != nil:
			return fmt.Errorf("console line %d: %q: numbers out of range", i+1, l)
		case n != prevN+1:
			return fmt.Errorf("the guest's counter goes from %d to %d (console line %d)", prevN, n, i+1)
		case t <= prevT:
			return fmt.Errorf("the guest's tick count goes from %d to %d (console line %d): bytes lost or changed", prevT, t, i+1)
		}
		prevN, prevT = n, t
	}
	if prevN > 0 && !strings.HasSuffix(out, "testos: PASS\n") {
		end := out[max(0, len(out)-40):]
		return fmt.Errorf("the console does not end with the guest's \"testos: PASS\" (it ends %q): the tail is lost, or the guest failed", end)
	}
	return nil
}

// checkDrill is the drill's verdict on the consoles of the replicas that
// were the primary in turn: joined at the logged seams (joinSegments),
// then read as the test guest's output (checkConsole).
func checkDrill(segs []segment) (string, []int, error) {
	joined, reps, err := joinSegments(segs)
	if err != nil {
		return joined, reps, err
	}
	return joined, reps, checkConsole(joined)
}

type killRecord struct {
	at                  time.Duration // since the drill started
	offset              int           // console bytes the killed primary had shown
	detect, live        time.Duration // kill to the backup's "primary lost", and to its going live
	seam, rep, diverged int
}

func (c *drillCmd) run() (int, error) {
	if c.Kills < 1 {
		return 0, usageError{errors.New("--kills: at least 1")}
	}
	self, err := os.Executable()
	if err != nil {
		return 0, err
	}
	seed := c.Seed
	if seed == 0 {
		seed = uint64(time.Now().UnixNano())
	}
	rng := rand.New(rand.NewPCG(seed, 0))
	dir, err := os.MkdirTemp("", "ftkvm-drill-")
	if err != nil {
		return 0, err
	}
	defer os.RemoveAll(dir)
	guest := []string{"--kernel", c.Kernel, "--mem", strconv.FormatUint(uint64(c.Mem), 10), "--epoch", c.Epoch}
	if c.Initrd != "" {
		guest = append(guest, "--initrd", c.Initrd)
	}
	if c.Cmdline != "" {
		guest = append(guest, "--cmdline", c.Cmdline)
	}
	var all []*child
	defer func() {
		for _, ch := range all {
			if !ch.exited() {
				ch.kill()
			}
		}
	}()
	spawn := func(name string, args ...string) (*child, error) {
		ch, err := startChild(name, self, args...)
		if err == nil {
			all = append(all, ch)
		}
		return ch, err
	}
	fmt.Fprintf(os.Stderr, "ftkvm: drill: %d kills, seed %d\n", c.Kills, seed)
	wit, err := spawn("witness", "witness", "--listen", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	m, err := wit.waitFor(drillWitnessRE, 10*time.Second)
	if err != nil {
		return 0, err
	}
	witness := m[1]
	replica := []string{"--log-level", "info"}
	common := append([]string{"--witness", witness, "--timeout", c.Timeout.String(), "--device", c.Device}, guest...)
	newBackup := func(n int, join bool) (*child, string, string, error) {
		sock := filepath.Join(dir, fmt.Sprintf("api%d.sock", n))
		args := append(append([]string{}, replica...), "backup", "--listen", "127.0.0.1:0", "--api", sock)
		if join {
			args = append(args, "--join")
		}
		b, err := spawn(fmt.Sprintf("backup %d", n), append(args, common...)...)
		if err != nil {
			return nil, "", "", err
		}
		m, err := b.waitFor(drillBackupRE, 30*time.Second)
		if err != nil {
			return nil, "", "", err
		}
		return b, m[1], sock, nil
	}
	start := time.Now()
	backup, baddr, bsock, err := newBackup(1, false)
	if err != nil {
		return 0, err
	}
	psock := filepath.Join(dir, "api0.sock")
	primary, err := spawn("primary", append(append(append([]string{}, replica...), "primary", "--backup", baddr, "--api", psock, "--policy", c.Policy), common...)...)
	if err != nil {
		return 0, err
	}
	segs := []segment{{}}
	var kills []killRecord
	ended := false
	for k := 1; k <= c.Kills; k++ {
		// Wait until the pair is protected and the guest has shown
		// something, then pick the moment.
		if err := waitProtected(psock, primary); err != nil {
			if primary.exited() {
				ended = true
				break
			}
			return 0, err
		}
		// Kill while the guest writes: after its console grew, then at
		// a random moment within --within.
		for n0, t0 := len(primary.stdout()), time.Now(); len(primary.stdout()) == n0 && !primary.exited() && time.Since(t0) < time.Minute; {
			time.Sleep(5 * time.Millisecond)
		}
		time.Sleep(time.Duration(rng.Int64N(int64(c.Within) + 1)))
		if primary.exited() {
			ended = true
			break
		}
		killAt := time.Now()
		primary.kill()
		rec := killRecord{at: killAt.Sub(start), offset: segs[len(segs)-1].seam + len(primary.stdout())}
		segs[len(segs)-1].out = primary.stdout()
		if _, err := backup.waitFor(drillLostRE, time.Minute); err != nil {
			return 0, err
		}
		rec.detect = time.Since(killAt)
		sm, err := backup.waitFor(drillSeamRE, time.Minute)
		if err != nil {
			return 0, err
		}
		if _, err := backup.waitFor(drillLiveRE, 5*time.Minute); err != nil {
			return 0, err
		}
		rec.live = time.Since(killAt)
		rec.seam, _ = strconv.Atoi(sm[1])
		unc, _ := strconv.Atoi(sm[2])
		segs = append(segs, segment{seam: rec.seam, uncertain: unc})
		if st, err := api.NewClient(bsock).Status(context.Background()); err == nil && st.Replica != nil {
			rec.diverged = int(st.Replica.Divergences)
		}
		kills = append(kills, rec)
		// The backup is the primary now: protect it with a new backup.
		primary, psock = backup, bsock
		if k == c.Kills {
			break
		}
		nb, naddr, nsock, err := newBackup(k+1, true)
		if err != nil {
			return 0, err
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		err = api.NewClient(psock).Protect(ctx, naddr)
		cancel()
		if err != nil {
			if primary.exited() {
				ended = true
				break
			}
			return 0, fmt.Errorf("drill: protect: %w", err)
		}
		backup, bsock = nb, nsock
	}
	// The guest runs to its end on the last primary.
	select {
	case <-primary.done:
	case <-time.After(30 * time.Minute):
		return 0, errors.New("drill: the guest did not end within 30 minutes")
	}
	segs[len(segs)-1].out = primary.stdout()
	joined, reps, jerr := checkDrill(segs)
	for i := range kills {
		if i < len(reps) {
			kills[i].rep = reps[i]
		}
	}
	w := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(w, "kill\tat\tconsole byte\tdetected\tlive\tbytes repeated\tdivergences\t")
	for i, k := range kills {
		fmt.Fprintf(w, "%d\t%v\t%d\t%v\t%v\t%d\t%d\t\n", i+1, k.at.Round(time.Millisecond), k.offset,
			k.detect.Round(time.Millisecond), k.live.Round(time.Millisecond), k.rep, k.diverged)
	}
	w.Flush()
	if ended {
		fmt.Printf("the guest ended after %d of %d kills\n", len(kills), c.Kills)
	}
	if c.Plot != "" && len(kills) > 0 {
		if err := plotDrill(kills, c.Plot); err != nil {
			return 0, err
		}
		fmt.Printf("takeover times plotted in %s\n", c.Plot)
	}
	switch {
	case jerr != nil:
		return 1, fmt.Errorf("drill FAILED: %v", jerr)
	case primary.status != 0:
		return 1, fmt.Errorf("drill FAILED: the guest ended with status %d on the last primary:\n%s", primary.status, primary.stderr())
	}
	fmt.Printf("drill passed: %d kills, %d console bytes, nothing lost\n", len(kills), len(joined))
	return 0, nil
}

// waitProtected waits until the primary's ctl status says protected and
// its backup acknowledged the whole log.
func waitProtected(sock string, primary *child) error {
	deadline := time.Now().Add(5 * time.Minute)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		st, err := api.NewClient(sock).Status(ctx)
		cancel()
		if err == nil && st.Replica != nil && st.Replica.Protected && !st.Replica.Joining && st.Replica.LogAcked >= st.Replica.LogSent {
			return nil
		}
		if primary.exited() {
			return errors.New("the guest ended")
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("drill: the primary was not protected within 5 minutes: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// plotDrill draws each kill's detection and takeover times.
func plotDrill(kills []killRecord, path string) error {
	p := plot.New()
	p.Title.Text = "ftkvm drill: from SIGKILL of the primary to the backup"
	p.X.Label.Text = "kill"
	p.Y.Label.Text = "milliseconds"
	var detect, live plotter.XYs
	for i, k := range kills {
		detect = append(detect, plotter.XY{X: float64(i + 1), Y: float64(k.detect) / 1e6})
		live = append(live, plotter.XY{X: float64(i + 1), Y: float64(k.live) / 1e6})
	}
	for _, s := range []struct {
		name string
		xys  plotter.XYs
		dash bool
	}{{"primary lost (detected)", detect, true}, {"live (log replayed)", live, false}} {
		l, pts, err := plotter.NewLinePoints(s.xys)
		if err != nil {
			return err
		}
		if s.dash {
			l.Dashes = []vg.Length{vg.Points(4), vg.Points(3)}
		}
		p.Add(l, pts)
		p.Legend.Add(s.name, l, pts)
	}
	p.Legend.Top = true
	p.Legend.Left = true
	p.Y.Min = 0
	return p.Save(7*vg.Inch, 4*vg.Inch, path)
}
