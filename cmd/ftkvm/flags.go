package main

import (
	"fmt"
	"strconv"
	"strings"

	"github.com/alecthomas/kong"
)

// memMiB is a guest memory size flag in MiB: a plain number is MiB, and a
// K, M, G or T suffix (with an optional "iB" or "B") gives binary units
// (1G = 1024 MiB). It must be a multiple of 2 MiB (the machine maps memory
// in 2 MiB pages) between 2 MiB and 1 TiB. A bad value is a usage error
// (exit status 2), reported by the parser.
type memMiB uint64

const maxMemMiB = 1 << 20

func (m *memMiB) Decode(ctx *kong.DecodeContext) error {
	var s string
	if err := ctx.Scan.PopValueInto("size", &s); err != nil {
		return err
	}
	v, err := parseMiB(s)
	if err != nil {
		return err
	}
	*m = memMiB(v)
	return nil
}

// splitSize splits a size such as "512M", "1GiB" or "100MB" into its
// number and the binary shift of its K, M, G or T suffix (-1: none).
func splitSize(s string) (string, int) {
	t := strings.TrimSpace(s)
	t = strings.TrimSuffix(strings.TrimSuffix(t, "B"), "i")
	if n := len(t); n > 0 {
		switch t[n-1] {
		case 'k', 'K':
			return t[:n-1], 10
		case 'm', 'M':
			return t[:n-1], 20
		case 'g', 'G':
			return t[:n-1], 30
		case 't', 'T':
			return t[:n-1], 40
		}
	}
	return t, -1
}

// parseMiB parses a memory size into MiB.
func parseMiB(s string) (uint64, error) {
	t, shift := splitSize(s)
	n, err := strconv.ParseUint(t, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("%q is not a size (a number of MiB, or with a K, M, G or T suffix)", s)
	}
	mib := n
	if shift >= 0 {
		if n > (maxMemMiB<<20)>>shift {
			return 0, fmt.Errorf("%s is more than %d MiB", s, maxMemMiB)
		}
		bytes := n << shift
		if bytes%(1<<20) != 0 {
			return 0, fmt.Errorf("%s is not a whole number of MiB", s)
		}
		mib = bytes >> 20
	}
	if mib < 2 || mib%2 != 0 || mib > maxMemMiB {
		return 0, fmt.Errorf("%s: need a multiple of 2 MiB between 2 MiB and %d MiB", s, maxMemMiB)
	}
	return mib, nil
}
