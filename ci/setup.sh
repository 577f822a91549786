#!/usr/bin/env bash
# Installs everything the demo and the tests need on a fresh Debian 12 machine (as root).
# Idempotent: a second run finds everything in place and changes nothing.
set -euo pipefail

# resource-agents + libxml2-utils: ocf-tester (and ocf-shellfuncs) for the OCF agent in ha/.
# systemd: systemd-analyze, which checks the units in systemd/ (tests/tests/config.rs).
# dpkg-dev (dpkg-shlibdeps, dpkg-gencontrol), man-db and groff-base: ci/deb.sh builds the
# Debian package, tests/tests/package.rs renders its man pages.
need_pkgs=(qemu-system-x86 qemu-utils cpio e2fsprogs curl busybox-static iproute2 ca-certificates binutils libnbd-bin nftables resource-agents libxml2-utils systemd dpkg-dev man-db groff-base)
# The cluster tier (ha/testcluster/cluster.sh): Corosync and Pacemaker, run inside namespaces
# by the tests, never as services of this machine; pcs, to check the README's commands offline
# (pcs -f on a CIB file: tests/tests/ha.rs).
cluster_pkgs=(corosync pacemaker pacemaker-cli-utils pcs)

missing=()
for p in "${need_pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)

if [ "${#missing[@]}" -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # QEMU 10 from bookworm-backports matches the preinstalled qemu-utils 10 (installing
    # Debian 12's QEMU 7.2 would remove it) and is the newer peer the benchmarks compare with.
    bp=/etc/apt/sources.list.d/vhost-mirror-backports.sources
    if [ ! -f "$bp" ]; then
        uri=$(awk '/^URIs:/ && $2 ~ /debian$/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
        [ -n "$uri" ] || uri=http://deb.debian.org/debian
        cat >"$bp" <<SRC
Types: deb
URIs: $uri
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    fi
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends -t bookworm-backports qemu-system-x86 qemu-utils
    apt-get install -y -qq --no-install-recommends cpio e2fsprogs curl busybox-static iproute2 ca-certificates binutils libnbd-bin nftables resource-agents libxml2-utils systemd dpkg-dev man-db groff-base
fi

# Installs the cluster packages without starting them: their maintainer scripts ask invoke-rc.d,
# which asks /usr/sbin/policy-rc.d (exit 101: "not now"). An existing policy-rc.d is set aside
# meanwhile and put back afterwards, whatever happens.
policy_rc=/usr/sbin/policy-rc.d
policy_rc_saved=
restore_policy_rc() {
    if [ -n "$policy_rc_saved" ]; then mv -f "$policy_rc_saved" "$policy_rc"; else rm -f "$policy_rc"; fi
    policy_rc_saved=
}
install_cluster_pkgs() {
    if [ -e "$policy_rc" ] || [ -L "$policy_rc" ]; then
        policy_rc_saved=$(mktemp /usr/sbin/.policy-rc.d.saved.XXXXXX)
        mv -f "$policy_rc" "$policy_rc_saved"
    fi
    trap restore_policy_rc EXIT
    trap 'exit 130' INT TERM
    printf '#!/bin/sh\n# ci/setup.sh: no service starts while it installs packages\nexit 101\n' >"$policy_rc"
    chmod 0755 "$policy_rc"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
    restore_policy_rc
    trap - EXIT INT TERM
}

missing=()
for p in "${cluster_pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "setup: installing ${missing[*]} (services not started)"
    apt-get update -qq
    install_cluster_pkgs "${missing[@]}"
fi

# The metrics tier (tests/tests/metrics.rs) parses what both servers export with the
# Prometheus text parser of the Python client library, pinned here.
prometheus_client_version=0.26.0
have_prometheus_client() {
    python3 - "$prometheus_client_version" <<'PY' 2>/dev/null
import sys
from importlib.metadata import version
import prometheus_client.parser
sys.exit(0 if version("prometheus-client") == sys.argv[1] else 1)
PY
}
if ! have_prometheus_client; then
    echo "setup: installing prometheus-client $prometheus_client_version (pip)"
    if ! python3 -m pip --version >/dev/null 2>&1; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-pip
    fi
    # A distribution's own Python refuses pip installs (PEP 668) unless told otherwise.
    python3 -m pip install --quiet --disable-pip-version-check "prometheus-client==$prometheus_client_version" ||
        python3 -m pip install --quiet --disable-pip-version-check --break-system-packages \
            "prometheus-client==$prometheus_client_version"
    have_prometheus_client || { echo "setup: prometheus-client did not install" >&2; exit 1; }
fi

if ! command -v cargo >/dev/null; then
    echo "setup: cargo not found; install the Rust toolchain (rustup) first" >&2
    exit 1
fi
echo "setup: $(qemu-system-x86_64 --version | head -n1); $(cargo --version); prometheus-client $prometheus_client_version"
