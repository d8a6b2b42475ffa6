package test

import (
	"context"
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

// A failover drill with a Linux guest, in the nested tier: the host's
// drills with a Linux guest running its numbered-lines workload. In one L1 boot, an `ftkvm backup` and an
// `ftkvm primary` run the Debian guest with the lines workload over
// loopback; once the primary's console shows a few lines, the primary is
// killed with SIGKILL, and the backup takes over and runs the guest to its
// end. The primary's console up to its death followed by the backup's must
// be the workload's whole output: only bytes at the seam may repeat, and
// identically.
//
// One round per run: in the L1 the replicated boot reaches the workload
// after about 2.5 minutes and the whole round takes about 4 (measured with
// QEMU 10.0 and 250 ms epochs), so each further round would add 4 minutes
// to CI. The kill moment is random and relative to the guest's progress:
// after a random line of the workload shows on the primary's console, plus
// a random delay of up to a second, so that runs drill different moments.
// A kill that lands after the guest's end (the backup gets the primary's
// goodbye and has nothing to take over) drilled nothing: it is neither a
// pass nor a failure, and the round is run again with the kill after an
// earlier line and without the delay, at most nestedFailoverRetries times.
//
// The consoles are joined at the console offset the backup logged when it
// took over; the bytes from there that the primary's console already shows
// must be identical to the backup's. The output files cross the L1's
// console in hex (showx): a console translates line ends, and the offsets
// count the guest's bytes.
//
// The L1 has one vCPU. With two (QEMU's multi-threaded TCG, the replicas
// side by side) guests triple-faulted in 4 of 6 runs, replicated or not
// (a plain `ftkvm run` of the same guest too), whether the processes were
// pinned to one L1 CPU each or not; with one, never. That is the test
// tier, not ftkvm: see nested.Config.CPUs.

// The workload must outlast the primary's boot-to-kill plus the takeover,
// so that the backup prints lines too. The primary's console lags its guest
// (output-commit holds outputs until the backup acknowledged them), so the
// kill comes a little after the guest printed the chosen line; the lines
// after it take at least several seconds.
const (
	nestedFailoverLines = 60
	nestedFailoverSpin  = 3000
	// The kill follows line nestedFailoverKillMin + [0, nestedFailoverKillSpan).
	nestedFailoverKillMin  = 2
	nestedFailoverKillSpan = 12
	nestedFailoverRetries  = 2
	nestedFailoverAddr     = "127.0.0.1:7100"
	// The peer timeout is a hang guard: a killed primary's connection
	// breaks, which the backup sees at once. In the L1 a replica's process
	// can stall for seconds (one TCG vCPU shared by two replicas and their
	// guests), and 2 s made both replicas declare each other dead early in
	// the boot and run the guest twice.
	nestedFailoverPeerTimeout = "30s"
	// With the default 1 ms epochs a guest computing without exits ends
	// nearly every epoch with a kick and a checkpoint, and the L2 guest
	// runs slowly enough under TCG that Linux's boot is mostly such
	// epochs: with 20 ms the replicated boot took 9.5 minutes (5505
	// checkpoints, 1 GB; QEMU 7.2), with 250 ms 2.5 (370 checkpoints,
	// 220 MB; QEMU 10.0, which also runs the L1 faster).
	nestedFailoverEpoch = "250ms"
)

// nestedFailoverDrill is the drill's L1 script and shared checks
// (nested_killdrill_test.go): the lines workload, the kill after a line.
var nestedFailoverDrill = nestedKillDrill{
	initrd:   nested.GuestInitramfs,
	cmdline:  fmt.Sprintf("quiet ftkvm.workload=lines ftkvm.lines=%d ftkvm.spin=%d", nestedFailoverLines, nestedFailoverSpin),
	progress: "line",
	addr:     nestedFailoverAddr,
}

// nestedFailoverOutput is the parsed output of a nestedKillDrill script
// (and of the other drills that print in its format).
type nestedFailoverOutput struct {
	files map[string]string  // file name -> contents, \r removed
	rc    map[string]int     // "primary", "backup" -> exit status
	times map[string]float64 // event -> L1 uptime in seconds
	notes []string           // other "@@@" lines
}

var (
	nfBeginRE = regexp.MustCompile(`^@@@ (BEGIN|HEX) (\S+)$`)
	nfRCRE    = regexp.MustCompile(`^@@@ rc (\S+)=(-?\d+)$`)
	nfTimeRE  = regexp.MustCompile(`^@@@ t (\S+)=([0-9.]+)$`)
	nfLineRE  = regexp.MustCompile(`^line (\d+)$`)
)

func parseNestedFailover(out string) nestedFailoverOutput {
	o := nestedFailoverOutput{files: map[string]string{}, rc: map[string]int{}, times: map[string]float64{}}
	lines := strings.Split(out, "\n")
	for i := 0; i < len(lines); i++ {
		l := lines[i]
		if m := nfBeginRE.FindStringSubmatch(l); m != nil {
			var body []string
			for i++; i < len(lines) && lines[i] != "@@@ END "+m[2]; i++ {
				body = append(body, lines[i])
			}
			if m[1] == "HEX" {
				o.files[m[2]] = unhex(body)
				continue
			}
			// show adds one newline after the file's contents: the
			// lines between the markers, joined, are the contents.
			o.files[m[2]] = strings.Join(body, "\n")
			continue
		}
		if m := nfRCRE.FindStringSubmatch(l); m != nil {
			o.rc[m[1]], _ = strconv.Atoi(m[2])
		} else if m := nfTimeRE.FindStringSubmatch(l); m != nil {
			o.times[m[1]], _ = strconv.ParseFloat(m[2], 64)
		} else if strings.HasPrefix(l, "@@@ ") {
			o.notes = append(o.notes, l)
		}
	}
	return o
}

// unhex decodes od -An -tx1 lines (showx). A line that is not hex bytes
// (console noise in the middle) is kept visibly, so that the checks fail
// on it rather than lose it.
func unhex(lines []string) string {
	var b strings.Builder
	for _, l := range lines {
		for _, f := range strings.Fields(l) {
			v, err := strconv.ParseUint(f, 16, 8)
			if err != nil || len(f) != 2 {
				fmt.Fprintf(&b, "<not hex: %q>", l)
				break
			}
			b.WriteByte(byte(v))
		}
	}
	return b.String()
}

// lineNumbersIn returns the numbers of the workload's "line <i>" lines in
// text; a line that starts like one but is not exactly one is an error.
func lineNumbersIn(text string) ([]int, error) {
	var nums []int
	for _, l := range strings.Split(text, "\n") {
		if m := nfLineRE.FindStringSubmatch(l); m != nil {
			k, _ := strconv.Atoi(m[1])
			nums = append(nums, k)
		} else if strings.HasPrefix(l, "line") {
			return nums, fmt.Errorf("garbled line %q", l)
		}
	}
	return nums, nil
}

// checkLinesConsole reports what is wrong with a whole console of the lines
// workload: "line 1" .. "line n", each once and in order, then the done
// marker with status 0.
func checkLinesConsole(console string, n int) error {
	nums, err := lineNumbersIn(console)
	if err != nil {
		return err
	}
	for i, k := range nums {
		if k != i+1 {
			return fmt.Errorf("numbered line %d is \"line %d\" (all: %v)", i+1, k, nums)
		}
	}
	if len(nums) != n {
		return fmt.Errorf("%d numbered lines, want %d", len(nums), n)
	}
	last := strings.Index(console, fmt.Sprintf("line %d\n", n))
	done := strings.Index(console, imagelib.GuestDoneMarker+" status=0\n")
	if done < last {
		return fmt.Errorf("no %q after line %d", imagelib.GuestDoneMarker+" status=0", n)
	}
	return nil
}

func TestNestedFailover(t *testing.T) {
	nestedTest(t)
	// Hang guards, not assertions on speed.
	// A round takes about 4 minutes; a late kill adds one (at most
	// nestedFailoverRetries).
	ctx, cancel := context.WithTimeout(context.Background(), 28*time.Minute)
	defer cancel()
	r := newRand(t)
	killAt := nestedFailoverKillMin + r.IntN(nestedFailoverKillSpan)
	delayUS := r.IntN(1_000_000)
	t.Logf("the primary is killed %d µs after line %d shows on its console", delayUS, killAt)
	cfg := nested.Config{
		Files:       map[string]string{l1FTKVM: ftkvmBin},
		GuestImages: true,
		Commands:    []nested.Command{{Name: "linux-failover", Cmd: nestedFailoverDrill.script(killAt, delayUS), Timeout: 24 * time.Minute}},
	}
	res := runNested(ctx, t, cfg)
	c := res.Command("linux-failover")
	t.Logf("L1 boot %v, drill command %v, whole run %v", res.BootTime.Round(time.Second),
		c.Duration.Round(time.Second), res.Elapsed.Round(time.Second))
	if err := c.Err(); err != nil {
		t.Fatalf("%v\n%s", err, c.Output)
	}
	o := parseNestedFailover(c.Output)
	tk := nestedFailoverDrill.checkTakeover(t, o, killAt)
	joined, pOut, bOut, dump := tk.joined, tk.pOut, tk.bOut, o.dump
	pText, bText := strings.ReplaceAll(pOut, "\r", ""), strings.ReplaceAll(bOut, "\r", "")
	// The primary's numbered lines are those it ended with a newline.
	pNums, _ := lineNumbersIn(pText[:strings.LastIndexByte(pText, '\n')+1])
	bNums, _ := lineNumbersIn(bText)
	t.Logf("the primary printed %d numbered lines (%d bytes), the backup %d whole ones (%d bytes) from console byte %d; %d bytes repeated identically at the seam (%d uncertain): %q",
		len(pNums), len(pOut), len(bNums), len(bOut), tk.seam, tk.repeated, tk.uncertain, bOut[:tk.repeated])
	if err := checkLinesConsole(joined, nestedFailoverLines); err != nil {
		t.Fatalf("joined console: %v\n%s", err, dump())
	}
	if len(pNums) >= nestedFailoverLines || len(bNums) == 0 {
		t.Fatalf("the backup printed no numbered line of its own: the kill did not come mid-workload\n%s", dump())
	}
	// The guest's clock across the failover: its uptime against its RTC
	// over the workload, from the primary's start mark to the backup's end
	// mark, within 5% over at least 10 s of RTC time.
	rate, secs, err := guestClockRate(joined)
	if err != nil {
		t.Fatalf("the guest's clock: %v\n%s", err, dump())
	}
	t.Logf("the guest's uptime advanced %.3f s per RTC second over %d s of RTC time, across the failover", rate, secs)
	if secs < 10 || rate < 0.95 || rate > 1.05 {
		t.Errorf("the guest's uptime advanced %.3f s per RTC second over %d s, want 1 within 5%% over at least 10 s", rate, secs)
	}
}

// guestClockRate reads the guest's clock marks (imagelib.GuestInit) in a
// console: the uptime elapsed per second of RTC time between the start
// and the end mark, and the RTC seconds between them.
func guestClockRate(console string) (float64, int, error) {
	m := imagelib.ClockMarkRE.FindAllStringSubmatch(console, -1)
	if len(m) != 2 || m[0][1] != "start" || m[1][1] != "end" {
		return 0, 0, fmt.Errorf("want one start and one end clock mark with an RTC, found %q (a guest without /sys/class/rtc/rtc0 prints rtc=none)", m)
	}
	r0, _ := strconv.Atoi(m[0][2])
	r1, _ := strconv.Atoi(m[1][2])
	u0, _ := strconv.ParseFloat(m[0][3], 64)
	u1, _ := strconv.ParseFloat(m[1][3], 64)
	if r1 <= r0 {
		return 0, r1 - r0, fmt.Errorf("the RTC went from %d to %d", r0, r1)
	}
	return (u1 - u0) / float64(r1-r0), r1 - r0, nil
}

// TestShowxRoundTrip: a file shown with showx (nestedShellLib) and
// read back by parseNestedFailover has exactly its bytes, line ends and
// all. Runs the helpers with this host's busybox (the nested tier's
// userland) or, without one, its sh and od.
func TestShowxRoundTrip(t *testing.T) {
	sh := []string{"sh", "-c"}
	if _, err := os.Stat(imagelib.HostBusybox); err == nil {
		sh = []string{imagelib.HostBusybox, "sh", "-c"}
	}
	want := "line 1\r\nline 2\r\n\x00\xff unterminated"
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "p.out"), []byte(want), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "empty"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(sh[0], append(sh[1:], nestedShellLib+"showx p.out; showx empty")...)
	cmd.Dir = dir
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	o := parseNestedFailover(string(out))
	if got, ok := o.files["p.out"]; !ok || got != want {
		t.Fatalf("p.out read back as %q, want %q\nshown as:\n%s", got, want, out)
	}
	if got, ok := o.files["empty"]; !ok || got != "" {
		t.Fatalf("an empty file read back as %q (found: %v)\n%s", got, ok, out)
	}
}
