#!/usr/bin/env bash
# Online verify's soak (issue 12): N verify runs of a mirrored 64 MiB disk while 4k random writes
# at QD32 keep hitting it, each of which must find 0 differences (a difference there would be a
# false positive: the pair is in sync), then blocks flipped in the replica's file behind its back
# must be found and repaired. The README's test command runs 3 runs; this runs more.
#
# Usage (as root on Debian 12): bash ci/verify-soak.sh [--rounds N]   (default 10)
set -euo pipefail
cd "$(dirname "$0")/.."

rounds=10
while [ $# -gt 0 ]; do
    case "$1" in
        --rounds) rounds=$2; shift 2 ;;
        *) echo "verify-soak.sh: unknown option $1 (see the top of $0)" >&2; exit 2 ;;
    esac
done
case "$rounds" in '' | *[!0-9]*) echo "verify-soak.sh: --rounds needs a number" >&2; exit 2 ;; esac

bash ci/setup.sh
cargo build --workspace --locked --release
VERIFY_ROUNDS=$rounds cargo test --release -p vhost-mirror-tests --locked --test replication \
    verify_finds_corruption_without_false_positives -- --nocapture
