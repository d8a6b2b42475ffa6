package vmm

import (
	"errors"
	"fmt"
	"math/bits"
	"sync"
	"sync/atomic"

	"github.com/ftkvm/ftkvm/kvm"
	"github.com/ftkvm/ftkvm/vmm/snapshot"
)

// Dirty page tracking. KVM's dirty log (KVM_MEM_LOG_DIRTY_PAGES on slot 0)
// reports the pages the guest wrote. It does not see the VMM's own writes
// to guest memory: a device model that writes guest memory (DMA, virtio
// rings) must call MarkDirty. None of the current models does.

type dirtyLog struct {
	on  atomic.Bool
	mu  sync.Mutex
	vmm []uint64 // pages marked by MarkDirty since the last DirtyLog
}

// Pages is the number of guest pages, the bit count of a dirty bitmap.
func (m *Machine) Pages() uint64 { return m.mem.Size() / snapshot.PageSize }

// BitmapWords is the length a dirty bitmap needs.
func (m *Machine) BitmapWords() int { return int((m.Pages() + 63) / 64) }

// DirtyLogging reports whether the dirty log is on.
func (m *Machine) DirtyLogging() bool { return m.dl.on.Load() }

// EnableDirtyLog turns KVM's dirty log on for guest memory and starts a new
// interval: DirtyLog then reports pages written after this call. Call it
// before Run or on the vCPU thread (inside Do or Post). If the log was on
// already it is reset.
func (m *Machine) EnableDirtyLog() error {
	if m.dl.on.Load() {
		// Reset: read and drop what accumulated.
		_, err := m.DirtyLog(make([]uint64, m.BitmapWords()))
		return err
	}
	m.dl.mu.Lock()
	m.dl.vmm = make([]uint64, m.BitmapWords())
	m.dl.mu.Unlock()
	if err := m.setSlot(kvm.MemLogDirtyPages); err != nil {
		return fmt.Errorf("enable dirty log: %w", err)
	}
	m.dl.on.Store(true)
	return nil
}

// DisableDirtyLog turns the dirty log off (same threading as
// EnableDirtyLog).
func (m *Machine) DisableDirtyLog() error {
	if !m.dl.on.Load() {
		return nil
	}
	m.dl.on.Store(false)
	if err := m.setSlot(0); err != nil {
		return fmt.Errorf("disable dirty log: %w", err)
	}
	return nil
}

// ErrNoDirtyLog is returned by DirtyLog when the log is off.
var ErrNoDirtyLog = errors.New("dirty log is off")

// DirtyLog fills bitmap (bit i of word i/64 = guest page i; at least
// BitmapWords words) with the pages written since the previous call or
// EnableDirtyLog, by the guest or through MarkDirty, and starts a new
// interval. It returns the number of dirty pages. Any goroutine; the guest
// may be running (a page it writes during the call shows up in this
// interval or the next).
func (m *Machine) DirtyLog(bitmap []uint64) (int, error) {
	if !m.dl.on.Load() {
		return 0, ErrNoDirtyLog
	}
	if len(bitmap) < m.BitmapWords() {
		return 0, fmt.Errorf("dirty bitmap of %d words, %d needed", len(bitmap), m.BitmapWords())
	}
	m.dl.mu.Lock()
	defer m.dl.mu.Unlock()
	if err := m.vm.GetDirtyLog(0, bitmap); err != nil {
		return 0, err
	}
	n := 0
	for i, w := range m.dl.vmm {
		w |= bitmap[i]
		bitmap[i] = w
		m.dl.vmm[i] = 0
		n += bits.OnesCount64(w)
	}
	return n, nil
}

// MarkDirty records that the VMM wrote guest memory [gpa, gpa+n), for the
// next DirtyLog. Any goroutine; it does nothing while the log is off.
func (m *Machine) MarkDirty(gpa, n uint64) {
	if n == 0 || !m.dl.on.Load() {
		return
	}
	first := gpa / snapshot.PageSize
	last := min((gpa+n-1)/snapshot.PageSize, m.Pages()-1)
	m.dl.mu.Lock()
	for p := first; p <= last; p++ {
		m.dl.vmm[p/64] |= 1 << (p % 64)
	}
	m.dl.mu.Unlock()
}
