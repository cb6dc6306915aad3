#!/usr/bin/env bash
# Lazy fork benchmark (issue 12). A hub (`forkd hub serve`) holding each image sits behind a
# shaping proxy (bench/shape.py: 100 Mbit/s, 20 ms round trip, shared by every connection), so
# the link is realistic. For each image, from a fresh store each time, in the same run:
#   pull-then-fork: `forkd pull` then `forkd fork -n 1` (time to the first child's answer), and
#                   `forkd pull` then `forkd fork -n N` (time until all N answered);
#   lazy:           `forkd fork --tag OWNER/NAME --hub ... -n 1`, and `-n N`: the first child's
#                   answer and the end of the fork, from the command's start (its --json
#                   `pull.first_child_ms` / `children_done_ms`), and the bytes downloaded by then.
# Prints a table, and appends it to bench/RESULTS.md unless --no-record.
#
#   bench/lazy.sh [--n N] [--level L] [--no-record] [IMAGE ...]
#       default: python-numpy playwright-browser, pushed at `forkd push`'s default zstd level
#       (--level: pushed at L; the table says which)
#
# Env: PUBLISHER_HOME  a store holding the images (built there with `forkd build recipes/IMAGE`
#                      when missing: root and the Debian mirror, minutes the first time)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
N=100
LEVEL=
RECORD=1
IMAGES=()
while [ $# -gt 0 ]; do
    case "$1" in
        --n) [ $# -ge 2 ] || die "--n needs a number"; N="$2"; shift 2 ;;
        --level) [ $# -ge 2 ] || die "--level needs a zstd level (1..19)"; LEVEL="$2"; shift 2 ;;
        --no-record) RECORD=0; shift ;;
        -*) die "unknown option $1" ;;
        *) IMAGES+=("$1"); shift ;;
    esac
done
[ ${#IMAGES[@]} -gt 0 ] || IMAGES=(python-numpy playwright-browser)

need_cargo
say "building forkd (release)"
cargo build --release --locked -q -p forkd-cli
FORKD="$PWD/target/release/forkd"
PUBLISHER_HOME="${PUBLISHER_HOME:-$FORKD_CACHE/bench-publisher}"
export FORKD_ASSETS="${FORKD_ASSETS:-$FORKD_CACHE/assets}"
pub() { "$FORKD" --home "$PUBLISHER_HOME" "$@"; }

W="$(mktemp -d "${BENCH_DIR:-/var/tmp}/forkd-bench-lazy.XXXXXX")"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    rm -rf "$W"
}
trap cleanup EXIT

for img in "${IMAGES[@]}"; do
    if ! pub images list --json | grep -q "\"tag\": \"$img\""; then
        say "building $img into $PUBLISHER_HOME (one time)"
        pub build "recipes/$img" --tag "$img"
    fi
done
[ -f "$PUBLISHER_HOME/keys/forkd.pub" ] || pub key generate >/dev/null
KEY="$PUBLISHER_HOME/keys/forkd.pub"

direct="$(start_hub_serve "$FORKD" "$W")"
pids+=("$(cat "$W/serve.pid")")
hostport="${direct#http://}"; hostport="${hostport%/}"
python3 bench/shape.py --to "$hostport" --mbit 100 --rtt-ms 20 > "$W/shape.out" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do grep -q listening "$W/shape.out" 2>/dev/null && break; sleep 0.1; done
shaped="http://$(awk '/listening on/ {print $3}' "$W/shape.out")/"

now() { date +%s.%N; }

rows=()
declare -A R
for img in "${IMAGES[@]}"; do
    say "publishing $img"
    t_push=$(date +%s.%N)
    pub -q push "$img" "bench/$img" --hub "$direct" --token-file "$W/token" ${LEVEL:+--level "$LEVEL"} >/dev/null
    say "$img pushed${LEVEL:+ at level $LEVEL} in $(python3 -c "print(round($(date +%s.%N) - $t_push, 1))") s"
    case "$img" in
        python-numpy) work=(--run "int(np.dot(np.arange(100), np.arange(100)))") ;;
        *) work=(--exec true) ;;
    esac

    for n in 1 "$N"; do
        say "$img: pull then fork -n $n"
        home="$W/pf-$img-$n"
        t0=$(now)
        "$FORKD" -q --home "$home" pull "bench/$img" --tag "$img" --hub "$shaped" --trust "$KEY" --json > "$W/pull.json"
        t1=$(now)
        "$FORKD" -q --home "$home" fork --tag "$img" -n "$n" "${work[@]}" --json > "$W/fork.json"
        t2=$(now)
        R[pf_pull_$n]=$(python3 -c "print($t1 - $t0)")
        R[pf_total_$n]=$(python3 -c "print($t2 - $t0)")
        rm -rf "$home"

        say "$img: lazy fork -n $n"
        home="$W/lz-$img-$n"
        t0=$(now)
        "$FORKD" -q --home "$home" fork --tag "bench/$img" -n "$n" "${work[@]}" --hub "$shaped" \
            --trust "$KEY" --json > "$W/lazy.json"
        t1=$(now)
        [ -z "${LAZY_JSON_DIR:-}" ] || cp "$W/lazy.json" "$LAZY_JSON_DIR/lazy-$img-$n.json"
        python3 - "$W/lazy.json" "$t0" "$t1" > "$W/lazy-$n.txt" <<'EOF'
import json, sys
v = json.load(open(sys.argv[1]))
p = v["pull"]
assert p["lazy"], p
assert v["succeeded"] == v["requested"], v
r = p["reads_at_first_child"]
print(p["first_child_ms"] / 1000, p["children_done_ms"] / 1000, p["downloaded_at_first_child"],
      p["image_bytes"], float(sys.argv[3]) - float(sys.argv[2]), r["read_bytes"],
      (r["waited_for_requested_ms"] + r["waited_for_in_flight_ms"]) / 1000)
EOF
        read -r lz_first lz_done lz_bytes lz_total lz_wall lz_read lz_waited < "$W/lazy-$n.txt"
        R[lz_first_$n]=$lz_first; R[lz_done_$n]=$lz_done; R[lz_bytes_$n]=$lz_bytes; R[lz_wall_$n]=$lz_wall
        R[lz_read_$n]=$lz_read; R[lz_waited_$n]=$lz_waited
        rm -rf "$home"
    done
    rows+=("$(python3 - "$img" "$N" "${R[pf_total_1]}" "${R[lz_first_1]}" "${R[lz_bytes_1]}" "$lz_total" \
        "${R[pf_total_$N]}" "${R[lz_done_$N]}" "${R[lz_wall_$N]}" "${R[pf_pull_1]}" \
        "${R[lz_read_1]}" "${R[lz_waited_1]}" <<'EOF'
import sys
img, n = sys.argv[1:3]
pf1, lz1, b1, total, pfn, lzn, lzwall, pull, read, waited = map(float, sys.argv[3:])
print(f"| {img} | {total/2**20:.0f} MiB | {pull:.1f} s | {pf1:.2f} s | {lz1:.2f} s | "
      f"{lz1/pf1:.2f} (goal <= 0.25) | {100*b1/total:.0f}% (goal <= 20%) | "
      f"{100*read/total:.0f}% | {waited:.1f} s | {pfn:.1f} s | "
      f"{lzn:.1f} s | {lzn/pfn:.2f} (goal <= 1) | {lzwall:.1f} s |")
EOF
)")
done

machine="$(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -r)"
table="$(printf '%s\n' \
"| image | download | pull alone | pull + fork -n 1: first answer | lazy -n 1: first answer | ratio | fetched by then | read by the child by then | its reads waited | pull + fork -n $N: all answered | lazy -n $N: all answered | ratio | lazy -n $N: command ends |" \
"|---|---|---|---|---|---|---|---|---|---|---|---|---|" "${rows[@]}")"
echo
echo "$table"
if [ "$RECORD" = 1 ]; then
    {
        echo
        echo "## Lazy fork (bench/lazy.sh), $(date -u +%Y-%m-%d)"
        echo
        echo "Machine: $machine. TCG. Hub: \`forkd hub serve\` behind bench/shape.py (100 Mbit/s, 20 ms RTT,"
        echo "one link shared by all connections). Fresh store for every run; same run for both columns."
        echo "Chunks pushed at zstd level ${LEVEL:-3}."
        echo "\"First answer\" is from the command's start to the first child's finished work"
        echo "(numpy: \`--run\`, others: \`--exec true\`); pull + fork is the wall clock of both commands."
        echo "\"Read by the child\" is the stored size of the distinct chunks its reads (with the kernel's"
        echo "read-around) covered by its answer, as a share of the image; \"its reads waited\" sums the"
        echo "time they waited for chunks (reads overlap, so it can exceed the wall clock)."
        echo
        echo "$table"
    } >> bench/RESULTS.md
fi
