package arbiter

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ftkvm/ftkvm/ft"
	"github.com/ftkvm/ftkvm/ft/secure"
	"github.com/ftkvm/ftkvm/ft/secure/securetest"
)

func TestParse(t *testing.T) {
	for _, tc := range []struct {
		in, want string // want "" for an error
	}{
		{"etcd://127.0.0.1:2379", "etcd://127.0.0.1:2379/ftkvm"},
		{"etcd://a:1,b:2,c:3/site/ft/", "etcd://a:1,b:2,c:3/site/ft"},
		{"etcd://[::1]:2379/x", "etcd://[::1]:2379/x"},
		{"http://127.0.0.1:2379", ""},
		{"etcd://", ""},
		{"etcd://host", ""},
		{"etcd://a:1,,b:2", ""},
		{"etcd://:2379", ""},
		{"etcds://a:1,b:2/p", "etcds://a:1,b:2/p"},
		{"etcds://", ""},
		{"etcd://etcds://a:1", ""},
	} {
		e, err := Parse(tc.in)
		switch {
		case tc.want == "" && err == nil:
			t.Errorf("%q: parsed as %v", tc.in, e)
		case tc.want != "" && (err != nil || e.String() != tc.want):
			t.Errorf("%q: %v %v, want %s", tc.in, e, err, tc.want)
		}
	}
}

// cluster is a real etcd cluster (Debian's etcd-server, which the test
// set-up installs) of three members on loopback.
type cluster struct {
	t       *testing.T
	dir     string
	clients []string
	args    [][]string
	procs   []*exec.Cmd
}

func freePort(t *testing.T) int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// etcdBinary finds etcd, or fails (make test sets FTKVM_TEST_STRICT: a
// missing etcd there is a failure) or skips saying so.
func etcdBinary(t *testing.T) string {
	p, err := exec.LookPath("etcd")
	if err != nil {
		if os.Getenv("FTKVM_TEST_STRICT") != "" {
			t.Fatal("etcd is not installed (Debian's etcd-server; test/setup-deps.sh installs it)")
		}
		t.Skip("etcd is not installed (Debian's etcd-server; test/setup-deps.sh installs it)")
	}
	return p
}

func startCluster(t *testing.T) *cluster {
	bin := etcdBinary(t)
	c := &cluster{t: t, dir: t.TempDir()}
	var peers []string
	peerURL := make([]string, 3)
	for i := range 3 {
		peerURL[i] = fmt.Sprintf("http://127.0.0.1:%d", freePort(t))
		c.clients = append(c.clients, fmt.Sprintf("127.0.0.1:%d", freePort(t)))
		peers = append(peers, fmt.Sprintf("m%d=%s", i, peerURL[i]))
	}
	for i := range 3 {
		c.args = append(c.args, []string{bin, "--name", fmt.Sprintf("m%d", i),
			"--data-dir", filepath.Join(c.dir, fmt.Sprint(i)),
			"--listen-client-urls", "http://" + c.clients[i], "--advertise-client-urls", "http://" + c.clients[i],
			"--listen-peer-urls", peerURL[i], "--initial-advertise-peer-urls", peerURL[i],
			"--initial-cluster", strings.Join(peers, ","), "--initial-cluster-state", "new",
			"--initial-cluster-token", "ftkvm-test", "--log-outputs", "stderr", "--logger", "zap", "--log-level", "error"})
		c.procs = append(c.procs, nil)
		c.start(i)
	}
	t.Cleanup(func() {
		for i := range c.procs {
			c.kill(i)
		}
	})
	return c
}

func (c *cluster) start(i int) {
	cmd := exec.Command(c.args[i][0], c.args[i][1:]...)
	if err := cmd.Start(); err != nil {
		c.t.Fatal(err)
	}
	c.procs[i] = cmd
}

func (c *cluster) kill(i int) {
	if p := c.procs[i]; p != nil {
		p.Process.Kill()
		p.Wait()
		c.procs[i] = nil
	}
}

func (c *cluster) endpoint() Endpoint {
	return Endpoint{Hosts: c.clients, Prefix: "/ftkvm-test"}
}

func newArbiter(t *testing.T, ep Endpoint) *Etcd {
	a, err := New(ep, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Close() })
	return a
}

// claim asks until the cluster answers (it may still be electing a leader).
func claim(t *testing.T, a *Etcd, c ft.Claim) ft.Role {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		r, err := a.Claim(ctx, c)
		cancel()
		if err == nil {
			return r
		}
		if time.Now().After(deadline) {
			t.Fatalf("no answer in a minute: %v", err)
		}
	}
}

// The rules of the witness, kept by etcd: the first claim of a pair wins,
// racing claims agree, later claims read the same winner, pairs are
// independent; with one member dead the cluster still decides; without a
// quorum a claim gets no answer (the guest waits), and once the quorum is
// back it gets the decision made before.
func TestEtcdArbiter(t *testing.T) {
	c := startCluster(t)
	a, b := newArbiter(t, c.endpoint()), newArbiter(t, c.endpoint())
	pair1 := ft.Digest{1, 2, 3}
	claim(t, a, ft.Claim{Pair: ft.Digest{9}, Role: ft.RolePrimary}) // the cluster is up

	// Racing claims of one pair.
	var wg sync.WaitGroup
	got := make([]ft.Role, 2)
	for i, r := range []ft.Role{ft.RolePrimary, ft.RoleBackup} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			got[i] = claim(t, []*Etcd{a, b}[i], ft.Claim{Pair: pair1, Role: r})
		}()
	}
	wg.Wait()
	if got[0] != got[1] || (got[0] != ft.RolePrimary && got[0] != ft.RoleBackup) {
		t.Fatalf("racing claims: %v", got)
	}
	winner := got[0]
	if r := claim(t, a, ft.Claim{Pair: pair1, Role: ft.RoleBackup}); r != winner {
		t.Fatalf("a later claim: %v, want %v", r, winner)
	}
	if r := claim(t, b, ft.Claim{Pair: ft.Digest{4}, Role: ft.RoleBackup}); r != ft.RoleBackup {
		t.Fatalf("another pair: %v", r)
	}

	// One member dead: still decided.
	c.kill(0)
	if r := claim(t, b, ft.Claim{Pair: ft.Digest{5}, Role: ft.RolePrimary}); r != ft.RolePrimary {
		t.Fatalf("with a member down: %v", r)
	}

	// No quorum: no answer.
	c.kill(1)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	_, err := b.Claim(ctx, ft.Claim{Pair: ft.Digest{6}, Role: ft.RoleBackup})
	cancel()
	if err == nil {
		t.Fatal("a claim was answered without a quorum")
	}
	// The quorum back: the earlier decision stands, the waiting claim is
	// answered.
	c.start(0)
	c.start(1)
	if r := claim(t, b, ft.Claim{Pair: pair1, Role: ft.RoleBackup}); r != winner {
		t.Fatalf("after the quorum returned: %v, want %v", r, winner)
	}
	// The claim that got no answer may still have been committed once
	// the quorum returned (etcd keeps the proposal): whichever claim
	// committed first decides, and both sides read the same winner.
	r1 := claim(t, a, ft.Claim{Pair: ft.Digest{6}, Role: ft.RolePrimary})
	r2 := claim(t, b, ft.Claim{Pair: ft.Digest{6}, Role: ft.RoleBackup})
	if r1 != r2 {
		t.Fatalf("the claims of the pair asked without a quorum disagree: %v, %v", r1, r2)
	}
}

// Claims that cannot be made are refused before etcd is asked.
func TestEtcdBadClaims(t *testing.T) {
	a := newArbiter(t, Endpoint{Hosts: []string{"127.0.0.1:1"}, Prefix: "/x"})
	for _, c := range []ft.Claim{{Role: ft.RolePrimary}, {Pair: ft.Digest{1}, Role: 0}} {
		if _, err := a.Claim(context.Background(), c); err == nil {
			t.Errorf("claim %+v accepted", c)
		}
	}
}

// etcdTLS is one etcd member (Debian's etcd-server) serving clients over
// TLS only, with client certificates required (--client-cert-auth), its
// own certificate and the clients' from ca.
func etcdTLS(t *testing.T, dir, cert, key, ca string) string {
	bin := etcdBinary(t)
	client := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	peer := fmt.Sprintf("http://127.0.0.1:%d", freePort(t))
	cmd := exec.Command(bin, "--name", "m0", "--data-dir", filepath.Join(dir, "data"),
		"--listen-client-urls", "https://"+client, "--advertise-client-urls", "https://"+client,
		"--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer, "--initial-cluster", "m0="+peer,
		"--cert-file", cert, "--key-file", key, "--client-cert-auth", "--trusted-ca-file", ca,
		"--logger", "zap", "--log-outputs", "stderr", "--log-level", "error")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	return client
}

// etcds://: claims go over mutual TLS. A client with a certificate from
// the cluster's CA is answered; one whose certificate comes from another
// CA, and a plain client, are not (etcd refuses them), and etcds://
// without TLS settings is refused before anything is dialled.
func TestEtcdArbiterTLS(t *testing.T) {
	dir := t.TempDir()
	ca, err := securetest.NewCA("site")
	if err != nil {
		t.Fatal(err)
	}
	other, err := securetest.NewCA("other")
	if err != nil {
		t.Fatal(err)
	}
	caFile, err := ca.WriteCA(dir)
	if err != nil {
		t.Fatal(err)
	}
	srvCert, srvKey, err := ca.Issue(dir, "etcd")
	if err != nil {
		t.Fatal(err)
	}
	cliCert, cliKey, err := ca.Issue(dir, "replica")
	if err != nil {
		t.Fatal(err)
	}
	strCert, strKey, err := other.Issue(dir, "stranger")
	if err != nil {
		t.Fatal(err)
	}
	host := etcdTLS(t, dir, srvCert, srvKey, caFile)
	good, err := secure.Load(cliCert, cliKey, caFile)
	if err != nil {
		t.Fatal(err)
	}
	stranger, err := secure.Load(strCert, strKey, caFile)
	if err != nil {
		t.Fatal(err)
	}
	ep := Endpoint{Hosts: []string{host}, Prefix: "/ftkvm-tls", TLS: true}
	if _, err := New(ep, nil); err == nil {
		t.Fatal("etcds:// without TLS settings accepted")
	}

	a, err := New(ep, good)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	pair := ft.Digest{7, 7}
	if r := claim(t, a, ft.Claim{Pair: pair, Role: ft.RoleBackup}); r != ft.RoleBackup {
		t.Fatalf("over TLS: %v", r)
	}

	refused := func(name string, e *Etcd) {
		t.Helper()
		defer e.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		defer cancel()
		if r, err := e.Claim(ctx, ft.Claim{Pair: pair, Role: ft.RolePrimary}); err == nil {
			t.Errorf("%s: answered (%v)", name, r)
		} else {
			t.Logf("%s: %v", name, err)
		}
	}
	s, err := New(ep, stranger)
	if err != nil {
		t.Fatal(err)
	}
	refused("a certificate from another CA", s)
	p, err := New(Endpoint{Hosts: []string{host}, Prefix: "/ftkvm-tls"}, good)
	if err != nil {
		t.Fatal(err)
	}
	refused("a plain client", p)
	// The decision stands for the client that may talk.
	if r := claim(t, a, ft.Claim{Pair: pair, Role: ft.RolePrimary}); r != ft.RoleBackup {
		t.Fatalf("a later claim over TLS: %v", r)
	}
}
