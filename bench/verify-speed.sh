#!/usr/bin/env bash
# Online verify's speed on an idle mirrored pair (issue 12): both images on this machine's
# disk, filled with random data (holes would read as nothing), the pair in sync; each round
# starts every build's pair in turn on the same images (interleaved A/B), runs
# `vhost-mirror verify --json` once and stops the pair. Prints each run's MiB/s, the CPU
# seconds each process spent on it (utime + stime, from /proc) and the load average as it
# started, and per build the median and range of each. On a machine shared with other work the
# CPU seconds per GiB are the steadier measure.
#
# Usage: bash bench/verify-speed.sh [--rounds N] [--size-mib M] [--dir D] [--cold-primary]
#            BIN_DIR [BIN_DIR ...]
#   BIN_DIR: a directory holding vhost-mirror and access-node (e.g. target/release, or a copy
#   of an older build's binaries). --dir: where the images go (default /var/tmp/verify-speed,
#   kept between runs; made again if --size-mib changes). --cold-primary: drop the primary
#   image's clean pages before each verify (default: the primary's image is read once first,
#   so it is in the page cache, as a running VM's often is). The replica drops its own.
#   `--dir /dev/shm/vs` puts both images on tmpfs, which serves O_DIRECT reads from memory:
#   verify's speed with a disk that is not in the way (its CPU bound on this machine).
set -euo pipefail

rounds=5
size_mib=1024
dir=/var/tmp/verify-speed
cold=0
bins=()
while [ $# -gt 0 ]; do
    case "$1" in
        --rounds) rounds="$2"; shift 2 ;;
        --size-mib) size_mib="$2"; shift 2 ;;
        --dir) dir="$2"; shift 2 ;;
        --cold-primary) cold=1; shift ;;
        -*) echo "verify-speed.sh: unknown option $1 (see the top of $0)" >&2; exit 2 ;;
        *) bins+=("$(cd "$1" && pwd)"); shift ;;
    esac
done
[ "${#bins[@]}" -gt 0 ] || { echo "verify-speed.sh: name at least one BIN_DIR" >&2; exit 2; }
for b in "${bins[@]}"; do
    for p in vhost-mirror access-node; do
        [ -x "$b/$p" ] || { echo "verify-speed.sh: $b/$p missing" >&2; exit 2; }
    done
done

mkdir -p "$dir"
primary="$dir/primary.img"
replica="$dir/replica.img"
secret="$dir/secret"
port=$((20000 + RANDOM % 20000))
want=$((size_mib * 1024 * 1024))
if [ ! -f "$primary" ] || [ "$(stat -c %s "$primary")" != "$want" ]; then
    rm -f "$dir"/*.img "$dir"/*.img.*
    echo "verify-speed: filling a $size_mib MiB primary image with random data" >&2
    head -c "$want" /dev/urandom >"$primary"
fi
[ -f "$secret" ] || { echo "the secret of the verify speed bench" >"$secret"; chmod 600 "$secret"; }

an_pid=""
vm_pid=""
stop_pair() {
    for p in $vm_pid $an_pid; do
        kill -TERM "$p" 2>/dev/null || true
    done
    for p in $vm_pid $an_pid; do
        wait "$p" 2>/dev/null || true
    done
    an_pid=""
    vm_pid=""
}
trap stop_pair EXIT

status_field() { # $1 bin dir, $2 field
    "$1/vhost-mirror" status --control "$dir/vm.ctl" --json 2>/dev/null |
        python3 -c "import json,sys; print(json.load(sys.stdin).get('$2'))" 2>/dev/null || true
}

start_pair() { # $1 bin dir
    local b="$1"
    rm -f "$dir/an.ctl" "$dir/vm.ctl" "$dir/vm.sock"
    RUST_LOG=warn "$b/access-node" serve --image "$replica" --listen "127.0.0.1:$port" \
        --secret-file "$secret" --control "$dir/an.ctl" >>"$dir/access-node.log" 2>&1 &
    an_pid=$!
    for _ in $(seq 100); do [ -S "$dir/an.ctl" ] && break; sleep 0.05; done
    RUST_LOG=warn "$b/vhost-mirror" serve --image "$primary" --socket "$dir/vm.sock" \
        --control "$dir/vm.ctl" --peer "127.0.0.1:$port" --secret-file "$secret" \
        >>"$dir/vhost-mirror.log" 2>&1 &
    vm_pid=$!
    local t=0
    while :; do
        if [ "$(status_field "$b" peer_state)" = connected ] &&
            [ "$(status_field "$b" out_of_sync_bytes)" = 0 ] &&
            [ "$(status_field "$b" resyncing)" = False ] &&
            [ "$(status_field "$b" peer_disk_state)" = up-to-date ]; then
            break
        fi
        t=$((t + 1))
        [ "$t" -lt 3000 ] || { echo "verify-speed: pair not in sync after 300 s" >&2; exit 1; }
        sleep 0.1
    done
}

cpu_secs() { # utime + stime of process $1, seconds
    awk -v hz="$(getconf CLK_TCK)" '{ printf "%.2f", ($14 + $15) / hz }' "/proc/$1/stat"
}

declare -A results cpu_an cpu_vm
echo "round build mib_per_sec cpu_s_access_node cpu_s_vhost_mirror load"
for r in $(seq "$rounds"); do
    for i in "${!bins[@]}"; do
        b="${bins[$i]}"
        start_pair "$b"
        if [ "$cold" = 1 ]; then
            dd if="$primary" iflag=nocache count=0 status=none
        else
            cat "$primary" >/dev/null
        fi
        load=$(cut -d' ' -f1 /proc/loadavg)
        a0=$(cpu_secs "$an_pid")
        v0=$(cpu_secs "$vm_pid")
        out=$("$b/vhost-mirror" verify --control "$dir/vm.ctl" --json)
        a=$(python3 -c "print('%.2f' % ($(cpu_secs "$an_pid") - $a0))")
        v=$(python3 -c "print('%.2f' % ($(cpu_secs "$vm_pid") - $v0))")
        speed=$(python3 -c "import json,sys; print('%.0f' % json.loads(sys.argv[1])['mib_per_sec'])" "$out")
        diffs=$(python3 -c "import json,sys; print(json.loads(sys.argv[1])['differences'])" "$out")
        [ "$diffs" = 0 ] || { echo "verify-speed: differences found: $out" >&2; exit 1; }
        echo "$r $i $speed $a $v $load"
        results[$i]="${results[$i]:-} $speed"
        cpu_an[$i]="${cpu_an[$i]:-} $a"
        cpu_vm[$i]="${cpu_vm[$i]:-} $v"
        stop_pair
    done
done
for i in "${!bins[@]}"; do
    python3 - "${bins[$i]}" "$size_mib" "${results[$i]}" "${cpu_an[$i]}" "${cpu_vm[$i]}" <<'EOF'
import statistics, sys
name, mib = sys.argv[1], float(sys.argv[2])
speed, an, vm = ([float(x) for x in a.split()] for a in sys.argv[3:6])
med = statistics.median
per_gib = lambda v: f"{med(v) * 1024 / mib:.2f} ({min(v) * 1024 / mib:.2f}-{max(v) * 1024 / mib:.2f})"
print(f"{name}: median {med(speed):.0f} MiB/s, range {min(speed):.0f}-{max(speed):.0f} "
      f"({len(speed)} runs: {' '.join('%.0f' % x for x in speed)}); CPU s per GiB: "
      f"access-node {per_gib(an)}, vhost-mirror {per_gib(vm)}")
EOF
done
