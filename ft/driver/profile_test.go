package driver

import (
	"bytes"
	"encoding/json"
	"regexp"
	"testing"
	"time"

	"github.com/ftkvm/ftkvm/ft"
	"github.com/ftkvm/ftkvm/ft/wire"
)

// The replica profile's accounting of the messages a replica sends and
// receives: epoch ends by how they ended, checkpoints by kind, bytes by
// message type.
func TestReplicaProfileCounts(t *testing.T) {
	r := New(Options{Node: ft.Config{Role: ft.RolePrimary}, Log: quietLog()})
	defer r.Close()
	msgs := []wire.Msg{
		wire.EpochEnd{Seq: 1, Epoch: 1},
		wire.EpochEnd{Seq: 2, Epoch: 2},
		wire.EpochEnd{Seq: 3, Epoch: 3, Halt: true},
		wire.Checkpoint{Seq: 4, Epoch: 4, State: make([]byte, 1000)},
		wire.Checkpoint{Seq: 5, Epoch: 5, Full: true, State: make([]byte, 5000)},
		wire.Record{Seq: 6},
	}
	var frames [wireTypes]uint64
	r.mu.Lock()
	for _, m := range msgs {
		f := wire.Marshal(m)
		frames[m.Type()] += uint64(len(f))
		var t time.Time
		if m.Type() == wire.TypeCheckpoint {
			t = time.Now()
		}
		r.prof.sentMsg(m, len(f), t)
	}
	r.mu.Unlock()
	p := r.Profile()
	if p.EndedAtExit != 2 || p.EndedAtHalt != 1 || p.EndedByCheckpoint != 1 || p.FullCheckpoints != 1 {
		t.Fatalf("epoch ends: %+v", p)
	}
	want := map[string]uint64{"epoch-end": 3, "checkpoint": 2, "record": 1}
	if len(p.Sent) != len(want) {
		t.Fatalf("sent: %+v", p.Sent)
	}
	for _, s := range p.Sent {
		typ := map[string]wire.Type{"epoch-end": wire.TypeEpochEnd, "checkpoint": wire.TypeCheckpoint, "record": wire.TypeRecord}[s.Type]
		if s.Count != want[s.Type] || s.Bytes != frames[typ] {
			t.Errorf("%s: %+v, want %d messages, %d bytes", s.Type, s, want[s.Type], frames[typ])
		}
	}

	// The other side: received messages count checkpoint state bytes.
	b := New(Options{Node: ft.Config{Role: ft.RoleBackup}, Log: quietLog()})
	defer b.Close()
	b.mu.Lock()
	for _, m := range msgs {
		b.prof.recvMsg(m)
	}
	b.mu.Unlock()
	bp := b.Profile()
	if bp.Role != "backup" || bp.EndedAtExit != 2 || bp.EndedAtHalt != 1 || bp.EndedByCheckpoint != 1 || bp.FullCheckpoints != 1 {
		t.Fatalf("backup epoch ends: %+v", bp)
	}
	for _, s := range bp.Received {
		if s.Type == "checkpoint" && (s.Count != 2 || s.Bytes != 6000) {
			t.Errorf("received checkpoints: %+v", s)
		}
	}
}

func TestReplicaProfileTable(t *testing.T) {
	p := ReplicaProfile{
		Role: "primary", Epochs: 120, CheckpointEpochs: 20, CheckpointBytes: 3 << 20,
		EndedAtExit: 90, EndedAtHalt: 10, EndedByCheckpoint: 19, FullCheckpoints: 1,
		Capture: Op{Count: 20, Ns: 40_000_000, Bytes: 3 << 20},
		Send:    Op{Count: 300, Ns: 15_000_000, Bytes: 4 << 20},
		Sent:    []MsgOp{{Type: "epoch-end", Op: Op{Count: 100, Bytes: 1 << 20}}},
		Waits:   []Wait{{Reason: "ack", Count: 5, Ns: 2_500_000}},
	}
	var b bytes.Buffer
	if err := p.WriteTable(&b); err != nil {
		t.Fatal(err)
	}
	out := b.String()
	for _, re := range []string{
		`(?m)^replica profile \(primary\): 120 epochs, 20 ended by a checkpoint \(3\.00 MiB\)$`,
		`(?m)^epoch ends sent: 90 at an exit, 10 at a halt, 19 by a checkpoint at a kick, 1 full checkpoints$`,
		`(?m)^  capture +20 +40\.0 +2000\.0 +3\.00$`,
		`(?m)^  install +0 +0\.0 +- +0\.00$`,
		`(?m)^  send \(socket writes\) +300 +15\.0 +50\.0 +4\.00$`,
		`(?m)^  epoch-end +100 +0\.0 +1\.00$`,
		`(?m)^vCPU waits in the node: ack 5 \(2\.5 ms\)$`,
	} {
		if !regexp.MustCompile(re).MatchString(out) {
			t.Errorf("no line matches %s in:\n%s", re, out)
		}
	}
	j, err := json.Marshal(p)
	if err != nil {
		t.Fatal(err)
	}
	for _, key := range []string{`"ended_at_exit":90`, `"ended_by_checkpoint":19`, `"capture":{"count":20,"ns":40000000,"bytes":3145728}`,
		`"sent":[{"type":"epoch-end","count":100,`, `"waits":[{"reason":"ack","count":5,"ns":2500000}]`} {
		if !bytes.Contains(j, []byte(key)) {
			t.Errorf("JSON lacks %s: %s", key, j)
		}
	}
}
