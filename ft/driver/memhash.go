package driver

import (
	"crypto/sha256"
	"encoding/binary"
	"hash"
	"math/bits"
)

// memHash is a hash of all of guest memory that costs, at each epoch end,
// only the pages that may have changed since the last one.
//
// Verify mode compares the replicas' states. Hashing the pages the dirty
// log names (as this driver first did) compares the dirty sets as well as
// the contents, and a dirty set is not the guest's to decide: on this
// project's hosts a clean run of a ring-3 guest had the backup's log name
// the user code page (0x200000), which no instruction writes and the
// primary's log never named, and the run was reported diverged. So the
// hash is instead the sum of a SHA-256 per page (of its number and
// contents) over every page: a page named dirty without changing adds
// what it subtracts, and two replicas agree exactly when their memories
// do (up to SHA-256 and the 256-bit sum). Every page whose contents may
// have changed must be named (mark); naming too many only costs time.
type memHash struct {
	mem   []byte
	pages uint64
	per   [][4]uint64 // each page's hash, as four little-endian words
	sum   [4]uint64   // lane-wise sum of per, mod 2^64
	stale []uint64    // pages to hash again (bitmap)
	ready bool        // per and sum are computed
	h     hash.Hash
	buf   []byte
	num   []byte // 8 bytes: a page number, kept so hashing allocates nothing
}

const memHashPage = 4096

func newMemHash(mem []byte) *memHash {
	pages := uint64(len(mem)) / memHashPage
	return &memHash{mem: mem, pages: pages, per: make([][4]uint64, pages),
		stale: make([]uint64, (pages+63)/64), h: sha256.New(), buf: make([]byte, 0, sha256.Size), num: make([]byte, 8)}
}

// mark names pages whose contents may have changed (a dirty bitmap).
func (m *memHash) mark(bitmap []uint64) {
	for i := range min(len(bitmap), len(m.stale)) {
		m.stale[i] |= bitmap[i]
	}
}

// markPage names one page.
func (m *memHash) markPage(pfn uint64) {
	if pfn < m.pages {
		m.stale[pfn/64] |= 1 << (pfn % 64)
	}
}

// page hashes page pfn.
func (m *memHash) page(pfn uint64) [4]uint64 {
	binary.LittleEndian.PutUint64(m.num, pfn)
	m.h.Reset()
	m.h.Write(m.num)
	m.h.Write(m.mem[pfn*memHashPage : (pfn+1)*memHashPage])
	m.buf = m.h.Sum(m.buf[:0])
	var w [4]uint64
	for i := range w {
		w[i] = binary.LittleEndian.Uint64(m.buf[8*i:])
	}
	return w
}

func (m *memHash) update(pfn uint64) {
	nw := m.page(pfn)
	for i := range m.sum {
		m.sum[i] += nw[i] - m.per[pfn][i]
	}
	m.per[pfn] = nw
}

// digest brings the hash up to date and returns it: the first time over
// every page, then over the pages marked since.
func (m *memHash) digest() [32]byte { return m.digestChanged(nil) }

// digestChanged is digest, and calls changed (if set) for every marked
// page whose contents hash differently from when it was last hashed: a
// repair's install names every page it wrote, and these are the ones in
// which the replica's memory differed from the primary's. Not on the
// first digest, which has nothing to compare with.
func (m *memHash) digestChanged(changed func(pfn uint64)) [32]byte {
	if !m.ready {
		m.sum = [4]uint64{}
		for pfn := range m.pages {
			m.per[pfn] = m.page(pfn)
			for i := range m.sum {
				m.sum[i] += m.per[pfn][i]
			}
		}
		m.ready = true
		clear(m.stale)
	}
	for i, w := range m.stale {
		for w != 0 {
			pfn := uint64(i)*64 + uint64(bits.TrailingZeros64(w))
			w &= w - 1
			if pfn < m.pages {
				old := m.per[pfn]
				m.update(pfn)
				if changed != nil && m.per[pfn] != old {
					changed(pfn)
				}
			}
		}
		m.stale[i] = 0
	}
	var d [32]byte
	for i, v := range m.sum {
		binary.LittleEndian.PutUint64(d[8*i:], v)
	}
	return d
}
