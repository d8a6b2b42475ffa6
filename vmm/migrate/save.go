// Package migrate moves a running guest: into a snapshot file, out of one,
// and live to another ftkvm over TCP (iterative pre-copy over KVM's dirty
// log, then a short stop-and-copy). The format is package snapshot's.
package migrate

import (
	"bufio"
	"crypto/tls"
	"fmt"
	"io"
	"math/bits"
	"time"

	"github.com/ftkvm/ftkvm/vmm"
	"github.com/ftkvm/ftkvm/vmm/snapshot"
)

// Options controls Save.
type Options struct {
	Kind snapshot.Kind
	// Live copies memory while the guest runs (pre-copy), round after
	// round over the dirty log, and pauses it only for the last round and
	// the state. Otherwise the guest is paused for the whole copy.
	Live bool
	// MaxRounds bounds the live rounds after the first full pass
	// (default 30).
	MaxRounds int
	// MaxPause is the stop-and-copy pause to aim for: pre-copy stops when
	// the dirty pages would take no longer than this to send at the
	// bandwidth measured so far (default 30ms).
	MaxPause time.Duration
	// Bandwidth caps the transfer in bytes per second (0: no cap).
	Bandwidth int64
	// TLS, if set, authenticates and encrypts a live migration's
	// connection (package ft/secure).
	TLS *tls.Config
	// Progress, if set, is called now and then from Save's goroutine.
	Progress func(Progress)
}

// Progress describes a transfer under way.
type Progress struct {
	Phase   string `json:"phase"`      // "precopy", "stop-and-copy", "done"
	Round   int    `json:"round"`      // 1 = the full pass
	Sent    int64  `json:"bytes_sent"` // bytes that left for the destination or file
	Pages   uint64 `json:"pages_sent"`
	Dirty   int    `json:"dirty_pages"`   // pages this round started with
	Scanned uint64 `json:"pages_scanned"` // of this round's pages
	ToScan  uint64 `json:"pages_to_scan"`
}

// Result sums up a Save.
type Result struct {
	Bytes    int64         // bytes written
	Pages    uint64        // page records written (pages sent more than once count each time)
	Rounds   int           // memory passes: 1 for a paused copy
	Dirty    int           // pages copied while paused
	PausedAt time.Time     // when the guest stopped for good
	Pause    time.Duration // from PausedAt to the end of the stream
	Total    time.Duration // the whole Save
}

const progressEvery = 100 * time.Millisecond

// Save writes m's memory and state as one stream to w. On success the
// guest is left paused (one Pause held): the caller either resumes it or
// stops it (Machine.Stop inside Do, then Resume). On error Save has
// resumed it. Save must not run concurrently with another user of the
// machine's dirty log.
func Save(m *vmm.Machine, w io.Writer, opts Options) (res Result, err error) {
	if opts.MaxRounds <= 0 {
		opts.MaxRounds = 30
	}
	if opts.MaxPause <= 0 {
		opts.MaxPause = 30 * time.Millisecond
	}
	if opts.Kind == 0 {
		opts.Kind = snapshot.KindSnapshot
	}
	start := time.Now()
	pw := &pacedWriter{w: w, rate: opts.Bandwidth, start: start}
	bw := bufio.NewWriterSize(pw, 1<<20)
	fw := snapshot.NewWriter(bw)
	s := &saver{m: m, fw: fw, bw: bw, pw: pw, opts: opts, mem: m.Memory(), pages: m.Pages()}
	pw.onWrite = func() { s.progress(false) }
	paused := false
	logOn := false
	defer func() {
		if err != nil {
			if logOn {
				_ = m.Do(func(m *vmm.Machine) error { return m.DisableDirtyLog() })
			}
			if paused {
				_ = m.Resume()
			}
		}
	}()
	s.sw, err = snapshot.NewStreamWriter(fw, snapshot.Header{Kind: opts.Kind, MemSize: m.MemSize(), Created: start.UnixNano()})
	if err != nil {
		return res, err
	}
	if opts.Live {
		if err = m.Do(func(m *vmm.Machine) error { return m.EnableDirtyLog() }); err != nil {
			return res, err
		}
		logOn = true
		bitmap := make([]uint64, m.BitmapWords())
		// Round 1: every page that is not zero (the receiver starts zeroed).
		roundStart := time.Now()
		if err = s.full("precopy", 1); err != nil {
			return res, err
		}
		res.Rounds = 1
		rate := float64(fw.Written()) / max(time.Since(roundStart).Seconds(), 1e-6)
		prev := -1
		stalled := 0
		for round := 2; ; round++ {
			dirty, err := m.DirtyLog(bitmap)
			if err != nil {
				return res, err
			}
			budget := rate * opts.MaxPause.Seconds()
			if float64(dirty)*snapshot.PageSize <= budget || dirty <= 64 || round > opts.MaxRounds+1 || stalled >= 3 {
				// Few enough pages, or pre-copy does not converge:
				// stop, and send these with the rest.
				if err := s.stop(&res); err != nil {
					return res, err
				}
				paused = true
				// Add the pages dirtied between that DirtyLog and the stop.
				extra := make([]uint64, len(bitmap))
				if _, err := m.DirtyLog(extra); err != nil {
					return res, err
				}
				res.Dirty = 0
				for i, w := range extra {
					bitmap[i] |= w
					res.Dirty += bits.OnesCount64(bitmap[i])
				}
				if err := s.dirty(bitmap, "stop-and-copy", round, res.Dirty); err != nil {
					return res, err
				}
				res.Rounds = round
				break
			}
			if prev >= 0 && dirty >= prev {
				stalled++
			}
			prev = dirty
			before, t0 := fw.Written(), time.Now()
			if err := s.dirty(bitmap, "precopy", round, dirty); err != nil {
				return res, err
			}
			if d := time.Since(t0).Seconds(); d > 0 && fw.Written() > before {
				rate = float64(fw.Written()-before) / d
			}
			res.Rounds = round
		}
	} else {
		if err = s.stop(&res); err != nil {
			return res, err
		}
		paused = true
		if err = s.full("stop-and-copy", 1); err != nil {
			return res, err
		}
		res.Rounds = 1
	}
	var st snapshot.State
	st.Header.Kind = opts.Kind
	if err = m.Do(func(m *vmm.Machine) error { return m.CaptureState(&st) }); err != nil {
		return res, fmt.Errorf("capture state: %w", err)
	}
	if err = s.sw.State(&st); err != nil {
		return res, err
	}
	if err = s.sw.End(); err != nil {
		return res, err
	}
	if err = bw.Flush(); err != nil {
		return res, err
	}
	if logOn {
		if err = m.Do(func(m *vmm.Machine) error { return m.DisableDirtyLog() }); err != nil {
			return res, err
		}
		logOn = false
	}
	res.Bytes = fw.Written()
	res.Pages = s.sw.PageRecords()
	res.Pause = time.Since(res.PausedAt)
	res.Total = time.Since(start)
	s.cur = Progress{Phase: "done", Round: res.Rounds}
	s.progress(true)
	return res, nil
}

type saver struct {
	m     *vmm.Machine
	fw    *snapshot.Writer
	bw    *bufio.Writer
	pw    *pacedWriter
	sw    *snapshot.StreamWriter
	opts  Options
	mem   []byte
	pages uint64
	cur   Progress // the round under way
	last  time.Time
}

// stop pauses the guest for the stop-and-copy.
func (s *saver) stop(res *Result) error {
	if err := s.m.Pause(); err != nil {
		return err
	}
	// Disk requests in flight complete now, before the last pages are
	// copied: a state has none in flight (vmm.Machine.SettleDisksAlone).
	if err := s.m.Do(func(m *vmm.Machine) error { m.SettleDisksAlone(); return nil }); err != nil {
		return fmt.Errorf("settle disk requests: %w", err)
	}
	res.PausedAt = time.Now()
	return nil
}

// full sends every non-zero page.
func (s *saver) full(phase string, round int) error {
	s.cur = Progress{Phase: phase, Round: round, ToScan: s.pages, Dirty: int(s.pages)}
	s.progress(true)
	for pfn := uint64(0); pfn < s.pages; pfn++ {
		if err := s.sw.Page(pfn, s.mem[pfn*snapshot.PageSize:][:snapshot.PageSize], true); err != nil {
			return err
		}
		if pfn%1024 == 1023 {
			s.cur.Scanned = pfn + 1
			s.progress(false)
		}
	}
	s.cur.Scanned = s.pages
	return s.flush()
}

// dirty sends the pages of bitmap, zero pages included.
func (s *saver) dirty(bitmap []uint64, phase string, round, n int) error {
	s.cur = Progress{Phase: phase, Round: round, Dirty: n, ToScan: uint64(n)}
	s.progress(true)
	var err error
	vmm.ForEachPage(bitmap, func(pfn uint64) {
		if err != nil {
			return
		}
		err = s.sw.Page(pfn, s.mem[pfn*snapshot.PageSize:][:snapshot.PageSize], false)
		s.cur.Scanned++
		if s.cur.Scanned%1024 == 0 {
			s.progress(false)
		}
	})
	if err != nil {
		return err
	}
	return s.flush()
}

func (s *saver) flush() error {
	if err := s.sw.Flush(); err != nil {
		return err
	}
	return s.bw.Flush()
}

// progress reports the round under way, at most every progressEvery
// unless forced; the paced writer calls it too, as bytes leave.
func (s *saver) progress(force bool) {
	if s.opts.Progress == nil || (!force && time.Since(s.last) < progressEvery) {
		return
	}
	s.last = time.Now()
	p := s.cur
	p.Sent = s.pw.n
	if s.sw != nil {
		p.Pages = s.sw.PageRecords()
	}
	s.opts.Progress(p)
}

// pacedWriter holds a transfer to a byte rate: it writes in chunks of
// about a tenth of a second's worth, each when it is due.
// It counts the bytes written, and calls onWrite after each write.
type pacedWriter struct {
	w       io.Writer
	rate    int64
	start   time.Time
	n       int64
	onWrite func()
}

func (p *pacedWriter) Write(b []byte) (int, error) {
	if p.rate <= 0 {
		n, err := p.w.Write(b)
		p.n += int64(n)
		if p.onWrite != nil {
			p.onWrite()
		}
		return n, err
	}
	chunk := int(min(max(p.rate/10, 4096), 1<<20))
	done := 0
	for done < len(b) {
		due := time.Duration(float64(p.n) / float64(p.rate) * float64(time.Second))
		if d := due - time.Since(p.start); d > 0 {
			time.Sleep(d)
		}
		n, err := p.w.Write(b[done:min(done+chunk, len(b))])
		p.n += int64(n)
		done += n
		if p.onWrite != nil {
			p.onWrite()
		}
		if err != nil {
			return done, err
		}
	}
	return done, nil
}
