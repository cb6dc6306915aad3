#!/usr/bin/env bash
# Runs the Python SDK's tests (sdk/python/tests) against a real `forkd serve` and real children.
# Makes (once, cached) a virtualenv under ${FORKD_CACHE:-/var/cache/forkd-ci}/venv keyed by a
# hash of sdk/python/pyproject.toml and the Python version, installs the SDK with its `mcp` and
# `test` extras, builds the forkd binary and the guest assets if they are missing, then runs
# pytest with FORKD_BIN set. Extra arguments go to pytest (e.g. `-k files -x`).
#   FORKD_BIN             the forkd binary to test with (default: target/debug/forkd, built here)
#   FORKD_TEST_TINY_HOME  a FORKD_HOME that already holds the `tiny` image (skips build-tiny)
#   PYTHON                the interpreter to make the venv with (default: python3, >= 3.10)
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
    "$venv/bin/python" -m pip install -q --upgrade pip
    # the dependencies, and hatchling so the SDK itself installs below without build isolation
    "$venv/bin/python" -m pip install -q "./sdk/python[mcp,test]" pytest hatchling
    touch "$venv/.complete"
fi
# the SDK's own code changes without pyproject.toml changing: reinstall just it, every run
"$venv/bin/python" -m pip install -q --no-deps --no-build-isolation --force-reinstall ./sdk/python

if [ -z "${FORKD_BIN:-}" ]; then
    need_cargo
    say "cargo build -p forkd-cli"
    cargo build -q -p forkd-cli --locked
    FORKD_BIN="$PWD/target/debug/forkd"
fi
export FORKD_BIN
if [ -z "${FORKD_TEST_TINY_HOME:-}" ]; then
    say "guest assets (QEMU, kernel, tiny recipe)"
    bash scripts/setup-engine.sh
fi

say "pytest sdk/python/tests (FORKD_BIN=$FORKD_BIN)"
exec "$venv/bin/python" -m pytest sdk/python/tests -p no:cacheprovider "$@"
