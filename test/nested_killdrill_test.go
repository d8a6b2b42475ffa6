package test

import (
	"fmt"
	"strings"
	"testing"

	"github.com/ftkvm/ftkvm/test/nested"
	"github.com/ftkvm/ftkvm/tools/images/imagelib"
)

// The kill drills of the nested tier (TestNestedFailover,
// TestNestedDiskFailover) share their L1 script and their first checks:
// in one L1 boot, an `ftkvm backup` and an `ftkvm primary` run the Debian
// guest over loopback; the primary is SIGKILLed a random delay after its
// console shows a chosen progress line of the workload ("line K",
// "record K"); the backup takes over and runs the guest to its end. A
// kill that lands after the guest's end drilled nothing: the round is run
// again with the kill after an earlier line and without the delay, at
// most nestedFailoverRetries times. What differs between the drills is
// nestedKillDrill's.

// nestedKillDrill is what one kill drill's L1 script and checks vary.
type nestedKillDrill struct {
	initrd   string // the guest's initramfs in the L1
	cmdline  string // the guest's command line
	progress string // the workload's progress lines are "<progress> N"
	addr     string // the backup's listening address
	// disk: each round gives each replica a fresh copy of base.img
	// (which setup makes) as its disk.
	disk    bool
	setup   string // shell lines run once, before the first round
	outputs string // shell lines that print the drill's own outputs
}

// script runs the drill in the L1, the primary killed delayUS after its
// console shows progress line killAt, and prints, between "@@@ BEGIN
// <file>" (or "@@@ HEX <file>") and "@@@ END <file>" lines, the drill's
// outputs and every output file of the last round, and "@@@ rc
// <what>=<n>" and "@@@ t <event>=<L1 uptime>" lines ("@@@ late ..." for a
// round whose kill came after the guest's end): parseNestedFailover reads
// it. Every wait is bounded, so the outputs are printed even when
// something hangs.
func (d nestedKillDrill) script(killAt, delayUS int) string {
	var copies, bDisk, pDisk string
	if d.disk {
		copies = "\tcp base.img p.img\n\tcp base.img b.img\n"
		bDisk, pDisk = " --disk b.img", " --disk p.img"
	}
	return nestedShellLib + fmt.Sprintf(`F=%[1]s
mkdir -p /tmp
cd /tmp
# has FILE LINE: FILE holds LINE as a whole line.
has() { tr -d '\r' <$1 | grep -qx "$2"; }
guest="--timeout %[2]s --mem 128 --kernel %[3]s --initrd %[4]s"
cmdline='%[5]s'

# The L1 brings up no interface by itself; the replicas talk over lo.
ip link set lo up 2>/dev/null || ifconfig lo 127.0.0.1 up
%[6]s# round K DELAY_US: a backup and a primary; the primary is killed
# DELAY_US after its console shows %[7]s K (looked for every 0.1 s).
round() {
	rm -f p.out p.err b.out b.err
%[8]s	$F --log-level info backup --listen %[9]s $guest%[10]s --cmdline "$cmdline" >b.out 2>b.err &
	b=$!
	i=0
	until grep -q 'backup waiting for its primary' b.err; do
		if ! alive $b || [ $i -ge 60 ]; then echo "@@@ no backup after $i s"; break; fi
		sleep 1; i=$((i + 1))
	done
	echo "@@@ t start=$(up)"
	$F --log-level info primary --backup %[9]s --epoch-length %[11]s $guest%[12]s --cmdline "$cmdline" >p.out 2>p.err &
	p=$!
	i=0
	first=
	until has p.out "%[7]s $1"; do
		if [ -z "$first" ] && has p.out '%[7]s 1'; then
			first=1
			echo "@@@ t %[7]s1=$(up)"
		fi
		if ! alive $p || [ $i -ge 6000 ]; then echo "@@@ no %[7]s $1 after $((i / 10)) s"; break; fi
		usleep 100000; i=$((i + 1))
	done
	[ -z "$first" ] && echo "@@@ t %[7]s1=$(up)"
	echo "@@@ t seen=$(up)"
	usleep $2
	kill -9 $p
	echo "@@@ t kill=$(up)"
	wait $p
	echo "@@@ rc primary=$?"
	waitpid $b 300 backup
	echo "@@@ t end=$(up)"
}
k=%[13]d
d=%[14]d
try=0
while :; do
	round $k $d
	# Too late: the primary's console shows the workload's end, and the
	# backup got it from the primary and took nothing over. Again,
	# earlier. (A guest that ended early is no late kill.)
	if has p.out '%[16]s status=0' && grep -q 'ended on the primary' b.err && ! grep -q 'taking over' b.err && [ $try -lt %[15]d ]; then
		echo "@@@ late: the kill after %[7]s $k (+$d us) came after the guest's end"
		for f in p.err b.err; do cp $f late$try.$f; done
		try=$((try + 1))
		k=$((k / 2))
		[ $k -lt 1 ] && k=1
		d=0
		continue
	fi
	break
done
echo "@@@ killed after %[7]s $k"
%[17]sfor f in p.out b.out; do showx $f; done
for f in p.err b.err late*.err; do
	if [ -e $f ]; then show $f; fi
done
`, l1FTKVM, nestedFailoverPeerTimeout, nested.GuestVmlinux, d.initrd,
		d.cmdline, d.setup, d.progress, copies, d.addr, bDisk, nestedFailoverEpoch, pDisk,
		killAt, delayUS, nestedFailoverRetries, imagelib.GuestDoneMarker, d.outputs)
}

// nestedTakeover is a kill drill's outcome, read off its output by
// checkTakeover.
type nestedTakeover struct {
	killAt int // the last round's kill came after this progress line
	// The consoles: the primary's up to its death, the backup's from
	// the seam on, and the two joined there (\r removed).
	pOut, bOut, joined string
	// The seam: the console byte the backup performs from, how many
	// bytes from there it announced as uncertain, and how many the
	// primary's console repeats.
	seam, uncertain, repeated int
}

// dump is the replicas' consoles and logs, for a failure's message.
func (o nestedFailoverOutput) dump() string {
	var b strings.Builder
	for _, f := range []string{"p.out", "p.err", "b.out", "b.err"} {
		fmt.Fprintf(&b, "--- %s:\n%s\n", f, o.files[f])
	}
	return b.String()
}

// checkTakeover makes the checks every kill drill shares on its parsed
// output o (killAt: the progress line the kill was drawn after): the
// primary replicated to its backup and did not lose it before its death;
// the backup took over and exited 0; it logged one seam, where the two
// consoles join without a byte lost or changed (joinAt).
func (d nestedKillDrill) checkTakeover(t *testing.T, o nestedFailoverOutput, killAt int) nestedTakeover {
	t.Helper()
	for _, n := range o.notes {
		t.Log(n)
		// The last round's kill moment (earlier than drawn after a late one).
		fmt.Sscanf(n, "@@@ killed after "+d.progress+" %d", &killAt)
	}
	ut := o.times
	t.Logf("L1 uptime: the primary's %s 1 %.1fs after it started, %s %d seen %.1fs and the primary killed %.1fs after it started, the backup exited %.1fs after the kill",
		d.progress, ut[d.progress+"1"]-ut["start"], d.progress, killAt, ut["seen"]-ut["start"], ut["kill"]-ut["start"], ut["end"]-ut["kill"])
	logs := []string{"p.err", "b.err"}
	for f := range o.files {
		if strings.HasPrefix(f, "late") {
			logs = append(logs, f) // a round whose kill came after the guest's end
		}
	}
	for _, f := range logs {
		for _, l := range strings.Split(o.files[f], "\n") {
			if strings.Contains(l, "replica stopped") || strings.Contains(l, "DIVERGENCE") || strings.Contains(l, "repaired") ||
				strings.Contains(l, "ended on the primary") || strings.Contains(l, "disk ") {
				t.Logf("%s: %s", f, l)
			}
		}
	}

	pErr, bErr := o.files["p.err"], o.files["b.err"]
	if !strings.Contains(pErr, "primary: replicating to "+d.addr) {
		t.Fatalf("the primary never replicated to its backup\n%s", o.dump())
	}
	if strings.Contains(pErr, "backup lost") {
		t.Fatalf("the primary lost its backup before it was killed: the drill did not test a failover\n%s", o.dump())
	}
	// The backup took over and ran the guest to its end.
	if rc, ok := o.rc["backup"]; !ok || rc != 0 || !strings.Contains(bErr, "taking over") || !strings.Contains(bErr, "this replica is the primary now") {
		if strings.Contains(bErr, "ended on the primary") {
			t.Fatalf("every kill, the last after %s %d, came after the guest's end: nothing was drilled\n%s", d.progress, killAt, o.dump())
		}
		t.Fatalf("backup: status %d (reported: %v), want 0 and a takeover on stderr\n%s", rc, ok, o.dump())
	}
	r := nestedTakeover{killAt: killAt, pOut: o.files["p.out"], bOut: o.files["b.out"]}
	var ok bool
	if r.seam, r.uncertain, ok = seamOf(bErr); !ok {
		t.Fatalf("the backup took over without one line saying from which console byte it performs\n%s", o.dump())
	}
	joined, repeated, err := joinAt(r.pOut, r.bOut, r.seam, r.uncertain)
	if err != nil {
		t.Fatalf("joining the consoles: %v\n%s", err, o.dump())
	}
	// The guest's console ends lines with \r\n.
	r.joined, r.repeated = strings.ReplaceAll(joined, "\r", ""), repeated
	return r
}
