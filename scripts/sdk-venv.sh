#!/usr/bin/env bash
# Prints the path of a Python venv with the forkd SDK (sdk/python, extras mcp + test) installed,
# making it once per SDK version under $FORKD_CACHE (keyed by a hash of sdk/python's sources).
# A marker written last tells a finished venv from one cut short.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
repo="$(cd "$(dirname "$0")/.." && pwd)"
command -v python3 >/dev/null || die "python3 not found: apt-get install python3 python3-venv"
key="$(cd "$repo/sdk/python" && find . -type f \( -name '*.py' -o -name '*.toml' -o -name '*.typed' \) \
    -not -path './build/*' -not -path '*/__pycache__/*' | sort | xargs sha256sum | sha256sum | cut -c1-16)"
venv="$FORKD_CACHE/venv/sdk-$key"
if [[ ! -f "$venv/.forkd-ready" ]]; then
    mkdir -p "$FORKD_CACHE/venv"
    rm -rf "$venv"
    python3 -m venv "$venv" >&2 || die "cannot make a venv: apt-get install python3-venv"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check "$repo/sdk/python[mcp,test]" >&2 \
        || die "cannot install the SDK into $venv (PyPI reachable?)"
    touch "$venv/.forkd-ready"
fi
echo "$venv"
