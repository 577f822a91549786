#!/usr/bin/env bash
# Fail over to the standby: promote the replica image, serve it with vhost-mirror, boot the
# standby VM from it, and stop vhost-mirror cleanly when the VM exits.
#
# Usage:
#   images/failover.sh --replica IMG --access-control CTL --socket SOCK \
#       [--peer ADDR] [--secret-file F] [--control CTL2] [--force] -- QEMU_COMMAND...
#
#   --replica IMG          the access node's replica image (becomes the primary's disk)
#   --access-control CTL   the access node's control socket; when nothing answers there (the
#                          access node is gone too), the image is promoted directly
#   --socket SOCK          vhost-user socket for the standby VM (QEMU_COMMAND must use it)
#   --peer ADDR            mirror to the old primary as soon as it returns as an access node
#                          (without it the promoted image is served alone: every write is
#                          recorded out of sync and copied once it is served with --peer)
#   --secret-file F        shared secret for --peer
#   --control CTL2         control socket of the new vhost-mirror
#   --force                promote even an inconsistent replica (initial sync unfinished)
#
# Binaries: $VHOST_MIRROR and $ACCESS_NODE, else PATH, else this checkout's target/{release,debug}.
set -euo pipefail

die() { echo "failover: $*" >&2; exit 1; }
here=$(cd "$(dirname "$0")/.." && pwd)
find_bin() {
    local name=$1 var=$2
    if [ -n "${!var:-}" ]; then echo "${!var}"; return; fi
    if command -v "$name" >/dev/null 2>&1; then command -v "$name"; return; fi
    for p in "$here/target/release/$name" "$here/target/debug/$name"; do
        [ -x "$p" ] && { echo "$p"; return; }
    done
    die "$name not found (build it with cargo build --release, or set \$$var)"
}

replica= access_ctl= socket= peer= secret= control= force=
while [ $# -gt 0 ]; do
    case "$1" in
        --replica) replica=$2; shift 2 ;;
        --access-control) access_ctl=$2; shift 2 ;;
        --socket) socket=$2; shift 2 ;;
        --peer) peer=$2; shift 2 ;;
        --secret-file) secret=$2; shift 2 ;;
        --control) control=$2; shift 2 ;;
        --force) force=--force; shift ;;
        --) shift; break ;;
        *) die "unknown option $1 (see the usage at the top of $0)" ;;
    esac
done
[ -n "$replica" ] || die "--replica IMG is required"
[ -n "$access_ctl" ] || die "--access-control CTL is required"
[ -n "$socket" ] || die "--socket SOCK is required"
[ $# -gt 0 ] || die "no QEMU command after --"
[ -z "$peer" ] || [ -n "$secret" ] || die "--peer needs --secret-file"

vm=$(find_bin vhost-mirror VHOST_MIRROR)
an=$(find_bin access-node ACCESS_NODE)

now() { date +%s%N; }
t_start=$(now)
ms() { echo "$(( ($(now) - $1) / 1000000 )) ms"; }
step() { echo "failover: $*"; }

# 1. Promote: fence the old primary, new generation, role primary, image released.
t=$(now)
if [ -S "$access_ctl" ] && "$an" status --control "$access_ctl" --json >/dev/null 2>&1; then
    step "1/3 promoting through the running access node ($access_ctl)"
    "$an" promote --control "$access_ctl" $force
else
    step "1/3 access node not answering at $access_ctl: promoting $replica directly"
    "$an" promote --image "$replica" $force
fi
step "    promoted in $(ms "$t")"

# 2. Serve the promoted image.
t=$(now)
args=(serve --image "$replica" --socket "$socket")
[ -n "$control" ] && args+=(--control "$control")
[ -n "$peer" ] && args+=(--peer "$peer" --secret-file "$secret")
step "2/3 starting vhost-mirror ${args[*]}"
"$vm" "${args[@]}" &
vm_pid=$!
qemu_pid=
cleanup() {
    [ -n "$qemu_pid" ] && kill -TERM "$qemu_pid" 2>/dev/null || true
    if kill -0 "$vm_pid" 2>/dev/null; then
        kill -TERM "$vm_pid" 2>/dev/null || true
        wait "$vm_pid" 2>/dev/null || true
    fi
}
trap 'cleanup; exit 143' TERM INT
trap cleanup EXIT
for _ in $(seq 200); do
    [ -S "$socket" ] && break
    kill -0 "$vm_pid" 2>/dev/null || die "vhost-mirror exited early"
    sleep 0.05
done
[ -S "$socket" ] || die "vhost-mirror did not create $socket"
step "    vhost-mirror (pid $vm_pid) ready in $(ms "$t")"

# 3. Boot the standby VM from the replica image.
step "3/3 booting the standby VM: $*"
step "    $(ms "$t_start") since failover started"
"$@" &
qemu_pid=$!
set +e
wait "$qemu_pid"
rc=$?
set -e
qemu_pid=
step "VM exited with status $rc; stopping vhost-mirror"
kill -TERM "$vm_pid"
if wait "$vm_pid"; then
    step "vhost-mirror stopped cleanly"
else
    step "vhost-mirror exit status $?"
fi
trap - EXIT
exit "$rc"
