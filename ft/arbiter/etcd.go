// Package arbiter decides, on etcd, which replica of a pair goes on when
// the two lose each other: the same rule as the built-in witness
// (ft/doc.go, "Fencing"), kept by a cluster a site already runs, so that
// the decision has no single point of failure.
//
// A pair's claim is one transaction on one key, <prefix>/pairs/<pair in
// hex>: if the key was never created, create it with the claimant's role;
// either way, read it. The first claim wins, every later one reads the
// same winner, and the key's create revision is a fencing token the
// winner logs (it orders this decision among the cluster's writes). While
// etcd has no quorum the claim does not return: the guest waits, as with
// an unreachable witness, and the driver asks again.
//
// etcds:// instead of etcd:// talks to the cluster over TLS with a client
// certificate (etcd's --client-cert-auth): the members' certificates must
// chain to the given CA, as a replica's peer's do (package ft/secure).
package arbiter

import (
	"context"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/ftkvm/ftkvm/ft"
)

// Endpoint is a parsed --arbiter value.
type Endpoint struct {
	Hosts  []string // host:port of each member
	Prefix string   // key prefix, starting with "/"
	TLS    bool     // etcds://: mutual TLS to the members
}

// DefaultPrefix is the key prefix when the address names none.
const DefaultPrefix = "/ftkvm"

// Parse reads etcd://HOST:PORT[,HOST:PORT...][/PREFIX], or etcds://...
// for TLS.
func Parse(s string) (Endpoint, error) {
	secure := false
	rest, ok := strings.CutPrefix(s, "etcd://")
	if !ok {
		rest, ok = strings.CutPrefix(s, "etcds://")
		secure = ok
	}
	if !ok {
		return Endpoint{}, fmt.Errorf("arbiter %q: want etcd://HOST:PORT[,HOST:PORT...][/PREFIX] (or etcds:// for TLS)", s)
	}
	hosts, prefix, _ := strings.Cut(rest, "/")
	e := Endpoint{Prefix: DefaultPrefix, TLS: secure}
	if prefix != "" {
		e.Prefix = "/" + strings.TrimRight(prefix, "/")
	}
	for _, h := range strings.Split(hosts, ",") {
		host, port, err := net.SplitHostPort(h)
		if err != nil || host == "" || port == "" {
			return Endpoint{}, fmt.Errorf("arbiter %q: member %q is not HOST:PORT", s, h)
		}
		e.Hosts = append(e.Hosts, h)
	}
	return e, nil
}

// String is the canonical form: what the handshake compares (both
// replicas must claim at the same cluster and prefix).
func (e Endpoint) String() string {
	scheme := "etcd://"
	if e.TLS {
		scheme = "etcds://"
	}
	return scheme + strings.Join(e.Hosts, ",") + e.Prefix
}

// Etcd claims pairs on an etcd cluster (driver.Witness).
type Etcd struct {
	ep  Endpoint
	cli *clientv3.Client
	// Log, if set, is told of each decision and its fencing token.
	Log func(format string, args ...any)
}

// New connects to the cluster lazily: an unreachable cluster is no error
// here, only a claim that cannot be answered. An etcds:// endpoint needs
// cfg, the client's certificate and the CA of the members' certificates
// (secure.Load); an etcd:// one ignores it.
func New(ep Endpoint, cfg *tls.Config) (*Etcd, error) {
	var tc *tls.Config
	if ep.TLS {
		if cfg == nil {
			return nil, fmt.Errorf("arbiter %v: TLS needs a certificate, its key and a CA (--tls-cert, --tls-key, --tls-ca)", ep)
		}
		tc = cfg.Clone()
	}
	cli, err := clientv3.New(clientv3.Config{
		Endpoints:   ep.Hosts,
		DialTimeout: 2 * time.Second,
		Logger:      zap.NewNop(),
		TLS:         tc,
	})
	if err != nil {
		return nil, fmt.Errorf("arbiter %v: %w", ep, err)
	}
	return &Etcd{ep: ep, cli: cli}, nil
}

// Close closes the client.
func (e *Etcd) Close() error { return e.cli.Close() }

// Key is the key of a pair's decision.
func (e *Etcd) Key(pair ft.Digest) string {
	return e.ep.Prefix + "/pairs/" + hex.EncodeToString(pair[:])
}

// Claim asks which role of c's pair goes on. It returns the winner, or
// an error if the cluster did not answer before ctx ended.
func (e *Etcd) Claim(ctx context.Context, c ft.Claim) (ft.Role, error) {
	if c.Pair == (ft.Digest{}) {
		return 0, errors.New("arbiter: a claim for the zero pair")
	}
	if c.Role != ft.RolePrimary && c.Role != ft.RoleBackup {
		return 0, fmt.Errorf("arbiter: a claim for role %v", c.Role)
	}
	key := e.Key(c.Pair)
	resp, err := e.cli.Txn(ctx).
		If(clientv3.Compare(clientv3.CreateRevision(key), "=", 0)).
		Then(clientv3.OpPut(key, c.Role.String()), clientv3.OpGet(key)).
		Else(clientv3.OpGet(key)).
		Commit()
	if err != nil {
		return 0, fmt.Errorf("arbiter %v: %w", e.ep, err)
	}
	var get *clientv3.GetResponse
	if resp.Succeeded {
		get = (*clientv3.GetResponse)(resp.Responses[1].GetResponseRange())
	} else {
		get = (*clientv3.GetResponse)(resp.Responses[0].GetResponseRange())
	}
	if get == nil || len(get.Kvs) != 1 {
		return 0, fmt.Errorf("arbiter %v: the decision for %s is missing", e.ep, key)
	}
	kv := get.Kvs[0]
	var winner ft.Role
	switch string(kv.Value) {
	case "primary":
		winner = ft.RolePrimary
	case "backup":
		winner = ft.RoleBackup
	default:
		return 0, fmt.Errorf("arbiter %v: %s holds %q, not a role", e.ep, key, kv.Value)
	}
	if e.Log != nil {
		e.Log("arbiter: pair %x: the %v goes on (%s, fencing token %d)", c.Pair[:6], winner, map[bool]string{true: "this claim won", false: "decided before"}[resp.Succeeded], kv.CreateRevision)
	}
	return winner, nil
}
