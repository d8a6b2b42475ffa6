// Package api is ftkvm's control API, in the manner of Firecracker's: HTTP
// and JSON on a unix socket.
//
//	GET   /vm               status (Status)
//	PATCH /vm               {"state": "Paused"} or {"state": "Resumed"}
//	PUT   /snapshot/create  {"snapshot_path": "/abs/file", "stop": false, "live": false}
//	PUT   /migrate          {"destination": "host:port", "bandwidth": 0}
//
// Errors are a status code of 400 (bad request), 409 (conflicts with the
// guest's state or another operation) or 500, with {"fault_message": "..."}.
// The two transfers answer 200 with a stream of JSON lines (Event): progress
// events, then one with the result or the error.
package api

import (
	"github.com/ftkvm/ftkvm/ft/driver"
	"github.com/ftkvm/ftkvm/vmm"
	"github.com/ftkvm/ftkvm/vmm/migrate"
)

// Status is GET /vm's answer.
type Status struct {
	// State is "running", "paused", "migrating", "snapshotting" or
	// "stopped".
	State string `json:"state"`
	// VirtualTimeNs is the guest's virtual time.
	VirtualTimeNs int64     `json:"virtual_time_ns"`
	Stats         vmm.Stats `json:"stats"`
	// Pauses counts completed pauses of the guest (by this API, snapshots
	// and migrations); LastPauseNs is the last one's length.
	Pauses       uint64 `json:"pauses"`
	LastPauseNs  int64  `json:"last_pause_ns"`
	TotalPauseNs int64  `json:"total_pause_ns"`
	// BytesSent counts snapshot and migration bytes written, the one under
	// way included.
	BytesSent int64 `json:"bytes_sent"`
	// Operation is the snapshot or migration under way, if any.
	Operation *Operation `json:"operation,omitempty"`
	// LastOperation is the last one that finished.
	LastOperation *Result `json:"last_operation,omitempty"`
	// Replica is set for a primary or backup (ftkvm primary, backup).
	Replica *ReplicaStatus `json:"replica,omitempty"`
	// ExitProfile is the vCPU loop's exit profile (docs/PROFILE.md);
	// absent when the vCPU thread was busy or the guest has stopped.
	ExitProfile *vmm.ExitProfile `json:"exit_profile,omitempty"`
}

// ReplicaStatus is a fault-tolerant replica's state (package ft's Status).
type ReplicaStatus struct {
	Role      string `json:"role"` // "primary" or "backup"
	Link      bool   `json:"link"`
	Protected bool   `json:"protected"` // primary: a backup holds the state and gets the log
	Joining   bool   `json:"joining"`
	Replaying bool   `json:"replaying"` // promoted backup still replaying the log
	Diverged  bool   `json:"diverged"`
	Claiming  bool   `json:"claiming"` // the peer is lost; waiting for the witness
	Fenced    bool   `json:"fenced"`   // the witness chose the peer
	Epoch     uint64 `json:"epoch"`
	Position  string `json:"position"`
	Outputs   uint64 `json:"outputs"`
	Performed uint64 `json:"performed"`
	Held      int    `json:"held"`
	LogSent   uint64 `json:"log_sent"`
	LogAcked  uint64 `json:"log_acked"`
	Backlog   int    `json:"backlog"`
	LinkBytes int64  `json:"link_bytes_sent"`
	// Replication lag (driver.Lag): primary, log records handed to the
	// link and not acknowledged; backup, received and not replayed.
	LagRecords int     `json:"lag_records"`
	LagBytes   int64   `json:"lag_bytes"`
	LagSeconds float64 `json:"lag_seconds"` // the oldest of them, to the millisecond
	// Outputs whose hold (from the guest's write to its performance) was
	// timed, and their total hold time.
	HeldOutputs uint64  `json:"outputs_timed"`
	HoldSeconds float64 `json:"output_hold_seconds"`

	Epochs           uint64 `json:"epochs"`
	CheckpointEpochs uint64 `json:"checkpoint_epochs"`
	CheckpointBytes  uint64 `json:"checkpoint_bytes"`
	Divergences      uint64 `json:"divergences"`
	Repairs          uint64 `json:"repairs"`
	// Of the repairs (backup), those that carried only the pages that
	// differed (page repairs); the bytes of all repairs' states; the
	// pages of this replica's memory they changed.
	PageRepairs   uint64 `json:"page_repairs"`
	RepairBytes   uint64 `json:"repair_bytes"`
	RepairedPages uint64 `json:"repaired_pages"`
	Promotions    uint64 `json:"promotions"`
	// After a promotion: the console byte offset (bytes of console output
	// since boot) from which this replica performed output, and how many
	// bytes from there the dead primary may have written already.
	Seam          uint64 `json:"seam_offset"`
	SeamUncertain uint64 `json:"seam_uncertain_bytes"`
	ConsoleBytes  uint64 `json:"console_bytes"` // the guest's console output since boot
	Summary       string `json:"summary"`
	// Profile is the replica profile (docs/PROFILE.md): how epochs ended
	// and what capture, install, hashes and the link cost.
	Profile *driver.ReplicaProfile `json:"profile,omitempty"`
}

// ProtectRequest asks a primary to bring in a backup waiting at
// Destination (ftkvm backup --listen ... --join).
type ProtectRequest struct {
	Destination string `json:"destination"`
}

// Operation is a transfer under way.
type Operation struct {
	Kind     string            `json:"kind"`   // "snapshot" or "migration"
	Target   string            `json:"target"` // file or address
	Progress *migrate.Progress `json:"progress,omitempty"`
}

// StateRequest is PATCH /vm's body.
type StateRequest struct {
	State string `json:"state"` // "Paused" or "Resumed"
}

// SnapshotRequest is PUT /snapshot/create's body.
type SnapshotRequest struct {
	Path string `json:"snapshot_path"` // absolute
	Stop bool   `json:"stop"`          // stop the guest once the snapshot is written
	// Live copies memory while the guest runs (pre-copy over the dirty
	// log) and pauses it only for the last pages and the state: a shorter
	// pause, a bigger file.
	Live bool `json:"live"`
}

// MigrateRequest is PUT /migrate's body.
type MigrateRequest struct {
	Destination string `json:"destination"` // host:port of `ftkvm receive`
	Bandwidth   int64  `json:"bandwidth"`   // bytes/s, 0 = no cap
}

// Event is one line of a transfer's answer.
type Event struct {
	Progress *migrate.Progress `json:"progress,omitempty"`
	Result   *Result           `json:"result,omitempty"`
	Error    string            `json:"error,omitempty"`
}

// Result is a finished transfer.
type Result struct {
	Kind        string `json:"kind"`
	Target      string `json:"target"`
	Error       string `json:"error,omitempty"`
	Bytes       int64  `json:"bytes"`
	Pages       uint64 `json:"pages"`
	Rounds      int    `json:"rounds"`
	DirtyAtStop int    `json:"dirty_pages_at_stop"`
	PauseNs     int64  `json:"pause_ns"`
	TotalNs     int64  `json:"total_ns"`
	// Stopped: the guest no longer runs here (snapshot with stop, or a
	// completed migration); the ftkvm serving the API exits.
	Stopped bool `json:"stopped"`
}

type fault struct {
	Message string `json:"fault_message"`
}
