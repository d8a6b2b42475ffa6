package driver

// Disks at a join: the primary sends its read-write disk images to a
// backup that joins its running guest, before the full checkpoint
// (ft/doc.go, "Checkpoint epochs, repair, re-protection"; wire.DiskData).
//
// The primary's guest writes its images only on the vCPU thread, at
// exits; the images are read here at the join's kick point with the vCPU
// stopped, so they are consistent with the state captured there. The
// guest waits while they are sent (docs/REPLICATION.md).
//
// Locking: sendDisks is called from carry with r.mu held and releases it
// while it streams (the link's reader, the ticker and heartbeats go on);
// takeDisk is called by the link's reader with r.mu held.

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"hash"
	"time"

	"github.com/ftkvm/ftkvm/devices"
	"github.com/ftkvm/ftkvm/ft/wire"
)

// diskMachine is a machine with disk images (a *vmm.Machine).
type diskMachine interface {
	DiskImages() []*devices.DiskImage
}

// diskQueue bounds the disk chunks queued on the link while the images
// stream: the primary holds at most this much of them (plus a batch in
// flight) in memory.
const diskQueue = 8 << 20

// diskRx is a joining backup's reception of one image.
type diskRx struct {
	next uint64 // bytes received, from the image's start
	h    hash.Hash
	done bool // the last chunk arrived and matched its digest
}

func (r *Replica) diskImages() []*devices.DiskImage {
	if dm, ok := r.m.(diskMachine); ok {
		return dm.DiskImages()
	}
	return nil
}

var errLinkGone = errors.New("the link to the backup closed")

// sendDisks sends every read-write image to the joining backup on the
// current link, with the vCPU stopped (r.mu held on entry and return).
// A link that closes meanwhile is no error of the primary's: the node
// learns of it, and the checkpoint goes nowhere.
func (r *Replica) sendDisks() error {
	imgs, l := r.diskImages(), r.link
	if len(imgs) == 0 || l == nil {
		return nil
	}
	// No other link may become the joining one until the checkpoint that
	// follows these chunks is sent (Connect refuses meanwhile).
	r.diskCopy = true
	r.mu.Unlock()
	t := time.Now()
	n, err := sendImages(l, imgs)
	r.mu.Lock()
	r.diskCopy = false
	switch {
	case errors.Is(err, errLinkGone):
		r.log.Warnf("replica: sending the disk images to the joining backup: %v", err)
		return nil
	case err != nil:
		return fmt.Errorf("send the disk images to the joining backup: %w", err)
	}
	r.log.Infof("replica: sent %d bytes of disk images to the joining backup in %v, the guest stopped meanwhile", n, time.Since(t).Round(time.Millisecond))
	return nil
}

// sendImages queues the read-write images as DiskData chunks on l and
// returns the bytes sent.
func sendImages(l *link, imgs []*devices.DiskImage) (int64, error) {
	buf := make([]byte, wire.MaxDiskData)
	var total int64
	for i, img := range imgs {
		if img.ReadOnly() {
			continue // identical on both (Hello.Disks, compared)
		}
		h := sha256.New()
		size := img.Size()
		for off := uint64(0); off < size; {
			chunk := buf[:min(uint64(len(buf)), size-off)]
			if _, err := img.ReadAt(chunk, int64(off)); err != nil {
				return total, fmt.Errorf("disk %d: read at %d: %w", i, off, err)
			}
			h.Write(chunk)
			m := wire.DiskData{Disk: uint32(i), Offset: off, Data: chunk}
			off += uint64(len(chunk))
			if off == size {
				m.Last = true
				copy(m.Digest[:], h.Sum(nil))
			}
			if !l.sendBounded(wire.Marshal(m), diskQueue) {
				return total, errLinkGone
			}
			total += int64(len(chunk))
		}
	}
	return total, nil
}

// takeDisk writes a chunk of the primary's image to this joining backup's
// copy (the node checked that this backup takes disks: TakesDisks). Its
// vCPU waits for the full checkpoint meanwhile. A bad chunk fails the
// install that follows (disksReceived), with the reason.
func (r *Replica) takeDisk(m wire.DiskData) {
	if r.diskErr != nil {
		return
	}
	// The reader stops reading while it waits or writes: the ticker takes
	// that for a sign of life of the primary (a backup without state has
	// nothing to take over anyway).
	r.diskBusy = true
	defer func() { r.diskBusy = false }()
	// A joining backup makes its machine once the handshake succeeded:
	// the first chunks can come before it has one. The reader waits (and
	// the primary, its queue full, waits for the link).
	for r.m == nil {
		select {
		case <-r.done:
			return
		default:
		}
		r.cond.Wait()
	}
	imgs := r.diskImages()
	if r.diskRx == nil {
		r.diskRx = make([]diskRx, len(imgs))
	}
	err := func() error {
		if int(m.Disk) >= len(imgs) {
			return fmt.Errorf("the primary sent disk %d; this replica has %d", m.Disk, len(imgs))
		}
		d, img := &r.diskRx[m.Disk], imgs[m.Disk]
		switch {
		case img.ReadOnly():
			return fmt.Errorf("the primary sent read-only disk %d", m.Disk)
		case d.done:
			return fmt.Errorf("the primary sent disk %d past its last chunk", m.Disk)
		case m.Offset != d.next:
			return fmt.Errorf("the primary sent disk %d's bytes at %d; %d were expected next", m.Disk, m.Offset, d.next)
		}
		if d.h == nil {
			d.h = sha256.New()
		}
		// The file I/O (a sync of the whole image at the end) runs
		// without the lock, so that the ticker's heartbeats go on: the
		// primary must not take a busy backup for a dead one. Only this
		// reader touches diskRx, and the vCPU waits for the checkpoint.
		r.mu.Unlock()
		defer r.mu.Lock()
		if err := img.WriteAt(m.Data, int64(m.Offset)); err != nil {
			return err
		}
		d.h.Write(m.Data)
		d.next += uint64(len(m.Data))
		if !m.Last {
			return nil
		}
		var sum wire.Digest
		copy(sum[:], d.h.Sum(nil))
		switch {
		case d.next != img.Size():
			return fmt.Errorf("the primary's disk %d ended at %d of %d bytes", m.Disk, d.next, img.Size())
		case sum != m.Digest:
			return fmt.Errorf("disk %d as received has sha256 %x, the primary sent %x", m.Disk, sum[:6], m.Digest[:6])
		}
		// The guest saw its flushes complete on the primary's copy.
		if err := img.Sync(); err != nil {
			return err
		}
		d.done = true
		return nil
	}()
	if err != nil {
		r.diskErr = fmt.Errorf("receive the primary's disk images: %w", err)
		r.log.Errorf("replica: %v", r.diskErr)
	}
}

// disksReceived reports whether every read-write image arrived whole,
// before a joining backup installs the primary's state.
func (r *Replica) disksReceived() error {
	if r.diskErr != nil {
		return r.diskErr
	}
	var n uint64
	for i, img := range r.diskImages() {
		if img.ReadOnly() {
			continue
		}
		if i >= len(r.diskRx) || !r.diskRx[i].done {
			return fmt.Errorf("the primary's state came without disk %d's contents", i)
		}
		n += r.diskRx[i].next
	}
	if n > 0 {
		r.log.Infof("replica: received %d bytes of the primary's disk images", n)
	}
	return nil
}
