#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Build (once) and cache what the real-DRBD lab boots:
#
#   tests/infra/vm/build.sh      -> prints the image dir (vmlinuz, initrd.cpio.gz, root.ext4, ENV)
#
# Cache layout under ${DRBD_REACTOR_TOOLS:-~/.cache/drbd-reactor-tools}/vm/:
#   debs/                          Debian packages fetched with apt-get download (never installed on the host)
#   kernel/<abi>/                  the unpacked linux-image and linux-headers of that kernel ABI
#   modules/drbd-<ver>_<abi>/      drbd.ko, drbd_transport_tcp.ko, handshake.ko (stripped)
#   rootfs/<suite>-<pkghash>.tar   the guest root from mmdebstrap
#   img/<key>/                     the bootable set; <key> hashes the ABI, DRBD version, rootfs and guest files
# Host needs (installed by .ci/run): qemu-system-x86 qemu-utils coccinelle mmdebstrap make gcc bc flex bison
# libelf-dev e2fsprogs.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

KV="$(kernel_abi)"
SUITE="$(guest_suite)"
DEBS="$LAB_CACHE/debs"
KDIR_ROOT="$LAB_CACHE/kernel/$KV"
MODS="$LAB_CACHE/modules/drbd-${DRBD_VERSION}_${KV}"
PKGHASH="$(printf '%s' "$GUEST_PACKAGES" | sha256sum | cut -c1-12)"
ROOTFS="$LAB_CACHE/rootfs/${SUITE}-${PKGHASH}.tar"
NICE="nice -n ${LAB_NICE:-10}"
mkdir -p "$DEBS" "$LAB_CACHE/rootfs" "$LAB_CACHE/modules"

fetch_debs() { # fetch_debs PKG...: apt-get download into the cache (once per package version)
    local p
    for p in "$@"; do
        compgen -G "$DEBS/${p}_*.deb" >/dev/null || (cd "$DEBS" && apt-get download -q "$p" >&2)
    done
}

kernel_packages() { # the headers packages linux-headers-$KV depends on (-common, linux-kbuild-*)
    apt-cache depends "linux-headers-$KV" | sed -n 's/^ *Depends: \(linux-\(headers\|kbuild\)-[^ <>]*\)$/\1/p' | sort -u
}

unpack_kernel() {
    [[ -e "$KDIR_ROOT/.done" ]] && return
    lab_log "fetching kernel $KV (image and headers)"
    rm -rf "$KDIR_ROOT"; mkdir -p "$KDIR_ROOT"
    local pkgs; mapfile -t pkgs < <(kernel_packages)
    fetch_debs "linux-image-$KV" "linux-headers-$KV" "${pkgs[@]}"
    local p
    for p in "linux-image-$KV" "linux-headers-$KV" "${pkgs[@]}"; do
        dpkg-deb -x "$(compgen -G "$DEBS/${p}_*.deb" | head -1)" "$KDIR_ROOT"
    done
    # Debian's arch headers Makefile includes the -common one by absolute path.
    sed -i "s|^include /usr/src/|include $KDIR_ROOT/usr/src/|" "$KDIR_ROOT/usr/src/linux-headers-$KV/Makefile"
    touch "$KDIR_ROOT/.done"
}

build_modules() {
    [[ -e "$MODS/.done" ]] && return
    local src tmp tarball
    tarball="$(drbd_tarball)"
    tmp="$(mktemp -d "$LAB_CACHE/build.XXXXXX")"
    # shellcheck disable=SC2064
    trap "rm -rf '$tmp'" RETURN
    if [[ "$tarball" == http*://* ]]; then
        lab_log "downloading $tarball"
        curl -fsSL -o "$tmp/drbd.tar.gz" "$tarball"; tarball="$tmp/drbd.tar.gz"
    fi
    if [[ "$DRBD_VERSION" == 9.2.18 ]]; then
        echo "$DRBD_SHA256_9_2_18  $tarball" | sha256sum -c --quiet - || lab_die "checksum mismatch: $tarball"
    fi
    tar -xzf "$tarball" -C "$tmp"
    src="$tmp/drbd-${DRBD_VERSION}"
    [[ -e "$src/drbd/drbd-headers/drbd_protocol.h" ]] || lab_die "$tarball is not a DRBD release tarball (no drbd-headers)"
    lab_log "building DRBD $DRBD_VERSION for $KV (make module, local spatch; ~2 min)"
    # SPAAS=false: the compat patches are made by the local coccinelle, not LINBIT's spatch service.
    (cd "$src" && $NICE make -j"$(nproc)" module KDIR="$KDIR_ROOT/usr/src/linux-headers-$KV" SPAAS=false) \
        > "$LAB_CACHE/build-drbd.log" 2>&1 || { tail -30 "$LAB_CACHE/build-drbd.log" >&2; lab_die "DRBD build failed"; }
    local out="$src/drbd/build-$KV" k
    rm -rf "$MODS.tmp"; mkdir -p "$MODS.tmp"
    for k in drbd.ko drbd_transport_tcp.ko drbd-kernel-compat/handshake/handshake.ko; do
        [[ -e "$out/$k" ]] || continue
        objcopy --strip-debug "$out/$k" "$MODS.tmp/$(basename "$k")"
    done
    [[ -e "$MODS.tmp/drbd.ko" ]] || lab_die "no drbd.ko in $out"
    touch "$MODS.tmp/.done"; rm -rf "$MODS"; mv "$MODS.tmp" "$MODS"
}

build_rootfs() {
    [[ -e "$ROOTFS" ]] && return
    lab_log "mmdebstrap $SUITE (~1-2 min)"
    local sources="${APT_SOURCES:-$(ls /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null | head -1)}"
    $NICE mmdebstrap --quiet --format=tar --variant=minbase --include="$GUEST_PACKAGES" "$SUITE" "$ROOTFS.tmp" "$sources" \
        > "$LAB_CACHE/rootfs.log" 2>&1 || { tail -30 "$LAB_CACHE/rootfs.log" >&2; lab_die "mmdebstrap failed"; }
    mv "$ROOTFS.tmp" "$ROOTFS"
}

fetch_busybox() {
    BB="$LAB_CACHE/busybox/bin/busybox"
    [[ -x "$BB" ]] && return
    fetch_debs busybox-static
    dpkg-deb -x "$(compgen -G "$DEBS/busybox-static_*.deb" | head -1)" "$LAB_CACHE/busybox"
}

image_key() {
    { echo "$KV $DRBD_VERSION $(basename "$ROOTFS")"; cat "$LAB_SRC_DIR/build.sh" "$LAB_SRC_DIR"/guest/*; } | sha256sum | cut -c1-16
}

build_image() {
    local img="$1" r
    [[ -e "$img/.done" ]] && return
    lab_log "building the guest image in $img"
    rm -rf "$img.tmp"; mkdir -p "$img.tmp"; r="$img.tmp/root"; mkdir -p "$r"
    tar -xf "$ROOTFS" -C "$r"
    mkdir -p "$r/lib/modules"
    cp -a "$KDIR_ROOT/lib/modules/$KV" "$r/lib/modules/"
    rm -rf "$r/lib/modules/$KV/kernel/drivers/block/drbd"        # the in-tree DRBD 8.4
    mkdir -p "$r/lib/modules/$KV/updates/drbd"
    cp "$MODS"/*.ko "$r/lib/modules/$KV/updates/drbd/"
    chroot "$r" depmod "$KV"
    cp "$KDIR_ROOT/boot/vmlinuz-$KV" "$img.tmp/vmlinuz"
    # guest configuration
    echo 'root:root' | chroot "$r" chpasswd
    : > "$r/etc/machine-id"
    printf '/dev/vda / ext4 rw,noatime 0 1\n' > "$r/etc/fstab"
    install -m755 "$LAB_SRC_DIR/guest/lab-agent.sh" "$LAB_SRC_DIR/guest/lab-net.sh" "$r/usr/local/sbin/"
    # The lab's own units live in the vendor directory, out of reach of tests that write and remove
    # units in /etc/systemd/system. The agent starts early and whatever else the boot does (a failed
    # mount, emergency mode), so a guest that boots badly can still be asked what went wrong.
    local vu=$r/usr/lib/systemd/system
    install -m644 "$LAB_SRC_DIR/guest/lab-agent.service" "$LAB_SRC_DIR/guest/lab-net.service" "$vu/"
    mkdir -p "$vu/sysinit.target.wants" "$vu/multi-user.target.wants" "$vu/network-online.target.wants"
    ln -sf ../lab-agent.service "$vu/sysinit.target.wants/"
    ln -sf ../lab-net.service "$vu/multi-user.target.wants/"
    ln -sf ../lab-net.service "$vu/network-online.target.wants/"
    # Units that cost CPU under TCG and do nothing for the lab; drbd.service would bring up every resource.
    local u
    for u in apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer man-db.timer \
             systemd-timesyncd.service drbd.service getty@tty1.service serial-getty@ttyS0.service; do
        ln -sf /dev/null "$r/etc/systemd/system/$u"
    done
    echo 'global { usage-count no; }' > "$r/etc/drbd.d/global_common.conf"
    mkdir -p "$r/mnt/host"
    rm -rf "$r"/usr/share/doc/* "$r"/usr/share/man/* "$r"/usr/share/locale/* "$r"/var/cache/apt/*
    # the root file system, written without a loop mount
    mke2fs -q -t ext4 -L root -d "$r" "$img.tmp/root.ext4" 1536M >&2
    # a tiny initramfs: Debian builds virtio_blk and ext4 as modules
    local i="$img.tmp/initrd" m
    mkdir -p "$i/bin" "$i/lib" "$i/dev" "$i/proc" "$i/sys" "$i/newroot"
    cp "$BB" "$i/bin/busybox"
    : > "$i/modules.list"
    for m in $(chroot "$r" modprobe -S "$KV" -a --show-depends crc32c_generic virtio_pci virtio_blk ext4 \
               | awk '$1=="insmod"{print $2}' | awk '!s[$0]++'); do
        cp "$r$m" "$i/lib/"; echo "/lib/$(basename "$m")" >> "$i/modules.list"
    done
    install -m755 "$LAB_SRC_DIR/guest/init" "$i/init"
    (cd "$i" && find . | "$BB" cpio -o -H newc 2>/dev/null | gzip -1) > "$img.tmp/initrd.cpio.gz"
    rm -rf "$r" "$i"
    cat > "$img.tmp/ENV" <<ENV
KERNEL_ABI=$KV
DRBD_VERSION=$DRBD_VERSION
SUITE=$SUITE
ROOTFS=$(basename "$ROOTFS")
ENV
    touch "$img.tmp/.done"; rm -rf "$img"; mv "$img.tmp" "$img"
}

main() {
    local t0=$SECONDS
    unpack_kernel
    # The module build is CPU-bound, the rootfs network-bound: run them side by side.
    local rp=""
    if [[ ! -e "$ROOTFS" ]]; then build_rootfs & rp=$!; fi
    build_modules
    if [[ -n "$rp" ]]; then wait "$rp" || lab_die "rootfs build failed"; fi
    fetch_busybox
    local img; img="$LAB_CACHE/img/$(image_key)"
    build_image "$img"
    lab_log "image ready in $((SECONDS - t0)) s: $img"
    echo "$img"
}
with_lock "$LAB_CACHE/.lock" main
