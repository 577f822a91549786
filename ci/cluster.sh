#!/usr/bin/env bash
# The cluster tier (issue 11): Corosync + Pacemaker, three nodes in namespaces on this machine
# (ha/testcluster/cluster.sh), the OCF agent ha/ocf/vhost-mirror as a promotable clone on node1
# and node2, the quorum witness on node3, fencing. Each round a guest writes (with flushes) to
# the promoted node, that node is killed, and every acknowledged write must be on the node
# promoted in its place; the killed node comes back and is resynced, and the next round kills
# the other one. Then N rounds where the promoted node is only cut off from both others (fenced,
# it must come back as the new primary's replica without a split brain), N planned switch-overs
# and N cuts of the replication link alone. Then the file-server VM under the cluster: N rounds
# where its node is killed during durable uploads (kill -> file server answering on the other
# node). Prints the timings of every round and their medians per scenario. ci/test.sh runs one
# round of each.
#
# Usage (as root on Debian 12): bash ci/cluster.sh [--rounds N]   (default 10 of each; ~2 min per N)
set -euo pipefail
cd "$(dirname "$0")/.."

rounds=10
while [ $# -gt 0 ]; do
    case "$1" in
        --rounds) rounds=$2; shift 2 ;;
        *) echo "cluster.sh: unknown option $1 (see the top of $0)" >&2; exit 2 ;;
    esac
done

bash ci/setup.sh
cargo build --workspace --locked
# The guest the VM scenario boots (its kernel is built once, about 7 minutes).
bash images/build.sh --firmware "${VHOST_MIRROR_VM_GUEST_DIR:-${CARGO_TARGET_DIR:-target}/vm-guest}"
CLUSTER_ROUNDS=$rounds cargo test -p vhost-mirror-tests --locked --test cluster -- --nocapture --test-threads=1
