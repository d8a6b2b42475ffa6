package migrate

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
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

// Receive accepts one connection on l and serves one migration on it (see
// Serve). The listener is left open.
func Receive(l net.Listener, build Build, progress func(int64)) (Target, *snapshot.State, net.Addr, error) {
	conn, err := l.Accept()
	if err != nil {
		return nil, nil, nil, err
	}
	defer conn.Close()
	t, st, err := Serve(conn, build, progress)
	return t, st, conn.RemoteAddr(), err
}

// Serve is the destination's side of one migration on conn. It returns the
// target installed and committed: the caller runs it at once. On any
// failure it closes what it built and returns an error; it tells the
// source why when it can.
func Serve(conn io.ReadWriter, build Build, progress func(int64)) (Target, *snapshot.State, error) {
	fr := snapshot.NewReader(bufio.NewReaderSize(conn, 1<<20))
	fw := snapshot.NewWriter(conn)
	tell := func(err error) error {
		_ = fw.WriteFrame(snapshot.FrameError, snapshot.EncodeError(nil, err.Error()))
		return err
	}
	t, p, err := fr.Next()
	if err == io.EOF {
		return nil, nil, errors.New("connection closed before the migration began")
	}
	if err != nil {
		return nil, nil, err
	}
	if t != snapshot.FrameHeader {
		return nil, nil, tell(fmt.Errorf("migration starts with a %v frame: %w", t, snapshot.ErrCorrupt))
	}
	hello, err := snapshot.DecodeHeader(p)
	if err != nil {
		return nil, nil, tell(err)
	}
	if hello.Kind != snapshot.KindMigration {
		return nil, nil, tell(fmt.Errorf("a %v stream where a migration was expected: %w", hello.Kind, snapshot.ErrCorrupt))
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
	t, _, err = fr.Next()
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
