#!/usr/bin/env bash
# Coverage-guided fuzzing of the parsers and decision rules (cargo-fuzz, libFuzzer; the targets
# and their properties are in fuzz/README.md).
#
#   bash ci/fuzz.sh [SECS] [TARGET...]   fuzz each target SECS seconds (default 60), one after
#                                        another; FUZZ_RUNS=N stops each at N executions
#                                        instead (SECS is then only a limit); FUZZ_JOBS=2 runs
#                                        two targets at a time
#   bash ci/fuzz.sh --replay             the seed corpora and fixed findings through the same
#                                        target functions, without libFuzzer (the test command)
#
# Prints per target: seconds, executions, coverage (libFuzzer's cov: edges, ft: features),
# corpus size, crashes; exits non-zero on any crash (the input is in fuzz/artifacts/TARGET/).
# Installs what it needs on Debian 12 (g++ for libFuzzer, cargo-fuzz); idempotent. On a
# stable toolchain: no sanitizer (AddressSanitizer needs nightly; the code under test is safe
# Rust; debug assertions and overflow checks are on) and RUSTC_BOOTSTRAP=1 (what the recorded
# runs used; with --sanitizer none cargo-fuzz's flags are all stable ones).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

targets_all=(frame_decode framed_reader secure_records virtio_request meta_parsers control_line generation_decide)

if [ "${1:-}" = "--replay" ]; then
    echo "== fuzz targets: seed corpora and fixed findings replayed (bash ci/fuzz.sh SECS fuzzes)"
    # The main workspace's target directory: the dependencies are built there already.
    CARGO_TARGET_DIR="$root/target" cargo test --manifest-path fuzz/Cargo.toml \
        --no-default-features --locked
    exit 0
fi

secs=${1:-60}
shift || true
targets=("$@")
[ "${#targets[@]}" -gt 0 ] || targets=("${targets_all[@]}")
runs=${FUZZ_RUNS:-0}
jobs=${FUZZ_JOBS:-1}

# --- what it needs ---------------------------------------------------------------------------
if ! command -v cargo >/dev/null; then
    echo "fuzz: cargo not found; install the Rust toolchain (rustup) first" >&2
    exit 1
fi
if ! command -v c++ >/dev/null; then
    echo "fuzz: installing g++ (libFuzzer is C++)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends g++
fi
cargo_fuzz_version=0.13.2
if ! cargo fuzz --version 2>/dev/null | grep -q " $cargo_fuzz_version"; then
    echo "fuzz: installing cargo-fuzz $cargo_fuzz_version"
    cargo install cargo-fuzz --version "$cargo_fuzz_version" --locked
fi
rustc --version | grep -q nightly || export RUSTC_BOOTSTRAP=1
fuzz_flags=(--sanitizer none --debug-assertions)

echo "== fuzz: building the targets ($(rustc --version))"
(cd fuzz && cargo fuzz build "${fuzz_flags[@]}")

max_len() {
    case $1 in
        framed_reader) echo 16384 ;;
        secure_records) echo 8192 ;;
        *) echo 4096 ;;
    esac
}

out=$root/fuzz/target/fuzz-logs
mkdir -p "$out"

run_one() {
    local t=$1 log=$out/$1.log
    local work=$root/fuzz/target/corpus/$t
    mkdir -p "$work" "$root/fuzz/artifacts/$t"
    local limit=(-max_total_time="$secs")
    [ "$runs" -gt 0 ] && limit+=(-runs="$runs")
    local start rc=0
    start=$(date +%s)
    (cd fuzz && cargo fuzz run "${fuzz_flags[@]}" "$t" "$work" "corpus/$t" -- \
        "${limit[@]}" -max_len="$(max_len "$t")" -print_final_stats=1 -rss_limit_mb=4096 \
        -timeout=30 -artifact_prefix="$root/fuzz/artifacts/$t/") >"$log" 2>&1 || rc=$?
    echo "$(($(date +%s) - start)) $rc" >"$out/$t.rc"
}

summary() {
    local t=$1 log=$out/$1.log
    local took rc execs cov ft corp crashes
    read -r took rc <"$out/$t.rc"
    execs=$(awk -F: '/stat::number_of_executed_units/ {gsub(/ /, "", $NF); print $NF}' "$log" | tail -n1)
    # The last status line: "#N  REDUCE|NEW|pulse|DONE  cov: C ft: F corp: K/S ...".
    cov=$(grep -Eo 'cov: [0-9]+' "$log" | tail -n1 | awk '{print $2}')
    ft=$(grep -Eo 'ft: [0-9]+' "$log" | tail -n1 | awk '{print $2}')
    corp=$(grep -Eo 'corp: [0-9]+/[0-9]+[a-zA-Z]*' "$log" | tail -n1 | awk '{print $2}')
    crashes=0
    if [ "$rc" != 0 ] || grep -qE '^==[0-9]+== ERROR|deadly signal|panicked at' "$log"; then
        crashes=1
    fi
    printf '%-18s %6s %13s %8s %8s %12s %8s\n' "$t" "$took" "${execs:-?}" "${cov:-?}" \
        "${ft:-?}" "${corp:-?}" "$crashes"
    [ "$crashes" = 0 ]
}

echo "== fuzz: ${secs}s per target${FUZZ_RUNS:+ (or $runs executions)}, $jobs at a time; logs in $out"
# At most $jobs targets at a time; the next one starts as soon as one ends.
running=0
for t in "${targets[@]}"; do
    if [ "$running" -ge "$jobs" ]; then
        wait -n || true
        running=$((running - 1))
    fi
    run_one "$t" &
    running=$((running + 1))
done
wait

failed=0
printf '%-18s %6s %13s %8s %8s %12s %8s\n' target secs executions cov ft corpus crashes
for t in "${targets[@]}"; do
    summary "$t" || failed=1
done
if [ "$failed" != 0 ]; then
    echo "fuzz: CRASH: see the logs above and the inputs in fuzz/artifacts/" >&2
    for t in "${targets[@]}"; do
        grep -hE -A12 'panicked at|deadly signal|ERROR' "$out/$t.log" 2>/dev/null | head -n 40 || true
    done
    exit 1
fi
echo "== fuzz: no crash"
