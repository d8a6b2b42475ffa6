package driver

import (
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ftkvm/ftkvm/vmm"
	"github.com/ftkvm/ftkvm/vmm/snapshot"
)

// fakeMachine is a deterministic guest behind the driver's Machine
// interface. Its Run is vmm.Machine.Run's loop over a made-up instruction
// stream: guest-caused exits are delivery points (At), HLT waits in Halt
// until an interrupt is pending, clock reads go through Now, console
// output through the replica's console writer, the timer and the UART
// receive the node's events, and compute stretches without exits run
// until a kick interrupts them (PointKick), which gives checkpoint
// epochs.
//
// Its whole state is in what a checkpoint captures (the registers, guest
// memory, the machine's point, Stats and halted flag), and everything it
// computes depends on what it read, received and had in memory, so a
// wrong value read, an event delivered at another position or into
// another state, or a page a checkpoint left out, changes what it
// outputs.
type fakeMachine struct {
	env     *Replica
	console io.Writer
	endAt   uint64 // the guest ends (status simStatus) at this exit
	maxWork uint64

	// nicTx, if set, is the guest's one network interface's transmit side
	// (Replica.NetTx(0)): the guest sends frames and receives them.
	nicTx io.Writer

	// Guest state. Registers: RAX its computation, RBX interrupts pending,
	// RCX bytes in its UART FIFO, RDX compute left in a stretch, RSI
	// outputs produced, RDI the timer's deadline (virtual ns), R8 frames
	// transmitted.
	regs      struct{ rax, rbx, rcx, rdx, rsi, rdi, r8 uint64 }
	mem       []byte
	halted    bool
	point     vmm.Point
	stats     snapshot.Stats
	quiescent bool

	dirtyOn bool
	dirty   []uint64

	kickReq atomic.Bool
	wake    chan struct{}
	killed  atomic.Bool

	// What the test looks at. mu: the log hook reads len(delivered).
	mu          sync.Mutex
	delivered   []delivery
	installs    int
	installedAt int // len(delivered) at the last install
}

// delivery is one event the guest received, with where and into what.
type delivery struct {
	pos   uint64
	state [8]byte // the guest's registers before it
	event string
}

const (
	simMemSize = 2 << 20
	simPages   = simMemSize / snapshot.PageSize
	simFIFO    = 4
	simPeriod  = int64(time.Millisecond) // the timer's period, virtual ns
	simStatus  = 3
	// simUnit is how long one unit of a compute stretch takes: a stretch
	// of tens to hundreds of units outlasts KickAfter, so the primary
	// ends its epoch with a kick and a checkpoint.
	simUnit = 40 * time.Microsecond
)

var errKilled = errors.New("killed")

func newFakeMachine(endAt, maxWork uint64) *fakeMachine {
	f := &fakeMachine{endAt: endAt, maxWork: maxWork, mem: make([]byte, simMemSize), wake: make(chan struct{}, 1)}
	f.regs.rdi = uint64(simPeriod) // the guest programs its timer at boot
	f.dirty = make([]uint64, f.BitmapWords())
	return f
}

func mix(a, b uint64) uint64 {
	x := a ^ (b + 0x9e3779b97f4a7c15 + a<<6 + a>>2)
	x ^= x >> 31
	x *= 0xbf58476d1ce4e5b9
	x ^= x >> 29
	return x
}

// ---- the guest ----

func (f *fakeMachine) word(pfn, off uint64) []byte {
	a := pfn*snapshot.PageSize + off%(snapshot.PageSize/8-1)*8
	return f.mem[a : a+8]
}

// touch reads a word of memory into the computation and writes the result
// elsewhere, as a guest does: a page a checkpoint misses shows.
func (f *fakeMachine) touch(h uint64) {
	f.regs.rax = mix(f.regs.rax, binary.LittleEndian.Uint64(f.word(h%simPages, h>>20)))
	pfn := (h >> 9) % simPages
	binary.LittleEndian.PutUint64(f.word(pfn, h>>32), f.regs.rax)
	f.dirty[pfn/64] |= 1 << (pfn % 64)
}

// take: the guest takes one pending interrupt (vmm's inject, if the guest
// can take it now: a function of its state, as IF is).
func (f *fakeMachine) take() {
	if f.regs.rbx == 0 || f.regs.rax>>7&1 == 1 {
		return
	}
	f.regs.rbx--
	f.regs.rcx = 0 // its handler drains the FIFO
	f.regs.rax = mix(f.regs.rax, 0x1a7)
	f.stats.Injected++
}

func (f *fakeMachine) snapshotRegs() (s [8]byte) {
	h := sha256.New()
	_ = binary.Write(h, binary.LittleEndian, f.regs)
	copy(s[:], h.Sum(nil))
	return s
}

func (f *fakeMachine) record(ev string) {
	f.mu.Lock()
	f.delivered = append(f.delivered, delivery{pos: f.point.Exits, state: f.snapshotRegs(), event: ev})
	f.mu.Unlock()
}

// Run is vmm.Machine.Run's loop.
func (f *fakeMachine) Run() (int, error) {
	if err := f.env.Start(f.kick); err != nil {
		return 0, fmt.Errorf("start environment: %w", err)
	}
	defer f.env.Stop()
	f.kickReq.Store(true) // the first KVM_RUN returns at once
	for {
		if f.killed.Load() {
			return 0, errKilled
		}
		if f.halted {
			if err := f.env.Halt(f.point, f); err != nil {
				return 0, err
			}
			if !f.halted {
				// An install replaced the halted state (vmm/loop.go):
				// go on as from the kick point it was captured at.
				if f.point.Delivered {
					f.take()
				}
				continue
			}
			if f.regs.rbx == 0 {
				continue
			}
			f.halted = false
			f.take()
		}
		// KVM_RUN.
		if f.kickReq.Swap(false) {
			f.quiescent = true
			f.point.Kind, f.point.Delivered = vmm.PointKick, false
			f.stats.Kicks++
			if err := f.env.At(f.point, f); err != nil {
				return 0, err
			}
			if f.point.Delivered {
				f.take()
			}
			continue
		}
		if f.regs.rdx > 0 {
			f.regs.rdx--
			f.touch(mix(f.regs.rax, 0xC0FFEE))
			time.Sleep(simUnit)
			continue
		}
		// The next guest-caused exit and its handling.
		f.quiescent = false
		f.stats.Exits++
		f.point = vmm.Point{Kind: vmm.PointExit, Exits: f.stats.Exits}
		e := f.stats.Exits
		h := mix(f.regs.rax, e)
		f.touch(h)
		if e >= f.endAt && !f.killed.Load() {
			// outb to the debug-exit port: the machine stops in the
			// exit's handling, before any point.
			return simStatus, nil
		}
		halt := false
		switch h % 16 {
		case 0, 1, 2:
			f.read()
		case 3:
			f.read()
			f.read()
		case 4, 5:
			f.output()
		case 6:
			f.read()
			f.output()
		case 7, 8:
			halt = true
			f.quiescent = true
			f.stats.HaltExits++
		case 9:
			if h%64 == 9 {
				f.regs.rdx = 30 + (h>>8)%f.maxWork
			}
		case 10, 11:
			if f.nicTx != nil {
				f.transmit()
			}
		}
		if err := f.env.At(f.point, f); err != nil {
			return 0, err
		}
		if halt && f.regs.rbx == 0 {
			f.halted = true
			continue
		}
		f.take()
	}
}

func (f *fakeMachine) read() {
	f.regs.rax = mix(f.regs.rax, uint64(f.env.Now()))
}

// output writes one console line that names its sequence number and the
// guest's state: "<seq> <state>\n".
func (f *fakeMachine) output() {
	f.regs.rsi++
	_, _ = fmt.Fprintf(f.console, "%d %016x\n", f.regs.rsi, f.regs.rax)
	f.stats.ConsoleBytes += 18
}

// transmit sends one frame on the guest's network interface: a broadcast
// of an experimental EtherType whose payload names its sequence number and
// the guest's state (simFrame).
func (f *fakeMachine) transmit() {
	f.regs.r8++
	_, _ = f.nicTx.Write(simFrame(f.regs.r8, f.regs.rax))
}

// simFrame is the fake guest's frame number seq in state: 60 bytes,
// EtherType 0x88b5, the number and the state in the payload.
func simFrame(seq, state uint64) []byte {
	b := make([]byte, 60)
	copy(b, []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff})
	copy(b[6:], simMAC)
	b[12], b[13] = 0x88, 0xb5
	binary.LittleEndian.PutUint64(b[14:], seq)
	binary.LittleEndian.PutUint64(b[22:], state)
	return b
}

var simMAC = []byte{0x02, 0x5e, 0, 0, 0, 1}

func (f *fakeMachine) kick() {
	f.kickReq.Store(true)
	select {
	case f.wake <- struct{}{}:
	default:
	}
}

// ---- vmm.Target ----

func (f *fakeMachine) TimerDeadline() (int64, bool) { return int64(f.regs.rdi), true }

func (f *fakeMachine) FireTimer(now int64) {
	f.record(fmt.Sprintf("timer %d", now))
	f.regs.rax = mix(f.regs.rax, uint64(now))
	f.regs.rbx++
	f.regs.rdi = uint64(now + simPeriod)
	f.point.Delivered = true
	f.stats.TimerEvents++
}

func (f *fakeMachine) RxSpace() int { return simFIFO - int(f.regs.rcx) }

// The fake guest has no disks: nothing to settle, wait for or list.
func (f *fakeMachine) SettleDisks()                             {}
func (f *fakeMachine) ServiceDisks()                            {}
func (f *fakeMachine) DiskNextSeqs(dst []uint64) []uint64       { return dst }
func (f *fakeMachine) WaitDisk(int, uint64)                     {}
func (f *fakeMachine) DiskInFlight(fn func(vmm.DiskCompletion)) {}

// CompleteDisk: the fake guest has no disks.
func (f *fakeMachine) CompleteDisk(disk int, seq uint64) (uint8, bool) {
	panic(fmt.Sprintf("driver simulation: a completion delivered to disk %d of a guest without disks", disk))
}

// ReceiveFrame: a frame arrives on the guest's network interface; what it
// holds enters the computation, and an interrupt is raised.
func (f *fakeMachine) ReceiveFrame(nic int, frame []byte) {
	if f.nicTx == nil || nic != 0 {
		panic(fmt.Sprintf("driver simulation: a frame delivered to network interface %d of a guest without it", nic))
	}
	sum := sha256.Sum256(frame)
	f.record(fmt.Sprintf("frame %x", sum[:8]))
	f.regs.rax = mix(f.regs.rax, binary.LittleEndian.Uint64(sum[:]))
	f.regs.rbx++
	f.point.Delivered = true
}

func (f *fakeMachine) Receive(b byte) {
	f.record(fmt.Sprintf("uart %#x", b))
	if f.regs.rcx < simFIFO {
		f.regs.rcx++
		f.regs.rax = mix(f.regs.rax, uint64(b)^0x55)
		f.regs.rbx++
	}
	f.point.Delivered = true
	f.stats.InputBytes++
}

func (f *fakeMachine) Pending() bool         { return f.regs.rbx > 0 }
func (f *fakeMachine) Wake() <-chan struct{} { return f.wake }

// ---- the rest of driver.Machine ----

func (f *fakeMachine) EnableDirtyLog() error { f.dirtyOn = true; return nil }

func (f *fakeMachine) DirtyLog(bitmap []uint64) (int, error) {
	if !f.dirtyOn {
		return 0, errors.New("fake: dirty log off")
	}
	n := 0
	for i, w := range f.dirty {
		bitmap[i] = w
		for ; w != 0; w &= w - 1 {
			n++
		}
	}
	clear(f.dirty)
	return n, nil
}

func (f *fakeMachine) BitmapWords() int { return (simPages + 63) / 64 }
func (f *fakeMachine) Memory() []byte   { return f.mem }
func (f *fakeMachine) MemSize() uint64  { return simMemSize }
func (f *fakeMachine) Steps() uint64    { return f.stats.Steps }

func (f *fakeMachine) WriteRegsHash(w io.Writer) error {
	return binary.Write(w, binary.LittleEndian, f.regs)
}

var errFakeNotQuiescent = errors.New("fake: state captured or installed at an exit that is not quiescent")

// CheckpointWith is vmm.Machine.CheckpointWith: pages dirtied since the
// last one (and o.Extra) or all of them, and the whole state.
func (f *fakeMachine) CheckpointWith(cp *vmm.Checkpoint, o vmm.CheckpointOptions) error {
	if !f.quiescent {
		return errFakeNotQuiescent
	}
	words := f.BitmapWords()
	cp.Dirty = slices.Grow(cp.Dirty[:0], words)[:words]
	cp.Full = o.Full || !f.dirtyOn
	f.dirtyOn = true
	if cp.Full {
		for i := range cp.Dirty {
			cp.Dirty[i] = ^uint64(0)
		}
		clear(f.dirty)
	} else {
		if _, err := f.DirtyLog(cp.Dirty); err != nil {
			return err
		}
		for i := range cp.Dirty {
			cp.Dirty[i] |= o.Extra[i]
		}
	}
	cp.N = 0
	cp.Pages = cp.Pages[:0]
	vmm.ForEachPage(cp.Dirty, func(pfn uint64) {
		cp.Pages = append(cp.Pages, f.mem[pfn*snapshot.PageSize:(pfn+1)*snapshot.PageSize]...)
		cp.N++
	})
	s := &cp.State
	s.Header = snapshot.Header{Version: snapshot.Version, Kind: snapshot.KindCheckpoint, MemSize: simMemSize}
	r := &s.VCPU.Regs
	r.RAX, r.RBX, r.RCX, r.RDX, r.RSI, r.RDI = f.regs.rax, f.regs.rbx, f.regs.rcx, f.regs.rdx, f.regs.rsi, f.regs.rdi
	r.R8 = f.regs.r8
	s.Machine = snapshot.Machine{Halted: f.halted, PointKind: uint8(f.point.Kind), PointExits: f.point.Exits, Stats: f.stats}
	f.env.SaveState(&s.Env)
	return nil
}

// Install is vmm.Machine.Install (memory was written by the stream).
func (f *fakeMachine) Install(s *snapshot.State) error {
	if !f.quiescent {
		return errFakeNotQuiescent
	}
	if s.Header.MemSize != simMemSize {
		return fmt.Errorf("fake: state for %d bytes of memory", s.Header.MemSize)
	}
	r := &s.VCPU.Regs
	f.regs.rax, f.regs.rbx, f.regs.rcx, f.regs.rdx, f.regs.rsi, f.regs.rdi = r.RAX, r.RBX, r.RCX, r.RDX, r.RSI, r.RDI
	f.regs.r8 = r.R8
	f.halted = s.Machine.Halted
	f.point = vmm.Point{Kind: vmm.PointKind(s.Machine.PointKind), Exits: s.Machine.PointExits}
	f.stats = s.Machine.Stats
	f.env.RestoreState(&s.Env)
	f.mu.Lock()
	f.installs++
	f.installedAt = len(f.delivered)
	f.mu.Unlock()
	return nil
}

var _ Machine = (*fakeMachine)(nil)

// status is a promoted or ended replica's result.
type runResult struct {
	status int
	err    error
}
