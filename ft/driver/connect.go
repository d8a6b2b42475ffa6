package driver

// Links: taking a connection as the link (Connect, Dial), waiting for the
// handshake (WaitLink) and re-protection (Protect).
//
// Locking: r.mu guards r.link and the node; dialing and TLS handshakes
// run without it, so the vCPU and the ticker go on while a peer is slow.

import (
	"errors"
	"fmt"
	"net"
	"time"

	"github.com/ftkvm/ftkvm/ft"
	"github.com/ftkvm/ftkvm/ft/secure"
	"github.com/ftkvm/ftkvm/ft/wire"
)

// Connect makes conn the replica's link: the node says hello. It fails if
// a link is up.
func (r *Replica) Connect(conn net.Conn) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.link != nil {
		return errors.New("replica: a link is up already")
	}
	if r.diskCopy {
		// The checkpoint that ends the transfer would go to this link.
		return errors.New("replica: the disk images are being sent to a backup whose link closed; try again")
	}
	r.connect(newLink(r, conn, nil, nil))
	r.drain()
	return nil
}

// connect makes l the link and says hello (r.mu held, no link up).
func (r *Replica) connect(l *link) {
	r.link = l
	var base int64 // a backup's lag counts the bytes it received, from here
	if r.node.Role() == ft.RoleBackup {
		base = l.rx.Load()
	}
	r.lag.reset(base)
	r.diskRx, r.diskErr = nil, nil // a joining backup's images arrive again
	r.node.Connected()
	go l.writer()
	go l.reader()
}

// Dial connects to a backup at addr (the primary's side), retrying for up
// to wait while nothing listens there yet.
func (r *Replica) Dial(addr string, wait time.Duration) error {
	deadline := time.Now().Add(wait)
	for {
		conn, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			setupTCP(conn)
			if r.opts.TLS != nil {
				if conn, err = secure.Client(conn, r.opts.TLS, 10*time.Second); err != nil {
					return fmt.Errorf("the backup at %s: %w", addr, err)
				}
			}
			return r.Connect(conn)
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("connect to the backup at %s: %w", addr, err)
		}
		select {
		case <-time.After(100 * time.Millisecond):
		case <-r.done:
			return fmt.Errorf("connect to the backup at %s: %w", addr, err)
		}
	}
}

// WaitLink waits until the handshake with a peer succeeded and returns
// the peer's hello, or the refusal.
func (r *Replica) WaitLink(timeout time.Duration) (wire.Hello, error) {
	var tc <-chan time.Time
	if timeout > 0 {
		t := time.NewTimer(timeout)
		defer t.Stop()
		tc = t.C
	}
	for {
		r.mu.Lock()
		refused, peer := r.refused, r.peer
		r.mu.Unlock()
		if refused != nil {
			return peer, refused
		}
		select {
		case <-r.linkUp:
			r.mu.Lock()
			defer r.mu.Unlock()
			return r.peer, nil
		case <-tc:
			return peer, errors.New("no handshake with the peer in time")
		case <-r.done:
			return peer, errors.New("replica closed")
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// Protect connects a running primary to a new backup at addr, which
// receives the guest's state and then replicates (ftkvm ctl protect).
func (r *Replica) Protect(addr string) error {
	r.mu.Lock()
	st := r.node.Status()
	busy := r.link != nil
	r.mu.Unlock()
	switch {
	case st.Claiming || st.Fenced:
		return errors.New("this replica lost its peer and waits for the witness (or was fenced): it cannot take a backup now")
	case st.Role != ft.RolePrimary:
		return errors.New("this replica is a backup: only the primary can be protected")
	case busy:
		return errors.New("this primary has a backup already")
	}
	return r.Dial(addr, 5*time.Second)
}

func setupTCP(conn net.Conn) {
	if tc, ok := conn.(*net.TCPConn); ok {
		_ = tc.SetNoDelay(true)
	}
}
