#!/usr/bin/env bash
# Sets up this machine and runs every test tier: unit, blkio client, replication, QEMU VM
# (file server, failover/failback), and a smoke run of the benchmark.
# Usage (as root on Debian 12): bash ci/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."

bash ci/setup.sh

echo "== format and lint"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== build"
cargo build --workspace --locked

echo "== unit tier (and access-node's in-process session tests, the benchmark smoke run)"
cargo test --workspace --locked --exclude vhost-mirror-tests

echo "== client tier (blkio against the real binary)"
cargo test -p vhost-mirror-tests --locked --test client

echo "== replication tier (mirrored pairs through blkio)"
cargo test -p vhost-mirror-tests --locked --test replication -- --test-threads=2

echo "== VM tier (QEMU, TCG unless KVM works): file server, then failover and failback"
cargo test -p vhost-mirror-tests --locked --test vm -- --nocapture
cargo test -p vhost-mirror-tests --locked --test failover -- --nocapture --test-threads=1

echo "== all tiers passed"
