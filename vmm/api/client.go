package api

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"syscall"

	"github.com/ftkvm/ftkvm/vmm/migrate"
)

// Client talks to the control API on a unix socket.
type Client struct {
	socket string
	hc     *http.Client
}

// NewClient returns a client for the socket at path.
func NewClient(path string) *Client {
	return &Client{
		socket: path,
		hc: &http.Client{Transport: &http.Transport{
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				var d net.Dialer
				return d.DialContext(ctx, "unix", path)
			},
		}},
	}
}

func (c *Client) do(ctx context.Context, method, path string, body any) (*http.Response, error) {
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return nil, err
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://ftkvm"+path, rd)
	if err != nil {
		return nil, err
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		if errors.Is(err, syscall.ENOENT) || errors.Is(err, syscall.ECONNREFUSED) {
			return nil, fmt.Errorf("no ftkvm serving %s (is it running with --api?)", c.socket)
		}
		return nil, err
	}
	if resp.StatusCode >= 300 {
		defer resp.Body.Close()
		var f fault
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<16))
		if json.Unmarshal(b, &f) == nil && f.Message != "" {
			return nil, errors.New(f.Message)
		}
		return nil, fmt.Errorf("%s %s: %s", method, path, resp.Status)
	}
	return resp, nil
}

// Status is GET /vm.
func (c *Client) Status(ctx context.Context) (*Status, error) {
	resp, err := c.do(ctx, http.MethodGet, "/vm", nil)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	var st Status
	if err := json.NewDecoder(resp.Body).Decode(&st); err != nil {
		return nil, fmt.Errorf("status: %w", err)
	}
	return &st, nil
}

// SetState is PATCH /vm: "Paused" or "Resumed".
func (c *Client) SetState(ctx context.Context, state string) error {
	resp, err := c.do(ctx, http.MethodPatch, "/vm", StateRequest{State: state})
	if err != nil {
		return err
	}
	resp.Body.Close()
	return nil
}

// Snapshot is PUT /snapshot/create; progress gets the progress events.
func (c *Client) Snapshot(ctx context.Context, req SnapshotRequest, progress func(migrate.Progress)) (*Result, error) {
	return c.transfer(ctx, "/snapshot/create", req, progress)
}

// Migrate is PUT /migrate; progress gets the progress events.
func (c *Client) Migrate(ctx context.Context, req MigrateRequest, progress func(migrate.Progress)) (*Result, error) {
	return c.transfer(ctx, "/migrate", req, progress)
}

func (c *Client) transfer(ctx context.Context, path string, body any, progress func(migrate.Progress)) (*Result, error) {
	resp, err := c.do(ctx, http.MethodPut, path, body)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		var e Event
		if err := json.Unmarshal(sc.Bytes(), &e); err != nil {
			return nil, fmt.Errorf("bad event from ftkvm: %v", err)
		}
		switch {
		case e.Error != "":
			return nil, errors.New(e.Error)
		case e.Result != nil:
			return e.Result, nil
		case e.Progress != nil && progress != nil:
			progress(*e.Progress)
		}
	}
	err = sc.Err()
	if err == nil {
		err = io.ErrUnexpectedEOF
	}
	return nil, fmt.Errorf("the ftkvm serving %s went away before the operation finished: %v", c.socket, err)
}

// Protect asks a primary to bring in the backup waiting at addr.
func (c *Client) Protect(ctx context.Context, addr string) error {
	resp, err := c.do(ctx, http.MethodPut, "/protect", ProtectRequest{Destination: addr})
	if err != nil {
		return err
	}
	resp.Body.Close()
	return nil
}
