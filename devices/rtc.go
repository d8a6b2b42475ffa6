package devices

import (
	"fmt"
	"time"
)

// Motorola MC146818 real-time clock with CMOS RAM, at 0x70 (index; bit 7
// masks NMI) and 0x71 (data). Section references are to the MC146818A
// datasheet: "Time, Calendar and Alarm Locations" (Table 3, data modes),
// "Register A" (UIP, DV2-DV0, RS3-RS0), "Register B" (SET, PIE, AIE, UIE,
// SQWE, DM, 24/12, DSE), "Register C" (IRQF, PF, AF, UF), "Register D" (VRT),
// "Update Cycle".
//
// The time is the base wall time given to NewRTC plus Clock.Now(), plus any
// offset the guest sets by writing the time registers. The clock is read
// only when the guest reads a time register, register A (UIP) or register
// C (UF), or writes a time register or registers A/B while the clock runs.
//
// Modelling choices:
//   - The update cycle is instantaneous at each second boundary; UIP reads 1
//     during the 244 us before it.
//   - Day of week is derived from the date while the clock runs (a written
//     value is kept only while updates are stopped).
//   - Interrupts (IRQ8) are not modelled: the periodic, alarm and
//     update-ended interrupts are never raised and writes to register B
//     that set PIE, AIE or UIE count as unhandled. Register C's UF flag is
//     set when an update happened since the last read of C; AF and PF stay 0.
//   - Daylight saving (DSE) and the square wave output are stored only.
//   - Years are century*100 + year; the calendar is proleptic Gregorian.

// Register indexes.
const (
	RTC_SECONDS       = 0x00
	RTC_SECONDS_ALARM = 0x01
	RTC_MINUTES       = 0x02
	RTC_MINUTES_ALARM = 0x03
	RTC_HOURS         = 0x04
	RTC_HOURS_ALARM   = 0x05
	RTC_DAY_OF_WEEK   = 0x06
	RTC_DAY_OF_MONTH  = 0x07
	RTC_MONTH         = 0x08
	RTC_YEAR          = 0x09
	RTC_REG_A         = 0x0a
	RTC_REG_B         = 0x0b
	RTC_REG_C         = 0x0c
	RTC_REG_D         = 0x0d
	RTC_CENTURY       = 0x32 // PC convention (ACPI FADT century)
	RTC_NMI_DISABLE   = 0x80 // index port bit 7
	RTCRAMSize        = 128
)

// Register A.
const (
	RTC_A_UIP      = 0x80
	RTC_A_DV       = 0x70
	RTC_A_DV_32KHZ = 0x20 // 32.768 kHz time base, divider running
	RTC_A_DV_RESET = 0x60 // DV2-DV1 = 11: divider chain reset
	RTC_A_RS       = 0x0f
)

// Register B.
const (
	RTC_B_SET  = 0x80
	RTC_B_PIE  = 0x40
	RTC_B_AIE  = 0x20
	RTC_B_UIE  = 0x10
	RTC_B_SQWE = 0x08
	RTC_B_DM   = 0x04 // 1 = binary, 0 = BCD
	RTC_B_24H  = 0x02 // 1 = 24 hour, 0 = 12 hour
	RTC_B_DSE  = 0x01
)

// Register C and D.
const (
	RTC_C_IRQF = 0x80
	RTC_C_PF   = 0x40
	RTC_C_AF   = 0x20
	RTC_C_UF   = 0x10
	RTC_D_VRT  = 0x80
)

// rtcUIPHold is how long UIP is set before an update: 8 periods of the
// 32.768 kHz time base (244 us).
const rtcUIPHold = 8 * 1000000000 / 32768 // 244140 ns

const rtcHourPM = 0x80

// RTC is the MC146818. Register it at 0x70 with size 2.
type RTC struct {
	clock       Clock
	index       uint8
	nmiDisabled bool
	// ram holds the 128 CMOS bytes: registers A and B, the alarms, the user
	// RAM, and while the clock is stopped the time registers themselves.
	ram [RTCRAMSize]byte
	// While running, the time at virtual time t is refSec +
	// floor((t-refNs)/1e9) seconds; refNs mod 1e9 is the divider phase.
	running   bool
	refSec    int64
	refNs     int64
	regC      uint8
	flagRef   int64 // updates after this virtual time set UF
	unhandled uint64
}

// NewRTC returns an RTC showing base's wall-clock fields (in base's own
// location: pass a UTC time for a UTC RTC) at virtual time 0, running, in
// BCD and 24-hour mode (register A 0x26, B 0x02, D 0x80).
func NewRTC(clock Clock, base time.Time) *RTC {
	y, mo, d := base.Date()
	h, mi, s := base.Clock()
	r := &RTC{clock: clock, running: true}
	r.refSec = time.Date(y, mo, d, h, mi, s, 0, time.UTC).Unix()
	r.refNs = -int64(base.Nanosecond())
	r.ram[RTC_REG_A] = RTC_A_DV_32KHZ | 0x06
	r.ram[RTC_REG_B] = RTC_B_24H
	r.ram[RTC_REG_D] = RTC_D_VRT
	return r
}

// Unhandled counts accesses the RTC does not model.
func (r *RTC) Unhandled() uint64 { return r.unhandled }

// NMIDisabled reports the NMI mask bit last written to port 0x70.
func (r *RTC) NMIDisabled() bool { return r.nmiDisabled }

// SetCMOS sets a CMOS RAM byte (0x0e-0x7f, not the century byte), e.g. for
// the VMM to report memory sizes. It returns false for other indexes.
func (r *RTC) SetCMOS(index, v uint8) bool {
	if index < 0x0e || index >= RTCRAMSize || index == RTC_CENTURY {
		return false
	}
	r.ram[index] = v
	return true
}

func floorDivMod(a, b int64) (int64, int64) {
	q, m := a/b, a%b
	if m < 0 {
		q--
		m += b
	}
	return q, m
}

// current returns the seconds since the epoch and the ns into the second.
func (r *RTC) current(now int64) (int64, int64) {
	q, m := floorDivMod(now-r.refNs, 1e9)
	return r.refSec + q, m
}

func isTimeReg(i uint8) bool {
	switch i {
	case RTC_SECONDS, RTC_MINUTES, RTC_HOURS, RTC_DAY_OF_WEEK, RTC_DAY_OF_MONTH,
		RTC_MONTH, RTC_YEAR, RTC_CENTURY:
		return true
	}
	return false
}

func (r *RTC) enc(v int) uint8 {
	if r.ram[RTC_REG_B]&RTC_B_DM != 0 {
		return uint8(v)
	}
	return uint8(v/10%10)<<4 | uint8(v%10)
}

func (r *RTC) dec(b uint8) int {
	if r.ram[RTC_REG_B]&RTC_B_DM != 0 {
		return int(b)
	}
	return int(b>>4)*10 + int(b&0x0f)
}

// encHour: in 12-hour mode hours are 1-12 with bit 7 set for PM (Table 3).
func (r *RTC) encHour(h int) uint8 {
	if r.ram[RTC_REG_B]&RTC_B_24H != 0 {
		return r.enc(h)
	}
	v := h % 12
	if v == 0 {
		v = 12
	}
	b := r.enc(v)
	if h >= 12 {
		b |= rtcHourPM
	}
	return b
}

func (r *RTC) decHour(b uint8) int {
	if r.ram[RTC_REG_B]&RTC_B_24H != 0 {
		return r.dec(b)
	}
	h := r.dec(b &^ rtcHourPM)
	if h == 12 {
		h = 0
	}
	if b&rtcHourPM != 0 {
		h += 12
	}
	return h
}

func rtcMod100(v int) int {
	v %= 100
	if v < 0 {
		v += 100
	}
	return v
}

// timeReg encodes time register i for the time sec.
func (r *RTC) timeReg(i uint8, sec int64) uint8 {
	t := time.Unix(sec, 0).UTC()
	switch i {
	case RTC_SECONDS:
		return r.enc(t.Second())
	case RTC_MINUTES:
		return r.enc(t.Minute())
	case RTC_HOURS:
		return r.encHour(t.Hour())
	case RTC_DAY_OF_WEEK:
		return r.enc(int(t.Weekday()) + 1) // Sunday = 1
	case RTC_DAY_OF_MONTH:
		return r.enc(t.Day())
	case RTC_MONTH:
		return r.enc(int(t.Month()))
	case RTC_YEAR:
		return r.enc(rtcMod100(t.Year()))
	default: // RTC_CENTURY
		y := t.Year()
		c := y / 100
		if y < 0 && y%100 != 0 {
			c--
		}
		return r.enc(rtcMod100(c))
	}
}

// setField returns sec with the field of time register i replaced by the
// encoded value v.
func (r *RTC) setField(sec int64, i, v uint8) int64 {
	t := time.Unix(sec, 0).UTC()
	y, mo, d := t.Date()
	h, mi, s := t.Clock()
	switch i {
	case RTC_SECONDS:
		s = r.dec(v)
	case RTC_MINUTES:
		mi = r.dec(v)
	case RTC_HOURS:
		h = r.decHour(v)
	case RTC_DAY_OF_MONTH:
		d = r.dec(v)
	case RTC_MONTH:
		mo = time.Month(r.dec(v))
	case RTC_YEAR:
		y = y - rtcMod100(y) + r.dec(v)
	case RTC_CENTURY:
		y = r.dec(v)*100 + rtcMod100(y)
	default: // RTC_DAY_OF_WEEK: derived from the date
		return sec
	}
	return time.Date(y, mo, d, h, mi, s, 0, time.UTC).Unix()
}

// decodeTime converts the raw time registers (held while stopped).
func (r *RTC) decodeTime() int64 {
	y := r.dec(r.ram[RTC_CENTURY])*100 + r.dec(r.ram[RTC_YEAR])
	return time.Date(y, time.Month(r.dec(r.ram[RTC_MONTH])), r.dec(r.ram[RTC_DAY_OF_MONTH]),
		r.decHour(r.ram[RTC_HOURS]), r.dec(r.ram[RTC_MINUTES]), r.dec(r.ram[RTC_SECONDS]),
		0, time.UTC).Unix()
}

// syncFlags sets UF if an update happened after flagRef.
func (r *RTC) syncFlags(now int64) {
	if !r.running {
		return
	}
	_, frac := floorDivMod(now-r.refNs, 1e9)
	if now-frac > r.flagRef {
		r.regC |= RTC_C_UF
	}
}

func rtcShouldRun(a, b uint8) bool {
	return b&RTC_B_SET == 0 && a&RTC_A_DV == RTC_A_DV_32KHZ
}

// stop freezes the time registers (SET, or the divider leaving normal
// operation); they become plain RAM the guest may write.
func (r *RTC) stop(now int64) {
	r.syncFlags(now)
	sec, _ := r.current(now)
	for _, i := range [...]uint8{RTC_SECONDS, RTC_MINUTES, RTC_HOURS, RTC_DAY_OF_WEEK,
		RTC_DAY_OF_MONTH, RTC_MONTH, RTC_YEAR, RTC_CENTURY} {
		r.ram[i] = r.timeReg(i, sec)
	}
	r.running = false
}

// resume restarts updates from the time registers. The divider kept its
// phase unless it was reset, in which case the first update comes 500 ms
// later ("Register A", DV2-DV0).
func (r *RTC) resume(now int64, fromReset bool) {
	frac := int64(5e8)
	if !fromReset {
		_, frac = floorDivMod(now-r.refNs, 1e9)
	}
	r.refSec = r.decodeTime()
	r.refNs = now - frac
	r.running = true
	r.flagRef = now
}

// Read implements Device: offset 0 is the index port (write only), 1 data.
func (r *RTC) Read(offset uint64, data []byte) {
	for i := range data {
		if offset+uint64(i) != 1 {
			r.unhandled++
			data[i] = 0xff
			continue
		}
		data[i] = r.readData()
	}
}

func (r *RTC) readData() uint8 {
	i := r.index
	switch {
	case isTimeReg(i):
		if !r.running {
			return r.ram[i]
		}
		sec, _ := r.current(r.clock.Now())
		return r.timeReg(i, sec)
	case i == RTC_REG_A:
		v := r.ram[i] &^ RTC_A_UIP
		if r.running {
			if _, frac := r.current(r.clock.Now()); frac >= 1e9-rtcUIPHold {
				v |= RTC_A_UIP
			}
		}
		return v
	case i == RTC_REG_C:
		// Reading C clears it.
		if r.running {
			now := r.clock.Now()
			r.syncFlags(now)
			r.flagRef = now
		}
		v := r.regC
		if v&r.ram[RTC_REG_B]&(RTC_C_PF|RTC_C_AF|RTC_C_UF) != 0 {
			v |= RTC_C_IRQF
		}
		r.regC = 0
		return v
	case i == RTC_REG_D:
		return RTC_D_VRT
	}
	return r.ram[i]
}

// Write implements Device.
func (r *RTC) Write(offset uint64, data []byte) {
	for i, v := range data {
		switch offset + uint64(i) {
		case 0:
			r.index = v &^ RTC_NMI_DISABLE
			r.nmiDisabled = v&RTC_NMI_DISABLE != 0
		case 1:
			r.writeData(v)
		default:
			r.unhandled++
		}
	}
}

func (r *RTC) writeData(v uint8) {
	i := r.index
	switch {
	case isTimeReg(i):
		if !r.running {
			r.ram[i] = v
			return
		}
		now := r.clock.Now()
		sec, frac := r.current(now)
		r.refSec = r.setField(sec, i, v)
		r.refNs = now - frac
	case i == RTC_REG_A || i == RTC_REG_B:
		if i == RTC_REG_A {
			v &^= RTC_A_UIP // read only
		} else {
			if v&RTC_B_SET != 0 {
				v &^= RTC_B_UIE // SET clears UIE
			}
			if v&(RTC_B_PIE|RTC_B_AIE|RTC_B_UIE) != 0 {
				r.unhandled++ // interrupts not modelled
			}
		}
		a, b := r.ram[RTC_REG_A], r.ram[RTC_REG_B]
		fromReset := a&RTC_A_DV_RESET == RTC_A_DV_RESET
		na, nb := a, b
		if i == RTC_REG_A {
			na = v
		} else {
			nb = v
		}
		run := rtcShouldRun(na, nb)
		if r.running && !run {
			r.stop(r.clock.Now()) // encode with the old format
		}
		r.ram[i] = v
		if !r.running && run {
			r.resume(r.clock.Now(), fromReset)
		}
	case i == RTC_REG_C || i == RTC_REG_D:
		// read only
	default:
		r.ram[i] = v
	}
}

// RTCState is the RTC's state.
type RTCState struct {
	Index       uint8
	NMIDisabled bool
	RAM         [RTCRAMSize]byte
	Running     bool
	RefSec      int64
	RefNs       int64
	RegC        uint8
	FlagRef     int64
}

// State returns the RTC's state.
func (r *RTC) State() RTCState {
	return RTCState{Index: r.index, NMIDisabled: r.nmiDisabled, RAM: r.ram,
		Running: r.running, RefSec: r.refSec, RefNs: r.refNs, RegC: r.regC,
		FlagRef: r.flagRef}
}

// SetState restores a state from State.
func (r *RTC) SetState(s RTCState) error {
	if s.Index >= RTCRAMSize {
		return fmt.Errorf("devices: RTC index %#x", s.Index)
	}
	if s.Running != rtcShouldRun(s.RAM[RTC_REG_A], s.RAM[RTC_REG_B]) {
		return fmt.Errorf("devices: RTC running=%v with A=%#x B=%#x", s.Running,
			s.RAM[RTC_REG_A], s.RAM[RTC_REG_B])
	}
	r.index, r.nmiDisabled, r.ram = s.Index, s.NMIDisabled, s.RAM
	r.running, r.refSec, r.refNs = s.Running, s.RefSec, s.RefNs
	r.regC, r.flagRef = s.RegC, s.FlagRef
	return nil
}
