// Command ftkvm is a fault-tolerant virtual machine monitor on Linux KVM.
package main

import (
	"errors"
	"fmt"
	"os"
	"runtime/debug"

	"github.com/alecthomas/kong"
	"github.com/sirupsen/logrus"

	"github.com/ftkvm/ftkvm/ft"
	"github.com/ftkvm/ftkvm/vmm/snapshot"
)

// Exit statuses of ftkvm itself. A guest that ends through the debug-exit
// port makes ftkvm exit with the guest's byte instead.
const (
	exitFailure = 125 // ftkvm or KVM failed, or the input was bad
	exitQuit    = 130 // the user quit with Ctrl-A x
)

type cli struct {
	LogLevel  string           `help:"Log level: trace (every replica action), debug, info, warn, error." default:"warn" enum:"trace,debug,info,warn,error"`
	LogFormat string           `help:"Log format on stderr: text, or json (one object per line, for log collectors)." default:"text" enum:"text,json"`
	Version   kong.VersionFlag `help:"Print ftkvm's version, its replication protocol version and its snapshot format version, and exit."`

	Run     runCmd     `cmd:"" help:"Run a guest with its console on the terminal."`
	Probe   probeCmd   `cmd:"" help:"Report what this host's KVM can do for ftkvm."`
	Restore restoreCmd `cmd:"" help:"Continue a guest from a snapshot file, with its console on the terminal."`
	Receive receiveCmd `cmd:"" help:"Wait for a guest migrating in, then run it with its console on the terminal."`
	Primary primaryCmd `cmd:"" help:"Run a guest as the primary of a fault-tolerant pair, replicating to a backup."`
	Backup  backupCmd  `cmd:"" help:"Wait for a primary and replicate its guest; take over when the primary dies."`
	Witness witnessCmd `cmd:"" help:"Serve as the witness that decides which replica of a pair goes on when the two lose each other."`
	Ctl     ctlCmd     `cmd:"" help:"Control a running ftkvm through its --api socket."`
	Drill   drillCmd   `cmd:"" help:"Rehearse failovers on this machine: a witness, a backup and a primary; the primary killed at random moments and replaced; the consoles checked for loss; a table and a PNG of the takeover times."`
}

func main() {
	var c cli
	parser, err := kong.New(&c,
		kong.Name("ftkvm"),
		kong.Description("A fault-tolerant virtual machine monitor on Linux KVM."),
		kong.UsageOnError(),
		kong.Vars{"version": versionString()},
		kong.Exit(func(code int) {
			if code != 0 {
				code = 2
			}
			os.Exit(code)
		}),
	)
	if err != nil {
		fail(err)
	}
	ctx, err := parser.Parse(os.Args[1:])
	if err != nil {
		fmt.Fprintf(os.Stderr, "ftkvm: %v\n", err)
		os.Exit(2)
	}
	lvl, _ := logrus.ParseLevel(c.LogLevel)
	logrus.SetLevel(lvl)
	logrus.SetOutput(os.Stderr)
	if c.LogFormat == "json" {
		logrus.SetFormatter(&logrus.JSONFormatter{})
	} else {
		logrus.SetFormatter(&logrus.TextFormatter{DisableTimestamp: false, FullTimestamp: true})
	}

	status, err := dispatch(&c, ctx)
	var ue usageError
	if errors.As(err, &ue) {
		fmt.Fprintf(os.Stderr, "ftkvm: %v\n", err)
		os.Exit(2)
	}
	if err != nil {
		fail(err)
	}
	os.Exit(status)
}

// dispatch runs the chosen command; commands return a process exit status.
func dispatch(c *cli, ctx *kong.Context) (int, error) {
	switch cmd := ctx.Selected().Target.Addr().Interface().(type) {
	case *runCmd:
		return cmd.run()
	case *probeCmd:
		return cmd.run()
	case *restoreCmd:
		return cmd.run()
	case *receiveCmd:
		return cmd.run()
	case *primaryCmd:
		return cmd.run()
	case *backupCmd:
		return cmd.run()
	case *witnessCmd:
		return cmd.run()
	case *drillCmd:
		return cmd.run()
	case *ctlProtectCmd:
		return c.Ctl.protect(cmd)
	case *ctlPauseCmd:
		return c.Ctl.pause()
	case *ctlResumeCmd:
		return c.Ctl.resume()
	case *ctlStatusCmd:
		return c.Ctl.status(cmd)
	case *ctlSnapshotCmd:
		return c.Ctl.snapshot(cmd)
	case *ctlMigrateCmd:
		return c.Ctl.migrate(cmd)
	}
	return 0, errors.New("no command")
}

// revision is the source revision, set by the Makefile's build
// (-ldflags -X main.revision=...) when Go's own VCS stamp is off.
var revision string

// versionString names this build: the module version or VCS revision Go
// recorded, and the versions of what it speaks with other ftkvms.
func versionString() string {
	v := "(devel)"
	if bi, ok := debug.ReadBuildInfo(); ok {
		if bi.Main.Version != "" {
			v = bi.Main.Version
		}
		var rev, dirty string
		for _, s := range bi.Settings {
			switch s.Key {
			case "vcs.revision":
				rev = s.Value
			case "vcs.modified":
				if s.Value == "true" {
					dirty = "+modified"
				}
			}
		}
		if rev != "" {
			v += " " + rev[:min(12, len(rev))] + dirty
		}
	}
	if revision != "" && v == "(devel)" {
		v += " " + revision
	}
	return fmt.Sprintf("ftkvm %s (replication protocol %d, snapshot format %d)", v, ft.ProtocolVersion, snapshot.Version)
}

// usageError is bad command-line usage found after parsing (flags that
// exclude each other, a malformed address): exit status 2, like the
// parser's own errors.
type usageError struct{ error }

func (u usageError) Unwrap() error { return u.error }

// fail prints one clear line and exits; it is the only way ftkvm reports a
// fatal error (never a panic).
func fail(err error) {
	fmt.Fprintf(os.Stderr, "ftkvm: %v\n", err)
	os.Exit(exitFailure)
}
