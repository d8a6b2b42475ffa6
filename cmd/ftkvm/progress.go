package main

import (
	"fmt"
	"os"
	"time"

	"github.com/schollz/progressbar/v3"
	"golang.org/x/term"

	"github.com/ftkvm/ftkvm/vmm/migrate"
)

// transferView shows a transfer's progress on stderr once it has lasted
// longer than a moment: a progress bar on a terminal; otherwise progress
// lines, if lines is set, or nothing.
type transferView struct {
	label string
	tty   bool
	lines bool
	start time.Time
	bar   *progressbar.ProgressBar
	round int
	last  time.Time
}

const showAfter = 300 * time.Millisecond

func newTransferView(label string, lines bool) *transferView {
	return &transferView{label: label, lines: lines, start: time.Now(), tty: term.IsTerminal(int(os.Stderr.Fd()))}
}

func (v *transferView) due() bool { return time.Since(v.start) >= showAfter }

// bytes reports a transfer of unknown size (loading a snapshot or a
// migration): bytes so far.
func (v *transferView) bytes(n int64) {
	if !v.due() {
		return
	}
	if v.tty {
		if v.bar == nil {
			v.bar = progressbar.NewOptions64(-1,
				progressbar.OptionSetWriter(os.Stderr),
				progressbar.OptionSetDescription(v.label),
				progressbar.OptionShowBytes(true),
				progressbar.OptionShowCount(),
				progressbar.OptionSpinnerType(14),
				progressbar.OptionThrottle(100*time.Millisecond),
				progressbar.OptionClearOnFinish())
		}
		_ = v.bar.Set64(n)
		return
	}
	if v.lines && time.Since(v.last) >= time.Second {
		v.last = time.Now()
		fmt.Fprintf(os.Stderr, "ftkvm: %s: %s\n", v.label, size(n))
	}
}

// progress reports a snapshot or migration under way: the round, and the
// bytes that have left (the total is not known in advance: pre-copy rounds
// last as long as the guest keeps writing).
func (v *transferView) progress(p migrate.Progress) {
	if !v.due() || p.Phase == "done" {
		return
	}
	desc := fmt.Sprintf("%s: round %d (%s)", v.label, p.Round, p.Phase)
	if p.Round > 1 {
		desc += fmt.Sprintf(", %d dirty pages", p.Dirty)
	}
	if v.tty {
		if v.bar == nil {
			v.bar = progressbar.NewOptions64(-1,
				progressbar.OptionSetWriter(os.Stderr),
				progressbar.OptionSetDescription(desc),
				progressbar.OptionShowBytes(true),
				progressbar.OptionShowCount(),
				progressbar.OptionSpinnerType(14),
				progressbar.OptionThrottle(100*time.Millisecond),
				progressbar.OptionClearOnFinish())
		}
		v.bar.Describe(desc)
		_ = v.bar.Set64(p.Sent)
		return
	}
	if v.lines && (p.Round != v.round || time.Since(v.last) >= time.Second) {
		v.round, v.last = p.Round, time.Now()
		fmt.Fprintf(os.Stderr, "ftkvm: %s, %s sent\n", desc, size(p.Sent))
	}
}

func (v *transferView) finish() {
	if v.bar != nil {
		_ = v.bar.Finish()
		_ = v.bar.Clear()
	}
}

// size formats a byte count.
func size(n int64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.2f GiB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%d B", n)
}
