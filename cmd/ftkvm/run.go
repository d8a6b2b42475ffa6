package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"time"

	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"
	"golang.org/x/term"

	"github.com/ftkvm/ftkvm/guest"
	"github.com/ftkvm/ftkvm/vmm"
	"github.com/ftkvm/ftkvm/vmm/api"
)

// guestFlags are the flags that describe a guest; later commands (snapshot
// restore, replicas) share them.
type guestFlags struct {
	Kernel  string `help:"Guest kernel: a PVH ELF (ELF32 or ELF64) or a Linux bzImage." required:"" type:"path" placeholder:"FILE"`
	Initrd  string `help:"Initial ramdisk." type:"path" placeholder:"FILE"`
	Cmdline string `help:"Kernel command line. For Linux kernels it adds to or overrides ftkvm's defaults (console=ttyS0 and lpj)."`
	Mem     memMiB `help:"Guest memory: MiB, or a size with a K, M, G or T suffix (1G = 1024 MiB); a multiple of 2 MiB." default:"256" placeholder:"SIZE"`
	Epoch   string `help:"How positions in the guest's execution are counted: exit (guest-caused exits; full speed), step (single-step every instruction: exact instruction counts, RDTSC and friends served by ftkvm; ring-0 guests only on a KVM that emulates ring 0, see ftkvm probe), perf (hardware performance counters: not implemented yet, always refused with the reason)." enum:"exit,step,perf" default:"exit"`
}

// load reads the files and builds the machine configuration.
func (g *guestFlags) load() (vmm.Config, error) {
	var cfg vmm.Config
	kernel, err := os.ReadFile(g.Kernel)
	if err != nil {
		return cfg, fmt.Errorf("kernel: %w", err)
	}
	if len(kernel) == 0 {
		return cfg, fmt.Errorf("kernel %s: %w", g.Kernel, guest.ErrEmpty)
	}
	var initrd []byte
	if g.Initrd != "" {
		if initrd, err = os.ReadFile(g.Initrd); err != nil {
			return cfg, fmt.Errorf("initrd: %w", err)
		}
	}
	cmdline := g.Cmdline
	if guest.IsLinux(kernel) {
		cmdline = guest.LinuxCmdline(g.Cmdline)
	}
	epoch, err := vmm.ParseEpochClock(g.Epoch)
	if err != nil {
		return cfg, fmt.Errorf("--epoch: %w", err)
	}
	return vmm.Config{
		Kernel:    kernel,
		Initrd:    initrd,
		Cmdline:   cmdline,
		MemSize:   uint64(g.Mem) << 20,
		WallClock: time.Now(),
		Epoch:     epoch,
	}, nil
}

type runCmd struct {
	guestFlags
	Disk      []string `help:"A raw disk image for a virtio-blk device (/dev/vda, /dev/vdb, ... in order); add ,ro for a read-only disk. Repeatable." placeholder:"FILE[,ro]" sep:"none"`
	Net       []string `help:"A virtio-net interface on the host tap device NAME (created if absent, brought up), with MAC address MAC or one derived from the guest. Repeatable; disks and interfaces share 5 virtio slots." placeholder:"tap=NAME[,mac=MAC]" sep:"none"`
	Device    string   `help:"KVM device." default:"/dev/kvm"`
	API       string   `help:"Serve the control API (HTTP+JSON) on this unix socket." name:"api" placeholder:"SOCKET"`
	ExitStats bool     `help:"When the guest stops, print its exit profile (exits and time per exit reason, device and port; interrupts; kicks) on stderr. docs/PROFILE.md explains it." name:"exit-stats"`
	Metrics   string   `help:"Serve Prometheus metrics on this address at /metrics (docs/METRICS.md)." placeholder:"HOST:PORT"`
}

func (c *runCmd) run() (int, error) {
	cfg, err := c.load()
	if err != nil {
		return 0, err
	}
	if cfg.Disks, err = parseDisks(c.Disk); err != nil {
		return 0, err
	}
	nets, err := parseNets(c.Net)
	if err != nil {
		return 0, err
	}
	env := vmm.NewLiveEnv(nil)
	taps, err := openNets(nets, env, &cfg)
	if err != nil {
		return 0, err
	}
	defer closeNets(taps)
	cfg.Env = env
	cfg.Console = os.Stdout
	cfg.KVMPath = c.Device
	m, err := vmm.New(cfg)
	if err != nil {
		var de *vmm.DiskError
		var ne *vmm.NICError
		switch {
		case errors.Is(err, vmm.ErrNoPerfCounters):
			return 0, fmt.Errorf("--epoch perf: %w", err)
		case errors.As(err, &de):
			return 0, fmt.Errorf("--disk: %w", err)
		case errors.As(err, &ne):
			return 0, fmt.Errorf("--net: %w", err)
		}
		return 0, fmt.Errorf("%s: %w", c.Kernel, err)
	}
	defer m.Close()
	if err := serveMetrics(c.Metrics, machineCollector{m: m}); err != nil {
		return 0, err
	}
	return runGuest(m, env, c.API, c.ExitStats)
}

// parseDisks parses --disk values: FILE or FILE,ro.
func parseDisks(flags []string) ([]vmm.Disk, error) {
	var disks []vmm.Disk
	for _, f := range flags {
		path, opt, hasOpt := strings.Cut(f, ",")
		d := vmm.Disk{Path: path}
		switch {
		case path == "":
			return nil, fmt.Errorf("--disk %q: no file name (FILE or FILE,ro)", f)
		case hasOpt && opt == "ro":
			d.ReadOnly = true
		case hasOpt:
			return nil, fmt.Errorf("--disk %q: unknown option %q (FILE or FILE,ro)", f, opt)
		}
		disks = append(disks, d)
	}
	return disks, nil
}

// runGuest runs a machine with its console on the terminal, and the control
// API if apiPath is set, and returns ftkvm's exit status: the guest's
// debug-exit byte, exitQuit, or 0 when the control API stopped the guest
// because it lives on elsewhere (a migration, a snapshot with --stop).
// With exitStats it prints the exit profile on stderr when the guest stops.
func runGuest(m *vmm.Machine, env *vmm.LiveEnv, apiPath string, exitStats bool) (int, error) {
	var srv *api.Server
	if apiPath != "" {
		var err error
		if srv, err = api.Listen(apiPath, m); err != nil {
			return 0, err
		}
		srv.SetTLS(linkTLS)
	}
	console, restore, err := openConsole()
	if err != nil {
		if srv != nil {
			srv.Shutdown(time.Second)
		}
		return 0, err
	}
	defer restore()
	env.SetInput(console.input)
	console.quit = env.Quit
	// SIGINT and SIGTERM stop the guest at its next point, so ftkvm still
	// restores the terminal and reports.
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, unix.SIGINT, unix.SIGTERM)
	defer signal.Stop(sigs)
	go func() {
		if _, ok := <-sigs; ok {
			env.Quit()
		}
	}()
	start := time.Now()
	status, err := m.Run()
	if srv != nil {
		// Let a transfer that stopped the guest report its result.
		srv.Shutdown(30 * time.Second)
	}
	s := m.Stats
	logrus.WithFields(logrus.Fields{
		"exits": s.Exits, "kicks": s.Kicks, "io": s.IOExits, "hlt": s.HaltExits,
		"window": s.WindowExits, "msr": s.MSRExits, "injected": s.Injected,
		"ticks": s.TimerEvents, "ticks_at_kicks": s.KickTimer, "input": s.InputBytes,
		"steps": s.Steps, "emulated": s.Emulated,
		"elapsed": time.Since(start).Round(time.Millisecond),
	}).Info("guest stopped: ", m.StopReason())
	for _, d := range m.DiskStats() {
		logrus.WithFields(logrus.Fields{
			"reads": d.Reads, "writes": d.Writes, "flushes": d.Flushes, "ioerrors": d.IOErrors,
			"unsupported": d.Unsupported, "malformed": d.Malformed, "device_errors": d.DeviceErrors,
			"unhandled": d.Unhandled,
		}).Info("disk ", d.Path)
	}
	for _, n := range m.NICStats() {
		logrus.WithFields(logrus.Fields{
			"tx": n.TxFrames, "tx_bytes": n.TxBytes, "tx_bad_length": n.TxBadLength, "tx_errors": n.TxErrors,
			"rx": n.RxFrames, "rx_bytes": n.RxBytes, "rx_bad_length": n.RxBadLength, "rx_overflow": n.RxOverflow,
			"rx_too_small": n.RxTooSmall, "rx_reset": n.RxReset, "rx_pending": n.Pending,
			"device_errors": n.DeviceErrors, "unhandled": n.Unhandled, "host_dropped": env.FramesDropped(),
		}).Info("network interface ", n.MAC)
	}
	if exitStats {
		restore() // the tables go to a terminal in its normal mode
		printExitProfile(m, nil)
	}
	switch {
	case errors.Is(err, vmm.ErrQuit):
		restore()
		fmt.Fprintln(os.Stderr, "\r\nftkvm: quit")
		return exitQuit, nil
	case errors.Is(err, vmm.ErrStopped):
		restore()
		lead := ""
		if term.IsTerminal(int(os.Stdout.Fd())) {
			lead = "\r\n"
		}
		fmt.Fprintf(os.Stderr, "%sftkvm: %s\n", lead, m.StopReason())
		return 0, nil
	case err != nil:
		return 0, err
	}
	return status, nil
}

// console is the guest's terminal: raw mode when stdin is a terminal, with
// QEMU's escape Ctrl-A x to quit and Ctrl-A Ctrl-A to send Ctrl-A.
type console struct {
	input io.Reader
	quit  func()
}

func openConsole() (*console, func(), error) {
	c := &console{}
	fd := int(os.Stdin.Fd())
	if !term.IsTerminal(fd) {
		c.input = os.Stdin
		return c, func() {}, nil
	}
	old, err := term.MakeRaw(fd)
	if err != nil {
		return nil, nil, fmt.Errorf("terminal raw mode: %w", err)
	}
	// Keep output post-processing so that the guest's bare "\n" and our
	// log lines still start at column 0.
	if t, err := unix.IoctlGetTermios(fd, unix.TCGETS); err == nil {
		t.Oflag |= unix.OPOST | unix.ONLCR
		_ = unix.IoctlSetTermios(fd, unix.TCSETS, t)
	}
	done := false
	restore := func() {
		if !done {
			done = true
			_ = term.Restore(fd, old)
		}
	}
	c.input = &escapeReader{r: os.Stdin, quit: func() {
		if c.quit != nil {
			c.quit()
		}
	}}
	return c, restore, nil
}

// escapeReader filters the Ctrl-A escapes out of terminal input.
type escapeReader struct {
	r       io.Reader
	quit    func()
	escaped bool
}

const ctrlA = 0x01

func (e *escapeReader) Read(p []byte) (int, error) {
	for {
		n, err := e.r.Read(p)
		out := 0
		for _, b := range p[:n] {
			switch {
			case e.escaped:
				e.escaped = false
				switch b {
				case 'x', 'X':
					e.quit()
				case ctrlA:
					p[out] = ctrlA
					out++
				}
			case b == ctrlA:
				e.escaped = true
			default:
				p[out] = b
				out++
			}
		}
		if out > 0 || err != nil {
			return out, err
		}
	}
}
