// Package witness is the third party that keeps a cut link from letting
// both replicas of a pair go on with the guest (split brain). It plays the
// part of VMware FT's atomic test-and-set on shared storage: each replica
// that loses its peer claims the pair here, the first claim wins, and
// every later claim of the pair gets the same answer. The loser halts.
//
// It speaks HTTP+JSON over TCP:
//
//	POST /v1/claim  {"pair": "<64 hex digits>", "role": "primary"|"backup"}
//	200             {"pair": "...", "winner": "primary"|"backup"}
//	400             {"error": "..."}   (a malformed claim)
//
// With a state file, each decision is appended and synced to disk before
// it is answered, so a witness that restarts keeps its decisions. Without
// one they live in memory only: a witness restarted between the two claims
// of a pair would let both win.
package witness

import (
	"bufio"
	"bytes"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/ftkvm/ftkvm/ft"
)

// ClaimPath is where claims are posted.
const ClaimPath = "/v1/claim"

// maxBody bounds a request or answer: a claim is about 100 bytes.
const maxBody = 4096

// Request is a claim on the wire.
type Request struct {
	Pair string `json:"pair"`
	Role string `json:"role"`
}

// Answer is the witness's reply.
type Answer struct {
	Pair   string `json:"pair"`
	Winner string `json:"winner"`
	Error  string `json:"error,omitempty"`
}

// ErrMalformed is wrapped by every decoding error.
var ErrMalformed = errors.New("malformed")

func roleName(r ft.Role) string { return r.String() }

func parseRole(s string) (ft.Role, error) {
	switch s {
	case "primary":
		return ft.RolePrimary, nil
	case "backup":
		return ft.RoleBackup, nil
	}
	return 0, fmt.Errorf("%w: role %q is neither primary nor backup", ErrMalformed, s)
}

func parsePair(s string) (ft.Digest, error) {
	var d ft.Digest
	if len(s) != 2*len(d) || strings.ToLower(s) != s {
		return d, fmt.Errorf("%w: pair %q is not %d lower-case hex digits", ErrMalformed, s, 2*len(d))
	}
	if _, err := hex.Decode(d[:], []byte(s)); err != nil {
		return d, fmt.Errorf("%w: pair: %v", ErrMalformed, err)
	}
	if d == (ft.Digest{}) {
		return d, fmt.Errorf("%w: the zero pair names no pair", ErrMalformed)
	}
	return d, nil
}

// strictJSON decodes one JSON object into v: unknown fields, trailing
// data and more than maxBody bytes are errors.
func strictJSON(b []byte, v any) error {
	if len(b) > maxBody {
		return fmt.Errorf("%w: %d bytes, at most %d", ErrMalformed, len(b), maxBody)
	}
	d := json.NewDecoder(bytes.NewReader(b))
	d.DisallowUnknownFields()
	if err := d.Decode(v); err != nil {
		return fmt.Errorf("%w: %v", ErrMalformed, err)
	}
	if len(bytes.TrimSpace(b[d.InputOffset():])) > 0 {
		return fmt.Errorf("%w: data after the object", ErrMalformed)
	}
	return nil
}

// DecodeRequest decodes and checks a claim.
func DecodeRequest(b []byte) (ft.Claim, error) {
	var r Request
	if err := strictJSON(b, &r); err != nil {
		return ft.Claim{}, err
	}
	pair, err := parsePair(r.Pair)
	if err != nil {
		return ft.Claim{}, err
	}
	role, err := parseRole(r.Role)
	if err != nil {
		return ft.Claim{}, err
	}
	return ft.Claim{Pair: pair, Role: role}, nil
}

// EncodeRequest is the body of a claim.
func EncodeRequest(c ft.Claim) []byte {
	b, _ := json.Marshal(Request{Pair: hex.EncodeToString(c.Pair[:]), Role: roleName(c.Role)})
	return b
}

// DecodeAnswer decodes the witness's answer to a claim of pair: the
// winner's role. An answer for another pair is an error.
func DecodeAnswer(b []byte, pair ft.Digest) (ft.Role, error) {
	var a Answer
	if err := strictJSON(b, &a); err != nil {
		return 0, err
	}
	if a.Error != "" {
		return 0, fmt.Errorf("the witness refused the claim: %s", a.Error)
	}
	got, err := parsePair(a.Pair)
	if err != nil {
		return 0, err
	}
	if got != pair {
		return 0, fmt.Errorf("%w: the answer is for pair %x, the claim was for %x", ErrMalformed, got[:6], pair[:6])
	}
	return parseRole(a.Winner)
}

// ---- The server ----

// Server decides claims. It is an http.Handler.
type Server struct {
	mu    sync.Mutex
	pairs map[ft.Digest]ft.Role
	state *os.File // nil: decisions in memory only
	size  int64    // bytes of state that hold whole, synced decisions
	// broken: a failed write could not be undone; the file may hold a
	// decision this process does not, so no claim is answered again.
	broken error
	// Log, if set, hears each decision.
	Log func(format string, args ...any)
}

// stateHeader opens a state file.
const stateHeader = "ftkvm-witness 1\n"

// NewServer returns a witness. With statePath it loads the decisions
// recorded there (creating the file if needed) and records new ones.
func NewServer(statePath string) (*Server, error) {
	s := &Server{pairs: map[ft.Digest]ft.Role{}}
	if statePath == "" {
		return s, nil
	}
	f, err := os.OpenFile(statePath, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, fmt.Errorf("witness state: %w", err)
	}
	pairs, good, err := LoadState(f)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("witness state %s: %w", statePath, err)
	}
	// Drop a last line cut short by a crash: it was never answered.
	if err := f.Truncate(good); err != nil {
		f.Close()
		return nil, fmt.Errorf("witness state %s: %w", statePath, err)
	}
	if _, err := f.Seek(good, io.SeekStart); err != nil {
		f.Close()
		return nil, fmt.Errorf("witness state %s: %w", statePath, err)
	}
	if good == 0 {
		if _, err := f.WriteString(stateHeader); err != nil {
			f.Close()
			return nil, fmt.Errorf("witness state %s: %w", statePath, err)
		}
		if err := f.Sync(); err != nil {
			f.Close()
			return nil, fmt.Errorf("witness state %s: %w", statePath, err)
		}
		good = int64(len(stateHeader))
	}
	s.pairs, s.state, s.size = pairs, f, good
	return s, nil
}

// LoadState reads a state file: the header, then one "<pair hex> <role>"
// line per decision. It returns the decisions and the length of the part
// that is whole (a last line without its newline was cut short by a crash
// before it was answered, and does not count). Anything else is an error.
func LoadState(r io.Reader) (map[ft.Digest]ft.Role, int64, error) {
	pairs := map[ft.Digest]ft.Role{}
	br := bufio.NewReader(r)
	var good int64
	for line := 1; ; line++ {
		l, err := br.ReadString('\n')
		if err == io.EOF {
			if line == 1 && !strings.HasPrefix(stateHeader, l) {
				// Not a state file whose header was cut short: do not
				// truncate somebody else's file.
				return nil, 0, fmt.Errorf("%w: not a witness state file (it starts %q)", ErrMalformed, firstBytes(l))
			}
			return pairs, good, nil // empty, or a last line cut short
		}
		if err != nil {
			return nil, 0, err
		}
		if line == 1 {
			if l != stateHeader {
				return nil, 0, fmt.Errorf("%w: not a witness state file (first line %q)", ErrMalformed, strings.TrimSpace(l))
			}
			good += int64(len(l))
			continue
		}
		pairHex, roleStr, ok := strings.Cut(strings.TrimSuffix(l, "\n"), " ")
		if !ok {
			return nil, 0, fmt.Errorf("%w: line %d: %q", ErrMalformed, line, l)
		}
		pair, err := parsePair(pairHex)
		if err != nil {
			return nil, 0, fmt.Errorf("line %d: %w", line, err)
		}
		role, err := parseRole(roleStr)
		if err != nil {
			return nil, 0, fmt.Errorf("line %d: %w", line, err)
		}
		if prev, dup := pairs[pair]; dup && prev != role {
			return nil, 0, fmt.Errorf("%w: line %d: pair %x decided twice, for the %v and the %v", ErrMalformed, line, pair[:6], prev, role)
		}
		pairs[pair] = role
		good += int64(len(l))
	}
}

func firstBytes(s string) string {
	if len(s) > 20 {
		return s[:20] + "..."
	}
	return s
}

// Claim decides a claim: the first of a pair wins, and later claims of
// the pair get the same winner. The decision is on disk (with a state
// file) before Claim returns.
func (s *Server) Claim(c ft.Claim) (ft.Role, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.broken != nil {
		return 0, s.broken
	}
	if w, ok := s.pairs[c.Pair]; ok {
		s.logf("witness: pair %x: the %v claims; the %v won already", c.Pair[:6], c.Role, w)
		return w, nil
	}
	if s.state != nil {
		line := fmt.Sprintf("%x %s\n", c.Pair[:], roleName(c.Role))
		_, err := s.state.WriteString(line)
		if err == nil {
			err = s.state.Sync()
		}
		if err != nil {
			// Undo the part that may have been written, so that the
			// file never holds a decision nobody was told.
			if terr := s.state.Truncate(s.size); terr != nil {
				s.broken = fmt.Errorf("the state file may hold an unanswered decision (%v, then %v): restart the witness", err, terr)
			} else if _, serr := s.state.Seek(s.size, io.SeekStart); serr != nil {
				s.broken = fmt.Errorf("the state file cannot be written (%v, then %v): restart the witness", err, serr)
			}
			return 0, fmt.Errorf("record the decision: %w", err)
		}
		s.size += int64(len(line))
	}
	s.pairs[c.Pair] = c.Role
	s.logf("witness: pair %x: the %v claims first and goes on", c.Pair[:6], c.Role)
	return c.Role, nil
}

func (s *Server) logf(format string, args ...any) {
	if s.Log != nil {
		s.Log(format, args...)
	}
}

// Close closes the state file.
func (s *Server) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.state == nil {
		return nil
	}
	err := s.state.Close()
	s.state = nil
	return err
}

// HTTPServer is the HTTP server to serve s with. Its bounds keep
// strangers (scanners, health checks, slow or oversized requests) from
// holding connections: they get an error and are closed, and claims go
// on being answered.
func (s *Server) HTTPServer() *http.Server {
	return &http.Server{
		Handler:           s,
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       10 * time.Second,
		WriteTimeout:      10 * time.Second,
		IdleTimeout:       time.Minute,
		MaxHeaderBytes:    16 << 10,
	}
}

// ServeHTTP serves POST ClaimPath.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	reply := func(code int, a Answer) {
		if code != http.StatusOK && s.Log != nil {
			s.Log("witness: refused a request from %s (%s %s): %s", r.RemoteAddr, r.Method, r.URL.Path, a.Error)
		}
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(code)
		_ = json.NewEncoder(w).Encode(a)
	}
	if r.URL.Path != ClaimPath {
		reply(http.StatusNotFound, Answer{Error: "no such path: " + r.URL.Path})
		return
	}
	if r.Method != http.MethodPost {
		reply(http.StatusMethodNotAllowed, Answer{Error: "claims are POSTed"})
		return
	}
	body, err := io.ReadAll(io.LimitReader(r.Body, maxBody+1))
	if err != nil {
		reply(http.StatusBadRequest, Answer{Error: err.Error()})
		return
	}
	c, err := DecodeRequest(body)
	if err != nil {
		reply(http.StatusBadRequest, Answer{Error: err.Error()})
		return
	}
	winner, err := s.Claim(c)
	if err != nil {
		reply(http.StatusInternalServerError, Answer{Error: err.Error()})
		return
	}
	reply(http.StatusOK, Answer{Pair: hex.EncodeToString(c.Pair[:]), Winner: roleName(winner)})
}
