package test

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"hash/fnv"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// testos's virtio workloads on the real /dev/kvm: disk (virtio-blk) under
// run and as a failover drill of a replicated pair, each replica with its
// own copy of the image (docs/REPLICATION.md, "Disks"). The formats are
// guest/testos/records.h's; README.md there describes the lines.

// recordSize is one disk record: one sector.
const recordSize = 512

// diskRecord is record i of a run of records, as guest/testos/records.h
// (rec_fill) builds it.
func diskRecord(i, records uint64) []byte {
	r := make([]byte, recordSize)
	copy(r, "FTKVREC1")
	binary.LittleEndian.PutUint64(r[8:], i)
	binary.LittleEndian.PutUint64(r[16:], records)
	x := uint64(0x9E3779B97F4A7C15) ^ i
	for w := range 60 {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
		binary.LittleEndian.PutUint64(r[24+8*w:], x)
	}
	h := fnv.New64a()
	h.Write(r[:504])
	binary.LittleEndian.PutUint64(r[504:], h.Sum64())
	return r
}

// recordPositions returns where the disk workload puts records 1..records,
// relative to its start sector: in order, or with random the permutation
// of guest/testos/records.h (rec_order): the values below records in the
// order the LCG x = (a*x + c) mod m visits them from x = 0, m the smallest
// power of two >= records.
func recordPositions(records uint64, random bool) []uint64 {
	pos := make([]uint64, records)
	m := uint64(1)
	for m < records {
		m <<= 1
	}
	x := uint64(0)
	for i := range pos {
		if !random {
			pos[i] = uint64(i)
			continue
		}
		for {
			x = (6364136223846793005*x + 1442695040888963407) & (m - 1)
			if x < records {
				break
			}
		}
		pos[i] = x
	}
	return pos
}

// badRecords lists the records among 1..upto of a run of records (in
// order, or with random at recordPositions' permutation) that are not
// intact on the image at path, each with what is wrong.
func badRecords(t *testing.T, path string, start, records, upto uint64, random bool) []string {
	t.Helper()
	img, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	pos := recordPositions(records, random)
	var bad []string
	for i := uint64(1); i <= upto; i++ {
		off := (start + pos[i-1]) * recordSize
		if off+recordSize > uint64(len(img)) {
			bad = append(bad, fmt.Sprintf("record %d: beyond the image", i))
			continue
		}
		got := img[off : off+recordSize]
		if want := diskRecord(i, records); !bytes.Equal(got, want) {
			h := fnv.New64a()
			h.Write(got[:504])
			why := "contents differ"
			switch {
			case !bytes.Equal(got[:8], want[:8]):
				why = fmt.Sprintf("no record there (starts %q)", got[:8])
			case h.Sum64() != binary.LittleEndian.Uint64(got[504:]):
				why = "checksum does not match"
			}
			bad = append(bad, fmt.Sprintf("record %d: %s", i, why))
		}
	}
	return bad
}

// diskWorkload is the disk workload writing records from sector 0 in
// order.
func diskWorkload(records int) workload { return diskOrderWorkload(records, false) }

// diskOrderWorkload is the disk workload writing records from sector 0, in
// order or with random at recordPositions' permutation (order=random).
func diskOrderWorkload(records int, random bool) workload {
	cmdline, header := fmt.Sprintf("workload=disk records=%d hz=100", records), fmt.Sprintf(`disk: capacity=\d+ records=%d start=0`, records)
	if random {
		cmdline, header = cmdline+" order=random", header+" order=random"
	}
	return workload{
		name: "disk", cmdline: cmdline, lines: records + 4,
		check: func(t *testing.T, body []string) {
			want := []string{header}
			for i := 1; i <= records; i++ {
				want = append(want, fmt.Sprintf("disk record %d", i))
			}
			want = append(want, fmt.Sprintf("disk verified %d records", records))
			if len(body) != len(want) {
				t.Fatalf("%d lines, want %d:\n%s", len(body), len(want), strings.Join(body, "\n"))
			}
			for i, l := range body {
				if !regexp.MustCompile("^" + want[i] + "$").MatchString(l) {
					t.Fatalf("line %d is %q, want %q:\n%s", i+1, l, want[i], strings.Join(body, "\n"))
				}
			}
		},
	}
}

// printedRecords returns the last record number a console shows as
// flushed, on a complete line (a killed primary's last line may be cut
// short), checking they are 1, 2, ... in order.
func printedRecords(t *testing.T, console string) int {
	t.Helper()
	n := 0
	for _, m := range regexp.MustCompile(`(?m)^disk record (\d+)\n`).FindAllStringSubmatch(console, -1) {
		k, _ := strconv.Atoi(m[1])
		if k != n+1 {
			t.Fatalf("record %d printed after record %d:\n%s", k, n, console)
		}
		n = k
	}
	return n
}

// TestDiskWorkload: the disk workload under run writes its records to the
// image (in order and at order=random's positions), flushing each before printing it; the image holds them all,
// intact, and nothing else changed. Then the workload's refusals: a
// read-only disk (the device offers VIRTIO_BLK_F_RO, and testos's driver,
// having accepted it, sends no write: error -6), a disk too small for the
// records, no disk at all, an order that is neither seq nor random; the
// image is left as it was.
func TestDiskWorkload(t *testing.T) {
	requireKVM(t)
	const records, sectors = 24, 64
	w := diskWorkload(records)
	img := diskImage(t, "disk.img", sectors)
	orig, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	// In order and at order=random's permutation (records.h, rec_order),
	// each on a fresh copy of the image; the permutation is not the
	// identity for these records, so a guest ignoring the option fails the
	// image check.
	for _, random := range []bool{false, true} {
		w, img := diskOrderWorkload(records, random), copyImage(t, img, fmt.Sprintf("disk-%t.img", random))
		res := ftkvm(t, time.Minute, "", "--log-level", "info", "run", "--kernel", testosELF, "--mem", "32", "--cmdline", w.cmdline, "--disk", img)
		if res.status != 0 {
			t.Fatalf("random=%t: status %d\n%s\n%s", random, res.status, res.stdout, res.stderr)
		}
		w.checkComplete(t, res.stdout)
		if bad := badRecords(t, img, 0, records, records, random); len(bad) > 0 {
			t.Fatalf("random=%t: the image after the run:\n%s", random, strings.Join(bad, "\n"))
		}
		got, err := os.ReadFile(img)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got[records*recordSize:], orig[records*recordSize:]) {
			t.Errorf("random=%t: sectors past the records changed", random)
		}
		// The device's counters: every request served, none malformed, no
		// access the transport does not model (the driver kept the rules).
		if m := regexp.MustCompile(`msg="disk \S+" device_errors=(\d+) flushes=(\d+) ioerrors=(\d+) malformed=(\d+) reads=(\d+) unhandled=(\d+) unsupported=(\d+) writes=(\d+)`).FindStringSubmatch(res.stderr); m == nil ||
			m[1] != "0" || m[2] != strconv.Itoa(records) || m[3] != "0" || m[4] != "0" || m[5] != strconv.Itoa(records) || m[6] != "0" || m[7] != "0" || m[8] != strconv.Itoa(records) {
			t.Errorf("random=%t: device counters: want %d writes, flushes and reads and no errors, got %v\n%s", random, records, m, res.stderr)
		}
	}

	for _, tc := range []struct {
		name, disk, extra string
		status            int
		want              []string
	}{
		{"read-only", img + ",ro", "", 1, []string{"disk: write of record 1 failed: error -6", "testos: FAIL disk: write failed"}},
		{"too small", diskImage(t, "small.img", 8), "", 1, []string{"disk: capacity=8 records=24 start=0", "testos: FAIL disk: the disk is too small for the records"}},
		{"no disk", "", "", 1, []string{"testos: FAIL disk: no virtio-blk device"}},
		{"bad order", img, " order=sideways", 2, []string{"testos: bad option order (want seq or random)"}},
	} {
		args := []string{"run", "--kernel", testosELF, "--mem", "32", "--cmdline", w.cmdline + tc.extra}
		if tc.disk != "" {
			args = append(args, "--disk", tc.disk)
		}
		before, _ := os.ReadFile(strings.TrimSuffix(tc.disk, ",ro"))
		r := ftkvm(t, time.Minute, "", args...)
		if r.status != tc.status {
			t.Errorf("%s: status %d, want %d\n%s\n%s", tc.name, r.status, tc.status, r.stdout, r.stderr)
		}
		for _, l := range tc.want {
			if !strings.Contains(r.stdout, l+"\n") {
				t.Errorf("%s: no line %q in:\n%s", tc.name, l, r.stdout)
			}
		}
		if after, _ := os.ReadFile(strings.TrimSuffix(tc.disk, ",ro")); !bytes.Equal(before, after) {
			t.Errorf("%s: the image changed", tc.name)
		}
	}
}

// diskDrillMoments is how many kill moments TestDiskFailoverDrills tries.
const diskDrillMoments = 6

// TestDiskFailoverDrills: a primary and a backup, each with its own copy
// of the image, run the disk workload. Undisturbed, both copies end byte
// for byte identical, with every record intact. Then the primary is
// SIGKILLed after a random record K was printed (a kill after the guest's
// end is retried earlier, killAfterLine): the backup takes over and the
// guest finishes through it; the joined console is complete; every record
// whose number the primary's console showed before its death (its flush
// had completed) is on the backup's copy, intact, and so is every other;
// the copy is byte for byte the undisturbed run's.
func TestDiskFailoverDrills(t *testing.T) {
	requireKVM(t)
	const records, sectors = 40, 64
	w := diskWorkload(records)
	base := filepath.Join(t.TempDir(), "base.img")
	if err := os.WriteFile(base, make([]byte, sectors*recordSize), 0o600); err != nil {
		t.Fatal(err)
	}
	// startPair starts a backup and its primary on fresh copies of the
	// image and tells where they are.
	var pimg, bimg string
	n := 0
	startPair := func(primaryFlags ...string) (p, b *proc) {
		n++
		pimg, bimg = copyImage(t, base, fmt.Sprintf("p%d.img", n)), copyImage(t, base, fmt.Sprintf("b%d.img", n))
		b = start(t, append([]string{"--log-level", "info", "backup", "--listen", "127.0.0.1:0", "--disk", bimg}, replicaArgs(w)...)...)
		p = start(t, append(append([]string{"--log-level", "info", "primary", "--backup", b.backupAddr(), "--disk", pimg}, primaryFlags...), replicaArgs(w)...)...)
		return p, b
	}

	// Undisturbed, in verify mode: every epoch end compares the state
	// hashes of the two replicas (vCPU and memory, not the images).
	p, b := startPair("--verify")
	res, bres := p.wait(), b.wait()
	if res.status != 0 || bres.status != 0 {
		t.Fatalf("undisturbed run: primary status %d, backup %d\nprimary:\n%s\nbackup:\n%s", res.status, bres.status, res.stderr, bres.stderr)
	}
	w.checkComplete(t, res.stdout)
	if m := regexp.MustCompile(`(\d+) divergences, (\d+) repairs`).FindStringSubmatch(bres.stderr); m == nil || m[1] != "0" {
		t.Fatalf("undisturbed run: backup counters %v\n%s", m, bres.stderr)
	}
	if bres.stdout != "" {
		t.Fatalf("the backup printed guest output without a failover:\n%s", bres.stdout)
	}
	pb, _ := os.ReadFile(pimg)
	bb, _ := os.ReadFile(bimg)
	if !bytes.Equal(pb, bb) {
		t.Fatalf("undisturbed run: the two images differ")
	}
	if bad := badRecords(t, bimg, 0, records, records, false); len(bad) > 0 {
		t.Fatalf("undisturbed run, the images:\n%s", strings.Join(bad, "\n"))
	}

	r := newRand(t)
	for i := range diskDrillMoments {
		// Line 1 is the banner, line 2 the capacity line, line 2+K
		// record K.
		k := 1 + r.IntN(records-1)
		pres, bres := killAfterLine(t, func() (p, b *proc) { return startPair() }, 2+k)
		if !strings.Contains(bres.stderr, "taking over") {
			t.Fatalf("moment %d: the backup did not take over\nbackup stderr:\n%s", i, bres.stderr)
		}
		if bres.status != 0 || strings.Contains(bres.stderr, "DIVERGENCE") {
			t.Fatalf("moment %d: the backup exited with status %d\nbackup stdout:\n%s\nbackup stderr:\n%s", i, bres.status, bres.stdout, bres.stderr)
		}
		printed := printedRecords(t, pres.stdout)
		out, _ := mergeSeam(t, pres.stdout, bres)
		w.checkComplete(t, out)
		if bad := badRecords(t, bimg, 0, records, uint64(printed), false); len(bad) > 0 {
			t.Fatalf("moment %d: records the primary printed before its death (1..%d) are not on the backup's image:\n%s", i, printed, strings.Join(bad, "\n"))
		}
		if bad := badRecords(t, bimg, 0, records, records, false); len(bad) > 0 {
			t.Fatalf("moment %d: after the takeover the backup's image lacks:\n%s", i, strings.Join(bad, "\n"))
		}
		if got, _ := os.ReadFile(bimg); !bytes.Equal(got, pb) {
			t.Fatalf("moment %d: the backup's image differs from the undisturbed run's", i)
		}
		t.Logf("moment %d: kill asked after record %d (or an earlier one, after a kill that came late); the primary's console showed %d records at its death; the guest finished through the backup", i, k, printed)
	}
}

// netecho's frames (guest/testos/records.h): EtherType 0x88b5, then kind,
// client sequence, guest sequence, data length, data, FNV-1a 64.
const (
	neEtherType = 0x88b5
	neRequest   = 1
	neEcho      = 2
	neSend      = 3
	neEnd       = 4
	neHdr       = 16
)

// neFrame builds a frame from src to dst.
func neFrame(dst, src net.HardwareAddr, kind byte, cseq, gseq uint32, data []byte) []byte {
	f := make([]byte, 14+neHdr+len(data)+8)
	copy(f, dst)
	copy(f[6:], src)
	binary.BigEndian.PutUint16(f[12:], neEtherType)
	p := f[14:]
	p[0] = kind
	binary.LittleEndian.PutUint32(p[4:], cseq)
	binary.LittleEndian.PutUint32(p[8:], gseq)
	binary.LittleEndian.PutUint16(p[12:], uint16(len(data)))
	copy(p[neHdr:], data)
	h := fnv.New64a()
	h.Write(p[:neHdr+len(data)])
	binary.LittleEndian.PutUint64(p[neHdr+len(data):], h.Sum64())
	return f
}

// neParsed is a received netecho frame.
type neParsed struct {
	dst, src   net.HardwareAddr
	kind       byte
	cseq, gseq uint32
	data       []byte
}

// neParse checks a frame's layout and checksum.
func neParse(f []byte) (neParsed, error) {
	if len(f) < 14+neHdr+8 || binary.BigEndian.Uint16(f[12:]) != neEtherType {
		return neParsed{}, fmt.Errorf("not a netecho frame (%d bytes)", len(f))
	}
	p := f[14:]
	n := int(binary.LittleEndian.Uint16(p[12:]))
	if neHdr+n+8 > len(p) {
		return neParsed{}, fmt.Errorf("data length %d beyond the frame's %d bytes", n, len(f))
	}
	h := fnv.New64a()
	h.Write(p[:neHdr+n])
	if h.Sum64() != binary.LittleEndian.Uint64(p[neHdr+n:]) {
		return neParsed{}, fmt.Errorf("checksum does not match")
	}
	return neParsed{dst: net.HardwareAddr(f[0:6]), src: net.HardwareAddr(f[6:12]), kind: p[0],
		cseq: binary.LittleEndian.Uint32(p[4:]), gseq: binary.LittleEndian.Uint32(p[8:]), data: p[neHdr : neHdr+n]}, nil
}

// packetConn is an AF_PACKET socket on one interface for netecho's
// EtherType: the host side of the guest's wire.
type packetConn struct {
	fd      int
	ifindex int
	mac     net.HardwareAddr
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

func newPacketConn(t *testing.T, ifname string) *packetConn {
	t.Helper()
	return openPacketConn(t, ifname, neEtherType)
}

// openPacketConn is an AF_PACKET socket on ifname for one EtherType
// (unix.ETH_P_ALL: every frame).
func openPacketConn(t *testing.T, ifname string, proto uint16) *packetConn {
	t.Helper()
	l, err := netlink.LinkByName(ifname)
	if err != nil {
		t.Fatal(err)
	}
	fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, int(htons(proto)))
	if err != nil {
		t.Fatalf("AF_PACKET socket: %v", err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	if err := unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(proto), Ifindex: l.Attrs().Index}); err != nil {
		t.Fatalf("bind to %s: %v", ifname, err)
	}
	// A hang guard on each receive, not a timed assertion: a frame that
	// never comes fails the test with what was missing.
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &unix.Timeval{Sec: 30}); err != nil {
		t.Fatal(err)
	}
	return &packetConn{fd: fd, ifindex: l.Attrs().Index, mac: l.Attrs().HardwareAddr}
}

func (c *packetConn) send(t *testing.T, f []byte) {
	t.Helper()
	to := &unix.SockaddrLinklayer{Ifindex: c.ifindex, Halen: 6, Addr: [8]byte{f[0], f[1], f[2], f[3], f[4], f[5]}}
	err := unix.Sendto(c.fd, f, 0, to)
	for err == unix.EINTR {
		err = unix.Sendto(c.fd, f, 0, to)
	}
	if err != nil {
		t.Fatalf("send: %v", err)
	}
}

// recv returns the next frame that came in from the guest (frames this
// socket sent itself, PACKET_OUTGOING, are skipped).
func (c *packetConn) recv(t *testing.T, what string) []byte {
	t.Helper()
	b := make([]byte, 2048)
	for {
		n, from, err := unix.Recvfrom(c.fd, b, 0)
		if err == unix.EINTR {
			continue // the Go runtime's signals interrupt a blocking socket call
		}
		if err != nil {
			t.Fatalf("waiting for %s: %v", what, err)
		}
		if ll, ok := from.(*unix.SockaddrLinklayer); ok && ll.Pkttype == unix.PACKET_OUTGOING {
			continue
		}
		return b[:n]
	}
}

// tapForTest creates a persistent tap (ftkvm opens it: a tap that exists
// is used as it is) so the host side can bind to it before the guest
// runs; it is deleted when the test ends.
func tapForTest(t *testing.T, n int) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("this test needs root (a tap device and an AF_PACKET socket)")
	}
	name := fmt.Sprintf("ftne%d_%d", os.Getpid()%100000, n)
	tap := &netlink.Tuntap{LinkAttrs: netlink.LinkAttrs{Name: name}, Mode: netlink.TUNTAP_MODE_TAP, Flags: netlink.TUNTAP_NO_PI}
	if err := netlink.LinkAdd(tap); err != nil {
		t.Fatalf("create tap %s: %v", name, err)
	}
	t.Cleanup(func() { netlink.LinkDel(tap) })
	l, err := netlink.LinkByName(name)
	if err == nil {
		err = netlink.LinkSetUp(l)
	}
	if err != nil {
		t.Fatalf("tap %s up: %v", name, err)
	}
	return name
}

var neReadyRE = regexp.MustCompile(`netecho: ready mode=(echo|send) mac=([0-9a-f:]{17})\n`)

// guestMAC waits for netecho's ready line and returns the guest's MAC.
func guestMAC(t *testing.T, p *proc) net.HardwareAddr {
	t.Helper()
	var mac net.HardwareAddr
	p.waitUntil("netecho's ready line", func() bool {
		m := neReadyRE.FindStringSubmatch(p.stdout())
		if m != nil {
			mac, _ = net.ParseMAC(m[2])
		}
		return m != nil
	})
	return mac
}

// TestNetEcho: the netecho workload under run with a tap. A client on the
// host side of the tap (an AF_PACKET socket) sends numbered, checksummed
// frames of random sizes, up to a window of them outstanding, and checks
// every echo: addressed to it from the guest's MAC (the one ftkvm was
// given), its own sequence number and data back, the guest's sequence
// numbers 1, 2, ... without a gap, a valid checksum; none lost, none
// twice. Then bad input: a corrupted and a truncated frame are reported
// and not answered, a frame of another EtherType is ignored. Then the
// guest's own numbered frames (mode=send): all of them, in order, intact.
func TestNetEcho(t *testing.T) {
	requireKVM(t)
	const frames, window, every = 200, 8, 25
	r := newRand(t)
	mac := "02:46:54:4b:56:01"
	tapName := tapForTest(t, 1)
	c := newPacketConn(t, tapName)
	p := start(t, "--log-level", "info", "run", "--kernel", testosELF, "--mem", "32",
		"--cmdline", fmt.Sprintf("workload=netecho every=%d hz=100", every), "--net", "tap="+tapName+",mac="+mac)
	gmac := guestMAC(t, p)
	if gmac.String() != mac {
		t.Fatalf("the guest reports MAC %s, ftkvm was given %s", gmac, mac)
	}
	sent := map[uint32][]byte{}
	next, gseq := uint32(1), uint32(0)
	for next <= frames || len(sent) > 0 {
		for next <= frames && len(sent) < window {
			data := make([]byte, r.IntN(1401))
			for i := range data {
				data[i] = byte(r.Uint32())
			}
			c.send(t, neFrame(gmac, c.mac, neRequest, next, 0, data))
			sent[next] = data
			next++
		}
		f, err := neParse(c.recv(t, fmt.Sprintf("the echoes of %d frames", len(sent))))
		if err != nil {
			t.Fatalf("an echo: %v", err)
		}
		want, ok := sent[f.cseq]
		switch {
		case f.kind != neEcho:
			t.Fatalf("frame of kind %d, want an echo (%d)", f.kind, neEcho)
		case f.src.String() != mac || f.dst.String() != c.mac.String():
			t.Fatalf("echo from %s to %s, want from %s to %s", f.src, f.dst, mac, c.mac)
		case !ok:
			t.Fatalf("an echo of frame %d, which is not outstanding (sent up to %d)", f.cseq, next-1)
		case f.gseq != gseq+1:
			t.Fatalf("guest sequence %d after %d", f.gseq, gseq)
		case !bytes.Equal(f.data, want):
			t.Fatalf("the echo of frame %d carries other data (%d bytes, sent %d)", f.cseq, len(f.data), len(want))
		}
		gseq = f.gseq
		delete(sent, f.cseq)
	}
	c.send(t, neFrame(gmac, c.mac, neEnd, frames+1, 0, nil))
	if f, err := neParse(c.recv(t, "the answer to the end frame")); err != nil || f.kind != neEnd || f.cseq != frames+1 || f.gseq != gseq+1 {
		t.Fatalf("answer to the end frame: %+v, %v", f, err)
	}
	res := p.wait()
	if res.status != 0 {
		t.Fatalf("status %d\n%s\n%s", res.status, res.stdout, res.stderr)
	}
	lines := res.lines()
	want := []string{"testos: workload=netecho hz=100", "netecho: ready mode=echo mac=" + mac}
	for i := every; i <= frames; i += every {
		want = append(want, fmt.Sprintf("netecho %d", i))
	}
	// Frames of the host's own (IPv6 neighbour discovery on the new
	// interface) may reach the guest: other= counts them.
	if len(lines) != len(want)+2 || strings.Join(lines[:len(want)], "\n") != strings.Join(want, "\n") ||
		!regexp.MustCompile(fmt.Sprintf(`^netecho: done echoed=%d bad=0 other=\d+$`, frames)).MatchString(lines[len(want)]) ||
		lines[len(lines)-1] != "testos: PASS" {
		t.Fatalf("console:\n%s\nwant:\n%s\nnetecho: done echoed=%d bad=0 other=N\ntestos: PASS", res.stdout, strings.Join(want, "\n"), frames)
	}
	if m := regexp.MustCompile(`msg="network interface \S+" device_errors=(\d+) .* tx=(\d+) tx_bad_length=(\d+) .* unhandled=(\d+)`).FindStringSubmatch(res.stderr); m == nil ||
		m[1] != "0" || m[2] != strconv.Itoa(frames+1) || m[3] != "0" || m[4] != "0" {
		t.Errorf("device counters: want %d frames sent and no errors, got %v\n%s", frames+1, m, res.stderr)
	}
	t.Logf("%d frames echoed, window %d; guest: %s", frames, window, lines[len(want)])

	// Bad input: a frame whose checksum is wrong and one cut short (its
	// data length runs past its end) are not answered and make the run
	// FAIL; a frame of another EtherType is ignored (counted as other).
	// A disk comes first here, so the interface is in virtio-mmio window
	// 1, on the slave 8259's line 10, whose interrupts wake the guest's
	// receive.
	p = start(t, "--log-level", "info", "run", "--kernel", testosELF, "--mem", "32",
		"--cmdline", "workload=netecho hz=100", "--disk", diskImage(t, "idle.img", 8), "--net", "tap="+tapName+",mac="+mac)
	gmac = guestMAC(t, p)
	corrupt := neFrame(gmac, c.mac, neRequest, 1, 0, []byte("corrupted in flight"))
	corrupt[14+neHdr] ^= 0x20
	short := neFrame(gmac, c.mac, neRequest, 2, 0, make([]byte, 100))
	short = short[:len(short)-20]
	foreign := neFrame(gmac, c.mac, neRequest, 3, 0, nil)
	foreign[13]++ // EtherType 0x88b6
	for _, f := range [][]byte{corrupt, short, foreign, neFrame(gmac, c.mac, neEnd, 4, 0, nil)} {
		c.send(t, f)
	}
	if f, err := neParse(c.recv(t, "the answer to the end frame")); err != nil || f.kind != neEnd || f.cseq != 4 || f.gseq != 1 {
		t.Fatalf("bad input: the first answer is %+v, %v; want the end frame's, guest sequence 1", f, err)
	}
	res = p.wait()
	if res.status != 1 || !strings.Contains(res.stdout, fmt.Sprintf("netecho: bad frame of %d bytes\n", len(corrupt))) ||
		!strings.Contains(res.stdout, fmt.Sprintf("netecho: bad frame of %d bytes\n", len(short))) ||
		!regexp.MustCompile(`netecho: done echoed=0 bad=2 other=[1-9]\d*\n`).MatchString(res.stdout) ||
		!strings.HasSuffix(res.stdout, "testos: FAIL netecho: bad frames received\n") {
		t.Fatalf("bad input: status %d\n%s\n%s", res.status, res.stdout, res.stderr)
	}

	// mode=send: the guest's own frames, broadcast.
	const sends, size = 64, 100
	p = start(t, "--log-level", "info", "run", "--kernel", testosELF, "--mem", "32",
		"--cmdline", fmt.Sprintf("workload=netecho mode=send frames=%d size=%d every=16 hz=100", sends, size), "--net", "tap="+tapName+",mac="+mac)
	for i := uint32(1); i <= sends; i++ {
		f, err := neParse(c.recv(t, fmt.Sprintf("the guest's frame %d of %d", i, sends)))
		if err != nil {
			t.Fatalf("frame %d: %v", i, err)
		}
		if f.kind != neSend || f.gseq != i || f.cseq != 0 || f.src.String() != mac || f.dst.String() != "ff:ff:ff:ff:ff:ff" || len(f.data) != size {
			t.Fatalf("frame %d: %+v", i, f)
		}
		for k, b := range f.data {
			if b != byte(i*7+uint32(k)*13) {
				t.Fatalf("frame %d: data byte %d is %#x", i, k, b)
			}
		}
	}
	res = p.wait()
	if res.status != 0 || !strings.HasSuffix(res.stdout, fmt.Sprintf("netsend %d\nnetecho: done sent=%d\ntestos: PASS\n", sends, sends)) {
		t.Fatalf("mode=send: status %d\n%s\n%s", res.status, res.stdout, res.stderr)
	}
}
