package driver

// State: the state hash of an epoch end, checkpoint capture and install.
//
// Locking: called from carry with r.mu held; hash, capture and install
// release it while they digest, capture, encode, decode or install memory
// and machine state, which only the vCPU thread touches.

import (
	"bytes"
	"crypto/sha256"
	"fmt"

	"github.com/ftkvm/ftkvm/ft"
	"github.com/ftkvm/ftkvm/vmm"
	"github.com/ftkvm/ftkvm/vmm/snapshot"
)

// hash is the state hash of an epoch end: the registers and all of guest
// memory (memHash: the pages dirtied since the last hash are hashed
// again). The dirtied pages are kept for the next checkpoint.
func (r *Replica) hash() (ft.Digest, error) {
	var d ft.Digest
	if _, err := r.m.DirtyLog(r.scratch); err != nil {
		return d, fmt.Errorf("state hash: %w", err)
	}
	for i, w := range r.scratch {
		r.accum[i] |= w
	}
	if r.opts.InjectDivergence > 0 && !r.injected && r.node.Status().Role == ft.RoleBackup &&
		r.node.Status().Epoch >= r.opts.InjectDivergence {
		r.injectDivergence()
	}
	if r.mh == nil {
		// Verify mode that Attach did not know of.
		r.mh = newMemHash(r.m.Memory())
	}
	r.mh.mark(r.scratch)
	h := sha256.New()
	if err := r.m.WriteRegsHash(h); err != nil {
		return d, fmt.Errorf("state hash: %w", err)
	}
	// Hashing many pages (after an install, or the first time) takes a
	// while: the ticker and the link reader go on meanwhile, as while the
	// vCPU waits. The vCPU thread alone touches memHash and the memory.
	r.mu.Unlock()
	mem := r.mh.digest()
	r.mu.Lock()
	h.Write(mem[:])
	copy(d[:], h.Sum(nil))
	return d, nil
}

// pageHashes is a diverged backup's memory as page hashes, for a page
// repair (ft/doc.go, verify mode): the registers' hash, and for each page
// the first word of its SHA-256 in memHash, brought up to date as hash
// does (the pages dirtied since are hashed again). The slice is new: the
// node keeps it in the messages it sends.
func (r *Replica) pageHashes() (ft.Digest, []uint64, error) {
	var regs ft.Digest
	if _, err := r.hash(); err != nil {
		return regs, nil, fmt.Errorf("page hashes: %w", err)
	}
	h := sha256.New()
	if err := r.m.WriteRegsHash(h); err != nil {
		return regs, nil, fmt.Errorf("page hashes: %w", err)
	}
	copy(regs[:], h.Sum(nil))
	pages := make([]uint64, r.mh.pages)
	for pfn := range pages {
		pages[pfn] = r.mh.per[pfn][0]
	}
	return regs, pages, nil
}

// captureRepair is a page repair, at the quiescent point of a checkpoint:
// the pages whose hashes (memHash, brought up to date) differ from the
// backup's (against, one word per page, from pageHashes), and the whole
// state but memory. The backup's other pages equal this replica's, so
// after the install its state is this one. What was dirtied since the last
// checkpoint need not go too: from here the two memories are equal.
func (r *Replica) captureRepair(against []uint64) ([]byte, error) {
	// As capture: disk requests in flight complete here first, so that
	// the pages they write are in the dirty log, hashed and compared.
	r.settleDisks()
	if _, err := r.m.DirtyLog(r.scratch); err != nil {
		return nil, fmt.Errorf("page repair: %w", err)
	}
	if r.mh == nil {
		r.mh = newMemHash(r.m.Memory())
	}
	r.mh.mark(r.scratch)
	if uint64(len(against)) != r.mh.pages {
		return nil, fmt.Errorf("page repair: the backup sent hashes of %d pages, this guest has %d", len(against), r.mh.pages)
	}
	diff := make([]uint64, len(r.scratch))
	var n uint64
	r.mu.Unlock()
	r.mh.digest()
	for pfn, h := range against {
		if r.mh.per[pfn][0] != h {
			diff[pfn/64] |= 1 << (pfn % 64)
			n++
		}
	}
	err := r.m.CheckpointWith(&r.cp, vmm.CheckpointOptions{Extra: diff})
	var buf bytes.Buffer
	if err == nil {
		err = r.cp.Write(snapshot.NewWriter(&buf))
	}
	r.mu.Lock()
	if err != nil {
		return nil, fmt.Errorf("page repair: %w", err)
	}
	clear(r.accum)
	r.log.Warnf("replica: page repair: %d of %d pages differ from the backup's; sending them with the rest of the state (%d KiB)",
		n, r.mh.pages, buf.Len()>>10)
	return buf.Bytes(), nil
}

// injectDivergence flips a byte of the first page the guest dirtied in
// this epoch: a real difference of state that the hash must catch.
func (r *Replica) injectDivergence() {
	mem := r.m.Memory()
	vmm.ForEachPage(r.scratch, func(pfn uint64) {
		if r.injected {
			return
		}
		mem[pfn*snapshot.PageSize+snapshot.PageSize-1] ^= 0x5a
		r.injected = true
		r.log.Warnf("replica: test divergence injected into guest page %#x", pfn)
	})
}

// settleDisks completes the disk requests in flight (vmm.SettleDisks),
// without the lock: it waits for the I/O goroutines, a flush perhaps, and
// the heartbeats must go on meanwhile, as while capturing. The vCPU thread
// alone touches the machine. mu is held on entry and return.
func (r *Replica) settleDisks() {
	r.mu.Unlock()
	r.m.SettleDisks()
	r.mu.Lock()
}

// capture is a checkpoint at a quiescent point, as one stream.
func (r *Replica) capture(full bool) ([]byte, error) {
	// Disk requests in flight complete first, at this point, so that the
	// state has none and the dirty log below sees what they wrote
	// (devices/virtio_blk.go). A backup installing it drops its own.
	r.settleDisks()
	// The checkpoint would drain the dirty log (a full one drops it): take
	// it first, so that the verify hash sees those pages, and only those.
	if _, err := r.m.DirtyLog(r.scratch); err != nil {
		return nil, fmt.Errorf("checkpoint: %w", err)
	}
	for i, w := range r.scratch {
		r.accum[i] |= w
	}
	if r.mh != nil {
		r.mh.mark(r.scratch)
	}
	// Capturing and encoding many pages (a full state, a guest computing
	// through a long epoch) takes a while: the ticker and the link reader
	// go on meanwhile, as while hashing, so that the heartbeats do not
	// stop. The vCPU thread alone touches the machine, the bitmaps and
	// the checkpoint buffer, and the node accepts Tick and Step before
	// Checkpointed.
	r.mu.Unlock()
	blob, err := r.captureUnlocked(full)
	r.mu.Lock()
	return blob, err
}

func (r *Replica) captureUnlocked(full bool) ([]byte, error) {
	if err := r.m.CheckpointWith(&r.cp, vmm.CheckpointOptions{Full: full, Extra: r.accum}); err != nil {
		return nil, fmt.Errorf("checkpoint: %w", err)
	}
	clear(r.accum)
	var buf bytes.Buffer
	if err := r.cp.Write(snapshot.NewWriter(&buf)); err != nil {
		return nil, fmt.Errorf("checkpoint: %w", err)
	}
	return buf.Bytes(), nil
}

// install replaces the machine's state with the primary's (pageRepair:
// a page repair's, which writes only the pages that differed). Unless the
// backup is joining (its device starts from nothing, and its images are
// the primary's copies), the state's disks must be where this replica's
// own devices are (checkDiskSeqs).
func (r *Replica) install(blob []byte, pageRepair, join bool) error {
	sr := snapshot.NewStreamReader(snapshot.NewReader(bytes.NewReader(blob)), func(h snapshot.Header) ([]byte, error) {
		if h.MemSize != r.m.MemSize() {
			return nil, fmt.Errorf("state for %d MiB of guest memory, this replica has %d MiB", h.MemSize>>20, r.m.MemSize()>>20)
		}
		return r.m.Memory(), nil
	})
	// The verify hash must see the pages the install changed (the dirty
	// log does not: the guest did not write them).
	if r.mh != nil {
		sr.Wrote = r.mh.markPage
	}
	// Without the lock, as capture: decoding and writing a large state
	// takes a while, and the heartbeats must go on.
	r.mu.Unlock()
	st, err := sr.Read()
	var seqErr error
	if err == nil && !join {
		r.seqs = r.m.DiskNextSeqs(r.seqs[:0])
		seqErr = checkDiskSeqs(r.seqs, st.Disks)
	}
	if err == nil && seqErr == nil {
		err = r.m.Install(st)
	}
	r.mu.Lock()
	if seqErr != nil {
		r.log.Errorf("replica: DIVERGENCE: %v", seqErr)
		return fmt.Errorf("install the primary's state: %w", seqErr)
	}
	if err != nil {
		return fmt.Errorf("install the primary's state: %w", err)
	}
	r.last = vmm.Point{Kind: vmm.PointKind(st.Machine.PointKind), Exits: st.Machine.PointExits, Instrs: st.Machine.Stats.Instrs}
	// What this replica's guest dirtied is replaced, and the install's
	// own writes are not the guest's.
	if _, err := r.m.DirtyLog(r.scratch); err != nil {
		return fmt.Errorf("install: %w", err)
	}
	if r.mh != nil {
		r.mh.mark(r.scratch)
		if r.node.Status().Diverged {
			r.repaired(len(blob), pageRepair)
		}
	}
	clear(r.accum)
	return nil
}

// checkDiskSeqs compares each disk's next request sequence number on this
// replica (have) with the installed state's. A backup installing a
// checkpoint or a repair ran the guest to the state's position, so its
// devices took the primary's requests, numbered alike (docs/REPLICATION.md,
// "Disks"): a different number means this replica's image missed writes
// the primary's has, or has writes it lacks, which no install repairs (an
// image is not part of a state). Different disk counts are left to
// vmm.Machine.Install's check.
func checkDiskSeqs(have []uint64, want []snapshot.Disk) error {
	if len(have) != len(want) {
		return nil
	}
	for i, d := range want {
		switch {
		case have[i] < d.NextSeq:
			return fmt.Errorf("%w: disk %d: the primary's state is at request %d, this replica's device at %d: its image missed %d requests' writes",
				ft.ErrDivergence, i, d.NextSeq, have[i], d.NextSeq-have[i])
		case have[i] > d.NextSeq:
			return fmt.Errorf("%w: disk %d: the primary's state is at request %d, this replica's device at %d: its image has %d requests the primary's has not",
				ft.ErrDivergence, i, d.NextSeq, have[i], have[i]-d.NextSeq)
		}
	}
	return nil
}

// repairShown bounds the page numbers a repair's log line lists.
const repairShown = 24

// repaired says which pages a repair's install changed: those in which
// this replica's memory differed from the primary's state (ft/doc.go,
// verify mode: the repair installs the primary's full state). It brings
// the memory hash up to date over every page the install wrote, without
// the lock, as hash does; the next epoch end's hash then has nothing left
// to do. The primary's state is from its next kick point after the
// divergence, so the pages it changed since then count too.
func (r *Replica) repaired(stateBytes int, pageRepair bool) {
	var n uint64
	var first []uint64
	r.mu.Unlock()
	r.mh.digestChanged(func(pfn uint64) {
		n++
		if len(first) < repairShown {
			first = append(first, pfn)
		}
	})
	r.mu.Lock()
	r.prof.repairs++
	r.prof.repairPages += n
	r.prof.repairBytes += uint64(stateBytes)
	what := "the full state"
	if pageRepair {
		r.prof.pageRepairs++
		what = "a page repair"
	}
	r.log.Warnf("replica: the repair (%s, %d KiB) replaced %d pages that differed from the primary's (%d KiB); first page numbers: %#x",
		what, stateBytes>>10, n, n*snapshot.PageSize>>10, first)
}
