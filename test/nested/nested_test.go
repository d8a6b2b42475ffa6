package nested_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ftkvm/ftkvm/test/nested"
	"github.com/ftkvm/ftkvm/tools/images/imagelib"
)

// l2QEMU is how the tier checks the L1's KVM end to end before ftkvm can
// boot Linux: QEMU in the L1 boots the guest images on /dev/kvm. The guest
// powers off when its workload is done, so QEMU exits by itself. "quiet"
// halves the boot time: every L2 console byte is a PIO exit, which is
// costly at this depth of emulation.
func l2QEMU(machine, kernel string) string {
	return fmt.Sprintf("qemu-system-x86_64 -accel kvm -M %s -cpu host -m 256 -smp 1 "+
		"-nodefaults -no-user-config -display none -serial stdio -no-reboot "+
		"-kernel %s -initrd %s "+
		"-append 'console=ttyS0 quiet ftkvm.workload=lines ftkvm.lines=5'", machine, kernel, nested.GuestInitramfs)
}

// lineLogger streams the L1 console into the test log, a line at a time
// (the console arrives in arbitrary chunks), when -v is given.
type lineLogger struct {
	t       *testing.T
	mu      sync.Mutex
	partial []byte
}

func (w *lineLogger) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.partial = append(w.partial, p...)
	for {
		i := bytes.IndexByte(w.partial, '\n')
		if i < 0 {
			return len(p), nil
		}
		w.t.Log("L1| " + strings.TrimRight(string(w.partial[:i]), "\r"))
		w.partial = w.partial[i+1:]
	}
}

func TestNestedTier(t *testing.T) {
	if testing.Short() {
		t.Skip("nested tier boots an L1 under QEMU TCG (minutes): skipped with -short")
	}
	if _, err := nested.QEMUAvailable(); err != nil {
		t.Skipf("nested tier needs QEMU: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()

	t0 := time.Now()
	im, err := imagelib.Build(ctx, imagelib.Options{Log: os.Stderr})
	if errors.Is(err, imagelib.ErrUnavailable) {
		t.Skipf("nested tier needs the pinned kernel package: %v", err)
	}
	if err != nil {
		t.Fatalf("building images: %v", err)
	}
	t.Logf("images ready in %v (cache %s)", time.Since(t0).Round(time.Millisecond), im.Cache)

	cfg := nested.Config{
		Images:      im,
		GuestImages: true,
		HostQEMU:    true,
		Commands: []nested.Command{
			{Name: "svm", Cmd: "cat /proc/cpuinfo | grep -c svm"},
			{Name: "kvm-dev", Cmd: "ls -l /dev/kvm"},
			{Name: "l2-microvm-pvh", Cmd: l2QEMU("microvm", nested.GuestVmlinux), Timeout: 3 * time.Minute},
			{Name: "l2-pc-bzimage", Cmd: l2QEMU("pc", nested.GuestVmlinuz), Timeout: 3 * time.Minute},
		},
		CommandTimeout: time.Minute,
	}
	if testing.Verbose() {
		cfg.Log = &lineLogger{t: t}
	}
	res, err := nested.Run(ctx, cfg)
	if res != nil {
		t.Logf("L1: initramfs %d MiB, boot to ready %v, total %v",
			res.InitramfsBytes>>20, res.BootTime.Round(time.Millisecond), res.Elapsed.Round(time.Millisecond))
		for _, c := range res.Commands {
			t.Logf("command %-15s rc=%d finished=%v in %v", c.Name, c.RC, c.Finished, c.Duration.Round(time.Millisecond))
		}
	}
	if err != nil {
		t.Fatalf("nested run: %v", err)
	}
	if !res.L1Ready {
		t.Fatalf("L1 never reported a usable /dev/kvm")
	}
	for _, c := range res.Commands {
		if err := c.Err(); err != nil {
			t.Errorf("%v; output:\n%s", err, c.Output)
		}
	}

	if c := res.Command("svm"); c != nil && c.OK() {
		if n := strings.TrimSpace(c.Output); n == "0" || n == "" {
			t.Errorf("L1 CPU has no svm flag (count %q)", n)
		}
	}
	if c := res.Command("kvm-dev"); c != nil && c.OK() && !strings.HasPrefix(c.Output, "c") {
		t.Errorf("/dev/kvm is not a character device: %q", c.Output)
	}
	for _, name := range []string{"l2-microvm-pvh", "l2-pc-bzimage"} {
		c := res.Command(name)
		if c == nil || !c.OK() {
			continue // reported above
		}
		for _, want := range []string{imagelib.GuestReadyMarker, "line 5\n", imagelib.GuestDoneMarker + " status=0"} {
			if !strings.Contains(c.Output, want) {
				t.Errorf("%s: guest output lacks %q; output:\n%s", name, want, c.Output)
			}
		}
	}
}
