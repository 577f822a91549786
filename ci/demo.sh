#!/usr/bin/env bash
# The demo: build vhost-mirror and the file-server guest, boot the VM on vhost-mirror, upload a
# file through the VM's file server, read it back, halt, and find the file's bytes in the image.
# Usage (as root on Debian 12): bash ci/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
t0=$(date +%s)
elapsed() { echo "$(( $(date +%s) - t0 ))s"; }

step "1. install what is missing (apt) and build vhost-mirror (release)"
bash ci/setup.sh
cargo build --release --workspace --locked
bin=$root/target/release/vhost-mirror

step "2. build the file-server guest from Debian packages (cached after the first run)"
bash images/build.sh "$root/target/vm-guest"

work=$(mktemp -d /tmp/vhost-mirror-demo.XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    echo "(demo files left in $work)"
}
trap cleanup EXIT

cp --sparse=always "$root/target/vm-guest/disk.raw" "$work/disk.raw"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')

step "3. start vhost-mirror on a copy of the guest disk"
echo "\$ vhost-mirror serve --image $work/disk.raw --socket $work/vm.sock --control $work/ctl --num-queues 2"
RUST_LOG=info "$bin" serve --image "$work/disk.raw" --socket "$work/vm.sock" --control "$work/ctl" \
    --num-queues 2 2>"$work/vhost-mirror.log" &
pids+=($!); vm_pid=$!
for _ in $(seq 100); do [ -S "$work/vm.sock" ] && break; sleep 0.1; done
"$bin" status --control "$work/ctl"

step "4. boot the VM from vhost-mirror (serial console in $work/serial.log)"
bash images/boot.sh --dir "$root/target/vm-guest" --socket "$work/vm.sock" --http-port "$port" \
    --num-queues 2 --serial "$work/serial.log" &
pids+=($!); qemu_pid=$!
boot_start=$(date +%s)
until curl -fsS -m 2 "http://127.0.0.1:$port/cgi-bin/list" >/dev/null 2>&1; do
    kill -0 "$qemu_pid" 2>/dev/null || { echo "QEMU exited; console:"; tail -n 30 "$work/serial.log"; exit 1; }
    [ $(( $(date +%s) - boot_start )) -lt 300 ] || { echo "file server did not come up"; tail -n 30 "$work/serial.log"; exit 1; }
    sleep 1
done
echo "file server up after $(( $(date +%s) - boot_start ))s on http://127.0.0.1:$port"

step "5. upload a 1 MiB file (the guest writes, fdatasyncs, renames, syncs the directory)"
head -c 1048576 /dev/urandom >"$work/upload.bin"
local_sum=$(sha256sum "$work/upload.bin" | cut -d' ' -f1)
reply=$(curl -fsS --data-binary @"$work/upload.bin" "http://127.0.0.1:$port/cgi-bin/upload?name=hello.bin")
echo "guest replied: $reply"
echo "local sha256:  $local_sum"
case "$reply" in *"$local_sum"*) echo "OK: the guest stored exactly our bytes" ;; *) echo "MISMATCH"; exit 1 ;; esac

step "6. list and download it back"
curl -fsS "http://127.0.0.1:$port/cgi-bin/list"
curl -fsS -o "$work/download.bin" "http://127.0.0.1:$port/files/hello.bin"
cmp "$work/upload.bin" "$work/download.bin" && echo "OK: downloaded bytes are identical"

step "7. what vhost-mirror saw"
"$bin" status --control "$work/ctl"

step "8. halt the guest cleanly, stop vhost-mirror with SIGTERM"
curl -fsS -m 5 "http://127.0.0.1:$port/cgi-bin/halt" || true
for _ in $(seq 120); do kill -0 "$qemu_pid" 2>/dev/null || break; sleep 0.5; done
kill -0 "$qemu_pid" 2>/dev/null && { echo "QEMU did not power off"; exit 1; }
kill -TERM "$vm_pid"; wait "$vm_pid" && echo "vhost-mirror exited 0 (in-flight done, image fdatasync'd)"

step "9. the uploaded file, read straight from the raw image with debugfs"
debugfs -R "dump /srv/files/hello.bin $work/from-image.bin" "$work/disk.raw" 2>/dev/null
cmp "$work/upload.bin" "$work/from-image.bin" && echo "OK: the image holds the uploaded bytes"
echo
echo "demo finished in $(elapsed)"
