package nested

import (
	"fmt"
	"regexp"
	"strconv"
	"strings"
	"time"
)

// Console markers printed by the L1 /init. Each is a whole line, except
// that the END marker may follow a command's last output line when that
// line has no newline: the parser accepts it as a line suffix.
const (
	markBooted   = "@@FTKVM-L1-BOOTED"          // /init started
	markReady    = "@@FTKVM-L1-READY"           // modules loaded, /dev/kvm present
	markError    = "@@FTKVM-L1-ERROR"           // followed by a reason; L1 setup failed
	markDone     = "@@FTKVM-L1-DONE"            // every command ran
	markBegin    = "@@FTKVM-CMD-BEGIN"          // <name>
	markEnd      = "@@FTKVM-CMD-END"            // <name> rc=<n>
	markTimedOut = "@@FTKVM-CMD-TIMEOUT"        // <name>, after END, if killed by its timeout
	markPrefix   = "@@FTKVM-"                   // every marker starts so
	nameChars    = `[A-Za-z0-9][A-Za-z0-9._-]*` // what a command name may be
)

var (
	nameRE    = regexp.MustCompile(`^` + nameChars + `$`)
	beginRE   = regexp.MustCompile(`^` + markBegin + ` (` + nameChars + `)$`)
	endRE     = regexp.MustCompile(markEnd + ` (` + nameChars + `) rc=(-?[0-9]+)$`)
	timeoutRE = regexp.MustCompile(`^` + markTimedOut + ` (` + nameChars + `)$`)
)

// CommandResult is the outcome of one Command run in the L1.
type CommandResult struct {
	Name     string
	Started  bool // its BEGIN marker was seen
	Finished bool // its END marker was seen
	// RC is the exit status the L1 shell saw (128+n for a signal); -1
	// when the command did not finish.
	RC       int
	TimedOut bool   // killed by its per-command timeout
	Output   string // stdout and stderr, \r removed; partial if !Finished
	// Duration is measured on the host between the markers' arrival;
	// zero for results parsed from canned text.
	Duration time.Duration
}

// OK reports whether the command ran to completion with status 0.
func (r *CommandResult) OK() bool { return r.Finished && r.RC == 0 }

// Err describes why the command did not succeed, or returns nil.
func (r *CommandResult) Err() error {
	switch {
	case !r.Started:
		return fmt.Errorf("command %s never started", r.Name)
	case !r.Finished:
		return fmt.Errorf("command %s did not finish (the L1 stopped or timed out during it)", r.Name)
	case r.TimedOut:
		return fmt.Errorf("command %s hit its timeout (rc=%d)", r.Name, r.RC)
	case r.RC != 0:
		return fmt.Errorf("command %s failed with rc=%d", r.Name, r.RC)
	}
	return nil
}

// Console is what ParseConsole finds in an L1 console log.
type Console struct {
	Booted     bool   // the L1 /init started
	Ready      bool   // kvm modules loaded and /dev/kvm present
	SetupError string // reason given by @@FTKVM-L1-ERROR, if any
	Done       bool   // /init ran every command
	Commands   []CommandResult
}

// normalize drops the carriage returns that the serial line discipline
// (and any nested guest console) adds, so output compares as plain text.
func normalize(s string) string { return strings.ReplaceAll(s, "\r", "") }

// ParseConsole splits an L1 console log into per-command results. A
// command whose END marker never appears is reported with Finished false,
// RC -1 and the output seen so far. Lines outside commands (kernel
// messages, the L1's own markers) are not attributed to any command.
func ParseConsole(console string) *Console {
	c := &Console{}
	var cur *CommandResult
	var out strings.Builder
	closeCur := func() {
		if cur != nil {
			cur.Output = out.String()
			c.Commands = append(c.Commands, *cur)
			cur = nil
			out.Reset()
		}
	}
	lines := strings.Split(normalize(console), "\n")
	for i, line := range lines {
		last := i == len(lines)-1
		if cur != nil {
			if m := endRE.FindStringSubmatchIndex(line); m != nil && line[m[2]:m[3]] == cur.Name {
				// Text before the marker is the unterminated last
				// line of the command's output.
				out.WriteString(line[:m[0]])
				cur.Finished = true
				cur.RC, _ = strconv.Atoi(line[m[4]:m[5]])
				closeCur()
				continue
			}
			if beginRE.MatchString(line) || line == markDone || strings.HasPrefix(line, markError) {
				// The L1 moved on without an END: keep the partial
				// output and handle this line below.
				closeCur()
			} else {
				out.WriteString(line)
				if !last {
					out.WriteByte('\n')
				}
				continue
			}
		}
		switch {
		case line == markBooted:
			c.Booted = true
		case line == markReady:
			c.Ready = true
		case line == markDone:
			c.Done = true
		case strings.HasPrefix(line, markError):
			c.SetupError = strings.TrimSpace(strings.TrimPrefix(line, markError))
		default:
			if m := beginRE.FindStringSubmatch(line); m != nil {
				cur = &CommandResult{Name: m[1], Started: true, RC: -1}
			} else if m := timeoutRE.FindStringSubmatch(line); m != nil {
				for j := len(c.Commands) - 1; j >= 0; j-- {
					if c.Commands[j].Name == m[1] {
						c.Commands[j].TimedOut = true
						break
					}
				}
			}
		}
	}
	closeCur()
	return c
}
