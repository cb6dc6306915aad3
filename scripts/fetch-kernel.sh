#!/usr/bin/env bash
# Fetch a distribution kernel that boots under QEMU (TCG or KVM) into a cache directory,
# without installing it into the host's /boot.
#
#   scripts/fetch-kernel.sh            # prints the kernel directory on stdout
#
# Result: ASSETS/kernel/{vmlinuz,modules/,VERSION}, where ASSETS is forkd's assets directory:
# $FORKD_ASSETS, else $FORKD_HOME/assets (CI sets FORKD_ASSETS=/var/cache/forkd-ci/assets).
# Debian: linux-image-cloud-amd64 (its virtio drivers are modules).
# Ubuntu: linux-image-kvm, falling back to linux-image-virtual.
# Idempotent: a complete cache is reused without touching the network.
set -euo pipefail

ASSETS="${FORKD_ASSETS:-${FORKD_HOME:-${XDG_DATA_HOME:-$HOME/.local/share}/forkd}/assets}"
OUT="$ASSETS/kernel"
if [[ -s "$OUT/vmlinuz" && -s "$OUT/VERSION" && -d "$OUT/modules" ]]; then
    echo "$OUT"
    exit 0
fi
command -v apt-get >/dev/null || { echo "fetch-kernel: needs apt-get (Debian/Ubuntu host)" >&2; exit 1; }
mkdir -p "$ASSETS"
work="$(mktemp -d "$ASSETS/.kernel.XXXXXX")"
trap 'rm -rf "$work"' EXIT

# Which meta package names a kernel for this distribution?
. /etc/os-release
case "${ID:-}" in
    ubuntu) metas=(linux-image-kvm linux-image-virtual) ;;
    *) metas=(linux-image-cloud-amd64 linux-image-amd64) ;;
esac

pkg=""
for meta in "${metas[@]}"; do
    # The meta package depends on the versioned image package; resolve it without installing.
    dep="$(apt-cache depends "$meta" 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')"
    if [[ -n "$dep" ]]; then pkg="$dep"; break; fi
done
[[ -n "$pkg" ]] || { echo "fetch-kernel: no kernel package found (tried: ${metas[*]}); run apt-get update" >&2; exit 1; }
echo "fetch-kernel: downloading $pkg" >&2

(cd "$work" && apt-get download "$pkg" >&2)
# Ubuntu splits modules into linux-modules-VERSION (and -extra); fetch them when they exist.
ver="${pkg#linux-image-}"
ver="${ver#unsigned-}"
for extra in "linux-modules-$ver"; do
    if apt-cache show "$extra" >/dev/null 2>&1; then (cd "$work" && apt-get download "$extra" >&2); fi
done
mkdir -p "$work/root"
for deb in "$work"/*.deb; do dpkg -x "$deb" "$work/root"; done

vmlinuz="$(ls "$work"/root/boot/vmlinuz-* | head -n1)"
kver="$(basename "$vmlinuz")"; kver="${kver#vmlinuz-}"
mkdir -p "$work/out"
cp "$vmlinuz" "$work/out/vmlinuz"
cp -a "$work/root/lib/modules/$kver" "$work/out/modules" 2>/dev/null \
    || cp -a "$work/root/usr/lib/modules/$kver" "$work/out/modules"
echo "$kver" > "$work/out/VERSION"
rm -rf "$OUT"
mv "$work/out" "$OUT"
echo "fetch-kernel: kernel $kver in $OUT" >&2
echo "$OUT"
