package driver

import (
	"errors"
	"io"
	"net"
	"testing"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/ftkvm/ftkvm/ft"
)

// The driver's link handling without a machine: the handshake over a real
// TCP connection, a refusal, and a peer that dies. The vCPU side is tested
// with real guests in test/ (failover drills).

func quietLog() *logrus.Logger {
	l := logrus.New()
	l.SetOutput(io.Discard)
	return l
}

func newPair(t *testing.T, backupMem uint64) (p, b *Replica, addr string) {
	t.Helper()
	id := ft.Identity{Kernel: ft.Digest{1}, MemSize: 32 << 20, WallClock: 42}
	p = New(Options{Node: ft.Config{Role: ft.RolePrimary, Guest: id}, Log: quietLog()})
	bid := id
	bid.MemSize = backupMem
	b = New(Options{Node: ft.Config{Role: ft.RoleBackup, Guest: bid}, Log: quietLog()})
	t.Cleanup(func() { p.Close(); b.Close() })
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go b.Serve(l)
	return p, b, l.Addr().String()
}

func TestHandshake(t *testing.T) {
	p, b, addr := newPair(t, 32<<20)
	if err := p.Dial(addr, time.Second); err != nil {
		t.Fatal(err)
	}
	hb, err := b.WaitLink(10 * time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if hb.Role != ft.RolePrimary || hb.WallClock != 42 || hb.Started {
		t.Fatalf("backup saw %+v", hb)
	}
	if hp, err := p.WaitLink(10 * time.Second); err != nil || hp.Role != ft.RoleBackup {
		t.Fatalf("primary saw %+v, %v", hp, err)
	}
	if s := p.Status(); !s.Link || !s.Protected {
		t.Fatalf("primary status %v", s)
	}
	// A second primary is refused: a backup serves one primary.
	q, _, _ := newPair(t, 32<<20)
	if err := q.Dial(addr, time.Second); err != nil {
		t.Fatal(err)
	}
	if _, err := q.WaitLink(10 * time.Second); !errors.Is(err, ft.ErrRefused) {
		t.Fatalf("second primary: %v", err)
	}
}

func TestHandshakeRefused(t *testing.T) {
	p, b, addr := newPair(t, 64<<20)
	if err := p.Dial(addr, time.Second); err != nil {
		t.Fatal(err)
	}
	for _, r := range []*Replica{p, b} {
		if _, err := r.WaitLink(10 * time.Second); !errors.Is(err, ft.ErrRefused) {
			t.Fatalf("%v: want a refusal, got %v", r.Status().Role, err)
		}
	}
}

func TestPeerDies(t *testing.T) {
	p, b, addr := newPair(t, 32<<20)
	if err := p.Dial(addr, time.Second); err != nil {
		t.Fatal(err)
	}
	if _, err := b.WaitLink(10 * time.Second); err != nil {
		t.Fatal(err)
	}
	p.Close()
	deadline := time.Now().Add(10 * time.Second)
	for b.Status().Role != ft.RolePrimary {
		if time.Now().After(deadline) {
			t.Fatalf("the backup did not take over: %v", b.Status())
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestDialNobody(t *testing.T) {
	p := New(Options{Node: ft.Config{Role: ft.RolePrimary}, Log: quietLog()})
	defer p.Close()
	if err := p.Dial("127.0.0.1:1", 200*time.Millisecond); err == nil {
		t.Fatal("dialled nobody")
	}
}
