package main

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"net"
	"os"
	"os/signal"
	"runtime"
	"time"

	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"

	"github.com/ftkvm/ftkvm/ft"
	"github.com/ftkvm/ftkvm/ft/arbiter"
	"github.com/ftkvm/ftkvm/ft/driver"
	"github.com/ftkvm/ftkvm/ft/wire"
	"github.com/ftkvm/ftkvm/ft/witness"
	"github.com/ftkvm/ftkvm/vmm"
	"github.com/ftkvm/ftkvm/vmm/api"
)

// replicaFlags are shared by primary and backup.
type replicaFlags struct {
	guestFlags
	Disk      []string      `help:"A raw disk image for a virtio-blk device (/dev/vda, /dev/vdb, ... in order); add ,ro for a read-only disk. Each replica has its own copy: the copies must be identical at start (the handshake compares their SHA-256, read in full at start). Repeatable." placeholder:"FILE[,ro]" sep:"none"`
	Device    string        `help:"KVM device." default:"/dev/kvm"`
	Timeout   time.Duration `help:"Declare the peer dead after this long without a message (heartbeats keep a quiet link alive)." default:"100ms"`
	API       string        `help:"Serve the control API (HTTP+JSON) on this unix socket." name:"api" placeholder:"SOCKET"`
	ExitStats bool          `help:"When the guest stops, print its exit profile and the replica profile (how epochs ended; capture, install, hash and send costs) on stderr. docs/PROFILE.md explains them." name:"exit-stats"`
	Witness   string        `help:"Address of the witness (ftkvm witness) that decides which replica goes on when the two lose each other; the loser stops. Both replicas must give the same address. Without a witness or an arbiter, a cut link lets both go on (split brain)." placeholder:"HOST:PORT"`
	Arbiter   string        `help:"Decide as --witness does, on an etcd cluster: etcd://HOST:PORT[,HOST:PORT...][/PREFIX] (one key per pair under PREFIX, default /ftkvm), or etcds://... for TLS with --tls-cert, --tls-key and --tls-ca (etcd's members must have certificates from that CA, and accept this one). Both replicas must name the same cluster and prefix." placeholder:"URL"`
	Metrics   string        `help:"Serve Prometheus metrics on this address at /metrics (docs/METRICS.md)." placeholder:"HOST:PORT"`
	Net       []string      `help:"A virtio-net interface on the host tap device NAME (created if absent, brought up), with MAC address MAC or one derived from the guest; both replicas must give the same interfaces (the handshake compares the MACs). The primary opens its tap at start; a backup opens its own only when it takes over, then announces the guest's MAC (RARP) and the IPv4 addresses it saw the guest send from (gratuitous ARP). Received frames are logged to the backup; sent frames leave once the backup holds them. Repeatable." placeholder:"tap=NAME[,mac=MAC]" sep:"none"`
}

// fencing is the node's witness setting and the driver's client for it:
// the built-in witness (--witness) or an etcd cluster (--arbiter). The
// handshake compares the setting's hash, so both replicas must name the
// same one.
func (f *replicaFlags) fencing() (ft.Digest, driver.Witness, error) {
	switch {
	case f.Witness != "" && f.Arbiter != "":
		return ft.Digest{}, nil, usageError{errors.New("--witness and --arbiter: give one of them")}
	case f.Witness != "":
		// The address as given: both sides must claim at the same witness.
		if linkTLS != nil {
			return sha256.Sum256([]byte(f.Witness)), witness.NewTLSClient(f.Witness, time.Second, linkTLS), nil
		}
		return sha256.Sum256([]byte(f.Witness)), witness.NewClient(f.Witness, time.Second), nil
	case f.Arbiter != "":
		ep, err := arbiter.Parse(f.Arbiter)
		if err != nil {
			return ft.Digest{}, nil, usageError{err}
		}
		if ep.TLS && linkTLS == nil {
			return ft.Digest{}, nil, usageError{errors.New("--arbiter etcds://: TLS to etcd needs --tls-cert, --tls-key and --tls-ca")}
		}
		if !ep.TLS && linkTLS != nil {
			logrus.Warn("--arbiter etcd:// talks to etcd in plain text; etcds:// uses --tls-cert, --tls-key and --tls-ca")
		}
		a, err := arbiter.New(ep, linkTLS)
		if err != nil {
			return ft.Digest{}, nil, err
		}
		a.Log = logrus.Warnf
		return sha256.Sum256([]byte(ep.String())), a, nil
	}
	return ft.Digest{}, nil, nil
}

type primaryCmd struct {
	replicaFlags
	Backup      string        `required:"" help:"Address of the backup (ftkvm backup --listen)." placeholder:"HOST:PORT"`
	Policy      string        `help:"Output policy: strict (wait for the backup's ack of every log record) or output-commit (stream the log; hold only outputs until acknowledged)." enum:"strict,output-commit" default:"output-commit"`
	Verify      bool          `help:"Send a SHA-256 of the vCPU registers and of all guest memory at every epoch end; the backup compares it with its own, reports a divergence and repairs it with the pages that differ from the primary's (the full state if that did not make them equal)."`
	EpochLength time.Duration `help:"Epoch length (virtual time); an epoch ends at the first guest-caused exit after it." default:"1ms" name:"epoch-length"`
	Connect     time.Duration `help:"How long to keep trying to reach the backup at start." default:"10s"`

	EpochInstructions uint64 `help:"With --epoch step: the epoch length in guest instructions (default 16384); --epoch-length is then unused." name:"epoch-instructions"`
	InterruptWindows  string `help:"Request interrupt windows (an exit where a pending interrupt can be taken): auto uses them where this KVM opens them at points the guest defines (native ring 0), on and off force the choice. The primary decides; the backup adopts it, or refuses a primary that uses them if its own KVM cannot place them. Never under --epoch step." enum:"auto,on,off" default:"auto" name:"interrupt-windows"`
}

type backupCmd struct {
	replicaFlags
	Listen           string `required:"" help:"Address to wait on for the primary." placeholder:"HOST:PORT"`
	Join             bool   `help:"Accept a primary whose guest already runs and receive its whole state first (ftkvm ctl protect on the primary connects it). Without it, such a primary is refused."`
	InterruptWindows string `help:"Whether this backup's KVM opens interrupt windows at points the guest defines (native ring 0): auto measures it at start (a timed ring-0 loop, which a host too busy at that moment can fail), on asserts it. A backup that cannot place them refuses a primary that uses them." enum:"auto,on" default:"auto" name:"interrupt-windows"`
	InjectDivergence uint64 `hidden:"" help:"Test only: corrupt a dirtied page at the first verified epoch end from this epoch on."`
}

// identity is what the handshake compares: the files and command line
// by SHA-256, the memory size, the epoch clock, the disks (size,
// read-only, SHA-256 of the contents), and what of the host
// decides where delivery points fall (vmm.HostTraits): the CPUID the
// guest gets and, in Windows, the primary's choice of interrupt windows
// or the backup's ability to follow it.
// replicaProcs gives a replica at least two Ps. On a one-CPU host Go runs
// one goroutine at a time, and the vCPU goroutine's long stretches
// without a preemption point (large copies of checkpoint memory) can
// keep the driver's ticker, and with it the heartbeats, from running;
// with two Ps the kernel's scheduler shares the CPU between the threads
// instead. (In a one-vCPU VM a primary's ticker stood still for 2.4 s
// during a full capture while its peer ran; with two Ps it still stood
// still once for 1 s, so that was not the whole cause: docs/LINUX.md.)
func replicaProcs() {
	if runtime.GOMAXPROCS(0) < 2 {
		runtime.GOMAXPROCS(2)
	}
}

func identity(cfg vmm.Config, host vmm.HostTraits, windows bool, disks []vmm.DiskInfo, nics []driver.NIC) ft.Identity {
	var wd []wire.Disk
	for _, d := range disks {
		wd = append(wd, wire.Disk{Size: d.Size, ReadOnly: d.ReadOnly, Digest: d.Digest})
	}
	return ft.Identity{
		Disks:     wd,
		NICs:      wireNICs(nics),
		Kernel:    sha256.Sum256(cfg.Kernel),
		Initrd:    sha256.Sum256(cfg.Initrd),
		Cmdline:   sha256.Sum256([]byte(cfg.Cmdline)),
		MemSize:   cfg.MemSize,
		Clock:     clockOf(cfg.Epoch),
		WallClock: cfg.WallClock.UnixNano(),
		Windows:   windows,
		CPU:       host.CPU,
	}
}

// windowsMode is the machine setting for a replica's decided choice.
func windowsMode(on bool) vmm.Windows {
	if on {
		return vmm.WindowsOn
	}
	return vmm.WindowsOff
}

// clockOf names a machine's epoch clock on the wire.
func clockOf(e vmm.EpochClock) wire.Clock {
	switch e {
	case vmm.EpochStep:
		return wire.ClockStep
	case vmm.EpochPerf:
		return wire.ClockPerf
	}
	return wire.ClockExits
}

// defaultEpochInstructions is the step clock's epoch length when
// --epoch-instructions is not given.
const defaultEpochInstructions = 16384

// disks parses --disk and describes the images for the handshake.
func (f *replicaFlags) disks(cfg *vmm.Config) ([]vmm.DiskInfo, error) {
	var err error
	if cfg.Disks, err = parseDisks(f.Disk); err != nil {
		return nil, err
	}
	info, err := vmm.DescribeDisks(cfg.Disks)
	if err != nil {
		return nil, fmt.Errorf("--disk: %w", err)
	}
	return info, nil
}

func (c *primaryCmd) run() (int, error) {
	replicaProcs()
	cfg, err := c.load()
	if err != nil {
		return 0, err
	}
	disks, err := c.disks(&cfg)
	if err != nil {
		return 0, err
	}
	policy := ft.OutputCommit
	if c.Policy == "strict" {
		policy = ft.Strict
	}
	var instrs uint64
	if cfg.Epoch != vmm.EpochExit {
		instrs = c.EpochInstructions
		if instrs == 0 {
			instrs = defaultEpochInstructions
		}
	}
	host, err := vmm.ProbeHost(c.Device)
	if err != nil {
		return 0, err
	}
	// The primary decides, once, whether interrupt windows are used; the
	// backup adopts the decision (or refuses it) in the handshake.
	windows := cfg.Epoch == vmm.EpochExit && (c.InterruptWindows == "on" || c.InterruptWindows == "auto" && host.ExactWindows)
	cfg.Windows = windowsMode(windows)
	wd, wc, err := c.fencing()
	if err != nil {
		return 0, err
	}
	nets, err := parseNets(c.Net)
	if err != nil {
		return 0, err
	}
	nics, taps, err := replicaNets(nets, true, &cfg)
	if err != nil {
		return 0, err
	}
	defer closeNets(taps)
	r := driver.New(driver.Options{
		Node: ft.Config{Role: ft.RolePrimary, Policy: policy, Verify: c.Verify, Guest: identity(cfg, host, windows, disks, nics),
			EpochLength: c.EpochLength, EpochInstructions: instrs, Timeout: c.Timeout, Witness: wd},
		Console: os.Stdout,
		Log:     logrus.StandardLogger(),
		Witness: wc,
		TLS:     linkTLS,
		NICs:    nics,
	})
	defer r.Close()
	setReplicaTx(r, &cfg)
	cfg.Env = r
	cfg.Console = r.Console()
	cfg.KVMPath = c.Device
	m, err := vmm.New(cfg)
	if err != nil {
		return 0, machineError(c.Kernel, err)
	}
	defer m.Close()
	if err := r.Attach(m); err != nil {
		return 0, err
	}
	// The guest starts only once the backup holds the same guest.
	if err := r.Dial(c.Backup, c.Connect); err != nil {
		return 0, err
	}
	if _, err := r.WaitLink(c.Connect); err != nil {
		return 0, fmt.Errorf("backup %s: %w", c.Backup, err)
	}
	logrus.Infof("primary: replicating to %s (policy %s)", c.Backup, c.Policy)
	warnPlain()
	if err := serveMetrics(c.Metrics, machineCollector{m: m, r: r}); err != nil {
		return 0, err
	}
	return runReplica(m, r, c.API, c.ExitStats)
}

func (c *backupCmd) run() (int, error) {
	replicaProcs()
	cfg, err := c.load()
	if err != nil {
		return 0, err
	}
	disks, err := c.disks(&cfg)
	if err != nil {
		return 0, err
	}
	l, err := net.Listen("tcp", c.Listen)
	if err != nil {
		return 0, fmt.Errorf("backup: %w", err)
	}
	defer l.Close()
	host, err := vmm.ProbeHost(c.Device)
	if err != nil {
		return 0, err
	}
	wd, wc, err := c.fencing()
	if err != nil {
		return 0, err
	}
	nets, err := parseNets(c.Net)
	if err != nil {
		return 0, err
	}
	nics, _, err := replicaNets(nets, false, &cfg)
	if err != nil {
		return 0, err
	}
	r := driver.New(driver.Options{
		Node:             ft.Config{Role: ft.RoleBackup, Guest: identity(cfg, host, host.ExactWindows || c.InterruptWindows == "on", disks, nics), Timeout: c.Timeout, Witness: wd, Join: c.Join},
		Console:          os.Stdout,
		Log:              logrus.StandardLogger(),
		Witness:          wc,
		TLS:              linkTLS,
		InjectDivergence: c.InjectDivergence,
		NICs:             nics,
	})
	defer r.Close()
	setReplicaTx(r, &cfg)
	fmt.Fprintf(os.Stderr, "ftkvm: backup waiting for its primary on %s\n", l.Addr())
	go r.Serve(l)
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, unix.SIGINT, unix.SIGTERM)
	go func() {
		if _, ok := <-sigs; ok {
			fmt.Fprintln(os.Stderr, "ftkvm: backup: interrupted")
			os.Exit(exitQuit)
		}
	}()
	peer, err := r.WaitLink(0)
	signal.Stop(sigs)
	close(sigs)
	if err != nil {
		return 0, fmt.Errorf("backup: %w", err)
	}
	warnPlain()
	if peer.Started {
		logrus.Infof("backup: joining: the primary's guest runs already; receiving its state")
	}
	// The RTC's base is the primary's, so both guests read the same
	// wall-clock time.
	cfg.WallClock = time.Unix(0, peer.WallClock)
	// Interrupt windows as the primary decided (the handshake refused a
	// decision this host cannot follow).
	cfg.Windows = windowsMode(peer.Windows)
	cfg.Env = r
	cfg.Console = r.Console()
	cfg.KVMPath = c.Device
	m, err := vmm.New(cfg)
	if err != nil {
		return 0, machineError(c.Kernel, err)
	}
	defer m.Close()
	if err := r.Attach(m); err != nil {
		return 0, err
	}
	if err := serveMetrics(c.Metrics, machineCollector{m: m, r: r}); err != nil {
		return 0, err
	}
	return runReplica(m, r, c.API, c.ExitStats)
}

// machineError words an error of vmm.New: a disk's, or the kernel's.
func machineError(kernel string, err error) error {
	var de *vmm.DiskError
	if errors.As(err, &de) {
		return fmt.Errorf("--disk: %w", err)
	}
	var ne *vmm.NICError
	if errors.As(err, &ne) {
		return fmt.Errorf("--net: %w", err)
	}
	return fmt.Errorf("%s: %w", kernel, err)
}

// runReplica runs a replica's machine with its console on the terminal,
// like runGuest, and the control API if apiPath is set.
func runReplica(m *vmm.Machine, r *driver.Replica, apiPath string, exitStats bool) (int, error) {
	var srv *api.Server
	if apiPath != "" {
		var err error
		if srv, err = api.Listen(apiPath, m); err != nil {
			return 0, err
		}
		srv.SetReplica(replicaAPI{r})
		srv.SetTLS(linkTLS)
		defer srv.Shutdown(time.Second)
	}
	console, restore, err := openConsole()
	if err != nil {
		return 0, err
	}
	defer restore()
	console.quit = r.Quit
	go func() {
		buf := make([]byte, 256)
		for {
			n, err := console.input.Read(buf)
			if n > 0 {
				r.Input(buf[:n])
			}
			if err != nil {
				return
			}
		}
	}()
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, unix.SIGINT, unix.SIGTERM)
	defer signal.Stop(sigs)
	go func() {
		if _, ok := <-sigs; ok {
			r.Quit()
		}
	}()
	start := time.Now()
	status, err := r.Run()
	st := r.Status()
	logrus.WithFields(logrus.Fields{
		"elapsed": time.Since(start).Round(time.Millisecond), "exits": m.Stats.Exits, "kicks": m.Stats.Kicks,
		"epochs": st.Epochs, "checkpoint_epochs": st.CheckpointEpochs, "checkpoint_bytes": st.CheckpointBytes,
		"divergences": st.Divergences, "repairs": st.Repairs, "log_records": st.LogSent, "link_bytes": r.LinkBytes(),
	}).Info("replica stopped: ", st)
	for _, n := range m.NICStats() {
		logrus.WithFields(logrus.Fields{
			"tx": n.TxFrames, "tx_bad_length": n.TxBadLength, "rx": n.RxFrames, "rx_bad_length": n.RxBadLength,
			"rx_overflow": n.RxOverflow, "rx_too_small": n.RxTooSmall, "rx_pending": n.Pending,
			"device_errors": n.DeviceErrors, "unhandled": n.Unhandled, "frames_dropped": st.FramesDropped,
		}).Info("network interface ", n.MAC, ": ", r.NetStats())
	}
	if exitStats {
		restore()
		printExitProfile(m, r)
	}
	switch {
	case errors.Is(err, vmm.ErrQuit):
		restore()
		fmt.Fprintln(os.Stderr, "\r\nftkvm: quit")
		return exitQuit, nil
	case err != nil:
		return 0, err
	}
	return status, nil
}

// replicaAPI serves a replica's status and protect requests.
type replicaAPI struct{ r *driver.Replica }

func (a replicaAPI) ReplicaStatus() api.ReplicaStatus {
	m := a.r.Metrics()
	s := m.Status
	prof := a.r.Profile()
	return api.ReplicaStatus{
		LagRecords: m.Lag.Records, LagBytes: m.Lag.Bytes, LagSeconds: m.Lag.Age.Seconds(),
		HeldOutputs: m.Holds.Count, HoldSeconds: m.Holds.Sum,
		Role: s.Role.String(), Link: s.Link, Protected: s.Protected, Joining: s.Joining,
		Replaying: s.Replaying, Diverged: s.Diverged, Claiming: s.Claiming, Fenced: s.Fenced,
		Epoch: s.Epoch, Position: s.Pos.String(),
		Outputs: s.Outputs, Performed: s.Performed, Held: s.Held, LogSent: s.LogSent, LogAcked: s.LogAcked,
		Backlog: s.Backlog, LinkBytes: a.r.LinkBytes(), Epochs: s.Epochs, CheckpointEpochs: s.CheckpointEpochs,
		CheckpointBytes: s.CheckpointBytes, Divergences: s.Divergences, Repairs: s.Repairs,
		PageRepairs: s.PageRepairs, RepairBytes: s.RepairBytes, RepairedPages: prof.RepairedPages,
		Promotions: s.Promotions, Seam: s.Seam, SeamUncertain: s.SeamUncertain, ConsoleBytes: s.ConsoleBytes,
		Summary: s.String(), Profile: &prof,
	}
}

func ptr[T any](v T) *T { return &v }

func (a replicaAPI) Protect(addr string) error { return a.r.Protect(addr) }

type ctlProtectCmd struct {
	Destination string `arg:"" help:"Address of the new backup (ftkvm backup --listen ADDR --join)." placeholder:"HOST:PORT"`
}

func (c *ctlCmd) protect(p *ctlProtectCmd) (int, error) {
	if err := c.client().Protect(context.Background(), p.Destination); err != nil {
		return 0, err
	}
	fmt.Fprintf(os.Stderr, "ftkvm: %s is joining as the backup\n", p.Destination)
	return 0, nil
}
