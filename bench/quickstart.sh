#!/usr/bin/env bash
# The product's promise, timed (issue 5): a hub holding python-numpy is served on loopback by
# `forkd hub serve`; a fresh FORKD_HOME runs
#     forkd pull forkd/python-numpy && forkd fork --tag python-numpy -n 100 --run "<numpy code>"
# and every child must return the right answer. Prints the total wall-clock next to the 60 s goal
# and appends it to bench/RESULTS.md.
#
#   sudo bench/quickstart.sh [N]        # N children, default 100
#
# Env: PUBLISHER_HOME  a store holding python-numpy (built with `forkd build recipes/python-numpy`
#                      if it lacks one: needs root and the Debian mirror; minutes the first time)
#      FORKD           the forkd binary [default: target/release/forkd, built if missing]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
N="${1:-100}"
FORKD="${FORKD:-$PWD/target/release/forkd}"
[ -x "$FORKD" ] || cargo build --release --locked -q -p forkd-cli
PUBLISHER_HOME="${PUBLISHER_HOME:-$FORKD_CACHE/bench-publisher}"
work="$(mktemp -d "${TMPDIR:-/tmp}/forkd-qs.XXXXXX")"
server=""
cleanup() { [ -n "$server" ] && kill "$server" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
pub() { "$FORKD" --home "$PUBLISHER_HOME" "$@"; }

if ! pub images list --json | grep -q '"tag": "python-numpy"'; then
    say "building python-numpy into $PUBLISHER_HOME (one time)"
    pub build recipes/python-numpy --tag python-numpy
fi
[ -f "$PUBLISHER_HOME/keys/forkd.pub" ] || pub key generate >/dev/null

say "publishing python-numpy to a hub served on loopback"
head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$work/token"
"$FORKD" --home "$work/server" hub serve --listen 127.0.0.1:0 --root "$work/hub" \
    --token-file "$work/token" > "$work/serve.out" 2>&1 &
server=$!
for _ in $(seq 1 100); do grep -q http:// "$work/serve.out" 2>/dev/null && break; sleep 0.1; done
url="$(grep -o 'http://[^ ]*' "$work/serve.out" | head -n1)"
[ -n "$url" ] || die "forkd hub serve did not start: $(cat "$work/serve.out")"
pub --quiet push python-numpy forkd/python-numpy --hub "$url" --token-file "$work/token"

code='int(np.dot(np.arange(100), np.arange(100)))'
expect=328350
user="$work/user"
say "fresh store: pull + fork -n $N"
load_before="$(cut -d' ' -f1-3 /proc/loadavg)"
t0=$(date +%s.%N)
"$FORKD" --home "$user" --quiet pull forkd/python-numpy --hub "$url" --trust "$PUBLISHER_HOME/keys/forkd.pub"
t1=$(date +%s.%N)
"$FORKD" --home "$user" --quiet fork --tag python-numpy -n "$N" --run "$code" --json > "$work/fork.json"
t2=$(date +%s.%N)

read -r alive right < <(python3 - "$work/fork.json" "$expect" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
right = sum(1 for c in r["children"] if c.get("ok") and (c.get("run") or {}).get("output", "").strip() == sys.argv[2])
print(r["alive"], right)
PY
)
pull_s=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
fork_s=$(awk -v a="$t1" -v b="$t2" 'BEGIN { printf "%.1f", b - a }')
total_s=$(awk -v a="$t0" -v b="$t2" 'BEGIN { printf "%.1f", b - a }')
ratio=$(awk -v t="$total_s" 'BEGIN { printf "%.2f", t / 60 }')
size=$(du -sh --apparent-size "$user/images/python-numpy" | cut -f1)
echo "pull ${pull_s} s + fork -n $N ${fork_s} s = ${total_s} s (goal < 60 s: ratio ${ratio}); $alive/$N alive, $right/$N returned $expect"

{
    echo
    echo "### quickstart: pull + fork python-numpy -n $N — $(date -u +%Y-%m-%dT%H:%MZ) (bench/quickstart.sh)"
    echo
    echo "Hub: \`forkd hub serve\` on 127.0.0.1; fresh FORKD_HOME; snapshot $size apparent; TCG; load average before: $load_before."
    echo
    echo "| step | seconds |"
    echo "|---|---|"
    echo "| forkd pull forkd/python-numpy | $pull_s |"
    echo "| forkd fork -n $N --run '$code' | $fork_s |"
    echo "| **total** (goal < 60 s) | **$total_s** (ratio $ratio) |"
    echo
    echo "$alive/$N children alive, $right/$N returned $expect."
} >> bench/RESULTS.md
[ "$right" -eq "$N" ] || die "only $right of $N children returned the right answer"
