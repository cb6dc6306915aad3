#!/usr/bin/env bash
# Installs the Garage S3-compatible server (used by the hub tests) once, into a cache folder
# outside the checkout: $FORKD_CACHE/garage/bin/garage. The first build takes ~15 min on 2 cores.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
GARAGE_VERSION=2.5.0
bin="$FORKD_CACHE/garage/bin/garage"
if [ -x "$bin" ] && "$bin" --version 2>/dev/null | grep -q "$GARAGE_VERSION"; then
    exit 0
fi
need_cargo
mkdir -p "$FORKD_CACHE/garage"
say "building garage $GARAGE_VERSION into $FORKD_CACHE/garage (one time, ~15 min)"
cargo install garage --version "$GARAGE_VERSION" --locked --root "$FORKD_CACHE/garage"
"$bin" --version >/dev/null || die "garage installed but does not run: $bin"
