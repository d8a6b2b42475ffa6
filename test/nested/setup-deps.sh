#!/bin/sh
# setup-deps.sh installs the Debian packages that the nested test tier and
# tools/images need: qemu-system-x86 (the L1 emulator, and the QEMU that
# L2 comparisons run inside the L1), busybox-static (the userland of both
# initramfs images), cpio (to inspect images by hand) and xz-utils (the
# bzImage payload). It also makes sure apt knows the pinned kernel package
# that tools/images downloads. Idempotent and quiet: apt is only called
# when something is missing, so CI can run it on every build.
set -eu

pkgs="qemu-system-x86 busybox-static cpio xz-utils"  # qemu-system-x86: see qemu_min
# Keep in sync with KernelPackage in tools/images/imagelib/kernel.go.
kernel_pkg="linux-image-6.1.0-56-amd64"

if [ "$(id -u)" -ne 0 ]; then
	SUDO=sudo
else
	SUDO=
fi
export DEBIAN_FRONTEND=noninteractive

log=$(mktemp)
trap 'rm -f "$log"' EXIT
# apt is noisy (debconf, unsandboxed-download warnings); show its output
# only when it fails.
quiet() {
	if ! "$@" >"$log" 2>&1; then
		cat "$log" >&2
		echo "setup-deps: failed: $*" >&2
		exit 1
	fi
}

# The nested tier needs QEMU 9.1 or later: QEMU before 9.1 loads an L2
# guest's DR7 at VMRUN without arming its breakpoints, so the instruction
# breakpoints the step clock sets in the L1's KVM never fire (measured with
# Debian 12's QEMU 7.2; fixed upstream by "target/i386: disable/enable
# breakpoints on vmentry/vmexit"). Debian 12 gets a newer QEMU from
# bookworm-backports.
qemu_min=9.1
qemu_ok() {
	v=$(dpkg-query -W -f='${Version}' qemu-system-x86 2>/dev/null) || return 1
	[ -n "$v" ] && dpkg --compare-versions "${v#*:}" ge "$qemu_min"
}
backports=""
if . /etc/os-release 2>/dev/null && [ "${VERSION_CODENAME:-}" = bookworm ]; then
	backports=bookworm-backports
fi
need_qemu=no
qemu_ok || need_qemu=yes
if [ "$need_qemu" = yes ] && [ -n "$backports" ] && ! grep -rqs "^[^#]*$backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
	echo "deb http://deb.debian.org/debian $backports main" | $SUDO tee /etc/apt/sources.list.d/ftkvm-backports.list >/dev/null
fi

missing=""
for p in $pkgs; do
	if [ "$p" = qemu-system-x86 ] && [ "$need_qemu" = yes ]; then
		continue # installed below, from backports where needed
	fi
	if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
		missing="$missing $p"
	fi
done

has_kernel_candidate() {
	apt-cache policy "$kernel_pkg" 2>/dev/null | grep -q 'Candidate: [0-9]'
}

updated=no
if [ -n "$missing" ] || [ "$need_qemu" = yes ] || ! has_kernel_candidate; then
	# Package lists may be absent or stale on a fresh machine.
	quiet $SUDO apt-get update -qq
	updated=yes
fi
if [ -n "$missing" ]; then
	# shellcheck disable=SC2086 # word splitting of $missing is intended
	quiet $SUDO apt-get install -y -qq --no-install-recommends $missing
	echo "setup-deps: installed$missing"
fi
if [ "$need_qemu" = yes ]; then
	if [ -n "$backports" ]; then
		quiet $SUDO apt-get install -y -qq --no-install-recommends -t "$backports" qemu-system-x86
	else
		quiet $SUDO apt-get install -y -qq --no-install-recommends qemu-system-x86
	fi
	if ! qemu_ok; then
		echo "setup-deps: qemu-system-x86 $(dpkg-query -W -f='${Version}' qemu-system-x86 2>/dev/null) is older than $qemu_min: the nested tier's step-clock tests will find breakpoints broken" >&2
	else
		echo "setup-deps: installed qemu-system-x86 $(dpkg-query -W -f='${Version}' qemu-system-x86)"
	fi
fi
if [ "$updated" = yes ] && ! has_kernel_candidate; then
	# Not fatal here: tools/images reports the pin clearly, and the
	# nested tests skip, naming it.
	echo "setup-deps: warning: apt offers no $kernel_pkg; the nested tier will be skipped" >&2
fi
exit 0
