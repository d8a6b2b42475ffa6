// Package acpi builds the ACPI tables ftkvm gives a guest (ACPI 6.5,
// chapter 5): an RSDP, an XSDT naming one FADT, a FACS, and a DSDT holding
// \_S5 and one LNRO0005 device per virtio-mmio window. There is no MADT:
// the machine has no local APIC or I/O APIC (the guest runs its 8259 pair
// in PIC mode), and an MADT would describe hardware that is not there.
// docs/DEVICES.md says why ftkvm uses ACPI and virtio-mmio.
//
// The package only lays out bytes; the caller copies them into guest memory
// and hands the RSDP's address to the kernel (PVH start info rsdp_paddr,
// Linux boot_params acpi_rsdp_addr).
package acpi

import (
	"encoding/binary"
	"fmt"
)

// Virtio describes one virtio-mmio window for the DSDT.
type Virtio struct {
	Base, Size uint32 // MMIO window
	IRQ        uint32 // 8259 line (a GSI equals the ISA IRQ in PIC mode)
}

// Config is what the tables describe. The port blocks are the fixed
// hardware of ACPI 6.5 §4.8: the PM1a event block (PM1_STS and PM1_EN, 4
// bytes), the PM1a control block (PM1_CNT, 2 bytes) and the PM timer (4
// bytes, 24-bit).
type Config struct {
	PM1aEvent   uint16
	PM1aControl uint16
	PMTimer     uint16
	SCI         uint16 // the SCI's 8259 line
	ResetPort   uint16 // FADT RESET_REG (system I/O), 0 for none
	ResetValue  uint8
	// SlpTypS5 is the SLP_TYP value \_S5 gives for PM1a_CNT.
	SlpTypS5 uint8
	Virtio   []Virtio
}

// Table offsets inside the blob Build returns, and its size. Alignments:
// the RSDP on 16 bytes (§5.2.5.1), the FACS on 64 (§5.2.10).
const (
	offRSDP = 0x000
	offXSDT = 0x040
	offFACS = 0x080
	offFADT = 0x100
	offDSDT = 0x240
)

// Sizes of the fixed tables.
const (
	headerSize = 36
	rsdpSize   = 36
	facsSize   = 64
	fadtSize   = 276 // revision 6 (ACPI 6.x)
	xsdtSize   = headerSize + 8
)

// OEM identification in every table header.
const (
	oemID       = "FTKVM "
	oemTableID  = "FTKVMVM "
	creatorID   = "FTKV"
	oemRevision = 1
)

// Build lays out the tables for guest physical address base (16-byte
// aligned, below 4 GiB so that 32-bit pointers reach it) and returns them.
// The RSDP is at base.
func Build(base uint64, cfg Config) ([]byte, error) {
	if base%64 != 0 || base+offDSDT >= 1<<32 {
		return nil, fmt.Errorf("acpi: tables at %#x: need 64-byte alignment below 4 GiB", base)
	}
	dsdt, err := buildDSDT(cfg)
	if err != nil {
		return nil, err
	}
	if base+offDSDT+uint64(len(dsdt)) > 1<<32 {
		return nil, fmt.Errorf("acpi: DSDT does not fit below 4 GiB")
	}
	b := make([]byte, offDSDT+len(dsdt))
	le := binary.LittleEndian

	// RSDP (§5.2.5.3), revision 2: the XSDT, no RSDT.
	r := b[offRSDP:]
	copy(r[0:], "RSD PTR ")
	copy(r[9:], oemID)
	r[15] = 2
	le.PutUint32(r[20:], rsdpSize)
	le.PutUint64(r[24:], base+offXSDT)
	r[8] = checksum(r[:20])
	r[32] = checksum(r[:rsdpSize])

	// XSDT (§5.2.8): the FADT.
	x := b[offXSDT : offXSDT+xsdtSize]
	header(x, "XSDT", 1)
	le.PutUint64(x[headerSize:], base+offFADT)
	x[9] = checksum(x)

	// FACS (§5.2.10): nothing but its signature and length; no waking
	// vector (no sleep state ftkvm offers returns).
	f := b[offFACS : offFACS+facsSize]
	copy(f[0:], "FACS")
	le.PutUint32(f[4:], facsSize)
	f[32] = 2 // version

	// FADT (§5.2.9).
	fadt(b[offFADT:offFADT+fadtSize], base, cfg)

	copy(b[offDSDT:], dsdt)
	return b, nil
}

// header fills a description header (§5.2.6) but its checksum.
func header(t []byte, sig string, rev byte) {
	copy(t[0:], sig)
	binary.LittleEndian.PutUint32(t[4:], uint32(len(t)))
	t[8] = rev
	copy(t[10:], oemID)
	copy(t[16:], oemTableID)
	binary.LittleEndian.PutUint32(t[24:], oemRevision)
	copy(t[28:], creatorID)
	binary.LittleEndian.PutUint32(t[32:], 1)
}

// checksum returns the byte that makes b sum to zero (with b's own
// checksum byte still zero).
func checksum(b []byte) byte {
	var s byte
	for _, v := range b {
		s += v
	}
	return -s
}

// FADT fields used (offsets from ACPI 6.5 Table 5.9).
const (
	fadtFirmwareCtrl = 36
	fadtDSDT         = 40
	fadtPMProfile    = 45
	fadtSCIInt       = 46
	fadtSMICmd       = 48
	fadtPM1aEvtBlk   = 56
	fadtPM1aCntBlk   = 64
	fadtPMTmrBlk     = 76
	fadtPM1EvtLen    = 88
	fadtPM1CntLen    = 89
	fadtPMTmrLen     = 91
	fadtPLvl2Lat     = 96
	fadtPLvl3Lat     = 98
	fadtIAPCBootArch = 109
	fadtFlags        = 112
	fadtResetReg     = 116
	fadtResetValue   = 128
	fadtMinorVersion = 131
	fadtXFirmware    = 132
	fadtXDSDT        = 140
	fadtXPM1aEvtBlk  = 148
	fadtXPM1aCntBlk  = 172
	fadtXPMTmrBlk    = 208
	fadtHypervisorID = 268

	// IAPC_BOOT_ARCH (§5.2.9.3).
	bootArchLegacyDevices = 1 << 0 // ISA devices at their legacy ports
	bootArch8042          = 1 << 1
	bootArchNoVGA         = 1 << 2
	bootArchNoMSI         = 1 << 3

	// Flags (§5.2.9, Table 5.10).
	flagWBINVD      = 1 << 0
	flagProcC1      = 1 << 2
	flagPwrButton   = 1 << 4 // 1: no fixed power button
	flagSlpButton   = 1 << 5 // 1: no fixed sleep button
	flagResetRegSup = 1 << 10
	gasSystemIO     = 1
	gasAccessByte   = 1
	gasAccessWord   = 2
	gasAccessDWord  = 3
)

// gas writes a Generic Address Structure (§5.2.3.2) for a system I/O
// register.
func gas(b []byte, port uint16, bits, access byte) {
	if port == 0 {
		return
	}
	b[0] = gasSystemIO
	b[1] = bits
	b[2] = 0
	b[3] = access
	binary.LittleEndian.PutUint64(b[4:], uint64(port))
}

func fadt(t []byte, base uint64, cfg Config) {
	le := binary.LittleEndian
	header(t, "FACP", 6)
	le.PutUint32(t[fadtFirmwareCtrl:], uint32(base+offFACS))
	le.PutUint32(t[fadtDSDT:], uint32(base+offDSDT))
	t[fadtPMProfile] = 0 // unspecified
	le.PutUint16(t[fadtSCIInt:], cfg.SCI)
	le.PutUint32(t[fadtSMICmd:], 0) // no SMI command port: always in ACPI mode
	le.PutUint32(t[fadtPM1aEvtBlk:], uint32(cfg.PM1aEvent))
	le.PutUint32(t[fadtPM1aCntBlk:], uint32(cfg.PM1aControl))
	le.PutUint32(t[fadtPMTmrBlk:], uint32(cfg.PMTimer))
	t[fadtPM1EvtLen] = 4
	t[fadtPM1CntLen] = 2
	t[fadtPMTmrLen] = 4
	// No C2 or C3 states (latencies above 100 and 1000 µs mean "none").
	le.PutUint16(t[fadtPLvl2Lat:], 101)
	le.PutUint16(t[fadtPLvl3Lat:], 1001)
	// No 8042: ftkvm's i8042 is only its reset pulse (devices/i8042.go),
	// not a keyboard controller. Claiming one makes Linux probe it, and
	// its probe polls the status port for replies that never come (some
	// 20,000 exits of a Linux boot, docs/PROFILE.md); without the flag
	// Linux (FADT revision 2 and later) leaves the port alone. Reset goes
	// through the FADT's reset register.
	le.PutUint16(t[fadtIAPCBootArch:], bootArchLegacyDevices|bootArchNoVGA|bootArchNoMSI)
	flags := uint32(flagWBINVD | flagProcC1 | flagPwrButton | flagSlpButton)
	if cfg.ResetPort != 0 {
		flags |= flagResetRegSup
		gas(t[fadtResetReg:], cfg.ResetPort, 8, gasAccessByte)
		t[fadtResetValue] = cfg.ResetValue
	}
	le.PutUint32(t[fadtFlags:], flags)
	t[fadtMinorVersion] = 5            // ACPI 6.5
	le.PutUint64(t[fadtXFirmware:], 0) // FIRMWARE_CTRL is used (below 4 GiB)
	le.PutUint64(t[fadtXDSDT:], base+offDSDT)
	gas(t[fadtXPM1aEvtBlk:], cfg.PM1aEvent, 32, gasAccessWord)
	gas(t[fadtXPM1aCntBlk:], cfg.PM1aControl, 16, gasAccessWord)
	gas(t[fadtXPMTmrBlk:], cfg.PMTimer, 32, gasAccessDWord)
	copy(t[fadtHypervisorID:], "FTKVM\x00\x00\x00")
	t[9] = checksum(t)
}

// VirtioHID is the ACPI hardware ID Linux's virtio_mmio driver matches.
const VirtioHID = "LNRO0005"

// buildDSDT returns the DSDT: \_S5 and, in \_SB, one device per virtio
// window with _HID LNRO0005, _UID, _CCA and _CRS (its window and IRQ).
func buildDSDT(cfg Config) ([]byte, error) {
	var aml []byte
	// \_S5 (§7.4.2.6): SLP_TYPa, SLP_TYPb, reserved, reserved.
	aml = amlName(aml, "_S5_", amlPackage(nil,
		amlInteger(nil, uint64(cfg.SlpTypS5)), amlInteger(nil, uint64(cfg.SlpTypS5)),
		amlInteger(nil, 0), amlInteger(nil, 0)))
	var devs []byte
	for i, v := range cfg.Virtio {
		name, err := nameSeg(fmt.Sprintf("VR%02X", i))
		if err != nil || i > 0xff {
			return nil, fmt.Errorf("acpi: too many virtio devices (%d)", len(cfg.Virtio))
		}
		if v.Size == 0 || uint64(v.Base)+uint64(v.Size) > 1<<32 {
			return nil, fmt.Errorf("acpi: virtio window %#x+%#x is not below 4 GiB", v.Base, v.Size)
		}
		var crs []byte
		crs = memory32Fixed(crs, v.Base, v.Size)
		crs = extendedIRQ(crs, v.IRQ)
		crs = endTag(crs)
		var body []byte
		body = amlName(body, "_HID", amlString(nil, VirtioHID))
		body = amlName(body, "_UID", amlInteger(nil, uint64(i)))
		body = amlName(body, "_CCA", amlInteger(nil, 1)) // DMA is cache coherent
		body = amlName(body, "_CRS", amlBuffer(nil, crs))
		devs = amlDevice(devs, name, body)
	}
	if len(devs) > 0 {
		aml = amlScope(aml, "\\_SB_", devs)
	}
	t := make([]byte, headerSize+len(aml))
	header(t, "DSDT", 2) // revision 2: 64-bit integers
	copy(t[headerSize:], aml)
	t[9] = checksum(t)
	return t, nil
}
