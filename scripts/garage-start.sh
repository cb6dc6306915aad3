#!/usr/bin/env bash
# Start a single-node Garage S3 server on 127.0.0.1 for the hub tests and benchmarks.
#
#   scripts/garage-start.sh ENV_FILE      # writes KEY=VALUE lines to ENV_FILE
#   . ENV_FILE                            # or: export FORKD_TEST_S3_ENV=ENV_FILE for cargo test
#
# Ports: the first free block of four from 3900: +0 S3 API, +1 RPC, +2 website (anonymous
# reads), +3 admin. Bucket `hub`, one key
# with read+write+owner, website access enabled (http://hub.web.garage.localhost:3902/).
# Data lives in a temp dir recorded in ENV_FILE; scripts/garage-stop.sh ENV_FILE removes it.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
ENV_FILE="${1:?usage: garage-start.sh ENV_FILE}"
GARAGE="${GARAGE_BIN:-$FORKD_CACHE/garage/bin/garage}"
[ -x "$GARAGE" ] || die "garage not found at $GARAGE: run scripts/garage-install.sh first"

# Four consecutive ports: S3 API, RPC, website, admin. Take the first free block from 3900 up,
# so a second Garage (another test run, a benchmark) can run beside this one.
busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
base=""
for b in $(seq "${GARAGE_PORT_BASE:-3900}" 10 4090); do
    if ! busy "$b" && ! busy $((b + 1)) && ! busy $((b + 2)) && ! busy $((b + 3)); then
        base=$b
        break
    fi
done
[ -n "$base" ] || die "no four free ports on 127.0.0.1 between 3900 and 4093"
api=$base rpc=$((base + 1)) web=$((base + 2)) admin=$((base + 3))

dir="$(mktemp -d "${TMPDIR:-/tmp}/forkd-garage.XXXXXX")"
cat > "$dir/garage.toml" <<CONF
metadata_dir = "$dir/meta"
data_dir = "$dir/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:$rpc"
rpc_public_addr = "127.0.0.1:$rpc"
rpc_secret = "$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')"

[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:$api"
root_domain = ".s3.garage.localhost"

[s3_web]
bind_addr = "127.0.0.1:$web"
root_domain = ".web.garage.localhost"
index = "index.html"

[admin]
api_bind_addr = "127.0.0.1:$admin"
CONF

g() { "$GARAGE" -c "$dir/garage.toml" "$@"; }
"$GARAGE" -c "$dir/garage.toml" server > "$dir/garage.log" 2>&1 &
pid=$!
echo "$pid" > "$dir/garage.pid"
cleanup_on_error() { kill "$pid" 2>/dev/null || true; rm -rf "$dir"; }
trap cleanup_on_error EXIT
# EXIT, not ERR: ERR does not fire for a failure inside a function under set -e, nor for die.

node=""
for _ in $(seq 1 100); do
    node="$(g node id -q 2>/dev/null || true)"
    [ -n "$node" ] && break
    kill -0 "$pid" 2>/dev/null || { cat "$dir/garage.log" >&2; die "garage exited at start"; }
    sleep 0.2
done
[ -n "$node" ] || { cat "$dir/garage.log" >&2; die "garage did not answer"; }
# `node id` reads the key from disk and can answer before the RPC port listens; the layout
# commands need RPC, so wait for it (a fresh install on a loaded machine was refused here).
for _ in $(seq 1 150); do
    busy "$rpc" && break
    kill -0 "$pid" 2>/dev/null || { cat "$dir/garage.log" >&2; die "garage exited at start"; }
    sleep 0.2
done
for i in $(seq 1 20); do
    g layout assign -z dc1 -c 1G "${node%%@*}" >/dev/null 2>&1 && break
    [ "$i" = 20 ] && { cat "$dir/garage.log" >&2; die "garage refused the layout"; }
    sleep 0.5
done
g layout apply --version 1 >/dev/null
g bucket create hub >/dev/null
keyinfo="$(g key create hubkey)"
key_id="$(printf '%s\n' "$keyinfo" | awk '/Key ID/ {print $NF; exit}')"
secret="$(printf '%s\n' "$keyinfo" | awk '/Secret key/ {print $NF; exit}')"
[ -n "$key_id" ] && [ -n "$secret" ] || die "could not read the key from: garage key create"
g bucket allow --read --write --owner hub --key hubkey >/dev/null
g bucket website --allow hub >/dev/null

# Wait until the S3 API answers (any HTTP status).
for _ in $(seq 1 50); do
    curl -s -o /dev/null "http://127.0.0.1:$api/" && break
    sleep 0.2
done

umask 077
cat > "$ENV_FILE" <<ENVS
GARAGE_DIR=$dir
GARAGE_PID=$pid
AWS_ACCESS_KEY_ID=$key_id
AWS_SECRET_ACCESS_KEY=$secret
AWS_REGION=garage
AWS_DEFAULT_REGION=garage
AWS_ENDPOINT_URL=http://127.0.0.1:$api
FORKD_TEST_S3_BUCKET=hub
FORKD_TEST_S3_WEB=http://hub.web.garage.localhost:$web/
FORKD_TEST_S3_API=http://127.0.0.1:$api/
ENVS
trap - EXIT
say "garage running (pid $pid, data in $dir); environment in $ENV_FILE"
