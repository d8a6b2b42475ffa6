#!/bin/bash
# qemu-check.sh: build testos and run every workload under QEMU, checking the
# console output and the exit status. Needs qemu-system-x86_64 (Debian:
# apt-get install qemu-system-x86).
#
#   guest/testos/qemu-check.sh              # modes: tcg kvm kvm-uirq
#   MODES=tcg guest/testos/qemu-check.sh    # only TCG
#   VERBOSE=1 ...                           # print every console output
#
# Modes: tcg = QEMU's emulator; kvm = /dev/kvm with QEMU's default in-kernel
# PIC/PIT; kvm-uirq = /dev/kvm with PIC/PIT in QEMU user space
# (kernel-irqchip=off), which injects interrupts with KVM_INTERRUPT like
# ftkvm does. The kvm modes are skipped when /dev/kvm is not usable.
#
# QEMU's isa-debug-exit turns the guest's outb(v, 0x501) into exit status
# (v << 1) | 1: PASS (0) -> 1, FAIL (1) -> 3, usage error (2) -> 5,
# exception (3) -> 7.

set -u
cd "$(dirname "$0")" || exit 1
make -s || exit 1
ELF=$PWD/testos.elf
MODES=${MODES:-"tcg kvm kvm-uirq"}
TIMEOUT=${TIMEOUT:-180}
VERBOSE=${VERBOSE:-0}
QEMU=${QEMU:-qemu-system-x86_64}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
trap '' PIPE	# input for a guest that already exited: ignore EPIPE

npass=0
nfail=0
failed=()

qemu_args() { # mode
	case $1 in
	tcg) echo "-accel tcg -cpu qemu64 -M pc" ;;
	kvm) echo "-accel kvm -cpu qemu64 -M pc" ;;
	kvm-uirq) echo "-accel kvm -cpu qemu64 -M pc,kernel-irqchip=off" ;;
	esac
}

# run MODE APPEND [INPUT]: boots testos, output in $TMP/out, status in $rc.
# INPUT (if any) is written to the serial port once "echo: ready" appeared.
run() {
	local mode=$1 append=$2 input=${3-} qpid i
	rm -f "$TMP/out" "$TMP/in"
	mkfifo "$TMP/in"
	# shellcheck disable=SC2046
	timeout "$TIMEOUT" "$QEMU" $(qemu_args "$mode") -m 64 -display none \
		-nodefaults -no-reboot -serial stdio \
		-device isa-debug-exit,iobase=0x501,iosize=1 \
		-kernel "$ELF" -append "$append" \
		<"$TMP/in" >"$TMP/out" 2>"$TMP/err" &
	qpid=$!
	exec 3>"$TMP/in"
	if [ -n "$input" ]; then
		for ((i = 0; i < TIMEOUT * 10; i++)); do
			grep -q '^echo: ready' "$TMP/out" && break
			kill -0 "$qpid" 2>/dev/null || break
			sleep 0.1
		done
		printf '%b' "$input" >&3 2>/dev/null
	fi
	wait "$qpid"
	rc=$?
	exec 3>&-
	tr -d '\r' <"$TMP/out" >"$TMP/out.txt"
}

# check NAME COND-DESCRIPTION: record the result of the last test command.
result() { # name ok(0/1) why
	if [ "$2" = 0 ]; then
		npass=$((npass + 1))
		printf 'ok    %s\n' "$1"
	else
		nfail=$((nfail + 1))
		failed+=("$1")
		printf 'FAIL  %s: %s\n' "$1" "$3"
		sed 's/^/      | /' "$TMP/out.txt" | tail -30
		[ -s "$TMP/err" ] && grep -v 'host doesn.t support requested feature' "$TMP/err" | sed 's/^/      ! /'
	fi
	if [ "$VERBOSE" = 1 ] && [ "$2" = 0 ]; then
		sed 's/^/      | /' "$TMP/out.txt"
	fi
}

out() { cat "$TMP/out.txt"; }
has() { grep -qx -- "$1" "$TMP/out.txt"; }
count() { grep -cE -- "$1" "$TMP/out.txt"; }
last() { tail -n 1 "$TMP/out.txt"; }

# expect_pass NAME: status PASS, header first, "testos: PASS" last.
std_ok() { # header
	[ "$rc" = 1 ] && [ "$(head -n 1 "$TMP/out.txt")" = "$1" ] && [ "$(last)" = "testos: PASS" ]
}

# numbering of prefix P strictly increasing 1..N
seq_ok() { # prefix n
	local got
	got=$(grep -E "^$1 [0-9]+\$" "$TMP/out.txt" | awk '{print $2}' | tr '\n' ' ')
	[ "$got" = "$(seq -s ' ' 1 "$2") " ]
}

for mode in $MODES; do
	case $mode in
	kvm*)
		if ! [ -w /dev/kvm ]; then
			echo "skip  $mode: /dev/kvm not usable"
			continue
		fi
		;;
	esac

	run "$mode" "console=ttyS0 workload=counter hz=100"
	n=$(count '^counter [0-9]+ ticks=[0-9]+$')
	ticks=$(grep -E '^counter ' "$TMP/out.txt" | sed 's/.*ticks=//')
	sorted=$(echo "$ticks" | sort -n)
	ok=1
	std_ok "testos: workload=counter hz=100" && [ "$n" = 20 ] && [ "$ticks" = "$sorted" ] && ok=0
	result "$mode counter" $ok "rc=$rc lines=$n"

	run "$mode" "workload=counter lines=7 wait=1 hz=250"
	ok=1
	std_ok "testos: workload=counter hz=250" && [ "$(count '^counter [0-9]+ ticks=')" = 7 ] && ok=0
	result "$mode counter lines=7 hz=250" $ok "rc=$rc"

	run "$mode" "workload=interleave"
	ok=1
	std_ok "testos: workload=interleave hz=100" && seq_ok A 20 && seq_ok B 20 &&
		[ "$(count '^[AB] [0-9]+$')" = 40 ] && ok=0
	result "$mode interleave" $ok "rc=$rc"

	run "$mode" "workload=compute"
	ok=1
	std_ok "testos: workload=compute hz=100" &&
		has "compute mib=4 sum=316e4a3aa0795b4a" &&
		has "compute mib=8 sum=e17b8d9248e7f0d1" &&
		has "compute mib=12 sum=75d9b7dd8d61fe98" &&
		has "compute mib=16 sum=0b9fc6640dd39b15" &&
		[ "$(count '^compute mib=')" = 4 ] && ok=0
	result "$mode compute" $ok "rc=$rc"

	run "$mode" "workload=compute mib=3 every=2 hz=1000"
	ok=1
	std_ok "testos: workload=compute hz=1000" &&
		has "compute mib=2 sum=5d89f68fdc9fdc10" &&
		has "compute mib=3 sum=6b24dd2428b10da1" && ok=0
	result "$mode compute mib=3 every=2" $ok "rc=$rc"

	run "$mode" "workload=clock samples=4"
	ok=1
	std_ok "testos: workload=clock hz=100" &&
		[ "$(count '^clock pit=[0-9]+ cmos=[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2} ticks=[0-9]+$')" = 4 ] && ok=0
	result "$mode clock" $ok "rc=$rc"

	run "$mode" "workload=echo" 'hello world\nMiXeD Case 123\r\n\nquit\nignored\n'
	ok=1
	std_ok "testos: workload=echo hz=100" && has "echo: ready" &&
		has "echo: HELLO WORLD" && has "echo: MIXED CASE 123" && has "echo: QUIT" &&
		! grep -q IGNORED "$TMP/out.txt" && [ "$(count '^echo: ')" = 4 ] && ok=0
	result "$mode echo" $ok "rc=$rc"

	run "$mode" "workload=echo" 'abc\ndef\004'
	ok=1
	std_ok "testos: workload=echo hz=100" && has "echo: ABC" && has "echo: DEF" && ok=0
	result "$mode echo ^D" $ok "rc=$rc"

	run "$mode" "workload=bogus"
	ok=1
	[ "$rc" = 5 ] && has 'testos: error: unknown workload "bogus"' && ok=0
	result "$mode unknown workload" $ok "rc=$rc"

	run "$mode" "workload=counter hz=5"
	ok=1
	[ "$rc" = 5 ] && grep -q '^testos: bad option hz=5' "$TMP/out.txt" && ok=0
	result "$mode bad option" $ok "rc=$rc"

	run "$mode" "workload=fault"
	ok=1
	[ "$rc" = 7 ] && grep -qE '^testos: EXCEPTION vector=14 error=0x5 rip=0x[0-9a-f]+ cs=0x2b .* cr2=0x100000$' "$TMP/out.txt" && ok=0
	result "$mode fault" $ok "rc=$rc"
done

echo "qemu-check: $npass passed, $nfail failed"
if [ "$nfail" != 0 ]; then
	printf '  failed: %s\n' "${failed[@]}"
	exit 1
fi
