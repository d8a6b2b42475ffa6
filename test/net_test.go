package test

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ftkvm/ftkvm/vmm/api"
)

// Network interfaces between replicas and across snapshots, on the real
// /dev/kvm with tap devices (root). testos has no virtio-net driver here,
// so its interface stays configured-but-idle: frames the host sends to the
// guest's tap (the test's own, and the host kernel's IPv6 chatter on a new
// interface) are received by the device and wait in it (NetRxPending), so
// both replicas' devices must have received the same frames, and a
// snapshot must carry them. The guest's transmit path is covered by the
// crash simulation (ft/driver/simnet_test.go) and devices' tests.

// tapName is an interface name unique to this test run (at most 15 bytes).
func tapName(prefix string) string {
	return fmt.Sprintf("%s%06x", prefix, rand.Uint32()&0xffffff)
}

func linkExists(name string) bool {
	_, err := os.Stat(filepath.Join("/sys/class/net", name))
	return err == nil
}

// testFrame is a frame for the guest's MAC from the host.
func testFrame(dst net.HardwareAddr, seq uint32) []byte {
	f := make([]byte, 64)
	copy(f, dst)
	copy(f[6:], []byte{0x02, 0xfe, 0, 0, 0, 1})
	f[12], f[13] = 0x88, 0xb5
	binary.BigEndian.PutUint32(f[14:], seq)
	return f
}

var nicStatsRE = regexp.MustCompile(`network interface ([0-9a-f:]{17})[^\n]*rx_overflow=(\d+) rx_pending=(\d+)`)

// nicStats reads the device counters a replica or run logged at its end:
// the MAC, and the frames waiting in the device and dropped for want of
// room (what the guest's device received, without a driver).
func nicStats(t *testing.T, who, stderr string) (mac string, overflow, pending string) {
	t.Helper()
	m := nicStatsRE.FindStringSubmatch(stderr)
	if m == nil {
		t.Fatalf("%s: no network interface counters in its log:\n%s", who, stderr)
	}
	return m[1], m[2], m[3]
}

// TestReplicaNICs: primary and backup with a network interface each (its
// own tap) run the guest to its end in verify mode, while the test sends
// frames to the guest through the primary's tap: the backup never opens
// its tap, and its device received exactly the primary's frames. Then a
// failover: the backup opens its tap only when it takes over, announces
// the guest's MAC (RARP, seen on its tap) and finishes the guest. Replicas
// given different MACs or counts of interfaces are refused with one line.
func TestReplicaNICs(t *testing.T) {
	requireKVM(t)
	w := workloadNamed(t, "echo")
	const mac = "02:00:5e:00:53:01"
	guestMAC, _ := net.ParseMAC(mac)
	ptap, btap := tapName("ftp"), tapName("ftb")

	b := start(t, append([]string{"--log-level", "info", "backup", "--listen", "127.0.0.1:0", "--net", "tap=" + btap + ",mac=" + mac}, replicaArgs(w)...)...)
	p := start(t, append([]string{"--log-level", "info", "primary", "--verify", "--backup", b.backupAddr(), "--net", "tap=" + ptap + ",mac=" + mac}, replicaArgs(w)...)...)
	p.waitOutput("echo: ready\n")
	if !linkExists(ptap) {
		t.Fatalf("the primary's tap %s does not exist", ptap)
	}
	ps := openPacketConn(t, ptap, unix.ETH_P_ALL)
	for i := range 20 {
		ps.send(t, testFrame(guestMAC, uint32(i)))
	}
	w.feed(p, 0, 2)
	if linkExists(btap) {
		t.Fatalf("the backup opened its tap %s while it was a backup", btap)
	}
	w.feed(p, 2, len(w.input))
	res, bres := p.wait(), b.wait()
	if res.status != 0 || bres.status != 0 {
		t.Fatalf("status: primary %d, backup %d\nprimary:\n%s\nbackup:\n%s", res.status, bres.status, res.stderr, bres.stderr)
	}
	w.checkComplete(t, res.stdout)
	if m := regexp.MustCompile(`(\d+) divergences, (\d+) repairs`).FindStringSubmatch(bres.stderr); m == nil || m[1] != "0" {
		t.Errorf("backup counters: %v\n%s", m, bres.stderr)
	}
	// (The backup stops at the goodbye, wherever its replay stands: its
	// device's counters at the end need not be the primary's. The
	// failover below checks that the log carried the frames.)
	pm, _, pp := nicStats(t, "primary", res.stderr)
	if pm != mac || pp == "0" {
		t.Errorf("primary's interface %s has %s frames waiting; want %s and the frames sent", pm, pp, mac)
	}
	if strings.Contains(bres.stderr, "announcements") && !strings.Contains(bres.stderr, " 0 announcements") {
		t.Errorf("the backup announced the guest without taking over:\n%s", bres.stderr)
	}

	// A failover: the backup's tap appears only now, announces the guest.
	ptap, btap = tapName("ftp"), tapName("ftb")
	b = start(t, append([]string{"--log-level", "info", "backup", "--listen", "127.0.0.1:0", "--net", "tap=" + btap + ",mac=" + mac}, replicaArgs(w)...)...)
	p = start(t, append([]string{"--log-level", "info", "primary", "--backup", b.backupAddr(), "--net", "tap=" + ptap + ",mac=" + mac}, replicaArgs(w)...)...)
	p.waitOutput("echo: ready\n")
	ps = openPacketConn(t, ptap, unix.ETH_P_ALL)
	for i := range 20 {
		ps.send(t, testFrame(guestMAC, uint32(i)))
	}
	// Two lines: the second is typed after the first came back, by when
	// the primary has read the frames; its bytes are delivered at an
	// epoch end after theirs, and its echo leaves only once the backup
	// holds the log up to it.
	w.feed(p, 0, 2)
	if linkExists(btap) {
		t.Fatalf("the backup opened its tap %s while it was a backup", btap)
	}
	p.kill()
	b.waitUntil("its tap", func() bool { return linkExists(btap) })
	bs := openPacketConn(t, btap, unix.ETH_P_ALL)
	var announced []byte
	if !bs.await(t, 2*time.Second, func(f []byte) bool {
		if len(f) >= 42 && f[12] == 0x80 && f[13] == 0x35 {
			announced = bytes.Clone(f)
			return true
		}
		return false
	}) {
		t.Fatalf("no RARP announcement on the backup's tap after the takeover\n%s", b.stderr())
	}
	w.feed(b, 2, len(w.input))
	bres = b.wait()
	if bres.status != 0 || !strings.Contains(bres.stderr, "taking over") {
		t.Fatalf("backup after the failover: status %d\n%s", bres.status, bres.stderr)
	}
	// The promoted backup's device received the frames sent to the
	// primary before its death (they waited in the device, no driver),
	// which only the log could bring it: its tap did not exist then.
	bm, bo, bp := nicStats(t, "promoted backup", bres.stderr)
	if atoi(bo)+atoi(bp) < 20 {
		t.Errorf("the promoted backup's device received %s+%s frames; 20 were sent to the primary before the failover\n%s", bp, bo, bres.stderr)
	}
	if !bytes.Equal(announced[6:12], mustMAC(t, bm)) || !bytes.Equal(announced[22:28], mustMAC(t, bm)) || !bytes.Equal(announced[:6], []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}) {
		t.Errorf("announcement % x is not a broadcast RARP for the guest's MAC %s", announced[:42], bm)
	}
	out, _ := mergeSeam(t, p.stdout(), bres)
	w.checkComplete(t, out)

	// Different interfaces: refused by the backup (which tells the
	// primary why: "here" is the backup), one line on the primary.
	for _, tc := range []struct {
		name         string
		backup, prim []string
		want         string
	}{
		{"mac", []string{"--net", "tap=" + tapName("ftb") + ",mac=02:00:5e:00:53:01"}, []string{"--net", "tap=" + tapName("ftp") + ",mac=02:00:5e:00:53:02"},
			"different network interfaces: interface 0 has MAC 02:00:5e:00:53:01 here, 02:00:5e:00:53:02 on the peer"},
		{"count", nil, []string{"--net", "tap=" + tapName("ftp")}, "different network interfaces: 0 here, 1 on the peer"},
	} {
		b := start(t, append(append([]string{"backup", "--listen", "127.0.0.1:0"}, tc.backup...), replicaArgs(w)...)...)
		pr := ftkvm(t, time.Minute, "", append(append([]string{"primary", "--backup", b.backupAddr()}, tc.prim...), replicaArgs(w)...)...)
		if pr.status != 125 {
			t.Fatalf("%s: primary status %d\n%s", tc.name, pr.status, pr.stderr)
		}
		oneLine(t, tc.name+": primary", pr.stderr, tc.want)
		b.waitUntil("the refusal logged", func() bool { return strings.Contains(b.stderr(), tc.want) })
	}
}

func atoi(s string) int {
	n, _ := strconv.Atoi(s)
	return n
}

func mustMAC(t *testing.T, s string) net.HardwareAddr {
	t.Helper()
	m, err := net.ParseMAC(s)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// TestSnapshotRestoreWithNIC: a guest with a network interface that
// received frames (waiting in its device: no driver) is snapshotted
// (--stop) and restored on another tap: it continues to the end, with the
// captured MAC and the waiting frames. Restored without the interface or
// with another MAC, restore refuses with one line.
func TestSnapshotRestoreWithNIC(t *testing.T) {
	requireKVM(t)
	w := workloadNamed(t, "counter")
	sock := tempSocket(t)
	file := filepath.Join(t.TempDir(), "snap")
	tp := tapName("fts")
	src := start(t, "--log-level", "info", "run", "--kernel", testosELF, "--mem", "64", "--cmdline", w.cmdline, "--api", sock, "--net", "tap="+tp)
	src.waitLines(2)
	ps := openPacketConn(t, tp, unix.ETH_P_ALL)
	for i := range 5 {
		ps.send(t, testFrame(net.HardwareAddr{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}, uint32(i)))
	}
	time.Sleep(50 * time.Millisecond) // frames delivered at the guest's next points
	ctl := ftkvm(t, time.Minute, "", "ctl", "--api", sock, "snapshot", "--stop", file)
	if ctl.status != 0 {
		t.Fatalf("ctl snapshot --stop: status %d\n%s%s", ctl.status, ctl.stdout, ctl.stderr)
	}
	before := src.wait()
	if before.status != 0 {
		t.Fatalf("source: status %d\n%s", before.status, before.stderr)
	}
	mac, _, pending := nicStats(t, "source", before.stderr)
	if pending == "0" {
		t.Fatalf("no frames wait in the source's device:\n%s", before.stderr)
	}
	for _, tc := range []struct {
		name string
		nets []string
		want string
	}{
		{"no interface", nil, "the guest was captured with 1 network interface (" + mac + "); this machine was given no network interfaces"},
		{"other MAC", []string{"--net", "tap=" + tapName("ftr") + ",mac=02:00:5e:00:53:77"}, "this machine was given 1 network interface (02:00:5e:00:53:77)"},
	} {
		res := ftkvm(t, time.Minute, "", append([]string{"restore", file}, tc.nets...)...)
		if res.status != 125 || res.stdout != "" {
			t.Errorf("restore with %s: status %d, output %q", tc.name, res.status, res.stdout)
		}
		oneLine(t, "restore with "+tc.name, res.stderr, tc.want)
	}
	after := ftkvm(t, 2*time.Minute, "", "--log-level", "info", "restore", file, "--net", "tap="+tapName("ftr"))
	if after.status != 0 {
		t.Fatalf("restore: status %d\n%s\n%s", after.status, after.stdout, after.stderr)
	}
	w.checkComplete(t, before.stdout+after.stdout)
	amac, _, apending := nicStats(t, "restored", after.stderr)
	if n, _ := strconv.Atoi(pending); amac != mac || atoi(apending) < n {
		t.Errorf("restored interface %s with %s frames waiting; captured %s with %s", amac, apending, mac, pending)
	}
}

// TestMigrateWithNIC: a guest with a network interface whose device holds
// frames migrates to `ftkvm receive --net` on another tap; it keeps its
// MAC and the waiting frames and runs to its end there.
func TestMigrateWithNIC(t *testing.T) {
	requireKVM(t)
	w := workloadNamed(t, "counter")
	dst := start(t, "--log-level", "info", "receive", "--listen", "127.0.0.1:0", "--net", "tap="+tapName("ftd"))
	addr := dst.listenAddr()
	sock := tempSocket(t)
	tp := tapName("ftm")
	src := start(t, "--log-level", "info", "run", "--kernel", testosELF, "--mem", "64", "--cmdline", w.cmdline, "--api", sock, "--net", "tap="+tp)
	src.waitLines(2)
	ps := openPacketConn(t, tp, unix.ETH_P_ALL)
	for i := range 5 {
		ps.send(t, testFrame(net.HardwareAddr{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}, uint32(i)))
	}
	time.Sleep(50 * time.Millisecond) // frames delivered at the guest's next points
	ctl := ftkvm(t, time.Minute, "", "ctl", "--api", sock, "migrate", addr)
	if ctl.status != 0 {
		t.Fatalf("ctl migrate: status %d\n%s%s", ctl.status, ctl.stdout, ctl.stderr)
	}
	before := src.wait()
	if before.status != 0 || !strings.Contains(before.stderr, "ftkvm: guest migrated to "+addr) {
		t.Fatalf("source: status %d\nstderr:\n%s", before.status, before.stderr)
	}
	after := dst.wait()
	if after.status != 0 {
		t.Fatalf("destination: status %d\n%s\n%s", after.status, after.stdout, after.stderr)
	}
	w.checkComplete(t, before.stdout+after.stdout)
	mac, _, pending := nicStats(t, "source", before.stderr)
	dmac, _, dpending := nicStats(t, "destination", after.stderr)
	if pending == "0" || dmac != mac || atoi(dpending) < atoi(pending) {
		t.Errorf("source %s with %s frames waiting; destination %s with %s", mac, pending, dmac, dpending)
	}
}

// TestReplicaReprotectWithNIC: after a failover, a new backup joins the
// promoted primary (ctl protect) with a network interface: the full state
// it receives carries the device (frames waiting in it); frames sent to the
// promoted primary's tap afterwards reach it through the log; it opens its
// own tap only at the second failover, and finishes the guest.
func TestReplicaReprotectWithNIC(t *testing.T) {
	requireKVM(t)
	w := workloadNamed(t, "echo")
	const mac = "02:00:5e:00:53:21"
	guestMAC, _ := net.ParseMAC(mac)
	sock := tempSocket(t)
	b1tap, b2tap := tapName("ftb"), tapName("ftj")
	b1 := start(t, append([]string{"--log-level", "info", "backup", "--listen", "127.0.0.1:0", "--api", sock, "--net", "tap=" + b1tap + ",mac=" + mac}, replicaArgs(w)...)...)
	p1 := start(t, append([]string{"--log-level", "info", "primary", "--backup", b1.backupAddr(), "--net", "tap=" + tapName("ftp") + ",mac=" + mac}, replicaArgs(w)...)...)
	p1.waitOutput("echo: ready\n")
	w.feed(p1, 0, 1)
	p1.kill()
	b1.waitUntil("the first failover", func() bool { return strings.Contains(b1.stderr(), "this replica is the primary now") })
	b1.waitUntil("its tap", func() bool { return linkExists(b1tap) })

	b2 := start(t, append([]string{"--log-level", "info", "backup", "--listen", "127.0.0.1:0", "--join", "--net", "tap=" + b2tap + ",mac=" + mac}, replicaArgs(w)...)...)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := api.NewClient(sock).Protect(ctx, b2.backupAddr()); err != nil {
		t.Fatalf("protect: %v\nfirst backup:\n%s", err, b1.stderr())
	}
	b1.waitUntil("protection", func() bool { return strings.Contains(b1.stderr(), "protected: the backup holds") })
	ps := openPacketConn(t, b1tap, unix.ETH_P_ALL)
	for i := range 20 {
		ps.send(t, testFrame(guestMAC, uint32(i)))
	}
	// As in TestReplicaNICs: the second line's echo leaves only once the
	// new backup holds the log up to it, frames included.
	w.feed(b1, 1, 3)
	if linkExists(b2tap) {
		t.Fatalf("the joined backup opened its tap %s while it was a backup", b2tap)
	}
	b1.kill()
	b2.waitUntil("the second failover", func() bool { return strings.Contains(b2.stderr(), "this replica is the primary now") })
	b2.waitUntil("its tap", func() bool { return linkExists(b2tap) })
	w.feed(b2, 3, len(w.input))
	res := b2.wait()
	if res.status != 0 || !strings.Contains(res.stderr, "taking over") {
		t.Fatalf("second backup: status %d\n%s", res.status, res.stderr)
	}
	out, _ := mergeSeam(t, p1.stdout(), result{stdout: b1.stdout(), stderr: b1.stderr()})
	out, _ = mergeSeam(t, out, res)
	w.checkComplete(t, out)
	bm, bo, bp := nicStats(t, "second backup", res.stderr)
	if bm != mac || atoi(bo)+atoi(bp) < 20 {
		t.Errorf("the second backup's interface %s received %s+%s frames; 20 were sent to its primary\n%s", bm, bp, bo, res.stderr)
	}
}
