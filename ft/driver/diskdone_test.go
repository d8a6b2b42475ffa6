package driver

import (
	"errors"
	"testing"

	"github.com/ftkvm/ftkvm/ft"
	"github.com/ftkvm/ftkvm/ft/wire"
)

// oneDiskMachine is a machine with one disk whose request 5 is in flight
// with status have: what completeDisk needs of a Machine.
type oneDiskMachine struct {
	*fakeMachine // nil: nothing else is called
	have         uint8
	waited       []uint64
	completed    []uint64
}

func (d *oneDiskMachine) WaitDisk(disk int, seq uint64) { d.waited = append(d.waited, seq) }
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
// completion for a request no longer in flight does nothing, and malformed
// event data stops the replica too.
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
