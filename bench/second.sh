#!/usr/bin/env bash
# Second-image benchmark (issue 12, part 3): how much of an image a pull downloads when the
# local chunk store already holds another image. For each pair FIRST:SECOND, on a fresh
# consumer store: `forkd pull FIRST`, then `forkd pull SECOND --json`; the share is SECOND's
# downloaded bytes over its whole download (the stored size of its distinct chunks, what a pull
# into an empty store downloads). The images are built in a publisher store and pushed to a
# fresh `forkd hub serve` on loopback (bytes are what is measured here, not time).
#
#   bench/second.sh [--no-record] [FIRST:SECOND ...]
#       default: jupyter-kernel:code-interpreter playwright-browser:agent-sandbox
#                python-numpy:nodejs python-numpy:python-numpy@rebuilt
#
# NAME@rebuilt is NAME built again (`forkd build` into a second tag, the build cache warm):
# a new version of the same recipe. Env: PUBLISHER_HOME (default $FORKD_CACHE/bench-publisher),
# where missing recipes are built (root and the Debian mirror; minutes each the first time).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
RECORD=1
PAIRS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --no-record) RECORD=0; shift ;;
        -*) die "unknown option $1" ;;
        *) PAIRS+=("$1"); shift ;;
    esac
done
[ ${#PAIRS[@]} -gt 0 ] || PAIRS=(jupyter-kernel:code-interpreter playwright-browser:agent-sandbox
    python-numpy:nodejs python-numpy:python-numpy@rebuilt)

need_cargo
say "building forkd (release)"
cargo build --release --locked -q -p forkd-cli
W="$(mktemp -d "${BENCH_DIR:-/var/tmp}/forkd-bench-second.XXXXXX")"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    rm -rf "$W"
}
trap cleanup EXIT
# A copy: a rebuild of target/ while the recipes build must not change the binary under test.
cp target/release/forkd target/x86_64-unknown-linux-gnu/release/forkd-agent "$W/"
FORKD="$W/forkd"
PUBLISHER_HOME="${PUBLISHER_HOME:-$FORKD_CACHE/bench-publisher}"
export FORKD_ASSETS="${FORKD_ASSETS:-$FORKD_CACHE/assets}"
pub() { "$FORKD" --home "$PUBLISHER_HOME" "$@"; }

# tag of an image name: NAME, or NAME-rebuilt for NAME@rebuilt
tag_of() { case "$1" in *@rebuilt) echo "${1%@rebuilt}-rebuilt" ;; *) echo "$1" ;; esac; }
have() { pub images list --json | grep -q "\"tag\": \"$1\""; }
for pair in "${PAIRS[@]}"; do
    for img in "${pair%%:*}" "${pair#*:}"; do
        t="$(tag_of "$img")"
        have "$t" && continue
        say "building $t into $PUBLISHER_HOME (one time)"
        pub build "recipes/${img%@rebuilt}" --tag "$t"
    done
done
[ -f "$PUBLISHER_HOME/keys/forkd.pub" ] || pub key generate >/dev/null
KEY="$PUBLISHER_HOME/keys/forkd.pub"

hub="$(start_hub_serve "$FORKD" "$W")"
pids+=("$(cat "$W/serve.pid")")

declare -A pushed
rows=()
for pair in "${PAIRS[@]}"; do
    first="$(tag_of "${pair%%:*}")"; second="$(tag_of "${pair#*:}")"
    for t in "$first" "$second"; do
        [ -n "${pushed[$t]:-}" ] && continue
        say "pushing $t"
        pub -q push "$t" "bench/$t" --hub "$hub" --token-file "$W/token" --json > "$W/push-$t.json"
        pushed[$t]=1
    done
    say "$first, then $second"
    home="$W/c-$first-$second"
    "$FORKD" -q --home "$home" pull "bench/$first" --hub "$hub" --trust "$KEY" --json > "$W/a.json"
    "$FORKD" -q --home "$home" pull "bench/$second" --hub "$hub" --trust "$KEY" --json > "$W/b.json"
    rows+=("$(python3 - "$W/a.json" "$W/b.json" "$first" "$second" "$W/push-$second.json" <<'PY'
import json, sys
a, b = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
first, second = sys.argv[3], sys.argv[4]
push = json.load(open(sys.argv[5]))
size = push["stored_size"]
share = b["downloaded_bytes"] / size
goal = "<= 10%" if second.endswith("-rebuilt") else ("report" if second == "nodejs" else "<= 30%")
print(f"| {second} after {first} | {size/2**20:.1f} MiB | {b['downloaded_bytes']/2**20:.1f} MiB | "
      f"{b['cached_bytes']/2**20:.1f} MiB | **{100*share:.0f}%** ({goal}) | "
      f"{push['uploaded_bytes']/2**20:.1f} MiB stored, {push['reused_bytes']/2**20:.1f} MiB named |")
PY
)")
    rm -rf "$home"
done

machine="$(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -r)"
table="$(printf '%s\n' \
"| second image after first | its download | downloaded | from the chunk store | share downloaded | its push to the hub |" \
"|---|---|---|---|---|---|" "${rows[@]}")"
echo
echo "$table"
if [ "$RECORD" = 1 ]; then
    {
        echo
        echo "## Second image (bench/second.sh), $(date -u +%Y-%m-%dT%H:%MZ)"
        echo
        echo "Machine: $machine. Images built here with \`forkd build\`, pushed to \`forkd hub serve\` on"
        echo "loopback with FastCDC chunks (16/64/256 KiB) in packs; a fresh consumer store pulls the first"
        echo "image, then the second. \"Its download\" is what a pull of the second into an empty store"
        echo "downloads (its distinct chunks, stored size)."
        echo
        echo "$table"
    } >> bench/RESULTS.md
fi
