package driver

import (
	"errors"
	"strings"
	"testing"

	"github.com/ftkvm/ftkvm/ft"
	"github.com/ftkvm/ftkvm/vmm/snapshot"
)

// A backup installing a checkpoint or a repair took the primary's disk
// requests, so its devices' next sequence numbers are the state's; one
// behind or ahead means its image missed writes or has others: a
// divergence, named by disk and both numbers. Different disk counts are
// vmm.Machine.Install's to refuse.
func TestCheckDiskSeqs(t *testing.T) {
	disks := func(seqs ...uint64) []snapshot.Disk {
		var d []snapshot.Disk
		for _, s := range seqs {
			d = append(d, snapshot.Disk{Size: 1 << 20, NextSeq: s})
		}
		return d
	}
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
