package test

import (
	"fmt"
	"os/exec"
	"regexp"
	"strings"
	"testing"
	"time"
)

// netnsPair makes two network namespaces for a primary (A, 10.77.0.1)
// and a backup (B, 10.77.0.2) joined by a veth pair, and a third (W) for
// the arbiter, at 10.77.9.1 on its loopback, which each replica reaches
// over a link of its own. cut takes B's end of the replicas' link down;
// the returned function brings it up again.
type netnsPair struct {
	t          *testing.T
	a, b, w    string
	vethB      string
	runCommand func(args ...string)
}

func newNetnsPair(t *testing.T) *netnsPair {
	t.Helper()
	if _, err := exec.LookPath("ip"); err != nil {
		t.Fatal("needs iproute2 (installed by the test set-up)")
	}
	suffix := fmt.Sprint(time.Now().UnixNano() % 100000)
	n := &netnsPair{t: t, a: "ftkvm-ea" + suffix, b: "ftkvm-eb" + suffix, w: "ftkvm-ew" + suffix}
	vethA := "fea" + suffix
	n.vethB = "feb" + suffix
	run := func(args ...string) {
		t.Helper()
		if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
			t.Fatalf("%s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	n.runCommand = run
	for _, ns := range []string{n.a, n.b, n.w} {
		run("ip", "netns", "add", ns)
		ns := ns
		t.Cleanup(func() { exec.Command("ip", "netns", "del", ns).Run() })
		run("ip", "-n", ns, "link", "set", "lo", "up")
	}
	run("ip", "link", "add", vethA, "netns", n.a, "type", "veth", "peer", "name", n.vethB, "netns", n.b)
	run("ip", "-n", n.a, "addr", "add", "10.77.0.1/24", "dev", vethA)
	run("ip", "-n", n.b, "addr", "add", "10.77.0.2/24", "dev", n.vethB)
	run("ip", "-n", n.a, "link", "set", vethA, "up")
	run("ip", "-n", n.b, "link", "set", n.vethB, "up")
	run("ip", "-n", n.w, "addr", "add", "10.77.9.1/32", "dev", "lo")
	for i, ns := range []string{n.a, n.b} {
		here, there := fmt.Sprintf("few%d%s", i, suffix), fmt.Sprintf("fex%d%s", i, suffix)
		run("ip", "link", "add", here, "netns", ns, "type", "veth", "peer", "name", there, "netns", n.w)
		run("ip", "-n", ns, "addr", "add", fmt.Sprintf("10.77.%d.1/24", i+1), "dev", here)
		run("ip", "-n", n.w, "addr", "add", fmt.Sprintf("10.77.%d.2/24", i+1), "dev", there)
		run("ip", "-n", ns, "link", "set", here, "up")
		run("ip", "-n", n.w, "link", "set", there, "up")
		run("ip", "-n", ns, "route", "add", "10.77.9.1/32", "via", fmt.Sprintf("10.77.%d.2", i+1))
	}
	return n
}

func (n *netnsPair) cut() (heal func()) {
	n.runCommand("ip", "-n", n.b, "link", "set", n.vethB, "down")
	return func() { n.runCommand("ip", "-n", n.b, "link", "set", n.vethB, "up") }
}

// etcdInNS is a three-member etcd cluster in namespace ns, on 10.77.9.1.
type etcdInNS struct {
	t     *testing.T
	ns    string
	dir   string
	args  [][]string
	procs []*proc
}

func startEtcdInNS(t *testing.T, ns string) *etcdInNS {
	t.Helper()
	bin, err := exec.LookPath("etcd")
	if err != nil {
		t.Fatal("etcd is not installed (Debian's etcd-server; the test set-up installs it)")
	}
	e := &etcdInNS{t: t, ns: ns, dir: t.TempDir()}
	var peers []string
	for i := range 3 {
		peers = append(peers, fmt.Sprintf("m%d=http://10.77.9.1:%d", i, 2380+2*i))
	}
	for i := range 3 {
		client, peer := fmt.Sprintf("http://10.77.9.1:%d", 2379+2*i), fmt.Sprintf("http://10.77.9.1:%d", 2380+2*i)
		e.args = append(e.args, []string{"ip", "netns", "exec", ns, bin, "--name", fmt.Sprintf("m%d", i),
			"--data-dir", fmt.Sprintf("%s/m%d", e.dir, i),
			"--listen-client-urls", client, "--advertise-client-urls", client,
			"--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
			"--initial-cluster", strings.Join(peers, ","), "--initial-cluster-state", "new",
			"--initial-cluster-token", "ftkvm-drill", "--logger", "zap", "--log-level", "error"})
		e.procs = append(e.procs, nil)
		e.start(i)
	}
	return e
}

func (e *etcdInNS) start(i int) { e.procs[i] = startCmd(e.t, e.args[i]...) }

func (e *etcdInNS) kill(i int) {
	if e.procs[i] != nil {
		e.procs[i].kill()
		e.procs[i] = nil
	}
}

const etcdArbiter = "etcd://10.77.9.1:2379,10.77.9.1:2381,10.77.9.1:2383/ftkvm-drill"

// TestArbiterEtcdDrills cuts a replicated pair's link with an etcd
// cluster as the arbiter: with the cluster healthy (until each side has
// won once), with one member dead, and with a majority dead, where both
// replicas wait without performing output until the quorum returns. Each
// time exactly one replica goes on and finishes the guest; the other
// stops, fenced.
func TestArbiterEtcdDrills(t *testing.T) {
	requireKVM(t)
	n := newNetnsPair(t)
	e := startEtcdInNS(t, n.w)
	w := workloadNamed(t, "counter")
	// A long timeout: a loaded test host must not split the pair before
	// the cut.
	args := []string{"--kernel", testosELF, "--mem", "32", "--cmdline", w.cmdline, "--timeout", "3s", "--arbiter", etcdArbiter}
	startPair := func() (p, b *proc) {
		b = startIn(t, n.b, append([]string{"--log-level", "info", "backup", "--listen", "10.77.0.2:7400"}, args...)...)
		b.backupAddr()
		p = startIn(t, n.a, append([]string{"--log-level", "info", "primary", "--backup", "10.77.0.2:7400"}, args...)...)
		p.waitUntil("the handshake", func() bool { return strings.Contains(p.stderr(), "primary: replicating to") })
		return p, b
	}
	// oneSurvivor checks a cut's outcome and says which side won.
	oneSurvivor := func(t *testing.T, pres, bres result) string {
		t.Helper()
		pf, bf := strings.Contains(pres.stderr, "ftkvm: fenced:"), strings.Contains(bres.stderr, "ftkvm: fenced:")
		switch {
		case bf && !pf && pres.status == 0:
			w.checkComplete(t, pres.stdout)
			if bres.status != 125 || bres.stdout != "" {
				t.Fatalf("fenced backup: status %d, printed:\n%s", bres.status, bres.stdout)
			}
			return "primary"
		case pf && !bf && bres.status == 0:
			if pres.status != 125 || !strings.HasSuffix(bres.stdout, "testos: PASS\n") {
				t.Fatalf("fenced primary status %d; backup:\n%s\n%s", pres.status, bres.stdout, bres.stderr)
			}
			checkCounterTail(t, bres.stdout, 40)
			return "backup"
		}
		t.Fatalf("want exactly one survivor: primary status %d fenced %v, backup status %d fenced %v\nprimary:\n%s\nbackup:\n%s",
			pres.status, pf, bres.status, bf, pres.stderr, bres.stderr)
		return ""
	}

	t.Run("cluster healthy", func(t *testing.T) {
		won := map[string]int{}
		for round := 0; round < 6 && (won["primary"] == 0 || won["backup"] == 0); round++ {
			p, b := startPair()
			time.Sleep(300 * time.Millisecond)
			heal := n.cut()
			pres, bres := p.wait(), b.wait()
			heal()
			won[oneSurvivor(t, pres, bres)]++
			if !strings.Contains(pres.stderr+bres.stderr, "fencing token") {
				t.Fatalf("the winner did not log its fencing token:\n%s\n%s", pres.stderr, bres.stderr)
			}
		}
		t.Logf("survivors: %v", won)
	})

	t.Run("one member dead", func(t *testing.T) {
		e.kill(2)
		defer e.start(2)
		p, b := startPair()
		time.Sleep(300 * time.Millisecond)
		heal := n.cut()
		pres, bres := p.wait(), b.wait()
		heal()
		t.Logf("survivor: %s", oneSurvivor(t, pres, bres))
	})

	t.Run("no quorum", func(t *testing.T) {
		p, b := startPair()
		time.Sleep(300 * time.Millisecond)
		e.kill(0)
		e.kill(1)
		heal := n.cut()
		// Both lose the peer (the 3 s timeout) and ask; nobody answers.
		for _, r := range []*proc{p, b} {
			r.waitUntil("the claim", func() bool { return strings.Contains(r.stderr(), "the witness decides") })
		}
		pOut, bOut := len(p.stdout()), len(b.stdout())
		time.Sleep(3 * time.Second)
		if len(p.stdout()) != pOut || len(b.stdout()) != bOut {
			t.Fatalf("output without a decision: primary %d -> %d bytes, backup %d -> %d", pOut, len(p.stdout()), bOut, len(b.stdout()))
		}
		for _, r := range []*proc{p, b} {
			select {
			case <-r.done:
				t.Fatalf("a replica exited without a decision (status %d)\n%s", r.status, r.stderr())
			default:
			}
		}
		e.start(0)
		e.start(1)
		pres, bres := p.wait(), b.wait()
		heal()
		t.Logf("survivor once the quorum returned: %s", oneSurvivor(t, pres, bres))
	})
}

// checkCounterTail checks that the counter workload's lines in out are
// numbered without a gap up to last.
func checkCounterTail(t *testing.T, out string, last int) {
	t.Helper()
	re := regexp.MustCompile(`(?m)^counter (\d+) ticks=\d+$`)
	var nums []int
	for _, m := range re.FindAllStringSubmatch(out, -1) {
		var k int
		fmt.Sscan(m[1], &k)
		nums = append(nums, k)
	}
	for i := 1; i < len(nums); i++ {
		if nums[i] != nums[i-1]+1 {
			t.Fatalf("numbering: %v", nums)
		}
	}
	if len(nums) == 0 || nums[len(nums)-1] != last {
		t.Fatalf("numbering: %v", nums)
	}
}
