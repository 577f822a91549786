#!/usr/bin/env bash
# Installs everything the demo and the tests need on a fresh Debian 12 machine (as root).
# Idempotent: a second run finds everything in place and changes nothing.
set -euo pipefail

# resource-agents + libxml2-utils: ocf-tester (and ocf-shellfuncs) for the OCF agent in ha/.
# systemd: systemd-analyze, which checks the units in systemd/ (tests/tests/config.rs).
# dpkg-dev (dpkg-shlibdeps, dpkg-gencontrol), man-db and groff-base: ci/deb.sh builds the
# Debian package, tests/tests/package.rs renders its man pages.
# make gcc bc bison flex libelf-dev xz-utils: images/build.sh builds the guest kernel.
need_pkgs=(qemu-system-x86 qemu-utils cpio e2fsprogs curl busybox-static iproute2 ca-certificates binutils libnbd-bin nftables resource-agents libxml2-utils systemd dpkg-dev man-db groff-base make gcc bc bison flex libelf-dev xz-utils)
# The cluster tier (ha/testcluster/cluster.sh): Corosync and Pacemaker, run inside namespaces
# by the tests, never as services of this machine; pcs, to check the README's commands offline
# (pcs -f on a CIB file: tests/tests/ha.rs).
cluster_pkgs=(corosync pacemaker pacemaker-cli-utils pcs)
# The libvirt test (tests/tests/libvirt.rs): Debian 12's libvirt 9 (monolithic libvirtd), started
# by the test itself when qemu:///system does not answer, never as a service of this machine.
libvirt_pkgs=(libvirt-daemon-system libvirt-clients libvirt-daemon-driver-qemu)

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
    apt-get install -y -qq --no-install-recommends cpio e2fsprogs curl busybox-static iproute2 ca-certificates binutils libnbd-bin nftables resource-agents libxml2-utils systemd dpkg-dev man-db groff-base make gcc bc bison flex libelf-dev xz-utils
fi

# Installs the cluster and libvirt packages without starting them: their maintainer scripts ask
# invoke-rc.d, which asks /usr/sbin/policy-rc.d (exit 101: "not now"). An existing policy-rc.d is
# set aside meanwhile and put back afterwards, whatever happens.
policy_rc=/usr/sbin/policy-rc.d
policy_rc_saved=
restore_policy_rc() {
    if [ -n "$policy_rc_saved" ]; then mv -f "$policy_rc_saved" "$policy_rc"; else rm -f "$policy_rc"; fi
    policy_rc_saved=
}
install_without_starting() {
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
for p in "${cluster_pkgs[@]}" "${libvirt_pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "setup: installing ${missing[*]} (services not started)"
    apt-get update -qq
    install_without_starting "${missing[@]}"
fi

# libvirt trusts its cache of a QEMU binary's capabilities only while KVM is as usable by QEMU's
# user (libvirt-qemu, in group kvm) as when it probed. Without udev (these machines run no
# systemd) /dev/kvm stays root's 0600, the check fails every time, and libvirt probes QEMU again
# about a dozen times per domain start: a minute each. Set what Debian's udev rule sets (0660,
# group kvm); root's use of /dev/kvm is unchanged, and a reboot or udev sets it the same way.
if [ -c /dev/kvm ] && getent group kvm >/dev/null; then
    if [ "$(stat -c %G:%a /dev/kvm)" != kvm:660 ]; then
        echo "setup: /dev/kvm to group kvm, mode 0660 (as udev does)"
        chgrp kvm /dev/kvm
        chmod 0660 /dev/kvm
    fi
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
