package witness

import (
	"bytes"
	"strings"
	"testing"

	"github.com/ftkvm/ftkvm/ft"
)

// FuzzDecodeRequest: any body either decodes to a claim that re-encodes
// and decodes to itself, or is an error; never a panic.
func FuzzDecodeRequest(f *testing.F) {
	f.Add(EncodeRequest(ft.Claim{Pair: pairA, Role: ft.RolePrimary}))
	f.Add([]byte(`{"pair":"00","role":"backup"}`))
	f.Add([]byte(`{}`))
	f.Add([]byte(`[`))
	f.Fuzz(func(t *testing.T, b []byte) {
		c, err := DecodeRequest(b)
		if err != nil {
			return
		}
		c2, err := DecodeRequest(EncodeRequest(c))
		if err != nil || c2 != c {
			t.Fatalf("%+v re-decodes to %+v, %v", c, c2, err)
		}
	})
}

// FuzzDecodeAnswer: never a panic; a decoded winner is a role.
func FuzzDecodeAnswer(f *testing.F) {
	f.Add([]byte(`{"pair":"0102030000000000000000000000000000000000000000000000000000000000","winner":"backup"}`))
	f.Add([]byte(`{"error":"x"}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := DecodeAnswer(b, pairA)
		if err == nil && r != ft.RolePrimary && r != ft.RoleBackup {
			t.Fatalf("winner %v", r)
		}
	})
}

// FuzzLoadState: never a panic; the whole part it reports is a prefix
// that loads to the same decisions.
func FuzzLoadState(f *testing.F) {
	f.Add([]byte(stateHeader + strings.Repeat("ab", 32) + " primary\n"))
	f.Add([]byte(stateHeader + strings.Repeat("ab", 32) + " prim"))
	f.Add([]byte("junk"))
	f.Fuzz(func(t *testing.T, b []byte) {
		pairs, good, err := LoadState(bytes.NewReader(b))
		if err != nil {
			return
		}
		if good > int64(len(b)) {
			t.Fatalf("whole part %d of %d bytes", good, len(b))
		}
		again, good2, err := LoadState(bytes.NewReader(b[:good]))
		if err != nil || good2 != good || len(again) != len(pairs) {
			t.Fatalf("the whole part reloads to %d pairs (%v), want %d", len(again), err, len(pairs))
		}
	})
}
