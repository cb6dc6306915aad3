# Shared helpers for forkd's scripts. Source it: `. "$(dirname "$0")/lib.sh"`.

# Where CI and set-up scripts keep what is slow to make (Garage, kernel .debs, cargo tools).
# It lives outside the checkout so a fresh clone reuses it.
FORKD_CACHE="${FORKD_CACHE:-/var/cache/forkd-ci}"
export FORKD_CACHE
# The guest kernel and initramfs CI builds once and keeps there, set explicitly: forkd's own
# default is $FORKD_HOME/assets, and every forkd that a script runs must find the same ones.
FORKD_ASSETS="${FORKD_ASSETS:-$FORKD_CACHE/assets}"
export FORKD_ASSETS

say() { printf '\033[1m==>\033[0m %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# apt_install PKG...: install the Debian/Ubuntu packages that are missing, quietly.
apt_install() {
    local missing=()
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    command -v apt-get >/dev/null || die "apt-get not found: install ${missing[*]} with your package manager"
    say "installing ${missing[*]}"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

need_cargo() {
    command -v cargo >/dev/null || die "cargo not found: install Rust from https://rustup.rs"
}
