package main

import (
	"fmt"
	"net"
	"strings"

	"github.com/sirupsen/logrus"

	"github.com/ftkvm/ftkvm/devices/tap"
	"github.com/ftkvm/ftkvm/vmm"
)

// netFlag is one parsed --net value.
type netFlag struct {
	tap string
	mac net.HardwareAddr // nil: derived from the guest
}

// parseNets parses --net values: tap=NAME[,mac=MAC].
func parseNets(flags []string) ([]netFlag, error) {
	var out []netFlag
	seen := map[string]bool{}
	for _, f := range flags {
		var n netFlag
		for _, kv := range strings.Split(f, ",") {
			k, v, _ := strings.Cut(kv, "=")
			switch k {
			case "tap":
				n.tap = v
			case "mac":
				mac, err := net.ParseMAC(v)
				if err != nil || len(mac) != 6 {
					return nil, fmt.Errorf("--net %q: malformed MAC %q (six hex bytes, 02:00:00:00:00:01)", f, v)
				}
				if mac[0]&1 != 0 {
					return nil, fmt.Errorf("--net %q: MAC %s is a multicast address", f, mac)
				}
				n.mac = mac
			default:
				return nil, fmt.Errorf("--net %q: unknown option %q (tap=NAME[,mac=MAC])", f, k)
			}
		}
		if n.tap == "" {
			return nil, fmt.Errorf("--net %q: no tap name (tap=NAME[,mac=MAC])", f)
		}
		if seen[n.tap] {
			return nil, fmt.Errorf("--net %q: tap %s given twice", f, n.tap)
		}
		seen[n.tap] = true
		out = append(out, n)
	}
	return out, nil
}

// openNets opens the taps, adds a virtio-net interface for each to cfg and
// makes each tap a frame source of env. Transmitted frames go straight to
// the tap: run holds no output. (A replica's driver gives its own NIC.Tx
// writers instead, which hold frames until the backup acknowledged the log
// up to them, as it holds the console.)
func openNets(nets []netFlag, env *vmm.LiveEnv, cfg *vmm.Config) ([]*tap.Tap, error) {
	var taps []*tap.Tap
	for i, n := range nets {
		t, err := tap.Open(n.tap)
		if err != nil {
			closeNets(taps)
			return nil, fmt.Errorf("--net: %w", err)
		}
		taps = append(taps, t)
		cfg.NICs = append(cfg.NICs, vmm.NIC{MAC: n.mac, Tx: t})
		name := t.Name()
		env.AddFrameSource(i, t, func(err error) {
			logrus.Errorf("network interface %d: tap %s: %v; no more frames reach the guest from it", i, name, err)
		})
	}
	return taps, nil
}

func closeNets(taps []*tap.Tap) {
	for _, t := range taps {
		t.Close()
	}
}
