package main

import (
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"

	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"

	"github.com/ftkvm/ftkvm/ft/witness"
)

type witnessCmd struct {
	Listen string `required:"" help:"Address to serve claims on." placeholder:"HOST:PORT"`
	State  string `help:"File that keeps the decisions across restarts (each is synced to disk before it is answered). Without it they live in memory: a witness restarted between the two claims of a pair could let both replicas go on." placeholder:"FILE"`
}

// run serves claims until SIGINT or SIGTERM (exit 0).
func (c *witnessCmd) run() (int, error) {
	s, err := witness.NewServer(c.State)
	if err != nil {
		return 0, err
	}
	defer s.Close()
	s.Log = logrus.Warnf
	l, err := net.Listen("tcp", c.Listen)
	if err != nil {
		return 0, fmt.Errorf("witness: %w", err)
	}
	srv := s.HTTPServer()
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, unix.SIGINT, unix.SIGTERM)
	defer signal.Stop(sigs)
	go func() {
		<-sigs
		_ = srv.Close()
	}()
	fmt.Fprintf(os.Stderr, "ftkvm: witness serving claims on %s\n", l.Addr())
	if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return 0, fmt.Errorf("witness: %w", err)
	}
	fmt.Fprintln(os.Stderr, "ftkvm: witness stopped")
	return 0, nil
}
