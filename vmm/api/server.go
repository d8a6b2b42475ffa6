package api

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ftkvm/ftkvm/vmm"
	"github.com/ftkvm/ftkvm/vmm/migrate"
)

// Server serves the control API of one machine.
type Server struct {
	m    *vmm.Machine
	path string
	l    net.Listener
	hs   *http.Server

	opMu       sync.Mutex // one transfer or state change at a time; guards userPaused
	userPaused bool
	op         atomic.Pointer[Operation]
	last       atomic.Pointer[Result]
	bytesSent  atomic.Int64
	replica    atomic.Pointer[replicaBox]
	tls        atomic.Pointer[tls.Config] // for outgoing migrations (SetTLS)
}

// SetTLS makes outgoing migrations use mutual TLS with cfg (package
// ft/secure).
func (s *Server) SetTLS(cfg *tls.Config) { s.tls.Store(cfg) }

// Replica is a fault-tolerant replica serving its status and protect
// requests through the API.
type Replica interface {
	ReplicaStatus() ReplicaStatus
	Protect(addr string) error
}

type replicaBox struct{ r Replica }

// SetReplica makes the server a replica's: status includes the replica's
// state, protect is served, and migration is refused (a replica moves by
// failover and re-protection).
func (s *Server) SetReplica(r Replica) { s.replica.Store(&replicaBox{r}) }

// Listen creates the socket at path for m's control API. A socket left
// behind by an ftkvm that is gone is replaced; one in use is an error.
func Listen(path string, m *vmm.Machine) (*Server, error) {
	if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
		c.Close()
		return nil, fmt.Errorf("control socket %s is in use by another ftkvm", path)
	}
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode()&os.ModeSocket == 0 {
			return nil, fmt.Errorf("control socket %s: exists and is not a socket", path)
		}
		os.Remove(path)
	}
	l, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("control socket: %w", err)
	}
	// The socket controls the guest (pause, snapshot, migrate): only its
	// owner may connect.
	if err := os.Chmod(path, 0o600); err != nil {
		l.Close()
		return nil, fmt.Errorf("control socket: %w", err)
	}
	s := &Server{m: m, path: path, l: l}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /vm", s.status)
	mux.HandleFunc("PATCH /vm", s.setState)
	mux.HandleFunc("PUT /snapshot/create", s.snapshot)
	mux.HandleFunc("PUT /migrate", s.migrate)
	mux.HandleFunc("PUT /protect", s.protect)
	s.hs = &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go s.hs.Serve(l)
	return s, nil
}

// Shutdown stops accepting requests, waits (up to timeout) for those under
// way, such as a migration reporting its result, and removes the socket.
func (s *Server) Shutdown(timeout time.Duration) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	_ = s.hs.Shutdown(ctx)
	os.Remove(s.path)
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(v)
}

func writeFault(w http.ResponseWriter, code int, format string, args ...any) {
	writeJSON(w, code, fault{Message: fmt.Sprintf(format, args...)})
}

// machineFault maps a machine error to an HTTP answer.
func machineFault(w http.ResponseWriter, err error) {
	if errors.Is(err, vmm.ErrNotRunning) {
		writeFault(w, http.StatusConflict, "%v", err)
		return
	}
	writeFault(w, http.StatusInternalServerError, "%v", err)
}

func decode(w http.ResponseWriter, r *http.Request, v any) bool {
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<16))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		writeFault(w, http.StatusBadRequest, "bad request body: %v", err)
		return false
	}
	return true
}

func (s *Server) status(w http.ResponseWriter, r *http.Request) {
	var st Status
	type snap struct {
		stats vmm.Stats
		now   int64
		prof  vmm.ExitProfile
	}
	got := make(chan snap, 1)
	done := make(chan error, 1)
	go func() {
		done <- s.m.Do(func(m *vmm.Machine) error {
			got <- snap{m.Stats, m.VirtualTime(), m.ExitProfile()}
			return nil
		})
	}()
	var err error
	busy := false
	select {
	case err = <-done:
	case <-time.After(2 * time.Second):
		// The vCPU thread is held elsewhere: a backup waiting for its
		// primary's log, say. Answer without the machine's counters.
		busy = true
	}
	select {
	case sn := <-got:
		st.Stats, st.VirtualTimeNs, st.ExitProfile = sn.stats, sn.now, &sn.prof
	default:
	}
	cs := s.m.ControlStats()
	switch {
	case busy:
		st.State = "running (vCPU busy; counters not read)"
	case errors.Is(err, vmm.ErrNotRunning):
		st.State = "stopped"
	case err != nil:
		machineFault(w, err)
		return
	case cs.Paused:
		st.State = "paused"
	default:
		st.State = "running"
	}
	if op := s.op.Load(); op != nil {
		st.Operation = op
		if st.State != "stopped" {
			st.State = map[string]string{"snapshot": "snapshotting", "migration": "migrating"}[op.Kind]
		}
	}
	st.Pauses = cs.Pauses
	st.LastPauseNs = int64(cs.LastPause)
	st.TotalPauseNs = int64(cs.TotalPause)
	st.BytesSent = s.bytesSent.Load()
	if op := st.Operation; op != nil && op.Progress != nil {
		st.BytesSent += op.Progress.Sent
	}
	st.LastOperation = s.last.Load()
	if rb := s.replica.Load(); rb != nil {
		rs := rb.r.ReplicaStatus()
		st.Replica = &rs
	}
	writeJSON(w, http.StatusOK, st)
}

func (s *Server) protect(w http.ResponseWriter, r *http.Request) {
	var req ProtectRequest
	if !decode(w, r, &req) {
		return
	}
	rb := s.replica.Load()
	if rb == nil {
		writeFault(w, http.StatusConflict, "this ftkvm is not a replica (start it with ftkvm primary)")
		return
	}
	if _, _, err := net.SplitHostPort(req.Destination); err != nil {
		writeFault(w, http.StatusBadRequest, "destination %q: %v", req.Destination, err)
		return
	}
	if err := rb.r.Protect(req.Destination); err != nil {
		writeFault(w, http.StatusConflict, "protect: %v", err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (s *Server) setState(w http.ResponseWriter, r *http.Request) {
	var req StateRequest
	if !decode(w, r, &req) {
		return
	}
	if !s.opMu.TryLock() {
		writeFault(w, http.StatusConflict, "a snapshot or migration is under way")
		return
	}
	defer s.opMu.Unlock()
	switch req.State {
	case "Paused":
		if !s.userPaused {
			if err := s.m.Pause(); err != nil {
				machineFault(w, err)
				return
			}
			s.userPaused = true
		}
	case "Resumed":
		if !s.userPaused {
			writeFault(w, http.StatusConflict, "the guest is not paused")
			return
		}
		if err := s.m.Resume(); err != nil {
			machineFault(w, err)
			return
		}
		s.userPaused = false
	default:
		writeFault(w, http.StatusBadRequest, "state %q: want \"Paused\" or \"Resumed\"", req.State)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

// transfer runs a snapshot or migration, streaming its progress as JSON
// lines. run returns the result and whether the guest stopped here.
func (s *Server) transfer(w http.ResponseWriter, kind, target string, run func(progress func(migrate.Progress)) (migrate.Result, bool, error)) {
	if !s.opMu.TryLock() {
		op := s.op.Load()
		if op != nil {
			writeFault(w, http.StatusConflict, "a %s to %s is under way", op.Kind, op.Target)
		} else {
			writeFault(w, http.StatusConflict, "another request is under way")
		}
		return
	}
	// Unlocked before the last event is written, not after: a client
	// that reads the result and at once sends its next request must not
	// find the operation still under way.
	locked := true
	defer func() {
		if locked {
			s.opMu.Unlock()
		}
	}()
	if !s.m.ControlStats().Running {
		writeFault(w, http.StatusConflict, "%v", vmm.ErrNotRunning)
		return
	}
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.WriteHeader(http.StatusOK)
	rc := http.NewResponseController(w)
	enc := json.NewEncoder(w)
	emit := func(e Event) {
		_ = enc.Encode(e)
		_ = rc.Flush()
	}
	s.op.Store(&Operation{Kind: kind, Target: target})
	res, stopped, err := run(func(p migrate.Progress) {
		s.op.Store(&Operation{Kind: kind, Target: target, Progress: &p})
		emit(Event{Progress: &p})
	})
	s.op.Store(nil)
	if stopped && s.userPaused {
		// The guest stopped for good: a pause from this API must not
		// keep its ftkvm waiting.
		_ = s.m.Resume()
		s.userPaused = false
	}
	s.bytesSent.Add(res.Bytes)
	out := &Result{
		Kind: kind, Target: target, Bytes: res.Bytes, Pages: res.Pages, Rounds: res.Rounds,
		DirtyAtStop: res.Dirty, PauseNs: int64(res.Pause), TotalNs: int64(res.Total), Stopped: stopped,
	}
	last := Event{Result: out}
	if err != nil {
		out.Error = err.Error()
		last = Event{Error: err.Error()}
	}
	s.last.Store(out)
	locked = false
	s.opMu.Unlock()
	emit(last)
}

func (s *Server) snapshot(w http.ResponseWriter, r *http.Request) {
	var req SnapshotRequest
	if !decode(w, r, &req) {
		return
	}
	if !filepath.IsAbs(req.Path) {
		writeFault(w, http.StatusBadRequest, "snapshot_path %q is not absolute", req.Path)
		return
	}
	s.transfer(w, "snapshot", req.Path, func(progress func(migrate.Progress)) (migrate.Result, bool, error) {
		res, err := migrate.WriteFile(s.m, req.Path, migrate.Options{Live: req.Live, Progress: progress})
		if err != nil {
			return res, false, err
		}
		// The guest is paused; stop it for good if asked, then let it go.
		if req.Stop {
			if err := s.m.Do(func(m *vmm.Machine) error { m.Stop("snapshot written to " + req.Path); return nil }); err != nil {
				return res, false, err
			}
		}
		if err := s.m.Resume(); err != nil && !req.Stop {
			return res, false, err
		}
		return res, req.Stop, nil
	})
}

func (s *Server) migrate(w http.ResponseWriter, r *http.Request) {
	var req MigrateRequest
	if !decode(w, r, &req) {
		return
	}
	if s.replica.Load() != nil {
		writeFault(w, http.StatusConflict, "a replica does not migrate: protect it with a new backup, then stop this one")
		return
	}
	if _, _, err := net.SplitHostPort(req.Destination); err != nil {
		writeFault(w, http.StatusBadRequest, "destination %q: %v", req.Destination, err)
		return
	}
	if req.Bandwidth < 0 {
		writeFault(w, http.StatusBadRequest, "bandwidth %d", req.Bandwidth)
		return
	}
	s.transfer(w, "migration", req.Destination, func(progress func(migrate.Progress)) (migrate.Result, bool, error) {
		res, err := migrate.Send(s.m, req.Destination, migrate.Options{Bandwidth: req.Bandwidth, Progress: progress, TLS: s.tls.Load()})
		stopped := err == nil || errors.Is(err, migrate.ErrUncertain)
		if err != nil {
			err = fmt.Errorf("migration to %s: %w", req.Destination, err)
		}
		return res, stopped, err
	})
}
