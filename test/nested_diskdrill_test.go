package test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/ftkvm/ftkvm/test/nested"
	"github.com/ftkvm/ftkvm/tools/images/imagelib"
)

// The disk failover drill with a Linux guest, in the nested tier: the
// nested counterpart of TestDiskFailoverDrills (test/devices_test.go). In
// one L1 boot, an `ftkvm backup` and an `ftkvm primary`, each with its own
// copy of a zeroed raw image (`--disk`), run the Debian kernel with
// diskDrillGuestInit: its own virtio_blk (modules loaded from the
// initramfs) writes numbered, checksummed records to /dev/vda, one sector
// each, and prints "record N" only after the write and its fsync (a cache
// flush to the device) returned. The primary is SIGKILLed after a random
// record line, relative to the guest's progress as in TestNestedFailover
// (a kill after the guest's end is retried earlier and never counted);
// the backup takes over and the guest finishes through it. The backup's
// image crosses the L1 console in hex, and Go checks that every record
// whose number the primary's console showed before its death is on it,
// intact, then that all are and nothing else was written.
//
// The peer timeout and the epoch length are TestNestedFailover's
// (nestedFailoverPeerTimeout, nestedFailoverEpoch), for its reasons.

const (
	nestedDiskRecords = 40
	// The records' first sector: the sectors before it must stay zero.
	nestedDiskStart = 64
	// The image: 1 MiB, zeroed.
	nestedDiskSectors = 2048
	// The kill follows record nestedDiskKillMin + [0, nestedDiskKillSpan).
	nestedDiskKillMin  = 2
	nestedDiskKillSpan = 14
	nestedDiskAddr     = "127.0.0.1:7110"
)

// diskDrillGuestInit is the L2 /init: it loads the virtio modules, waits
// for /dev/vda, writes records 1..ftkvm.records from sector ftkvm.start,
// printing each after its flush, then drops its caches, reads every record
// back from the device, and powers off. Record I is
// nestedDiskRecord(I, N): its text is built with shell builtins only (a
// brace group's output is redirected without a fork), its sha256 by
// busybox.
const diskDrillGuestInit = `#!/bin/sh
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec </dev/console >/dev/console 2>&1
echo "FTKVM-GUEST-READY workload=diskrecords"
done_() { echo "FTKVM-GUEST-DONE status=$1"; sync; poweroff -f; while :; do sleep 1000; done; }
for pass in 1 2 3 4; do
	for m in virtio_ring virtio virtio_mmio virtio_blk; do
		grep -q "^$m " /proc/modules || insmod /lib/virtio/$m.ko 2>/dev/null
	done
done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 20 ]; do sleep 1; i=$((i + 1)); done
[ -b /dev/vda ] || { echo "records: no /dev/vda"; done_ 1; }
N=0 S=0
for a in $(cat /proc/cmdline); do
	case $a in
	ftkvm.records=*) N=${a#*=} ;;
	ftkvm.start=*) S=${a#*=} ;;
	esac
done
B=/tmp/b
` + nestedDiskRecFn + `echo "records: $N from sector $S of $(cat /sys/block/vda/size), $(cat /sys/block/vda/queue/write_cache)"
i=1
while [ $i -le $N ]; do
	rec $i
	if ! dd if=/tmp/b of=/dev/vda bs=512 count=1 seek=$((S + i - 1)) conv=sync,fsync 2>/dev/null; then
		echo "records: write of record $i failed"
		done_ 1
	fi
	echo "record $i"
	i=$((i + 1))
done
echo 3 >/proc/sys/vm/drop_caches
bad=0
i=1
while [ $i -le $N ]; do
	rec $i
	dd if=/tmp/b of=/tmp/r bs=512 count=1 conv=sync 2>/dev/null
	dd if=/dev/vda bs=512 count=1 skip=$((S + i - 1)) 2>/dev/null | cmp -s - /tmp/r || { echo "records: record $i differs on the device"; bad=$((bad + 1)); }
	i=$((i + 1))
done
if [ $bad -ne 0 ]; then done_ 1; fi
echo "records verified $N"
done_ 0
`

// nestedDiskRecFn is the guest's record builder: rec I writes record I of
// $N's text to the file $B (dd conv=sync pads it to a sector).
const nestedDiskRecFn = `rec() {
	x=$1
	{
		printf 'ftkvm-record %d of %d' $1 $N
		j=0
		while [ $j -lt 24 ]; do
			x=$(( (x * 1103515245 + 12345) & 2147483647 ))
			printf ' %08x' $x
			j=$((j + 1))
		done
	} >$B
	sum=$(sha256sum $B)
	printf ' sha256=%s\n' "${sum%% *}" >>$B
}
`

// nestedDiskRecord is record i of n as diskDrillGuestInit writes it: its
// text, zero-padded to a sector.
func nestedDiskRecord(i, n int) []byte {
	var b strings.Builder
	fmt.Fprintf(&b, "ftkvm-record %d of %d", i, n)
	x := uint64(i)
	for range 24 {
		x = (x*1103515245 + 12345) & 2147483647
		fmt.Fprintf(&b, " %08x", x)
	}
	sum := sha256.Sum256([]byte(b.String()))
	fmt.Fprintf(&b, " sha256=%s\n", hex.EncodeToString(sum[:]))
	r := make([]byte, recordSize)
	copy(r, b.String())
	return r
}

// nestedDiskImage is the whole image after a complete run: zeros with the
// n records from sector start.
func nestedDiskImage(n, start, sectors int) []byte {
	img := make([]byte, sectors*recordSize)
	for i := 1; i <= n; i++ {
		copy(img[(start+i-1)*recordSize:], nestedDiskRecord(i, n))
	}
	return img
}

// badNestedRecords lists the records 1..upto that are not intact in recs
// (the image's sectors from the records' start on), each with what is
// wrong.
func badNestedRecords(recs []byte, n, upto int) []string {
	var bad []string
	rec := regexp.MustCompile(`^(ftkvm-record \d+ of \d+(?: [0-9a-f]{8})*) sha256=([0-9a-f]{64})\n`)
	for i := 1; i <= upto; i++ {
		off := (i - 1) * recordSize
		if off+recordSize > len(recs) {
			bad = append(bad, fmt.Sprintf("record %d: beyond the %d bytes read", i, len(recs)))
			continue
		}
		got := recs[off : off+recordSize]
		if bytes.Equal(got, nestedDiskRecord(i, n)) {
			continue
		}
		why := "contents differ"
		if m := rec.FindSubmatch(got); m == nil {
			why = fmt.Sprintf("no record there (starts %q)", got[:min(24, len(got))])
		} else if s := sha256.Sum256(m[1]); hex.EncodeToString(s[:]) != string(m[2]) {
			why = "checksum does not match"
		}
		bad = append(bad, fmt.Sprintf("record %d: %s", i, why))
	}
	return bad
}

// nestedDiskDrill is the drill's L1 script and shared checks
// (nested_killdrill_test.go): the records workload on a fresh copy of
// a zeroed image for each replica, the kill after a record; besides the
// consoles and logs, it prints the backup's records (b.rec) and the
// primary's (p.rec, as its death left them) in hex and "@@@ sum
// <image>=<sha256>" lines for both whole images.
var nestedDiskDrill = nestedKillDrill{
	initrd:   nestedDiskInitrd,
	cmdline:  fmt.Sprintf("quiet ftkvm.records=%d ftkvm.start=%d", nestedDiskRecords, nestedDiskStart),
	progress: "record",
	addr:     nestedDiskAddr,
	disk:     true,
	setup:    fmt.Sprintf("dd if=/dev/zero of=base.img bs=512 count=%d 2>/dev/null\n", nestedDiskSectors),
	outputs: fmt.Sprintf(`for f in p b; do
	dd if=$f.img of=$f.rec bs=512 skip=%d count=%d 2>/dev/null
	showx $f.rec
	echo "@@@ sum $f.img=$(sha256sum $f.img | cut -d' ' -f1)"
done
`, nestedDiskStart, nestedDiskRecords),
}

// nestedDiskInitrd is where the L1 holds diskDrillGuestInit's initramfs.
const nestedDiskInitrd = "/guest/diskdrill.cpio"

var (
	ndRecordRE = regexp.MustCompile(`^record (\d+)$`)
	ndSumRE    = regexp.MustCompile(`^@@@ sum (\S+)=([0-9a-f]{64})$`)
)

// recordNumbersIn returns the numbers of the "record <i>" lines in text
// (\r removed), checking they are 1, 2, ... in order.
func recordNumbersIn(text string) ([]int, error) {
	var nums []int
	for _, l := range strings.Split(text, "\n") {
		if m := ndRecordRE.FindStringSubmatch(l); m != nil {
			k, _ := strconv.Atoi(m[1])
			if k != len(nums)+1 {
				return nums, fmt.Errorf("\"record %d\" after record %d", k, len(nums))
			}
			nums = append(nums, k)
		} else if strings.HasPrefix(l, "record ") {
			return nums, fmt.Errorf("garbled line %q", l)
		}
	}
	return nums, nil
}

// TestNestedDiskFailover: the drill above. What must hold: the backup
// took over and exited 0; the consoles join at its seam into the whole
// workload (records 1..N once each, in order, the guest's own re-read of
// all of them from the device, the done marker with status 0); every
// record the primary's console showed on a complete line before its death
// is on the backup's image, intact; so is every other, and the backup's
// image is exactly what a complete run writes, nothing else.
func TestNestedDiskFailover(t *testing.T) {
	nestedTest(t)
	// Hang guards, not assertions on speed.
	ctx, cancel := context.WithTimeout(context.Background(), 28*time.Minute)
	defer cancel()
	im := linuxImages(t)
	r := newRand(t)
	killAt := nestedDiskKillMin + r.IntN(nestedDiskKillSpan)
	delayUS := r.IntN(1_000_000)
	t.Logf("the primary is killed %d µs after record %d shows on its console", delayUS, killAt)
	cfg := nested.Config{
		Files:       map[string]string{l1FTKVM: ftkvmBin, nestedDiskInitrd: virtioInitramfs(ctx, t, im, diskDrillGuestInit)},
		GuestImages: true,
		Commands:    []nested.Command{{Name: "disk-failover", Cmd: nestedDiskDrill.script(killAt, delayUS), Timeout: 24 * time.Minute}},
	}
	res := runNested(ctx, t, cfg)
	c := res.Command("disk-failover")
	t.Logf("L1 boot %v, drill command %v, whole run %v", res.BootTime.Round(time.Second),
		c.Duration.Round(time.Second), res.Elapsed.Round(time.Second))
	if err := c.Err(); err != nil {
		t.Fatalf("%v\n%s", err, c.Output)
	}
	o := parseNestedFailover(c.Output)
	sums := map[string]string{}
	for _, n := range o.notes {
		if m := ndSumRE.FindStringSubmatch(n); m != nil {
			sums[m[1]] = m[2]
		}
	}
	tk := nestedDiskDrill.checkTakeover(t, o, killAt)
	joined, pOut, bOut, dump := tk.joined, tk.pOut, tk.bOut, o.dump
	killAt = tk.killAt
	pText, bText := strings.ReplaceAll(pOut, "\r", ""), strings.ReplaceAll(bOut, "\r", "")
	// The records the primary's console showed before its death: those
	// on lines it ended with a newline (its flush had returned).
	pNums, err := recordNumbersIn(pText[:strings.LastIndexByte(pText, '\n')+1])
	if err != nil {
		t.Fatalf("the primary's console: %v\n%s", err, dump())
	}
	printed := len(pNums)
	// The backup's console starts mid-workload: its whole record lines.
	bNums := regexp.MustCompile(`(?m)^record \d+$`).FindAllString(bText, -1)
	t.Logf("the primary printed %d records (%d console bytes), the backup %d whole record lines (%d bytes) from console byte %d; %d bytes repeated identically at the seam (%d uncertain): %q",
		printed, len(pOut), len(bNums), len(bOut), tk.seam, tk.repeated, tk.uncertain, bOut[:tk.repeated])

	// The whole workload, through the two consoles.
	nums, err := recordNumbersIn(joined)
	if err != nil || len(nums) != nestedDiskRecords {
		t.Fatalf("joined console: %d records, want %d (%v)\n%s", len(nums), nestedDiskRecords, err, dump())
	}
	// "write back": the device offered VIRTIO_BLK_F_FLUSH, so each fsync
	// reached it as a flush request (virtio 1.2 §5.2.6), not only as
	// the write.
	if want := fmt.Sprintf("records: %d from sector %d of %d, write back\n", nestedDiskRecords, nestedDiskStart, nestedDiskSectors); !strings.Contains(joined, want) {
		t.Fatalf("joined console: no %q\n%s", want, dump())
	}
	for _, want := range []string{fmt.Sprintf("records verified %d\n", nestedDiskRecords), imagelib.GuestDoneMarker + " status=0\n"} {
		if !strings.Contains(joined[strings.Index(joined, fmt.Sprintf("record %d\n", nestedDiskRecords)):], want) {
			t.Fatalf("joined console: no %q after the last record\n%s", want, dump())
		}
	}
	if printed == 0 || printed >= nestedDiskRecords {
		t.Fatalf("the primary's console shows %d of %d records: the kill did not come mid-workload\n%s", printed, nestedDiskRecords, dump())
	}

	// The surviving image.
	bRec, pRec := []byte(o.files["b.rec"]), []byte(o.files["p.rec"])
	if bad := badNestedRecords(bRec, nestedDiskRecords, printed); len(bad) > 0 {
		t.Fatalf("records the primary printed before its death (1..%d) are not on the backup's image:\n%s", printed, strings.Join(bad, "\n"))
	}
	if bad := badNestedRecords(bRec, nestedDiskRecords, nestedDiskRecords); len(bad) > 0 {
		t.Fatalf("after the takeover the backup's image lacks:\n%s", strings.Join(bad, "\n"))
	}
	want := sha256.Sum256(nestedDiskImage(nestedDiskRecords, nestedDiskStart, nestedDiskSectors))
	if got := sums["b.img"]; got != hex.EncodeToString(want[:]) {
		t.Fatalf("the backup's whole image has sha256 %q, want %x (zeros and the %d records): something else was written", got, want, nestedDiskRecords)
	}
	// For the log: how far the primary's own image got before its death.
	onP := 0
	for (onP+1)*recordSize <= len(pRec) && bytes.Equal(pRec[onP*recordSize:(onP+1)*recordSize], nestedDiskRecord(onP+1, nestedDiskRecords)) {
		onP++
	}
	t.Logf("kill after record %d: the primary's console showed %d records at its death, its own image held the first %d; the backup's image holds all %d, intact, and nothing else",
		killAt, printed, onP, nestedDiskRecords)
}

// TestNestedDiskRecordFormat: the guest's record builder (nestedDiskRecFn,
// run by this host's busybox, the nested tier's userland, or its sh) and
// dd's padding make exactly nestedDiskRecord's sectors, and
// badNestedRecords tells a damaged record from a missing one.
func TestNestedDiskRecordFormat(t *testing.T) {
	sh := []string{"sh", "-c"}
	if _, err := os.Stat(imagelib.HostBusybox); err == nil {
		sh = []string{imagelib.HostBusybox, "sh", "-c"}
	}
	dir := t.TempDir()
	script := "N=40 B=b\n" + nestedDiskRecFn + "for i in 1 2 39 40; do rec $i; dd if=b of=r$i bs=512 count=1 conv=sync 2>/dev/null; done"
	cmd := exec.Command(sh[0], append(sh[1:], script)...)
	cmd.Dir = dir
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	for _, i := range []int{1, 2, 39, 40} {
		got, err := os.ReadFile(filepath.Join(dir, fmt.Sprintf("r%d", i)))
		if err != nil {
			t.Fatal(err)
		}
		if want := nestedDiskRecord(i, 40); !bytes.Equal(got, want) {
			t.Fatalf("record %d: the guest builds\n%q\nwant\n%q", i, got, want)
		}
	}
	recs := append(nestedDiskRecord(1, 3), nestedDiskRecord(2, 3)...)
	recs = append(recs, nestedDiskRecord(3, 3)...)
	if bad := badNestedRecords(recs, 3, 3); len(bad) != 0 {
		t.Fatalf("intact records reported bad: %v", bad)
	}
	recs[recordSize+30] ^= 1 // a payload byte of record 2
	clear(recs[2*recordSize : 3*recordSize])
	bad := badNestedRecords(recs, 3, 4)
	want := []string{"record 2: checksum does not match", `record 3: no record there (starts "\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00")`, "record 4: beyond the 1536 bytes read"}
	if strings.Join(bad, "\n") != strings.Join(want, "\n") {
		t.Fatalf("damaged records reported as\n%s\nwant\n%s", strings.Join(bad, "\n"), strings.Join(want, "\n"))
	}
}
