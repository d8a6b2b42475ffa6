package test

import (
	"context"
	"fmt"
	"regexp"
	"strconv"
	"testing"
	"time"

	"github.com/ftkvm/ftkvm/test/nested"
)

// bootToMarker wraps a guest boot command so that L1 prints how many
// seconds passed from its start to the guest's userspace marker
// (FTKVM-GUEST-READY) and to the end of the run (power-off).
func bootToMarker(cmd string) string {
	// busybox date has no %N; /proc/uptime has centiseconds.
	return fmt.Sprintf(`up() { cut -d' ' -f1 /proc/uptime; }; s=$(up); %s 2>&1 | while IFS= read -r l; do
case "$l" in *FTKVM-GUEST-READY*) awk -v a="$s" -v b="$(up)" 'BEGIN{printf "@@MARKER %%.2f\n", b-a}';; esac; done
awk -v a="$s" -v b="$(up)" 'BEGIN{printf "@@END %%.2f\n", b-a}'`, cmd)
}

// BenchmarkNestedBoot compares ftkvm's boot-to-marker time for the Debian
// kernel and busybox initramfs with QEMU's (-accel kvm, -M pc with the
// bzImage, -M microvm with the PVH vmlinux), in one L1, same kernel,
// initramfs and command line. Run it with:
//
//	go test -run '^$' -bench NestedBoot -benchtime 1x ./test/
func BenchmarkNestedBoot(b *testing.B) {
	if _, err := nested.QEMUAvailable(); err != nil {
		b.Skipf("nested tier needs QEMU: %v", err)
	}
	const args = "quiet ftkvm.workload=lines ftkvm.lines=1"
	qemu := func(machine, kernel string) string {
		return fmt.Sprintf("qemu-system-x86_64 -accel kvm -M %s -cpu host -m 256 -smp 1 -nodefaults -no-user-config "+
			"-display none -serial stdio -no-reboot -kernel %s -initrd %s -append 'console=ttyS0 lpj=250000 %s'",
			machine, kernel, nested.GuestInitramfs, args)
	}
	ftkvm := func(kernel string) string {
		return fmt.Sprintf("%s run --kernel %s --initrd %s --mem 256 --cmdline '%s'", l1FTKVM, kernel, nested.GuestInitramfs, args)
	}
	cmds := []nested.Command{
		{Name: "ftkvm-bzimage", Cmd: bootToMarker(ftkvm(nested.GuestVmlinuz)), Timeout: 5 * time.Minute},
		{Name: "ftkvm-pvh", Cmd: bootToMarker(ftkvm(nested.GuestVmlinux)), Timeout: 5 * time.Minute},
		{Name: "qemu-pc", Cmd: bootToMarker(qemu("pc", nested.GuestVmlinuz)), Timeout: 5 * time.Minute},
		{Name: "qemu-microvm", Cmd: bootToMarker(qemu("microvm", nested.GuestVmlinux)), Timeout: 5 * time.Minute},
	}
	marker := regexp.MustCompile(`@@MARKER ([0-9.]+)`)
	for range b.N {
		res, err := nested.Run(context.Background(), nested.Config{
			Files:       map[string]string{l1FTKVM: ftkvmBin},
			GuestImages: true,
			HostQEMU:    true,
			Commands:    cmds,
		})
		if err != nil {
			b.Fatal(err)
		}
		secs := map[string]float64{}
		for _, c := range cmds {
			r := res.Command(c.Name)
			m := marker.FindStringSubmatch(r.Output)
			if r == nil || !r.OK() || m == nil {
				b.Fatalf("%s: no marker:\n%s", c.Name, r.Output)
			}
			secs[c.Name], _ = strconv.ParseFloat(m[1], 64)
			b.ReportMetric(secs[c.Name], c.Name+"-s")
		}
		b.ReportMetric(secs["ftkvm-bzimage"]/secs["qemu-pc"], "ftkvm-bz/qemu-pc")
		b.ReportMetric(secs["ftkvm-pvh"]/secs["qemu-microvm"], "ftkvm-pvh/qemu-microvm")
	}
}
