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
	q       []queued
	qBytes  int        // bytes of frames in q
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

// queued is a frame to send, or a message the writer encodes first.
type queued struct {
	frame []byte
	msg   wire.Msg
}

func (l *link) send(frame []byte) { l.enqueue(queued{frame: frame}) }

// sendLater queues m to be encoded by the writer goroutine: a checkpoint
// (a full one is the guest's whole memory) is copied and checksummed
// there, without the replica's lock, which the heartbeats need.
func (l *link) sendLater(m wire.Msg) { l.enqueue(queued{msg: m}) }

func (l *link) enqueue(q queued) {
	l.mu.Lock()
	if !l.closing {
		l.q = append(l.q, q)
		l.qBytes += len(q.frame)
		l.cond.Signal()
	}
	l.mu.Unlock()
}

// linkPiece is how much of a large frame the writer encodes and sends at
// a time (wire.WriteFrame).
const linkPiece = 256 << 10

// write sends a batch: encoded frames together, each message the writer
// encodes (a checkpoint) as a stream of pieces, so that the peer sees
// bytes arrive all along a large one. It notes the messages it encoded
// in the replica profile (their time: encoding and writing, which
// overlap).
func (l *link) write(batch []queued) error {
	var bufs net.Buffers
	flush := func() error {
		if len(bufs) == 0 {
			return nil
		}
		t := time.Now()
		n, err := bufs.WriteTo(l.conn)
		l.wrote(n, t)
		bufs = nil
		return err
	}
	for _, q := range batch {
		if q.msg == nil {
			bufs = append(bufs, q.frame)
			continue
		}
		if err := flush(); err != nil {
			return err
		}
		t := time.Now()
		n, err := wire.WriteFrame(l.conn, q.msg, linkPiece)
		l.wrote(n, t)
		l.r.mu.Lock()
		l.r.prof.sentMsg(q.msg, int(n), t)
		l.r.mu.Unlock()
		if err != nil {
			return err
		}
	}
	return flush()
}

// wrote counts a socket write that began at t.
func (l *link) wrote(n int64, t time.Time) {
	l.r.linkBytes.Add(n)
	l.r.prof.writes.Add(1)
	l.r.prof.writeNs.Add(int64(time.Since(t)))
	l.r.prof.writeBytes.Add(n)
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
	l.q = append(l.q, queued{frame: frame})
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
			if err := l.write(batch); err != nil {
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
