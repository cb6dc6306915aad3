#!/usr/bin/env bash
# Runs forkd's whole test suite on a fresh Debian/Ubuntu machine: installs what the tests need
# (QEMU, busybox, e2fsprogs, a guest kernel, a Garage S3 server), starts Garage, runs the
# formatting and lint gates, then `cargo test --workspace`.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
need_cargo

say "system packages"
apt_install qemu-system-x86 qemu-utils busybox-static cpio e2fsprogs zstd tar curl ca-certificates python3 python3-venv openssl mmdebstrap

say "guest assets (kernel, agent)"
bash scripts/setup-engine.sh

say "Garage S3 server"
bash scripts/garage-install.sh
GARAGE_ENV="$(mktemp -d)/garage.env"
bash scripts/garage-start.sh "$GARAGE_ENV"
trap 'bash scripts/garage-stop.sh "$GARAGE_ENV" || true; rm -rf "$(dirname "$GARAGE_ENV")"' EXIT
export FORKD_TEST_S3_ENV="$GARAGE_ENV"

say "format and lint gates"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings

say "tests"
# --no-fail-fast: one failing test binary must not hide the others' results.
cargo test --workspace --locked --no-fail-fast

say "Python SDK and MCP server, against a real daemon"
FORKD_BIN="$PWD/target/debug/forkd" bash scripts/sdk-test.sh
