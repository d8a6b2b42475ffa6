// Package secure authenticates and encrypts ftkvm's links with mutual
// TLS (crypto/tls, TLS 1.3): the replication link, re-protection, live
// migration and the witness. Both ends present a certificate, and each
// accepts the other only if its certificate chains to the configured CA:
// the CA, not host names, says who belongs to the cluster (replicas are
// reached by address, and their certificates need not name it).
package secure

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"os"
	"time"
)

// Load reads a certificate, its key and the CA (PEM files) into a
// configuration that serves both ends of a link.
func Load(certFile, keyFile, caFile string) (*tls.Config, error) {
	if certFile == "" || keyFile == "" || caFile == "" {
		return nil, errors.New("TLS needs all of --tls-cert, --tls-key and --tls-ca")
	}
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return nil, fmt.Errorf("TLS certificate: %w", err)
	}
	pem, err := os.ReadFile(caFile)
	if err != nil {
		return nil, fmt.Errorf("TLS CA: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("TLS CA %s: no PEM certificate in it", caFile)
	}
	return Config(cert, pool), nil
}

// Config is the configuration for cert and a CA pool: TLS 1.3, a
// certificate required from the peer on both sides and verified against
// pool (chain and usage; not the host name).
func Config(cert tls.Certificate, pool *x509.CertPool) *tls.Config {
	verify := func(raw [][]byte, _ [][]*x509.Certificate) error {
		if len(raw) == 0 {
			return errors.New("the peer sent no certificate")
		}
		certs := make([]*x509.Certificate, len(raw))
		for i, r := range raw {
			c, err := x509.ParseCertificate(r)
			if err != nil {
				return fmt.Errorf("the peer's certificate: %w", err)
			}
			certs[i] = c
		}
		inter := x509.NewCertPool()
		for _, c := range certs[1:] {
			inter.AddCert(c)
		}
		_, err := certs[0].Verify(x509.VerifyOptions{Roots: pool, Intermediates: inter,
			KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}})
		if err != nil {
			return fmt.Errorf("the peer's certificate is not from this cluster's CA: %w", err)
		}
		return nil
	}
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{cert},
		// Chains are checked by verify, against the CA only.
		InsecureSkipVerify:    true,
		ClientAuth:            tls.RequireAnyClientCert,
		VerifyPeerCertificate: verify,
	}
}

// Client runs the dialling side's handshake on conn, within timeout.
func Client(conn net.Conn, cfg *tls.Config, timeout time.Duration) (net.Conn, error) {
	return handshake(tls.Client(conn, cfg), timeout)
}

// Server runs the accepting side's handshake on conn, within timeout.
func Server(conn net.Conn, cfg *tls.Config, timeout time.Duration) (net.Conn, error) {
	return handshake(tls.Server(conn, cfg), timeout)
}

func handshake(c *tls.Conn, timeout time.Duration) (net.Conn, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	if err := c.HandshakeContext(ctx); err != nil {
		c.Close()
		return nil, fmt.Errorf("TLS handshake: %w", err)
	}
	return c, nil
}
