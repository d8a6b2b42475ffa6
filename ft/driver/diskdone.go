package driver

// Disk completions (devices/virtio_blk.go): each disk's I/O goroutine
// performs the guest's requests off the vCPU thread and reports each one
// performed (DiskDone). On the primary that report becomes an
// asynchronous event of the node (wire.KindDiskDone, P1), delivered at an
// epoch end (P2) into the machine (Target.CompleteDisk): the moment the
// guest sees the request complete is in the log. A backup performed the
// same requests on its own image, at the same notifications; it ignores
// its own reports (P4) and delivers the logged completions at the logged
// points, after waiting, without the lock, for its own I/O goroutine to
// finish the request. Its status must be the primary's: a difference is
// a divergence and stops the backup loudly.
//
// When a promoted backup goes live (NoteLive), the requests its guest
// submitted whose completions the log did not carry are in its own I/O
// goroutine already: it posts those performed as its own events, and the
// rest as they finish (uncertain completions: the dead primary may have
// delivered some; a write done again writes the same data to the same
// sectors, and a completion for a request no longer in flight does
// nothing).
//
// Locking: DiskDone runs on an I/O goroutine and must not block (the vCPU
// thread may hold r.mu while it waits for that goroutine: an install, a
// capture): it queues the report under its own small lock, and the relay
// goroutine posts it under r.mu.

import (
	"fmt"
	"sync"

	"github.com/ftkvm/ftkvm/ft"
	"github.com/ftkvm/ftkvm/ft/wire"
	"github.com/ftkvm/ftkvm/vmm"
)

// diskState is the replica's part for its disks' completions.
type diskState struct {
	mu      sync.Mutex
	queue   []vmm.DiskCompletion // reports not yet posted
	spare   []vmm.DiskCompletion
	wake    chan struct{} // cap 1: the relay has reports
	started bool          // the relay runs (r.mu)
	data    [2]byte       // a KindDiskDone event's data being built (r.mu)
	seqs    []uint64      // the disks' next request numbers, reused (r.mu)
}

// DiskDone queues a disk's report for the relay (vmm.DiskEnvironment).
// I/O goroutine: it does not block. At most devices.BlockSlots requests
// per disk are in flight, which bounds the queue.
func (r *Replica) DiskDone(c vmm.DiskCompletion) {
	d := &r.disk
	d.mu.Lock()
	d.queue = append(d.queue, c)
	d.mu.Unlock()
	select {
	case d.wake <- struct{}{}:
	default:
	}
}

// startDisks starts the relay once. mu is held.
func (r *Replica) startDisks() {
	if r.disk.started {
		return
	}
	r.disk.started = true
	go r.relayDisks()
}

// relayDisks posts the reports to the node while it is the primary.
func (r *Replica) relayDisks() {
	d := &r.disk
	for {
		select {
		case <-d.wake:
		case <-r.done:
			return
		}
		d.mu.Lock()
		batch := d.queue
		d.queue, d.spare = d.spare[:0], nil
		d.mu.Unlock()
		r.mu.Lock()
		// A promoted backup still replaying posts nothing: its guest
		// has not reached the end of the log, and what is in flight when
		// it goes live is posted then (postInFlight).
		if r.node.Role() == ft.RolePrimary && !r.node.Status().Replaying {
			for _, c := range batch {
				r.postDisk(c)
			}
			r.drain()
		}
		r.mu.Unlock()
		d.mu.Lock()
		d.spare = batch[:0]
		d.mu.Unlock()
	}
}

// postDisk posts one completion to the node (it copies the data). mu is
// held.
func (r *Replica) postDisk(c vmm.DiskCompletion) {
	data := wire.DiskDoneData(r.disk.data[:0], c.Disk, c.Status)
	r.node.Async(ft.Event{Kind: wire.KindDiskDone, Value: c.Seq, Data: data})
}

// postInFlight posts every request performed and not delivered: a
// promoted backup going live delivers them itself. mu is held.
func (r *Replica) postInFlight() {
	if r.m == nil {
		return
	}
	r.m.DiskInFlight(r.postDisk)
}

// completeDisk delivers a KindDiskDone event. A backup first waits, without
// the lock, for its own I/O goroutine to perform the request, then checks
// that its status is the logged one. mu is held.
func (r *Replica) completeDisk(ev ft.Event) {
	disk, want, ok := wire.DiskDone(ev.Data)
	if !ok {
		r.setFatal(fmt.Errorf("replica: a disk completion with malformed data % x", ev.Data))
		return
	}
	r.mu.Unlock()
	r.m.WaitDisk(disk, ev.Value)
	r.mu.Lock()
	got, ok := r.m.CompleteDisk(disk, ev.Value)
	if !ok {
		// Not in flight: settled by a capture or dropped by an install
		// (a completion of a request numbered before the disk's next),
		// or never submitted here, which means this replica's guest
		// did not make the request the primary's made.
		seqs := r.m.DiskNextSeqs(r.disk.seqs[:0])
		r.disk.seqs = seqs
		if int(disk) >= len(seqs) || ev.Value >= seqs[disk] {
			err := fmt.Errorf("%w: the primary's disk %d completed request %d, which this replica's guest never made", ft.ErrDivergence, disk, ev.Value)
			r.log.Errorf("replica: DIVERGENCE: %v", err)
			r.setFatal(err)
		}
		return
	}
	if got != want {
		err := fmt.Errorf("%w: disk %d request %d completed with status %d on this replica, %d on the primary: the images differ",
			ft.ErrDivergence, disk, ev.Value, got, want)
		r.log.Errorf("replica: DIVERGENCE: %v", err)
		r.setFatal(err)
	}
}
