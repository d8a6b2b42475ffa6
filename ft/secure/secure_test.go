package secure

import (
	"crypto/tls"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/ftkvm/ftkvm/ft/secure/securetest"
)

// files makes a CA and a certificate for each name in a temporary
// directory, and returns their paths: ca, then cert and key per name.
func files(t *testing.T, caName string, names ...string) (ca string, certs, keys []string) {
	t.Helper()
	dir := t.TempDir()
	c, err := securetest.NewCA(caName)
	if err != nil {
		t.Fatal(err)
	}
	if ca, err = c.WriteCA(dir); err != nil {
		t.Fatal(err)
	}
	for _, n := range names {
		cp, kp, err := c.Issue(dir, n)
		if err != nil {
			t.Fatal(err)
		}
		certs, keys = append(certs, cp), append(keys, kp)
	}
	return ca, certs, keys
}

// pipe runs a handshake between a client and a server configuration and
// returns each side's error; on success the server echoes one message.
func pipe(t *testing.T, client, server *tls.Config) (cerr, serr error) {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	a, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	b, err := l.Accept()
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		c, err := Server(b, server, 5*time.Second)
		if err == nil {
			buf := make([]byte, 5)
			if _, err = io.ReadFull(c, buf); err == nil {
				_, err = c.Write(buf)
			}
			c.Close()
		} else {
			b.Close()
		}
		done <- err
	}()
	c, cerr := Client(a, client, 5*time.Second)
	if cerr == nil {
		c.Write([]byte("hello"))
		buf := make([]byte, 5)
		if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "hello" {
			cerr = err
		}
		c.Close()
	} else {
		a.Close()
	}
	return cerr, <-done
}

// Two certificates of one CA talk; a certificate of another CA, or none,
// is refused on either side.
func TestMutualTLS(t *testing.T) {
	ca, certs, keys := files(t, "cluster", "primary", "backup")
	other, ocerts, okeys := files(t, "elsewhere", "stranger")
	load := func(cert, key, ca string) *tls.Config {
		cfg, err := Load(cert, key, ca)
		if err != nil {
			t.Fatal(err)
		}
		return cfg
	}
	p, b := load(certs[0], keys[0], ca), load(certs[1], keys[1], ca)
	s := load(ocerts[0], okeys[0], other)
	// The stranger trusts our CA, but its own certificate is not ours.
	sTrusting := load(ocerts[0], okeys[0], ca)
	if cerr, serr := pipe(t, p, b); cerr != nil || serr != nil {
		t.Fatalf("same CA: %v / %v", cerr, serr)
	}
	if _, serr := pipe(t, sTrusting, b); serr == nil || !strings.Contains(serr.Error(), "not from this cluster's CA") {
		t.Fatalf("a client of another CA was accepted: %v", serr)
	}
	if cerr, _ := pipe(t, p, s); cerr == nil {
		t.Fatal("a server of another CA was accepted")
	}
	noCert := &tls.Config{InsecureSkipVerify: true, MinVersion: tls.VersionTLS13}
	if _, serr := pipe(t, noCert, b); serr == nil {
		t.Fatal("a client without a certificate was accepted")
	}
}

func TestLoadErrors(t *testing.T) {
	ca, certs, keys := files(t, "cluster", "a")
	for _, tc := range []struct{ cert, key, ca, want string }{
		{"", keys[0], ca, "needs all of"},
		{certs[0], keys[0], "/nonexistent", "TLS CA"},
		{certs[0], certs[0], ca, "TLS certificate"},
		{certs[0], keys[0], keys[0], "no PEM certificate"},
	} {
		if _, err := Load(tc.cert, tc.key, tc.ca); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Load(%q, %q, %q): %v, want %q", tc.cert, tc.key, tc.ca, err, tc.want)
		}
	}
}
