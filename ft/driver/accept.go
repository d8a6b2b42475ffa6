package driver

// Accepting the primary, on the backup's side.
//
// A connection becomes the backup's link only once its hello passed the
// node's handshake checks (ft.Node.Admits). Until then it is a stranger:
// a port scanner, a health check, a primary of another guest, random
// bytes. Each stranger is greeted on its own goroutine, with a bound on
// time and size, and refused or closed with one log line; the backup
// goes on listening. So nothing a stranger does is a lost primary, and
// none can hold the port while the real primary waits.
//
// Locking: greet takes r.mu only to ask the node and to make the
// connection the link; reading the hello happens without it.

import (
	"errors"
	"fmt"
	"io"
	"net"
	"sync/atomic"
	"time"

	"github.com/ftkvm/ftkvm/ft/wire"
)

const (
	// maxHello bounds the handshake's first frame: a Hello is a few
	// hundred bytes.
	maxHello = 4 << 10
	// maxGreeting is how many connections may be in their handshake at
	// once; more are closed at once.
	maxGreeting = 16
	// minHelloWait is the least time a connection has to send its hello
	// (the peer timeout if that is longer). A primary sends it as soon as
	// it connects.
	minHelloWait = time.Second
)

// Serve accepts connections on l (the backup's side) until l is closed.
// The first whose handshake succeeds becomes the backup's primary; a
// backup has one primary in its life, and later connections are refused
// as busy.
func (r *Replica) Serve(l net.Listener) {
	slots := make(chan struct{}, maxGreeting)
	for {
		conn, err := l.Accept()
		if err != nil {
			return
		}
		select {
		case slots <- struct{}{}:
			go func() {
				defer func() { <-slots }()
				r.greet(conn)
			}()
		default:
			r.log.Warnf("replica: closed a connection from %v: %d others are in their handshake", conn.RemoteAddr(), maxGreeting)
			conn.Close()
		}
	}
}

// greet reads a connection's hello and makes it the link if the node
// admits it; otherwise it refuses it and logs one line.
func (r *Replica) greet(conn net.Conn) {
	setupTCP(conn)
	from := conn.RemoteAddr()
	stranger := func(reason wire.RefuseReason, format string, args ...any) {
		text := fmt.Sprintf(format, args...)
		if reason != 0 {
			refuse(conn, reason, text)
		} else {
			conn.Close()
		}
		r.log.Warnf("replica: a connection from %v is not this backup's primary (%s); still waiting for it", from, text)
	}
	r.mu.Lock()
	busy := r.served
	r.mu.Unlock()
	if busy {
		refuse(conn, wire.RefuseBusy, "this backup already serves a primary")
		r.log.Infof("replica: refused a connection from %v: this backup already serves a primary", from)
		return
	}
	rx := new(atomic.Int64)
	rd := wire.NewReader(countingReader{conn, rx}, maxHello)
	wait := max(r.opts.Node.Timeout, minHelloWait)
	_ = conn.SetReadDeadline(time.Now().Add(wait))
	m, err := rd.Read()
	_ = conn.SetReadDeadline(time.Time{})
	if err != nil {
		var ne net.Error
		switch {
		case errors.As(err, &ne) && ne.Timeout():
			stranger(0, "no hello within %v", wait)
		case errors.Is(err, io.EOF):
			stranger(0, "closed without a hello")
		default:
			stranger(wire.RefuseProtocol, "not a hello: %v", err)
		}
		return
	}
	h, ok := m.(wire.Hello)
	if !ok {
		stranger(wire.RefuseProtocol, "a %v before the hello", m.Type())
		return
	}
	r.mu.Lock()
	if r.served {
		r.mu.Unlock()
		refuse(conn, wire.RefuseBusy, "this backup already serves a primary")
		r.log.Infof("replica: refused a connection from %v: this backup already serves a primary", from)
		return
	}
	if reason, err := r.node.Admits(h); err != nil {
		r.mu.Unlock()
		stranger(reason, "%v", err)
		return
	}
	r.served = true
	rd.SetMaxBody(0)
	r.connect(newLink(r, conn, rd, rx))
	r.node.Step(h)
	r.drain()
	r.mu.Unlock()
}

// refuse sends a refusal and closes conn.
func refuse(conn net.Conn, reason wire.RefuseReason, text string) {
	_ = conn.SetWriteDeadline(time.Now().Add(time.Second))
	_, _ = conn.Write(wire.Marshal(wire.Refuse{Reason: reason, Text: text}))
	conn.Close()
}
