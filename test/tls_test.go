package test

import (
	"fmt"
	"net"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ftkvm/ftkvm/ft/secure/securetest"
)

// tlsFiles makes the cluster's CA and certificates for names, and a
// stranger's certificate from another CA. It returns the flags for each
// name and for the stranger.
func tlsFiles(t *testing.T, names ...string) (flags map[string][]string) {
	t.Helper()
	dir := t.TempDir()
	flags = map[string][]string{}
	for _, set := range []struct {
		ca    string
		names []string
	}{{"cluster", names}, {"elsewhere", []string{"stranger"}}} {
		ca, err := securetest.NewCA(set.ca)
		if err != nil {
			t.Fatal(err)
		}
		caPath, err := ca.WriteCA(dir)
		if err != nil {
			t.Fatal(err)
		}
		for _, n := range set.names {
			cert, key, err := ca.Issue(dir, n)
			if err != nil {
				t.Fatal(err)
			}
			flags[n] = []string{"--tls-cert", cert, "--tls-key", key, "--tls-ca", caPath}
		}
	}
	return flags
}

// A pair and its witness on mutual TLS: strangers (garbage, a primary
// without TLS, a primary whose certificate is from another CA) are
// refused with one line each and change nothing; the real primary pairs,
// is killed, and the backup takes over and finishes the guest.
func TestTLSLinks(t *testing.T) {
	requireKVM(t)
	tf := tlsFiles(t, "primary", "backup", "witness")
	w := workload{name: "counter", cmdline: "workload=counter lines=60 wait=3 hz=200"}
	guest := []string{"--kernel", testosELF, "--mem", "32", "--cmdline", w.cmdline, "--timeout", "5s"}
	wit := start(t, append(tf["witness"], "witness", "--listen", "127.0.0.1:0")...)
	wit.waitUntil("the witness", func() bool { return strings.Contains(wit.stderr(), "witness serving claims on") })
	waddr := strings.Fields(strings.SplitAfter(wit.stderr(), "witness serving claims on ")[1])[0]
	args := append(guest, "--witness", waddr)
	b := start(t, append(append(append([]string{}, tf["backup"]...), "--log-level", "info", "backup", "--listen", "127.0.0.1:0"), args...)...)
	addr := b.backupAddr()

	// Strangers.
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	c.Write([]byte("GET / HTTP/1.0\r\n\r\n"))
	c.Close()
	plain := ftkvm(t, time.Minute, "", append([]string{"primary", "--backup", addr, "--connect", "5s"}, args...)...)
	if plain.status != 125 || strings.Count(strings.TrimSpace(plain.stderr), "\n") != 0 || !strings.Contains(plain.stderr, "before its hello") {
		t.Fatalf("a primary without TLS: status %d\n%s", plain.status, plain.stderr)
	}
	foreign := ftkvm(t, time.Minute, "", append(append(append([]string{}, tf["stranger"]...), "primary", "--backup", addr, "--connect", "5s"), args...)...)
	if foreign.status != 125 || strings.Count(strings.TrimSpace(foreign.stderr), "\n") != 0 || !strings.Contains(foreign.stderr, "TLS") {
		t.Fatalf("a primary of another CA: status %d\n%s", foreign.status, foreign.stderr)
	}
	b.waitUntil("three strangers", func() bool { return strings.Count(b.stderr(), "is not this backup's primary") == 3 })

	// The real pair, then a failover.
	p := start(t, append(append(append([]string{}, tf["primary"]...), "--log-level", "info", "primary", "--backup", addr), args...)...)
	p.waitLines(5)
	if strings.Contains(p.stderr(), "not authenticated") || strings.Contains(b.stderr(), "not authenticated") {
		t.Fatalf("a replica on TLS warned of plain links:\n%s\n%s", p.stderr(), b.stderr())
	}
	p.kill()
	res := b.wait()
	if res.status != 0 || !strings.Contains(res.stderr, "taking over") || strings.Contains(res.stderr, "fenced") {
		t.Fatalf("backup: status %d\n%s", res.status, res.stderr)
	}
	checkCounterTail(t, res.stdout, 60)
}

// Without TLS flags, a replica warns once that its links are plain.
func TestPlainLinksWarn(t *testing.T) {
	res := ftkvm(t, time.Minute, "", "receive", "--listen", "127.0.0.1:0", "--timeout", "100ms")
	if strings.Count(res.stderr, "not authenticated or encrypted") != 1 {
		t.Fatalf("want one warning:\n%s", res.stderr)
	}
}

// Live migration on mutual TLS: a source without TLS is a stranger to
// the destination, which goes on waiting; a source of the cluster
// migrates.
func TestTLSMigration(t *testing.T) {
	requireKVM(t)
	tf := tlsFiles(t, "source", "destination")
	w := transferWorkloads[0]
	dst := start(t, append(append([]string{}, tf["destination"]...), "receive", "--listen", "127.0.0.1:0")...)
	addr := dst.listenAddr()
	plainSock, sock := tempSocket(t), tempSocket(t)
	plain := start(t, "run", "--kernel", testosELF, "--mem", "64", "--cmdline", w.cmdline, "--api", plainSock)
	plain.waitLines(1)
	if ctl := ftkvm(t, time.Minute, "", "ctl", "--api", plainSock, "migrate", addr); ctl.status == 0 {
		t.Fatalf("a source without TLS migrated:\n%s", ctl.stdout)
	}
	dst.waitUntil("the stranger logged", func() bool { return strings.Contains(dst.stderr(), "was not a migration") })
	src := start(t, append(append([]string{}, tf["source"]...), "run", "--kernel", testosELF, "--mem", "64", "--cmdline", w.cmdline, "--api", sock)...)
	src.waitLines(2)
	if ctl := ftkvm(t, time.Minute, "", "ctl", "--api", sock, "migrate", addr); ctl.status != 0 {
		t.Fatalf("ctl migrate: status %d\n%s", ctl.status, ctl.stderr)
	}
	before, after := src.wait(), dst.wait()
	if before.status != 0 || after.status != 0 {
		t.Fatalf("statuses %d %d\n%s\n%s", before.status, after.status, before.stderr, after.stderr)
	}
	w.checkComplete(t, before.stdout+after.stdout)
	plain.wait()
}

// A pair on mutual TLS whose arbiter is etcd over TLS (etcds://, Debian's
// etcd-server with --client-cert-auth and a certificate from the pair's
// CA): the primary is killed, the backup claims the pair over TLS, wins,
// logs its fencing token, counts the claim in its metrics, and finishes
// the guest.
func TestTLSArbiterEtcd(t *testing.T) {
	requireKVM(t)
	bin, err := exec.LookPath("etcd")
	if err != nil {
		t.Fatal("etcd is not installed (Debian's etcd-server; the test set-up installs it)")
	}
	tf := tlsFiles(t, "primary", "backup", "etcd")
	ports := make([]int, 2)
	for i := range ports {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		ports[i] = l.Addr().(*net.TCPAddr).Port
		l.Close()
	}
	client, peer := fmt.Sprintf("127.0.0.1:%d", ports[0]), fmt.Sprintf("http://127.0.0.1:%d", ports[1])
	et := tf["etcd"] // --tls-cert CERT --tls-key KEY --tls-ca CA
	startCmd(t, bin, "--name", "m0", "--data-dir", filepath.Join(t.TempDir(), "etcd"),
		"--listen-client-urls", "https://"+client, "--advertise-client-urls", "https://"+client,
		"--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer, "--initial-cluster", "m0="+peer,
		"--cert-file", et[1], "--key-file", et[3], "--client-cert-auth", "--trusted-ca-file", et[5],
		"--logger", "zap", "--log-level", "error")
	w := workload{name: "counter", cmdline: "workload=counter lines=400 wait=3 hz=200"}
	args := []string{"--kernel", testosELF, "--mem", "32", "--cmdline", w.cmdline, "--timeout", "5s",
		"--arbiter", "etcds://" + client + "/ftkvm-tls"}
	b := start(t, append(append(append([]string{}, tf["backup"]...), "--log-level", "info", "backup", "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0"), args...)...)
	addr := b.backupAddr()
	p := start(t, append(append(append([]string{}, tf["primary"]...), "--log-level", "info", "primary", "--backup", addr), args...)...)
	p.waitLines(5)
	p.kill()
	b.waitUntil("the takeover", func() bool { return strings.Contains(b.stderr(), "this replica is the primary now") })
	m := scrape(t, metricsAddr(b))
	if m[`ftkvm_replica_claims_total{outcome="won"}`] != 1 || m[`ftkvm_replica_claims_total{outcome="lost"}`] != 0 {
		t.Errorf("claims: %v", ours(m))
	}
	res := b.wait()
	if res.status != 0 || !strings.Contains(res.stderr, "fencing token") || !strings.Contains(res.stderr, "this claim won") ||
		strings.Contains(res.stderr, "plain text") {
		t.Fatalf("backup: status %d\n%s", res.status, res.stderr)
	}
	checkCounterTail(t, res.stdout, 400)
}
