#!/usr/bin/env bash
# Sets up this machine and runs every test tier: unit, blkio client, local sockets, config
# files, the Debian package, metrics, replication, witness, the Pacemaker agent and a cluster
# failover, durability and fault injection (a short pass of the randomized checker), QEMU VM
# (file server, fio and restarts under load, a libvirt domain, failover/failback), and a smoke
# run of the benchmark.
# Usage (as root on Debian 12): bash ci/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."

bash ci/setup.sh

echo "== format and lint"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== build"
cargo build --workspace --locked

echo "== the test guest (images/build.sh: its kernel is built once, about 7 minutes; the VM, libvirt, failover and cluster tiers boot it)"
bash images/build.sh --firmware "${VHOST_MIRROR_VM_GUEST_DIR:-${CARGO_TARGET_DIR:-target}/vm-guest}"

echo "== unit tier (and access-node's in-process session tests, the benchmark smoke run)"
cargo test --workspace --locked --exclude vhost-mirror-tests

echo "== client tier (blkio against the real binary)"
cargo test -p vhost-mirror-tests --locked --test client

echo "== local sockets (modes, peer credentials, --socket-group; as root, with user nobody)"
cargo test -p vhost-mirror-tests --locked --test sockets

echo "== config files, Type=notify, systemd units (systemd-analyze verify)"
cargo test -p vhost-mirror-tests --locked --test config

echo "== Debian package (ci/deb.sh; installed with dpkg --root into a scratch root: both binaries' --version, man pages, completions, OCF agents, units)"
cargo test -p vhost-mirror-tests --locked --test package -- --nocapture

echo "== metrics (--metrics of a mirrored pair scraped under load, parsed by prometheus_client; garbage and floods at the endpoint)"
cargo test -p vhost-mirror-tests --locked --test metrics

echo "== link security (relay injection and snooping, pre-auth lock-out, weak secrets)"
cargo test -p vhost-mirror-tests --locked --test security

echo "== replication tier (mirrored pairs through blkio)"
cargo test -p vhost-mirror-tests --locked --test replication -- --test-threads=2

echo "== quorum witness (outdate, promote, supersede through cut proxies)"
cargo test -p vhost-mirror-tests --locked --test witness -- --test-threads=2

echo "== Pacemaker pieces that need no cluster (ocf-tester on ha/ocf/vhost-mirror)"
cargo test -p vhost-mirror-tests --locked --test ha

echo "== cluster tier (Corosync + Pacemaker in namespaces: the primary node dies, or is cut off, during writes; switch-over; link cut; the file-server VM fails over; ci/cluster.sh runs more rounds)"
cargo test -p vhost-mirror-tests --locked --test cluster -- --nocapture --test-threads=1

echo "== durability regressions (scripted replica)"
cargo test -p vhost-mirror-tests --locked --test durability -- --test-threads=2

echo "== fault tier: the layers themselves (faultfs power loss, network namespaces)"
cargo test -p vhost-mirror-tests --locked --test faultfs --test netfault

echo "== writeback failures under a real page cache (faultfs under a loop device)"
cargo test -p vhost-mirror-tests --locked --test writeback

echo "== fault tier: regressions and a short pass of the randomized checker (ci/faults.sh runs more)"
# Fixed seeds here (a gate should not depend on the day's dice): the first three rounds of a
# 200-round ci/faults.sh run; ci/faults.sh draws new seeds every time.
FAULT_SEED=${FAULT_SEED:-18ed331fa1eff14a} FAULT_ROUNDS=${FAULT_ROUNDS:-3} FAULT_STEPS=${FAULT_STEPS:-12} \
    cargo test -p vhost-mirror-tests --locked --test faults -- --nocapture --test-threads=1

echo "== VM tier (QEMU, TCG unless KVM works): file server, fio on a data disk, restarts under load, the same guest as a libvirt domain, then failover and failback"
cargo test -p vhost-mirror-tests --locked --test vm -- --nocapture
cargo test -p vhost-mirror-tests --locked --test libvirt -- --nocapture
cargo test -p vhost-mirror-tests --locked --test failover -- --nocapture --test-threads=1

bash ci/fuzz.sh --replay
echo "== all tiers passed"
