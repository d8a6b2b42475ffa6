#!/bin/sh
# setup-deps.sh installs the Debian packages the nested test tier and
# tools/images need: QEMU (the L1 emulator and the L2 comparison VMM),
# busybox-static (the userland of both initramfs images), cpio (to inspect
# images by hand) and xz-utils (kernel modules and the bzImage payload).
# It is idempotent and quiet: it only calls apt-get when something is
# missing, so CI can run it on every build at no cost.
set -eu

pkgs="qemu-system-x86 busybox-static cpio xz-utils"

missing=""
for p in $pkgs; do
	if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
		missing="$missing $p"
	fi
done

if [ -z "$missing" ]; then
	exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
	SUDO=sudo
else
	SUDO=
fi

export DEBIAN_FRONTEND=noninteractive
# The package lists may be absent on a fresh machine; refresh them once.
$SUDO apt-get update -qq >/dev/null
# shellcheck disable=SC2086 # word splitting of $missing is intended
$SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
echo "setup-deps: installed$missing"
