package witness

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ftkvm/ftkvm/ft"
)

var pairA, pairB = ft.Digest{1, 2, 3}, ft.Digest{9, 8, 7}

// The first claim of a pair wins; every later claim of it, by either
// role, gets the same answer; pairs are independent.
func TestFirstClaimWins(t *testing.T) {
	s, err := NewServer("")
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		c    ft.Claim
		want ft.Role
	}{
		{ft.Claim{Pair: pairA, Role: ft.RoleBackup}, ft.RoleBackup},
		{ft.Claim{Pair: pairA, Role: ft.RolePrimary}, ft.RoleBackup},
		{ft.Claim{Pair: pairA, Role: ft.RoleBackup}, ft.RoleBackup},
		{ft.Claim{Pair: pairB, Role: ft.RolePrimary}, ft.RolePrimary},
		{ft.Claim{Pair: pairB, Role: ft.RoleBackup}, ft.RolePrimary},
	} {
		if got, err := s.Claim(tc.c); err != nil || got != tc.want {
			t.Fatalf("claim %v of %x: got %v %v, want %v", tc.c.Role, tc.c.Pair[:3], got, err, tc.want)
		}
	}
}

// Racing claims of one pair: exactly one role wins, and everyone hears
// the same winner.
func TestRacingClaimsAgree(t *testing.T) {
	s, _ := NewServer("")
	for round := range 50 {
		pair := ft.Digest{byte(round), 0xaa}
		var wg sync.WaitGroup
		got := make([]ft.Role, 8)
		for i := range got {
			wg.Add(1)
			go func() {
				defer wg.Done()
				got[i], _ = s.Claim(ft.Claim{Pair: pair, Role: ft.Role(1 + i%2)})
			}()
		}
		wg.Wait()
		for _, g := range got {
			if g != got[0] || g == 0 {
				t.Fatalf("round %d: answers %v", round, got)
			}
		}
	}
}

// Decisions survive a restart with a state file, and a last line cut
// short by a crash is dropped (it was never answered).
func TestStateFileKeepsDecisions(t *testing.T) {
	path := filepath.Join(t.TempDir(), "witness.state")
	s, err := NewServer(path)
	if err != nil {
		t.Fatal(err)
	}
	s.Claim(ft.Claim{Pair: pairA, Role: ft.RoleBackup})
	s.Close()
	f, _ := os.OpenFile(path, os.O_APPEND|os.O_WRONLY, 0)
	f.WriteString("0909") // a crash in the middle of recording pairB
	f.Close()
	s2, err := NewServer(path)
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	if w, _ := s2.Claim(ft.Claim{Pair: pairA, Role: ft.RolePrimary}); w != ft.RoleBackup {
		t.Fatalf("after the restart the primary won pair A: %v", w)
	}
	if w, _ := s2.Claim(ft.Claim{Pair: pairB, Role: ft.RolePrimary}); w != ft.RolePrimary {
		t.Fatalf("pair B: %v", w)
	}
	b, _ := os.ReadFile(path)
	if lines := strings.Split(strings.TrimSuffix(string(b), "\n"), "\n"); len(lines) != 3 || !strings.HasSuffix(lines[2], " primary") {
		t.Fatalf("state file:\n%s", b)
	}
}

func TestStateFileErrors(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct{ name, content, want string }{
		{"not a state file", "hello\n", "not a witness state file"},
		{"a file without a newline", "some notes", "not a witness state file"},
		{"bad role", stateHeader + strings.Repeat("ab", 32) + " nobody\n", "neither primary nor backup"},
		{"bad pair", stateHeader + "xyz primary\n", "lower-case hex"},
		{"decided twice", stateHeader + strings.Repeat("ab", 32) + " primary\n" + strings.Repeat("ab", 32) + " backup\n", "decided twice"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(dir, strings.ReplaceAll(tc.name, " ", "-"))
			os.WriteFile(path, []byte(tc.content), 0o644)
			if _, err := NewServer(path); err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want %q", err, tc.want)
			}
			if b, _ := os.ReadFile(path); string(b) != tc.content {
				t.Fatalf("the file was changed to %q", b)
			}
		})
	}
}

// Over HTTP: the client's claims, a malformed request, and a witness that
// is not there.
func TestHTTP(t *testing.T) {
	s, _ := NewServer("")
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: s}
	go srv.Serve(l)
	defer srv.Close()
	c := NewClient(l.Addr().String(), 2*time.Second)
	ctx := context.Background()
	if w, err := c.Claim(ctx, ft.Claim{Pair: pairA, Role: ft.RolePrimary}); err != nil || w != ft.RolePrimary {
		t.Fatalf("first claim: %v %v", w, err)
	}
	if w, err := c.Claim(ctx, ft.Claim{Pair: pairA, Role: ft.RoleBackup}); err != nil || w != ft.RolePrimary {
		t.Fatalf("second claim: %v %v", w, err)
	}
	resp, err := http.Post("http://"+l.Addr().String()+ClaimPath, "application/json", strings.NewReader(`{"pair":"00","role":"primary"}`))
	if err != nil || resp.StatusCode != http.StatusBadRequest {
		t.Fatalf("malformed claim: %v %v", resp, err)
	}
	resp.Body.Close()
	if _, err := c.Claim(ctx, ft.Claim{Pair: ft.Digest{}, Role: ft.RolePrimary}); err == nil || !strings.Contains(err.Error(), "zero pair") {
		t.Fatalf("zero pair: %v", err)
	}
	l.Close()
	srv.Close()
	if _, err := c.Claim(ctx, ft.Claim{Pair: pairB, Role: ft.RoleBackup}); err == nil {
		t.Fatal("a claim to a closed witness succeeded")
	}
}

func TestDecodeAnswer(t *testing.T) {
	hexA := strings.Repeat("0", 0) + "010203" + strings.Repeat("0", 58)
	for _, tc := range []struct {
		body string
		want ft.Role
		err  string
	}{
		{`{"pair":"` + hexA + `","winner":"backup"}`, ft.RoleBackup, ""},
		{`{"pair":"` + hexA + `","winner":"backup"} {}`, 0, "data after"},
		{`{"pair":"` + hexA + `","winner":"backup"}}`, 0, "data after"},
		{`{"pair":"` + hexA + `","winner":"backup"}` + "\n", ft.RoleBackup, ""},
		{`{"pair":"` + hexA + `","winner":"both"}`, 0, "neither"},
		{`{"pair":"` + strings.Repeat("ab", 32) + `","winner":"backup"}`, 0, "the claim was for"},
		{`{"error":"disk full"}`, 0, "refused the claim: disk full"},
		{`{"pair":"` + hexA + `","winner":"backup","extra":1}`, 0, "unknown field"},
		{``, 0, "malformed"},
	} {
		got, err := DecodeAnswer([]byte(tc.body), pairA)
		if tc.err == "" && (err != nil || got != tc.want) || tc.err != "" && (err == nil || !strings.Contains(err.Error(), tc.err)) {
			t.Errorf("%s: got %v %v, want %v %q", tc.body, got, err, tc.want, tc.err)
		}
	}
	if _, err := DecodeAnswer([]byte(`{}`), pairA); !errors.Is(err, ErrMalformed) {
		t.Errorf("empty answer: %v", err)
	}
}

// A decision that cannot be recorded is not answered, and a witness that
// cannot undo a failed write answers no claim again: its file might hold
// a decision nobody was told, and a restart reads the file.
func TestStateWriteFailure(t *testing.T) {
	s, err := NewServer(filepath.Join(t.TempDir(), "state"))
	if err != nil {
		t.Fatal(err)
	}
	s.state.Close() // the disk goes away
	if w, err := s.Claim(ft.Claim{Pair: pairA, Role: ft.RolePrimary}); err == nil {
		t.Fatalf("an unrecorded decision was answered: %v", w)
	}
	if _, err := s.Claim(ft.Claim{Pair: pairA, Role: ft.RoleBackup}); err == nil || !strings.Contains(err.Error(), "restart the witness") {
		t.Fatalf("later claim: %v", err)
	}
}

// Strangers at the witness (a connection that sends nothing, random
// bytes, an oversized claim, another path) are answered or closed, and a
// claim made meanwhile is answered.
func TestWitnessStrangers(t *testing.T) {
	s, _ := NewServer("")
	var mu sync.Mutex
	var logged []string
	s.Log = func(format string, args ...any) {
		mu.Lock()
		logged = append(logged, fmt.Sprintf(format, args...))
		mu.Unlock()
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := s.HTTPServer()
	go srv.Serve(l)
	defer srv.Close()
	addr := l.Addr().String()
	silent, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer silent.Close()
	garbage, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	garbage.Write([]byte("\x16\x03\x01\x02\x00random bytes\r\n\r\n"))
	garbage.SetReadDeadline(time.Now().Add(10 * time.Second))
	if b, _ := io.ReadAll(garbage); !strings.Contains(string(b), "400") {
		t.Fatalf("garbage got %q", b)
	}
	garbage.Close()
	big := strings.NewReader(`{"pair":"` + strings.Repeat("0", 1<<20) + `"}`)
	resp, err := http.Post("http://"+addr+ClaimPath, "application/json", big)
	if err != nil || resp.StatusCode != http.StatusBadRequest {
		t.Fatalf("oversized claim: %v %v", resp, err)
	}
	resp.Body.Close()
	resp, err = http.Get("http://" + addr + "/")
	if err != nil || resp.StatusCode != http.StatusNotFound {
		t.Fatalf("another path: %v %v", resp, err)
	}
	resp.Body.Close()
	c := NewClient(addr, 2*time.Second)
	if w, err := c.Claim(context.Background(), ft.Claim{Pair: pairA, Role: ft.RoleBackup}); err != nil || w != ft.RoleBackup {
		t.Fatalf("claim among strangers: %v %v", w, err)
	}
	mu.Lock()
	defer mu.Unlock()
	refused := 0
	for _, l := range logged {
		if strings.Contains(l, "refused a request") {
			refused++
		}
	}
	if refused != 2 {
		t.Fatalf("want one line for each refused request, got %q", logged)
	}
}
