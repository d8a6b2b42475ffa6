package test

import (
	"context"
	"fmt"
	"regexp"
	"testing"
	"time"

	"github.com/ftkvm/ftkvm/test/nested"
)

// BenchmarkNestedExitProfile boots the Debian kernel (bzImage) and busybox
// initramfs under `ftkvm run --exit-stats` in the nested tier, with the
// benchmark's command line (BenchmarkNestedBoot), and logs the exit
// profile: which exits a Linux boot makes and where its time goes
// (docs/PROFILE.md). One L1 boot; minutes. Run it with:
//
//	go test -run '^$' -bench NestedExitProfile -benchtime 1x -v ./test/
func BenchmarkNestedExitProfile(b *testing.B) {
	if _, err := nested.QEMUAvailable(); err != nil {
		b.Skipf("nested tier needs QEMU: %v", err)
	}
	const args = "quiet ftkvm.workload=lines ftkvm.lines=1"
	cmd := fmt.Sprintf(`up() { cut -d' ' -f1 /proc/uptime; }; s=$(up)
%s run --kernel %s --initrd %s --mem 256 --cmdline '%s' --exit-stats 2>&1
awk -v a="$s" -v b="$(up)" 'BEGIN{printf "@@END %%.2f\n", b-a}'`, l1FTKVM, nested.GuestVmlinuz, nested.GuestInitramfs, args)
	for range b.N {
		res, err := nested.Run(context.Background(), nested.Config{
			Files:       map[string]string{l1FTKVM: ftkvmBin},
			GuestImages: true,
			Commands:    []nested.Command{{Name: "ftkvm-bzimage-profile", Cmd: cmd, Timeout: 8 * time.Minute}},
		})
		if err != nil {
			b.Fatal(err)
		}
		r := res.Command("ftkvm-bzimage-profile")
		if r == nil || !r.OK() {
			b.Fatalf("the boot failed:\n%s", res.Console)
		}
		b.Logf("L1 boot %v; output:\n%s", res.BootTime, r.Output)
		if !regexp.MustCompile(`(?m)^exit profile: .* exits`).MatchString(r.Output) ||
			!regexp.MustCompile(`(?m)^  IO +\d+`).MatchString(r.Output) {
			b.Fatalf("no exit profile with port exits in the output")
		}
		if m := regexp.MustCompile(`@@END ([0-9.]+)`).FindStringSubmatch(r.Output); m != nil {
			var s float64
			fmt.Sscan(m[1], &s)
			b.ReportMetric(s, "boot-s")
		}
	}
}
