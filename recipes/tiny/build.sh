#!/usr/bin/env bash
# Build the tiny recipe's guest assets: kernel (Debian cloud), initramfs (busybox + virtio
# modules + forkd-agent) and a small ext4 root disk (busybox tree). No network once the kernel
# is cached (scripts/fetch-kernel.sh).
#
#   recipes/tiny/build.sh [OUT_DIR]     # default: ASSETS/tiny, forkd's assets directory:
#                                       # $FORKD_ASSETS, else $FORKD_HOME/assets
#
# Prints OUT_DIR; it then holds vmlinuz, initrd.img, rootfs.ext4. Snapshot it with:
#   forkd snapshot --tag tiny --kernel OUT/vmlinuz --initrd OUT/initrd.img --rootfs OUT/rootfs.ext4
# Env: FORKD_AGENT=path to a prebuilt static forkd-agent (else it is built with cargo).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
ASSETS="${FORKD_ASSETS:-${FORKD_HOME:-${XDG_DATA_HOME:-$HOME/.local/share}/forkd}/assets}"
OUT="${1:-$ASSETS/tiny}"

need() { command -v "$1" >/dev/null || { echo "tiny: missing $1 — apt-get install $2" >&2; exit 1; }; }
need cpio cpio
need mkfs.ext4 e2fsprogs
need gzip gzip
BUSYBOX="$(command -v busybox || true)"
[[ -n "$BUSYBOX" ]] && file -L "$BUSYBOX" | grep -q 'statically linked' \
    || BUSYBOX=/bin/busybox
file -L "$BUSYBOX" 2>/dev/null | grep -q 'statically linked' \
    || { echo "tiny: need a static busybox — apt-get install busybox-static" >&2; exit 1; }

kdir="$("$repo/scripts/fetch-kernel.sh")"

agent="${FORKD_AGENT:-}"
if [[ -z "$agent" ]]; then
    (cd "$repo" && RUSTFLAGS="-C target-feature=+crt-static" cargo build --release -q -j2 \
        -p forkd-agent --bin forkd-agent --target x86_64-unknown-linux-gnu >&2)
    agent="$repo/target/x86_64-unknown-linux-gnu/release/forkd-agent"
fi
file -L "$agent" | grep -Eq 'static(-pie)? linked' || { echo "tiny: $agent is not statically linked" >&2; exit 1; }

mkdir -p "$OUT"
work="$(mktemp -d "$OUT/.build.XXXXXX")"
trap 'rm -rf "$work"' EXIT

# --- initramfs ---
ir="$work/initramfs"
mkdir -p "$ir"/{bin,lib/modules,proc,sys,dev,newroot,tmp}
cp "$BUSYBOX" "$ir/bin/busybox"
ln -s busybox "$ir/bin/sh"
cp "$here/init" "$ir/init"
strip -o "$ir/forkd-agent" "$agent" 2>/dev/null || cp "$agent" "$ir/forkd-agent"
chmod 0755 "$ir/init" "$ir/forkd-agent"
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk virtio_console failover net_failover virtio_net inet_diag tcp_diag; do
    f="$(find "$kdir/modules" -name "$m.ko*" | head -n1)"
    [[ -n "$f" ]] || continue   # built into this kernel
    case "$f" in
        *.ko.xz) xz -dc "$f" > "$ir/lib/modules/$m.ko" ;;
        *.ko.zst) zstd -qdc "$f" > "$ir/lib/modules/$m.ko" ;;
        *.ko.gz) gzip -dc "$f" > "$ir/lib/modules/$m.ko" ;;
        *) cp "$f" "$ir/lib/modules/$m.ko" ;;
    esac
done
(cd "$ir" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --owner 0:0 --quiet --reproducible) \
    | gzip -1 -n > "$work/initrd.img"

# --- root disk: a busybox tree ---
rt="$work/rootfs"
mkdir -p "$rt"/{bin,sbin,etc,proc,sys,dev,run,tmp,root,var/tmp,usr/bin,usr/sbin,data}
cp "$BUSYBOX" "$rt/bin/busybox"
for applet in $("$BUSYBOX" --list); do
    [[ "$applet" == busybox ]] || ln -sf busybox "$rt/bin/$applet"
done
echo tiny > "$rt/etc/hostname"
echo 'root:x:0:0:root:/root:/bin/sh' > "$rt/etc/passwd"
echo 'root:x:0:' > "$rt/etc/group"
echo "forkd tiny recipe" > "$rt/etc/motd"
chmod 1777 "$rt/tmp" "$rt/var/tmp"
truncate -s 64M "$work/rootfs.ext4"
mkfs.ext4 -q -F -L tiny-root -E root_owner=0:0 -O ^has_journal -d "$rt" "$work/rootfs.ext4"

cp "$kdir/vmlinuz" "$work/vmlinuz"
for f in vmlinuz initrd.img rootfs.ext4; do mv -f "$work/$f" "$OUT/$f"; done
echo "tiny: built in $OUT ($(du -sh --apparent-size "$OUT/initrd.img" | cut -f1) initrd)" >&2
echo "$OUT"
