package driver

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"slices"
	"sync"
	"time"

	"github.com/ftkvm/ftkvm/ft/wire"
)

// simLink is a real loopback TCP connection between two replicas, with a
// fault at one message: each side's frames are counted as its link writer
// sends them, and at side's frame number at the link is cut or that side
// dies, the frame arriving in part or not at all.
type simLink struct {
	mu     sync.Mutex
	tcp    [2]*net.TCPConn // the primary's end, the backup's end
	count  [2]int          // frames written by each side
	types  [2][]wire.Type  // their types, for failure reports
	fault  *simFault
	fired  chan struct{}  // closed when the fault fires
	dead   [2]bool        // that side's writes vanish; writes to it too
	silent bool           // the fault is not seen as a closed connection
	die    func(side int) // kill -9's instant: under mu
	stop   func(side int) // the rest: its vCPU told to stop
}

type faultKind int

const (
	killSender faultKind = iota + 1
	cutLink
)

func (k faultKind) String() string {
	return map[faultKind]string{killSender: "kill", cutLink: "cut"}[k]
}

// simFault: at side's at-th frame (1-based), kill the sender or cut the
// link; silent: the peer is not told by the connection's end and must
// notice the silence; partial: half the frame arrives.
type simFault struct {
	kind            faultKind
	side            int
	at              int
	silent, partial bool
}

func (f *simFault) String() string {
	if f == nil {
		return "no fault"
	}
	who := [2]string{"primary", "backup"}[f.side]
	s := fmt.Sprintf("%v at the %s's message %d", f.kind, who, f.at)
	if f.silent {
		s += " (silent)"
	}
	if f.partial {
		s += " (partial)"
	}
	return s
}

var errSimClosed = errors.New("sim: connection closed by a fault")

func (s *sim) newSimLink(fault *simFault, die, stop func(side int)) *simLink {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		s.fail("%v", err)
	}
	defer l.Close()
	var a net.Conn
	dialed := make(chan error, 1)
	go func() {
		var err error
		a, err = net.Dial("tcp", l.Addr().String())
		dialed <- err
	}()
	b, err := l.Accept()
	if err != nil {
		s.fail("%v", err)
	}
	if err := <-dialed; err != nil {
		s.fail("%v", err)
	}
	sl := &simLink{tcp: [2]*net.TCPConn{a.(*net.TCPConn), b.(*net.TCPConn)}, fault: fault, fired: make(chan struct{}), die: die, stop: stop}
	for _, c := range sl.tcp {
		_ = c.SetNoDelay(true)
	}
	s.cleanup = append(s.cleanup, func() {
		for _, c := range sl.tcp {
			c.Close()
		}
	})
	return sl
}

// end is side's net.Conn.
func (l *simLink) end(side int) net.Conn { return &simEnd{c: l.tcp[side], l: l, side: side} }

func (l *simLink) hasFired() bool {
	select {
	case <-l.fired:
		return true
	default:
		return false
	}
}

// firedAtHello: the fault hit a hello (every side's first frame), so the
// handshake cannot complete on the side that waits for it.
func (l *simLink) firedAtHello(side int) bool {
	return l.hasFired() && l.fault.at == 1 && l.fault.side == side
}

// simEnd wraps the socket without embedding it: an embedded *net.TCPConn
// would let net.Buffers write around Write.
type simEnd struct {
	c    *net.TCPConn
	l    *simLink
	side int
}

func (e *simEnd) Read(p []byte) (int, error) { return e.c.Read(p) }
func (e *simEnd) LocalAddr() net.Addr        { return e.c.LocalAddr() }
func (e *simEnd) RemoteAddr() net.Addr       { return e.c.RemoteAddr() }

// frames returns how many frames each side has written so far, and their
// types. A run's link writers can outlive it (a replica's writer goroutine
// finishing its last frame), hence the lock.
func (l *simLink) frames() ([2]int, [2][]wire.Type) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.count, [2][]wire.Type{slices.Clone(l.types[0]), slices.Clone(l.types[1])}
}

func (e *simEnd) SetDeadline(t time.Time) error      { return e.c.SetDeadline(t) }
func (e *simEnd) SetReadDeadline(t time.Time) error  { return e.c.SetReadDeadline(t) }
func (e *simEnd) SetWriteDeadline(t time.Time) error { return e.c.SetWriteDeadline(t) }

// Write sends whole frames (the link writer writes one frame per call:
// net.Buffers writes each buffer of a writer that is not a socket).
func (e *simEnd) Write(p []byte) (int, error) {
	l := e.l
	l.mu.Lock()
	n := 0
	for n < len(p) {
		rest := p[n:]
		size := len(rest)
		if len(rest) >= wire.HeaderSize {
			size = min(size, wire.HeaderSize+int(binary.LittleEndian.Uint32(rest[4:]))+wire.TrailerSize)
		}
		frame := rest[:size]
		if l.dead[e.side] || l.dead[1-e.side] || l.hasFired() && l.fault.kind == cutLink {
			l.mu.Unlock()
			if l.silent {
				return len(p), nil
			}
			return n, errSimClosed
		}
		l.count[e.side]++
		if len(frame) > 3 {
			l.types[e.side] = append(l.types[e.side], wire.Type(frame[3]))
		}
		if f := l.fault; f != nil && f.side == e.side && f.at == l.count[e.side] {
			if f.partial {
				_, _ = e.c.Write(frame[:len(frame)/2])
			}
			l.silent = f.silent
			close(l.fired)
			switch f.kind {
			case killSender:
				// Dead before the peer can see it: a replica that learns
				// of the end from the peer must find the killed one
				// unable to act (claim, perform).
				l.dead[e.side] = true
				l.die(e.side)
				if !f.silent {
					_ = e.c.CloseWrite()
				}
				l.mu.Unlock()
				l.stop(e.side)
				return len(p), nil
			case cutLink:
				if !f.silent {
					for _, c := range l.tcp {
						_ = c.CloseWrite()
					}
				}
				l.mu.Unlock()
				if f.silent {
					return len(p), nil
				}
				return n, errSimClosed
			}
		}
		if _, err := e.c.Write(frame); err != nil {
			l.mu.Unlock()
			return n, err
		}
		n += size
	}
	l.mu.Unlock()
	return n, nil
}

// Close: after a silent fault the connection stays open (the peer hears
// nothing, not even an end); the test closes it at its end.
func (e *simEnd) Close() error {
	l := e.l
	l.mu.Lock()
	silent := l.silent && l.hasFired()
	l.mu.Unlock()
	if silent {
		return nil
	}
	return e.c.Close()
}

// simListener hands the backup its end of the link once, as Serve's
// listener.
type simListener struct {
	c    chan net.Conn
	done chan struct{}
	once sync.Once
}

func newSimListener(c net.Conn) *simListener {
	l := &simListener{c: make(chan net.Conn, 1), done: make(chan struct{})}
	l.c <- c
	return l
}

func (l *simListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.c:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

func (l *simListener) Close() error   { l.once.Do(func() { close(l.done) }); return nil }
func (l *simListener) Addr() net.Addr { return &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)} }
