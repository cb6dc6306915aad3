#!/usr/bin/env bash
# Prints the path of a Python venv with the forkd SDK (sdk/python, extras mcp + test) installed.
# The venv is made once under ${FORKD_CACHE:-/var/cache/forkd-ci}/venv, keyed by a hash of
# sdk/python/pyproject.toml and the Python version (a marker written last tells a finished venv
# from one cut short); the SDK's own code is reinstalled on every call, as it changes without
# pyproject.toml changing. Used by scripts/sdk-test.sh and bench/api.sh.
#   PYTHON   the interpreter to make the venv with (default: python3, >= 3.10)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

PY="${PYTHON:-python3}"
command -v "$PY" >/dev/null || die "$PY not found: apt-get install python3 python3-venv"
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || die "the SDK needs Python >= 3.10 ($PY is $("$PY" -V 2>&1))"

key="$( (cat sdk/python/pyproject.toml; "$PY" -c 'import sys; print(sys.version)') | sha256sum | cut -c1-16)"
venv="$FORKD_CACHE/venv/sdk-$key"
if [ ! -f "$venv/.complete" ]; then
    say "python venv $venv"
    rm -rf "$venv"
    mkdir -p "$FORKD_CACHE/venv"
    if ! "$PY" -m venv "$venv" 2>/dev/null; then
        apt_install python3-venv
        rm -rf "$venv"
        "$PY" -m venv "$venv"
    fi
    "$venv/bin/python" -m pip install -q --upgrade pip >&2
    # the dependencies, and hatchling so the SDK itself installs below without build isolation
    "$venv/bin/python" -m pip install -q "./sdk/python[mcp,test]" pytest hatchling >&2 \
        || die "cannot install the SDK's dependencies into $venv (is PyPI reachable?)"
    touch "$venv/.complete"
fi
"$venv/bin/python" -m pip install -q --no-deps --no-build-isolation --force-reinstall ./sdk/python >&2
echo "$venv"
