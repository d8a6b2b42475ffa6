package devices

import (
	"fmt"
	"math"
	"math/bits"
)

// Intel 8254 programmable interval timer at 0x40-0x43, and port 0x61
// (counter 2 gate and OUT2, PC speaker). Section references are to the Intel
// 8254 datasheet (order no. 231164): "Control Word Format", "Read
// Operations", "Counter Latch Command", "Read-Back Command", "Status Byte",
// "Mode 0" ... "Mode 5", "Gate".
//
// Counter values are computed from Clock.Now() and the time the count was
// loaded; the clock is read only when the guest reads a running counter,
// latches it, loads a count, changes counter 2's gate, or reads OUT2 on port
// 0x61. Counter 0 drives IRQ0: Deadline gives the virtual time of OUT0's next
// rising edge and Fire delivers it.
//
// Modelling choices:
//   - The count is loaded into the counting element (CE) at the write itself,
//     not on the next CLK: for an initial count N, mode 0's OUT rises N
//     ticks after the write (the datasheet's N+1 includes the load CLK), and
//     NULL COUNT clears at once when the load is immediate.
//   - Mode 2 and 3: a count written while counting takes effect at the end
//     of the current period (for mode 3 the datasheet says at the end of the
//     current half-cycle).
//   - Modes 1 and 5 wait for a gate rising edge; counters 0 and 1 have their
//     gate tied high, so only counter 2 (port 0x61 bit 0) can trigger them.
//   - After a control word and before a count is written, counter reads
//     return the last initial count (the clock is not read for it).

// PITFrequency is the 8254 input clock on a PC, in Hz.
const PITFrequency = 1193182

// Control word (port 0x43) fields ("Control Word Format").
const (
	PIT_CW_BCD      = 0x01 // binary coded decimal counter
	PIT_CW_MODE     = 0x0e // M2-M0
	PIT_CW_RW       = 0x30 // RW1-RW0
	PIT_CW_SC       = 0xc0 // SC1-SC0
	PIT_RW_LATCH    = 0    // counter latch command
	PIT_RW_LSB      = 1    // read/write least significant byte only
	PIT_RW_MSB      = 2    // read/write most significant byte only
	PIT_RW_LSB_MSB  = 3    // LSB first, then MSB
	PIT_SC_READBACK = 3    // read-back command
)

// Read-back command bits ("Read-Back Command"); COUNT and STATUS are active
// low.
const (
	PIT_RB_COUNT  = 0x20
	PIT_RB_STATUS = 0x10
	PIT_RB_CNT2   = 0x08
	PIT_RB_CNT1   = 0x04
	PIT_RB_CNT0   = 0x02
)

// Status byte ("Status Byte").
const (
	PIT_STATUS_OUTPUT    = 0x80
	PIT_STATUS_NULLCOUNT = 0x40
)

// Port 0x61 (system control port B) bits.
const (
	PORT61_GATE2   = 0x01 // counter 2 gate
	PORT61_SPKR    = 0x02 // speaker data enable
	PORT61_PCK_DIS = 0x04 // parity check disable
	PORT61_IOC_DIS = 0x08 // channel check disable
	PORT61_REFRESH = 0x10 // refresh toggle (read only)
	PORT61_OUT2    = 0x20 // counter 2 OUT (read only)
	PORT61_IOCHK   = 0x40 // channel check (read only, always 0)
	PORT61_PCK     = 0x80 // parity check (read only, always 0)
	port61Writable = 0x0f
)

// PIT is the 8254 plus port 0x61. Register the PIT itself at 0x40 (size 4)
// and Speaker() at 0x61 (size 1).
type PIT struct {
	clock     Clock
	irq       IRQ
	ch        [3]pitChannel
	port61    uint8
	refresh   bool
	speaker   pitSpeaker
	unhandled uint64
}

type pitChannel struct {
	mode      uint8 // M2-M0 as programmed (6 and 7 alias 2 and 3)
	rw        uint8
	bcd       bool
	gate      bool
	cr        uint16 // last count written, raw
	crN       uint32 // cr decoded: 1..65536 binary, 1..10000 BCD
	count     uint32 // N the counting element works with
	hasCount  bool   // a count was written since the control word
	triggered bool   // modes 1 and 5: a gate trigger loaded the CE
	nullCount bool
	// n, the CLK ticks since the CE was loaded, is tickBase +
	// ticks(now-startTime) while counting and tickBase when stopped.
	startTime int64
	tickBase  int64
	// Modes 2 and 3: crN replaces count when n reaches pendingAt.
	pending   bool
	pendingAt int64
	writeMSB  bool // LSB_MSB write flip-flop: next byte is the MSB
	writeLSB  uint8
	readMSB   bool // LSB_MSB read flip-flop for unlatched reads
	latched   bool
	latchMSB  bool
	latch     uint16
	statusOn  bool
	status    uint8
	// Next rising OUT edge (in n) not yet delivered by Fire.
	irqArmed bool
	irqEdge  int64
}

type pitSpeaker struct{ p *PIT }

// NewPIT returns a PIT whose counter 0 drives line 0 of irq. Counters start
// in mode 0 with no count (not counting, no deadline); counter 0 and 1 gates
// are high, counter 2's gate is port 0x61 bit 0 (initially 0).
func NewPIT(clock Clock, irq IRQ) *PIT {
	p := &PIT{clock: clock, irq: irq}
	for i := range p.ch {
		p.ch[i] = pitChannel{rw: PIT_RW_LSB_MSB, gate: i != 2, nullCount: true}
	}
	p.speaker = pitSpeaker{p: p}
	return p
}

// Speaker is port 0x61: bit 0 GATE2 and bit 1 speaker data (read/write),
// bits 2-3 read back as written, bit 4 refresh toggle, bit 5 OUT2. The
// refresh bit toggles on every read (no clock read), so loops waiting for it
// to change make progress deterministically. Reading OUT2 reads the clock
// when counter 2 is counting.
func (p *PIT) Speaker() Device { return &p.speaker }

// Unhandled counts accesses the PIT does not model.
func (p *PIT) Unhandled() uint64 { return p.unhandled }

// ticks returns the CLK ticks in d ns (0 for d <= 0).
func pitTicks(d int64) int64 {
	if d <= 0 {
		return 0
	}
	hi, lo := bits.Mul64(uint64(d), PITFrequency)
	q, _ := bits.Div64(hi, lo, 1e9) // hi < 2^21 < 1e9
	return int64(q)
}

// pitNanos returns the smallest d with pitTicks(d) >= k.
func pitNanos(k int64) int64 {
	if k <= 0 {
		return 0
	}
	hi, lo := bits.Mul64(uint64(k), 1e9)
	if hi >= PITFrequency {
		return math.MaxInt64
	}
	q, r := bits.Div64(hi, lo, PITFrequency)
	if r != 0 {
		q++
	}
	if q > math.MaxInt64 {
		return math.MaxInt64
	}
	return int64(q)
}

func (c *pitChannel) effMode() uint8 {
	if c.mode >= 6 {
		return c.mode - 4
	}
	return c.mode
}

// running reports whether the CE is counting (n advances with time).
func (c *pitChannel) running() bool {
	switch c.effMode() {
	case 1, 5:
		return c.triggered
	default:
		return c.hasCount && c.gate
	}
}

func (c *pitChannel) ticksAt(now int64) int64 {
	if !c.running() {
		return c.tickBase
	}
	return c.tickBase + pitTicks(now-c.startTime)
}

// timeOfTick returns the virtual time at which n reaches e (while running).
func (c *pitChannel) timeOfTick(e int64) int64 {
	if e <= c.tickBase {
		return c.startTime
	}
	d := pitNanos(e - c.tickBase)
	if c.startTime > 0 && d > math.MaxInt64-c.startTime {
		return math.MaxInt64
	}
	return c.startTime + d
}

// applyPending switches a mode 2/3 counter to its new count once n reaches
// the end of the period in which it was written; it returns n in the
// (possibly rebased) counting sequence.
func (c *pitChannel) applyPending(n int64) int64 {
	if c.pending && n >= c.pendingAt {
		c.pending = false
		c.count = c.crN
		c.nullCount = false
		c.tickBase -= c.pendingAt
		if c.irqArmed {
			c.irqEdge -= c.pendingAt
		}
		n -= c.pendingAt
	}
	return n
}

// value returns the CE contents (what an unlatched read or a latch sees),
// encoded as binary or BCD. now is used only if running.
func (c *pitChannel) value(now int64) uint16 {
	m := c.effMode()
	var v int64
	if !c.hasCount || ((m == 1 || m == 5) && !c.triggered) {
		v = int64(c.count)
	} else {
		n := c.applyPending(c.ticksAt(now))
		N := int64(c.count)
		switch m {
		case 2: // N, N-1, ..., 1, N, ...
			v = N - n%N
		case 3: // decrements by two; odd N loads N-1 (see "Mode 3")
			p := n % N
			h := (N + 1) / 2
			if p >= h {
				p -= h
			}
			if N&1 == 0 {
				v = N - 2*p
			} else {
				v = N - 1 - 2*p
			}
		default: // 0, 1, 4, 5: count down and wrap
			v = N - n
		}
	}
	if c.bcd {
		v %= 10000
		if v < 0 {
			v += 10000
		}
		return uint16(v/1000)<<12 | uint16(v/100%10)<<8 | uint16(v/10%10)<<4 | uint16(v%10)
	}
	return uint16(v)
}

// out returns the OUT pin. now is used only if running.
func (c *pitChannel) out(now int64) bool {
	m := c.effMode()
	if !c.hasCount {
		return m != 0 // after a control word OUT is low in mode 0, high otherwise
	}
	switch m {
	case 1, 5:
		if !c.triggered {
			return true
		}
	case 2, 3:
		if !c.gate {
			return true // gate low forces OUT high
		}
	}
	n := c.applyPending(c.ticksAt(now))
	N := int64(c.count)
	switch m {
	case 0, 1:
		return n >= N
	case 2:
		return n%N != N-1 // low for one CLK when the count reaches 1
	case 3:
		return n%N < (N+1)/2 // high for ceil(N/2), low for floor(N/2)
	default: // 4, 5: low for one CLK when the count reaches 0
		return n != N
	}
}

// arm sets the first rising OUT edge after a load (n = 0).
func (c *pitChannel) arm() {
	N := int64(c.count)
	switch c.effMode() {
	case 4, 5:
		c.irqEdge = N + 1
	default:
		c.irqEdge = N
	}
	c.irqArmed = true
}

func (c *pitChannel) statusByte(now int64) uint8 {
	s := c.rw<<4 | c.mode<<1
	if c.bcd {
		s |= PIT_CW_BCD
	}
	if c.nullCount {
		s |= PIT_STATUS_NULLCOUNT
	}
	if c.out(now) {
		s |= PIT_STATUS_OUTPUT
	}
	return s
}

func pitDecode(raw uint16, bcd bool) uint32 {
	var n uint32
	if bcd {
		n = uint32(raw>>12)*1000 + uint32(raw>>8&0xf)*100 + uint32(raw>>4&0xf)*10 + uint32(raw&0xf)
		if n == 0 {
			n = 10000
		}
		return n
	}
	if raw == 0 {
		return 0x10000
	}
	return uint32(raw)
}

// now reads the clock only if c is counting.
func (p *PIT) nowFor(c *pitChannel) int64 {
	if c.running() {
		return p.clock.Now()
	}
	return 0
}

// Read implements Device for ports 0x40-0x43 (offsets 0-3).
func (p *PIT) Read(offset uint64, data []byte) {
	for i := range data {
		off := offset + uint64(i)
		if off > 2 {
			// 0x43 is write only ("Read Operations": no-operation).
			p.unhandled++
			data[i] = 0xff
			continue
		}
		data[i] = p.readCounter(&p.ch[off])
	}
}

func (p *PIT) readCounter(c *pitChannel) uint8 {
	if c.statusOn {
		// A latched status is read first, then a latched count.
		c.statusOn = false
		return c.status
	}
	if c.latched {
		switch c.rw {
		case PIT_RW_LSB:
			c.latched = false
			return uint8(c.latch)
		case PIT_RW_MSB:
			c.latched = false
			return uint8(c.latch >> 8)
		default:
			if c.latchMSB {
				c.latched, c.latchMSB = false, false
				return uint8(c.latch >> 8)
			}
			c.latchMSB = true
			return uint8(c.latch)
		}
	}
	v := c.value(p.nowFor(c))
	switch c.rw {
	case PIT_RW_LSB:
		return uint8(v)
	case PIT_RW_MSB:
		return uint8(v >> 8)
	default:
		if c.readMSB {
			c.readMSB = false
			return uint8(v >> 8)
		}
		c.readMSB = true
		return uint8(v)
	}
}

// Write implements Device for ports 0x40-0x43 (offsets 0-3).
func (p *PIT) Write(offset uint64, data []byte) {
	for i, v := range data {
		switch off := offset + uint64(i); {
		case off < 3:
			p.writeCounter(&p.ch[off], v)
		case off == 3:
			p.writeControl(v)
		default:
			p.unhandled++
		}
	}
}

func (p *PIT) writeControl(v uint8) {
	sc := v >> 6
	if sc == PIT_SC_READBACK {
		p.readBack(v)
		return
	}
	c := &p.ch[sc]
	rw := (v & PIT_CW_RW) >> 4
	if rw == PIT_RW_LATCH {
		// Counter Latch Command; a second latch before the count is read
		// is ignored.
		if !c.latched {
			c.latch = c.value(p.nowFor(c))
			c.latched, c.latchMSB = true, false
		}
		return
	}
	// A control word resets the counter's control logic: counting stops
	// until a count is written and OUT takes its initial state.
	c.rw = rw
	c.mode = (v & PIT_CW_MODE) >> 1
	c.bcd = v&PIT_CW_BCD != 0
	c.hasCount = false
	c.triggered = false
	c.pending = false
	c.nullCount = true
	c.writeMSB = false
	c.readMSB = false
	c.irqArmed = false
	c.tickBase = 0
}

// readBack handles the Read-Back Command: latch the count and/or status of
// several counters at once. A counter already latched keeps its first
// latch.
func (p *PIT) readBack(v uint8) {
	if v&0x01 != 0 {
		p.unhandled++ // D0 must be 0
	}
	var now int64
	for i := range p.ch {
		if v&(PIT_RB_CNT0<<i) != 0 && p.ch[i].running() {
			now = p.clock.Now()
			break
		}
	}
	for i := range p.ch {
		if v&(PIT_RB_CNT0<<i) == 0 {
			continue
		}
		c := &p.ch[i]
		if v&PIT_RB_COUNT == 0 && !c.latched {
			c.latch = c.value(now)
			c.latched, c.latchMSB = true, false
		}
		if v&PIT_RB_STATUS == 0 && !c.statusOn {
			c.status = c.statusByte(now)
			c.statusOn = true
		}
	}
}

func (p *PIT) writeCounter(c *pitChannel, v uint8) {
	switch c.rw {
	case PIT_RW_LSB:
		p.load(c, uint16(v))
	case PIT_RW_MSB:
		p.load(c, uint16(v)<<8)
	default:
		if c.writeMSB {
			c.writeMSB = false
			p.load(c, uint16(c.writeLSB)|uint16(v)<<8)
			return
		}
		c.writeLSB = v
		c.writeMSB = true
		if c.effMode() == 0 && c.hasCount {
			// Mode 0: writing the first byte disables counting and sets
			// OUT low.
			c.hasCount = false
			c.irqArmed = false
			c.nullCount = true
		}
	}
}

// load handles a complete count written to the count register.
func (p *PIT) load(c *pitChannel, raw uint16) {
	c.cr = raw
	c.crN = pitDecode(raw, c.bcd)
	c.nullCount = true
	switch c.effMode() {
	case 1, 5:
		// The CE is loaded by the next gate trigger.
		c.hasCount = true
		return
	case 2, 3:
		if c.hasCount && c.gate {
			// Counting: the new count is used from the end of the
			// current period.
			n := c.applyPending(c.ticksAt(p.clock.Now()))
			N := int64(c.count)
			c.pending = true
			c.pendingAt = (n/N + 1) * N
			return
		}
		if c.hasCount {
			return // gate low: the gate's rising edge reloads from crN
		}
	}
	// Modes 0 and 4 restart with the new count at once; modes 2 and 3 start
	// with their first count.
	c.count = c.crN
	c.hasCount = true
	c.nullCount = false
	c.pending = false
	c.tickBase = 0
	if c.gate {
		c.startTime = p.clock.Now()
	}
	c.arm()
}

// setGate drives counter c's gate ("Gate" table: modes 0, 2, 3, 4 count only
// while the gate is high; in modes 2 and 3 a low gate forces OUT high and
// a rising edge reloads the count; in modes 1 and 5 a rising edge triggers).
func (p *PIT) setGate(c *pitChannel, g bool) {
	if g == c.gate {
		return
	}
	if !c.hasCount {
		c.gate = g
		return
	}
	switch c.effMode() {
	case 0, 4:
		now := p.clock.Now()
		if g {
			c.startTime = now
		} else {
			c.tickBase = c.ticksAt(now)
		}
	case 2, 3:
		now := p.clock.Now()
		if g {
			c.count = c.crN
			c.pending = false
			c.nullCount = false
			c.tickBase = 0
			c.startTime = now
			c.arm()
		} else {
			c.tickBase = c.applyPending(c.ticksAt(now))
		}
	case 1, 5:
		if g {
			c.count = c.crN
			c.triggered = true
			c.nullCount = false
			c.tickBase = 0
			c.startTime = p.clock.Now()
			c.arm()
		}
	}
	c.gate = g
}

// Deadline returns the virtual time of counter 0's next OUT rising edge not
// yet delivered by Fire. There is none if counter 0 has no count, is not
// counting, or is in a one-shot mode (0, 1, 4, 5) whose edge was already
// delivered. It does not read the clock.
func (p *PIT) Deadline() (int64, bool) {
	c := &p.ch[0]
	if !c.irqArmed || !c.running() {
		return 0, false
	}
	return c.timeOfTick(c.irqEdge), true
}

// Fire delivers counter 0's rising edge due at or before now: an edge on
// IRQ0 (SetIRQ(0, true) then SetIRQ(0, false)). In modes 2 and 3 the next
// deadline is the edge after the one delivered, even if it is due by now
// too: a tick delivered late is not lost, the environment delivers the next
// one at its next point until the guest caught up (as KVM's in-kernel PIT
// reinjects). Edges more than pitMaxLag behind now are coalesced, as an
// 8259A merges edges the CPU has not taken: a guest that could not take its
// ticks for that long gets a bounded burst. One-shot modes have no further
// deadline. Fire is a no-op if there is no deadline or now is before it, and
// also while the interrupt controller still holds IRQ0's previous edge
// (irqHolder): a second edge would merge with it and be lost, so the
// deadline stays due. It does not read the clock: the result depends only
// on now and on the devices' state.
func (p *PIT) Fire(now int64) {
	dl, ok := p.Deadline()
	if !ok || now < dl {
		return
	}
	if h, ok := p.irq.(irqHolder); ok && h.Holds(0) {
		return
	}
	p.irq.SetIRQ(0, true)
	p.irq.SetIRQ(0, false)
	c := &p.ch[0]
	switch c.effMode() {
	case 2, 3:
		n := c.applyPending(c.ticksAt(now))
		N := int64(c.count)
		next := c.irqEdge + N
		if c.irqEdge < 0 {
			// A new count took effect after the delivered edge: its
			// first period boundary is next (edges of the old count
			// after the delivered one coalesce into it).
			next = 0
		}
		// At most lag edges stay due (those at or before n).
		lag := max(pitTicks(pitMaxLag)/N, 1)
		c.irqEdge = max(next, (n/N+1-lag)*N)
	default:
		c.irqArmed = false
	}
}

// pitMaxLag bounds the catch-up of Fire: ticks older than this (virtual
// ns) when they are delivered coalesce.
const pitMaxLag = int64(1e9)

// irqHolder is an interrupt controller that tells whether a line's last
// edge still waits for the CPU to take it (PIC.Holds).
type irqHolder interface{ Holds(line int) bool }

// Read implements Device for port 0x61.
func (s *pitSpeaker) Read(offset uint64, data []byte) {
	p := s.p
	for i := range data {
		if offset+uint64(i) != 0 {
			p.unhandled++
			data[i] = 0xff
			continue
		}
		p.refresh = !p.refresh
		v := p.port61 & port61Writable
		if p.refresh {
			v |= PORT61_REFRESH
		}
		c := &p.ch[2]
		if c.out(p.nowFor(c)) {
			v |= PORT61_OUT2
		}
		data[i] = v
	}
}

// Write implements Device for port 0x61. Bits 4-7 are read only.
func (s *pitSpeaker) Write(offset uint64, data []byte) {
	p := s.p
	for i, v := range data {
		if offset+uint64(i) != 0 {
			p.unhandled++
			continue
		}
		p.port61 = v & port61Writable
		p.setGate(&p.ch[2], v&PORT61_GATE2 != 0)
	}
}

// PITChannelState is one counter's state. Times are virtual ns; ticks count
// CLK pulses since the count was loaded.
type PITChannelState struct {
	Mode, RW      uint8
	BCD, Gate     bool
	CR            uint16
	CRN, Count    uint32
	HasCount      bool
	Triggered     bool
	NullCount     bool
	StartTime     int64
	TickBase      int64
	Pending       bool
	PendingAt     int64
	WriteMSB      bool
	WriteLSB      uint8
	ReadMSB       bool
	Latched       bool
	LatchMSB      bool
	Latch         uint16
	StatusLatched bool
	Status        uint8
	IRQArmed      bool
	IRQEdge       int64
}

// PITState is the PIT's and port 0x61's state.
type PITState struct {
	Channels [3]PITChannelState
	Port61   uint8
	Refresh  bool
}

// State returns the PIT's state.
func (p *PIT) State() PITState {
	var s PITState
	for i := range p.ch {
		c := &p.ch[i]
		s.Channels[i] = PITChannelState{
			Mode: c.mode, RW: c.rw, BCD: c.bcd, Gate: c.gate, CR: c.cr, CRN: c.crN,
			Count: c.count, HasCount: c.hasCount, Triggered: c.triggered,
			NullCount: c.nullCount, StartTime: c.startTime, TickBase: c.tickBase,
			Pending: c.pending, PendingAt: c.pendingAt, WriteMSB: c.writeMSB,
			WriteLSB: c.writeLSB, ReadMSB: c.readMSB, Latched: c.latched,
			LatchMSB: c.latchMSB, Latch: c.latch, StatusLatched: c.statusOn,
			Status: c.status, IRQArmed: c.irqArmed, IRQEdge: c.irqEdge,
		}
	}
	s.Port61 = p.port61
	s.Refresh = p.refresh
	return s
}

// SetState restores a state from State.
func (p *PIT) SetState(s PITState) error {
	for i, c := range s.Channels {
		switch {
		case c.Mode > 7:
			return fmt.Errorf("devices: PIT counter %d: mode %d", i, c.Mode)
		case c.RW < PIT_RW_LSB || c.RW > PIT_RW_LSB_MSB:
			return fmt.Errorf("devices: PIT counter %d: access mode %d", i, c.RW)
		case c.HasCount && (c.CRN == 0 || c.CRN > 0x10000):
			return fmt.Errorf("devices: PIT counter %d: count register %d", i, c.CRN)
		}
		m := c.Mode
		if m >= 6 {
			m -= 4
		}
		ceLoaded := c.Triggered || (c.HasCount && m != 1 && m != 5)
		if ceLoaded && (c.Count == 0 || c.Count > 0x10000) {
			return fmt.Errorf("devices: PIT counter %d: count %d", i, c.Count)
		}
	}
	if s.Port61&^port61Writable != 0 {
		return fmt.Errorf("devices: PIT port 0x61 %#x", s.Port61)
	}
	for i, c := range s.Channels {
		p.ch[i] = pitChannel{
			mode: c.Mode, rw: c.RW, bcd: c.BCD, gate: c.Gate, cr: c.CR, crN: c.CRN,
			count: c.Count, hasCount: c.HasCount, triggered: c.Triggered,
			nullCount: c.NullCount, startTime: c.StartTime, tickBase: c.TickBase,
			pending: c.Pending, pendingAt: c.PendingAt, writeMSB: c.WriteMSB,
			writeLSB: c.WriteLSB, readMSB: c.ReadMSB, latched: c.Latched,
			latchMSB: c.LatchMSB, latch: c.Latch, statusOn: c.StatusLatched,
			status: c.Status, irqArmed: c.IRQArmed, irqEdge: c.IRQEdge,
		}
	}
	p.port61 = s.Port61
	p.refresh = s.Refresh
	return nil
}
