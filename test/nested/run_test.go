package nested_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/u-root/u-root/pkg/cpio"

	"github.com/ftkvm/ftkvm/test/nested"
	"github.com/ftkvm/ftkvm/tools/images/imagelib"
)

// fakeImages stands in for the kernel outputs: Run only copies them into
// the L1 initramfs, so any small files do.
func fakeImages(t *testing.T) *imagelib.Images {
	t.Helper()
	if _, err := os.Stat(imagelib.HostBusybox); err != nil {
		t.Skipf("needs busybox-static (test/nested/setup-deps.sh): %v", err)
	}
	dir := t.TempDir()
	im := imagelib.Layout(dir)
	for _, p := range append([]string{im.Vmlinuz, im.Vmlinux, im.GuestInitramfs}, im.Modules...) {
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(filepath.Base(p)), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return im
}

// fakeQEMU writes a script that plays the part of qemu-system-x86_64: it
// saves the initrd it was given, prints console, then sleeps.
func fakeQEMU(t *testing.T, console string, sleep int) (qemu, initrdCopy string) {
	t.Helper()
	dir := t.TempDir()
	qemu = filepath.Join(dir, "qemu")
	initrdCopy = filepath.Join(dir, "initrd.cpio")
	script := `#!/bin/sh
while [ $# -gt 0 ]; do
	[ "$1" = -initrd ] && cp "$2" ` + initrdCopy + `
	shift
done
printf '%s' '` + strings.ReplaceAll(console, "'", `'\''`) + `'
sleep ` + strconv.Itoa(sleep) + `
`
	if err := os.WriteFile(qemu, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	return qemu, initrdCopy
}

func TestRunPlumbing(t *testing.T) {
	im := fakeImages(t)
	host := filepath.Join(t.TempDir(), "tool")
	if err := os.WriteFile(host, []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	console := "@@FTKVM-L1-BOOTED\r\n@@FTKVM-L1-READY\r\n" +
		"@@FTKVM-CMD-BEGIN a\r\nhello\r\n@@FTKVM-CMD-END a rc=0\r\n" +
		"@@FTKVM-CMD-BEGIN b\r\nbad\r\n@@FTKVM-CMD-END b rc=3\r\n" +
		"@@FTKVM-L1-DONE\r\n"
	qemu, initrd := fakeQEMU(t, console, 0)
	res, err := nested.Run(context.Background(), nested.Config{
		Images:      im,
		QEMU:        qemu,
		Files:       map[string]string{"/bin/tool": host},
		GuestImages: true,
		Commands:    []nested.Command{{Name: "a", Cmd: "echo hello"}, {Name: "b", Cmd: "echo bad; exit 3"}},
	})
	if err != nil {
		t.Fatalf("Run: %v", err)
	}
	if !res.L1Ready || len(res.Commands) != 2 {
		t.Fatalf("result %+v", res)
	}
	if a := res.Command("a"); !a.OK() || a.Output != "hello\n" {
		t.Errorf("a = %+v", a)
	}
	if b := res.Command("b"); b.OK() || b.RC != 3 || b.Err() == nil {
		t.Errorf("b = %+v", b)
	}

	// The initramfs must hold what the L1 /init relies on.
	f, err := os.Open(initrd)
	if err != nil {
		t.Fatalf("fake qemu got no initrd: %v", err)
	}
	defer f.Close()
	recs, err := cpio.ReadAllRecords(cpio.Newc.Reader(f))
	if err != nil {
		t.Fatalf("reading L1 initramfs: %v", err)
	}
	have := map[string]cpio.Record{}
	for _, r := range recs {
		have[r.Name] = r
	}
	for _, want := range []string{"init", "bin/busybox", "bin/sh", "sbin/insmod", "dev/console",
		"ftkvm/modules/irqbypass.ko", "ftkvm/modules/kvm.ko", "ftkvm/modules/ccp.ko", "ftkvm/modules/kvm-amd.ko",
		"ftkvm/cmd/000.sh", "ftkvm/cmd/001.sh", "bin/tool",
		"guest/vmlinux", "guest/vmlinuz", "guest/initramfs-guest.cpio"} {
		if _, ok := have[want]; !ok {
			t.Errorf("L1 initramfs lacks %s", want)
		}
	}
	initScript := make([]byte, have["init"].FileSize)
	have["init"].ReadAt(initScript, 0)
	for _, want := range []string{"insmod /ftkvm/modules/$m.ko", "for m in irqbypass kvm ccp kvm-amd;",
		"run a 300 /ftkvm/cmd/000.sh", "run b 300 /ftkvm/cmd/001.sh", "poweroff -f"} {
		if !strings.Contains(string(initScript), want) {
			t.Errorf("L1 /init lacks %q:\n%s", want, initScript)
		}
	}
}

func TestRunTimeoutAndTruncation(t *testing.T) {
	im := fakeImages(t)
	console := "@@FTKVM-L1-BOOTED\r\n@@FTKVM-L1-READY\r\n" +
		"@@FTKVM-CMD-BEGIN a\r\nok\r\n@@FTKVM-CMD-END a rc=0\r\n" +
		"@@FTKVM-CMD-BEGIN b\r\npartial output\r\n"
	qemu, _ := fakeQEMU(t, console, 9)
	start := time.Now()
	res, err := nested.Run(context.Background(), nested.Config{
		Images:   im,
		QEMU:     qemu,
		Timeout:  time.Second,
		Commands: []nested.Command{{Name: "a", Cmd: "true"}, {Name: "b", Cmd: "sleep 100"}, {Name: "c", Cmd: "true"}},
	})
	if !errors.Is(err, nested.ErrTimeout) || !strings.Contains(err.Error(), "during command b") {
		t.Fatalf("Run error = %v, want ErrTimeout during command b", err)
	}
	if d := time.Since(start); d > 8*time.Second {
		t.Errorf("Run took %v: the fake qemu was not killed on timeout", d)
	}
	if !res.TimedOut || !res.Command("a").OK() {
		t.Errorf("result %+v", res)
	}
	b := res.Command("b")
	if !b.Started || b.Finished || b.RC != -1 || b.Output != "partial output\n" || b.Err() == nil {
		t.Errorf("b = %+v", b)
	}
	if c := res.Command("c"); c.Started || c.Err() == nil {
		t.Errorf("c = %+v", c)
	}
}

func TestRunSetupError(t *testing.T) {
	im := fakeImages(t)
	qemu, _ := fakeQEMU(t, "@@FTKVM-L1-BOOTED\r\n@@FTKVM-L1-ERROR insmod kvm-amd.ko: No such device\r\n", 0)
	res, err := nested.Run(context.Background(), nested.Config{Images: im, QEMU: qemu, Commands: []nested.Command{{Name: "a", Cmd: "true"}}})
	if err == nil || !strings.Contains(err.Error(), "insmod kvm-amd.ko: No such device") || res.L1Ready {
		t.Fatalf("Run = %+v, %v; want the setup error", res, err)
	}
}

func TestConfigCheck(t *testing.T) {
	for _, cfg := range []nested.Config{
		{Commands: []nested.Command{{Name: "has space", Cmd: "true"}}},
		{Commands: []nested.Command{{Name: "a", Cmd: "true"}, {Name: "a", Cmd: "true"}}},
		{Files: map[string]string{"relative": "/bin/true"}},
	} {
		if _, err := nested.Run(context.Background(), cfg); err == nil {
			t.Errorf("Run(%+v) accepted a bad config", cfg)
		}
	}
}
