package driver

import (
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ftkvm/ftkvm/ft"
	"github.com/ftkvm/ftkvm/ft/wire"
)

// link is one TCP connection to the peer. Frames queue without bound
// under the replica's lock and a writer goroutine sends them, so the
// vCPU never blocks on the network; the node's acknowledgements and
// timeouts are what bound the log.
type link struct {
	r    *Replica
	conn net.Conn

	mu      sync.Mutex
	cond    *sync.Cond
	q       [][]byte
	qBytes  int        // bytes in q
	space   *sync.Cond // broadcast when the writer takes q, or at closing
	closing bool       // close after the queue is sent

	rd     *wire.Reader  // the peer's frames, from the first after the handshake's
	rx     *atomic.Int64 // bytes received
	rxSeen int64         // rx at the last tick (replica's mu)
}

// countingReader counts the bytes a link receives, so that a frame still
// arriving (a full checkpoint of a big guest) counts as a sign of life.
type countingReader struct {
	r io.Reader
	n *atomic.Int64
}

func (c countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n.Add(int64(n))
	return n, err
}

// newLink makes conn a link. rd and rx, if set, are the reader that
// already read the peer's hello (the backup's greeting) and its count.
func newLink(r *Replica, conn net.Conn, rd *wire.Reader, rx *atomic.Int64) *link {
	if rd == nil {
		rx = new(atomic.Int64)
		rd = wire.NewReader(countingReader{conn, rx}, 0)
	}
	l := &link{r: r, conn: conn, rd: rd, rx: rx}
	l.cond = sync.NewCond(&l.mu)
	l.space = sync.NewCond(&l.mu)
	return l
}

func (l *link) send(frame []byte) {
	l.mu.Lock()
	if !l.closing {
		l.q = append(l.q, frame)
		l.qBytes += len(frame)
		l.cond.Signal()
	}
	l.mu.Unlock()
}

// sendBounded queues frame once fewer than limit bytes are queued, and
// reports false if the link closes first. It blocks: never call it with
// the replica's lock held.
func (l *link) sendBounded(frame []byte, limit int) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	for l.qBytes >= limit && !l.closing {
		l.space.Wait()
	}
	if l.closing {
		return false
	}
	l.q = append(l.q, frame)
	l.qBytes += len(frame)
	l.cond.Signal()
	return true
}

// closeAfterSend closes the connection once what is queued is sent (a
// refusal, say), or after a second if the peer does not take it.
func (l *link) closeAfterSend() {
	l.mu.Lock()
	if !l.closing {
		l.closing = true
		_ = l.conn.SetWriteDeadline(time.Now().Add(time.Second))
		l.cond.Signal()
		l.space.Broadcast()
	}
	l.mu.Unlock()
}

func (l *link) writer() {
	defer l.conn.Close()
	for {
		l.mu.Lock()
		for len(l.q) == 0 && !l.closing {
			l.cond.Wait()
		}
		batch, closing := l.q, l.closing
		l.q, l.qBytes = nil, 0
		l.space.Broadcast()
		l.mu.Unlock()
		if len(batch) > 0 {
			bufs := net.Buffers(batch)
			t := time.Now()
			n, err := bufs.WriteTo(l.conn)
			l.r.linkBytes.Add(n)
			l.r.prof.writes.Add(1)
			l.r.prof.writeNs.Add(int64(time.Since(t)))
			l.r.prof.writeBytes.Add(n)
			if err != nil {
				l.broken()
				return
			}
			continue
		}
		if closing {
			return
		}
	}
}

func (l *link) reader() {
	for {
		m, err := l.rd.Read()
		r := l.r
		r.mu.Lock()
		if r.link != l {
			r.mu.Unlock()
			l.conn.Close()
			return
		}
		if err != nil {
			r.log.Debugf("replica: link: %v", err)
			select {
			case <-r.linkUp:
			default:
				// Closed before any handshake succeeded: the command
				// waiting for its peer (WaitLink) fails now, saying so.
				if r.refused == nil {
					r.refused = fmt.Errorf("%w: the peer closed the connection before its hello (not an ftkvm replica, or one with other TLS settings?): %v", ft.ErrRefused, err)
				}
			}
			r.link = nil
			r.node.Disconnected()
			r.drain()
			r.mu.Unlock()
			l.closeAfterSend()
			return
		}
		if r.trace {
			r.log.Tracef("replica: received %v %+v", m.Type(), m)
		}
		r.prof.recvMsg(m)
		r.node.Step(m)
		if d, ok := m.(wire.DiskData); ok && r.node.TakesDisks() {
			r.takeDisk(d)
		}
		if a, ok := m.(wire.Ack); ok {
			r.lag.done(a.Seq)
		} else if seq := recordSeq(m); seq > 0 && r.node.Role() == ft.RoleBackup {
			r.lag.push(seq, l.rx.Load(), r.tickAt)
			st := r.node.Status()
			r.lag.done(st.LogReceived - uint64(st.Backlog))
		}
		r.drain()
		r.mu.Unlock()
	}
}

// broken: a write failed; the peer is gone.
func (l *link) broken() {
	r := l.r
	r.mu.Lock()
	if r.link == l {
		r.link = nil
		r.node.Disconnected()
		r.drain()
	}
	r.mu.Unlock()
	l.mu.Lock()
	l.closing = true
	l.q, l.qBytes = nil, 0
	l.space.Broadcast()
	l.mu.Unlock()
}
