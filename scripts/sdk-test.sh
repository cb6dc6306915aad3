#!/usr/bin/env bash
# Runs the Python SDK's tests (sdk/python/tests) against a real `forkd serve` and real children.
# The venv comes from scripts/sdk-venv.sh (cached); this builds the forkd binary and the guest
# assets if they are missing, then runs pytest with FORKD_BIN set. Extra arguments go to pytest
# (e.g. `-k files -x`).
#   FORKD_BIN             the forkd binary to test with (default: target/debug/forkd, built here)
#   FORKD_TEST_TINY_HOME  a FORKD_HOME that already holds the `tiny` image (skips build-tiny)
#   PYTHON                the interpreter for the venv (see scripts/sdk-venv.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

venv="$(bash scripts/sdk-venv.sh)"

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
