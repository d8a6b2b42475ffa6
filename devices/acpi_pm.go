package devices

import (
	"encoding/binary"
	"math/bits"
)

// ACPI fixed hardware (ACPI 6.5 §4.8): the PM1a event block (PM1_STS,
// PM1_EN), the PM1a control block (PM1_CNT) and the power management timer,
// in one 12-byte port range:
//
//	offset 0  PM1_STS  16 bits, write 1 to clear
//	offset 2  PM1_EN   16 bits
//	offset 4  PM1_CNT  16 bits: SCI_EN reads 1 (no SMI_CMD: always ACPI
//	                   mode); SLP_TYP and SLP_EN start a sleep
//	offset 6  reserved
//	offset 8  PM_TMR   32 bits, read-only: a 24-bit count at 3.579545 MHz
//
// The timer is virtual time in ticks: each read of it reads the Clock once,
// an environment read a backup replays. No event sets a status bit or
// raises the SCI: ftkvm generates none (docs/DEVICES.md).

// PM1 register bits (ACPI 6.5 Tables 4.16-4.19).
const (
	PM1_TMR_EN    = 1 << 0
	PM1_GBL_EN    = 1 << 5
	PM1_PWRBTN_EN = 1 << 8
	PM1_SLPBTN_EN = 1 << 9
	PM1_RTC_EN    = 1 << 10

	PM1_CNT_SCI_EN    = 1 << 0
	PM1_CNT_SLP_TYP   = 7 << 10
	PM1_CNT_SLP_EN    = 1 << 13
	pm1CntSlpTypShift = 10

	// ACPIPMTimerHz is the PM timer's frequency (§4.8.3.3).
	ACPIPMTimerHz = 3579545
	// ACPIPMSize is the port range ACPIPM answers.
	ACPIPMSize = 12
	// ACPISlpTypS5 is the SLP_TYP value the DSDT's \_S5 names.
	ACPISlpTypS5 = 5
)

// ACPIPM is the PM1a event and control blocks and the PM timer. Register it
// with size ACPIPMSize.
type ACPIPM struct {
	clock    Clock
	powerOff func()

	sts, en, cnt uint16
	unhandled    uint64
}

// NewACPIPM returns the device; powerOff (may be nil) is called
// synchronously when the guest enters S5.
func NewACPIPM(clock Clock, powerOff func()) *ACPIPM {
	return &ACPIPM{clock: clock, powerOff: powerOff, cnt: PM1_CNT_SCI_EN}
}

// Unhandled counts accesses not modelled: reserved or read-only bytes
// written, events enabled that never happen, sleep states other than S5.
func (p *ACPIPM) Unhandled() uint64 { return p.unhandled }

// PMTimer converts virtual time (ns) to the PM timer's 24-bit count.
func PMTimer(now int64) uint32 {
	if now < 0 {
		now = 0
	}
	hi, lo := bits.Mul64(uint64(now), ACPIPMTimerHz)
	q, _ := bits.Div64(hi, lo, 1e9) // hi < 1e9 for any int64 now
	return uint32(q) & 0xffffff
}

// Read implements Device.
func (p *ACPIPM) Read(offset uint64, data []byte) {
	var regs [ACPIPMSize]byte
	le := binary.LittleEndian
	le.PutUint16(regs[0:], p.sts)
	le.PutUint16(regs[2:], p.en)
	le.PutUint16(regs[4:], p.cnt&^PM1_CNT_SLP_EN) // SLP_EN is write-only
	if offset+uint64(len(data)) > 8 && offset < ACPIPMSize {
		le.PutUint32(regs[8:], PMTimer(p.clock.Now()))
	}
	for i := range data {
		o := offset + uint64(i)
		if o >= ACPIPMSize || o == 6 || o == 7 {
			data[i] = 0xff
			p.unhandled++
			continue
		}
		data[i] = regs[o]
	}
}

// Write implements Device.
func (p *ACPIPM) Write(offset uint64, data []byte) {
	cntWritten := false
	for i, v := range data {
		o := offset + uint64(i)
		sh := 8 * (o % 2)
		switch o {
		case 0, 1:
			p.sts &^= uint16(v) << sh
		case 2, 3:
			p.en = p.en&^(0xff<<sh) | uint16(v)<<sh
		case 4, 5:
			p.cnt = p.cnt&^(0xff<<sh) | uint16(v)<<sh
			cntWritten = true
		default:
			p.unhandled++
		}
	}
	if p.en != 0 && offset < 4 && offset+uint64(len(data)) > 2 {
		// An event ftkvm never generates is enabled (harmless, and
		// Linux's rtc-cmos does enable RTC_EN for alarms).
		p.unhandled++
	}
	if !cntWritten {
		return
	}
	p.cnt |= PM1_CNT_SCI_EN
	if p.cnt&PM1_CNT_SLP_EN != 0 {
		p.cnt &^= PM1_CNT_SLP_EN
		if (p.cnt&PM1_CNT_SLP_TYP)>>pm1CntSlpTypShift == ACPISlpTypS5 {
			if p.powerOff != nil {
				p.powerOff()
			}
		} else {
			p.unhandled++ // sleep states other than S5 are not offered
		}
	}
}

// ACPIPMState is the device's state.
type ACPIPMState struct {
	Sts, En, Cnt uint16
}

// State returns the device's state.
func (p *ACPIPM) State() ACPIPMState { return ACPIPMState{Sts: p.sts, En: p.en, Cnt: p.cnt} }

// SetState restores a state from State.
func (p *ACPIPM) SetState(s ACPIPMState) error {
	p.sts, p.en, p.cnt = s.Sts, s.En, s.Cnt|PM1_CNT_SCI_EN
	return nil
}
