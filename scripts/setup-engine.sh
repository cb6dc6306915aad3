#!/usr/bin/env bash
# Everything the fork engine and its tests need on a Debian/Ubuntu host. Idempotent and cached:
# a second run installs nothing and downloads nothing.
#   - apt: qemu-system-x86 (QEMU >= 7.2), qemu-utils, busybox-static, cpio, e2fsprogs, gzip
#   - the guest kernel (scripts/fetch-kernel.sh -> ASSETS/kernel), where ASSETS is forkd's assets
#     directory: $FORKD_ASSETS, else $FORKD_HOME/assets (CI sets FORKD_ASSETS=/var/cache/forkd-ci/assets)
#   - the system user forkd-qemu, that child QEMUs run as under root
#   - the static guest agent and the tiny recipe's assets (recipes/tiny/build.sh)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/.." && pwd)"
FORKD_ASSETS="${FORKD_ASSETS:-${FORKD_HOME:-${XDG_DATA_HOME:-$HOME/.local/share}/forkd}/assets}"
export FORKD_ASSETS

pkgs=(qemu-system-x86 qemu-utils busybox-static cpio e2fsprogs gzip file binutils)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    SUDO=""; [[ $(id -u) -eq 0 ]] || SUDO="sudo"
    echo "setup-engine: installing ${missing[*]}" >&2
    $SUDO apt-get update -qq >&2 || true
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi
# Debian's busybox package (dynamic) may shadow busybox-static's binary name; both live at /bin/busybox.
qemu-system-x86_64 --version | head -n1 >&2
# Children's QEMUs drop to this system user when forkd runs as root (docs/ENGINE.md: confinement).
if ! getent passwd forkd-qemu >/dev/null; then
    SUDO=""; [[ $(id -u) -eq 0 ]] || SUDO="sudo"
    echo "setup-engine: adding the system user forkd-qemu" >&2
    $SUDO useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin forkd-qemu
fi

"$here/fetch-kernel.sh" >/dev/null
"$repo/recipes/tiny/build.sh" >/dev/null
echo "setup-engine: ready (assets in $FORKD_ASSETS)" >&2
