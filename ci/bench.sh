#!/usr/bin/env bash
# Runs the performance benchmark (issue 5): installs what it needs, builds the release binaries,
# runs the full benchmark with its defaults (3 rounds x 3 s per run, 1 GiB images, resync against
# nbdcopy, 600 s of memory sampling under mixed load, a perf profile of each workload whose
# issue-10 target was missed) and says where the tables are.
# Usage (as root on Debian 12): bash ci/bench.sh [bench options, e.g. --perf, --rounds 5, --smoke]
# Idempotent: a second run installs nothing and overwrites the previous tables.
set -euo pipefail
cd "$(dirname "$0")/.."

# QEMU 10 (qemu-storage-daemon, qemu-nbd) and the Rust toolchain check.
bash ci/setup.sh

# nbdcopy (the resync baseline); perf: every full run profiles the workloads whose issue-10
# targets it missed (`--perf`, added unless given or --smoke).
need_pkgs=(libnbd-bin qemu-utils linux-perf)
extra=(--perf)
for a in "$@"; do
    case "$a" in --perf | --smoke) extra=() ;; esac
done
missing=()
for p in "${need_pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "bench: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # qemu-utils comes from bookworm-backports (ci/setup.sh added that suite) to match QEMU 10.
    apt-get install -y -qq --no-install-recommends -t bookworm-backports "${missing[@]}" \
        || apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
for prog in qemu-storage-daemon qemu-nbd nbdcopy; do
    command -v "$prog" >/dev/null || { echo "bench: $prog still missing" >&2; exit 1; }
done

echo "== build (release)"
cargo build --release --locked -p bench -p vhost-mirror -p access-node

target_dir="${CARGO_TARGET_DIR:-target}"
echo "== benchmark"
"$target_dir/release/bench" "${extra[@]}" "$@"

out="$target_dir/bench"
prev=""
for a in "$@"; do
    [ "$prev" = "--out" ] && out="$a"
    case "$a" in --out=*) out="${a#--out=}" ;; esac
    prev="$a"
done
echo "== tables: $out/bench.md (Markdown) and $out/bench.json (JSON)"
