#!/usr/bin/env bash
# The demo: a file-server VM whose disk is mirrored synchronously to a standby "host", a primary
# crash, failover to the standby, failback, and the planned switch back. The two hosts are two
# directories on this machine, talking over loopback TCP.
# Usage (as root on Debian 12): bash ci/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

bold() { printf '\n\033[1m%s\033[0m\n' "$*"; }
say() { printf '   %s\n' "$*"; }
t0=$(date +%s)

bold "== 0. set up: packages, build (release), the guest image (cached after the first run)"
bash ci/setup.sh
cargo build --release --workspace --locked
bash images/build.sh --firmware "$root/target/vm-guest"
export VHOST_MIRROR=$root/target/release/vhost-mirror ACCESS_NODE=$root/target/release/access-node
vm=$VHOST_MIRROR an=$ACCESS_NODE

work=$(mktemp -d /tmp/vhost-mirror-demo.XXXXXX)
A=$work/hostA B=$work/hostB
mkdir -p "$A" "$B"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    echo "(demo files and logs left in $work)"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port_a=$(free_port) port_b=$(free_port) http=$(free_port)
(umask 077; head -c 32 /dev/urandom | base64 >"$work/secret")
install -m 600 "$work/secret" "$A/secret"; install -m 600 "$work/secret" "$B/secret"
cp --sparse=always "$root/target/vm-guest/boot-disk.raw" "$A/disk.raw"

wait_sock() { for _ in $(seq 200); do [ -S "$1" ] && return 0; sleep 0.05; done; echo "no socket $1"; exit 1; }
json() { python3 -c "import json,sys; print(json.load(sys.stdin)$1)"; }
wait_in_sync() {   # $1 = vhost-mirror control socket
    for _ in $(seq 600); do
        s=$("$vm" status --control "$1" --json 2>/dev/null || true)
        [ -n "$s" ] && [ "$(echo "$s" | json '["peer_state"]')" = connected ] \
            && [ "$(echo "$s" | json '["peer_disk_state"]')" = up-to-date ] \
            && [ "$(echo "$s" | json '["out_of_sync_bytes"]')" = 0 ] && return 0
        sleep 0.1
    done
    echo "replica did not get in sync"; "$vm" status --control "$1"; exit 1
}
wait_http() {   # $1 = port, $2 = pid of QEMU
    local start=$(date +%s)
    until curl -fsS -m 2 "http://127.0.0.1:$1/cgi-bin/list" >/dev/null 2>&1; do
        kill -0 "$2" 2>/dev/null || { echo "QEMU exited"; exit 1; }
        [ $(( $(date +%s) - start )) -lt 300 ] || { echo "file server did not come up"; exit 1; }
        sleep 0.2
    done
}
upload() {   # $1 = name, $2 = size
    head -c "$2" /dev/urandom >"$work/$1"
    local sum reply
    sum=$(sha256sum "$work/$1" | cut -d' ' -f1)
    reply=$(curl -fsS --data-binary @"$work/$1" "http://127.0.0.1:$http/cgi-bin/upload?name=$1")
    [ "$reply" = "sha256=$sum" ] || { echo "upload $1: guest said $reply, expected $sum"; exit 1; }
    say "uploaded $1 ($2 bytes), guest confirmed sha256 ${sum:0:16}..."
}
check() {   # $1 = name
    curl -fsS -o "$work/$1.back" "http://127.0.0.1:$http/files/$1"
    cmp -s "$work/$1" "$work/$1.back" || { echo "$1 differs!"; exit 1; }
    say "$1 read back from the VM: identical"
}

bold "== 1. host B: start the access node (it will create the replica image)"
say "\$ access-node serve --image hostB/disk.raw --listen 127.0.0.1:$port_b --secret-file secret"
"$an" serve --image "$B/disk.raw" --listen "127.0.0.1:$port_b" --secret-file "$B/secret" \
    --control "$B/an.ctl" 2>"$B/access-node.log" &
pids+=($!); an_b=$!
wait_sock "$B/an.ctl"

bold "== 2. host A: serve the VM disk with vhost-mirror, mirrored to host B"
say "\$ vhost-mirror serve --image hostA/disk.raw --socket vm.sock --peer 127.0.0.1:$port_b --secret-file secret"
"$vm" serve --image "$A/disk.raw" --socket "$A/vm.sock" --control "$A/vm.ctl" \
    --peer "127.0.0.1:$port_b" --secret-file "$A/secret" 2>"$A/vhost-mirror.log" &
pids+=($!); vm_a=$!
wait_sock "$A/vm.ctl"
wait_in_sync "$A/vm.ctl"
"$vm" status --control "$A/vm.ctl"

bold "== 3. host A: boot the file-server VM from its disk (SeaBIOS -> GRUB -> Linux, through vhost-mirror)"
bash images/boot.sh --firmware --dir "$root/target/vm-guest" --socket "$A/vm.sock" \
    --http-port "$http" --serial "$A/serial.log" >"$A/qemu.log" 2>&1 &
pids+=($!); qemu_a=$!
wait_http "$http" "$qemu_a"
say "file server up on http://127.0.0.1:$http"
upload report.pdf 300000
upload photo.jpg 1200000
"$an" status --control "$B/an.ctl"

bold "== 4. host A dies: QEMU and vhost-mirror killed with SIGKILL"
kill -9 "$qemu_a" "$vm_a"
t_kill=$(date +%s%N)
wait "$qemu_a" "$vm_a" 2>/dev/null || true
sleep 0.5

bold "== 5. fail over on host B: promote the replica, boot the standby VM from it"
say "\$ images/failover.sh --replica hostB/disk.raw --access-control hostB/an.ctl --socket hostB/vm.sock --peer 127.0.0.1:$port_a ..."
bash images/failover.sh --replica "$B/disk.raw" --access-control "$B/an.ctl" \
    --socket "$B/vm.sock" --control "$B/vm.ctl" --peer "127.0.0.1:$port_a" \
    --secret-file "$B/secret" -- \
    bash images/boot.sh --firmware --dir "$root/target/vm-guest" --socket "$B/vm.sock" \
    --http-port "$http" --serial "$B/serial.log" >"$B/failover.log" 2>&1 &
pids+=($!); failover=$!
for _ in $(seq 100); do [ -S "$B/vm.sock" ] && break; sleep 0.1; done
until curl -fsS -m 2 "http://127.0.0.1:$http/cgi-bin/list" >/dev/null 2>&1; do
    kill -0 "$failover" 2>/dev/null || { cat "$B/failover.log"; exit 1; }
    sleep 0.2
done
say "standby serving $(( ($(date +%s%N) - t_kill) / 1000000 )) ms after the crash"
sed 's/^/   | /' "$B/failover.log" | grep failover: || true
check report.pdf
check photo.jpg
upload written-on-B.txt 50000
"$vm" status --control "$B/vm.ctl"

bold "== 6. host A repaired: it comes back as the access node; only changed blocks travel"
say "\$ access-node serve --image hostA/disk.raw --listen 127.0.0.1:$port_a --secret-file secret"
"$an" serve --image "$A/disk.raw" --listen "127.0.0.1:$port_a" --secret-file "$A/secret" \
    --control "$A/an.ctl" 2>"$A/access-node.log" &
pids+=($!); an_a=$!
wait_in_sync "$B/vm.ctl"
moved=$("$vm" status --control "$B/vm.ctl" --json | json '["resync_total_bytes"]')
sent=$("$vm" status --control "$B/vm.ctl" --json | json '["resync_sent_bytes"]')
same=$("$vm" status --control "$B/vm.ctl" --json | json '["resync_same_bytes"]')
size=$(stat -c %s "$A/disk.raw")
say "failback resync covered $moved bytes of a $size-byte disk: $sent bytes sent as data, $same found equal by block hashes"
"$vm" status --control "$B/vm.ctl"
upload after-failback.txt 20000

bold "== 7. planned switch back to host A: stop the VM on B, promote A, boot on A"
curl -fsS -m 5 "http://127.0.0.1:$http/cgi-bin/halt" >/dev/null || true
wait "$failover" || true
say "standby VM halted; vhost-mirror on B stopped cleanly"
"$an" promote --control "$A/an.ctl"
"$an" serve --image "$B/disk.raw" --listen "127.0.0.1:$port_b" --secret-file "$B/secret" \
    --control "$B/an.ctl" 2>>"$B/access-node.log" &
pids+=($!); an_b=$!
"$vm" serve --image "$A/disk.raw" --socket "$A/vm.sock" --control "$A/vm.ctl" \
    --peer "127.0.0.1:$port_b" --secret-file "$A/secret" 2>>"$A/vhost-mirror.log" &
pids+=($!); vm_a=$!
wait_sock "$A/vm.ctl"
wait_in_sync "$A/vm.ctl"
say "in sync again, copied $("$vm" status --control "$A/vm.ctl" --json | json '["resync_total_bytes"]') bytes"
bash images/boot.sh --firmware --dir "$root/target/vm-guest" --socket "$A/vm.sock" \
    --http-port "$http" --serial "$A/serial2.log" >"$A/qemu2.log" 2>&1 &
pids+=($!); qemu_a=$!
wait_http "$http" "$qemu_a"
for f in report.pdf photo.jpg written-on-B.txt after-failback.txt; do check "$f"; done

bold "== 8. halt, stop both sides, compare the two disks byte for byte"
curl -fsS -m 5 "http://127.0.0.1:$http/cgi-bin/halt" >/dev/null || true
for _ in $(seq 120); do kill -0 "$qemu_a" 2>/dev/null || break; sleep 0.5; done
kill -TERM "$vm_a"; wait "$vm_a" || true
kill -TERM "$an_b"; wait "$an_b" || true
cmp "$A/disk.raw" "$B/disk.raw" && say "host A and host B disks are identical"
echo
echo "demo finished in $(( $(date +%s) - t0 ))s"
