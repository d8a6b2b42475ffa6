package devices

import (
	"fmt"
	"io"
)

// National Semiconductor PC16550D UART (16550A compatible), as COM1 at
// 0x3f8-0x3ff on IRQ4. Section references are to the PC16550D datasheet
// (June 1995): "8.4 Line Status Register", "8.5 FIFO Control Register",
// "8.6 Interrupt Identification Register", "8.7 Interrupt Enable Register",
// "8.8 Modem Control Register", "8.9 Modem Status Register", Table II
// (interrupt control functions), "Loopback".
//
// Transmission is instantaneous: a THR write goes to the output writer at
// once, so THRE and TEMT always read 1. Reception is driven by the VMM with
// Receive, which should first check RxSpace so that no byte is lost.
//
// Modelling choices:
//   - RX character timeout: the 4-character-time timeout is taken as already
//     expired, so a FIFO holding fewer bytes than the trigger level reports
//     the timeout interrupt (IIR 0xcc) at once; the trigger level decides
//     between "data available" (IIR id 0x4) and "timeout" (0xc). The VMM
//     delivers a burst of bytes by calling Receive repeatedly before running
//     the vCPU again.
//   - The modem inputs are fixed at CTS, DSR and DCD asserted, RI not.
//   - No parity, framing or break errors ever occur; line settings (LCR,
//     divisor) are stored only.
//   - The interrupt line (as on a PC, INTR gated by OUT2) is asserted only if
//     MCR OUT2 is set, loopback is off (in loopback the modem outputs are
//     forced inactive) and an interrupt is pending.

// Register offsets.
const (
	UART_RBR = 0 // receiver buffer (read, DLAB=0)
	UART_THR = 0 // transmitter holding (write, DLAB=0)
	UART_DLL = 0 // divisor latch LSB (DLAB=1)
	UART_IER = 1 // interrupt enable (DLAB=0)
	UART_DLM = 1 // divisor latch MSB (DLAB=1)
	UART_IIR = 2 // interrupt identification (read)
	UART_FCR = 2 // FIFO control (write)
	UART_LCR = 3 // line control
	UART_MCR = 4 // modem control
	UART_LSR = 5 // line status
	UART_MSR = 6 // modem status
	UART_SCR = 7 // scratch
)

// IER bits.
const (
	UART_IER_RDI  = 0x01 // ERBFI: received data available
	UART_IER_THRI = 0x02 // ETBEI: THR empty
	UART_IER_RLSI = 0x04 // ELSI: receiver line status
	UART_IER_MSI  = 0x08 // EDSSI: modem status
	uartIERMask   = 0x0f
)

// IIR values.
const (
	UART_IIR_NO_INT     = 0x01
	UART_IIR_ID         = 0x0e
	UART_IIR_MSI        = 0x00
	UART_IIR_THRI       = 0x02
	UART_IIR_RDI        = 0x04
	UART_IIR_RLSI       = 0x06
	UART_IIR_RX_TIMEOUT = 0x0c
	UART_IIR_FIFO_BITS  = 0xc0 // both set when FCR0 = 1
)

// FCR bits.
const (
	UART_FCR_ENABLE_FIFO = 0x01
	UART_FCR_CLEAR_RCVR  = 0x02
	UART_FCR_CLEAR_XMIT  = 0x04
	UART_FCR_DMA_SELECT  = 0x08
	UART_FCR_TRIGGER     = 0xc0
	UART_FCR_TRIGGER_1   = 0x00
	UART_FCR_TRIGGER_4   = 0x40
	UART_FCR_TRIGGER_8   = 0x80
	UART_FCR_TRIGGER_14  = 0xc0
)

// LCR bits.
const (
	UART_LCR_WLEN = 0x03
	UART_LCR_STOP = 0x04
	UART_LCR_PEN  = 0x08
	UART_LCR_EPS  = 0x10
	UART_LCR_SPAR = 0x20
	UART_LCR_SBC  = 0x40
	UART_LCR_DLAB = 0x80
)

// MCR bits.
const (
	UART_MCR_DTR  = 0x01
	UART_MCR_RTS  = 0x02
	UART_MCR_OUT1 = 0x04
	UART_MCR_OUT2 = 0x08
	UART_MCR_LOOP = 0x10
	uartMCRMask   = 0x1f
)

// LSR bits.
const (
	UART_LSR_DR    = 0x01 // data ready
	UART_LSR_OE    = 0x02 // overrun error
	UART_LSR_PE    = 0x04 // parity error
	UART_LSR_FE    = 0x08 // framing error
	UART_LSR_BI    = 0x10 // break interrupt
	UART_LSR_THRE  = 0x20 // THR empty
	UART_LSR_TEMT  = 0x40 // transmitter empty
	UART_LSR_FIFOE = 0x80 // error in RCVR FIFO
	uartLSRErrors  = UART_LSR_OE | UART_LSR_PE | UART_LSR_FE | UART_LSR_BI
)

// MSR bits.
const (
	UART_MSR_DCTS  = 0x01
	UART_MSR_DDSR  = 0x02
	UART_MSR_TERI  = 0x04
	UART_MSR_DDCD  = 0x08
	UART_MSR_CTS   = 0x10
	UART_MSR_DSR   = 0x20
	UART_MSR_RI    = 0x40
	UART_MSR_DCD   = 0x80
	uartMSRDeltas  = 0x0f
	uartModemInput = UART_MSR_CTS | UART_MSR_DSR | UART_MSR_DCD
)

// UARTFIFOSize is the depth of the receive FIFO.
const UARTFIFOSize = 16

// UART is a 16550A. Register it at its base (0x3f8 for COM1) with size 8.
type UART struct {
	irq       IRQ
	line      int
	out       io.Writer
	txBuf     [1]byte
	unhandled uint64

	ier, lcr, mcr, scr, fcr uint8
	dll, dlm                uint8
	lsrErr                  uint8 // sticky LSR error bits (OE)
	msr                     uint8 // status (high nibble) | deltas (low nibble)
	rbr                     uint8 // last byte read from the receiver
	rx                      [UARTFIFOSize]byte
	rxHead, rxCount         uint8
	thrPending              bool
	irqLevel                bool
}

// NewUART returns a 16550A driving line of irq (4 for COM1) and writing
// transmitted bytes to out (nil discards them). Its registers are in their
// reset state ("Table IV": IER, FCR, LCR, MCR 0; LSR 0x60; IIR 0x01); the
// divisor is 12 (9600 baud).
func NewUART(irq IRQ, line int, out io.Writer) *UART {
	return &UART{irq: irq, line: line, out: out, dll: 12, msr: uartModemInput}
}

// SetOutput replaces the transmit sink (nil discards). A backup replica
// points it at a sink that absorbs the output.
func (u *UART) SetOutput(w io.Writer) { u.out = w }

// Unhandled counts accesses the UART does not model.
func (u *UART) Unhandled() uint64 { return u.unhandled }

func (u *UART) fifoOn() bool { return u.fcr&UART_FCR_ENABLE_FIFO != 0 }

func (u *UART) rxCap() uint8 {
	if u.fifoOn() {
		return UARTFIFOSize
	}
	return 1 // 16450 mode: the RBR alone
}

// RxSpace returns how many bytes Receive can accept without an overrun: the
// free FIFO entries (1 or 0 with the FIFO disabled), and 0 in loopback mode,
// where the serial input is disconnected.
func (u *UART) RxSpace() int {
	if u.mcr&UART_MCR_LOOP != 0 {
		return 0
	}
	return int(u.rxCap() - u.rxCount)
}

// ReceiveEnabled reports whether the guest enabled the received-data
// interrupt (IER ERBFI) with the FIFOs on: the sign that a driver is ready
// for input. Drivers such as Linux's 8250 enable ERBFI before they turn the
// FIFOs on, which clears them; input delivered in between would be lost.
func (u *UART) ReceiveEnabled() bool {
	return u.ier&UART_IER_RDI != 0 && u.fcr&UART_FCR_ENABLE_FIFO != 0
}

// Receive delivers a byte from the serial line. It returns false if the
// byte was not stored: in loopback mode (input disconnected; nothing else
// happens), or on overrun (LSR OE set; with the FIFO enabled the byte is
// lost, with it disabled it overwrites the unread RBR). Check RxSpace first.
func (u *UART) Receive(b byte) bool {
	if u.mcr&UART_MCR_LOOP != 0 {
		return false
	}
	ok := u.rxPush(b)
	u.updateIRQ()
	return ok
}

func (u *UART) rxPush(b byte) bool {
	if u.rxCount < u.rxCap() {
		u.rx[(u.rxHead+u.rxCount)%UARTFIFOSize] = b
		u.rxCount++
		return true
	}
	u.lsrErr |= UART_LSR_OE
	if !u.fifoOn() {
		u.rx[u.rxHead] = b
	}
	return false
}

func (u *UART) rxTrigger() uint8 {
	switch u.fcr & UART_FCR_TRIGGER {
	case UART_FCR_TRIGGER_1:
		return 1
	case UART_FCR_TRIGGER_4:
		return 4
	case UART_FCR_TRIGGER_8:
		return 8
	default:
		return 14
	}
}

// iirID returns the highest-priority pending interrupt (Table II): line
// status, then received data / timeout, then THRE, then modem status.
func (u *UART) iirID() uint8 {
	if u.ier&UART_IER_RLSI != 0 && u.lsrErr != 0 {
		return UART_IIR_RLSI
	}
	if u.ier&UART_IER_RDI != 0 && u.rxCount > 0 {
		if u.fifoOn() && u.rxCount < u.rxTrigger() {
			return UART_IIR_RX_TIMEOUT
		}
		return UART_IIR_RDI
	}
	if u.ier&UART_IER_THRI != 0 && u.thrPending {
		return UART_IIR_THRI
	}
	if u.ier&UART_IER_MSI != 0 && u.msr&uartMSRDeltas != 0 {
		return UART_IIR_MSI
	}
	return UART_IIR_NO_INT
}

func (u *UART) updateIRQ() {
	level := u.mcr&(UART_MCR_OUT2|UART_MCR_LOOP) == UART_MCR_OUT2 && u.iirID() != UART_IIR_NO_INT
	if level != u.irqLevel {
		u.irqLevel = level
		if u.irq != nil {
			u.irq.SetIRQ(u.line, level)
		}
	}
}

// modemStatus returns the MSR status nibble: the fixed inputs, or in
// loopback DTR->DSR, RTS->CTS, OUT1->RI, OUT2->DCD ("8.8 MCR bit 4").
func (u *UART) modemStatus() uint8 {
	if u.mcr&UART_MCR_LOOP == 0 {
		return uartModemInput
	}
	var s uint8
	if u.mcr&UART_MCR_DTR != 0 {
		s |= UART_MSR_DSR
	}
	if u.mcr&UART_MCR_RTS != 0 {
		s |= UART_MSR_CTS
	}
	if u.mcr&UART_MCR_OUT1 != 0 {
		s |= UART_MSR_RI
	}
	if u.mcr&UART_MCR_OUT2 != 0 {
		s |= UART_MSR_DCD
	}
	return s
}

// updateMSR recomputes the status nibble and sets the delta bits for the
// inputs that changed (TERI on RI's trailing edge only).
func (u *UART) updateMSR() {
	old := u.msr
	s := u.modemStatus()
	ch := old ^ s
	d := old & uartMSRDeltas
	if ch&UART_MSR_CTS != 0 {
		d |= UART_MSR_DCTS
	}
	if ch&UART_MSR_DSR != 0 {
		d |= UART_MSR_DDSR
	}
	if ch&UART_MSR_DCD != 0 {
		d |= UART_MSR_DDCD
	}
	if old&UART_MSR_RI != 0 && s&UART_MSR_RI == 0 {
		d |= UART_MSR_TERI
	}
	u.msr = s | d
}

// Read implements Device.
func (u *UART) Read(offset uint64, data []byte) {
	for i := range data {
		data[i] = u.readByte(offset + uint64(i))
	}
	u.updateIRQ()
}

func (u *UART) readByte(off uint64) uint8 {
	dlab := u.lcr&UART_LCR_DLAB != 0
	switch off {
	case UART_RBR:
		if dlab {
			return u.dll
		}
		if u.rxCount > 0 {
			u.rbr = u.rx[u.rxHead]
			u.rxHead = (u.rxHead + 1) % UARTFIFOSize
			u.rxCount--
		}
		return u.rbr
	case UART_IER:
		if dlab {
			return u.dlm
		}
		return u.ier
	case UART_IIR:
		id := u.iirID()
		if id == UART_IIR_THRI {
			// Reading IIR clears a THRE interrupt it reports.
			u.thrPending = false
		}
		if u.fifoOn() {
			id |= UART_IIR_FIFO_BITS
		}
		return id
	case UART_LCR:
		return u.lcr
	case UART_MCR:
		return u.mcr
	case UART_LSR:
		v := u.lsrErr | UART_LSR_THRE | UART_LSR_TEMT
		if u.rxCount > 0 {
			v |= UART_LSR_DR
		}
		u.lsrErr = 0 // reading LSR clears OE, PE, FE, BI
		return v
	case UART_MSR:
		v := u.msr
		u.msr &^= uartMSRDeltas // reading MSR clears the deltas
		return v
	case UART_SCR:
		return u.scr
	}
	u.unhandled++
	return 0xff
}

// Write implements Device.
func (u *UART) Write(offset uint64, data []byte) {
	for i, v := range data {
		u.writeByte(offset+uint64(i), v)
	}
	u.updateIRQ()
}

func (u *UART) writeByte(off uint64, v uint8) {
	dlab := u.lcr&UART_LCR_DLAB != 0
	switch off {
	case UART_THR:
		if dlab {
			u.dll = v
			return
		}
		if u.mcr&UART_MCR_LOOP != 0 {
			u.rxPush(v) // loopback: SOUT is wired to SIN
		} else if u.out != nil {
			u.txBuf[0] = v
			_, _ = u.out.Write(u.txBuf[:]) // a sink's errors are not the guest's
		}
		// The byte left at once: THR is empty again.
		u.thrPending = u.ier&UART_IER_THRI != 0
	case UART_IER:
		if dlab {
			u.dlm = v
			return
		}
		old := u.ier
		u.ier = v & uartIERMask
		if (old^u.ier)&UART_IER_THRI != 0 {
			// Enabling ETBEI while THR is empty raises the THRE
			// interrupt, as a 16550 does; disabling it drops it.
			u.thrPending = u.ier&UART_IER_THRI != 0
		}
	case UART_FCR:
		u.writeFCR(v)
	case UART_LCR:
		u.lcr = v
	case UART_MCR:
		u.mcr = v & uartMCRMask
		u.updateMSR()
	case UART_SCR:
		u.scr = v
	default: // LSR (factory test), MSR
		u.unhandled++
	}
}

// writeFCR: FCR0 must be 1 for the other bits to be programmed; changing
// FCR0 clears both FIFOs; bits 1 and 2 self-clear ("8.5").
func (u *UART) writeFCR(v uint8) {
	if (u.fcr^v)&UART_FCR_ENABLE_FIFO != 0 {
		u.rxHead, u.rxCount = 0, 0
	}
	if v&UART_FCR_ENABLE_FIFO == 0 {
		u.fcr = 0
		return
	}
	if v&UART_FCR_CLEAR_RCVR != 0 {
		u.rxHead, u.rxCount = 0, 0
	}
	u.fcr = v & (UART_FCR_ENABLE_FIFO | UART_FCR_DMA_SELECT | UART_FCR_TRIGGER)
}

// UARTState is the UART's state.
type UARTState struct {
	IER, LCR, MCR, SCR, FCR uint8
	DLL, DLM                uint8
	LSRErrors               uint8
	MSR                     uint8
	RBR                     uint8
	RxFIFO                  [UARTFIFOSize]byte
	RxHead, RxCount         uint8
	THRPending              bool
	IRQLevel                bool
}

// State returns the UART's state.
func (u *UART) State() UARTState {
	return UARTState{
		IER: u.ier, LCR: u.lcr, MCR: u.mcr, SCR: u.scr, FCR: u.fcr,
		DLL: u.dll, DLM: u.dlm, LSRErrors: u.lsrErr, MSR: u.msr, RBR: u.rbr,
		RxFIFO: u.rx, RxHead: u.rxHead, RxCount: u.rxCount,
		THRPending: u.thrPending, IRQLevel: u.irqLevel,
	}
}

// SetState restores a state from State. It does not drive the IRQ line: the
// restored PIC holds the line's level.
func (u *UART) SetState(s UARTState) error {
	switch {
	case s.RxHead >= UARTFIFOSize || s.RxCount > UARTFIFOSize:
		return fmt.Errorf("devices: UART FIFO head %d count %d", s.RxHead, s.RxCount)
	case s.FCR&UART_FCR_ENABLE_FIFO == 0 && s.RxCount > 1:
		return fmt.Errorf("devices: UART FIFO disabled with %d bytes", s.RxCount)
	case s.IER&^uartIERMask != 0 || s.MCR&^uartMCRMask != 0:
		return fmt.Errorf("devices: UART reserved IER/MCR bits %#x/%#x", s.IER, s.MCR)
	}
	u.ier, u.lcr, u.mcr, u.scr, u.fcr = s.IER, s.LCR, s.MCR, s.SCR, s.FCR
	u.dll, u.dlm, u.lsrErr, u.msr, u.rbr = s.DLL, s.DLM, s.LSRErrors, s.MSR, s.RBR
	u.rx, u.rxHead, u.rxCount = s.RxFIFO, s.RxHead, s.RxCount
	u.thrPending, u.irqLevel = s.THRPending, s.IRQLevel
	return nil
}
