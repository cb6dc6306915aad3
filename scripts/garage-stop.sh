#!/usr/bin/env bash
# Stop the Garage started by scripts/garage-start.sh ENV_FILE and remove its data.
set -euo pipefail
ENV_FILE="${1:?usage: garage-stop.sh ENV_FILE}"
[ -f "$ENV_FILE" ] || { echo "garage-stop: no $ENV_FILE, nothing to stop" >&2; exit 0; }
dir="$(sed -n 's/^GARAGE_DIR=//p' "$ENV_FILE")"
pid="$(sed -n 's/^GARAGE_PID=//p' "$ENV_FILE")"
if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
fi
case "$dir" in
    */forkd-garage.*) rm -rf "$dir" ;;
esac
rm -f "$ENV_FILE"
