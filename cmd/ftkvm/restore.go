package main

import (
	"errors"
	"fmt"
	"net"
	"os"
	"os/signal"
	"sync"
	"time"

	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"

	"github.com/ftkvm/ftkvm/vmm"
	"github.com/ftkvm/ftkvm/vmm/migrate"
	"github.com/ftkvm/ftkvm/vmm/snapshot"
)

type restoreCmd struct {
	File      string   `arg:"" help:"Snapshot file (from ftkvm ctl snapshot)." type:"path"`
	Disk      []string `help:"The guest's disk images, in the order run was given them, as they were when the snapshot was taken (a snapshot does not carry their contents); add ,ro for a read-only disk. Repeatable." placeholder:"FILE[,ro]" sep:"none"`
	Net       []string `help:"The guest's network interfaces, as many as it was captured with, in order: each on the host tap device NAME (created if absent, brought up); without mac= it keeps the captured MAC. Repeatable." placeholder:"tap=NAME[,mac=MAC]" sep:"none"`
	Device    string   `help:"KVM device." default:"/dev/kvm"`
	API       string   `help:"Serve the control API (HTTP+JSON) on this unix socket." name:"api" placeholder:"SOCKET"`
	ExitStats bool     `help:"When the guest stops, print its exit profile (exits and time per exit reason, device and port; interrupts; kicks) on stderr. docs/PROFILE.md explains it." name:"exit-stats"`
}

// emptyMachine builds the machine a snapshot or a migration is loaded into.
// The disks and network interfaces must match those the state recorded;
// Install checks them.
func emptyMachine(device string, disks []vmm.Disk, nics []vmm.NIC, env *vmm.LiveEnv) migrate.Build {
	return func(h snapshot.Header) (migrate.Target, error) {
		m, err := vmm.NewEmpty(vmm.Config{MemSize: h.MemSize, Console: os.Stdout, Env: env, KVMPath: device, Disks: disks, NICs: nics})
		var de *vmm.DiskError
		var ne *vmm.NICError
		switch {
		case errors.As(err, &de):
			return nil, fmt.Errorf("--disk: %w", err)
		case errors.As(err, &ne):
			return nil, fmt.Errorf("--net: %w", err)
		}
		return m, err
	}
}

func (c *restoreCmd) run() (int, error) {
	disks, err := parseDisks(c.Disk)
	if err != nil {
		return 0, err
	}
	env := vmm.NewLiveEnv(nil)
	nics, taps, err := restoreNets(c.Net, env)
	if err != nil {
		return 0, err
	}
	defer closeNets(taps)
	view := newTransferView("restore", false)
	t, _, err := migrate.ReadFile(c.File, emptyMachine(c.Device, disks, nics, env), view.bytes)
	view.finish()
	if err != nil {
		return 0, fmt.Errorf("restore: %w", err)
	}
	m := t.(*vmm.Machine)
	defer m.Close()
	return runGuest(m, env, c.API, c.ExitStats)
}

type receiveCmd struct {
	Listen    string   `required:"" help:"Address to wait on for a migration (port 0: any free port; the address is printed)." placeholder:"HOST:PORT"`
	Disk      []string `help:"The guest's disk images, in the order the source has them, as they are on the source when it stops the guest (a migration does not carry their contents: shared or copied storage); add ,ro for a read-only disk. Repeatable." placeholder:"FILE[,ro]" sep:"none"`
	Net       []string `help:"The guest's network interfaces, as many as the source gave it, in order: each on the host tap device NAME (created if absent, brought up); without mac= it keeps the guest's MAC. Repeatable." placeholder:"tap=NAME[,mac=MAC]" sep:"none"`
	Device    string   `help:"KVM device." default:"/dev/kvm"`
	API       string   `help:"Serve the control API (HTTP+JSON) on this unix socket once the guest runs." name:"api" placeholder:"SOCKET"`
	ExitStats bool     `help:"When the guest stops, print its exit profile (exits and time per exit reason, device and port; interrupts; kicks) on stderr. docs/PROFILE.md explains it." name:"exit-stats"`
	// Connections that are not a migration (scanners, health checks) are
	// logged and ignored, so without a bound the wait is forever.
	Timeout time.Duration `help:"Give up (status 125) if no migration has begun within this long; 0 waits forever. Connections that are not a migration are logged and ignored."`
}

func (c *receiveCmd) run() (int, error) {
	disks, err := parseDisks(c.Disk)
	if err != nil {
		return 0, err
	}
	l, err := net.Listen("tcp", c.Listen)
	if err != nil {
		return 0, fmt.Errorf("receive: %w", err)
	}
	defer l.Close()
	if c.Timeout > 0 {
		if err := l.(*net.TCPListener).SetDeadline(time.Now().Add(c.Timeout)); err != nil {
			return 0, fmt.Errorf("receive: %w", err)
		}
	}
	fmt.Fprintf(os.Stderr, "ftkvm: waiting for a migration on %s\n", l.Addr())
	warnPlain()
	// Until the guest runs, SIGINT and SIGTERM abandon the wait; the source
	// keeps its guest.
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, unix.SIGINT, unix.SIGTERM)
	interrupted := make(chan struct{})
	var once sync.Once
	quit := func() {
		once.Do(func() { fmt.Fprintln(os.Stderr, "ftkvm: receive: interrupted; no guest was run") })
	}
	go func() {
		if _, ok := <-sigs; ok {
			close(interrupted)
			l.Close()
			// A migration under way ends when the process does.
			time.AfterFunc(200*time.Millisecond, func() {
				quit()
				os.Exit(exitQuit)
			})
		}
	}()
	env := vmm.NewLiveEnv(nil)
	nics, taps, err := restoreNets(c.Net, env)
	if err != nil {
		return 0, err
	}
	defer closeNets(taps)
	view := newTransferView("receive", false)
	t, _, from, err := migrate.Receive(l, emptyMachine(c.Device, disks, nics, env), view.bytes, migrate.ReceiveOptions{
		Stranger: func(from net.Addr, err error) {
			logrus.Warnf("receive: a connection from %v was not a migration (%v); still waiting", from, err)
		},
		TLS: linkTLS,
	})
	view.finish()
	signal.Stop(sigs)
	close(sigs)
	if err != nil {
		select {
		case <-interrupted:
			quit()
			return exitQuit, nil
		default:
		}
		if from != nil {
			return 0, fmt.Errorf("receive from %s: %w; no guest was run", from, err)
		}
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			return 0, fmt.Errorf("receive: no migration began within %v; no guest was run", c.Timeout)
		}
		return 0, fmt.Errorf("receive: %w; no guest was run", err)
	}
	l.Close()
	m := t.(*vmm.Machine)
	defer m.Close()
	fmt.Fprintf(os.Stderr, "ftkvm: received the guest from %s\n", from)
	return runGuest(m, env, c.API, c.ExitStats)
}
