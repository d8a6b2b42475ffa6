package devices

// PC port layout and IRQ lines.
const (
	PortPICMaster    = 0x20
	PortPICSlave     = 0xa0
	PortELCR         = 0x4d0
	PortPIT          = 0x40
	PortSpeaker      = 0x61
	PortI8042Data    = 0x60
	PortI8042Command = 0x64
	PortRTC          = 0x70
	PortCOM1         = 0x3f8
	PortReset        = 0xcf9
	PortDebugExit    = 0x501

	IRQPIT  = 0
	IRQCOM1 = 4
	IRQRTC  = 8
)

// PCDevices is a set of models for RegisterPC; nil fields are skipped.
type PCDevices struct {
	PIC       *PIC
	PIT       *PIT
	COM1      *UART
	RTC       *RTC
	Reset     *ResetControl
	I8042     *I8042
	DebugExit *DebugExit
}

// RegisterPC registers the non-nil models at their PC ports: PIC 0x20-0x21,
// 0xa0-0xa1, ELCR 0x4d0-0x4d1; PIT 0x40-0x43 and port 0x61; COM1
// 0x3f8-0x3ff; RTC 0x70-0x71; i8042 0x60 and 0x64; reset 0xcf9; debug exit
// 0x501.
func RegisterPC(b *Bus, d PCDevices) error {
	type reg struct {
		base, size uint64
		name       string
		dev        Device
	}
	var regs []reg
	if d.PIC != nil {
		regs = append(regs,
			reg{PortPICMaster, 2, "pic-master", d.PIC.Master()},
			reg{PortPICSlave, 2, "pic-slave", d.PIC.Slave()},
			reg{PortELCR, 2, "elcr", d.PIC.ELCR()})
	}
	if d.PIT != nil {
		regs = append(regs,
			reg{PortPIT, 4, "pit", d.PIT},
			reg{PortSpeaker, 1, "port61", d.PIT.Speaker()})
	}
	if d.COM1 != nil {
		regs = append(regs, reg{PortCOM1, 8, "com1", d.COM1})
	}
	if d.RTC != nil {
		regs = append(regs, reg{PortRTC, 2, "rtc", d.RTC})
	}
	if d.I8042 != nil {
		regs = append(regs,
			reg{PortI8042Data, 1, "i8042-data", d.I8042.Data()},
			reg{PortI8042Command, 1, "i8042-cmd", d.I8042.Command()})
	}
	if d.Reset != nil {
		regs = append(regs, reg{PortReset, 1, "reset", d.Reset})
	}
	if d.DebugExit != nil {
		regs = append(regs, reg{PortDebugExit, 1, "debug-exit", d.DebugExit})
	}
	for _, r := range regs {
		if err := b.Register(r.base, r.size, r.name, r.dev); err != nil {
			return err
		}
	}
	return nil
}
