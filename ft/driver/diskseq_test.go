package driver

import (
	"bytes"
	"errors"
	"strings"
	"testing"

	"github.com/ftkvm/ftkvm/ft"
	"github.com/ftkvm/ftkvm/vmm"
	"github.com/ftkvm/ftkvm/vmm/snapshot"
)

// disks are a state's disks at these next sequence numbers.
func disks(seqs ...uint64) []snapshot.Disk {
	var d []snapshot.Disk
	for _, s := range seqs {
		d = append(d, snapshot.Disk{Size: 1 << 20, NextSeq: s})
	}
	return d
}

// A backup installing a checkpoint or a repair took the primary's disk
// requests, so its devices' next sequence numbers are the state's; one
// behind or ahead means its image missed writes or has others: a
// divergence, named by disk and both numbers. Different disk counts are
// vmm.Machine.Install's to refuse.
func TestCheckDiskSeqs(t *testing.T) {
	for _, tc := range []struct {
		name string
		have []uint64
		want []snapshot.Disk
		msg  string // "" when no divergence
	}{
		{"no disks", nil, nil, ""},
		{"same", []uint64{0, 7}, disks(0, 7), ""},
		{"missed requests", []uint64{5, 7}, disks(5, 9), "disk 1: the primary's state is at request 9, this replica's device at 7: its image missed 2 requests' writes"},
		{"extra requests", []uint64{6}, disks(4), "disk 0: the primary's state is at request 4, this replica's device at 6: its image has 2 requests the primary's has not"},
		{"other disk count", []uint64{3}, disks(3, 4), ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := checkDiskSeqs(tc.have, tc.want)
			if tc.msg == "" {
				if err != nil {
					t.Fatalf("got %v, want none", err)
				}
				return
			}
			if !errors.Is(err, ft.ErrDivergence) || !strings.Contains(err.Error(), tc.msg) {
				t.Fatalf("got %v, want a divergence saying %q", err, tc.msg)
			}
		})
	}
}

// seqMachine is the fake guest with disks whose devices are at seqs; it
// counts the installs that reach it.
type seqMachine struct {
	*fakeMachine
	seqs     []uint64
	installs int
}

func (m *seqMachine) DiskNextSeqs(dst []uint64) []uint64 { return append(dst, m.seqs...) }
func (m *seqMachine) Install(*snapshot.State) error      { m.installs++; return nil }

// Replica.install checks the disks' sequence numbers before the machine
// installs anything: a checkpoint at other numbers stops the backup with a
// divergence and is not installed; at the same numbers, or a join's state
// (whose images come with it, onto devices that start from nothing), it
// is.
func TestInstallChecksDiskSeqs(t *testing.T) {
	for _, tc := range []struct {
		name      string
		have      []uint64
		join      bool
		divergent bool
	}{
		{"same numbers", []uint64{4, 9}, false, false},
		{"missed requests", []uint64{4, 8}, false, true},
		{"a join", []uint64{0, 0}, true, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newFakeMachine(0, 0)
			f.dirtyOn = true
			m := &seqMachine{fakeMachine: f, seqs: tc.have}
			r := &Replica{log: quietLog(), m: m, scratch: make([]uint64, f.BitmapWords()), accum: make([]uint64, f.BitmapWords())}
			cp := vmm.Checkpoint{Dirty: make([]uint64, f.BitmapWords())}
			cp.State.Header = snapshot.Header{Version: snapshot.Version, MemSize: simMemSize}
			cp.State.Disks = disks(4, 9)
			var buf bytes.Buffer
			if err := cp.Write(snapshot.NewWriter(&buf)); err != nil {
				t.Fatal(err)
			}
			r.mu.Lock()
			err := r.install(buf.Bytes(), false, tc.join)
			r.mu.Unlock()
			if errors.Is(err, ft.ErrDivergence) != tc.divergent || (err != nil && !tc.divergent) {
				t.Fatalf("install: %v", err)
			}
			if want := map[bool]int{false: 1, true: 0}[tc.divergent]; m.installs != want {
				t.Fatalf("%d installs reached the machine, want %d", m.installs, want)
			}
		})
	}
}
