#!/usr/bin/env bash
# The fault-injection tier's randomized checker (issue 8): each round builds two "hosts"
# (a faultfs power-loss layer each, in two network namespaces), runs a seeded schedule of
# guest writes and flushes, kills, power losses, partitions, packet loss, delays, stalls,
# failing disks, failovers and failbacks, and checks after every crash, failover and failback
# that every flushed write is on the serving side, and that "in sync" means identical images.
# Prints a table: rounds, faults of each kind, violations. Exit status 0 only with 0 violations.
#
# Usage (as root on Debian 12): bash ci/faults.sh [--rounds N] [--steps N] [--seed HEX]
#   --rounds N   rounds to run (default 20)
#   --steps N    schedule steps per round (default 12)
#   --seed HEX   replay this round seed (printed by every round) as the first round
set -euo pipefail
cd "$(dirname "$0")/.."

rounds=20 steps=12 seed=
while [ $# -gt 0 ]; do
    case "$1" in
        --rounds) rounds=$2; shift 2 ;;
        --steps) steps=$2; shift 2 ;;
        --seed) seed=$2; shift 2 ;;
        *) echo "faults.sh: unknown option $1 (see the top of $0)" >&2; exit 2 ;;
    esac
done

bash ci/setup.sh
cargo build --workspace --locked --release
export FAULT_ROUNDS=$rounds FAULT_STEPS=$steps
[ -n "$seed" ] && export FAULT_SEED=$seed
cargo test --release -p vhost-mirror-tests --locked --test faults fault_rounds -- --nocapture
