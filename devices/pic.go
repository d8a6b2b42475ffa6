package devices

import "fmt"

// Intel 8259A programmable interrupt controller, as cascaded on a PC: the
// master at 0x20-0x21, the slave at 0xa0-0xa1 on the master's IR2, and the
// PIIX ELCR at 0x4d0-0x4d1 selecting edge or level triggering per line.
//
// Section references are to the Intel 8259A datasheet (order no. 231468):
// "Initialization Command Words", "Operation Command Words", "Fully Nested
// Mode", "Automatic Rotation", "Special Mask Mode", "Poll Command",
// "Edge and Level Triggered Modes", and to the PIIX4 datasheet for ELCR.

// Initialization Command Word 1 (written to port 0 with D4=1).
const (
	ICW1_IC4  = 0x01 // ICW4 needed
	ICW1_SNGL = 0x02 // single (no ICW3)
	ICW1_ADI  = 0x04 // call address interval (8080 only, ignored)
	ICW1_LTIM = 0x08 // level triggered mode (ignored: the ELCR decides)
	ICW1_INIT = 0x10 // marks ICW1
)

// Initialization Command Word 4.
const (
	ICW4_UPM  = 0x01 // 8086/88 mode (0 = MCS-80/85 mode, not modelled)
	ICW4_AEOI = 0x02 // automatic end of interrupt
	ICW4_MS   = 0x04 // buffered master/slave (ignored)
	ICW4_BUF  = 0x08 // buffered mode (ignored)
	ICW4_SFNM = 0x10 // special fully nested mode
)

// Operation Command Word 2 (port 0, D4=0, D3=0): R, SL, EOI in D7-D5 and
// the level L2-L0 in D2-D0.
const (
	OCW2_L      = 0x07
	OCW2_EOI    = 0x20
	OCW2_SL     = 0x40
	OCW2_R      = 0x80
	OCW2_CMD    = OCW2_R | OCW2_SL | OCW2_EOI
	OCW2_NSEOI  = OCW2_EOI                    // 001 non-specific EOI
	OCW2_SEOI   = OCW2_SL | OCW2_EOI          // 011 specific EOI
	OCW2_RNSEOI = OCW2_R | OCW2_EOI           // 101 rotate on non-specific EOI
	OCW2_RAEOIS = OCW2_R                      // 100 rotate in AEOI mode (set)
	OCW2_RAEOIC = 0x00                        // 000 rotate in AEOI mode (clear)
	OCW2_RSEOI  = OCW2_R | OCW2_SL | OCW2_EOI // 111 rotate on specific EOI
	OCW2_SETPRI = OCW2_R | OCW2_SL            // 110 set priority
	OCW2_NOP    = OCW2_SL                     // 010 no operation
)

// Operation Command Word 3 (port 0, D4=0, D3=1).
const (
	OCW3_RIS  = 0x01 // read ISR (else IRR) when RR
	OCW3_RR   = 0x02 // read register command
	OCW3_P    = 0x04 // poll command
	OCW3_SEL  = 0x08 // marks OCW3
	OCW3_SMM  = 0x20 // special mask mode (when ESMM)
	OCW3_ESMM = 0x40 // enable special mask mode change
)

// PIIX ELCR bits that are reserved and must be 0 (edge): IRQ0, 1, 2 on the
// master, IRQ8 and IRQ13 on the slave.
const (
	ELCR1_MASK = 0xf8
	ELCR2_MASK = 0xde
)

// picCascadeLine is the master input the slave's INT output drives.
const picCascadeLine = 2

// PIC is the 8259A master/slave pair with the ELCR. It implements IRQ for
// ISA lines 0-15 (line 2 is the cascade and is not an ISA input).
//
// Bus registration: Master() at 0x20 (size 2), Slave() at 0xa0 (size 2),
// ELCR() at 0x4d0 (size 2).
//
// Edge mode (ELCR bit 0): a rising edge on a line latches IRR, and IRR stays
// set until the INTA cycle even if the line falls (as QEMU and KVM's
// in-kernel PIC do; so an edge SetIRQ(l,true); SetIRQ(l,false) is a full
// interrupt). Level mode (ELCR bit 1): IRR follows the line; if it falls
// before Acknowledge the request disappears and INTA gets spurious IRQ 7.
//
// The VMM polls HasInterrupt after each event and, when the vCPU can take an
// interrupt, injects the vector returned by Acknowledge.
type PIC struct {
	master, slave picChip
	elcr          picELCR
	unhandled     uint64
}

// picChip is one 8259A.
type picChip struct {
	pic    *PIC
	master bool

	irr, imr, isr uint8
	lines         uint8 // current input levels
	elcr          uint8 // 1 = level triggered
	elcrMask      uint8
	priorityAdd   uint8 // the IR with the highest priority
	vectorBase    uint8 // ICW2 & 0xf8
	icw3          uint8
	initState     uint8 // 0 ready, 1 expect ICW2, 2 expect ICW3, 3 expect ICW4
	needICW4      bool
	single        bool
	autoEOI       bool
	rotateAEOI    bool
	sfnm          bool
	readISR       bool
	poll          bool
	specialMask   bool
}

type picELCR struct{ pic *PIC }

// NewPIC returns a PIC pair in its power-on state: uninitialised (vector
// base 0, IMR 0, all lines edge triggered). Guests run ICW1-ICW4 before
// relying on it.
func NewPIC() *PIC {
	p := &PIC{}
	p.master = picChip{pic: p, master: true, elcrMask: ELCR1_MASK}
	p.slave = picChip{pic: p, elcrMask: ELCR2_MASK}
	p.elcr = picELCR{pic: p}
	return p
}

// Master is the master 8259A's port pair (0x20-0x21).
func (p *PIC) Master() Device { return &p.master }

// Slave is the slave 8259A's port pair (0xa0-0xa1).
func (p *PIC) Slave() Device { return &p.slave }

// ELCR is the edge/level control register pair (0x4d0 master, 0x4d1 slave).
func (p *PIC) ELCR() Device { return &p.elcr }

// Unhandled counts accesses the PIC does not model (also through its views).
func (p *PIC) Unhandled() uint64 { return p.unhandled }

// SetIRQ drives ISA line 0-15. Line 2 is the internal cascade; setting it, or
// a line outside 0-15, is counted as unhandled.
func (p *PIC) SetIRQ(line int, level bool) {
	switch {
	case line >= 0 && line < 8 && line != picCascadeLine:
		p.master.setInput(uint8(line), level)
	case line >= 8 && line < 16:
		p.slave.setInput(uint8(line-8), level)
	default:
		p.unhandled++
		return
	}
	p.update()
}

// HasInterrupt reports whether the master's INT output is asserted: an
// unmasked request with priority above those in service, the slave's
// requests arriving through IR2.
func (p *PIC) HasInterrupt() bool { return p.master.pending() >= 0 }

// Holds reports whether an edge on ISA line 0-7 of the master still waits
// for the CPU: its IRR bit is set and the line is not masked. Another edge
// now would merge with it. A masked line holds nothing: the guest does not
// take its interrupts.
func (p *PIC) Holds(line int) bool {
	if line < 0 || line >= 8 || line == picCascadeLine {
		return false
	}
	c := &p.master
	bit := uint8(1) << line
	return c.irr&^c.imr&bit != 0 && c.elcr&bit == 0
}

// Acknowledge performs the INTA cycle and returns the vector: ICW2 base +
// line of the highest-priority request, whose ISR bit is set (unless AEOI)
// and whose IRR bit is cleared (edge mode). With no request it returns the
// master's base+7 (spurious IRQ 7) without setting ISR. If the master
// selects IR2 but the slave has no request, the slave's base+7 (spurious
// IRQ 15) is returned and the master's IR2 is put in service.
func (p *PIC) Acknowledge() uint8 {
	m := &p.master
	irq := m.pending()
	if irq < 0 {
		return m.vectorBase + 7
	}
	var vec uint8
	if irq == picCascadeLine {
		s := &p.slave
		irq2 := s.pending()
		if irq2 >= 0 {
			s.intack(uint8(irq2))
			vec = s.vectorBase + uint8(irq2)
		} else {
			vec = s.vectorBase + 7
		}
	} else {
		vec = m.vectorBase + uint8(irq)
	}
	m.intack(uint8(irq))
	p.update()
	return vec
}

// update propagates the slave's INT output to the master's IR2.
func (p *PIC) update() {
	p.master.setInput(picCascadeLine, p.slave.pending() >= 0)
}

func (c *picChip) setInput(n uint8, level bool) {
	bit := uint8(1) << n
	if c.elcr&bit != 0 {
		if level {
			c.irr |= bit
		} else {
			c.irr &^= bit
		}
	} else if level && c.lines&bit == 0 {
		c.irr |= bit
	}
	if level {
		c.lines |= bit
	} else {
		c.lines &^= bit
	}
}

// priority returns the priority (0 highest .. 7) of the highest-priority bit
// of mask, or 8 if mask is 0 ("Fully Nested Mode", "Automatic Rotation":
// priorityAdd is the IR that currently has priority 0).
func (c *picChip) priority(mask uint8) int {
	if mask == 0 {
		return 8
	}
	p := 0
	for mask&(1<<((uint8(p)+c.priorityAdd)&7)) == 0 {
		p++
	}
	return p
}

// pending returns the IR the chip would present at INTA, or -1.
func (c *picChip) pending() int {
	req := c.irr &^ c.imr
	if c.specialMask {
		// Special Mask Mode: every unmasked request not itself in service
		// is enabled, lower as well as higher priority.
		req &^= c.isr
		if p := c.priority(req); p < 8 {
			return int((uint8(p) + c.priorityAdd) & 7)
		}
		return -1
	}
	p := c.priority(req)
	if p == 8 {
		return -1
	}
	inService := c.isr
	if c.sfnm && c.master {
		// Special Fully Nested Mode: a slave's higher-priority request is
		// recognised while the cascade IR is in service.
		inService &^= 1 << picCascadeLine
	}
	if p < c.priority(inService) {
		return int((uint8(p) + c.priorityAdd) & 7)
	}
	return -1
}

func (c *picChip) intack(irq uint8) {
	bit := uint8(1) << irq
	if c.autoEOI {
		if c.rotateAEOI {
			c.priorityAdd = (irq + 1) & 7
		}
	} else {
		c.isr |= bit
	}
	if c.elcr&bit == 0 {
		c.irr &^= bit
	}
	if !c.master {
		// The slave's INT falls during its INTA (or poll) cycle; update()
		// raises it again, a new edge on the master's IR2, if the slave
		// has another request.
		c.pic.master.lines &^= 1 << picCascadeLine
	}
}

// Read implements Device for one chip: offset 0 reads IRR or ISR (OCW3 RR/RIS),
// offset 1 reads IMR; after a poll command any read returns the poll word.
func (c *picChip) Read(offset uint64, data []byte) {
	for i := range data {
		data[i] = c.readByte(offset + uint64(i))
	}
}

func (c *picChip) readByte(off uint64) uint8 {
	if off > 1 {
		c.pic.unhandled++
		return 0xff
	}
	if c.poll {
		// Poll Command: the read is an interrupt acknowledge; the word is
		// I (bit 7) | W2-W0 (highest priority request).
		c.poll = false
		irq := c.pending()
		if irq < 0 {
			return 0
		}
		c.intack(uint8(irq))
		c.pic.update()
		return 0x80 | uint8(irq)
	}
	if off == 1 {
		return c.imr
	}
	if c.readISR {
		return c.isr
	}
	return c.irr
}

// Write implements Device for one chip.
func (c *picChip) Write(offset uint64, data []byte) {
	for i, v := range data {
		c.writeByte(offset+uint64(i), v)
	}
}

func (c *picChip) writeByte(off uint64, v uint8) {
	switch {
	case off > 1:
		c.pic.unhandled++
		return
	case off == 0 && v&ICW1_INIT != 0:
		c.icw1(v)
	case off == 0 && v&OCW3_SEL != 0:
		c.ocw3(v)
	case off == 0:
		c.ocw2(v)
	default:
		c.port1(v)
	}
	c.pic.update()
}

// icw1 starts the initialization sequence ("Initialization Command Words":
// the edge sense circuit is reset, IMR cleared, IR7 assigned the lowest
// priority, special mask mode cleared and status read set to IRR; with IC4=0
// all ICW4 functions are zero).
func (c *picChip) icw1(v uint8) {
	c.initState = 1
	c.needICW4 = v&ICW1_IC4 != 0
	c.single = v&ICW1_SNGL != 0
	if !c.needICW4 {
		// ICW4 functions zero means MCS-80/85 mode: not modelled.
		c.pic.unhandled++
	}
	// Edge sense reset: an edge-triggered IR must see a new low-to-high
	// transition; level-triggered ones follow their input.
	c.irr = c.lines & c.elcr
	c.imr = 0
	c.isr = 0
	c.priorityAdd = 0
	c.readISR = false
	c.poll = false
	c.specialMask = false
	c.autoEOI = false
	c.rotateAEOI = false
	c.sfnm = false
}

func (c *picChip) port1(v uint8) {
	switch c.initState {
	case 0: // OCW1
		c.imr = v
	case 1: // ICW2: T7-T3 of the vector
		c.vectorBase = v & 0xf8
		switch {
		case !c.single:
			c.initState = 2
		case c.needICW4:
			c.initState = 3
		default:
			c.initState = 0
		}
	case 2: // ICW3: the cascade is hardwired on IR2
		c.icw3 = v
		if (c.master && v != 1<<picCascadeLine) || (!c.master && v&7 != picCascadeLine) {
			c.pic.unhandled++
		}
		if c.needICW4 {
			c.initState = 3
		} else {
			c.initState = 0
		}
	case 3: // ICW4
		if v&ICW4_UPM == 0 {
			c.pic.unhandled++
		}
		c.autoEOI = v&ICW4_AEOI != 0
		c.sfnm = v&ICW4_SFNM != 0
		c.initState = 0
	}
}

// ocw2 handles EOI and rotation commands ("Operation Command Words", OCW2
// table; "Automatic Rotation", "Specific Rotation").
func (c *picChip) ocw2(v uint8) {
	l := v & OCW2_L
	switch v & OCW2_CMD {
	case OCW2_RAEOIC:
		c.rotateAEOI = false
	case OCW2_RAEOIS:
		c.rotateAEOI = true
	case OCW2_NSEOI, OCW2_RNSEOI:
		// Non-specific EOI resets the highest-priority ISR bit; in Special
		// Mask Mode, ISR bits masked by IMR are not reset.
		isr := c.isr
		if c.specialMask {
			isr &^= c.imr
		}
		if p := c.priority(isr); p < 8 {
			irq := (uint8(p) + c.priorityAdd) & 7
			c.isr &^= 1 << irq
			if v&OCW2_CMD == OCW2_RNSEOI {
				c.priorityAdd = (irq + 1) & 7
			}
		}
	case OCW2_SEOI:
		c.isr &^= 1 << l
	case OCW2_RSEOI:
		c.isr &^= 1 << l
		c.priorityAdd = (l + 1) & 7
	case OCW2_SETPRI:
		// L2-L0 becomes the bottom priority level.
		c.priorityAdd = (l + 1) & 7
	case OCW2_NOP:
	}
}

func (c *picChip) ocw3(v uint8) {
	if v&0x80 != 0 {
		c.pic.unhandled++ // D7 must be 0
	}
	if v&OCW3_P != 0 {
		c.poll = true
	}
	if v&OCW3_RR != 0 {
		c.readISR = v&OCW3_RIS != 0
	}
	if v&OCW3_ESMM != 0 {
		c.specialMask = v&OCW3_SMM != 0
	}
}

// Read implements Device for the ELCR pair.
func (e *picELCR) Read(offset uint64, data []byte) {
	for i := range data {
		switch offset + uint64(i) {
		case 0:
			data[i] = e.pic.master.elcr
		case 1:
			data[i] = e.pic.slave.elcr
		default:
			e.pic.unhandled++
			data[i] = 0xff
		}
	}
}

// Write implements Device for the ELCR pair. Reserved bits stay 0. A line
// switched to level mode takes its IRR bit from its current level.
func (e *picELCR) Write(offset uint64, data []byte) {
	for i, v := range data {
		var c *picChip
		switch offset + uint64(i) {
		case 0:
			c = &e.pic.master
		case 1:
			c = &e.pic.slave
		default:
			e.pic.unhandled++
			continue
		}
		c.elcr = v & c.elcrMask
		c.irr = (c.irr &^ c.elcr) | (c.lines & c.elcr)
	}
	e.pic.update()
}

// PICChipState is one 8259A's state.
type PICChipState struct {
	IRR, IMR, ISR      uint8
	Lines              uint8
	ELCR               uint8
	PriorityAdd        uint8
	VectorBase         uint8
	ICW3               uint8
	InitState          uint8
	NeedICW4           bool
	Single             bool
	AutoEOI            bool
	RotateAEOI         bool
	SpecialFullyNested bool
	ReadISR            bool
	Poll               bool
	SpecialMask        bool
}

// PICState is the state of the pair.
type PICState struct {
	Master, Slave PICChipState
}

func (c *picChip) state() PICChipState {
	return PICChipState{
		IRR: c.irr, IMR: c.imr, ISR: c.isr, Lines: c.lines, ELCR: c.elcr,
		PriorityAdd: c.priorityAdd, VectorBase: c.vectorBase, ICW3: c.icw3,
		InitState: c.initState, NeedICW4: c.needICW4, Single: c.single,
		AutoEOI: c.autoEOI, RotateAEOI: c.rotateAEOI, SpecialFullyNested: c.sfnm,
		ReadISR: c.readISR, Poll: c.poll, SpecialMask: c.specialMask,
	}
}

func (c *picChip) setState(s PICChipState) {
	c.irr, c.imr, c.isr, c.lines = s.IRR, s.IMR, s.ISR, s.Lines
	c.elcr = s.ELCR
	c.priorityAdd, c.vectorBase, c.icw3 = s.PriorityAdd, s.VectorBase, s.ICW3
	c.initState, c.needICW4, c.single = s.InitState, s.NeedICW4, s.Single
	c.autoEOI, c.rotateAEOI, c.sfnm = s.AutoEOI, s.RotateAEOI, s.SpecialFullyNested
	c.readISR, c.poll, c.specialMask = s.ReadISR, s.Poll, s.SpecialMask
}

func (c *picChip) checkState(s PICChipState, name string) error {
	switch {
	case s.InitState > 3:
		return fmt.Errorf("devices: PIC %s: init state %d", name, s.InitState)
	case s.PriorityAdd > 7:
		return fmt.Errorf("devices: PIC %s: priority %d", name, s.PriorityAdd)
	case s.ELCR&^c.elcrMask != 0:
		return fmt.Errorf("devices: PIC %s: reserved ELCR bits %#x", name, s.ELCR)
	case s.VectorBase&7 != 0:
		return fmt.Errorf("devices: PIC %s: vector base %#x", name, s.VectorBase)
	}
	return nil
}

// State returns the pair's state.
func (p *PIC) State() PICState {
	return PICState{Master: p.master.state(), Slave: p.slave.state()}
}

// SetState restores a state from State. It does not touch anything else.
func (p *PIC) SetState(s PICState) error {
	if err := p.master.checkState(s.Master, "master"); err != nil {
		return err
	}
	if err := p.slave.checkState(s.Slave, "slave"); err != nil {
		return err
	}
	p.master.setState(s.Master)
	p.slave.setState(s.Slave)
	return nil
}
