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

# start_hub_serve FORKD DIR: `forkd hub serve` on 127.0.0.1 (a free port) over DIR/hub, with a
# fresh token in DIR/token, in the background (its pid in DIR/serve.pid, to kill); prints its
# URL once it listens.
start_hub_serve() {
    local forkd="$1" dir="$2"
    head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$dir/token"
    "$forkd" --home "$dir/server" hub serve --listen 127.0.0.1:0 --root "$dir/hub" \
        --token-file "$dir/token" > "$dir/serve.out" 2>&1 &
    echo $! > "$dir/serve.pid"
    for _ in $(seq 1 100); do grep -q http:// "$dir/serve.out" 2>/dev/null && break; sleep 0.1; done
    local url
    url="$(grep -o 'http://[^ ]*' "$dir/serve.out" | head -n1)"
    [ -n "$url" ] || die "forkd hub serve did not start: $(cat "$dir/serve.out")"
    echo "$url"
}
