package driver

import (
	"bytes"
	"errors"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
	logtest "github.com/sirupsen/logrus/hooks/test"

	"github.com/ftkvm/ftkvm/ft"
	"github.com/ftkvm/ftkvm/ft/wire"
)

// strangerHello is a valid frame of a peer that is not this backup's
// primary.
func strangerHello(mod func(h *wire.Hello)) []byte {
	h := wire.Hello{Version: ft.ProtocolVersion, Role: ft.RolePrimary, MemSize: 32 << 20, WallClock: 42, Kernel: ft.Digest{1}}
	h.Kernel, h.Initrd, h.Cmdline = ft.Digest{1}, ft.Digest{}, ft.Digest{}
	mod(&h)
	return wire.Marshal(h)
}

// Strangers on a waiting backup's port: each is refused or closed with
// one log line, and afterwards (or meanwhile, for one that sends
// nothing) the real primary pairs, and the backup is a backup that never
// took over. The same stranger after the pairing is refused as busy.
func TestStrangersDoNotPair(t *testing.T) {
	cases := []struct {
		name   string
		send   []byte
		hold   bool              // keep the connection open (send nothing more)
		refuse wire.RefuseReason // the refusal the stranger reads, 0 for none
	}{
		{name: "empty", send: nil},
		{name: "silent", hold: true},
		{name: "random bytes", send: []byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"), refuse: wire.RefuseProtocol},
		{name: "truncated hello", send: strangerHello(func(*wire.Hello) {})[:20], refuse: wire.RefuseProtocol},
		{name: "oversized frame", send: oversized(), refuse: wire.RefuseProtocol},
		{name: "not a hello", send: wire.Marshal(wire.Heartbeat{Epoch: 1}), refuse: wire.RefuseProtocol},
		{name: "other guest", send: strangerHello(func(h *wire.Hello) { h.Kernel = ft.Digest{9} }), refuse: wire.RefuseKernel},
		{name: "a backup", send: strangerHello(func(h *wire.Hello) { h.Role = ft.RoleBackup }), refuse: wire.RefuseRole},
		{name: "other version", send: strangerHello(func(h *wire.Hello) { h.Version = 99 }), refuse: wire.RefuseVersion},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			log, hook := logtest.NewNullLogger()
			log.SetLevel(logrus.DebugLevel)
			id := ft.Identity{Kernel: ft.Digest{1}, MemSize: 32 << 20, WallClock: 42}
			// A peer timeout a loaded test host cannot exceed by accident
			// (it is also the silent stranger's time to say hello).
			const tout = 3 * time.Second
			b := New(Options{Node: ft.Config{Role: ft.RoleBackup, Guest: id, Timeout: tout}, Log: log})
			defer b.Close()
			l, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			defer l.Close()
			go b.Serve(l)

			conn, err := net.Dial("tcp", l.Addr().String())
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			if len(c.send) > 0 {
				if _, err := conn.Write(c.send); err != nil {
					t.Fatal(err)
				}
			}
			if !c.hold {
				if tc, ok := conn.(*net.TCPConn); ok {
					_ = tc.CloseWrite()
				}
				got := readRefusal(t, conn)
				if got != c.refuse {
					t.Fatalf("the stranger read refusal %v, want %v", got, c.refuse)
				}
				waitFor(t, func() bool { return strangerLines(hook) == 1 }, "one line about the stranger")
			}

			p := New(Options{Node: ft.Config{Role: ft.RolePrimary, Guest: id, Timeout: tout}, Log: quietLog()})
			defer p.Close()
			if err := p.Dial(l.Addr().String(), time.Second); err != nil {
				t.Fatal(err)
			}
			if _, err := p.WaitLink(10 * time.Second); err != nil {
				t.Fatalf("the real primary: %v", err)
			}
			if _, err := b.WaitLink(10 * time.Second); err != nil {
				t.Fatalf("the backup: %v", err)
			}
			if c.hold {
				// The silent stranger is closed after its time, once.
				conn.SetReadDeadline(time.Now().Add(10 * time.Second))
				if got := readRefusal(t, conn); got != 0 {
					t.Fatalf("silent stranger read %v", got)
				}
				waitFor(t, func() bool { return strangerLines(hook) == 1 }, "one line about the silent stranger")
			}
			if s := b.Status(); s.Role != ft.RoleBackup || !s.Link || s.Promotions != 0 {
				t.Fatalf("backup status %v", s)
			}
			for _, e := range hook.AllEntries() {
				if strings.Contains(e.Message, "taking over") || strings.Contains(e.Message, "primary lost") {
					t.Fatalf("the backup logged %q", e.Message)
				}
			}
			// Later connections are refused as busy, and change nothing.
			late, err := net.Dial("tcp", l.Addr().String())
			if err != nil {
				t.Fatal(err)
			}
			late.Write(c.send)
			if got := readRefusal(t, late); got != wire.RefuseBusy {
				t.Fatalf("a stranger after the pairing read %v, want busy", got)
			}
			late.Close()
			if s := b.Status(); s.Role != ft.RoleBackup || !s.Link {
				t.Fatalf("backup status after a late stranger %v", s)
			}
			// And the pairing is real: the primary's death is the backup's
			// takeover.
			p.Close()
			waitFor(t, func() bool { return b.Status().Role == ft.RolePrimary }, "the takeover")
		})
	}
}

// More strangers at once than the backup greets: the extra ones are
// closed, and the real primary still pairs once a slot is free.
func TestStrangerFlood(t *testing.T) {
	id := ft.Identity{Kernel: ft.Digest{1}, MemSize: 32 << 20, WallClock: 42}
	b := New(Options{Node: ft.Config{Role: ft.RoleBackup, Guest: id, Timeout: 3 * time.Second}, Log: quietLog()})
	defer b.Close()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go b.Serve(l)
	var conns []net.Conn
	for range maxGreeting + 4 {
		c, err := net.Dial("tcp", l.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
	}
	p := New(Options{Node: ft.Config{Role: ft.RolePrimary, Guest: id, Timeout: 3 * time.Second}, Log: quietLog()})
	defer p.Close()
	if err := p.Dial(l.Addr().String(), time.Second); err != nil {
		t.Fatal(err)
	}
	// The primary may have been closed for want of a slot: a primary that
	// gets no handshake in time dials again, as its operator would.
	if _, err := p.WaitLink(2 * 3 * time.Second); err != nil {
		for _, c := range conns {
			c.Close()
		}
		p2 := New(Options{Node: ft.Config{Role: ft.RolePrimary, Guest: id, Timeout: 3 * time.Second}, Log: quietLog()})
		defer p2.Close()
		if err := p2.Dial(l.Addr().String(), time.Second); err != nil {
			t.Fatal(err)
		}
		if _, err := p2.WaitLink(10 * time.Second); err != nil {
			t.Fatalf("primary after the flood: %v", err)
		}
	}
	if s := b.Status(); s.Role != ft.RoleBackup || !s.Link || s.Promotions != 0 {
		t.Fatalf("backup status %v", s)
	}
	for _, c := range conns {
		c.Close()
	}
}

func oversized() []byte {
	f := wire.Marshal(wire.Hello{Version: ft.ProtocolVersion + 1, Role: ft.RolePrimary, Rest: bytes.Repeat([]byte{1}, 2*maxHello)})
	return f
}

// readRefusal reads what the backup sent a stranger until it closed the
// connection: the refusal's reason, or 0 if it sent none.
func readRefusal(t *testing.T, conn net.Conn) wire.RefuseReason {
	t.Helper()
	conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	m, err := wire.NewReader(conn, 0).Read()
	switch {
	case err == nil:
		r, ok := m.(wire.Refuse)
		if !ok {
			t.Fatalf("the stranger got a %v", m.Type())
		}
		return r.Reason
	case errors.Is(err, io.EOF), errors.Is(err, net.ErrClosed):
		return 0
	default:
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			t.Fatal("the backup neither refused nor closed the stranger")
		}
		return 0 // reset
	}
}

func strangerLines(h *logtest.Hook) int {
	n := 0
	for _, e := range h.AllEntries() {
		if strings.Contains(e.Message, "is not this backup's primary") {
			n++
		}
	}
	return n
}

func waitFor(t *testing.T, cond func() bool, what string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("waited 10 s for %s", what)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// FuzzGreet: whatever a connection sends a waiting backup, the backup
// never panics, and pairs only with a connection whose first frame is a
// hello the node admits.
func FuzzGreet(f *testing.F) {
	good := strangerHello(func(*wire.Hello) {})
	f.Add(good)
	f.Add(append(good, wire.Marshal(wire.Heartbeat{Epoch: 1})...))
	f.Add(good[:30])
	f.Add([]byte{})
	f.Add([]byte("GET / HTTP/1.1\r\n\r\n"))
	f.Add(strangerHello(func(h *wire.Hello) { h.Kernel = ft.Digest{2} }))
	f.Add(wire.Marshal(wire.Refuse{Reason: wire.RefuseBusy}))
	f.Add(oversized())
	id := ft.Identity{Kernel: ft.Digest{1}, MemSize: 32 << 20, WallClock: 42}
	f.Fuzz(func(t *testing.T, data []byte) {
		b := New(Options{Node: ft.Config{Role: ft.RoleBackup, Guest: id, Timeout: 3 * time.Second}, Log: quietLog()})
		defer b.Close()
		here, there := net.Pipe()
		go func() {
			there.SetWriteDeadline(time.Now().Add(time.Second))
			there.Write(data)
			there.Close() // the stream ends: greet never waits for its timeout
		}()
		done := make(chan struct{})
		go func() {
			b.greet(here)
			close(done)
		}()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Fatal("greet hung")
		}
		b.mu.Lock()
		paired := b.served
		b.mu.Unlock()
		first, ferr := firstFrame(data)
		h, isHello := first.(wire.Hello)
		admissible := ferr == nil && isHello && h.Version == ft.ProtocolVersion && h.Role == ft.RolePrimary &&
			h.Kernel == id.Kernel && h.MemSize == id.MemSize && h.Initrd == (ft.Digest{}) && h.Cmdline == (ft.Digest{}) &&
			h.Clock == 0 && h.Witness == (ft.Digest{})
		if paired && !admissible {
			t.Fatalf("paired with %x", data)
		}
	})
}

func firstFrame(data []byte) (wire.Msg, error) {
	d := wire.NewDecoder(maxHello)
	d.Write(data)
	m, err := d.Next()
	if m == nil && err == nil {
		err = io.ErrUnexpectedEOF
	}
	return m, err
}
