package snapshot

import (
	"bytes"
	"errors"
	"fmt"
	"io"
)

var zeroPage [PageSize]byte

// IsZero reports whether a page is all zero bytes.
func IsZero(page []byte) bool { return bytes.Equal(page, zeroPage[:]) }

// StreamWriter writes one stream: the header, pages, the state and the end
// frame. Pages are batched into frames; their contents are copied when they
// are added, so a page the guest changes afterwards is sent as it was.
type StreamWriter struct {
	w      *Writer
	start  uint64 // w.Frames() before the header
	pages  uint64 // page records
	pfns   []uint64
	data   []byte
	zeros  []uint64
	frame  []byte
	closed bool
}

// NewStreamWriter writes h (its Version is set) and returns the writer for
// the rest of the stream.
func NewStreamWriter(w *Writer, h Header) (*StreamWriter, error) {
	s := &StreamWriter{}
	if err := s.Reset(w, h); err != nil {
		return nil, err
	}
	return s, nil
}

// Reset starts a new stream on w with header h, reusing s's buffers.
func (s *StreamWriter) Reset(w *Writer, h Header) error {
	if err := CheckMemSize(h.MemSize); err != nil {
		return err
	}
	h.Version = Version
	s.w, s.start, s.pages, s.closed = w, w.Frames(), 0, false
	s.pfns, s.data, s.zeros = s.pfns[:0], s.data[:0], s.zeros[:0]
	s.frame = EncodeHeader(s.frame[:0], &h)
	return w.WriteFrame(FrameHeader, s.frame)
}

// Page adds guest page pfn with its current contents. A page of zeros is
// sent as a zero-page record, or skipped if skipZero (when the receiver's
// copy is known to be zero, as in a first full pass).
func (s *StreamWriter) Page(pfn uint64, page []byte, skipZero bool) error {
	if IsZero(page) {
		if skipZero {
			return nil
		}
		s.zeros = append(s.zeros, pfn)
		s.pages++
		if len(s.zeros) == MaxZeroPerFrame {
			return s.flushZeros()
		}
		return nil
	}
	s.pfns = append(s.pfns, pfn)
	s.data = append(s.data, page[:PageSize]...)
	s.pages++
	if len(s.pfns) == MaxPagesPerFrame {
		return s.flushPages()
	}
	return nil
}

func (s *StreamWriter) flushPages() error {
	if len(s.pfns) == 0 {
		return nil
	}
	p := le.AppendUint32(s.frame[:0], uint32(len(s.pfns)))
	for _, pfn := range s.pfns {
		p = le.AppendUint64(p, pfn)
	}
	err := s.w.WriteFrameParts(FramePages, p, s.data)
	s.pfns, s.data = s.pfns[:0], s.data[:0]
	return err
}

func (s *StreamWriter) flushZeros() error {
	if len(s.zeros) == 0 {
		return nil
	}
	p := le.AppendUint32(s.frame[:0], uint32(len(s.zeros)))
	for _, pfn := range s.zeros {
		p = le.AppendUint64(p, pfn)
	}
	s.zeros = s.zeros[:0]
	return s.w.WriteFrame(FrameZeroPages, p)
}

// Flush writes the pages batched so far.
func (s *StreamWriter) Flush() error {
	if err := s.flushPages(); err != nil {
		return err
	}
	return s.flushZeros()
}

// State writes the state frames.
func (s *StreamWriter) State(st *State) error {
	if err := s.Flush(); err != nil {
		return err
	}
	if err := s.w.WriteFrame(FrameCPUID, EncodeCPUID(s.frame[:0], st.CPUID)); err != nil {
		return err
	}
	if err := s.w.WriteFrame(FrameVCPU, EncodeVCPU(s.frame[:0], &st.VCPU)); err != nil {
		return err
	}
	if err := s.w.WriteFrame(FrameDevices, EncodeDevices(s.frame[:0], &st.Devices)); err != nil {
		return err
	}
	if err := s.w.WriteFrame(FrameDisks, EncodeDisks(s.frame[:0], st.Disks)); err != nil {
		return err
	}
	if err := s.w.WriteFrame(FrameNICs, EncodeNICs(s.frame[:0], st.NICs)); err != nil {
		return err
	}
	if err := s.w.WriteFrame(FrameMachine, EncodeMachine(s.frame[:0], &st.Machine)); err != nil {
		return err
	}
	return s.w.WriteFrame(FrameEnv, EncodeEnv(s.frame[:0], &st.Env))
}

// End flushes the pages and writes the end frame.
func (s *StreamWriter) End() error {
	if err := s.Flush(); err != nil {
		return err
	}
	e := End{Frames: s.w.Frames() - s.start, Pages: s.pages}
	s.closed = true
	return s.w.WriteFrame(FrameEnd, EncodeEnd(s.frame[:0], &e))
}

// PageRecords is the number of pages added so far (zero pages included,
// skipped ones not).
func (s *StreamWriter) PageRecords() uint64 { return s.pages }

// StreamReader applies one stream to guest memory and collects its state.
type StreamReader struct {
	r *Reader
	// Memory is called once, after the header, for the guest memory the
	// pages are written to; it must have h.MemSize bytes.
	Memory func(h Header) ([]byte, error)
	// Progress, if set, is called after each pages frame.
	Progress func(bytesRead int64)
	// Wrote, if set, is called with the number of each page whose
	// contents the stream changed (a page that already held them is left
	// alone and not reported).
	Wrote func(pfn uint64)
}

// NewStreamReader returns a reader of the stream r is positioned at.
func NewStreamReader(r *Reader, memory func(Header) ([]byte, error)) *StreamReader {
	return &StreamReader{r: r, Memory: memory}
}

// Read reads the stream up to and including its end frame, writing pages
// into memory as they come. It returns the state only when the whole stream
// verified: every frame's checksum, every required state frame present
// once, and the end frame's counts. On error the memory holds a partial
// image that must be discarded.
func (s *StreamReader) Read() (*State, error) {
	t, p, err := s.r.Next()
	if err == io.EOF {
		return nil, fmt.Errorf("input ends before the stream's header: %w", ErrTruncated)
	}
	if err != nil {
		return nil, err
	}
	if t != FrameHeader {
		return nil, fmt.Errorf("stream starts with a %v frame, not a header: %w", t, ErrCorrupt)
	}
	st := &State{}
	if st.Header, err = DecodeHeader(p); err != nil {
		return nil, err
	}
	mem, err := s.Memory(st.Header)
	if err != nil {
		return nil, err
	}
	if uint64(len(mem)) != st.Header.MemSize {
		return nil, fmt.Errorf("snapshot: memory of %d bytes for a %d-byte guest", len(mem), st.Header.MemSize)
	}
	memPages := st.Header.MemSize / PageSize
	frames, pages := uint64(1), uint64(0)
	seen := map[FrameType]bool{}
	for {
		t, p, err := s.r.Next()
		if err == io.EOF {
			return nil, fmt.Errorf("stream ends without its end frame (after %d frames): %w", frames, ErrTruncated)
		}
		if err != nil {
			return nil, err
		}
		switch t {
		case FramePages, FrameZeroPages:
			pg, err := DecodePages(p, t == FrameZeroPages, memPages)
			if err != nil {
				return nil, err
			}
			for i := 0; i < pg.N; i++ {
				dst := mem[pg.PFN(i)*PageSize:][:PageSize]
				switch {
				case s.Wrote == nil && t == FrameZeroPages:
					clear(dst)
				case s.Wrote == nil:
					copy(dst, pg.Data(i))
				case t == FrameZeroPages && !IsZero(dst):
					clear(dst)
					s.Wrote(pg.PFN(i))
				case t == FramePages && !bytes.Equal(dst, pg.Data(i)):
					copy(dst, pg.Data(i))
					s.Wrote(pg.PFN(i))
				}
			}
			pages += uint64(pg.N)
			if s.Progress != nil {
				s.Progress(s.r.Read())
			}
		case FrameCPUID, FrameVCPU, FrameDevices, FrameDisks, FrameNICs, FrameMachine, FrameEnv:
			if seen[t] {
				return nil, fmt.Errorf("second %v frame: %w", t, ErrCorrupt)
			}
			seen[t] = true
			switch t {
			case FrameCPUID:
				st.CPUID, err = DecodeCPUID(p)
			case FrameVCPU:
				err = DecodeVCPU(p, &st.VCPU)
			case FrameDevices:
				err = DecodeDevices(p, &st.Devices)
			case FrameDisks:
				st.Disks, err = DecodeDisks(p, st.Disks)
			case FrameNICs:
				st.NICs, err = DecodeNICs(p, st.NICs)
			case FrameMachine:
				err = DecodeMachine(p, &st.Machine)
			case FrameEnv:
				err = DecodeEnv(p, &st.Env)
			}
			if err != nil {
				return nil, err
			}
		case FrameEnd:
			e, err := DecodeEnd(p)
			if err != nil {
				return nil, err
			}
			if e.Frames != frames || e.Pages != pages {
				return nil, fmt.Errorf("end frame counts %d frames and %d pages, the stream had %d and %d: %w",
					e.Frames, e.Pages, frames, pages, ErrCorrupt)
			}
			for _, need := range []FrameType{FrameCPUID, FrameVCPU, FrameDevices, FrameDisks, FrameNICs, FrameMachine, FrameEnv} {
				if !seen[need] {
					return nil, fmt.Errorf("stream has no %v frame: %w", need, ErrCorrupt)
				}
			}
			return st, nil
		case FrameError:
			return nil, &RemoteError{Msg: DecodeError(p)}
		default:
			return nil, fmt.Errorf("unexpected %v frame in a stream: %w", t, ErrCorrupt)
		}
		frames++
	}
}

// RemoteError is an error frame received from the other side.
type RemoteError struct{ Msg string }

func (e *RemoteError) Error() string { return "the other side reported: " + e.Msg }

// WriteFile writes Magic to w and returns a frame writer for the stream.
func WriteFile(w io.Writer) (*Writer, error) {
	if _, err := io.WriteString(w, Magic); err != nil {
		return nil, err
	}
	fw := NewWriter(w)
	fw.written = int64(len(Magic))
	return fw, nil
}

// ErrNotSnapshot is returned by OpenFile for input without the magic.
var ErrNotSnapshot = errors.New("not an ftkvm snapshot")

// OpenFile checks Magic at the start of r and returns a frame reader for the
// stream that follows.
func OpenFile(r io.Reader) (*Reader, error) {
	var m [len(Magic)]byte
	n, err := io.ReadFull(r, m[:])
	if err != nil && err != io.EOF && err != io.ErrUnexpectedEOF {
		return nil, err
	}
	if string(m[:n]) != Magic {
		if string(m[:n]) == Magic[:n] {
			return nil, fmt.Errorf("%w: %d bytes, cut short: %w", ErrNotSnapshot, n, ErrTruncated)
		}
		return nil, ErrNotSnapshot
	}
	fr := NewReader(r)
	fr.read = int64(len(Magic))
	return fr, nil
}

// ReadFile reads a whole snapshot file (Magic, one stream, nothing after
// it), writing memory through memory. It is what `ftkvm restore` uses.
func ReadFile(r io.Reader, memory func(Header) ([]byte, error)) (*State, error) {
	fr, err := OpenFile(r)
	if err != nil {
		return nil, err
	}
	st, err := NewStreamReader(fr, memory).Read()
	if err != nil {
		return nil, err
	}
	if _, _, err := fr.Next(); err != io.EOF {
		if err == nil {
			err = fmt.Errorf("data after the end frame: %w", ErrCorrupt)
		}
		return nil, err
	}
	return st, nil
}
