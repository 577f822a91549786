#!/usr/bin/env bash
# Sets up this machine and runs every test tier: unit, blkio client, QEMU VM.
# Usage (as root on Debian 12): bash ci/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."

bash ci/setup.sh

echo "== format and lint"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== build"
cargo build --workspace --locked

echo "== unit tier"
cargo test --workspace --locked --bins --lib

echo "== client tier (blkio against the real binary)"
cargo test -p vhost-mirror-tests --locked --test client

echo "== VM tier (QEMU, TCG unless KVM works)"
cargo test -p vhost-mirror-tests --locked --test vm -- --nocapture

echo "== all tiers passed"
