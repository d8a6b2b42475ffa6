package driver

// Outputs: the console writer the machine gets, and the performer that
// writes released outputs in order and confirms them to the node.
//
// Locking: Console's writes and Input take r.mu (they call into the
// node). The performer holds r.mu except while it writes a batch; perfBusy
// says a batch is being written, so flushOutputs can wait for it.

import (
	"errors"
	"io"

	"github.com/ftkvm/ftkvm/ft"
	"github.com/ftkvm/ftkvm/ft/wire"
)

// Console is the writer to give the machine as its UART output: every
// byte becomes an output of the node, performed when the policy allows.
func (r *Replica) Console() io.Writer { return consoleOut{r} }

type consoleOut struct{ r *Replica }

func (c consoleOut) Write(p []byte) (int, error) {
	r := c.r
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.finished || r.fatal != nil || r.quit.Load() { // a quit may have cut a call short
		return len(p), nil
	}
	a := r.node.Output(r.handling(), wire.KindConsole, p)
	if _, err := r.carry(a, false); err != nil && !errors.Is(err, errFinished) {
		r.setFatal(err)
	}
	return len(p), nil
}

// Input gives bytes typed for the guest (the terminal): the primary
// buffers them for the next epoch end, a backup ignores them.
func (r *Replica) Input(b []byte) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, c := range b {
		r.node.Async(ft.Event{Kind: wire.KindUART, Value: uint64(c)})
	}
	r.drain()
}

// performer writes released outputs in order, then confirms them.
func (r *Replica) performer() {
	r.mu.Lock()
	defer r.mu.Unlock()
	for {
		for len(r.perfQ) == 0 {
			select {
			case <-r.done:
				return
			default:
			}
			r.perfCond.Wait()
		}
		batch := r.perfQ
		r.perfQ = nil
		r.perfBusy = true
		r.mu.Unlock()
		for _, o := range batch {
			if o.Kind == wire.KindNetTx {
				r.transmit(o)
				continue
			}
			_, _ = r.opts.Console.Write(o.Data)
		}
		now := r.clock()
		r.mu.Lock()
		// Held from the node's time when the guest produced it (Out.At)
		// to now, written; counted under the lock, with Performed, so
		// that a metrics scrape sees the two agree.
		for _, o := range batch {
			r.holds.observe(now - o.At)
		}
		r.perfBusy = false
		r.node.Performed(batch[len(batch)-1].Seq)
		r.drain()
		r.perfCond.Broadcast()
	}
}

// flushOutputs waits until every released output was written.
func (r *Replica) flushOutputs() {
	r.mu.Lock()
	defer r.mu.Unlock()
	for len(r.perfQ) > 0 || r.perfBusy {
		r.perfCond.Wait()
	}
}

// ticker gives the node its clock every millisecond, and the timer event
// of a guest that computes without exits.
