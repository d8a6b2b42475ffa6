package exp

import (
	"context"
	"os"
	"testing"
	"time"

	"github.com/ftkvm/ftkvm/test/nested"
	"github.com/ftkvm/ftkvm/tools/images/imagelib"
)

func TestExp(t *testing.T) {
	im, err := imagelib.Build(context.Background(), imagelib.Options{})
	if err != nil { t.Fatal(err) }
	f, _ := os.Create("/tmp/exp/console3.txt")
	defer f.Close()
	q := func(m, k, extra string) string {
		return "qemu-system-x86_64 -accel kvm -M " + m + " -cpu host -m 256 -smp 1 -nodefaults -no-user-config -display none -serial stdio -no-reboot -kernel " + k + " -initrd /guest/initramfs-guest.cpio -append 'console=ttyS0 quiet panic=-1 " + extra + "'"
	}
	cfg := nested.Config{Images: im, HostQEMU: true, Log: f,
		Files: map[string]string{"/guest/vmlinux": im.Vmlinux, "/guest/vmlinuz": im.Vmlinuz, "/guest/initramfs-guest.cpio": im.GuestInitramfs},
		Commands: []nested.Command{
			{Name: "version", Cmd: "time qemu-system-x86_64 --version"},
			{Name: "version2", Cmd: "time qemu-system-x86_64 --version"},
			{Name: "nokernel", Cmd: "time qemu-system-x86_64 -accel kvm -M pc -nodefaults -display none -kernel /nonexistent"},
			{Name: "microvm-false", Cmd: "time " + q("microvm,rtc=off", "/guest/vmlinux", "rdinit=/bin/false")},
			{Name: "pc-false", Cmd: "time " + q("pc", "/guest/vmlinuz", "rdinit=/bin/false")},
			{Name: "pc-false-loud", Cmd: "time " + q("pc", "/guest/vmlinuz", "rdinit=/bin/false loglevel=7")},
			{Name: "pc-false-noxsave", Cmd: "time " + q("pc", "/guest/vmlinuz", "rdinit=/bin/false")+" -cpu host,-xsave"},
		}}
	res, err := nested.Run(context.Background(), cfg)
	if err != nil { t.Fatal(err) }
	t.Logf("boot %v total %v", res.BootTime, res.Elapsed)
	for _, c := range res.Commands { t.Logf("%s rc=%d %v", c.Name, c.RC, c.Duration.Round(time.Millisecond)) }
}
