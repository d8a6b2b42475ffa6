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
	File   string `arg:"" help:"Snapshot file (from ftkvm ctl snapshot)." type:"path"`
	Device string `help:"KVM device." default:"/dev/kvm"`
	API    string `help:"Serve the control API (HTTP+JSON) on this unix socket." name:"api" placeholder:"SOCKET"`
}

// emptyMachine builds the machine a snapshot or a migration is loaded into.
func emptyMachine(device string, env *vmm.LiveEnv) migrate.Build {
	return func(h snapshot.Header) (migrate.Target, error) {
		return vmm.NewEmpty(vmm.Config{MemSize: h.MemSize, Console: os.Stdout, Env: env, KVMPath: device})
	}
}

func (c *restoreCmd) run() (int, error) {
	env := vmm.NewLiveEnv(nil)
	view := newTransferView("restore", false)
	t, _, err := migrate.ReadFile(c.File, emptyMachine(c.Device, env), view.bytes)
	view.finish()
	if err != nil {
		return 0, fmt.Errorf("restore: %w", err)
	}
	m := t.(*vmm.Machine)
	defer m.Close()
	return runGuest(m, env, c.API)
}

type receiveCmd struct {
	Listen string `required:"" help:"Address to wait on for a migration (port 0: any free port; the address is printed)." placeholder:"HOST:PORT"`
	Device string `help:"KVM device." default:"/dev/kvm"`
	API    string `help:"Serve the control API (HTTP+JSON) on this unix socket once the guest runs." name:"api" placeholder:"SOCKET"`
	// Connections that are not a migration (scanners, health checks) are
	// logged and ignored, so without a bound the wait is forever.
	Timeout time.Duration `help:"Give up (status 125) if no migration has begun within this long; 0 waits forever. Connections that are not a migration are logged and ignored."`
}

func (c *receiveCmd) run() (int, error) {
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
	view := newTransferView("receive", false)
	t, _, from, err := migrate.Receive(l, emptyMachine(c.Device, env), view.bytes, migrate.ReceiveOptions{
		Stranger: func(from net.Addr, err error) {
			logrus.Warnf("receive: a connection from %v was not a migration (%v); still waiting", from, err)
		},
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
	return runGuest(m, env, c.API)
}
