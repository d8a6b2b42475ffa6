package driver

import (
	"errors"
	"testing"

	"github.com/ftkvm/ftkvm/ft"
	"github.com/ftkvm/ftkvm/ft/wire"
)

// oneDiskMachine is a machine with one disk whose guest made requests 0
// to 6, of which 5 is in flight with status have: what completeDisk needs
// of a Machine.
type oneDiskMachine struct {
	*fakeMachine // nil: nothing else is called
	have         uint8
	waited       []uint64
	completed    []uint64
}

func (d *oneDiskMachine) DiskNextSeqs(dst []uint64) []uint64 { return append(dst, 7) }
func (d *oneDiskMachine) WaitDisk(disk int, seq uint64)      { d.waited = append(d.waited, seq) }
func (d *oneDiskMachine) CompleteDisk(disk int, seq uint64) (uint8, bool) {
	if disk != 0 || seq != 5 {
		return 0, false
	}
	d.completed = append(d.completed, seq)
	return d.have, true
}

// A logged disk completion is delivered after the replica's own I/O
// goroutine performed the request; a status other than the logged one
// means the images differ: a divergence that stops the replica. A
// completion for a request no longer in flight (settled by a capture)
// does nothing, one for a request this replica's guest never made (or on a
// disk it has not) is a divergence, and malformed event data stops the
// replica too.
func TestCompleteDiskChecksTheStatus(t *testing.T) {
	for _, tc := range []struct {
		name      string
		seq       uint64
		data      []byte
		have      uint8
		divergent bool
		fatal     bool
	}{
		{"same status", 5, wire.DiskDoneData(nil, 0, 0), 0, false, false},
		{"same error status", 5, wire.DiskDoneData(nil, 0, 1), 1, false, false},
		{"other status", 5, wire.DiskDoneData(nil, 0, 0), 1, true, true},
		{"not in flight", 6, wire.DiskDoneData(nil, 0, 1), 0, false, false},
		{"never made", 7, wire.DiskDoneData(nil, 0, 0), 0, true, true},
		{"on a disk this replica has not", 5, wire.DiskDoneData(nil, 1, 0), 0, true, true},
		{"malformed data", 5, []byte{0}, 0, false, true},
		{"no such disk", 5, []byte{wire.MaxDisks, 0}, 0, false, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := &oneDiskMachine{have: tc.have}
			r := &Replica{log: quietLog(), m: m}
			r.mu.Lock()
			r.completeDisk(ft.Event{Kind: wire.KindDiskDone, Value: tc.seq, Data: tc.data})
			r.mu.Unlock()
			if (r.fatal != nil) != tc.fatal || errors.Is(r.fatal, ft.ErrDivergence) != tc.divergent {
				t.Fatalf("fatal %v", r.fatal)
			}
			if _, _, ok := wire.DiskDone(tc.data); ok && (len(m.waited) != 1 || m.waited[0] != tc.seq) {
				t.Fatalf("waited for %v, want request %d first", m.waited, tc.seq)
			}
		})
	}
}

// settleMachine records whether the replica's lock was free while the
// disks settled.
type settleMachine struct {
	*fakeMachine
	r    *Replica
	held bool
}

func (m *settleMachine) SettleDisks() {
	// The ticker and the link reader need r.mu meanwhile.
	if m.r.mu.TryLock() {
		m.r.mu.Unlock()
	} else {
		m.held = true
	}
}

// A capture (a checkpoint's or a page repair's) waits for the disk
// requests in flight, a flush perhaps, without the replica's lock, so
// that the heartbeats go on meanwhile.
func TestCaptureSettlesDisksWithoutTheLock(t *testing.T) {
	for _, repair := range []bool{false, true} {
		f := newFakeMachine(0, 0)
		f.dirtyOn = true
		f.quiescent = true
		m := &settleMachine{fakeMachine: f}
		r := &Replica{log: quietLog(), m: m, scratch: make([]uint64, f.BitmapWords()), accum: make([]uint64, f.BitmapWords())}
		m.r = r
		f.env = r
		r.mu.Lock()
		var err error
		if repair {
			_, err = r.captureRepair(make([]uint64, simPages))
		} else {
			_, err = r.capture(false)
		}
		r.mu.Unlock()
		if err != nil {
			t.Fatal(err)
		}
		if m.held {
			t.Errorf("page repair %v: the lock is held while the disks settle", repair)
		}
	}
}
