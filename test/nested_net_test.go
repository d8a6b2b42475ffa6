package test

import (
	"context"
	"fmt"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ftkvm/ftkvm/test/nested"
	"github.com/ftkvm/ftkvm/tools/images/imagelib"
)

// netModules are the Debian kernel's modules for a virtio-mmio network
// interface (virtio_net needs net_failover, which needs failover), with
// the directory under kernel/ each is in.
var netModules = [][2]string{
	{"net/core", "failover"}, {"drivers/net", "net_failover"},
	{"drivers/virtio", "virtio_ring"}, {"drivers/virtio", "virtio"}, {"drivers/virtio", "virtio_mmio"},
	{"drivers/net", "virtio_net"},
}

// netL1Modules are the modules the L1 needs for its side of the network:
// ftkvm's taps, and the bridge and veth pairs of the drills' namespaces
// (bridge needs stp, which needs llc), in loading order.
var netL1Modules = [][2]string{
	{"drivers/net", "tun"}, {"net/llc", "llc"}, {"net/802", "stp"}, {"net/bridge", "bridge"}, {"drivers/net", "veth"},
}

// netGuestInit is the L2 /init of the network test: it loads the Debian
// kernel's virtio_net (found through the ACPI DSDT), gives eth0 the
// address ftkvm.ip= on the kernel command line, serves one TCP connection
// with an echo (busybox nc -e cat), reports the interface's counters and
// powers off.
const netGuestInit = netGuestPrologue + `echo "NET-LISTENING"
nc -l -p 7777 -e cat
echo "NET-SERVED rc=$?"
s=/sys/class/net/eth0/statistics
echo "NET-STATS rx=$(cat $s/rx_packets) tx=$(cat $s/tx_packets) rx_errors=$(cat $s/rx_errors) tx_errors=$(cat $s/tx_errors)"
echo "FTKVM-GUEST-DONE status=0"
poweroff -f
while :; do sleep 1000; done
`

// netGuestPrologue is the network guests' /init up to a configured eth0.
const netGuestPrologue = `#!/bin/sh
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec </dev/console >/dev/console 2>&1
echo "FTKVM-GUEST-READY workload=net"
for pass in 1 2 3 4 5 6; do
	for m in failover net_failover virtio_ring virtio virtio_mmio virtio_net; do
		grep -q "^$m " /proc/modules || insmod /lib/virtio/$m.ko 2>/dev/null
	done
done
echo "NET-MODULES $(cut -d' ' -f1 /proc/modules | sort | tr '\n' ' ')"
i=0
while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 20 ]; do sleep 1; i=$((i + 1)); done
addr=$(sed -n 's/.*ftkvm\.ip=\([^ ]*\).*/\1/p' /proc/cmdline)
ip link set lo up
ip addr add "$addr" dev eth0
ip link set eth0 up
echo "NET-MAC $(cat /sys/class/net/eth0/address)"
echo "NET-ADDR $(ip -4 addr show dev eth0 | grep -o 'inet [0-9./]*')"
`

// netFiles extracts the modules from the pinned kernel package and builds
// the L2 initramfs with init as its /init; it returns the initramfs and
// the L1's modules (netL1Modules: name -> file on this host).
func netFiles(ctx context.Context, t testing.TB, im *imagelib.Images, init string) (initramfs string, l1Mods map[string]string) {
	t.Helper()
	debs, _ := filepath.Glob(filepath.Join(filepath.Dir(im.Vmlinux), "*.deb"))
	if len(debs) != 1 {
		t.Fatalf("the kernel package is not in the image cache next to %s (found %v)", im.Vmlinux, debs)
	}
	dir := t.TempDir()
	var pats []string
	for _, m := range append(netModules, netL1Modules...) {
		pats = append(pats, "*/kernel/"+m[0]+"/"+m[1]+".ko")
	}
	sh := fmt.Sprintf("dpkg-deb --fsys-tarfile %s | tar -x -C %s --wildcards %s", debs[0], dir, strings.Join(pats, " "))
	if out, err := exec.CommandContext(ctx, "sh", "-c", sh).CombinedOutput(); err != nil {
		t.Fatalf("extracting the modules: %v\n%s", err, out)
	}
	a, err := imagelib.BaseArchive(ctx, im.Busybox)
	if err != nil {
		t.Fatal(err)
	}
	module := func(m [2]string) string {
		found, _ := filepath.Glob(filepath.Join(dir, "lib", "modules", "*", "kernel", m[0], m[1]+".ko"))
		if len(found) != 1 {
			t.Fatalf("module %s.ko not in the kernel package (found %v)", m[1], found)
		}
		return found[0]
	}
	l1Mods = map[string]string{}
	for _, m := range netL1Modules {
		l1Mods[m[1]] = module(m)
	}
	for _, m := range netModules {
		if err := a.HostFile("lib/virtio/"+m[1]+".ko", module(m), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := a.File("init", []byte(init), 0o755); err != nil {
		t.Fatal(err)
	}
	initramfs = filepath.Join(dir, "net.cpio")
	if err := a.WriteFile(initramfs); err != nil {
		t.Fatal(err)
	}
	return initramfs, l1Mods
}

// TestNestedVirtioNet boots the unmodified Debian kernel under `ftkvm run
// --net tap=...` in the L1: the kernel finds the interface through ACPI,
// its virtio_net takes the address from the command line and serves a TCP
// echo; the L1, on the tap's side, connects with busybox nc, streams
// about 19 KB (many frames each way) and checks that exactly the same
// bytes come back.
func TestNestedVirtioNet(t *testing.T) {
	nestedTest(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	im := linuxImages(t)
	const (
		l1Initrd = "/guest/net.cpio"
		l1Tun    = "/lib/tun.ko"
		mac      = "02:f7:00:00:00:15"
	)
	initramfs, l1Mods := netFiles(ctx, t, im, netGuestInit)
	script := fmt.Sprintf(`insmod %s || exit 1
[ -c /dev/net/tun ] || { echo "no /dev/net/tun"; exit 1; }
%s --log-level info run --kernel %s --initrd %s --mem 256 --cmdline "quiet ftkvm.ip=10.0.2.15/24" --net tap=ftap0,mac=%s >/tmp/console 2>&1 &
ft=$!
i=0
while [ ! -e /sys/class/net/ftap0 ] && [ $i -lt 60 ]; do sleep 1; i=$((i + 1)); done
ip addr add 10.0.2.1/24 dev ftap0
echo "L1-TAP $(ip -4 addr show dev ftap0 | grep -o 'inet [0-9./]*')"
i=0
while ! grep -q NET-LISTENING /tmp/console && [ $i -lt 240 ]; do sleep 1; i=$((i + 1)); done
seq 1 4000 > /tmp/data
mkfifo /tmp/in
nc 10.0.2.15 7777 </tmp/in >/tmp/out &
nc=$!
exec 3>/tmp/in
cat /tmp/data >&3
i=0
while ! cmp -s /tmp/data /tmp/out && [ $i -lt 120 ]; do sleep 1; i=$((i + 1)); done
if cmp -s /tmp/data /tmp/out; then echo "ECHO-OK $(wc -c </tmp/out) bytes"; else echo "ECHO-BAD sent $(wc -c </tmp/data) got $(wc -c </tmp/out)"; fi
exec 3>&-
kill $nc 2>/dev/null
wait $ft
echo "@@@ ftkvm rc=$?"
cat /tmp/console`, l1Tun, l1FTKVM, nested.GuestVmlinux, l1Initrd, mac)
	cfg := nested.Config{
		Files:       map[string]string{l1FTKVM: ftkvmBin, l1Initrd: initramfs, l1Tun: l1Mods["tun"]},
		GuestImages: true,
		Commands:    []nested.Command{{Name: "net-echo", Cmd: script, Timeout: 8 * time.Minute}},
	}
	res := runNested(ctx, t, cfg)
	t.Logf("L1 boot %v, whole run %v", res.BootTime.Round(time.Second), res.Elapsed.Round(time.Second))
	c := res.Command("net-echo")
	if c == nil {
		t.Fatal("the L1 did not run net-echo")
	}
	if !c.OK() {
		t.Fatalf("net-echo failed: %v\n%s", c.Err(), c.Output)
	}
	t.Logf("net-echo (%v):\n%s", c.Duration.Round(time.Millisecond), c.Output)
	for _, want := range []string{
		"L1-TAP inet 10.0.2.1/24",
		"NET-MAC " + mac,
		"NET-ADDR inet 10.0.2.15/24",
		"ECHO-OK 18893 bytes",
		"NET-SERVED rc=0",
		"FTKVM-GUEST-DONE status=0",
		"@@@ ftkvm rc=0",
		"network interface " + mac,
	} {
		if !strings.Contains(c.Output, want) {
			t.Errorf("output lacks %q", want)
		}
	}
}
