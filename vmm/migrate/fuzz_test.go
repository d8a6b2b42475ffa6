package migrate

import (
	"bytes"
	"errors"
	"io"
	"testing"

	"github.com/ftkvm/ftkvm/vmm/snapshot"
)

// validMigration is what a source sends for a small guest: hello, stream,
// commit.
func validMigration(t testing.TB) []byte {
	var b bytes.Buffer
	fw := snapshot.NewWriter(&b)
	h := snapshot.Header{Version: snapshot.Version, Kind: snapshot.KindMigration, MemSize: 2 << 20}
	fw.WriteFrame(snapshot.FrameHeader, snapshot.EncodeHeader(nil, &h))
	sw, err := snapshot.NewStreamWriter(fw, h)
	if err != nil {
		t.Fatal(err)
	}
	sw.Page(3, bytes.Repeat([]byte{1}, snapshot.PageSize), true)
	sw.Page(4, make([]byte, snapshot.PageSize), false)
	var st snapshot.State
	st.CPUID = nil
	st.Env.Input = []byte("x")
	if err := sw.State(&st); err != nil {
		t.Fatal(err)
	}
	sw.End()
	fw.WriteFrame(snapshot.FrameCommit, nil)
	return b.Bytes()
}

func TestServeValid(t *testing.T) {
	ft := &fakeTarget{mem: make([]byte, 2<<20)}
	var reply bytes.Buffer
	tgt, _, err := Serve(rw{bytes.NewReader(validMigration(t)), &reply}, func(snapshot.Header) (Target, error) { return ft, nil }, nil)
	if err != nil || tgt != ft || !ft.installed || ft.closed {
		t.Fatalf("Serve: %v (installed %v closed %v)", err, ft.installed, ft.closed)
	}
	if ft.mem[3*snapshot.PageSize] != 1 {
		t.Fatal("page 3 not written")
	}
	// The destination's replies: ready, installed, started.
	fr := snapshot.NewReader(&reply)
	for _, want := range []snapshot.FrameType{snapshot.FrameReady, snapshot.FrameInstalled, snapshot.FrameStarted} {
		if typ, _, err := fr.Next(); err != nil || typ != want {
			t.Fatalf("reply %v %v, want %v", typ, err, want)
		}
	}
}

// FuzzServe feeds arbitrary bytes to the destination's side of the
// migration protocol. Whatever comes in, it never panics, installs only a
// stream that verified, returns a target only after a commit, and closes
// every target it does not return.
//
//	go test ./vmm/migrate -run '^$' -fuzz FuzzServe -fuzztime 1m -fuzzminimizetime 5s
func FuzzServe(f *testing.F) {
	valid := validMigration(f)
	f.Add(valid)
	f.Add(valid[:len(valid)-5])
	f.Add(valid[:100])
	f.Fuzz(func(t *testing.T, b []byte) {
		var made []*fakeTarget
		tgt, st, err := Serve(rw{bytes.NewReader(b), io.Discard}, func(h snapshot.Header) (Target, error) {
			if h.MemSize > 8<<20 {
				return nil, errors.New("too big for fuzzing")
			}
			ft := &fakeTarget{mem: make([]byte, h.MemSize)}
			made = append(made, ft)
			return ft, nil
		}, nil)
		if err == nil {
			if tgt == nil || st == nil || len(made) != 1 || !made[0].installed || made[0].closed {
				t.Fatalf("success without a proper target: %v %v %d", tgt, st, len(made))
			}
			return
		}
		if tgt != nil || st != nil {
			t.Fatal("target returned with an error")
		}
		for _, ft := range made {
			if !ft.closed {
				t.Fatal("target left open after an error")
			}
		}
	})
}
