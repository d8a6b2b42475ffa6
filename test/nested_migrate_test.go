package test

import (
	"context"
	"fmt"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/ftkvm/ftkvm/test/nested"
	"github.com/ftkvm/ftkvm/tools/images/imagelib"
)

// Live migration of a Linux guest mid-workload, in the nested tier: in one
// L1 boot, an `ftkvm receive` and an `ftkvm run --api` of the Debian guest
// with the lines workload; once the guest has printed a few lines,
// `ftkvm ctl migrate` moves it to the receiver, which runs it to the end.

// The workload must outlast the guest's boot-to-line-5 plus the migration
// (several seconds under TCG), so that the destination prints lines too.
// With spin 1000 a line takes about 0.5-0.8 s in L2 with QEMU 7.2 and 2 s
// with QEMU 10.0 (busybox sh arithmetic under a nested KVM under TCG).
const (
	nestedMigrateLines = 40
	nestedMigrateSpin  = 1000
	nestedMigrateAddr  = "127.0.0.1:7000"
)

// nestedMigrateScript runs the migration in the L1 and prints, between
// "@@@ BEGIN <name>" and "@@@ END <name>" lines, every output file, and
// "@@@ rc <what>=<n>" and "@@@ t <event>=<L1 uptime>" lines. Every wait is
// bounded, so the outputs are printed even when something hangs.
func nestedMigrateScript() string {
	return nestedShellLib + fmt.Sprintf(`F=%[1]s
mkdir -p /tmp
cd /tmp
rm -f api.sock src.out src.err dst.out dst.err ctl.out ctl.err

# The L1 brings up no interface by itself; the migration goes over lo.
ip link set lo up 2>/dev/null || ifconfig lo 127.0.0.1 up
echo "@@@ t start=$(up)"
$F receive --listen %[2]s >dst.out 2>dst.err &
dst=$!
$F run --api /tmp/api.sock --mem 128 --kernel %[3]s --initrd %[4]s --cmdline 'quiet ftkvm.workload=lines ftkvm.lines=%[5]d ftkvm.spin=%[6]d' >src.out 2>src.err &
src=$!
i=0
until tr -d '\r' <src.out | grep -qx 'line 5'; do
	if ! alive $src || [ $i -ge 360 ]; then echo "@@@ no line 5 after $i s"; break; fi
	sleep 1; i=$((i + 1))
done
echo "@@@ t line5=$(up)"
echo "@@@ src.out before migrate: $(wc -c <src.out) bytes"
timeout -k 5 180 $F ctl --api /tmp/api.sock migrate %[2]s >ctl.out 2>ctl.err
echo "@@@ rc ctl=$?"
echo "@@@ t migrated=$(up)"
ctlbytes=$(wc -c <src.out)
waitpid $src 60 src
echo "@@@ t src-exit=$(up)"
echo "@@@ src.out grew after ctl returned: $(( $(wc -c <src.out) - ctlbytes )) bytes"
if [ -s dst.out ] || grep -q 'received the guest' dst.err; then
	waitpid $dst 300 dst
else
	waitpid $dst 10 dst
fi
echo "@@@ t dst-exit=$(up)"
for f in ctl.out ctl.err src.out src.err dst.out dst.err; do show $f; done
`, l1FTKVM, nestedMigrateAddr, nested.GuestVmlinux, nested.GuestInitramfs, nestedMigrateLines, nestedMigrateSpin)
}

// nestedMigrateOutput is the parsed output of nestedMigrateScript.
type nestedMigrateOutput struct {
	files map[string]string  // file name -> contents, \r removed
	rc    map[string]int     // "ctl", "src", "dst" -> exit status
	times map[string]float64 // event -> L1 uptime in seconds
	notes []string           // other "@@@" lines
}

var (
	nmBeginRE = regexp.MustCompile(`^@@@ BEGIN (\S+)$`)
	nmRCRE    = regexp.MustCompile(`^@@@ rc (\S+)=(-?\d+)$`)
	nmTimeRE  = regexp.MustCompile(`^@@@ t (\S+)=([0-9.]+)$`)
)

func parseNestedMigrate(out string) nestedMigrateOutput {
	o := nestedMigrateOutput{files: map[string]string{}, rc: map[string]int{}, times: map[string]float64{}}
	lines := strings.Split(out, "\n")
	for i := 0; i < len(lines); i++ {
		l := lines[i]
		if m := nmBeginRE.FindStringSubmatch(l); m != nil {
			var body []string
			for i++; i < len(lines) && lines[i] != "@@@ END "+m[1]; i++ {
				body = append(body, lines[i])
			}
			// show adds one newline after the file's contents: the
			// lines between the markers, joined, are the contents.
			o.files[m[1]] = strings.Join(body, "\n")
			continue
		}
		if m := nmRCRE.FindStringSubmatch(l); m != nil {
			o.rc[m[1]], _ = strconv.Atoi(m[2])
		} else if m := nmTimeRE.FindStringSubmatch(l); m != nil {
			o.times[m[1]], _ = strconv.ParseFloat(m[2], 64)
		} else if strings.HasPrefix(l, "@@@ ") {
			o.notes = append(o.notes, l)
		}
	}
	return o
}

var guestLineRE = regexp.MustCompile(`^line (\d+)$`)

// numberedLines returns the numbers of the workload's "line <i>" lines in
// text; a line that starts like one but is not exactly one is an error.
func numberedLines(text string) ([]int, error) {
	var nums []int
	for _, l := range strings.Split(text, "\n") {
		if m := guestLineRE.FindStringSubmatch(l); m != nil {
			k, _ := strconv.Atoi(m[1])
			nums = append(nums, k)
		} else if strings.HasPrefix(l, "line") {
			return nums, fmt.Errorf("garbled line %q", l)
		}
	}
	return nums, nil
}

// consecutive reports whether nums is from, from+1, ..., to.
func consecutive(nums []int, from, to int) bool {
	if len(nums) != to-from+1 {
		return false
	}
	for i, k := range nums {
		if k != from+i {
			return false
		}
	}
	return true
}

func TestNestedMigrate(t *testing.T) {
	nestedTest(t)
	// Hang guards, not assertions on speed: the Linux boot in L1 alone
	// takes one to three minutes on these machines.
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	res := runNested(ctx, t, nested.Config{
		Files:       map[string]string{l1FTKVM: ftkvmBin},
		GuestImages: true,
		Commands:    []nested.Command{{Name: "linux-migrate", Cmd: nestedMigrateScript(), Timeout: 16 * time.Minute}},
	})
	c := res.Command("linux-migrate")
	t.Logf("L1 boot %v, migration command %v, whole run %v", res.BootTime.Round(time.Second),
		c.Duration.Round(time.Second), res.Elapsed.Round(time.Second))
	if err := c.Err(); err != nil {
		t.Fatalf("%v\n%s", err, c.Output)
	}
	o := parseNestedMigrate(c.Output)
	for _, n := range o.notes {
		t.Log(n)
	}
	ut := o.times
	if ut["line5"] > 0 && ut["migrated"] > 0 && ut["dst-exit"] > 0 {
		t.Logf("L1 uptime: guest at line 5 %.1fs after start, ctl migrate took %.1fs, destination finished %.1fs later",
			ut["line5"]-ut["start"], ut["migrated"]-ut["line5"], ut["dst-exit"]-ut["migrated"])
	}
	dump := func() string {
		var b strings.Builder
		for _, f := range []string{"ctl.out", "ctl.err", "src.out", "src.err", "dst.out", "dst.err"} {
			fmt.Fprintf(&b, "--- %s:\n%s\n", f, o.files[f])
		}
		return b.String()
	}

	// The migration succeeded and says so: sizes, rounds, pause, total.
	ctlOut := strings.TrimSpace(o.files["ctl.out"])
	if rc, ok := o.rc["ctl"]; !ok || rc != 0 || !strings.Contains(ctlOut, "migration to "+nestedMigrateAddr+":") {
		t.Fatalf("ctl migrate: status %d (reported: %v)\n%s", rc, ok, dump())
	}
	t.Logf("ctl: %s", ctlOut)
	for _, l := range strings.Split(strings.TrimSpace(o.files["ctl.err"]), "\n") {
		if l != "" {
			t.Logf("ctl progress: %s", l)
		}
	}

	// The source handed the guest over, exited 0, and printed nothing more.
	if rc, ok := o.rc["src"]; !ok || rc != 0 || !strings.Contains(o.files["src.err"], "guest migrated to "+nestedMigrateAddr) {
		t.Fatalf("source: status %d (reported: %v), want 0 and \"guest migrated to %s\"\n%s", rc, ok, nestedMigrateAddr, dump())
	}
	if !strings.Contains(c.Output, "@@@ src.out grew after ctl returned: 0 bytes") {
		t.Errorf("the source printed after the migration completed:\n%s", dump())
	}

	// The destination ran the guest to its end.
	if rc, ok := o.rc["dst"]; !ok || rc != 0 || !strings.Contains(o.files["dst.out"], imagelib.GuestDoneMarker+" status=0") {
		t.Fatalf("destination: status %d (reported: %v), want 0 and %q\n%s", rc, ok, imagelib.GuestDoneMarker+" status=0", dump())
	}

	// The console continues across the seam: the source's numbered lines
	// are 1..a, then the destination's (the source's unterminated last
	// line, if any, continued by the destination's first) run b..N with
	// b <= a+1, the lines b..a, if any, printed again at the seam.
	src, dst := o.files["src.out"], o.files["dst.out"]
	var srcDone, partial string // complete lines, unterminated last line
	if i := strings.LastIndexByte(src, '\n'); i >= 0 {
		srcDone, partial = src[:i+1], src[i+1:]
	} else {
		partial = src
	}
	a, err := numberedLines(srcDone)
	if err != nil || !consecutive(a, 1, len(a)) || len(a) < 5 {
		t.Fatalf("source's lines (err %v): want 1..a with a >= 5, got %v\n%s", err, a, dump())
	}
	b, err := numberedLines(partial + dst)
	if err != nil || len(b) == 0 {
		t.Fatalf("destination's lines (err %v): %v; the migration did not happen mid-workload\n%s", err, b, dump())
	}
	if b[0] < 1 || b[0] > len(a)+1 || !consecutive(b, b[0], nestedMigrateLines) {
		t.Fatalf("destination's lines %d..%d (%d of them) do not continue the source's 1..%d up to %d\n%s",
			b[0], b[len(b)-1], len(b), len(a), nestedMigrateLines, dump())
	}
	repeated := len(a) + 1 - b[0]
	t.Logf("lines: source 1..%d, destination %d..%d (%d repeated at the seam, unterminated line at the seam: %q)",
		len(a), b[0], b[len(b)-1], repeated, partial)
	for _, f := range []string{"src.err", "dst.err"} {
		for _, l := range strings.Split(strings.TrimSpace(o.files[f]), "\n") {
			if strings.HasPrefix(l, "ftkvm:") { // ftkvm's own messages, not debug output
				t.Logf("%s: %s", f, l)
			}
		}
	}
}
