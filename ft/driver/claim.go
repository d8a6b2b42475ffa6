package driver

// Claims: asking the witness who may go on after the link was lost.
//
// Locking: claim runs on its own goroutine and asks the witness without
// r.mu, which it takes only to hand the answer to the node.

import (
	"context"
	"errors"
	"sync/atomic"
	"time"

	"github.com/ftkvm/ftkvm/ft"
)

// Witness decides claims (package ft/witness's Client).
type Witness interface {
	Claim(ctx context.Context, c ft.Claim) (ft.Role, error)
}

// claimRetry is how long a claim waits before asking an unreachable
// witness again. The guest waits meanwhile: going on without an answer
// is what the witness is there to prevent.
const claimRetry = 200 * time.Millisecond

// Claims counts this replica's claims by outcome: won (it goes on), lost
// (fenced), and attempts that got no answer (the witness or arbiter was
// unreachable; the claim is asked again).
type Claims struct{ Won, Lost, Failed uint64 }

type claimCounts struct{ won, lost, failed atomic.Uint64 }

// Claims reads the claim counters. Any goroutine.
func (r *Replica) Claims() Claims {
	return Claims{Won: r.claims.won.Load(), Lost: r.claims.lost.Load(), Failed: r.claims.failed.Load()}
}

// claim asks the witness until it answers, then gives the node the
// answer. The node's vCPU waits meanwhile.
func (r *Replica) claim(c ft.Claim) {
	w := r.opts.Witness
	if w == nil {
		r.mu.Lock()
		r.setFatal(errors.New("replica: the peer is lost and the node asks a witness, but none is configured"))
		r.cond.Broadcast()
		r.mu.Unlock()
		return
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		select {
		case <-r.done:
			cancel()
		case <-ctx.Done():
		}
	}()
	for warned := false; ; {
		winner, err := w.Claim(ctx, c)
		if err == nil {
			if winner == c.Role {
				r.claims.won.Add(1)
			} else {
				r.claims.lost.Add(1)
			}
			r.mu.Lock()
			r.node.Claimed(winner == c.Role)
			r.drain()
			r.mu.Unlock()
			if winner == c.Role {
				r.log.Warnf("replica: the witness chose this replica (the %v); it goes on with the guest", c.Role)
			}
			return
		}
		r.claims.failed.Add(1)
		if !warned {
			r.log.Errorf("replica: cannot reach the witness (%v); the guest waits, asking again every %v", err, claimRetry)
			warned = true
		}
		select {
		case <-r.done:
			return
		case <-time.After(claimRetry):
		}
	}
}
