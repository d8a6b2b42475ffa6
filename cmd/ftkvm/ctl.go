package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/ftkvm/ftkvm/vmm/api"
)

// ctlCmd talks to a running ftkvm's control API.
type ctlCmd struct {
	API string `required:"" help:"Control socket of the ftkvm to control (its --api)." name:"api" placeholder:"SOCKET"`

	Pause    ctlPauseCmd    `cmd:"" help:"Pause the guest (its virtual time stands still)."`
	Resume   ctlResumeCmd   `cmd:"" help:"Resume a paused guest."`
	Status   ctlStatusCmd   `cmd:"" help:"Show the guest's state, pause times and bytes sent. Exits 1 when a replica is not a protected pair (unprotected, joining, diverged, claiming, fenced), so a monitoring check can use it."`
	Snapshot ctlSnapshotCmd `cmd:"" help:"Write a snapshot of the guest to FILE; the guest keeps running unless --stop."`
	Migrate  ctlMigrateCmd  `cmd:"" help:"Migrate the guest live to an ftkvm receive at HOST:PORT; the source exits once the destination runs it."`
	Protect  ctlProtectCmd  `cmd:"" help:"Bring a new backup (ftkvm backup --listen HOST:PORT --join) in beside a running primary."`
}

type ctlPauseCmd struct{}
type ctlResumeCmd struct{}

type ctlStatusCmd struct {
	JSON      bool `help:"Print the API's JSON answer."`
	ExitStats bool `help:"Also print the exit profile (and a replica's profile) as tables, as --exit-stats does at the end of a run." name:"exit-stats"`
}

// exitUnhealthy is ctl status's exit status when a replica is not a
// protected pair: a monitoring check fails on it.
const exitUnhealthy = 1

// unhealthy says why a replica is not a protected, healthy pair member,
// or "" if it is (or the ftkvm is no replica at all).
func unhealthy(rs *api.ReplicaStatus) string {
	switch {
	case rs == nil:
		return ""
	case rs.Fenced:
		return "fenced"
	case rs.Claiming:
		return "the peer is lost and the witness is being asked"
	case rs.Diverged:
		return "diverged, waiting for the repair"
	case rs.Joining:
		return "a backup is joining"
	case rs.Role == "primary" && !rs.Protected:
		return "unprotected"
	case rs.Role == "backup" && !rs.Link:
		return "no link to the primary"
	}
	return ""
}

type ctlSnapshotCmd struct {
	File string `arg:"" help:"Snapshot file to write." type:"path"`
	Stop bool   `help:"Stop the guest (and its ftkvm) once the snapshot is written."`
	Live bool   `help:"Copy memory while the guest runs, pausing it only for the last pages and the state (shorter pause, bigger file)."`
}

type ctlMigrateCmd struct {
	Destination string `arg:"" help:"Address of the ftkvm receive --listen." placeholder:"HOST:PORT"`
	Bandwidth   string `help:"Cap the transfer, in bytes per second with an optional K, M or G suffix (e.g. 512K, 100M); 0: no cap." default:"0"`
}

func (c *ctlCmd) client() *api.Client { return api.NewClient(c.API) }

func (c *ctlCmd) pause() (int, error) {
	return 0, c.client().SetState(context.Background(), "Paused")
}

func (c *ctlCmd) resume() (int, error) {
	return 0, c.client().SetState(context.Background(), "Resumed")
}

func (c *ctlCmd) status(s *ctlStatusCmd) (int, error) {
	st, err := c.client().Status(context.Background())
	if err != nil {
		return 0, err
	}
	code := 0
	if unhealthy(st.Replica) != "" {
		code = exitUnhealthy
	}
	if s.JSON {
		enc := json.NewEncoder(os.Stdout)
		enc.SetIndent("", "  ")
		return code, enc.Encode(st)
	}
	w := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintf(w, "state\t%s\n", st.State)
	if rs := st.Replica; rs != nil {
		fmt.Fprintf(w, "replica\t%s\n", rs.Summary)
		if why := unhealthy(rs); why != "" {
			fmt.Fprintf(w, "health\tNOT PROTECTED: %s\n", why)
		}
		fmt.Fprintf(w, "log\t%d records sent, %d acknowledged, %d bytes on the link\n", rs.LogSent, rs.LogAcked, rs.LinkBytes)
		fmt.Fprintf(w, "lag\t%d records, %d bytes, the oldest %v old\n", rs.LagRecords, rs.LagBytes,
			time.Duration(rs.LagSeconds*1e9).Round(time.Millisecond))
		if rs.HeldOutputs > 0 {
			fmt.Fprintf(w, "outputs held\t%d now; %d performed held %v on average\n", rs.Held, rs.HeldOutputs,
				time.Duration(rs.HoldSeconds/float64(rs.HeldOutputs)*1e9).Round(time.Microsecond))
		}
	}
	fmt.Fprintf(w, "virtual time\t%v\n", time.Duration(st.VirtualTimeNs).Round(time.Microsecond))
	fmt.Fprintf(w, "exits\t%d (kicks %d, interrupts injected %d, timer ticks %d)\n",
		st.Stats.Exits, st.Stats.Kicks, st.Stats.Injected, st.Stats.TimerEvents)
	fmt.Fprintf(w, "console\t%d bytes out, %d in\n", st.Stats.ConsoleBytes, st.Stats.InputBytes)
	fmt.Fprintf(w, "pauses\t%d (last %v, total %v)\n", st.Pauses,
		time.Duration(st.LastPauseNs).Round(time.Microsecond), time.Duration(st.TotalPauseNs).Round(time.Microsecond))
	fmt.Fprintf(w, "bytes sent\t%d (%s)\n", st.BytesSent, size(st.BytesSent))
	if op := st.Operation; op != nil {
		line := fmt.Sprintf("%s to %s", op.Kind, op.Target)
		if p := op.Progress; p != nil {
			line += fmt.Sprintf(": round %d (%s), %s sent", p.Round, p.Phase, size(p.Sent))
		}
		fmt.Fprintf(w, "under way\t%s\n", line)
	}
	if r := st.LastOperation; r != nil {
		fmt.Fprintf(w, "last transfer\t%s\n", describe(r))
	}
	if err := w.Flush(); err != nil || !s.ExitStats {
		return code, err
	}
	if p := st.ExitProfile; p != nil {
		fmt.Println()
		if err := p.WriteTable(os.Stdout); err != nil {
			return code, err
		}
	} else {
		fmt.Println("\nexit profile: not read (the vCPU thread was busy or the guest stopped)")
	}
	if rs := st.Replica; rs != nil && rs.Profile != nil {
		fmt.Println()
		if err := rs.Profile.WriteTable(os.Stdout); err != nil {
			return code, err
		}
	}
	return code, nil
}

// describe sums up a finished transfer.
func describe(r *api.Result) string {
	s := fmt.Sprintf("%s to %s: ", r.Kind, r.Target)
	if r.Error != "" {
		return s + "failed: " + r.Error
	}
	s += fmt.Sprintf("%s in %d round(s), guest paused %v", size(r.Bytes), r.Rounds,
		time.Duration(r.PauseNs).Round(time.Microsecond))
	if r.Kind == "migration" {
		s += fmt.Sprintf(" (%d pages at the stop), total %v", r.DirtyAtStop, time.Duration(r.TotalNs).Round(time.Millisecond))
	}
	return s
}

func (c *ctlCmd) snapshot(s *ctlSnapshotCmd) (int, error) {
	view := newTransferView("snapshot", true)
	res, err := c.client().Snapshot(context.Background(), api.SnapshotRequest{Path: s.File, Stop: s.Stop, Live: s.Live}, view.progress)
	view.finish()
	if err != nil {
		return 0, err
	}
	fmt.Println(describe(res))
	if res.Stopped {
		fmt.Println("the guest stopped")
	}
	return 0, nil
}

func (c *ctlCmd) migrate(s *ctlMigrateCmd) (int, error) {
	bw, err := parseRate(s.Bandwidth)
	if err != nil {
		return 0, err
	}
	view := newTransferView("migrate", true)
	res, err := c.client().Migrate(context.Background(), api.MigrateRequest{Destination: s.Destination, Bandwidth: bw}, view.progress)
	view.finish()
	if err != nil {
		return 0, err
	}
	fmt.Println(describe(res))
	return 0, nil
}

// parseRate parses a byte rate: a number with an optional K, M or G suffix
// (powers of 1024), optionally followed by "iB", "B" and "/s".
func parseRate(s string) (int64, error) {
	t, shift := splitSize(strings.TrimSuffix(strings.TrimSpace(s), "/s"))
	if shift > 30 {
		return 0, fmt.Errorf("--bandwidth %q: want a byte rate such as 0, 512K or 100M", s)
	}
	shift = max(shift, 0)
	v, err := strconv.ParseInt(t, 10, 64)
	if err != nil || v < 0 || v > 1<<40 {
		return 0, fmt.Errorf("--bandwidth %q: want a byte rate such as 0, 512K or 100M", s)
	}
	return v << shift, nil
}
