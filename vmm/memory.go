package vmm

import (
	"fmt"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Memory is the guest's physical RAM: one anonymous mapping, registered with
// KVM as slot 0 at guest physical address 0.
type Memory struct {
	b []byte
}

// NewMemory maps size bytes of zeroed, lazily backed memory.
func NewMemory(size uint64) (*Memory, error) {
	if size == 0 || size%(2<<20) != 0 {
		return nil, fmt.Errorf("guest memory size %d is not a positive multiple of 2 MiB", size)
	}
	b, err := unix.Mmap(-1, 0, int(size), unix.PROT_READ|unix.PROT_WRITE,
		unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_NORESERVE)
	if err != nil {
		return nil, fmt.Errorf("mmap %d bytes of guest memory: %w", size, err)
	}
	return &Memory{b: b}, nil
}

// Bytes returns the whole of guest memory; index = guest physical address.
func (m *Memory) Bytes() []byte { return m.b }

// Size is the guest memory size in bytes.
func (m *Memory) Size() uint64 { return uint64(len(m.b)) }

// Close unmaps guest memory. The VM using it must be closed first.
func (m *Memory) Close() error {
	if m.b == nil {
		return nil
	}
	err := unix.Munmap(m.b)
	m.b = nil
	if err != nil {
		return fmt.Errorf("munmap guest memory: %w", err)
	}
	return nil
}

// Addr is the host virtual address of guest physical address 0.
func (m *Memory) Addr() uint64 { return uint64(uintptr(unsafe.Pointer(&m.b[0]))) }
