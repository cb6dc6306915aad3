#!/usr/bin/env bash
# Branch benchmark (issue 10): snapshot a running child that holds about 10 MiB of fresh data,
# then fork from the branch, on tiny (256 MiB guest) and python-numpy (1 GiB guest). Measures,
# in one run per image:
#   - source pause: how long the child's vCPUs are stopped by `snapshot --from` (p50, p90 of R);
#   - branch size on disk and on a hub, against the data the child changed;
#   - fork 10 from the branch against fork 10 from its base, alternated, medians;
#   - fork 1 at chain depths 0..3, and the one-time build of a branch's memory after a pull.
# Appends a section to bench/RESULTS.md.
#
#   bench/branch.sh [IMAGE ...]        (default: tiny python-numpy)
# Env: R (pause samples, default 7), FORKD (forkd binary, default target/release/forkd),
#      PUBLISHER_HOME (a store holding python-numpy; built there once if missing, as
#      bench/quickstart.sh does), FORKD_ACCEL (default tcg here).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
IMAGES=("${@:-tiny python-numpy}"); IMAGES=(${IMAGES[*]})
R="${R:-7}"
export FORKD_ACCEL="${FORKD_ACCEL:-tcg}"
export FORKD_ASSETS="${FORKD_ASSETS:-/var/cache/forkd-ci/assets}"
FORKD="${FORKD:-$PWD/target/release/forkd}"
[ -x "$FORKD" ] || cargo build --release --locked -q -p forkd-cli
PUBLISHER_HOME="${PUBLISHER_HOME:-$FORKD_CACHE/bench-publisher}"
work="$(mktemp -d /tmp/fkb.XXXXXX)"
cleanup() { FORKD_HOME="$work/home" "$FORKD" -q kill --all >/dev/null 2>&1 || true; rm -rf "$work"; }
trap cleanup EXIT
out="$work/results.md"
host="$(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), load $(cut -d' ' -f1 /proc/loadavg) at start"

# j EXPR < JSON: one value from JSON on stdin (python, for portability).
j() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }
# wall CMD...: milliseconds the whole command took (process start, chain checks, all of it).
wall() { local s e; s=$(date +%s%N); "$@" >/dev/null; e=$(date +%s%N); echo $(( (e - s) / 1000000 )); }
median() { python3 -c "import statistics,sys; v=sorted(float(x) for x in sys.argv[1:]); print(f'{statistics.median(v):.0f}')" "$@"; }
pct() { python3 -c "import sys; v=sorted(float(x) for x in sys.argv[2:]); i=min(len(v)-1, int(round(float(sys.argv[1])/100*(len(v)-1)))); print(f'{v[i]:.0f}')" "$@"; }

image_into() { # IMAGE HOME: install IMAGE into the store HOME
    local img="$1" home="$2"
    if [ "$img" = tiny ]; then
        FORKD_HOME="$home" "$FORKD" -q build-tiny --assets "$("$PWD/recipes/tiny/build.sh")"
        return
    fi
    if ! "$FORKD" --home "$PUBLISHER_HOME" images list --json | grep -q "\"tag\": \"$img\""; then
        say "building $img into $PUBLISHER_HOME (one time)"
        apt_install mmdebstrap e2fsprogs
        "$FORKD" --home "$PUBLISHER_HOME" build "recipes/$img" --tag "$img"
    fi
    "$FORKD" --home "$PUBLISHER_HOME" -q pack "$img" -o "$work/$img.forkd-snapshot.tar.zst"
    FORKD_HOME="$home" "$FORKD" -q unpack "$work/$img.forkd-snapshot.tar.zst"
    rm -f "$work/$img.forkd-snapshot.tar.zst"
}

{
    echo
    echo "## branch ($(date -u +%Y-%m-%dT%H:%MZ), $host, $FORKD_ACCEL)"
    echo
    echo "bench/branch.sh: a kept child writes 10 MiB of random data to its tmpfs, then"
    echo "\`forkd snapshot --from\` saves it as a branch. Pause = QMP stop to cont, from the snapshot's"
    echo "JSON. Dirty data = the pages the branch stores (10 MiB written plus what the guest kernel"
    echo "changed) plus its disk changes. Fork 10 is \`forkd fork --json\` wall_ms (children only);"
    echo "depth rows time the whole \`forkd fork\` command (chain checks included). Medians of 3."
} > "$out"

for img in "${IMAGES[@]}"; do
    home="$work/home"
    rm -rf "$home"; mkdir -p "$home"
    export FORKD_HOME="$home"
    say "$img: installing"
    image_into "$img" "$home"
    keep() { "$FORKD" fork --tag "$1" -n 1 --keep --json | j 'd["kept"][0]'; }
    dirty() { "$FORKD" exec "$1" --sh "dd if=/dev/urandom of=/run/forkd-bench bs=1M count=$2 2>/dev/null && sync; echo ok" >/dev/null; }

    say "$img: source pause, $R samples"
    pauses=()
    for i in $(seq 1 "$R"); do
        id="$(keep "$img")"
        dirty "$id" 10
        snap="$("$FORKD" snapshot --from "$id" --tag "$img-b" --force --json)"
        pauses+=("$(echo "$snap" | j 'd["pause_ms"]')")
        [ "$i" = "$R" ] || "$FORKD" -q kill "$id"
    done
    own=$(echo "$snap" | j 'd["own_pages"]*4096')
    diskb=$(echo "$snap" | j 'd["disk_bytes"]')
    dirty_bytes=$((own + diskb))
    on_disk="$("$FORKD" images list --json | j "[i for i in d if i['tag']=='$img-b'][0]['disk_size']")"
    # The hub: what a push of the branch stores (its own blobs, compressed).
    hubdir="$work/hub-$img"
    "$FORKD" -q key generate >/dev/null 2>&1 || true
    "$FORKD" -q push "$img" "bench/$img" --hub "file://$hubdir" >/dev/null
    before=$(du -sb "$hubdir/blobs" | cut -f1)
    "$FORKD" -q push "$img-b" "bench/$img-b" --hub "file://$hubdir" >/dev/null
    after=$(du -sb "$hubdir/blobs" | cut -f1)
    on_hub=$((after - before))

    say "$img: fork 10 from the branch vs from its base"
    base_t=(); br_t=()
    for _ in 1 2 3; do
        base_t+=("$("$FORKD" fork --tag "$img" -n 10 --json | j 'd["wall_ms"]')")
        br_t+=("$("$FORKD" fork --tag "$img-b" -n 10 --json | j 'd["wall_ms"]')")
    done
    b10=$(median "${base_t[@]}"); r10=$(median "${br_t[@]}")

    say "$img: fork 1 at depths 0..3"
    "$FORKD" -q kill --all
    parent="$img"; depth_t=()
    for d in 0 1 2 3; do
        if [ "$d" -gt 0 ]; then
            id="$(keep "$parent")"
            dirty "$id" 1
            "$FORKD" -q snapshot --from "$id" --tag "$img-d$d" --force
            "$FORKD" -q kill "$id"
            parent="$img-d$d"
        fi
        t=()
        for _ in 1 2 3; do t+=("$(wall "$FORKD" -q fork --tag "$parent" -n 1)"); done
        depth_t+=("$(median "${t[@]}")")
    done
    # The one-time cost after a pull: the depth-3 branch's memory built again from its chain.
    rm -rf "$home/cache/memory"
    cold="$(wall "$FORKD" -q fork --tag "$img-d3" -n 1)"
    "$FORKD" -q kill --all

    p50=$(pct 50 "${pauses[@]}"); p90=$(pct 90 "${pauses[@]}")
    mem_mib="$("$FORKD" images list --json | j "[i for i in d if i['tag']=='$img'][0]['memory_mib']")"
    python3 - "$img" "$mem_mib" "$p50" "$p90" "$dirty_bytes" "$on_disk" "$on_hub" "$b10" "$r10" \
        "${depth_t[@]}" "$cold" "${pauses[*]}" >> "$out" <<'PY'
import sys
(img, mem, p50, p90, dirty, disk, hub, b10, r10, d0, d1, d2, d3, cold, samples) = sys.argv[1:]
mib = lambda b: f"{int(b) / 1048576:.1f} MiB"
d0, d1, d2, d3 = (int(x) for x in (d0, d1, d2, d3))
print(f"\n### {img} ({mem} MiB guest)\n")
print("| what | ours | goal | ratio |")
print("|---|---|---|---|")
print(f"| source pause, p50 (p90) of {len(samples.split())}: {samples} ms | {p50} ms ({p90} ms) | <= 100 ms p50 | {int(p50)/100:.2f} |")
print(f"| branch on disk, against dirty data {mib(dirty)} | {mib(disk)} | <= 1.2x | {int(disk)/int(dirty):.2f} |")
print(f"| branch on the hub (its own blobs, zstd), against dirty data | {mib(hub)} | <= 1.2x | {int(hub)/int(dirty):.2f} |")
print(f"| fork 10 from the branch, against fork 10 from its base ({b10} ms) | {r10} ms | <= 1.5x | {int(r10)/int(b10):.2f} |")
print(f"| `forkd fork -n 1`, whole command, at depth 0 / 1 / 2 / 3 | {d0} / {d1} / {d2} / {d3} ms | upstream adds ~460 ms per level | {(d3 - d0) / 3:+.0f} ms per level |")
print(f"| the same at depth 3 with its memory built first (once per branch, after a pull) | {cold} ms | | {int(cold) - d3:+d} ms |")
PY
    unset FORKD_HOME
done

cat "$out"
cat "$out" >> bench/RESULTS.md
