#!/usr/bin/env bash
# forkd's main job, end to end, on the embedded default hub (no server needed):
#
#   1. install what forkd needs (QEMU, busybox, e2fsprogs, a guest kernel) and build forkd;
#   2. a publisher builds the tiny parent (busybox + the forkd agent), snapshots it warm,
#      makes a signing key and pushes the snapshot, signed, to its embedded hub;
#   3. a fresh user store pulls it from that hub (verifying signature and every byte) and
#      forks N copy-on-write children, each running a command;
#   4. the same store as a service: `forkd serve` and the Python SDK fork, drive and kill
#      sandboxes through the REST API (docs/API.md).
#
#   bash scripts/quickstart.sh [-n N]          # N children, default 10
#
# Set FORKD_KEEP_DEMO=1 to keep the demo stores (printed at the end).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
need_cargo

N=10
while [ $# -gt 0 ]; do
    case "$1" in
        -n) N="$2"; shift 2 ;;
        -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
        *) die "unknown argument: $1 (try --help)" ;;
    esac
done

say "system packages"
apt_install qemu-system-x86 qemu-utils busybox-static cpio e2fsprogs zstd curl ca-certificates
say "guest assets (kernel, agent)"
bash scripts/setup-engine.sh
say "building forkd (release)"
cargo build --release --locked -q -p forkd-cli
forkd="$PWD/target/release/forkd"

demo="$(mktemp -d "${TMPDIR:-/tmp}/forkd-demo.XXXXXX")"
[ "${FORKD_KEEP_DEMO:-}" = 1 ] || trap 'rm -rf "$demo"' EXIT
publisher="$demo/publisher"   # the machine that builds and publishes
user="$demo/user"             # a clean host: nothing built locally

say "publisher: snapshot the tiny parent"
"$forkd" --home "$publisher" doctor
"$forkd" --home "$publisher" build-tiny --tag tiny
"$forkd" --home "$publisher" key generate >/dev/null
say "publisher: push to the embedded hub ($publisher/hub)"
"$forkd" --home "$publisher" push tiny forkd/tiny:latest --description "busybox + forkd agent"
"$forkd" --home "$publisher" search

say "user: pull into a fresh store, then fork $N children"
start=$(date +%s.%N)
"$forkd" --home "$user" pull forkd/tiny --hub "file://$publisher/hub" \
    --trust "$publisher/keys/forkd.pub"
"$forkd" --home "$user" images list
"$forkd" --home "$user" fork --tag tiny -n "$N" --exec 'echo "hello from $(hostname)"'
end=$(date +%s.%N)
say "pull + fork $N: $(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }') s"

say "user: the same store as a service (forkd serve + the Python SDK)"
venv="$(bash scripts/sdk-venv.sh)"
"$forkd" --home "$user" serve &
daemon=$!
trap 'kill -TERM "$daemon" 2>/dev/null || true; wait "$daemon" 2>/dev/null || true; [ "${FORKD_KEEP_DEMO:-}" = 1 ] || rm -rf "$demo"' EXIT
for _ in $(seq 100); do [ -S "$user/forkd.sock" ] && break; sleep 0.1; done
FORKD_HOME="$user" "$venv/bin/python" - <<'PY'
from forkd import Client

c = Client()
sbs = c.fork("tiny", 3, env={"GREETING": "hello"})
for sb in sbs:
    sb.files.write("/tmp/in.txt", b"from the host\n")
    r = sb.commands.run('echo "$GREETING from $(hostname): $(cat /tmp/in.txt)"')
    print(f"{sb.id}: exit {r.exit_code}: {r.stdout.strip()}")
    sb.kill()
PY
kill -TERM "$daemon"
wait "$daemon" || die "forkd serve did not stop cleanly (exit $?)"
[ "${FORKD_KEEP_DEMO:-}" = 1 ] && say "demo stores kept in $demo"
exit 0
