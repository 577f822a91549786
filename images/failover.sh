#!/usr/bin/env bash
# Fail over to the standby: promote the replica image, serve it with vhost-mirror, boot the
# standby VM from it, and stop vhost-mirror cleanly when the VM exits.
#
# Usage:
#   images/failover.sh --replica IMG --access-control CTL --socket SOCK \
#       [--peer ADDR] [--secret-file F] [--control CTL2] [--force] -- QEMU_COMMAND...
#   images/failover.sh --replica IMG --access-control CTL --socket SOCK \
#       [--peer ADDR] [--secret-file F] [--control CTL2] [--force] \
#       [--socket-group GROUP] --libvirt XML|NAME
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
#   --socket-group GROUP   let GROUP open SOCK too (vhost-mirror's --socket-group): QEMU under
#                          libvirt is not root (Debian: user libvirt-qemu, group libvirt-qemu)
#   --libvirt XML|NAME     boot the standby VM as a libvirt domain instead of QEMU_COMMAND: an
#                          existing file is a domain XML started with `virsh create` (transient),
#                          anything else the name of a defined domain (`virsh start`). Its disk
#                          must be SOCK (images/vhost-mirror-vm.xml is an example). The script
#                          waits until the domain stops, and destroys it when it is stopped
#                          itself. Connection: $LIBVIRT_DEFAULT_URI, else qemu:///system.
#
# Exit status: QEMU_COMMAND's; with --libvirt 0 once the domain stopped, 1 if it crashed.
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

replica= access_ctl= socket= peer= secret= control= force= socket_group= libvirt=
while [ $# -gt 0 ]; do
    case "$1" in
        --replica) replica=$2; shift 2 ;;
        --access-control) access_ctl=$2; shift 2 ;;
        --socket) socket=$2; shift 2 ;;
        --peer) peer=$2; shift 2 ;;
        --secret-file) secret=$2; shift 2 ;;
        --control) control=$2; shift 2 ;;
        --force) force=--force; shift ;;
        --socket-group) socket_group=$2; shift 2 ;;
        --libvirt) libvirt=$2; shift 2 ;;
        --) shift; break ;;
        *) die "unknown option $1 (see the usage at the top of $0)" ;;
    esac
done
[ -n "$replica" ] || die "--replica IMG is required"
[ -n "$access_ctl" ] || die "--access-control CTL is required"
[ -n "$socket" ] || die "--socket SOCK is required"
if [ -n "$libvirt" ]; then
    [ $# -eq 0 ] || die "give either --libvirt or a QEMU command after --, not both"
    command -v virsh >/dev/null 2>&1 || die "--libvirt needs virsh (package libvirt-clients)"
else
    [ $# -gt 0 ] || die "no QEMU command after --"
fi
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
[ -n "$socket_group" ] && args+=(--socket-group "$socket_group")
[ -n "$peer" ] && args+=(--peer "$peer" --secret-file "$secret")
step "2/3 starting vhost-mirror ${args[*]}"
"$vm" "${args[@]}" &
vm_pid=$!
qemu_pid= domain=
uri=${LIBVIRT_DEFAULT_URI:-qemu:///system}
virsh_() { virsh -q -c "$uri" "$@"; }
cleanup() {
    [ -n "$qemu_pid" ] && kill -TERM "$qemu_pid" 2>/dev/null || true
    [ -n "$domain" ] && virsh_ destroy "$domain" >/dev/null 2>&1 || true
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
if [ -n "$libvirt" ]; then
    if [ -f "$libvirt" ]; then
        grep -qF "$socket" "$libvirt" \
            || echo "failover: warning: $libvirt does not mention $socket" >&2
        name=$(sed -n 's:.*<name>\([^<]*\)</name>.*:\1:p' "$libvirt" | head -n 1)
        [ -n "$name" ] || die "no <name> in $libvirt"
        step "3/3 booting the standby VM: virsh -c $uri create $libvirt (domain $name)"
        step "    $(ms "$t_start") since failover started"
        domain=$name
        virsh_ create "$libvirt" >/dev/null || { domain=; die "virsh create $libvirt failed"; }
    else
        virsh_ dumpxml "$libvirt" 2>/dev/null | grep -qF "$socket" \
            || echo "failover: warning: domain $libvirt does not mention $socket" >&2
        step "3/3 booting the standby VM: virsh -c $uri start $libvirt"
        step "    $(ms "$t_start") since failover started"
        domain=$libvirt
        virsh_ start "$libvirt" >/dev/null || { domain=; die "virsh start $libvirt failed"; }
    fi
    step "    domain $domain started"
    # Until it stops: a transient domain is then gone, a defined one is "shut off (REASON)".
    rc=0
    while state=$(virsh_ domstate --reason "$domain" 2>/dev/null); do
        case "$state" in
            crashed* | "shut off (crashed)"*) rc=1; break ;;
            "shut off"*) break ;;
        esac
        sleep 0.5
    done
    domain=
    step "domain stopped (${state:-gone})"
else
    step "3/3 booting the standby VM: $*"
    step "    $(ms "$t_start") since failover started"
    "$@" &
    qemu_pid=$!
    set +e
    wait "$qemu_pid"
    rc=$?
    set -e
    qemu_pid=
fi
step "VM exited with status $rc; stopping vhost-mirror"
kill -TERM "$vm_pid"
if wait "$vm_pid"; then
    step "vhost-mirror stopped cleanly"
else
    step "vhost-mirror exit status $?"
fi
trap - EXIT
exit "$rc"
