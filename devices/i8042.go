package devices

import "fmt"

// Minimal Intel 8042 keyboard controller: data port 0x60 and status/command
// port 0x64. There is no keyboard or mouse behind it and it raises no
// interrupts. It answers the controller commands an OS uses at probe and
// reboot time; others, and data bytes meant for the keyboard, count as
// unhandled and get no reply (the guest's wait for a reply times out, as
// with no device attached). Names follow Linux's i8042.h and the IBM AT
// technical reference.

// Status register bits (port 0x64 read).
const (
	I8042_STR_OBF     = 0x01 // output buffer full
	I8042_STR_IBF     = 0x02 // input buffer full
	I8042_STR_SYSFLAG = 0x04 // system flag (from the command byte)
	I8042_STR_CMDDAT  = 0x08 // last write was a command (port 0x64)
	I8042_STR_KEYLOCK = 0x10 // 1 = keyboard not inhibited
	I8042_STR_AUXDATA = 0x20
	I8042_STR_TIMEOUT = 0x40
	I8042_STR_PARITY  = 0x80
)

// Controller command byte (CTR) bits.
const (
	I8042_CTR_KBDINT  = 0x01
	I8042_CTR_AUXINT  = 0x02
	I8042_CTR_SYSFLAG = 0x04
	I8042_CTR_KBDDIS  = 0x10
	I8042_CTR_AUXDIS  = 0x20
	I8042_CTR_XLATE   = 0x40
)

// Controller commands (port 0x64 write).
const (
	I8042_CMD_CTL_RCTR  = 0x20 // read command byte
	I8042_CMD_CTL_WCTR  = 0x60 // write command byte (next data byte)
	I8042_CMD_CTL_TEST  = 0xaa // self test: replies 0x55
	I8042_CMD_KBD_TEST  = 0xab // keyboard interface test: replies 0x00
	I8042_CMD_KBD_DIS   = 0xad // disable keyboard interface
	I8042_CMD_KBD_EN    = 0xae // enable keyboard interface
	I8042_CMD_RD_OUTP   = 0xd0 // read output port
	I8042_CMD_WR_OUTP   = 0xd1 // write output port (next data byte)
	I8042_CMD_PULSE     = 0xf0 // 0xf0-0xff: pulse output port bits 3-0 low
	I8042_CMD_RESET     = 0xfe // pulse the reset line
	I8042_SELFTEST_OK   = 0x55
	I8042_OUTP_RESET    = 0x01 // output port bit 0: system reset (active low)
	I8042_OUTP_A20      = 0x02 // output port bit 1: A20 gate
	i8042CTRDefault     = I8042_CTR_KBDINT | I8042_CTR_SYSFLAG | I8042_CTR_XLATE
	i8042OutPortDefault = I8042_OUTP_RESET | I8042_OUTP_A20
)

// I8042 is the controller. Register Data() at 0x60 and Command() at 0x64,
// each with size 1 (port 0x61 lies between them).
type I8042 struct {
	onReset    func()
	ctr        uint8
	outPort    uint8
	out        uint8 // output buffer
	obf        bool
	pendingCmd uint8 // command waiting for its data byte, or 0
	lastCmd    bool
	data       i8042Data
	cmd        i8042Cmd
	unhandled  uint64
}

type i8042Data struct{ c *I8042 }
type i8042Cmd struct{ c *I8042 }

// NewI8042 returns the controller; onReset (may be nil) is called
// synchronously when the guest pulses the reset line (command 0xfe, any
// 0xf0-0xff pulse including bit 0, or output port bit 0 written 0).
func NewI8042(onReset func()) *I8042 {
	c := &I8042{onReset: onReset, ctr: i8042CTRDefault, outPort: i8042OutPortDefault}
	c.data = i8042Data{c}
	c.cmd = i8042Cmd{c}
	return c
}

// Data is port 0x60.
func (c *I8042) Data() Device { return &c.data }

// Command is port 0x64 (status on read, command on write).
func (c *I8042) Command() Device { return &c.cmd }

// Unhandled counts commands and data bytes the controller does not model.
func (c *I8042) Unhandled() uint64 { return c.unhandled }

func (c *I8042) reply(v uint8) {
	c.out = v
	c.obf = true
}

func (c *I8042) reset() {
	if c.onReset != nil {
		c.onReset()
	}
}

func (c *I8042) status() uint8 {
	s := uint8(I8042_STR_KEYLOCK) | c.ctr&I8042_CTR_SYSFLAG
	if c.obf {
		s |= I8042_STR_OBF
	}
	if c.lastCmd {
		s |= I8042_STR_CMDDAT
	}
	return s
}

func (c *I8042) command(v uint8) {
	c.lastCmd = true
	c.pendingCmd = 0
	switch {
	case v == I8042_CMD_CTL_RCTR:
		c.reply(c.ctr)
	case v == I8042_CMD_CTL_WCTR, v == I8042_CMD_WR_OUTP:
		c.pendingCmd = v
	case v == I8042_CMD_CTL_TEST:
		c.ctr |= I8042_CTR_SYSFLAG
		c.reply(I8042_SELFTEST_OK)
	case v == I8042_CMD_KBD_TEST:
		c.reply(0x00)
	case v == I8042_CMD_KBD_DIS:
		c.ctr |= I8042_CTR_KBDDIS
	case v == I8042_CMD_KBD_EN:
		c.ctr &^= I8042_CTR_KBDDIS
	case v == I8042_CMD_RD_OUTP:
		c.reply(c.outPort)
	case v >= I8042_CMD_PULSE:
		if v&I8042_OUTP_RESET == 0 {
			c.reset()
		}
	default:
		c.unhandled++
	}
}

func (c *I8042) writeData(v uint8) {
	c.lastCmd = false
	cmd := c.pendingCmd
	c.pendingCmd = 0
	switch cmd {
	case I8042_CMD_CTL_WCTR:
		c.ctr = v
	case I8042_CMD_WR_OUTP:
		c.outPort = v
		if v&I8042_OUTP_RESET == 0 {
			c.reset()
		}
	default:
		c.unhandled++ // a byte for the (absent) keyboard
	}
}

// Read implements Device for port 0x60: the output buffer (OBF cleared).
func (d *i8042Data) Read(offset uint64, data []byte) {
	for i := range data {
		if offset+uint64(i) != 0 {
			d.c.unhandled++
			data[i] = 0xff
			continue
		}
		d.c.obf = false
		data[i] = d.c.out
	}
}

// Write implements Device for port 0x60.
func (d *i8042Data) Write(offset uint64, data []byte) {
	for i, v := range data {
		if offset+uint64(i) != 0 {
			d.c.unhandled++
			continue
		}
		d.c.writeData(v)
	}
}

// Read implements Device for port 0x64: the status register.
func (d *i8042Cmd) Read(offset uint64, data []byte) {
	for i := range data {
		if offset+uint64(i) != 0 {
			d.c.unhandled++
			data[i] = 0xff
			continue
		}
		data[i] = d.c.status()
	}
}

// Write implements Device for port 0x64: a controller command.
func (d *i8042Cmd) Write(offset uint64, data []byte) {
	for i, v := range data {
		if offset+uint64(i) != 0 {
			d.c.unhandled++
			continue
		}
		d.c.command(v)
	}
}

// I8042State is the controller's state.
type I8042State struct {
	CTR        uint8
	OutPort    uint8
	Out        uint8
	OBF        bool
	PendingCmd uint8
	LastCmd    bool
}

// State returns the controller's state.
func (c *I8042) State() I8042State {
	return I8042State{CTR: c.ctr, OutPort: c.outPort, Out: c.out, OBF: c.obf,
		PendingCmd: c.pendingCmd, LastCmd: c.lastCmd}
}

// SetState restores a state from State.
func (c *I8042) SetState(s I8042State) error {
	if s.PendingCmd != 0 && s.PendingCmd != I8042_CMD_CTL_WCTR && s.PendingCmd != I8042_CMD_WR_OUTP {
		return fmt.Errorf("devices: i8042 pending command %#x", s.PendingCmd)
	}
	c.ctr, c.outPort, c.out, c.obf = s.CTR, s.OutPort, s.Out, s.OBF
	c.pendingCmd, c.lastCmd = s.PendingCmd, s.LastCmd
	return nil
}
