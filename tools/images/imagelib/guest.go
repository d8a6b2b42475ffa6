package imagelib

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"path/filepath"
	"regexp"
)

// Guest console markers. Tests wait for these; keep them in sync with any
// test that greps for them.
const (
	GuestReadyMarker = "FTKVM-GUEST-READY"
	GuestDoneMarker  = "FTKVM-GUEST-DONE" // followed by " status=<n>"
)

// ClockMarkRE matches the guest's clock marks (GuestInit): the mark's
// name, the RTC's seconds and the uptime.
var ClockMarkRE = regexp.MustCompile(`FTKVM-CLOCK (start|end) rtc=(\d+) uptime=([0-9.]+)`)

// GuestInit is the L2 guest's /init. It is plain busybox sh so that it
// runs the same under any VMM; workloads are chosen on the kernel command
// line (read from /proc/cmdline: dotted parameters are not passed to init's
// environment) so one initramfs serves every test:
//
//	ftkvm.workload=lines   ftkvm.lines=N (20)  ftkvm.spin=K (2000)
//	    "line <i>" for i=1..N, separated by a K-iteration busy loop
//	    (sleep-free: it needs no timer and keeps the vCPU busy, which is
//	    what record/replay and failover tests want to interrupt)
//	ftkvm.workload=compute ftkvm.n=N (100000)
//	    "compute n=N result=R" where R is x := (x*31 + i) % 1000003 over
//	    i=1..N from x=0 (ComputeResult gives the expected value)
//	ftkvm.workload=echo
//	    echoes console lines uppercased until a line "quit"
//
// then "FTKVM-GUEST-DONE status=<rc>" and poweroff -f. Without a workload
// it starts an interactive shell on the console. Before and after the
// workload it prints "FTKVM-CLOCK <start|end> rtc=<s> uptime=<s>": the RTC's
// seconds (/sys/class/rtc/rtc0/since_epoch, read just after the second
// changed, or "none") and /proc/uptime then, so that a test can compare the
// guest's clock with its RTC over the workload (ClockMarkRE).
const GuestInit = `#!/bin/sh
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
# The kernel opened the console before devtmpfs existed only if the
# initramfs carried /dev/console; reopen it to be sure of our stdio.
exec </dev/console >/dev/console 2>&1

workload=
lines=20
spin=2000
n=100000
for arg in $(cat /proc/cmdline); do
	case "$arg" in
	ftkvm.workload=*) workload="${arg#*=}" ;;
	ftkvm.lines=*) lines="${arg#*=}" ;;
	ftkvm.spin=*) spin="${arg#*=}" ;;
	ftkvm.n=*) n="${arg#*=}" ;;
	esac
done

echo "FTKVM-GUEST-READY workload=${workload:-shell}"

# clock_mark NAME: the RTC's seconds just after they changed, and the
# uptime then (at the RTC's one-second resolution, the edge is what makes
# the two comparable).
clock_mark() {
	r=/sys/class/rtc/rtc0/since_epoch
	if [ -r $r ]; then
		a=$(cat $r)
		b=$a
		while [ "$b" = "$a" ]; do b=$(cat $r); done
		read up _ </proc/uptime
		echo "FTKVM-CLOCK $1 rtc=$b uptime=$up"
	else
		echo "FTKVM-CLOCK $1 rtc=none"
	fi
}

run_lines() {
	i=1
	while [ "$i" -le "$lines" ]; do
		echo "line $i"
		j=0
		while [ "$j" -lt "$spin" ]; do j=$((j + 1)); done
		i=$((i + 1))
	done
}

run_compute() {
	awk -v n="$n" '` + ComputeAwk + `'
}

run_echo() {
	# Without tty echo the uppercased line is the only copy printed.
	stty -echo 2>/dev/null
	while IFS= read -r line; do
		[ "$line" = quit ] && return 0
		echo "$line" | tr a-z A-Z
	done
	return 1 # console closed before "quit"
}

[ -n "$workload" ] && clock_mark start
case "$workload" in
lines) run_lines; status=$? ;;
compute) run_compute; status=$? ;;
echo) run_echo; status=$? ;;
"")
	echo "no ftkvm.workload: starting a shell"
	exec setsid cttyhack sh
	;;
*) echo "unknown ftkvm.workload=$workload"; status=2 ;;
esac

clock_mark end
echo "FTKVM-GUEST-DONE status=$status"
sync
poweroff -f
# poweroff only returns if the machine offers no way to power off.
while :; do sleep 1000; done
`

// ComputeAwk is the compute workload's awk program (given n with -v). The
// values stay below 2^53, so awk's doubles compute it exactly.
const ComputeAwk = `BEGIN { x = 0; for (i = 1; i <= n; i++) x = (x * 31 + i) % 1000003; printf "compute n=%d result=%d\n", n, x }`

// ComputeResult is the R that the compute workload prints for n.
func ComputeResult(n int) int {
	x := 0
	for i := 1; i <= n; i++ {
		x = (x*31 + i) % 1000003
	}
	return x
}

// guestStepVersion is bumped when the guest archive layout changes in a
// way the inputs below do not capture.
const guestStepVersion = "1"

// buildGuestInitramfs writes the L2 initramfs unless an up-to-date one
// (same busybox, same /init, same layout) is already in the cache.
func buildGuestInitramfs(ctx context.Context, out, busybox string, logw io.Writer) error {
	bb, err := sumFile(busybox)
	if err != nil {
		return fmt.Errorf("busybox-static is needed (apt-get install busybox-static): %w", err)
	}
	initSum := sha256.Sum256([]byte(GuestInit))
	inputs := map[string]string{
		"busybox": bb.SHA256,
		"init":    hex.EncodeToString(initSum[:]),
		"step":    guestStepVersion,
	}
	dir := filepath.Dir(out)
	manPath := out + ".json"
	m, err := readManifest(manPath)
	if err != nil {
		return err
	}
	if m.valid(dir, inputs) {
		return nil
	}
	fmt.Fprintf(logw, "images: building %s\n", out)
	a := NewArchive()
	if err := guestArchive(ctx, a, busybox); err != nil {
		return fmt.Errorf("building guest initramfs: %w", err)
	}
	if err := a.WriteFile(out); err != nil {
		return fmt.Errorf("building guest initramfs: %w", err)
	}
	return writeManifest(manPath, dir, inputs, []string{filepath.Base(out)})
}

// BaseArchive returns an archive with the skeleton every initramfs here
// needs: busybox and its applets, the mount points, and /dev/console so
// the kernel can give /init a console even before devtmpfs is mounted.
func BaseArchive(ctx context.Context, busybox string) (*Archive, error) {
	a := NewArchive()
	if err := a.Busybox(ctx, busybox); err != nil {
		return nil, err
	}
	for _, d := range []string{"dev", "proc", "sys", "tmp", "root", "etc"} {
		if err := a.Dir(d, 0o755); err != nil {
			return nil, err
		}
	}
	if err := a.CharDev("dev/console", 0o600, 5, 1); err != nil {
		return nil, err
	}
	return a, nil
}

func guestArchive(ctx context.Context, a *Archive, busybox string) error {
	base, err := BaseArchive(ctx, busybox)
	if err != nil {
		return err
	}
	*a = *base
	return a.File("init", []byte(GuestInit), 0o755)
}

// HostBusybox is where Debian's busybox-static puts its binary.
const HostBusybox = "/bin/busybox"
