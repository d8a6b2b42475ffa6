package driver

// Replication lag and output hold times, for metrics (ftkvm's --metrics,
// docs/METRICS.md).
//
// Locking: lagLog lives under r.mu and is fed where the driver already
// holds it (drain hands a record to the link, the reader steps a message);
// it reads no clock, taking the ticker's last time (tickAt), and never
// allocates. holdHist is atomics only, fed by the performer.

import (
	"sync/atomic"
	"time"

	"github.com/ftkvm/ftkvm/ft"
	"github.com/ftkvm/ftkvm/ft/wire"
)

// lagSlots bounds the lag log: records handed out in the same tick share
// a slot, and once the slots are full the newest slot takes the rest, so
// the oldest record's age stays exact (to the tick) and the bytes exact to
// the records of one slot.
const lagSlots = 1024

type lagSlot struct {
	seq uint64 // the last log sequence number in the slot
	end int64  // the stream's byte count after it
	at  int64  // the tick of the first record in the slot (driver clock, ns)
}

// lagLog follows log records from where they leave one side to where the
// other side is done with them: on the primary, handed to the link until
// acknowledged; on a backup, received until replayed.
type lagLog struct {
	slots     [lagSlots]lagSlot
	head, n   int
	total     int64 // bytes of the stream so far (primary: log frames; backup: bytes received)
	doneBytes int64 // the stream's byte count after the last record done with
}

// reset starts a new link's log (sequence numbers start again at 1); base
// is the stream's byte count at its start.
func (l *lagLog) reset(base int64) {
	l.head, l.n, l.total, l.doneBytes = 0, 0, base, base
}

// push notes record seq, after which the stream has end bytes, at tick at.
func (l *lagLog) push(seq uint64, end, at int64) {
	l.total = end
	if l.n > 0 {
		last := &l.slots[(l.head+l.n-1)%lagSlots]
		if last.at == at || l.n == lagSlots {
			last.seq, last.end = seq, end
			return
		}
	}
	l.slots[(l.head+l.n)%lagSlots] = lagSlot{seq: seq, end: end, at: at}
	l.n++
}

// done: every record up to seq is acknowledged (or replayed).
func (l *lagLog) done(seq uint64) {
	for l.n > 0 && l.slots[l.head].seq <= seq {
		l.doneBytes = l.slots[l.head].end
		l.head = (l.head + 1) % lagSlots
		l.n--
	}
}

// pending is the bytes not done with, and the tick of the oldest record
// not done with (ok false: none).
func (l *lagLog) pending() (bytes, oldest int64, ok bool) {
	if l.n == 0 {
		// Nothing is pending: what arrived after the last record
		// (heartbeats, confirmations) is no lag.
		l.doneBytes = l.total
		return 0, 0, false
	}
	return l.total - l.doneBytes, l.slots[l.head].at, true
}

// recordSeq is the log sequence number of a log record (0: not a record).
func recordSeq(m wire.Msg) uint64 {
	switch m := m.(type) {
	case wire.Record:
		return m.Seq
	case wire.EpochEnd:
		return m.Seq
	case wire.Output:
		return m.Seq
	case wire.Checkpoint:
		return m.Seq
	case wire.Goodbye:
		return m.Seq
	}
	return 0
}

// HoldBuckets are the upper bounds (seconds) of the output hold-time
// histogram: 50 µs to about 6.5 s, doubling.
var HoldBuckets = func() []float64 {
	b := make([]float64, 18)
	for i := range b {
		b[i] = 50e-6 * float64(uint64(1)<<i)
	}
	return b
}()

// holdHist counts outputs by how long they were held.
type holdHist struct {
	counts [19]atomic.Uint64 // by bucket of HoldBuckets, the last for above them all
	sumNs  atomic.Int64
}

func (h *holdHist) observe(ns int64) {
	ns = max(ns, 0)
	h.sumNs.Add(ns)
	s := float64(ns) / 1e9
	i := 0
	for i < len(HoldBuckets) && s > HoldBuckets[i] {
		i++
	}
	h.counts[i].Add(1)
}

// Holds is the output hold-time histogram: Counts[i] outputs were held
// at most HoldBuckets[i] (cumulative, as Prometheus has it), Count in
// all, Sum seconds in all.
type Holds struct {
	Counts []uint64
	Count  uint64
	Sum    float64
}

// Lag is how far one side of the log is behind the other: on a primary,
// the log records handed to the link and not acknowledged by the backup;
// on a backup (and a promoted backup still replaying), the records
// received and not replayed, and the bytes received after the last one
// replayed (frames still arriving included). Age is how long ago the
// oldest of those records was sent (received), to the driver's tick (a
// millisecond); zero when there is none. A primary without a link has
// none.
type Lag struct {
	Records int
	Bytes   int64
	Age     time.Duration
}

// Metrics is a consistent view of the replica for --metrics: its status,
// its lag and its output hold times, read under one lock.
type Metrics struct {
	Status ft.Status
	Lag    Lag
	Holds  Holds
}

// Metrics reads the replica's metrics. Any goroutine.
func (r *Replica) Metrics() Metrics {
	r.mu.Lock()
	defer r.mu.Unlock()
	st := r.node.Status()
	m := Metrics{Status: st, Lag: r.lagLocked(st)}
	var cum uint64
	m.Holds.Counts = make([]uint64, len(HoldBuckets))
	for i := range HoldBuckets {
		cum += r.holds.counts[i].Load()
		m.Holds.Counts[i] = cum
	}
	m.Holds.Count = cum + r.holds.counts[len(HoldBuckets)].Load()
	m.Holds.Sum = float64(r.holds.sumNs.Load()) / 1e9
	return m
}

// lagLocked computes the lag (r.mu held).
func (r *Replica) lagLocked(st ft.Status) Lag {
	var lag Lag
	switch {
	case st.Role == ft.RoleBackup || st.Replaying:
		r.lag.done(st.LogReceived - uint64(st.Backlog))
		if r.link != nil {
			r.lag.total = max(r.lag.total, r.link.rx.Load())
		}
		lag.Records = st.Backlog
	case st.Link:
		lag.Records = int(st.LogSent - min(st.LogAcked, st.LogSent))
	default:
		return lag
	}
	b, at, ok := r.lag.pending()
	lag.Bytes = b
	if ok {
		lag.Age = time.Duration(max(0, r.clock()-at))
	}
	return lag
}
