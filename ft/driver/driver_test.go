package driver

import (
	"context"
	"errors"
	"io"
	"net"
	"sync"
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

// A primary of another guest (here: another memory size) is refused:
// the primary fails with the refusal, and the backup goes on waiting for
// its own primary, which then pairs.
func TestHandshakeRefused(t *testing.T) {
	p, b, addr := newPair(t, 64<<20)
	if err := p.Dial(addr, time.Second); err != nil {
		t.Fatal(err)
	}
	if _, err := p.WaitLink(10 * time.Second); !errors.Is(err, ft.ErrRefused) {
		t.Fatalf("primary: want a refusal, got %v", err)
	}
	if _, err := b.WaitLink(50 * time.Millisecond); err == nil || errors.Is(err, ft.ErrRefused) {
		t.Fatalf("backup: want it still waiting, got %v", err)
	}
	own := New(Options{Node: ft.Config{Role: ft.RolePrimary, Guest: ft.Identity{Kernel: ft.Digest{1}, MemSize: 64 << 20, WallClock: 42}}, Log: quietLog()})
	defer own.Close()
	if err := own.Dial(addr, time.Second); err != nil {
		t.Fatal(err)
	}
	if _, err := b.WaitLink(10 * time.Second); err != nil {
		t.Fatalf("backup and its own primary: %v", err)
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

// fakeWitness fails its first fails claims (an unreachable witness), then
// answers with winner.
type fakeWitness struct {
	mu     sync.Mutex
	fails  int
	winner ft.Role
	calls  []ft.Claim
}

func (w *fakeWitness) n() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return len(w.calls)
}

func (w *fakeWitness) Claim(_ context.Context, c ft.Claim) (ft.Role, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.calls = append(w.calls, c)
	if len(w.calls) <= w.fails {
		return 0, errors.New("connection refused")
	}
	return w.winner, nil
}

// A primary that loses its backup asks the witness, again and again while
// it does not answer, and then goes on or is fenced as it says.
func TestClaimAsksUntilTheWitnessAnswers(t *testing.T) {
	for _, winner := range []ft.Role{ft.RolePrimary, ft.RoleBackup} {
		t.Run("winner "+winner.String(), func(t *testing.T) {
			id := ft.Identity{Kernel: ft.Digest{1}, MemSize: 32 << 20}
			w := &fakeWitness{fails: 2, winner: winner}
			wd := ft.Digest{0x77}
			p := New(Options{Node: ft.Config{Role: ft.RolePrimary, Guest: id, Witness: wd}, Log: quietLog(), Witness: w})
			b := New(Options{Node: ft.Config{Role: ft.RoleBackup, Guest: id, Witness: wd}, Log: quietLog()})
			defer p.Close()
			l, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			defer l.Close()
			go b.Serve(l)
			if err := p.Dial(l.Addr().String(), time.Second); err != nil {
				t.Fatal(err)
			}
			if _, err := p.WaitLink(10 * time.Second); err != nil {
				t.Fatal(err)
			}
			b.Close() // the backup's end of the link closes
			deadline := time.Now().Add(30 * time.Second)
			for {
				s := p.Status()
				if !s.Claiming && (s.Fenced || !s.Link) && w.n() > w.fails {
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("no answer taken: %v, %d claims", s, w.n())
				}
				time.Sleep(10 * time.Millisecond)
			}
			w.mu.Lock()
			calls := append([]ft.Claim(nil), w.calls...)
			w.mu.Unlock()
			if len(calls) != w.fails+1 || calls[0].Role != ft.RolePrimary || calls[0].Pair == (ft.Digest{}) || calls[0] != calls[len(calls)-1] {
				t.Fatalf("claims %+v", calls)
			}
			if s := p.Status(); s.Fenced != (winner == ft.RoleBackup) {
				t.Fatalf("witness chose the %v; primary status %v", winner, s)
			}
			want := Claims{Failed: uint64(w.fails), Won: 1}
			if winner == ft.RoleBackup {
				want = Claims{Failed: uint64(w.fails), Lost: 1}
			}
			if got := p.Claims(); got != want {
				t.Fatalf("claim counters %+v, want %+v", got, want)
			}
		})
	}
}
