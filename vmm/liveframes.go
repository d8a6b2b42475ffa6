package vmm

import (
	"sync"

	"github.com/ftkvm/ftkvm/devices"
)

// Frames for a LiveEnv: each network interface's host side (a tap) is read
// by a goroutine that only queues frames; the environment delivers them
// into the machine (Target.ReceiveFrame) at its delivery points, on the
// vCPU thread. The queue is bounded: when LiveFramesQueued frames wait,
// further ones are dropped and counted.

// LiveFramesQueued bounds the frames a LiveEnv holds for delivery.
const LiveFramesQueued = 64

// FrameReader is a network interface's host side: each Read returns one
// frame (a tap device does).
type FrameReader interface {
	Read(frame []byte) (int, error)
}

type liveFrame struct {
	nic int
	b   []byte // backed by a buffer of devices.NetMaxFrame bytes
}

type liveFrames struct {
	mu      sync.Mutex
	queue   []liveFrame
	free    [][]byte
	dropped uint64
	sources []frameSource
}

type frameSource struct {
	nic   int
	r     FrameReader
	onErr func(error)
}

// AddFrameSource has the environment read frames for network interface nic
// from r once it starts. When a Read fails the source ends and onErr (if
// not nil) hears why, unless the environment was stopping. Call it before
// Start.
func (e *LiveEnv) AddFrameSource(nic int, r FrameReader, onErr func(error)) {
	e.frames.sources = append(e.frames.sources, frameSource{nic, r, onErr})
}

// FramesDropped counts the frames dropped because LiveFramesQueued were
// already waiting for delivery.
func (e *LiveEnv) FramesDropped() uint64 {
	e.frames.mu.Lock()
	defer e.frames.mu.Unlock()
	return e.frames.dropped
}

func (e *LiveEnv) startFrames() {
	for _, s := range e.frames.sources {
		go e.readFrames(s)
	}
}

// readFrames queues the frames of one source.
func (e *LiveEnv) readFrames(s frameSource) {
	buf := make([]byte, devices.NetMaxFrame+1) // one more: an oversized frame shows as such
	f := &e.frames
	for {
		n, err := s.r.Read(buf)
		select {
		case <-e.done:
			return
		default:
		}
		if err != nil {
			if s.onErr != nil {
				s.onErr(err)
			}
			return
		}
		f.mu.Lock()
		if len(f.queue) >= LiveFramesQueued {
			f.dropped++
			f.mu.Unlock()
			continue
		}
		var b []byte
		if k := len(f.free); k > 0 {
			b, f.free = f.free[k-1], f.free[:k-1]
		} else {
			b = make([]byte, devices.NetMaxFrame+1)
		}
		f.queue = append(f.queue, liveFrame{s.nic, b[:copy(b, buf[:n])]})
		e.hasFrames.Store(true)
		f.mu.Unlock()
		select {
		case e.inReady <- struct{}{}:
		default:
		}
		e.kick()
	}
}

// deliverFrames hands every queued frame to the machine.
func (e *LiveEnv) deliverFrames(t Target) {
	f := &e.frames
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, fr := range f.queue {
		t.ReceiveFrame(fr.nic, fr.b)
		f.free = append(f.free, fr.b[:cap(fr.b)])
	}
	f.queue = f.queue[:0]
	e.hasFrames.Store(false)
}
