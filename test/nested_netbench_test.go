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

// netBenchGuestInit is the L2 /init of the TCP benchmark: eth0 as in
// netGuestInit, then three services, each serving connection after
// connection: an echo (7777), a sink that reads to the client's end of
// stream and then closes (7778), and a source that writes ftkvm.src= KiB
// of zeros and closes (7779). The guest runs until it is killed.
const netBenchGuestInit = netGuestPrologue + `src=$(sed -n 's/.*ftkvm\.src=\([0-9]*\).*/\1/p' /proc/cmdline)
printf '#!/bin/sh\nexec cat >/dev/null\n' >/bin/sinkd
printf '#!/bin/sh\nexec dd if=/dev/zero bs=1024 count=%s 2>/dev/null\n' "$src" >/bin/srcd
chmod 755 /bin/sinkd /bin/srcd
(while :; do nc -l -p 7777 -e cat; done) </dev/null >/dev/null 2>&1 &
(while :; do nc -l -p 7778 -e /bin/sinkd; done) </dev/null >/dev/null 2>&1 &
(while :; do nc -l -p 7779 -e /bin/srcd; done) </dev/null >/dev/null 2>&1 &
echo "NET-LISTENING"
while :; do sleep 1000; done
`

// The benchmark's transfers: small, as a replicated pair moves well
// under 1 KB/s of echoed stream in the L1 (the drill, 2026-12-07: an
// epoch of 250 ms bounds a round trip from below, and a Linux guest's
// epochs end with checkpoints).
const (
	netBenchRR     = 20
	netBenchSink   = 32 << 10
	netBenchSource = 32 // KiB
	netBenchEcho   = 16 << 10
)

// netBenchScript runs the workloads against a plain `ftkvm run`, then a
// replicated pair under each policy, one after the other in the same
// topology as the drill (nestedNetSetup). For a pair it prints the
// primary's `ctl status --json` before and after the sink transfer, to
// count the log bytes per byte the guest received. Lines: "@@@ MODE
// WORKLOAD <tcpstream result>" and "@@@ MODE status-before|after <json>".
func netBenchScript() string {
	return nestedShellLib + nestedNetSetup + fmt.Sprintf(`F=%[1]s
S=%[2]s
cd /tmp
common="--mem %[3]s --kernel %[4]s --initrd %[5]s --net tap=ftap0,mac=%[6]s"
cl='quiet ftkvm.ip=10.0.2.15/24 ftkvm.src=%[7]d'
client() { # MODE NAME ARGS...: one tcpstream run in the client's namespace
	m=$1 w=$2; shift 2
	echo "@@@ $m $w $( (inns nc $S -addr 10.0.2.15:$@) 2>&1 | grep -e '-OK' -e '-FAIL' | head -1)"
}
status() { # MODE WHEN
	[ -n "$api" ] && echo "@@@ $1 status-$2 $($F ctl status --api $api --json 2>/dev/null | tr -d '\n ')"
}
for m in plain output-commit strict; do
	rm -f $m.*
	api=
	pb=
	if [ $m = plain ]; then
		inns na $F --log-level info run $common --cmdline "$cl" >$m.p.out 2>$m.p.err &
		pp=$(ftkpid $!)
	else
		inns nb $F --log-level info backup --listen 10.0.2.2:7100 --timeout %[8]s $common --cmdline "$cl" >$m.b.out 2>$m.b.err &
		pb=$(ftkpid $!)
		waitfor $m.b.err 'backup waiting for its primary' 60 $pb
		api=/tmp/$m.sock
		inns na $F --log-level info primary --backup 10.0.2.2:7100 --timeout %[8]s --policy $m --epoch-length %[9]s --api $api $common --cmdline "$cl" >$m.p.out 2>$m.p.err &
		pp=$(ftkpid $!)
	fi
	echo "@@@ t $m-start=$(up)"
	if waitfor $m.p.out NET-LISTENING 900 $pp; then
		echo "@@@ t $m-listening=$(up)"
		client $m rr 7777 -rr %[10]d -size 64
		status $m before
		client $m sink 7778 -sink %[11]d
		status $m after
		client $m source 7779 -source
		client $m echo 7777 -max %[12]d
		echo "@@@ t $m-done=$(up)"
	fi
	for p in $pp $pb; do alive $p && kill -9 $p; wait $p; done
	show $m.p.err
	[ -n "$pb" ] && show $m.b.err
	# The tap's carrier goes with its process; let the bridge see it.
	sleep 1
done
`, l1FTKVM, l1TCPStream, nestedNetMem, nested.GuestVmlinux, l1NetInitrd, nestedNetMAC, netBenchSource,
		nestedFailoverPeerTimeout, nestedFailoverEpoch, netBenchRR, netBenchSink, netBenchEcho)
}

var (
	nbResultRE = regexp.MustCompile(`^@@@ (\S+) (rr|sink|source|echo) (.*)$`)
	nbStatusRE = regexp.MustCompile(`^@@@ (\S+) status-(before|after) (.*)$`)
	nbFieldRE  = regexp.MustCompile(`([a-z0-9-]+)=([0-9.]+)`)
)

// jsonNumber reads a number field from a flat scan of JSON text.
func jsonNumber(js, field string) (float64, bool) {
	m := regexp.MustCompile(`"` + regexp.QuoteMeta(field) + `":([0-9.eE+-]+)`).FindStringSubmatch(js)
	if m == nil {
		return 0, false
	}
	v, err := strconv.ParseFloat(m[1], 64)
	return v, err == nil
}

// BenchmarkNestedNet measures TCP between a client and the Debian guest's
// services through the drill's network (nestedNetSetup): request/response
// latency (64-byte echoes, one at a time), throughput client->guest (sink),
// guest->client (source) and both ways (echo), for a plain `ftkvm run`, a
// pair under output-commit and a pair under strict, in one L1 boot, with
// the ratios to plain, and the primary's log (link) bytes per byte the
// guest received over the sink transfer. Run it with:
//
//	go test -run '^$' -bench NestedNet -benchtime 1x ./test/
func BenchmarkNestedNet(b *testing.B) {
	if _, err := nested.QEMUAvailable(); err != nil {
		b.Skipf("nested tier needs QEMU: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Minute)
	defer cancel()
	im := linuxImages(b)
	cfg := nested.Config{
		Files:           nestedNetFiles(ctx, b, im, netBenchGuestInit),
		HostExecutables: []string{l1IPRoute},
		GuestImages:     true,
		Commands:        []nested.Command{{Name: "net-bench", Cmd: netBenchScript(), Timeout: 45 * time.Minute}},
	}
	logNestedConsole(b, &cfg)
	for range b.N {
		res, err := nested.Run(ctx, cfg)
		if err != nil {
			if res != nil {
				b.Logf("L1 console:\n%s", res.Console)
			}
			b.Fatal(err)
		}
		c := res.Command("net-bench")
		if err := c.Err(); err != nil {
			b.Fatalf("%v\n%s", err, c.Output)
		}
		// per mode and workload: the result's numeric fields
		got := map[string]map[string]map[string]float64{}
		status := map[string]map[string]string{}
		for _, l := range strings.Split(c.Output, "\n") {
			if m := nbStatusRE.FindStringSubmatch(l); m != nil {
				if status[m[1]] == nil {
					status[m[1]] = map[string]string{}
				}
				status[m[1]][m[2]] = m[3]
				continue
			}
			m := nbResultRE.FindStringSubmatch(l)
			if m == nil {
				if strings.HasPrefix(l, "@@@ ") && !strings.HasPrefix(l, "@@@ BEGIN") && !strings.HasPrefix(l, "@@@ END") {
					b.Log(l)
				}
				continue
			}
			b.Log(l)
			if !strings.Contains(m[3], "-OK ") {
				b.Fatalf("%s %s failed: %s\n%s", m[1], m[2], m[3], c.Output)
			}
			if got[m[1]] == nil {
				got[m[1]] = map[string]map[string]float64{}
			}
			f := map[string]float64{}
			for _, kv := range nbFieldRE.FindAllStringSubmatch(m[3], -1) {
				f[kv[1]], _ = strconv.ParseFloat(kv[2], 64)
			}
			got[m[1]][m[2]] = f
		}
		metric := map[string]map[string]float64{}
		for _, mode := range []string{"plain", "output-commit", "strict"} {
			w := got[mode]
			if len(w) != 4 {
				b.Fatalf("%s: %d of 4 workloads reported\n%s", mode, len(w), c.Output)
			}
			metric[mode] = map[string]float64{
				"rr-us":       w["rr"]["mean-us"],
				"sink-KB/s":   w["sink"]["bytes"] / w["sink"]["secs"] / 1000,
				"source-KB/s": w["source"]["bytes"] / w["source"]["secs"] / 1000,
				"echo-KB/s":   w["echo"]["echoed"] / w["echo"]["secs"] / 1000,
			}
			for k, v := range metric[mode] {
				b.ReportMetric(v, mode+"-"+k)
			}
			if mode == "plain" {
				continue
			}
			for k, v := range metric[mode] {
				b.ReportMetric(v/metric["plain"][k], mode+"/plain-"+k)
			}
			before, after := status[mode]["before"], status[mode]["after"]
			l0, ok0 := jsonNumber(before, "link_bytes_sent")
			l1, ok1 := jsonNumber(after, "link_bytes_sent")
			c0, _ := jsonNumber(before, "checkpoint_bytes")
			c1, _ := jsonNumber(after, "checkpoint_bytes")
			if !ok0 || !ok1 {
				b.Fatalf("%s: no link_bytes_sent in the primary's status around the sink (%q, %q)", mode, before, after)
			}
			b.ReportMetric((l1-l0)/w["sink"]["bytes"], mode+"-log-B/rx-B")
			b.ReportMetric((c1-c0)/w["sink"]["bytes"], mode+"-checkpoint-B/rx-B")
			b.Logf("%s: over the %d-byte sink transfer the primary wrote %.0f link bytes (%.0f of them checkpoints)",
				mode, int(w["sink"]["bytes"]), l1-l0, c1-c0)
		}
		b.Logf("L1 boot %v, bench command %v", res.BootTime.Round(time.Second), c.Duration.Round(time.Second))
	}
}
