package test

import (
	"context"
	"fmt"
	"os"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/ftkvm/ftkvm/test/nested"
	"github.com/ftkvm/ftkvm/tools/images/imagelib"
)

// The nested tier: ftkvm inside an L1 Linux whose kvm_amd is a real KVM
// (ring 0 native, single-step at every ring). One L1 boot runs all the
// commands, since an L1 boot under TCG is the expensive part.

const l1FTKVM = "/bin/ftkvm"
const l1TestOS = "/guest/testos.elf"

// nestedShellLib is the shell helpers the nested drills' L1 scripts share:
// up (L1 uptime), alive PID, waitpid PID SECS NAME (bounded wait, prints
// "@@@ rc NAME=status"), show FILE (prints it between "@@@ BEGIN" and
// "@@@ END" lines) and showx FILE (its bytes in hex, between "@@@ HEX" and
// "@@@ END" lines: exact, where the console would translate line ends).
const nestedShellLib = `up() { cut -d' ' -f1 /proc/uptime; }
# alive PID: running (not exited, not a zombie waiting for the shell).
alive() { [ -e /proc/$1/stat ] && [ "$(cut -d' ' -f3 /proc/$1/stat 2>/dev/null)" != Z ]; }
# waitpid PID SECS NAME: wait up to SECS for PID, TERM then KILL it after
# that, and print its exit status.
waitpid() {
	i=0
	while alive $1; do
		if [ $i -ge $2 ]; then
			echo "@@@ killed $3 after $2 s"
			kill $1; sleep 5; kill -9 $1 2>/dev/null
			break
		fi
		sleep 1; i=$((i + 1))
	done
	wait $1
	echo "@@@ rc $3=$?"
}
show() {
	echo "@@@ BEGIN $1"
	cat $1
	echo
	echo "@@@ END $1"
}
showx() {
	echo "@@@ HEX $1"
	od -An -v -tx1 $1
	echo "@@@ END $1"
}
`

// linuxComputeN sizes the Linux guest's CPU-bound awk loop.
const linuxComputeN = 200000

// linuxRun boots the Debian guest under ftkvm in L1 with the lines workload.
func linuxRun(kernel string) string {
	return fmt.Sprintf("%s run --kernel %s --initrd %s --mem 256 --cmdline 'quiet ftkvm.workload=lines ftkvm.lines=10'",
		l1FTKVM, kernel, nested.GuestInitramfs)
}

// nestedTest starts a nested-tier test: skipped with -short or without
// QEMU, and run in parallel with the other nested tests (two at a time,
// each L1 on a host core of its own) after the tests that use this host's
// KVM directly.
func nestedTest(t *testing.T) {
	t.Helper()
	if testing.Short() {
		t.Skip("nested tier boots an L1 under QEMU TCG (minutes): skipped with -short")
	}
	if _, err := nested.QEMUAvailable(); err != nil {
		t.Skipf("nested tier needs QEMU, which could not be installed here: %v", err)
	}
	t.Parallel()
}

// logNestedConsole copies the L1 console to the file FTKVM_NESTED_CONSOLE
// names, if set, as it comes: to watch a long nested run.
func logNestedConsole(t testing.TB, cfg *nested.Config) {
	path := os.Getenv("FTKVM_NESTED_CONSOLE")
	if path == "" {
		return
	}
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	cfg.Log = f
}

// runNested boots an L1 with cfg (its console copied as logNestedConsole
// says) and runs its commands; a failure of the L1 itself ends the test
// with the L1's console.
func runNested(ctx context.Context, t *testing.T, cfg nested.Config) *nested.Result {
	t.Helper()
	logNestedConsole(t, &cfg)
	res, err := nested.Run(ctx, cfg)
	if err != nil {
		if res != nil {
			t.Logf("L1 console:\n%s", res.Console)
		}
		t.Fatal(err)
	}
	return res
}

func testosRun(cmdline string) string {
	return fmt.Sprintf("%s run --kernel %s --mem 32 --cmdline '%s'", l1FTKVM, l1TestOS, cmdline)
}

func TestNestedFTKVM(t *testing.T) {
	nestedTest(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	cmds := []nested.Command{
		{Name: "probe", Cmd: l1FTKVM + " probe"},
		{Name: "linux-bzimage", Cmd: linuxRun(nested.GuestVmlinuz), Timeout: 6 * time.Minute},
		{Name: "linux-pvh", Cmd: linuxRun(nested.GuestVmlinux), Timeout: 6 * time.Minute},
		{Name: "linux-compute", Cmd: fmt.Sprintf("%s run --kernel %s --initrd %s --cmdline 'quiet ftkvm.workload=compute ftkvm.n=%d'",
			l1FTKVM, nested.GuestVmlinux, nested.GuestInitramfs, linuxComputeN), Timeout: 6 * time.Minute},
		// Input is piped from the start: ftkvm holds it until the guest's
		// UART driver enables receive interrupts, so none is lost.
		{Name: "linux-echo", Cmd: fmt.Sprintf("printf 'fault tolerant\nquit\n' | %s run --kernel %s --initrd %s --cmdline 'quiet ftkvm.workload=echo'",
			l1FTKVM, nested.GuestVmlinuz, nested.GuestInitramfs), Timeout: 6 * time.Minute},
		{Name: "testos-counter", Cmd: testosRun("workload=counter lines=5 hz=100")},
		{Name: "testos-interleave", Cmd: testosRun("workload=interleave lines=6 hz=250")},
		{Name: "testos-compute", Cmd: testosRun("workload=compute mib=4 every=2")},
		{Name: "testos-clock", Cmd: testosRun("workload=clock samples=3")},
		{Name: "testos-echo", Cmd: "printf 'nested\\nquit\\n' | " + testosRun("workload=echo")},
	}
	cfg := nested.Config{
		Files:       map[string]string{l1FTKVM: ftkvmBin, l1TestOS: testosELF},
		GuestImages: true,
		Commands:    cmds,
	}
	res := runNested(ctx, t, cfg)
	t.Logf("L1 boot %v, whole run %v", res.BootTime.Round(time.Second), res.Elapsed.Round(time.Second))
	check := func(name string, want ...string) {
		t.Helper()
		c := res.Command(name)
		if c == nil || !c.OK() {
			t.Errorf("%s failed: %v\n%s", name, c.Err(), c.Output)
			return
		}
		for _, w := range want {
			if !strings.Contains(c.Output, w) {
				t.Errorf("%s: output lacks %q:\n%s", name, w, c.Output)
				return
			}
		}
		t.Logf("%s: ok in %v", name, c.Duration.Round(time.Millisecond))
	}
	check("probe")
	for _, k := range []string{"linux-bzimage", "linux-pvh"} {
		check(k, "FTKVM-GUEST-READY", "line 1\n", "line 10\n", "FTKVM-GUEST-DONE status=0")
	}
	check("linux-compute", fmt.Sprintf("compute n=%d result=%d", linuxComputeN, imagelib.ComputeResult(linuxComputeN)), "FTKVM-GUEST-DONE status=0")
	check("linux-echo", "FAULT TOLERANT", "FTKVM-GUEST-DONE status=0")
	check("testos-counter", "counter 5 ticks=", "testos: PASS")
	check("testos-interleave", "A 6", "B 6", "testos: PASS")
	check("testos-compute", "compute mib=4 sum="+computeSums(4, 2)[4], "testos: PASS")
	check("testos-clock", "testos: PASS")
	check("testos-echo", "echo: NESTED", "testos: PASS")
	// In L1, kvm_amd runs ring 0 natively and single-steps at every ring.
	if c := res.Command("probe"); c != nil {
		for _, re := range []string{`ring 0\s+native`, `single-step ring 0\s+yes`, `single-step ring 3\s+yes`} {
			if !regexp.MustCompile(re).MatchString(c.Output) {
				t.Errorf("probe output does not match %q:\n%s", re, c.Output)
			}
		}
	}
}
