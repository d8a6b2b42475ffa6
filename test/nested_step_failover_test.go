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
)

// Failover drills under the step clock in the nested tier, with ring-3
// workloads and with a Linux guest running briefly (docs/STEP-CLOCK.md). The L1's kvm_amd single-steps every
// ring, so testos runs its workloads at ring 3 there, as it does by default.
// In one L1 boot, for each workload: an undisturbed replicated run in
// verify mode, whose length (L1 uptime) sets the scale, then a few runs
// whose primary is killed with SIGKILL at a random fraction of that
// length. The checks are those of
// TestStepClockFailoverDrills: the dead primary's console followed by the
// backup's, joined at the console offset the backup logged (the consoles
// cross the L1's in hex, byte for byte), is the workload's whole output,
// and the backup exits 0.
//
// The workloads are small: stepping runs about a thousand instructions a
// second in the L1 (each step is an L2 exit emulated by TCG). Linux runs
// briefly indeed: its PVH boot under a replicated step clock, the primary
// killed after its first few thousand instructions and the promoted backup
// stepping on for 30 s more (about 30,000 instructions, before Linux's
// first exit), then told to quit. That checks that the backup replays,
// takes over and steps Linux's early 32- and 64-bit code without an error;
// there is no console output to compare that early.

// Each run takes a minute or so in the L1 (one vCPU for both replicas), so
// the drills are few: the undisturbed verify run and kills[i] kills for
// workload i.
var nestedStepDrillKills = []int{2, 1}

var nestedStepWorkloads = []workload{
	{
		name: "tsc", cmdline: "workload=tsc samples=3 work=10 hz=19", lines: 5, flags: stepFlags,
		check: checkTSC(3),
	},
	{
		name: "interleave", cmdline: "workload=interleave lines=2 work=20 hz=19", lines: 6, flags: stepFlags,
		check: checkInterleave(2),
	},
}

// nestedStepDrillScript runs every workload's undisturbed run and its kills
// in the L1, printing outputs between "@@@ BEGIN <file>" (or "@@@ HEX
// <file>") and "@@@ END <file>", exit statuses as "@@@ rc <file>=<n>" and run lengths as "@@@ t
// <name>=<seconds>" (parseNestedFailover reads them). fracs[w][k] is where
// in the undisturbed run kill k of workload w falls (0-1).
func nestedStepDrillScript(fracs [][]float64) string {
	var b strings.Builder
	b.WriteString(nestedShellLib)
	fmt.Fprintf(&b, `F=%s
mkdir -p /tmp; cd /tmp
ip link set lo up 2>/dev/null || ifconfig lo 127.0.0.1 up
port=7200
# pair NAME KILL_US PFLAGS ARGS...: a backup and a primary on a fresh
# port, the primary with the flags PFLAGS too (word-split; - : none); the
# primary is killed KILL_US microseconds after it started (- : never).
pair() {
	n=$1; k=$2; pf=$3; shift 3
	[ "$pf" = - ] && pf=""
	port=$((port + 1))
	$F --log-level info backup --listen 127.0.0.1:$port "$@" >$n.b.out 2>$n.b.err &
	b=$!
	i=0
	until grep -qs 'backup waiting for its primary' $n.b.err; do
		if ! alive $b || [ $i -ge 100 ]; then echo "@@@ no backup for $n"; break; fi
		usleep 100000; i=$((i + 1))
	done
	t0=$(up)
	echo "@@@ start $n at $t0" >/dev/console
	$F --log-level info primary --backup 127.0.0.1:$port $pf "$@" >$n.p.out 2>$n.p.err &
	p=$!
	if [ "$k" != - ]; then
		usleep $k
		kill -9 $p
	fi
	waitpid $p 300 $n.p
	waitpid $b 300 $n.b
	echo "@@@ t $n=$(awk -v a=$t0 -v b=$(up) 'BEGIN { printf "%%.2f", b - a }')"
	for f in $n.p.out $n.b.out; do showx $f; done
	for f in $n.p.err $n.b.err; do show $f; done
}
`, l1FTKVM)
	for i, w := range nestedStepWorkloads {
		// The peer timeout is nestedFailoverPeerTimeout's hang guard (a
		// kill breaks the connection at once): with 5 s, a loaded host's
		// L1 once stalled a pair that long, and both replicas ran the guest.
		args := fmt.Sprintf("--kernel %s --mem 32 --timeout %s %s --cmdline '%s'", l1TestOS, nestedFailoverPeerTimeout, strings.Join(w.flags, " "), w.cmdline)
		fmt.Fprintf(&b, "pair %s - '--verify --epoch-instructions 4096' %s\n", w.name, args)
		fmt.Fprintf(&b, "T=$(awk -v a=$t0 -v b=$(up) 'BEGIN { print b - a }')\n")
		for k, f := range fracs[i] {
			fmt.Fprintf(&b, "pair %s.%d $(awk -v t=$T 'BEGIN { printf \"%%d\", t * %.3f * 1000000 }') - %s\n", w.name, k, f, args)
		}
	}
	// Linux, briefly: the step clock runs about a thousand instructions a
	// second here, so a boot cannot finish; the primary is killed after
	// nestedStepLinuxKill and the promoted backup, stepping on, is told to
	// quit nestedStepLinuxAfter later.
	fmt.Fprintf(&b, `n=linux
port=$((port + 1))
G="--epoch step --mem 128 --kernel %[1]s --initrd %[2]s --timeout 30s"
$F --log-level info backup --listen 127.0.0.1:$port $G --cmdline 'quiet ftkvm.workload=lines' >$n.b.out 2>$n.b.err &
b=$!
i=0
until grep -qs 'backup waiting for its primary' $n.b.err; do
	if ! alive $b || [ $i -ge 100 ]; then echo "@@@ no backup for $n"; break; fi
	usleep 100000; i=$((i + 1))
done
echo "@@@ start $n at $(up)" >/dev/console
$F --log-level info primary --backup 127.0.0.1:$port $G --cmdline 'quiet ftkvm.workload=lines' >$n.p.out 2>$n.p.err &
p=$!
sleep %[3]d
kill -9 $p
waitpid $p 60 $n.p
sleep %[4]d
kill $b
waitpid $b 60 $n.b
for f in $n.p.out $n.p.err $n.b.out $n.b.err; do show $f; done
`, nested.GuestVmlinux, nested.GuestInitramfs, int(nestedStepLinuxKill.Seconds()), int(nestedStepLinuxAfter.Seconds()))
	return b.String()
}

const (
	nestedStepLinuxKill  = 40 * time.Second // from the primary's start; its handshake takes ~20 s
	nestedStepLinuxAfter = 30 * time.Second
)

var (
	takeoverRE = regexp.MustCompile(`taking over" epoch=\d+ position=(\d+)(?:\+(\d+))?`)
	stoppedRE  = regexp.MustCompile(`replica stopped: primary, unprotected; epoch \d+ at (\d+)(?:\+(\d+))?;`)
)

// position parses the exits and instructions of a position match.
func position(m []string) [2]uint64 {
	e, _ := strconv.ParseUint(m[1], 10, 64)
	i, _ := strconv.ParseUint(m[2], 10, 64)
	return [2]uint64{e, i}
}

func TestNestedStepClockFailoverDrills(t *testing.T) {
	nestedTest(t)
	r := newRand(t)
	fracs := make([][]float64, len(nestedStepWorkloads))
	for i := range fracs {
		for range nestedStepDrillKills[i] {
			fracs[i] = append(fracs[i], 0.05+0.9*r.Float64())
		}
	}
	// Hang guards, not assertions on speed.
	ctx, cancel := context.WithTimeout(context.Background(), 25*time.Minute)
	defer cancel()
	cfg := nested.Config{
		Files:       map[string]string{l1FTKVM: ftkvmBin, l1TestOS: testosELF},
		GuestImages: true,
		Commands:    []nested.Command{{Name: "probe", Cmd: l1FTKVM + " probe"}, {Name: "drills", Cmd: nestedStepDrillScript(fracs), Timeout: 20 * time.Minute}},
	}
	res := runNested(ctx, t, cfg)
	if p := res.Command("probe"); p == nil || !p.OK() || !strings.Contains(p.Output, "guests at every ring") {
		t.Fatalf("the L1's KVM does not offer the step clock at every ring, which these drills need:\n%v", p)
	}
	c := res.Command("drills")
	t.Logf("L1 boot %v, drills %v", res.BootTime.Round(time.Second), c.Duration.Round(time.Second))
	if err := c.Err(); err != nil {
		t.Fatalf("%v\n%s", err, c.Output)
	}
	o := parseNestedFailover(c.Output)
	for _, n := range o.notes {
		if strings.HasPrefix(n, "@@@ start ") {
			t.Log(n) // progress
		} else {
			t.Error(n) // a hang guard fired, or a backup never listened
		}
	}
	get := func(name string) (p, b result) {
		p = result{stdout: o.files[name+".p.out"], stderr: o.files[name+".p.err"], status: o.rc[name+".p"]}
		b = result{stdout: o.files[name+".b.out"], stderr: o.files[name+".b.err"], status: o.rc[name+".b"]}
		return p, b
	}
	for i, w := range nestedStepWorkloads {
		t.Run(w.name, func(t *testing.T) {
			p, b := get(w.name)
			if p.status != 0 || b.status != 0 {
				t.Fatalf("undisturbed run: primary status %d, backup %d\nprimary stderr:\n%s\nbackup stderr:\n%s", p.status, b.status, p.stderr, b.stderr)
			}
			w.checkComplete(t, p.stdout)
			if strings.Contains(b.stderr, "DIVERGENCE") || !strings.Contains(b.stderr, "0 divergences") {
				t.Fatalf("verify mode saw a divergence:\n%s", b.stderr)
			}
			t.Logf("undisturbed verify run: %.1f s of L1 time", o.times[w.name])
			failovers := 0
			for k := range fracs[i] {
				name := fmt.Sprintf("%s.%d", w.name, k)
				p, b := get(name)
				if strings.Contains(b.stderr, "taking over") {
					failovers++
				}
				t.Run(fmt.Sprint(k), func(t *testing.T) {
					defer func() {
						if t.Failed() {
							t.Logf("kill at %.0f%% of the run\nprimary stdout:\n%s\nprimary stderr:\n%s\nbackup stdout:\n%s\nbackup stderr:\n%s",
								100*fracs[i][k], p.stdout, p.stderr, b.stdout, b.stderr)
						}
					}()
					if b.status != 0 {
						t.Fatalf("the backup exited with status %d", b.status)
					}
					out, _ := mergeSeam(t, p.stdout, b)
					w.checkComplete(t, out)
				})
			}
			t.Logf("%d kills: %d failovers", len(fracs[i]), failovers)
			if failovers == 0 {
				t.Errorf("no kill fell before the guest's end: nothing was drilled")
			}
		})
	}
	t.Run("linux", func(t *testing.T) {
		p, b := get("linux")
		to, st := takeoverRE.FindStringSubmatch(b.stderr), stoppedRE.FindStringSubmatch(b.stderr)
		if p.status != 137 || b.status != exitQuitStatus || to == nil || st == nil || !strings.Contains(b.stderr, "this replica is the primary now") {
			t.Fatalf("want the primary killed (137), the backup promoted and then told to quit (%d); got %d and %d\nprimary stderr:\n%s\nbackup stderr:\n%s",
				exitQuitStatus, p.status, b.status, p.stderr, b.stderr)
		}
		from, to2 := position(to), position(st)
		if to2[0] < from[0] || (to2[0] == from[0] && to2[1] <= from[1]) {
			t.Fatalf("the promoted backup did not run the guest on: taken over at %v, stopped at %v\n%s", from, to2, b.stderr)
		}
		t.Logf("Linux under the step clock: the backup took over at position %d+%d and ran it to %d+%d", from[0], from[1], to2[0], to2[1])
	})
}

// exitQuitStatus is ftkvm's status when told to quit (cmd/ftkvm: exitQuit).
const exitQuitStatus = 130
