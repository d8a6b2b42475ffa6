package witness

import (
	"bytes"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net/http"
	"time"

	"github.com/ftkvm/ftkvm/ft"
)

// Client asks a witness.
type Client struct {
	Addr   string // host:port
	HTTP   *http.Client
	scheme string // http, or https with mutual TLS
}

// NewClient returns a client of the witness at addr whose requests time
// out after timeout.
func NewClient(addr string, timeout time.Duration) *Client {
	return &Client{Addr: addr, HTTP: &http.Client{Timeout: timeout}, scheme: "http"}
}

// NewTLSClient is NewClient over mutual TLS with cfg (package ft/secure):
// the witness must present a certificate from cfg's CA, and this client
// presents its own.
func NewTLSClient(addr string, timeout time.Duration, cfg *tls.Config) *Client {
	tr := &http.Transport{TLSClientConfig: cfg, ForceAttemptHTTP2: false}
	return &Client{Addr: addr, HTTP: &http.Client{Timeout: timeout, Transport: tr}, scheme: "https"}
}

// Claim asks the witness which role of c's pair goes on.
func (c *Client) Claim(ctx context.Context, cl ft.Claim) (ft.Role, error) {
	scheme := c.scheme
	if scheme == "" {
		scheme = "http"
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, scheme+"://"+c.Addr+ClaimPath, bytes.NewReader(EncodeRequest(cl)))
	if err != nil {
		return 0, fmt.Errorf("witness %s: %w", c.Addr, err)
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := c.HTTP.Do(req)
	if err != nil {
		return 0, fmt.Errorf("witness %s: %w", c.Addr, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxBody+1))
	if err != nil {
		return 0, fmt.Errorf("witness %s: %w", c.Addr, err)
	}
	role, err := DecodeAnswer(body, cl.Pair)
	if err != nil {
		return 0, fmt.Errorf("witness %s (HTTP %d): %w", c.Addr, resp.StatusCode, err)
	}
	if resp.StatusCode != http.StatusOK {
		return 0, fmt.Errorf("witness %s: HTTP %d with an answer", c.Addr, resp.StatusCode)
	}
	return role, nil
}
