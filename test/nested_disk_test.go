package test

import (
	"context"
	"fmt"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ftkvm/ftkvm/test/nested"
	"github.com/ftkvm/ftkvm/tools/images/imagelib"
)

// virtioModules are the Debian kernel's modules for a virtio-mmio disk.
// insmod needs them in dependency order; the guest script retries until
// all are in, so the order here is only a first guess.
var virtioModules = []string{"virtio_ring", "virtio", "virtio_mmio", "virtio_blk"}

// diskGuestInit is the L2 /init of the disk test: it loads the Debian
// kernel's own virtio modules (the unmodified kernel finds the device
// through the ACPI DSDT), reports what it sees, writes a record to
// /dev/vda with fsync, reads it back, tries to write the read-only
// /dev/vdb, and powers off (ACPI S5).
const diskGuestInit = `#!/bin/sh
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec </dev/console >/dev/console 2>&1
echo "FTKVM-GUEST-READY workload=disk"
for pass in 1 2 3 4; do
	for m in ` + "virtio_ring virtio virtio_mmio virtio_blk" + `; do
		grep -q "^$m " /proc/modules || insmod /lib/virtio/$m.ko 2>/dev/null
	done
done
echo "DISK-MODULES $(cut -d' ' -f1 /proc/modules | sort | tr '\n' ' ')"
i=0
while [ ! -b /dev/vdb ] && [ $i -lt 20 ]; do sleep 1; i=$((i + 1)); done
echo "DISK-DEVICES $(ls /sys/bus/platform/drivers/virtio-mmio 2>/dev/null | grep LNRO | tr '\n' ' ')"
echo "DISK-SIZE vda=$(cat /sys/block/vda/size) vdb=$(cat /sys/block/vdb/size) ro=$(cat /sys/block/vdb/ro)"
echo "DISK-SERIAL $(cat /sys/block/vda/serial)"
echo "DISK-CLOCKSOURCES $(cat /sys/devices/system/clocksource/clocksource0/available_clocksource)"
printf 'ftkvm-record-1 flushed' | dd of=/dev/vda bs=512 seek=3 conv=sync,fsync 2>/dev/null
echo "DISK-WRITE rc=$?"
echo 3 > /proc/sys/vm/drop_caches
echo "DISK-READ $(dd if=/dev/vda bs=512 skip=3 count=1 2>/dev/null | head -c 22)"
echo "DISK-RO $(head -c 7 /dev/vdb)"
if printf x | dd of=/dev/vdb bs=512 count=1 conv=sync,fsync 2>/dev/null; then echo "DISK-RO-WRITE accepted"; else echo "DISK-RO-WRITE refused"; fi
grep -E 'virtio|acpi' /proc/interrupts | tr -s ' ' | sed 's/^/DISK-IRQ /'
echo "FTKVM-GUEST-DONE status=0"
sync
poweroff -f
while :; do sleep 1000; done
`

// diskInitramfs builds the L2 initramfs of the disk test: busybox, the
// virtio modules from the pinned kernel package, and diskGuestInit.
func diskInitramfs(ctx context.Context, t *testing.T, im *imagelib.Images) string {
	t.Helper()
	return virtioInitramfs(ctx, t, im, diskGuestInit)
}

// virtioInitramfs builds an L2 initramfs of busybox, the virtio modules
// from the pinned kernel package (at /lib/virtio/NAME.ko) and init.
func virtioInitramfs(ctx context.Context, t *testing.T, im *imagelib.Images, init string) string {
	t.Helper()
	debs, _ := filepath.Glob(filepath.Join(filepath.Dir(im.Vmlinux), "*.deb"))
	if len(debs) != 1 {
		t.Fatalf("the kernel package is not in the image cache next to %s (found %v)", im.Vmlinux, debs)
	}
	dir := t.TempDir()
	var pats []string
	for _, m := range virtioModules {
		pats = append(pats, "*/"+m+".ko")
	}
	sh := fmt.Sprintf("dpkg-deb --fsys-tarfile %s | tar -x -C %s --wildcards %s", debs[0], dir, strings.Join(pats, " "))
	if out, err := exec.CommandContext(ctx, "sh", "-c", sh).CombinedOutput(); err != nil {
		t.Fatalf("extracting the virtio modules: %v\n%s", err, out)
	}
	a, err := imagelib.BaseArchive(ctx, im.Busybox)
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range virtioModules {
		found, _ := filepath.Glob(filepath.Join(dir, "lib", "modules", "*", "kernel", "drivers", "*", m+".ko"))
		if len(found) != 1 {
			t.Fatalf("module %s.ko not in the kernel package (found %v)", m, found)
		}
		if err := a.HostFile("lib/virtio/"+m+".ko", found[0], 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := a.File("init", []byte(init), 0o755); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, "disk.cpio")
	if err := a.WriteFile(out); err != nil {
		t.Fatal(err)
	}
	return out
}

// TestNestedVirtioBlk boots the unmodified Debian kernel under ftkvm in the
// L1, by PVH and as a bzImage, with a read-write and a read-only disk: the
// kernel finds both through ACPI, its virtio_blk reads and writes, the
// record it flushed is in the image file afterwards, the read-only disk
// refuses writes, and poweroff is an ACPI S5.
func TestNestedVirtioBlk(t *testing.T) {
	nestedTest(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	im := linuxImages(t)
	const l1Initrd = "/guest/disk.cpio"
	run := func(kernel string) string {
		return fmt.Sprintf(`dd if=/dev/zero of=/tmp/disk.img bs=1M count=8 2>/dev/null
printf ROIMAGE | dd of=/tmp/ro.img bs=512 count=1 conv=sync 2>/dev/null
%s --log-level info run --kernel %s --initrd %s --mem 256 --cmdline quiet --disk /tmp/disk.img --disk /tmp/ro.img,ro
echo "@@@ ftkvm rc=$?"
echo "IMAGE $(dd if=/tmp/disk.img bs=512 skip=3 count=1 2>/dev/null | head -c 22)"
echo "RO-IMAGE $(head -c 7 /tmp/ro.img)"`, l1FTKVM, kernel, l1Initrd)
	}
	cfg := nested.Config{
		Files:       map[string]string{l1FTKVM: ftkvmBin, l1Initrd: diskInitramfs(ctx, t, im)},
		GuestImages: true,
		Commands: []nested.Command{
			{Name: "disk-pvh", Cmd: run(nested.GuestVmlinux), Timeout: 6 * time.Minute},
			{Name: "disk-bzimage", Cmd: run(nested.GuestVmlinuz), Timeout: 6 * time.Minute},
		},
	}
	res := runNested(ctx, t, cfg)
	t.Logf("L1 boot %v, whole run %v", res.BootTime.Round(time.Second), res.Elapsed.Round(time.Second))
	for _, name := range []string{"disk-pvh", "disk-bzimage"} {
		c := res.Command(name)
		if c == nil || !c.OK() {
			t.Errorf("%s failed: %v\n%s", name, c.Err(), c.Output)
			continue
		}
		t.Logf("%s (%v):\n%s", name, c.Duration.Round(time.Millisecond), c.Output)
		for _, want := range []string{
			"DISK-DEVICES LNRO0005:00 LNRO0005:01",
			"DISK-SIZE vda=16384 vdb=1 ro=1",
			"DISK-SERIAL ftkvm-disk0",
			"acpi_pm",
			"DISK-WRITE rc=0",
			"DISK-READ ftkvm-record-1 flushed",
			"DISK-RO ROIMAGE",
			"DISK-RO-WRITE refused",
			"FTKVM-GUEST-DONE status=0",
			"guest stopped: guest powered off (ACPI S5)",
			"@@@ ftkvm rc=0",
			"IMAGE ftkvm-record-1 flushed",
			"RO-IMAGE ROIMAGE",
		} {
			if !strings.Contains(c.Output, want) {
				t.Errorf("%s: output lacks %q", name, want)
			}
		}
	}
}
