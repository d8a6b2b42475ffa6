// Package nested runs commands inside an L1 Linux guest that has a real
// KVM. This project's machines only have a paravirtual KVM that emulates
// guest ring 0 (too slow for Linux, see docs/KVM-HOSTS.md), but QEMU's
// TCG emulates AMD SVM with nested paging: a Debian kernel booted under
// `qemu-system-x86_64 -accel tcg -cpu max` loads kvm_amd and its /dev/kvm
// runs Linux L2 guests. Run builds an initramfs holding busybox, the kvm
// modules and the caller's files, boots it, runs the commands one by one,
// and returns each one's exit status and output, read back from the L1's
// serial console between unambiguous markers.
package nested

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/ftkvm/ftkvm/tools/images/imagelib"
)

// Command is one shell command run in the L1.
type Command struct {
	// Name identifies the command in results and console markers:
	// letters, digits, '.', '_' and '-', unique within a Config.
	Name string
	// Cmd is a busybox sh script, run with stdin from /dev/null and
	// stderr merged into stdout, PATH covering /bin, /sbin, /usr/bin,
	// /usr/sbin, and cwd /.
	Cmd string
	// Timeout kills the command (TERM, then KILL 5 s later) when it runs
	// longer; zero means Config.CommandTimeout.
	Timeout time.Duration
}

// Config describes one L1 boot.
type Config struct {
	// Images supplies the L1 kernel and kvm modules. When nil they are
	// built (or found) in Cache with imagelib.Build.
	Images *imagelib.Images
	// Cache is the image cache directory for Build; empty means the
	// default (see imagelib.DefaultCacheDir).
	Cache string
	// Files maps L1 paths to host files copied there (mode kept), e.g.
	// {"/bin/ftkvm": "/tmp/ftkvm"}. Use static binaries here, or
	// HostExecutables for dynamic ones.
	Files map[string]string
	// HostExecutables are host binaries copied to the same path in the
	// L1 together with the shared libraries and loader ldd finds for
	// them.
	HostExecutables []string
	// HostPaths are host files or directories (copied recursively)
	// placed at the same path in the L1, e.g. firmware directories.
	HostPaths []string
	// GuestImages puts the L2 guest images at GuestVmlinux,
	// GuestVmlinuz and GuestInitramfs in the L1.
	GuestImages bool
	// HostQEMU adds the host's qemu-system-x86_64 with its libraries
	// and firmware (/usr/share/qemu, /usr/share/seabios), to compare
	// ftkvm with QEMU on the same L1 KVM.
	HostQEMU bool
	// Commands run in order, each framed by markers on the console.
	Commands []Command
	// CommandTimeout is the default per-command timeout (5 minutes).
	CommandTimeout time.Duration
	// Timeout bounds the whole run, QEMU start to exit; on expiry QEMU
	// is killed and Run returns ErrTimeout. Zero means 3 minutes plus
	// the sum of the command timeouts.
	Timeout time.Duration
	// MemoryMiB is the L1's memory (2048).
	MemoryMiB int
	// CPUs is the L1's vCPU count (1). QEMU runs each on its own host
	// thread (multi-threaded TCG). Measured with QEMU 10.0 and two: L2
	// guests of the L1's kvm_amd triple-faulted in 4 of 6 runs (Linux
	// under `ftkvm run`, `ftkvm primary` or `backup`, and testos under the
	// step clock), pinned to one L1 CPU or not; with one, never in any
	// run. Use more than one only to study that.
	CPUs int
	// QEMU is the emulator binary ("qemu-system-x86_64" from PATH).
	QEMU string
	// Append is added to the L1 kernel command line.
	Append string
	// Log, if set, receives the L1 console as it arrives (for live
	// progress in verbose test runs).
	Log io.Writer
	// WorkDir holds the L1 initramfs; empty means a temporary directory
	// removed when Run returns.
	WorkDir string
}

// Result is the outcome of one L1 boot.
type Result struct {
	// Commands are in Config.Commands order; a command the L1 never
	// reached has Started false.
	Commands []CommandResult
	Console  string // the whole L1 console, \r removed
	Stderr   string // QEMU's own stderr
	// L1Ready: the kvm modules loaded and /dev/kvm appeared.
	L1Ready bool
	// SetupError is the L1 /init's reason for stopping before the
	// commands, if it gave one.
	SetupError string
	BootTime   time.Duration // QEMU start to the L1 ready marker
	Elapsed    time.Duration // QEMU start to exit
	TimedOut   bool
	// InitramfsBytes is the size of the L1 initramfs that was booted.
	InitramfsBytes int64
}

// Command returns the result of the named command, or nil.
func (r *Result) Command(name string) *CommandResult {
	for i := range r.Commands {
		if r.Commands[i].Name == name {
			return &r.Commands[i]
		}
	}
	return nil
}

// ErrTimeout is returned (wrapped) by Run when Config.Timeout or the
// context ended the run and QEMU was killed.
var ErrTimeout = errors.New("nested L1 timed out")

const (
	defaultCommandTimeout = 5 * time.Minute
	bootAllowance         = 3 * time.Minute
	killGrace             = 5 * time.Second // TERM -> KILL inside the L1
)

// L1 paths of the L2 guest images when Config.GuestImages is set.
const (
	GuestVmlinux   = "/guest/vmlinux"
	GuestVmlinuz   = "/guest/vmlinuz"
	GuestInitramfs = "/guest/initramfs-guest.cpio"
)

// L1 paths of what the harness itself puts in the initramfs.
const (
	l1ModuleDir  = "/ftkvm/modules"
	l1CommandDir = "/ftkvm/cmd"
)

// Host paths HostQEMU copies besides the binary: Debian builds QEMU to
// look for firmware (SeaBIOS, qboot, the PVH and linuxboot option ROMs)
// in these directories.
var qemuDataDirs = []string{"/usr/share/qemu", "/usr/share/seabios"}

// QEMUAvailable returns the path of the host qemu-system-x86_64, or an
// error saying it is missing (tests skip on it).
func QEMUAvailable() (string, error) {
	p, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		return "", fmt.Errorf("%w: qemu-system-x86_64 not found (apt-get install qemu-system-x86, or run test/nested/setup-deps.sh): %v", imagelib.ErrUnavailable, err)
	}
	return p, nil
}

// Run boots an L1 as cfg describes, runs its commands and returns their
// results. The error is nil when the L1 ran every command and powered
// off, whatever the commands' own exit statuses (see CommandResult.Err).
// It is non-nil, with the partial Result when QEMU ran, when the images
// cannot be built, QEMU cannot start, the L1 cannot load kvm, the L1
// stops early (panic, crash), or the run times out (ErrTimeout).
func Run(ctx context.Context, cfg Config) (*Result, error) {
	if err := cfg.check(); err != nil {
		return nil, err
	}
	qemu := cfg.QEMU
	if qemu == "" {
		var err error
		if qemu, err = QEMUAvailable(); err != nil {
			return nil, err
		}
	}
	im := cfg.Images
	if im == nil {
		var err error
		im, err = imagelib.Build(ctx, imagelib.Options{Cache: cfg.Cache})
		if err != nil {
			return nil, fmt.Errorf("building L1 images: %w", err)
		}
	}

	work := cfg.WorkDir
	if work == "" {
		d, err := os.MkdirTemp("", "ftkvm-nested-")
		if err != nil {
			return nil, fmt.Errorf("creating work directory: %w", err)
		}
		defer os.RemoveAll(d)
		work = d
	}
	initrd := filepath.Join(work, "l1.cpio")
	if err := buildL1Initramfs(ctx, cfg, im, initrd); err != nil {
		return nil, fmt.Errorf("building L1 initramfs: %w", err)
	}
	fi, err := os.Stat(initrd)
	if err != nil {
		return nil, fmt.Errorf("L1 initramfs: %w", err)
	}

	mem := cfg.MemoryMiB
	if mem == 0 {
		mem = 2048
	}
	cpus := max(cfg.CPUs, 1)
	appendLine := "console=ttyS0 panic=-1 quiet loglevel=4"
	if cfg.Append != "" {
		appendLine += " " + cfg.Append
	}
	// The recipe measured on the test VMs (docs/KVM-HOSTS.md): -cpu max exposes
	// SVM with NPT to the L1; -no-reboot plus panic=-1 turns an L1 panic
	// into a QEMU exit instead of a reboot loop. -nodefaults drops the
	// VGA, NIC and drives the L1 has no use for (less to probe at boot).
	args := []string{
		"-accel", "tcg", "-cpu", "max", "-smp", fmt.Sprint(cpus), "-m", fmt.Sprint(mem),
		"-nodefaults", "-no-user-config",
		"-display", "none", "-monitor", "none", "-no-reboot", "-serial", "stdio",
		"-kernel", im.Vmlinuz, "-initrd", initrd, "-append", appendLine,
	}
	timeout := cfg.Timeout
	if timeout == 0 {
		timeout = bootAllowance
		for _, c := range cfg.Commands {
			timeout += cfg.commandTimeout(c) + killGrace
		}
	}
	res, runErr := runQEMU(ctx, qemu, args, timeout, cfg.Log)
	res.InitramfsBytes = fi.Size()

	con := ParseConsole(res.Console)
	res.L1Ready = con.Ready
	res.SetupError = con.SetupError
	byName := map[string]CommandResult{}
	for _, c := range con.Commands {
		byName[c.Name] = c
	}
	for _, c := range cfg.Commands {
		r, ok := byName[c.Name]
		if !ok {
			r = CommandResult{Name: c.Name, RC: -1}
		}
		r.Duration = res.durations[c.Name]
		res.Commands = append(res.Commands, r)
	}

	switch {
	case runErr != nil:
		return &res.Result, fmt.Errorf("%w%s", runErr, running(res.Commands))
	case con.SetupError != "":
		return &res.Result, fmt.Errorf("L1 setup failed: %s\n%s", con.SetupError, tail(res.Console, 40))
	case !con.Done:
		return &res.Result, fmt.Errorf("L1 stopped before finishing its commands%s; console tail:\n%s%s",
			running(res.Commands), tail(res.Console, 40), stderrNote(res.Stderr))
	}
	return &res.Result, nil
}

func (cfg *Config) check() error {
	seen := map[string]bool{}
	for _, c := range cfg.Commands {
		if !nameRE.MatchString(c.Name) {
			return fmt.Errorf("command name %q: use letters, digits, '.', '_' and '-'", c.Name)
		}
		if seen[c.Name] {
			return fmt.Errorf("command name %q used twice", c.Name)
		}
		seen[c.Name] = true
		if c.Timeout < 0 {
			return fmt.Errorf("command %s: negative timeout", c.Name)
		}
	}
	for dst := range cfg.Files {
		if !filepath.IsAbs(dst) {
			return fmt.Errorf("L1 path %q must be absolute", dst)
		}
	}
	return nil
}

func (cfg *Config) commandTimeout(c Command) time.Duration {
	switch {
	case c.Timeout > 0:
		return c.Timeout
	case cfg.CommandTimeout > 0:
		return cfg.CommandTimeout
	}
	return defaultCommandTimeout
}

// running names the command the L1 was in when it stopped, if any.
func running(rs []CommandResult) string {
	for _, r := range rs {
		if r.Started && !r.Finished {
			return fmt.Sprintf(" (during command %s)", r.Name)
		}
	}
	return ""
}

func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

func stderrNote(s string) string {
	if s = strings.TrimSpace(s); s == "" {
		return ""
	}
	return "\nqemu stderr:\n" + tail(s, 20)
}

// runResult carries, besides the public Result, the host-side command
// durations measured from marker arrival times.
type runResult struct {
	Result
	durations map[string]time.Duration
}

// runQEMU runs QEMU until it exits, the timeout expires or ctx ends,
// collecting the console and timing the L1 markers as they stream in.
func runQEMU(ctx context.Context, qemu string, args []string, timeout time.Duration, logw io.Writer) (*runResult, error) {
	res := &runResult{durations: map[string]time.Duration{}}
	cmd := exec.Command(qemu, args...)
	// Pdeathsig: QEMU must not outlive a killed test binary. Its own
	// process group lets a timeout kill any helper it started too, so
	// nothing keeps the console pipe open after the kill.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return res, fmt.Errorf("qemu stdout: %w", err)
	}
	start := time.Now()
	if err := cmd.Start(); err != nil {
		return res, fmt.Errorf("starting %s: %w", qemu, err)
	}

	var (
		mu      sync.Mutex
		console bytes.Buffer
		begun   = map[string]time.Time{}
	)
	readDone := make(chan struct{})
	go func() {
		defer close(readDone)
		buf := make([]byte, 64<<10)
		var partial []byte
		for {
			n, err := stdout.Read(buf)
			if n > 0 {
				now := time.Now()
				mu.Lock()
				console.Write(buf[:n])
				mu.Unlock()
				if logw != nil {
					logw.Write(buf[:n])
				}
				// Time markers as whole lines arrive.
				partial = append(partial, buf[:n]...)
				for {
					i := bytes.IndexByte(partial, '\n')
					if i < 0 {
						break
					}
					line := strings.TrimRight(string(partial[:i]), "\r")
					partial = partial[i+1:]
					if !strings.Contains(line, markPrefix) {
						continue
					}
					if line == markReady {
						res.BootTime = now.Sub(start)
					} else if m := beginRE.FindStringSubmatch(line); m != nil {
						begun[m[1]] = now
					} else if m := endRE.FindStringSubmatch(line); m != nil {
						if t, ok := begun[m[1]]; ok {
							res.durations[m[1]] = now.Sub(t)
						}
					}
				}
			}
			if err != nil {
				return
			}
		}
	}()

	waitErr := make(chan error, 1)
	go func() {
		<-readDone // read everything before Wait closes the pipe
		waitErr <- cmd.Wait()
	}()
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	var runErr error
	select {
	case err := <-waitErr:
		// QEMU exits 0 on the L1's poweroff and also when -no-reboot
		// turns a panic into an exit; the console tells them apart.
		if err != nil {
			runErr = fmt.Errorf("qemu: %w%s", err, stderrNote(stderr.String()))
		}
	case <-timer.C:
		killGroup(cmd)
		<-waitErr
		res.TimedOut = true
		runErr = fmt.Errorf("%w after %v: qemu killed", ErrTimeout, timeout)
	case <-ctx.Done():
		killGroup(cmd)
		<-waitErr
		res.TimedOut = true
		runErr = fmt.Errorf("%w: %v: qemu killed", ErrTimeout, ctx.Err())
	}
	res.Elapsed = time.Since(start)
	mu.Lock()
	res.Console = normalize(console.String())
	mu.Unlock()
	res.Stderr = stderr.String()
	return res, runErr
}

// killGroup kills QEMU's whole process group.
func killGroup(cmd *exec.Cmd) {
	if err := syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL); err != nil {
		cmd.Process.Kill()
	}
}
