#!/usr/bin/env bash
# Boots the file-server guest built by images/build.sh, its root disk served by a
# vhost-user-blk backend that is already listening on SOCK.
#
#   images/boot.sh --dir OUTDIR --socket SOCK --http-port PORT [--num-queues N|default]
#                  [--mem 256M] [--smp N] [--serial LOGFILE] [--accel auto|tcg|kvm]
#                  [--extra-append STR] [--firmware]
#                  [--data-socket SOCK2 [--data-queues N|default] [--reconnect-ms MS]]
#
# --num-queues (default 1) is the vhost-user-blk-pci device's num-queues; `default` leaves it
# out, and QEMU then asks the backend for one queue per vCPU (--smp), as a plain
# `-device vhost-user-blk-pci,chardev=...` does.
#
# --data-socket adds a second vhost-user-blk-pci disk (the data disk, /dev/vdb in the guest; the
# root disk stays /dev/vda) on the backend listening at SOCK2, with --data-queues (default 1;
# `default` as for --num-queues) queues. --reconnect-ms MS gives the data disk's chardev
# `reconnect-ms=MS` (QEMU 9.2 or later): when its backend goes away, QEMU keeps the guest running
# and connects again every MS milliseconds; SOCK2 then need not exist yet when QEMU starts. The
# root disk's chardev has no reconnect.
#
# The guest's HTTP server (port 80) is forwarded to 127.0.0.1:PORT on the host (loopback only).
# Without --serial the serial console goes to stdout (interactive: Ctrl-A x quits QEMU).
# The last step execs qemu-system-x86_64, so the caller's child PID is QEMU's PID.
#
# Why direct kernel boot (-kernel/-initrd) by default: it is the fast path, and the whole root
# filesystem is still on the vhost-user-blk disk. Firmware boot through SeaBIOS works only with a
# boot loader that never runs code the backend read into memory where code already ran: under
# TCG, QEMU does not see the backend's writes to guest RAM and keeps its stale translation, so a
# syslinux/DOS-style MBR that chainloads the partition boot sector to 0x7c00 re-runs the MBR and
# hangs after "Booting from 0000:7c00" (any backend, qemu-storage-daemon too). Details and
# evidence: images/README.md, "Why direct kernel boot, and firmware boot".
#
# --firmware: boot from the disk instead, as a real VM does (no -kernel/-initrd/-append):
# SeaBIOS -> MBR -> GRUB -> /boot/vmlinuz on /dev/vda1. The backend must serve (a copy of)
# OUTDIR/boot-disk.raw, made by `images/build.sh --firmware OUTDIR`; the kernel command line is
# built into that disk, so --extra-append is refused. GRUB's boot.img copies core.img with the
# CPU and GRUB reads files through its own buffers, so it avoids the stale-translation trap.
#
# --accel auto (default): TCG unless a short probe boot (-accel kvm, kernel flag vmprobe=1,
# no disk, 20 s timeout) prints VM-PROBE-OK. The result is cached in OUTDIR/kvm-probe.result.
# Nested KVM fails or hangs on the development machines, so expect TCG there.
set -euo pipefail

die() { echo "boot.sh: $*" >&2; exit 1; }
usage() {
    sed -n '5,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

DIR= SOCK= PORT= QUEUES=1 MEM=256M SMP=1 SERIAL= ACCEL=auto EXTRA= FIRMWARE=0
DATA_SOCK= DATA_QUEUES=1 RECONNECT_MS=
while [ $# -gt 0 ]; do
    case "$1" in
        --dir) DIR=${2:?}; shift 2 ;;
        --socket) SOCK=${2:?}; shift 2 ;;
        --http-port) PORT=${2:?}; shift 2 ;;
        --num-queues) QUEUES=${2:?}; shift 2 ;;
        --mem) MEM=${2:?}; shift 2 ;;
        --smp) SMP=${2:?}; shift 2 ;;
        --serial) SERIAL=${2:?}; shift 2 ;;
        --accel) ACCEL=${2:?}; shift 2 ;;
        --extra-append) EXTRA=${2?}; shift 2 ;;
        --firmware) FIRMWARE=1; shift ;;
        --data-socket) DATA_SOCK=${2:?}; shift 2 ;;
        --data-queues) DATA_QUEUES=${2:?}; shift 2 ;;
        --reconnect-ms) RECONNECT_MS=${2:?}; shift 2 ;;
        -h|--help) usage ;;
        *) echo "boot.sh: unknown argument $1" >&2; usage ;;
    esac
done
[ -n "$DIR" ] && [ -n "$SOCK" ] && [ -n "$PORT" ] || usage
case "$PORT" in *[!0-9]*|"") die "--http-port must be a number" ;; esac
case "$QUEUES" in default) ;; *[!0-9]*|""|0) die "--num-queues must be a positive number or default" ;; esac
case "$ACCEL" in auto|tcg|kvm) ;; *) die "--accel must be auto, tcg or kvm" ;; esac
case "$DATA_QUEUES" in default) ;; *[!0-9]*|""|0) die "--data-queues must be a positive number or default" ;; esac
case "$RECONNECT_MS" in "") ;; *[!0-9]*|0) die "--reconnect-ms must be a positive number" ;; esac
[ -n "$DATA_SOCK" ] || [ -z "$RECONNECT_MS" ] || die "--reconnect-ms applies to the data disk: give --data-socket"
[ "$FIRMWARE" = 0 ] || [ -z "$EXTRA" ] \
    || die "--extra-append does not work with --firmware (the command line is in boot-disk.raw)"

QEMU=${QEMU:-qemu-system-x86_64}
command -v "$QEMU" >/dev/null 2>&1 \
    || die "$QEMU not found (package qemu-system-x86; run ci/setup.sh)"
[ -f "$DIR/vmlinuz" ] && [ -f "$DIR/initrd.img" ] \
    || die "$DIR/vmlinuz or $DIR/initrd.img missing (run images/build.sh $DIR)"
[ -S "$SOCK" ] || die "$SOCK is not a socket (start the vhost-user-blk backend first)"
[ -z "$DATA_SOCK" ] || [ -n "$RECONNECT_MS" ] || [ -S "$DATA_SOCK" ] \
    || die "$DATA_SOCK is not a socket (start the data disk's backend first, or give --reconnect-ms)"

# ---- accelerator -------------------------------------------------------------------------
kvm_probe() { # prints yes or no
    local log rc=0
    if [ ! -r /dev/kvm ] || [ ! -w /dev/kvm ]; then echo no; return; fi
    command -v timeout >/dev/null || { echo no; return; }
    ulimit -c 0  # a failing KVM QEMU may abort(); no core files
    log=$(mktemp)
    timeout -k 2 20 "$QEMU" -accel kvm -cpu host -m 128M -nodefaults -display none \
        -no-reboot -serial "file:$log" \
        -kernel "$DIR/vmlinuz" -initrd "$DIR/initrd.img" \
        -append "console=ttyS0 vmprobe=1 panic=-1 quiet" </dev/null >/dev/null 2>&1 || rc=$?
    if grep -q VM-PROBE-OK "$log"; then echo yes; else echo no; fi
    rm -f "$log"
}

if [ "$ACCEL" = auto ]; then
    result="$DIR/kvm-probe.result"
    # Re-probe when the guest kernel/initrd changed since the cached result.
    if [ -f "$result" ] && [ "$result" -nt "$DIR/initrd.img" ] && [ "$result" -nt "$DIR/vmlinuz" ]; then
        kvm=$(cat "$result")
    else
        echo "boot.sh: probing KVM (up to 20 s)..." >&2
        kvm=$(kvm_probe)
        tmp=$(mktemp "$DIR/.kvm-probe.XXXXXX")
        echo "$kvm" >"$tmp" && chmod 644 "$tmp" && mv -f "$tmp" "$result"
    fi
    if [ "$kvm" = yes ]; then ACCEL=kvm; else ACCEL=tcg; fi
    echo "boot.sh: accelerator $ACCEL (kvm probe: $kvm, cached in $result)" >&2
fi
if [ "$ACCEL" = kvm ]; then
    accel_args=(-accel kvm -cpu host)
else
    accel_args=(-accel tcg)
fi

# ---- console -----------------------------------------------------------------------------
if [ -n "$SERIAL" ]; then
    console_args=(-display none -chardev "file,id=con0,path=$SERIAL" -serial chardev:con0 -monitor none)
else
    console_args=(-nographic -serial mon:stdio)
fi

# num-queues left out: QEMU's default, one queue per vCPU.
disk_device="vhost-user-blk-pci,chardev=disk0,bootindex=1"
[ "$QUEUES" = default ] || disk_device+=",num-queues=$QUEUES"

# The data disk, right after the root disk (so the guest names them vda, vdb).
data_args=()
if [ -n "$DATA_SOCK" ]; then
    data_chardev="socket,id=data0,path=$DATA_SOCK"
    [ -z "$RECONNECT_MS" ] || data_chardev+=",reconnect-ms=$RECONNECT_MS"
    data_device="vhost-user-blk-pci,chardev=data0"
    [ "$DATA_QUEUES" = default ] || data_device+=",num-queues=$DATA_QUEUES"
    data_args=(-chardev "$data_chardev" -device "$data_device")
fi

APPEND="console=ttyS0 root=/dev/vda rw panic=-1 ${EXTRA}"
# The kernel takes at most cmdline_size bytes (its boot header, offset 0x238: 2047 for
# Debian's 6.1 kernel). A longer -append is not refused by QEMU 10.0: the guest hangs before
# printing anything, so refuse it here.
if [ "$FIRMWARE" = 0 ]; then
    max=$(od -An -tu4 -j 568 -N4 "$DIR/vmlinuz" | tr -d ' ')
    case "$max" in ""|*[!0-9]*|0) max=2047 ;; esac
    len=$(printf '%s' "$APPEND" | wc -c)
    [ "$len" -le "$max" ] \
        || die "kernel command line is $len bytes, the kernel takes at most $max (--extra-append too long)"
fi
if [ "$FIRMWARE" = 1 ]; then
    kernel_args=()  # SeaBIOS boots the disk (bootindex=1): MBR -> GRUB -> /boot/vmlinuz
else
    kernel_args=(-kernel "$DIR/vmlinuz" -initrd "$DIR/initrd.img" -append "$APPEND")
fi

# restrict=on: the guest reaches nothing outside; only the loopback hostfwd is open.
# vhost-user needs guest RAM the backend can map: a shared memfd backend.
exec "$QEMU" \
    -name vhost-mirror-guest \
    -machine pc,memory-backend=mem \
    "${accel_args[@]}" \
    -m "$MEM" -smp "$SMP" \
    -object "memory-backend-memfd,id=mem,size=$MEM,share=on" \
    -nodefaults -no-user-config \
    "${console_args[@]}" \
    -no-reboot \
    -chardev "socket,id=disk0,path=$SOCK" \
    -device "$disk_device" \
    "${data_args[@]}" \
    -netdev "user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:$PORT-:80" \
    -device virtio-net-pci,netdev=n0 \
    "${kernel_args[@]}"
