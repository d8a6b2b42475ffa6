#!/bin/sh
# Installs what the tests need on a Debian machine, quietly and only once:
# gcc and make build the test guest; qemu, busybox, cpio and xz build and
# boot the nested test tier. Go modules come through `go mod download`.
set -eu
need=""
for p in gcc make qemu-system-x86 busybox-static cpio xz-utils iproute2; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || need="$need $p"
done
if [ -n "$need" ]; then
	echo "setup-deps: installing$need"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends $need >/dev/null
fi
if [ ! -e /dev/kvm ]; then
	echo "setup-deps: warning: /dev/kvm is missing; the KVM tests will fail" >&2
fi
cd "$(dirname "$0")/.."
go mod download
