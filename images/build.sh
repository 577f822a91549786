#!/usr/bin/env bash
# Builds the file-server guest VM for the vhost-mirror VM tests, from Debian's packages only (the
# guest kernel is built from Debian's kernel source package).
#
#   images/build.sh [--firmware] OUTDIR
#
# Produces:
#   OUTDIR/vmlinuz     the guest kernel: by default (VHOST_MIRROR_GUEST_KERNEL=minimal) built
#                      from Debian's linux-source-6.1 with images/guest-kernel.config (tinyconfig
#                      plus what the guest uses, everything built in: about 7 minutes of
#                      `make -j2` once, cached in $VHOST_MIRROR_CACHE/kernel/), because under TCG
#                      it boots in about half the time of Debian's cloud kernel;
#                      VHOST_MIRROR_GUEST_KERNEL=debian: Debian's cloud kernel
#                      (linux-image-cloud-amd64's real package) and its virtio modules
#   OUTDIR/initrd.img  busybox initramfs: loads the virtio modules (debian), mounts the root device
#                      (kernel flag root=, default /dev/vda; ext4), switch_roots into it.
#                      Kernel flag vmprobe=1 prints VM-PROBE-OK and powers off at once (used by
#                      boot.sh to probe whether KVM works).
#   OUTDIR/disk.raw    sparse raw disk (default 256 MiB, env DISK_SIZE), whole-disk ext4
#                      holding the root filesystem: busybox + an HTTP file server (see README.md),
#                      and fio (Debian's package) with only the shared objects it loads. Kernel
#                      flag vmfio=<base64 of a fio job file> runs that job instead of the file
#                      server, prints its JSON output between VMFIO-BEGIN and VMFIO-END, then
#                      VMFIO-EXIT <status>, and powers off (README.md, "fio in the guest").
# With --firmware, also:
#   OUTDIR/boot-disk.raw  sparse raw disk (DISK_SIZE) for firmware boot (boot.sh --firmware):
#                      MBR with GRUB's boot.img, GRUB core.img in the gap after the MBR, one
#                      ext4 partition (1 MiB..end, /dev/vda1) with the same root filesystem (less
#                      fio: vmfio= needs direct kernel boot's command line) plus
#                      /boot/vmlinuz and /boot/initrd.img. GRUB (grub-pc-bin + grub-common,
#                      apt-get download + dpkg -x like the kernel) loads them from there.
#                      Why GRUB and not syslinux/extlinux: README.md, "Why direct kernel boot,
#                      and firmware boot".
#
# Downloaded .deb files are cached in $VHOST_MIRROR_CACHE (default OUTDIR/cache), so a second
# run downloads nothing. The script is idempotent: every output carries a stamp (hash of its
# inputs and of this script); outputs whose stamp matches are left alone. disk.raw is also
# rebuilt if it was modified after it was built (e.g. booted directly instead of a copy).
set -euo pipefail

die() { echo "build.sh: $*" >&2; exit 1; }
log() { echo "build.sh: $*" >&2; }

FIRMWARE=0
if [ "${1:-}" = --firmware ]; then FIRMWARE=1; shift; fi
[ $# -eq 1 ] || die "usage: $0 [--firmware] OUTDIR"
OUT=$1
DISK_SIZE=${DISK_SIZE:-256M}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SELF="$HERE/$(basename "${BASH_SOURCE[0]}")"

# ---- tools -------------------------------------------------------------------------------
missing=()
need() { command -v "$1" >/dev/null 2>&1 || missing+=("$1 (package $2)"); }
need apt-get apt
need apt-cache apt
need dpkg dpkg
need cpio cpio
need gzip gzip
need mke2fs e2fsprogs
need strings binutils
need readelf binutils
need sha256sum coreutils
need truncate coreutils
GUEST_KERNEL=${VHOST_MIRROR_GUEST_KERNEL:-minimal}
case "$GUEST_KERNEL" in
    minimal)
        need make make
        need gcc gcc
        need bc bc
        need bison bison
        need flex flex
        need xz xz-utils
        [ -e /usr/include/libelf.h ] || missing+=("libelf.h (package libelf-dev)")
        ;;
    debian) ;;
    *) die "VHOST_MIRROR_GUEST_KERNEL=$GUEST_KERNEL: minimal or debian" ;;
esac
[ ${#missing[@]} -eq 0 ] || die "missing tools: ${missing[*]} (run ci/setup.sh)"

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
CACHE=${VHOST_MIRROR_CACHE:-$OUT/cache}
mkdir -p "$CACHE/debs" "$CACHE/extract"
WORK="$OUT/work"

# Serialise concurrent builds into the same OUTDIR (e.g. parallel test runs).
if command -v flock >/dev/null 2>&1; then
    exec 9>"$OUT/.build.lock"
    flock 9
fi

# ---- 1. resolve + download packages (cached) ---------------------------------------------
# The meta package linux-image-cloud-amd64 depends on the real, versioned kernel package.
resolve_kernel_pkg() {
    apt-cache depends linux-image-cloud-amd64 2>/dev/null \
        | awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ {print $2; exit}'
}

# Prints the path of the cached .deb for package $1, downloading it if needed.
# A package name recorded in the cache is reused without asking apt again, so a second run
# neither downloads nor needs up-to-date apt lists.
fetch_deb() {
    local pkg=$1 f
    f=$(ls "$CACHE/debs/${pkg}"_*.deb 2>/dev/null | sort -V | tail -n1 || true)
    if [ -z "$f" ]; then
        log "downloading $pkg"
        (cd "$CACHE/debs" && apt-get download "$pkg" >/dev/null 2>"$CACHE/debs/.apt.err") \
            || { cat "$CACHE/debs/.apt.err" >&2; die "apt-get download $pkg failed"; }
        f=$(ls "$CACHE/debs/${pkg}"_*.deb 2>/dev/null | sort -V | tail -n1 || true)
        [ -n "$f" ] || die "apt-get download $pkg produced no .deb"
    fi
    echo "$f"
}

if [ "$GUEST_KERNEL" = debian ]; then
    if [ -s "$CACHE/kernel-package" ]; then
        KPKG=$(cat "$CACHE/kernel-package")
    else
        KPKG=$(resolve_kernel_pkg)
        [ -n "$KPKG" ] || die "cannot resolve linux-image-cloud-amd64 to a kernel package (apt-get update?)"
        echo "$KPKG" >"$CACHE/kernel-package"
    fi
else
    KPKG=linux-source-6.1
fi
KDEB=$(fetch_deb "$KPKG")
BDEB=$(fetch_deb busybox-static)

# dpkg -x into a directory named after the .deb; a .done marker makes it idempotent.
extract() {
    local deb=$1 dir
    dir="$CACHE/extract/$(basename "$deb" .deb)"
    if [ ! -e "$dir/.done" ]; then
        rm -rf "$dir"
        mkdir -p "$dir"
        dpkg -x "$deb" "$dir"
        touch "$dir/.done"
    fi
    echo "$dir"
}
BDIR=$(extract "$BDEB")

BUSYBOX="$BDIR/bin/busybox"
[ -x "$BUSYBOX" ] || die "no bin/busybox in $BDEB"

# The minimal guest kernel: tinyconfig, then images/guest-kernel.config merged in (every
# option it sets must come through: a renamed or unmet option fails here, not at boot), built
# once per source package and config (cached by their hash). Prints the bzImage's path.
build_minimal_kernel() {
    local frag="$HERE/guest-kernel.config" key dir tmp src line
    key=$( (basename "$KDEB"; cat "$frag") | sha256sum | cut -c1-16)
    dir="$CACHE/kernel/$key"
    if [ -s "$dir/bzImage" ]; then
        echo "$dir/bzImage"
        return
    fi
    log "building the guest kernel from $(basename "$KDEB") with images/guest-kernel.config" \
        "(once; about 7 minutes of make -j2)"
    rm -rf "$dir"
    mkdir -p "$dir"
    tmp="$WORK/kernel"
    rm -rf "$tmp"
    mkdir -p "$tmp"
    dpkg-deb --fsys-tarfile "$KDEB" | tar -x -C "$tmp" --wildcards './usr/src/linux-source-*.tar.xz' \
        || die "no kernel source tarball in $KDEB"
    tar -xJf "$tmp"/usr/src/linux-source-*.tar.xz -C "$tmp" || die "cannot unpack the kernel source"
    rm -rf "$tmp/usr"
    src=$(ls -d "$tmp"/linux-source-*/ | head -n1)
    [ -n "$src" ] || die "no linux-source-* directory in $KDEB"
    (
        cd "$src"
        make -s tinyconfig >"$dir/config.log" 2>&1
        ./scripts/kconfig/merge_config.sh -m .config "$frag" >>"$dir/config.log" 2>&1
        make -s olddefconfig >>"$dir/config.log" 2>&1
    ) || { tail -20 "$dir/config.log" >&2; die "kernel configuration failed ($dir/config.log)"; }
    while IFS= read -r line; do
        case "$line" in
            CONFIG_*=*) grep -qxF "$line" "$src/.config" \
                || die "images/guest-kernel.config: $line did not come through (unmet dependency?)" ;;
        esac
    done <"$frag"
    make -C "$src" -j"$(nproc)" bzImage >"$dir/build.log" 2>&1 \
        || { tail -30 "$dir/build.log" >&2; die "kernel build failed ($dir/build.log)"; }
    cp "$src/.config" "$dir/config"
    cp "$src/arch/x86/boot/bzImage" "$dir/bzImage.tmp"
    mv "$dir/bzImage.tmp" "$dir/bzImage"
    rm -rf "$tmp"
    echo "$dir/bzImage"
}

if [ "$GUEST_KERNEL" = debian ]; then
    KDIR=$(extract "$KDEB")
    VMLINUZ_SRC=$(ls "$KDIR"/boot/vmlinuz-* 2>/dev/null | head -n1)
    [ -n "$VMLINUZ_SRC" ] || die "no /boot/vmlinuz-* in $KDEB"
    KVER=${VMLINUZ_SRC##*/vmlinuz-}
    MODDIR="$KDIR/lib/modules/$KVER"
    [ -d "$MODDIR" ] || die "no modules dir $MODDIR"
else
    VMLINUZ_SRC=$(build_minimal_kernel)
    KVER="minimal-$(sha256sum "$VMLINUZ_SRC" | cut -c1-16)"
fi

# ---- fio (the VM tests' load generator) and exactly the shared objects it loads -----------
# Debian's fio links its engines in (NEEDED: libaio, librados, librbd, libgfapi, libibverbs,
# libnbd, libpmem... and libc), and its package closure is ~113 packages (217 MiB, python3 and
# perl included). The guest gets only fio's binary, the dynamic loader and the shared objects
# the loader would open, found as ld.so finds them (NEEDED sonames, recursively, through each
# object's RUNPATH/RPATH and the multiarch system directories) in the library packages that the
# needing package Depends on. Only those packages are downloaded (cached like the others).
# The result is cached in $CACHE/fio-closure (one "DEB SOURCE DEST" line per file, DEB a
# cached .deb's name, SOURCE the real file inside it, DEST its path in the guest), reused while
# the fio package and every listed .deb are unchanged, so a second run neither resolves nor
# downloads anything.
FIO_SYSDIRS=(lib/x86_64-linux-gnu usr/lib/x86_64-linux-gnu lib usr/lib)
FIO_PKGS=()           # extracted packages searched for sonames, in the order they came
declare -A FIO_PKG_DEB=() FIO_PKG_DIR=() FIO_SO_DONE=()
FIO_LINES=()

pkg_of_deb() { local b; b=$(basename "$1" .deb); echo "${b%%_*}"; }

# in_root ROOT REL: REL with its symlinks followed inside ROOT (absolute targets are relative
# to ROOT); prints the real file's path relative to ROOT, or fails.
in_root() {
    local root=$1 rel=$2 t i=0
    while [ -L "$root/$rel" ]; do
        i=$((i + 1)); [ $i -le 40 ] || return 1
        t=$(readlink "$root/$rel")
        case "$t" in /*) rel=${t#/} ;; *) rel=$(dirname "$rel")/$t ;; esac
    done
    [ -f "$root/$rel" ] || return 1
    echo "$rel"
}

fio_add_pkg() { # fio_add_pkg DEB: extracts it and searches it from now on
    local deb=$1 pkg
    pkg=$(pkg_of_deb "$deb")
    [ -n "${FIO_PKG_DIR[$pkg]:-}" ] && return 0
    FIO_PKG_DEB[$pkg]=$deb
    FIO_PKG_DIR[$pkg]=$(extract "$deb")
    FIO_PKGS+=("$pkg")
}

# fio_find SONAME DIR...: the first extracted package with DIR/SONAME (DIRs relative to the
# root, searched in order); prints "PKG DIR".
fio_find() {
    local so=$1 pkg d; shift
    for d in "$@"; do
        for pkg in "${FIO_PKGS[@]}"; do
            if in_root "${FIO_PKG_DIR[$pkg]}" "$d/$so" >/dev/null; then echo "$pkg $d"; return 0; fi
        done
    done
    return 1
}

# The packages a library may come from: PKG's Depends and Pre-Depends (alternatives
# included) with "lib" in their name. With MODE "named": only the package Debian's naming rule
# gives for SONAME (libfoo.so.1 -> libfoo1, libfoo2.so.3 -> libfoo2-3) and those whose name
# starts like SONAME; with "all": those first, then the others.
fio_candidates() { # fio_candidates MODE PKG SONAME
    local mode=$1 deb=${FIO_PKG_DEB[$2]} so=$3 stem ver guess all
    stem=$(echo "${so%%.so*}" | tr '[:upper:]_' '[:lower:]-')
    ver=${so#*.so}; ver=${ver#.}
    case "$stem" in *[0-9]) guess="$stem-$ver" ;; *) guess="$stem$ver" ;; esac
    all=$( { dpkg-deb -f "$deb" Depends; dpkg-deb -f "$deb" Pre-Depends; } 2>/dev/null \
        | tr ',|' '\n\n' | sed 's/(.*//; s/\[.*//; s/:any//; s/[[:space:]]//g' \
        | grep 'lib' | awk '!seen[$0]++' || true)
    {
        echo "$all" | grep -x -- "$guess" || true
        echo "$all" | grep -- "^$stem" || true
        [ "$mode" = named ] || echo "$all"
    } | awk 'NF && !seen[$0]++'
}

# fio_dirs_of PKG REL: where ld.so looks for the NEEDED of PKG's file REL: its RUNPATH
# (or RPATH), $ORIGIN expanded, then the system directories.
fio_dirs_of() {
    local f="${FIO_PKG_DIR[$1]}/$2" rp d origin
    origin=$(dirname "$2")
    rp=$(readelf -d "$f" | sed -n 's/.*(RUNPATH).*\[\(.*\)\]/\1/p')
    [ -n "$rp" ] || rp=$(readelf -d "$f" | sed -n 's/.*(RPATH).*\[\(.*\)\]/\1/p')
    for d in $(echo "$rp" | tr ':' ' '); do
        d=${d//\$\{ORIGIN\}/\/$origin}; d=${d//\$ORIGIN/\/$origin}
        echo "${d#/}"
    done
    printf '%s\n' "${FIO_SYSDIRS[@]}"
}

# fio_resolve PKG REL: records every shared object PKG's file REL needs, recursively.
# Pass 1 takes the sonames found in an extracted package or in the package named after them;
# pass 2 the rest, trying each dependency in turn (by then most are extracted).
fio_resolve() {
    local pkg=$1 rel=$2 so hit c deb hpkg hdir real pass mode dirs=() pending=()
    mapfile -t dirs < <(fio_dirs_of "$pkg" "$rel")
    for pass in 1 2; do
        mode=named; [ $pass = 2 ] && mode=all
        for so in $(readelf -d "${FIO_PKG_DIR[$pkg]}/$rel" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'); do
            [ -n "${FIO_SO_DONE[$so]:-}" ] && continue
            hit=$(fio_find "$so" "${dirs[@]}" || true)
            if [ -z "$hit" ]; then
                for c in $(fio_candidates "$mode" "$pkg" "$so"); do
                    [ -n "${FIO_PKG_DIR[$c]:-}" ] && continue
                    deb=$(fetch_deb "$c") || die "fio: cannot download $c"
                    fio_add_pkg "$deb"
                    hit=$(fio_find "$so" "${dirs[@]}" || true)
                    [ -n "$hit" ] && break
                done
            fi
            if [ -z "$hit" ]; then
                [ $pass = 2 ] && die "fio: $so (needed by $rel) is in no library $pkg depends on"
                continue
            fi
            FIO_SO_DONE[$so]=1
            hpkg=${hit%% *} hdir=${hit#* }
            real=$(in_root "${FIO_PKG_DIR[$hpkg]}" "$hdir/$so")
            FIO_LINES+=("$(basename "${FIO_PKG_DEB[$hpkg]}") $real $hdir/$so")
            pending+=("$hpkg $real")
        done
    done
    for c in "${pending[@]}"; do fio_resolve "${c%% *}" "${c#* }"; done
}

FIO_DEB=$(fetch_deb fio)
FIO_CLOSURE="$CACHE/fio-closure"
fio_closure_ok() {
    local deb src dst
    [ -s "$FIO_CLOSURE" ] || return 1
    [ "$(head -n1 "$FIO_CLOSURE")" = "# $(basename "$FIO_DEB")" ] || return 1
    while read -r deb src dst; do
        case "$deb" in '#'*) continue ;; esac
        [ -f "$CACHE/debs/$deb" ] || return 1
    done <"$FIO_CLOSURE"
}
if ! fio_closure_ok; then
    log "fio: resolving the shared objects of $(basename "$FIO_DEB")"
    fio_add_pkg "$FIO_DEB"
    [ -f "${FIO_PKG_DIR[fio]}/usr/bin/fio" ] || die "no usr/bin/fio in $FIO_DEB"
    interp=$(readelf -l "${FIO_PKG_DIR[fio]}/usr/bin/fio" \
        | sed -n 's/.*Requesting program interpreter: \(.*\)\]/\1/p')
    [ -n "$interp" ] || die "fio: no program interpreter in usr/bin/fio"
    fio_add_pkg "$(fetch_deb libc6)"
    interp_real=$(in_root "${FIO_PKG_DIR[libc6]}" "${interp#/}") \
        || die "fio: no $interp in libc6"
    FIO_LINES+=("$(basename "$FIO_DEB") usr/bin/fio usr/bin/fio"
                "$(basename "${FIO_PKG_DEB[libc6]}") $interp_real ${interp#/}")
    fio_resolve fio usr/bin/fio
    { echo "# $(basename "$FIO_DEB")"; printf '%s\n' "${FIO_LINES[@]}"; } >"$FIO_CLOSURE.tmp"
    mv "$FIO_CLOSURE.tmp" "$FIO_CLOSURE"
    log "fio: $(( ${#FIO_LINES[@]} - 2 )) shared objects from ${#FIO_PKGS[@]} packages"
fi
FIO_HASH=$(sha256sum "$FIO_CLOSURE" | cut -d' ' -f1)

# Installs fio, the loader and the shared objects of $FIO_CLOSURE into ROOT.
install_fio() {
    local root=$1 deb src dst dir
    while read -r deb src dst; do
        case "$deb" in '#'*) continue ;; esac
        dir=$(extract "$CACHE/debs/$deb")
        mkdir -p "$root/$(dirname "$dst")"
        cp "$dir/$src" "$root/$dst"
    done <"$FIO_CLOSURE"
}

# Stamp = hash of this script + the package files it is built from + parameters.
SCRIPT_HASH=$(sha256sum "$SELF" | cut -d' ' -f1)
stamp_for() { printf '%s\n' "$SCRIPT_HASH" "$(basename "$KDEB")" "$KVER" "$(basename "$BDEB")" "$@" | sha256sum | cut -d' ' -f1; }
up_to_date() { # up_to_date OUTPUT STAMP: output exists, stamp matches, not modified since
    local out=$1 stamp=$2 sf="$OUT/.stamp.$(basename "$1")"
    [ -e "$out" ] && [ -f "$sf" ] || return 1
    [ "$(cat "$sf")" = "$stamp $(stat -c '%s %Y' "$out")" ]
}
record_stamp() { echo "$2 $(stat -c '%s %Y' "$1")" >"$OUT/.stamp.$(basename "$1")"; }

# Installs busybox into ROOT (ROOT/bin/busybox + a symlink per applet).
install_busybox() {
    local root=$1 app
    mkdir -p "$root/bin" "$root/sbin" "$root/usr/bin" "$root/usr/sbin"
    cp "$BUSYBOX" "$root/bin/busybox"
    for app in $("$BUSYBOX" --list-full); do
        [ "$app" = bin/busybox ] && continue
        [ -e "$root/$app" ] || [ -L "$root/$app" ] || ln -s /bin/busybox "$root/$app"
    done
}

# ---- 2. vmlinuz --------------------------------------------------------------------------
st=$(stamp_for vmlinuz)
if up_to_date "$OUT/vmlinuz" "$st"; then
    log "vmlinuz up to date"
else
    cp "$VMLINUZ_SRC" "$OUT/vmlinuz.tmp" && mv "$OUT/vmlinuz.tmp" "$OUT/vmlinuz"
    record_stamp "$OUT/vmlinuz" "$st"
    log "vmlinuz: $KPKG ($KVER)"
fi

# ---- 3. initrd.img -----------------------------------------------------------------------
# Module name (as in depends=) -> path of its .ko[.xz|.zst|.gz] in the kernel package.
find_module() {
    local name=$1 alt
    alt=$(echo "$name" | tr _ -)
    find "$MODDIR/kernel" \( -name "$name.ko*" -o -name "$alt.ko*" \) -print -quit
}
is_builtin() {
    local name=$1
    [ -f "$MODDIR/modules.builtin" ] \
        && tr - _ <"$MODDIR/modules.builtin" | grep -q "/$name\.ko\$"
}
# Writes the module as a plain .ko (busybox insmod needs uncompressed modules).
decompress_module() {
    local src=$1 dst=$2
    case "$src" in
        *.ko) cp "$src" "$dst" ;;
        *.ko.xz) command -v xz >/dev/null || die "xz (package xz-utils) needed for $src"; xz -dc "$src" >"$dst" ;;
        *.ko.zst) command -v zstd >/dev/null || die "zstd (package zstd) needed for $src"; zstd -qdc "$src" >"$dst" ;;
        *.ko.gz) gzip -dc "$src" >"$dst" ;;
        *) die "unknown module format $src" ;;
    esac
}
# Topological load order of the wanted modules from their depends= fields.
MOD_ORDER=()
declare -A MOD_SEEN=()
resolve_module() {
    local name=$1 path deps d tmp
    [ -n "${MOD_SEEN[$name]:-}" ] && return 0
    MOD_SEEN[$name]=1
    path=$(find_module "$name")
    if [ -z "$path" ]; then
        is_builtin "$name" && return 0
        die "kernel module $name not found in $KPKG"
    fi
    tmp="$WORK/mods/$name.ko"
    decompress_module "$path" "$tmp"
    deps=$(strings "$tmp" | sed -n 's/^depends=//p' | head -n1 | tr , ' ')
    for d in $deps; do resolve_module "$d"; done
    MOD_ORDER+=("$name")
}

write_initramfs_init() {
    cat >"$1" <<'EOF'
#!/bin/sh
# initramfs /init (generated by images/build.sh)
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec </dev/console >/dev/console 2>&1

rescue() {
    echo "INITRAMFS-FAILED: $*"
    if grep -q 'initdebug=1' /proc/cmdline; then exec sh; fi
    poweroff -f
}

for arg in $(cat /proc/cmdline); do
    case "$arg" in
        vmprobe=1)
            echo VM-PROBE-OK
            poweroff -f ;;
    esac
done

for m in $(cat /etc/modules.order); do
    insmod "/lib/modules/$m.ko" || rescue "insmod $m"
done

# root=/dev/vda (direct kernel boot, whole-disk ext4) or /dev/vda1 (boot-disk.raw).
root=/dev/vda
for arg in $(cat /proc/cmdline); do
    case "$arg" in root=/dev/*) root=${arg#root=} ;; esac
done

i=0
while [ ! -b "$root" ]; do
    i=$((i + 1))
    [ $i -gt 300 ] && rescue "no $root after 30 s"
    sleep 0.1
done

mkdir -p /newroot
mount -t ext4 -o rw "$root" /newroot || rescue "mount $root"
[ -x /newroot/sbin/init ] || rescue "no /sbin/init on $root"
umount /proc /sys
mount --move /dev /newroot/dev 2>/dev/null || umount /dev
exec switch_root /newroot /sbin/init
EOF
    chmod 755 "$1"
}

mkdir -p "$WORK"
st_initrd_base="$KVER"
st=$(stamp_for initrd "$st_initrd_base")
if up_to_date "$OUT/initrd.img" "$st"; then
    log "initrd.img up to date"
else
    rm -rf "$WORK/initrd" "$WORK/mods"
    mkdir -p "$WORK/initrd" "$WORK/mods"
    # The minimal kernel has them built in.
    if [ "$GUEST_KERNEL" = debian ]; then
        for m in virtio_pci virtio_blk virtio_net; do resolve_module "$m"; done
    fi
    R="$WORK/initrd"
    install_busybox "$R"
    mkdir -p "$R/proc" "$R/sys" "$R/dev" "$R/newroot" "$R/etc" "$R/lib/modules"
    for m in "${MOD_ORDER[@]}"; do cp "$WORK/mods/$m.ko" "$R/lib/modules/"; done
    printf '%s\n' "${MOD_ORDER[@]}" >"$R/etc/modules.order"
    # The kernel's built-in initramfs already has /dev/console; add it too when we can.
    mknod -m 600 "$R/dev/console" c 5 1 2>/dev/null || true
    write_initramfs_init "$R/init"
    find "$R" -exec touch -h -d @0 {} +  # reproducible archive
    (cd "$R" && find . -print0 | LC_ALL=C sort -z \
        | cpio --null -o -H newc --quiet --reproducible 2>/dev/null \
        | gzip -9n) >"$OUT/initrd.img.tmp"
    mv "$OUT/initrd.img.tmp" "$OUT/initrd.img"
    record_stamp "$OUT/initrd.img" "$st"
    log "initrd.img: modules ${MOD_ORDER[*]}"
fi

# ---- 4. disk.raw (root filesystem with the HTTP file server) ------------------------------
# write_rootfs ROOT [fio]: with "fio", fio and its shared objects too (disk.raw only: the
# vmfio= flag needs direct kernel boot's -append, and the firmware disk stays small for the
# failover and cluster tiers, which copy and resync it).
write_rootfs() {
    local R=$1
    install_busybox "$R"
    [ "${2:-}" != fio ] || install_fio "$R"
    mkdir -p "$R"/{proc,sys,dev,tmp,run,root,etc/init.d,srv/files,srv/cgi-bin,var/log}
    chmod 1777 "$R/tmp"
    echo fileserver >"$R/etc/hostname"
    printf 'root:x:0:0:root:/root:/bin/sh\n' >"$R/etc/passwd"
    printf 'root:x:0:\n' >"$R/etc/group"

    cat >"$R/etc/inittab" <<'EOF'
::sysinit:/etc/init.d/rcS
::respawn:/usr/sbin/httpd -f -v -p 80 -h /srv
::once:/etc/init.d/ready
::shutdown:/etc/init.d/halt-fs
EOF

    cat >"$R/etc/init.d/rcS" <<'EOF'
#!/bin/sh
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
grep -q ' /dev ' /proc/mounts || mount -t devtmpfs devtmpfs /dev
mount -t tmpfs -o mode=755 tmpfs /run
hostname -F /etc/hostname
ip link set lo up
ip addr add 10.0.2.15/24 dev eth0
ip link set eth0 up
ip route add default via 10.0.2.2
echo "rcS: network up: eth0 10.0.2.15/24 gw 10.0.2.2"
# Kernel flag vmfio=<base64 of a fio job file>: run that job instead of the file server;
# /etc/init.d/vmfio powers off and never returns.
case " $(cat /proc/cmdline) " in *" vmfio="*) exec /etc/init.d/vmfio ;; esac
EOF

    # Kernel flag vmfio=BASE64 (images/README.md): decodes the fio job file, waits for the block
    # devices its filename= lines name, prints VMFIO-START, runs fio with JSON output, prints
    # that output between VMFIO-BEGIN and VMFIO-END, then VMFIO-EXIT <fio's exit status>, and
    # powers off with / read-only. Setup failures print VMFIO-FAILED: <why> and exit 250-254.
    cat >"$R/etc/init.d/vmfio" <<'EOF'
#!/bin/sh
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
D=/run/vmfio
finish() {
    echo "VMFIO-EXIT $1"
    sync
    mount -o remount,ro / || { sleep 1; sync; mount -o remount,ro /; }
    poweroff -f
}
fail() { echo "VMFIO-FAILED: $2"; finish "$1"; }
job=
for arg in $(cat /proc/cmdline); do
    case "$arg" in vmfio=*) job=${arg#vmfio=} ;; esac
done
mkdir -p "$D"
echo "$job" | base64 -d >"$D/job.fio" 2>"$D/base64.err" || fail 254 "vmfio= is not base64"
[ -s "$D/job.fio" ] || fail 254 "vmfio= holds an empty job file"
for dev in $(sed -n 's/^[[:space:]]*filename[[:space:]]*=[[:space:]]*//p' "$D/job.fio" | tr ':' ' '); do
    case "$dev" in /dev/*) ;; *) continue ;; esac
    i=0
    while [ ! -b "$dev" ]; do
        i=$((i + 1))
        [ $i -gt 300 ] && fail 253 "no block device $dev after 30 s"
        sleep 0.1
    done
done
echo "VMFIO-START"
status=0
fio --output-format=json --eta=never --output="$D/out.json" "$D/job.fio" || status=$?
# fio may put a warning line or two before the JSON document (e.g. "fio: multiple writers
# may overwrite blocks ...").
echo "VMFIO-BEGIN"
cat "$D/out.json"
echo
echo "VMFIO-END"
# Completion interrupts per virtqueue of each virtio disk: VMFIO-IRQ vdb req.0 1234
for dev in /sys/block/vd*; do
    [ -e "$dev/device" ] || continue
    vdev=$(basename "$(readlink "$dev/device")")
    grep " $vdev-" /proc/interrupts | while read -r line; do
        name=${line##* }
        n=0
        for f in ${line#*:}; do case "$f" in *[!0-9]*) break ;; *) n=$((n + f)) ;; esac; done
        echo "VMFIO-IRQ ${dev##*/} ${name#"$vdev"-} $n"
    done
done
finish "$status"
EOF

    # Waits until httpd answers, then prints the marker the tests wait for.
    cat >"$R/etc/init.d/ready" <<'EOF'
#!/bin/sh
i=0
while ! wget -q -O /dev/null http://127.0.0.1/cgi-bin/list 2>/dev/null; do
    i=$((i + 1))
    if [ $i -gt 600 ]; then echo "FILESERVER-FAILED: httpd not answering"; exit 1; fi
    sleep 0.1
done
echo "FILESERVER-READY port 80 root /srv files /srv/files"
EOF

    cat >"$R/etc/init.d/halt-fs" <<'EOF'
#!/bin/sh
sync
mount -o remount,ro / || { sleep 1; sync; mount -o remount,ro /; }
EOF

    # POST /cgi-bin/upload?name=NAME : durable, binary-safe upload.
    cat >"$R/srv/cgi-bin/upload" <<'EOF'
#!/bin/sh
# POST /cgi-bin/upload?name=NAME, body = file bytes.
# temp file -> fdatasync -> rename -> fsync dir -> reply "sha256=<hex>".
DIR=/srv/files
reply() { # reply "CODE TEXT" BODY
    printf 'HTTP/1.0 %s\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n%s\n' "$1" "$2"
    exit 0
}
tmp=
fail() { [ -n "$tmp" ] && rm -f "$tmp"; reply "500 Internal Server Error" "error: $*"; }

[ "$REQUEST_METHOD" = POST ] || reply "405 Method Not Allowed" "error: use POST"
name=
IFS='&'
for kv in $QUERY_STRING; do
    case "$kv" in name=*) name=${kv#name=} ;; esac
done
unset IFS
case "$name" in
    "" | .* | *[!A-Za-z0-9._-]*) reply "400 Bad Request" "error: bad name" ;;
esac
# busybox httpd leaves CONTENT_LENGTH unset for an empty body.
len=${CONTENT_LENGTH:-0}
case "$len" in
    "" | *[!0-9]*) reply "400 Bad Request" "error: bad Content-Length" ;;
esac

tmp="$DIR/.upload.$$"
# head -c copies exactly $len bytes, binary-safe (sh read is not).
head -c "$len" >"$tmp" || fail "write"
got=$(stat -c %s "$tmp") || fail "stat"
[ "$got" = "$len" ] || fail "short body: got $got of $len bytes"
sync -d "$tmp" || fail "fdatasync"
mv -f "$tmp" "$DIR/$name" || fail "rename"
tmp=
sync -d "$DIR" || fail "fsync dir"
sum=$(sha256sum "$DIR/$name" | cut -d' ' -f1) || fail "sha256"
echo "upload: $name $len bytes sha256=$sum" >/dev/console
reply "200 OK" "sha256=$sum"
EOF

    # GET /cgi-bin/list : "NAME SIZE SHA256" per file.
    cat >"$R/srv/cgi-bin/list" <<'EOF'
#!/bin/sh
printf 'HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n'
for f in /srv/files/*; do
    [ -f "$f" ] || continue
    printf '%s %s %s\n' "${f##*/}" "$(stat -c %s "$f")" "$(sha256sum "$f" | cut -d' ' -f1)"
done
EOF

    # GET /cgi-bin/halt : reply, then sync, remount / read-only, power off.
    cat >"$R/srv/cgi-bin/halt" <<'EOF'
#!/bin/sh
printf 'HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\nhalting\n'
# Detach fully (no inherited stdout) so httpd finishes the reply now.
setsid sh -c '
    sleep 1
    echo "HALT: syncing and remounting / read-only" >/dev/console
    sync
    if mount -o remount,ro / ; then echo "HALT: / is read-only" >/dev/console
    else sleep 1; sync; mount -o remount,ro / || echo "HALT: remount ro failed" >/dev/console
    fi
    echo "HALT: power off" >/dev/console
    poweroff -f
' </dev/null >/dev/null 2>&1 &
EOF

    chmod 755 "$R/etc/init.d/"* "$R/srv/cgi-bin/"*
}

st=$(stamp_for disk "$DISK_SIZE" "$FIO_HASH")
if up_to_date "$OUT/disk.raw" "$st"; then
    log "disk.raw up to date"
else
    rm -rf "$WORK/rootfs"
    mkdir -p "$WORK/rootfs"
    write_rootfs "$WORK/rootfs" fio
    rm -f "$OUT/disk.raw.tmp"
    truncate -s "$DISK_SIZE" "$OUT/disk.raw.tmp"
    mke2fs -q -F -t ext4 -L fileserver -E root_owner=0:0 -d "$WORK/rootfs" "$OUT/disk.raw.tmp" \
        || die "mke2fs failed"
    mv "$OUT/disk.raw.tmp" "$OUT/disk.raw"
    record_stamp "$OUT/disk.raw" "$st"
    log "disk.raw: $DISK_SIZE ext4, $(du -k "$OUT/disk.raw" | cut -f1) KiB allocated"
fi

# ---- 5. boot-disk.raw (--firmware: MBR + GRUB + ext4 partition) -------------------------
# SeaBIOS reads the MBR to 0x7c00 and runs it. The boot chain must never execute code that was
# read by the vhost-user backend into guest memory where code already ran (under TCG, QEMU keeps
# the stale translation: README.md, "Why direct kernel boot, and firmware boot"). An MBR that chainloads a partition
# boot sector to 0x7c00 (syslinux's mbr.bin + ldlinux.bss / extlinux) does exactly that and
# hangs. GRUB's boot.img loads core.img through a buffer at 0x70000 and copies it with the CPU,
# and GRUB reads files through its own buffers, so nothing read by the backend is run in place.
# linux16/initrd16, GRUB's 16-bit Linux boot protocol (the kernel's real-mode setup code runs
# first, as with QEMU's -kernel), not `linux`'s 32-bit entry: under TCG the kernel then
# decompresses itself in about 1.7 s instead of 5 s (measured on the development machine,
# 2026-12-02: file server answering 8.9 s after QEMU started instead of 12.7 s, 3 boots each;
# why the 32-bit entry is slower under TCG was not found). RHEL 7's BIOS GRUB boots linux16 too.
GRUB_EMBED_CFG='serial --unit=0 --speed=115200
terminal_input serial console
terminal_output serial console
echo "GRUB: booting /boot/vmlinuz from (hd0,msdos1)"
set root=(hd0,msdos1)
linux16 /boot/vmlinuz console=ttyS0 root=/dev/vda1 rw panic=-1 quiet
echo "GRUB: kernel loaded"
initrd16 /boot/initrd.img
echo "GRUB: initrd loaded"
boot
echo "GRUB-FAILED: could not boot /boot/vmlinuz"
halt'
GRUB_MODULES="biosdisk part_msdos ext2 linux16 boot serial terminal echo halt"
PART_START=2048  # sectors: the partition starts at 1 MiB; GRUB's core.img lives before it

# MBR partition table (bytes 440..511): disk id, one bootable Linux partition (LBA only).
write_mbr_table() { # IMAGE START_SECTOR SECTORS
    local img=$1 start=$2 count=$3
    # le32 N: N as 4 little-endian bytes, written as printf escapes (NUL-safe).
    le32() { local h; h=$(printf '%08x' "$1"); printf '\\x%s' "${h:6:2}" "${h:4:2}" "${h:2:2}" "${h:0:2}"; }
    {
        printf '\x56\x4d\x49\x52\x00\x00'          # disk identifier "VMIR", 2 reserved bytes
        printf '\x80\xfe\xff\xff\x83\xfe\xff\xff'  # active, CHS unused, type 83, CHS unused
        printf "$(le32 "$start")$(le32 "$count")"  # LBA start, number of sectors
        head -c 48 /dev/zero                       # partitions 2-4: empty
        printf '\x55\xaa'
    } | dd of="$img" bs=1 seek=440 conv=notrunc status=none
}

if [ "$FIRMWARE" = 1 ]; then
    GPDEB=$(fetch_deb grub-pc-bin)
    GCDEB=$(fetch_deb grub-common)
    st=$(stamp_for boot-disk "$DISK_SIZE" "$KVER" "$(basename "$GPDEB")" "$(basename "$GCDEB")")
    if up_to_date "$OUT/boot-disk.raw" "$st"; then
        log "boot-disk.raw up to date"
    else
        GPDIR=$(extract "$GPDEB")
        GCDIR=$(extract "$GCDEB")
        GRUB_LIB="$GPDIR/usr/lib/grub/i386-pc"
        MKIMAGE="$GCDIR/usr/bin/grub-mkimage"
        [ -f "$GRUB_LIB/boot.img" ] || die "no usr/lib/grub/i386-pc/boot.img in $GPDEB"
        [ -x "$MKIMAGE" ] || die "no usr/bin/grub-mkimage in $GCDEB"
        if command -v ldd >/dev/null && ldd "$MKIMAGE" | grep -q 'not found'; then
            die "grub-mkimage (from $GCDEB) misses libraries: $(ldd "$MKIMAGE" | grep 'not found' | tr -s ' \t\n' ' ')"
        fi
        rm -rf "$WORK/grub"
        mkdir -p "$WORK/grub"
        printf '%s\n' "$GRUB_EMBED_CFG" >"$WORK/grub/embed.cfg"
        # For i386-pc, grub-mkimage puts diskboot.img first, its blocklist already saying
        # "the rest starts at sector 2": core.img belongs at sector 1, boot.img's default.
        # shellcheck disable=SC2086
        "$MKIMAGE" -d "$GRUB_LIB" -O i386-pc -o "$WORK/grub/core.img" \
            -c "$WORK/grub/embed.cfg" -p '(hd0,msdos1)/boot/grub' $GRUB_MODULES \
            || die "grub-mkimage failed"
        core_sectors=$(( ($(stat -c %s "$WORK/grub/core.img") + 511) / 512 ))
        [ "$core_sectors" -lt "$PART_START" ] \
            || die "GRUB core.img ($core_sectors sectors) does not fit before the partition"

        rm -rf "$WORK/bootroot"
        mkdir -p "$WORK/bootroot/boot"
        write_rootfs "$WORK/bootroot"
        cp "$OUT/vmlinuz" "$WORK/bootroot/boot/vmlinuz"
        cp "$OUT/initrd.img" "$WORK/bootroot/boot/initrd.img"

        img="$OUT/boot-disk.raw.tmp"
        rm -f "$img"
        truncate -s "$DISK_SIZE" "$img"
        total=$(( $(stat -c %s "$img") / 512 ))
        part_sectors=$(( (total - PART_START) / 8 * 8 ))  # whole 4 KiB blocks
        [ "$part_sectors" -gt 65536 ] || die "DISK_SIZE $DISK_SIZE too small for boot-disk.raw"
        mke2fs -q -F -t ext4 -L fileserver -E "root_owner=0:0,offset=$((PART_START * 512))" \
            -d "$WORK/bootroot" "$img" "$((part_sectors / 2))k" || die "mke2fs (boot-disk) failed"
        dd if="$GRUB_LIB/boot.img" of="$img" bs=440 count=1 conv=notrunc status=none
        dd if="$WORK/grub/core.img" of="$img" bs=512 seek=1 conv=notrunc status=none
        write_mbr_table "$img" "$PART_START" "$part_sectors"
        mv "$img" "$OUT/boot-disk.raw"
        record_stamp "$OUT/boot-disk.raw" "$st"
        log "boot-disk.raw: $DISK_SIZE, MBR + GRUB ($(basename "$GPDEB" .deb)) + ext4 /dev/vda1, $(du -k "$OUT/boot-disk.raw" | cut -f1) KiB allocated"
    fi
    log "done: $OUT/{vmlinuz,initrd.img,disk.raw,boot-disk.raw}"
else
    log "done: $OUT/{vmlinuz,initrd.img,disk.raw}"
fi
