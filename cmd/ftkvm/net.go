package main

import (
	"fmt"
	"net"
	"strings"

	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"

	"github.com/ftkvm/ftkvm/ft/driver"

	"github.com/ftkvm/ftkvm/devices/tap"
	"github.com/ftkvm/ftkvm/ft/wire"
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
		if len(n.tap) >= unix.IFNAMSIZ {
			return nil, fmt.Errorf("--net %q: tap %q: a name of 1 to %d bytes is needed", f, n.tap, unix.IFNAMSIZ-1)
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

// replicaNets sets up the network interfaces of a replica: cfg gets a
// virtio-net interface for each (its Tx is set by setReplicaTx once the
// replica exists), and the driver gets how to attach each host side. A
// primary opens its taps now, so that a tap it cannot have fails the
// command at once; a backup opens its own only when it takes over (until
// then it must neither read nor send frames), each under the same name
// and with the same MAC. The returned taps are those opened now.
func replicaNets(nets []netFlag, openNow bool, cfg *vmm.Config) ([]driver.NIC, []*tap.Tap, error) {
	for _, n := range nets {
		cfg.NICs = append(cfg.NICs, vmm.NIC{MAC: n.mac})
	}
	macs := vmm.NICAddrs(*cfg)
	var out []driver.NIC
	var taps []*tap.Tap
	for i, n := range nets {
		name := n.tap
		open := func() (driver.FramePort, error) {
			t, err := tap.Open(name)
			if err != nil {
				return nil, err
			}
			return t, nil
		}
		if openNow {
			t, err := tap.Open(name)
			if err != nil {
				closeNets(taps)
				return nil, nil, fmt.Errorf("--net: %w", err)
			}
			taps = append(taps, t)
			open = func() (driver.FramePort, error) { return t, nil }
		}
		out = append(out, driver.NIC{MAC: macs[i], Open: open})
	}
	return out, taps, nil
}

// setReplicaTx makes the replica's node the output of each interface.
func setReplicaTx(r *driver.Replica, cfg *vmm.Config) {
	for i := range cfg.NICs {
		cfg.NICs[i].Tx = r.NetTx(i)
	}
}

// wireNICs lists the interfaces' MACs for the handshake.
func wireNICs(nics []driver.NIC) []wire.NIC {
	var out []wire.NIC
	for _, n := range nics {
		var w wire.NIC
		copy(w.MAC[:], n.MAC)
		out = append(out, w)
	}
	return out
}

// restoreNets opens the taps of a restored or received guest and makes
// each a frame source of env; an interface without mac= takes the
// captured guest's address.
func restoreNets(flags []string, env *vmm.LiveEnv) ([]vmm.NIC, []*tap.Tap, error) {
	nets, err := parseNets(flags)
	if err != nil {
		return nil, nil, err
	}
	var cfg vmm.Config
	taps, err := openNets(nets, env, &cfg)
	return cfg.NICs, taps, err
}
