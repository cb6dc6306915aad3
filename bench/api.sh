#!/usr/bin/env bash
# API benchmarks for `forkd serve` + the Python SDK (issue 8), each beside its floor, from one
# run. Prints JSON lines and appends a section to bench/RESULTS.md.
#
#   bench/api.sh [tasks overhead files idle]
# Env: FORKD_ACCEL (default auto), TASKS_N (50), RTT_N (100), IDLE_N (100).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/.." && pwd)"
. "$repo/scripts/lib.sh"
WHICH=("${@:-tasks overhead files idle}"); WHICH=(${WHICH[*]})
export FORKD_ACCEL="${FORKD_ACCEL:-auto}"
"$repo/scripts/setup-engine.sh"
(cd "$repo" && cargo build --release -q -p forkd-cli && cargo build --release -q -p forkd-engine --example agent_rtt)
export FORKD="$repo/target/release/forkd"
export AGENT_RTT="$repo/target/release/examples/agent_rtt"
VENV="$(bash "$repo/scripts/sdk-venv.sh")"
ASSETS="$("$repo/recipes/tiny/build.sh")"
export FORKD_HOME="$(mktemp -d /tmp/forkd-api.XXXXXX)"
daemon=""
cleanup() {
    [[ -n "$daemon" ]] && kill -TERM "$daemon" 2>/dev/null && wait "$daemon" 2>/dev/null || true
    FORKD_URL= "$FORKD" kill --all -q >/dev/null 2>&1 || true
    rm -rf "$FORKD_HOME"
}
trap cleanup EXIT
"$FORKD" -q build-tiny --assets "$ASSETS"

# The agent's own round trip, on a child kept without the daemon (nothing else holds its socket).
RTT_SOCK=""
if [[ " ${WHICH[*]} " == *" overhead "* ]]; then
    id="$("$FORKD" fork --tag tiny -n 1 --keep --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["kept"][0])')"
    RTT_SOCK="$FORKD_HOME/run/$id/agent.sock"
    export RTT_SOCK_ID="$id"
fi
export RTT_SOCK

"$FORKD" serve & daemon=$!
for _ in $(seq 100); do [[ -S "$FORKD_HOME/forkd.sock" ]] && break; sleep 0.1; done
export DAEMON_PID="$daemon"

load="$(cut -d' ' -f1-3 /proc/loadavg)"
# Each result is a JSON line, kept as it comes (a later bench that fails keeps the earlier ones).
out="$FORKD_HOME/results.jsonl"
status=0
"$VENV/bin/python" "$here/api_bench.py" "${WHICH[@]}" | tee "$out" || status=$?
results="$(cat "$out")"
[[ -n "$results" ]] || exit 1

{
    echo
    echo "## API (forkd serve + Python SDK), $(date -u +%Y-%m-%dT%H:%MZ)"
    echo
    echo "Machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, accel $FORKD_ACCEL, load before: $load."
    echo
    echo "| bench | ours | floor | ratio / goal |"
    echo "|---|---|---|---|"
    echo "$results" | python3 "$here/api_table.py"
} >> "$here/RESULTS.md"
exit "$status"
