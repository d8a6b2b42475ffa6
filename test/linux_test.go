package test

import (
	"bufio"
	"context"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ftkvm/ftkvm/tools/images/imagelib"
)

// linuxImages builds (or finds in the cache) the pinned Debian kernel and
// the busybox initramfs.
func linuxImages(t testing.TB) *imagelib.Images {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	im, err := imagelib.Build(ctx, imagelib.Options{})
	if err != nil {
		t.Fatalf("guest images: %v", err)
	}
	return im
}

// On this host's KVM guest ring 0 is emulated (docs/KVM-HOSTS.md), so a Linux
// kernel cannot get far. The PVH boot of the Debian vmlinux must still reach
// the kernel's version banner and its first console lines, which proves the
// PVH entry, start_info, the memory map, the command line defaults and the
// UART. The test stops the guest there with SIGTERM.
func TestLinuxPVHEarlyBootHere(t *testing.T) {
	requireKVM(t)
	im := linuxImages(t)
	cmd := exec.Command(ftkvmBin, "run", "--kernel", im.Vmlinux, "--initrd", im.GuestInitramfs,
		"--mem", "256", "--cmdline", "earlyprintk=ttyS0")
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	// Hang guard only: the lines below take a few seconds here.
	guard := time.AfterFunc(3*time.Minute, func() { cmd.Process.Kill() })
	defer guard.Stop()

	want := []string{
		"Linux version 6.1.0-56-amd64",
		"Command line: console=ttyS0 lpj=250000 randomize_kstack_offset=off earlyprintk=ttyS0",
		"BIOS-e820: [mem 0x0000000000100000-0x000000000fffffff] usable",
		"RAMDISK: [mem ",
	}
	var seen []string
	sc := bufio.NewScanner(stdout)
	for len(want) > 0 && sc.Scan() {
		line := sc.Text()
		seen = append(seen, line)
		if strings.Contains(line, want[0]) {
			want = want[1:]
		}
	}
	cmd.Process.Signal(syscall.SIGTERM)
	go func() {
		for sc.Scan() {
		}
	}()
	err = cmd.Wait()
	if len(want) > 0 {
		t.Fatalf("never saw %q; console:\n%s\nstderr:\n%s", want[0], strings.Join(seen, "\n"), stderr.String())
	}
	// SIGTERM stops the guest cleanly: ftkvm reports a quit (130).
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 130 {
		t.Fatalf("after SIGTERM: %v, want exit status 130; stderr:\n%s", err, stderr.String())
	}
}
