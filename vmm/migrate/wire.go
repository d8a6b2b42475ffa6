package migrate

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"sync/atomic"
	"time"

	"github.com/ftkvm/ftkvm/vmm"
	"github.com/ftkvm/ftkvm/vmm/snapshot"
)

// The live-migration protocol, over one TCP connection, in frames of
// package snapshot (each with its length, type, version and CRC32C):
//
//	source                          destination
//	header (kind migration)  --->   builds an empty machine
//	                         <---   ready (or error)
//	stream: header, pages... (pre-copy rounds while the guest runs),
//	  the last pages and the state (guest paused), end
//	                         --->   verifies the whole stream, installs
//	                         <---   installed (or error)
//	marks itself stopped for good
//	commit                   --->
//	                         <---   started; runs the guest
//	exits
//
// Neither side runs a half-installed guest: the destination installs only
// a stream that verified to its end frame, and runs it only after the
// commit; the source sends the commit only after the destination confirmed
// the installation, and never runs the guest after sending it. Until the
// commit, any failure (the destination dying, refusing, a timeout) leaves
// the guest running on the source. A destination that dies after
// confirming and before receiving the commit loses the guest, which is
// then running nowhere; Send reports that case as uncertain rather than
// risk two running copies.

// Timeouts of the protocol's waits. The stream itself has none: TCP
// keep-alive notices a peer that went away.
var (
	DialTimeout = 10 * time.Second
	AckTimeout  = 60 * time.Second // for ready and installed (the destination loads and verifies)
)

// ErrUncertain is returned by Send when the destination confirmed the
// installation but not that it started the guest. The guest is not running
// on the source, and may or may not be running on the destination.
var ErrUncertain = errors.New("migration outcome uncertain")

// Send migrates m live to the ftkvm receiving at addr. On success the
// guest has been stopped here (m's Run returns an error wrapping
// vmm.ErrStopped) and runs at the destination. On any other error the
// guest keeps running here.
func Send(m *vmm.Machine, addr string, opts Options) (res Result, err error) {
	start := time.Now()
	conn, err := net.DialTimeout("tcp", addr, DialTimeout)
	if err != nil {
		return res, err
	}
	defer conn.Close()
	fr := snapshot.NewReader(bufio.NewReader(conn))
	fw := snapshot.NewWriter(conn)

	hello := snapshot.Header{Version: snapshot.Version, Kind: snapshot.KindMigration, MemSize: m.MemSize(), Created: start.UnixNano()}
	if err := fw.WriteFrame(snapshot.FrameHeader, snapshot.EncodeHeader(nil, &hello)); err != nil {
		return res, err
	}
	if err := expect(conn, fr, snapshot.FrameReady, AckTimeout); err != nil {
		return res, fmt.Errorf("destination not ready: %w", err)
	}

	opts.Kind = snapshot.KindMigration
	opts.Live = true
	res, err = Save(m, conn, opts)
	if errors.Is(err, vmm.ErrNotRunning) {
		return res, fmt.Errorf("the guest stopped (%s) before the migration completed", m.StopReason())
	}
	if err != nil {
		// The destination may have said why it gave up.
		if rerr := peerError(conn, fr); rerr != nil {
			err = rerr
		} else if transportError(err) {
			err = fmt.Errorf("the destination went away mid-migration: %w", err)
		}
		return res, err
	}
	res.Bytes += fw.Written()
	// The guest is paused. From here on a failure must resume it.
	if err := expect(conn, fr, snapshot.FrameInstalled, AckTimeout); err != nil {
		_ = m.Resume()
		return res, fmt.Errorf("destination did not install the guest: %w", err)
	}
	res.Pause = time.Since(res.PausedAt)
	// Commit: never run the guest here again, then tell the destination.
	if err := m.Do(func(m *vmm.Machine) error { m.Stop("guest handed over to " + addr); return nil }); err != nil {
		_ = m.Resume()
		return res, err
	}
	defer m.Resume()
	res.Total = time.Since(start)
	err = fw.WriteFrame(snapshot.FrameCommit, nil)
	if err == nil {
		err = expect(conn, fr, snapshot.FrameStarted, AckTimeout)
	}
	if err != nil {
		err = fmt.Errorf("%w: the destination confirmed the state but not that it started (%v); the guest is not running here", ErrUncertain, err)
		_ = m.Do(func(m *vmm.Machine) error { m.Fail(err); return nil })
		return res, err
	}
	_ = m.Do(func(m *vmm.Machine) error { m.Stop("guest migrated to " + addr); return nil })
	return res, nil
}

// expect reads one frame, which must be of type want.
func expect(conn net.Conn, fr *snapshot.Reader, want snapshot.FrameType, timeout time.Duration) error {
	conn.SetReadDeadline(time.Now().Add(timeout))
	defer conn.SetReadDeadline(time.Time{})
	t, p, err := fr.Next()
	if err == io.EOF {
		return errors.New("connection closed")
	}
	if err != nil {
		return err
	}
	switch t {
	case want:
		return nil
	case snapshot.FrameError:
		return &snapshot.RemoteError{Msg: snapshot.DecodeError(p)}
	}
	return fmt.Errorf("got a %v frame, want %v: %w", t, want, snapshot.ErrCorrupt)
}

// peerError returns the error frame the peer sent, if one is waiting.
func peerError(conn net.Conn, fr *snapshot.Reader) error {
	conn.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
	defer conn.SetReadDeadline(time.Time{})
	t, p, err := fr.Next()
	if err == nil && t == snapshot.FrameError {
		return &snapshot.RemoteError{Msg: snapshot.DecodeError(p)}
	}
	return nil
}

// ReceiveOptions configure Receive.
type ReceiveOptions struct {
	// HelloTimeout is how long a connection has to send a migration's
	// hello (default 10 s). A source sends it as soon as it connects.
	HelloTimeout time.Duration
	// Stranger, if set, is told of every connection that was not a
	// migration (from, and why), after it was closed.
	Stranger func(from net.Addr, err error)
}

// maxGreeting is how many connections may be sending their hello at once;
// more are closed at once.
const maxGreeting = 16

// A greeted connection: one that began with a migration's hello.
type greeted struct {
	conn  net.Conn
	fr    *snapshot.Reader
	fw    *snapshot.Writer
	hello snapshot.Header
}

// Receive waits on l for a migration and serves it (see Serve). Only a
// connection whose first frame is a migration's hello, within
// HelloTimeout, begins one; any other is a stranger (a port scanner, a
// health check, random bytes, a snapshot file's stream): it is told why
// where it can be, closed, reported to Stranger, and Receive goes on
// waiting. Connections arriving while a migration is served are refused as
// busy. A migration that began and then fails ends Receive with its error:
// the source keeps its guest. Receive returns when l's Accept fails (l
// closed, or its deadline passed) before a migration began. The listener
// is left open.
func Receive(l net.Listener, build Build, progress func(int64), opts ReceiveOptions) (Target, *snapshot.State, net.Addr, error) {
	if opts.HelloTimeout <= 0 {
		opts.HelloTimeout = 10 * time.Second
	}
	var busy atomic.Bool
	chosen := make(chan greeted, 1)
	acceptErr := make(chan error, 1)
	go func() {
		slots := make(chan struct{}, maxGreeting)
		for {
			conn, err := l.Accept()
			if err != nil {
				acceptErr <- err
				return
			}
			select {
			case slots <- struct{}{}:
			default:
				conn.Close()
				if opts.Stranger != nil {
					opts.Stranger(conn.RemoteAddr(), fmt.Errorf("closed: %d other connections are sending their hello", maxGreeting))
				}
				continue
			}
			go func() {
				defer func() { <-slots }()
				g, err := greet(conn, opts.HelloTimeout, &busy)
				if err != nil {
					conn.Close()
					if opts.Stranger != nil {
						opts.Stranger(conn.RemoteAddr(), err)
					}
					return
				}
				chosen <- g
			}()
		}
	}()
	var g greeted
	select {
	case g = <-chosen:
	case err := <-acceptErr:
		select {
		case g = <-chosen:
		default:
			return nil, nil, nil, err
		}
	}
	defer g.conn.Close()
	t, st, err := serveGreeted(g.fr, g.fw, g.hello, build, progress)
	return t, st, g.conn.RemoteAddr(), err
}

// greet reads a connection's hello. It takes the migration slot (busy)
// for a valid one; a second valid one while the slot is taken is refused.
func greet(conn net.Conn, timeout time.Duration, busy *atomic.Bool) (greeted, error) {
	fr := snapshot.NewReader(bufio.NewReaderSize(conn, 1<<20))
	fw := snapshot.NewWriter(conn)
	_ = conn.SetReadDeadline(time.Now().Add(timeout))
	hello, err := readHello(fr, fw)
	_ = conn.SetReadDeadline(time.Time{})
	if err != nil {
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			err = fmt.Errorf("no migration hello within %v", timeout)
		}
		return greeted{}, err
	}
	if !busy.CompareAndSwap(false, true) {
		err := errors.New("busy: a migration is under way")
		_ = conn.SetWriteDeadline(time.Now().Add(time.Second))
		_ = fw.WriteFrame(snapshot.FrameError, snapshot.EncodeError(nil, err.Error()))
		return greeted{}, err
	}
	return greeted{conn: conn, fr: fr, fw: fw, hello: hello}, nil
}

// readHello reads the first frame, which must be a migration's header,
// and tells the peer why not if it can.
func readHello(fr *snapshot.Reader, fw *snapshot.Writer) (snapshot.Header, error) {
	tell := func(err error) error {
		_ = fw.WriteFrame(snapshot.FrameError, snapshot.EncodeError(nil, err.Error()))
		return err
	}
	t, p, err := fr.Next()
	if err == io.EOF {
		return snapshot.Header{}, errors.New("connection closed before the migration began")
	}
	if err != nil {
		var ne net.Error
		if errors.As(err, &ne) {
			return snapshot.Header{}, err
		}
		return snapshot.Header{}, tell(err)
	}
	if t != snapshot.FrameHeader {
		return snapshot.Header{}, tell(fmt.Errorf("migration starts with a %v frame: %w", t, snapshot.ErrCorrupt))
	}
	hello, err := snapshot.DecodeHeader(p)
	if err != nil {
		return snapshot.Header{}, tell(err)
	}
	if hello.Kind != snapshot.KindMigration {
		return snapshot.Header{}, tell(fmt.Errorf("a %v stream where a migration was expected: %w", hello.Kind, snapshot.ErrCorrupt))
	}
	return hello, nil
}

// Serve is the destination's side of one migration on conn. It returns the
// target installed and committed: the caller runs it at once. On any
// failure it closes what it built and returns an error; it tells the
// source why when it can.
func Serve(conn io.ReadWriter, build Build, progress func(int64)) (Target, *snapshot.State, error) {
	fr := snapshot.NewReader(bufio.NewReaderSize(conn, 1<<20))
	fw := snapshot.NewWriter(conn)
	hello, err := readHello(fr, fw)
	if err != nil {
		return nil, nil, err
	}
	return serveGreeted(fr, fw, hello, build, progress)
}

// serveGreeted serves a migration whose hello was read.
func serveGreeted(fr *snapshot.Reader, fw *snapshot.Writer, hello snapshot.Header, build Build, progress func(int64)) (Target, *snapshot.State, error) {
	tell := func(err error) error {
		_ = fw.WriteFrame(snapshot.FrameError, snapshot.EncodeError(nil, err.Error()))
		return err
	}
	target, err := build(hello)
	if err != nil {
		return nil, nil, tell(err)
	}
	if err := fw.WriteFrame(snapshot.FrameReady, nil); err != nil {
		target.Close()
		return nil, nil, err
	}
	built := false
	loaded, st, err := load(fr, func(h snapshot.Header) (Target, error) {
		if h.MemSize != hello.MemSize || built {
			return nil, fmt.Errorf("stream header does not match the hello: %w", snapshot.ErrCorrupt)
		}
		built = true
		return target, nil
	}, progress, &hello)
	if err != nil {
		if !built {
			target.Close()
		}
		var re *snapshot.RemoteError
		switch {
		case errors.As(err, &re):
			return nil, nil, fmt.Errorf("the source gave up: %s", re.Msg)
		case transportError(err):
			return nil, nil, fmt.Errorf("the source went away mid-migration (after %d bytes): %w", fr.Read(), err)
		}
		return nil, nil, tell(err)
	}
	target = loaded
	if err := fw.WriteFrame(snapshot.FrameInstalled, nil); err != nil {
		target.Close()
		return nil, nil, fmt.Errorf("confirming the installation: %w", err)
	}
	t, _, err := fr.Next()
	if err != nil || t != snapshot.FrameCommit {
		target.Close()
		if err == nil {
			err = fmt.Errorf("got a %v frame: %w", t, snapshot.ErrCorrupt)
		} else if err == io.EOF {
			err = errors.New("connection closed")
		}
		return nil, nil, fmt.Errorf("the source did not commit the migration: %w", err)
	}
	_ = fw.WriteFrame(snapshot.FrameStarted, nil)
	return target, st, nil
}

// transportError tells a connection that failed from content that did not
// verify.
func transportError(err error) bool {
	var op *net.OpError
	return errors.Is(err, snapshot.ErrTruncated) || errors.Is(err, io.ErrUnexpectedEOF) ||
		errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed) || errors.As(err, &op)
}
