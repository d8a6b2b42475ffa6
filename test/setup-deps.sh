#!/bin/sh
# Installs what ftkvm needs on a Debian machine, quietly and only once.
#   setup-deps.sh build   gcc, make and binutils build the test guest
#   setup-deps.sh test    also iproute2, etcd (a real etcd cluster for
#                         the arbiter's tests), acpica-tools (iasl checks
#                         the ACPI tables), and qemu, busybox, cpio
#                         and xz for the nested test tier and the Linux
#                         guest images
# Go modules come through `go mod download`.
set -eu
pkgs="gcc make binutils"
[ "${1:-test}" = test ] && pkgs="$pkgs iproute2 etcd-server acpica-tools"
need=""
for p in $pkgs; do
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
# The nested tier and the Linux guest images (qemu, busybox, xz, the
# pinned kernel package's apt entry).
[ "${1:-test}" = test ] && ./test/nested/setup-deps.sh
go mod download
