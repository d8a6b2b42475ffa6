package acpi

import "fmt"

// A minimal AML encoder (ACPI 6.5 §20.2, "AML Grammar Definition"): just
// the terms ftkvm's DSDT uses. Every function appends to dst.

// AML opcodes and prefixes (§20.2.3, §20.2.5).
const (
	amlZeroOp         = 0x00
	amlOneOp          = 0x01
	amlNameOp         = 0x08
	amlBytePrefix     = 0x0a
	amlWordPrefix     = 0x0b
	amlDWordPrefix    = 0x0c
	amlStringPrefix   = 0x0d
	amlQWordPrefix    = 0x0e
	amlScopeOp        = 0x10
	amlBufferOp       = 0x11
	amlPackageOp      = 0x12
	amlExtOpPrefix    = 0x5b
	amlDeviceOp       = 0x82 // after amlExtOpPrefix
	amlRootChar       = '\\'
	amlDualNamePrefix = 0x2e
)

// nameSeg checks a 4-character name segment (§20.2.2: a lead character
// 'A'-'Z' or '_', then 'A'-'Z', '0'-'9' or '_').
func nameSeg(s string) (string, error) {
	if len(s) != 4 {
		return "", fmt.Errorf("acpi: name %q is not 4 characters", s)
	}
	for i := 0; i < 4; i++ {
		c := s[i]
		ok := c == '_' || c >= 'A' && c <= 'Z' || i > 0 && c >= '0' && c <= '9'
		if !ok {
			return "", fmt.Errorf("acpi: name %q has an invalid character %q", s, c)
		}
	}
	return s, nil
}

// pkgLength appends the PkgLength for n bytes of content that follow it
// (§20.2.4): the encoded length counts its own bytes too.
func pkgLength(dst []byte, n int) []byte {
	if n+1 < 1<<6 {
		return append(dst, byte(n+1))
	}
	for k := 2; k <= 4; k++ {
		l := n + k
		if l < 1<<(4+8*(k-1)) {
			dst = append(dst, byte(k-1)<<6|byte(l&0x0f))
			l >>= 4
			for i := 1; i < k; i++ {
				dst = append(dst, byte(l))
				l >>= 8
			}
			return dst
		}
	}
	panic("acpi: AML package longer than 256 MiB") // never with ftkvm's tables
}

// amlInteger appends the shortest encoding of v (§20.2.3).
func amlInteger(dst []byte, v uint64) []byte {
	switch {
	case v == 0:
		return append(dst, amlZeroOp)
	case v == 1:
		return append(dst, amlOneOp)
	case v <= 0xff:
		return append(dst, amlBytePrefix, byte(v))
	case v <= 0xffff:
		return append(dst, amlWordPrefix, byte(v), byte(v>>8))
	case v <= 0xffffffff:
		return append(dst, amlDWordPrefix, byte(v), byte(v>>8), byte(v>>16), byte(v>>24))
	}
	dst = append(dst, amlQWordPrefix)
	for i := 0; i < 8; i++ {
		dst = append(dst, byte(v>>(8*i)))
	}
	return dst
}

// amlString appends a String (ASCII, NUL-terminated).
func amlString(dst []byte, s string) []byte {
	dst = append(dst, amlStringPrefix)
	dst = append(dst, s...)
	return append(dst, 0)
}

// amlName appends Name(seg, object): object is an already encoded
// DataRefObject.
func amlName(dst []byte, seg string, object []byte) []byte {
	dst = append(dst, amlNameOp)
	dst = append(dst, seg...)
	return append(dst, object...)
}

// amlPackage appends Package(){elements...} of encoded elements.
func amlPackage(dst []byte, elements ...[]byte) []byte {
	var body []byte
	body = append(body, byte(len(elements)))
	for _, e := range elements {
		body = append(body, e...)
	}
	dst = append(dst, amlPackageOp)
	dst = pkgLength(dst, len(body))
	return append(dst, body...)
}

// amlBuffer appends Buffer(){data}.
func amlBuffer(dst []byte, data []byte) []byte {
	body := amlInteger(nil, uint64(len(data)))
	body = append(body, data...)
	dst = append(dst, amlBufferOp)
	dst = pkgLength(dst, len(body))
	return append(dst, body...)
}

// amlScope appends Scope(path){terms}; path is a root-relative name
// ("\\_SB_").
func amlScope(dst []byte, path string, terms []byte) []byte {
	body := append([]byte(path), terms...)
	dst = append(dst, amlScopeOp)
	dst = pkgLength(dst, len(body))
	return append(dst, body...)
}

// amlDevice appends Device(seg){terms}.
func amlDevice(dst []byte, seg string, terms []byte) []byte {
	body := append([]byte(seg), terms...)
	dst = append(dst, amlExtOpPrefix, amlDeviceOp)
	dst = pkgLength(dst, len(body))
	return append(dst, body...)
}

// Resource descriptors for _CRS (§6.4).
const (
	resMemory32Fixed = 0x86 // large item, type 6
	resExtendedIRQ   = 0x89 // large item, type 9
	resEndTag        = 0x79 // small item, type 0xf, length 1

	irqConsumer  = 0x01
	irqEdge      = 0x02 // bit 1: 1 edge, 0 level
	irqActiveLow = 0x04
	irqShared    = 0x08
	memReadWrite = 0x01
)

// memory32Fixed appends a 32-bit fixed memory range descriptor (§6.4.3.4).
func memory32Fixed(dst []byte, base, length uint32) []byte {
	dst = append(dst, resMemory32Fixed, 9, 0, memReadWrite)
	dst = le32(dst, base)
	return le32(dst, length)
}

// extendedIRQ appends an extended interrupt descriptor (§6.4.3.6) for one
// interrupt consumed by the device: edge-triggered, active high,
// exclusive.
func extendedIRQ(dst []byte, irq uint32) []byte {
	dst = append(dst, resExtendedIRQ, 6, 0, irqConsumer|irqEdge, 1)
	return le32(dst, irq)
}

// endTag ends a resource template (§6.4.2.9); checksum 0 means "not
// checked".
func endTag(dst []byte) []byte { return append(dst, resEndTag, 0) }

func le32(dst []byte, v uint32) []byte {
	return append(dst, byte(v), byte(v>>8), byte(v>>16), byte(v>>24))
}
