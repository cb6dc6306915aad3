#!/usr/bin/env bash
# Cost of confining children: `fork -n N` (default 100) of the tiny image with each child in its
# cgroup, under QEMU's seccomp sandbox and (as root) an unprivileged user, against the same fork
# with FORKD_CONFINE=0 (none of it), alternating in one run. Also the kept children's PSS.
# Appends a section to bench/RESULTS.md. Goal: confined <= 1.1x unconfined.
#
#   bench/confine.sh [N]           (default 100)
# Env: ROUNDS (default 3: each mode runs ROUNDS times, alternating; medians are compared),
#      FORKD_ACCEL (default auto), FORKD (forkd binary; default: a release build).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/.." && pwd)"
N="${1:-100}"
ROUNDS="${ROUNDS:-3}"
ACCEL="${FORKD_ACCEL:-auto}"
export FORKD_ASSETS="${FORKD_ASSETS:-/var/cache/forkd-ci/assets}"
"$repo/scripts/setup-engine.sh"
if [[ -z "${FORKD:-}" ]]; then
    (cd "$repo" && cargo build --release -q -j2 -p forkd-cli)
    FORKD="$repo/target/release/forkd"
fi
ASSETS="$("$repo/recipes/tiny/build.sh")"
export FORKD_HOME="$(mktemp -d /tmp/forkd-bench.XXXXXX)"
unset FORKD_CGROUPS
trap 'FORKD_CONFINE=0 "$FORKD" kill --all -q >/dev/null 2>&1 || true; rm -rf "$FORKD_HOME"' EXIT
MEM_MIB=256
"$FORKD" -q build-tiny --assets "$ASSETS" --accel "$ACCEL" --mem-mib "$MEM_MIB"

# Wall seconds, CPU seconds (user+sys of forkd and every QEMU it reaped: less sensitive to
# other load on the host than the wall clock), alive count and accelerator of one `fork -n N`;
# $1 = 1 (confined) or 0.
fork_once() {
    FORKD_CONFINE="$1" python3 - "$FORKD" "$N" "$ACCEL" <<'PY'
import json, resource, subprocess, sys
forkd, n, accel = sys.argv[1:]
before = resource.getrusage(resource.RUSAGE_CHILDREN)
out = subprocess.run([forkd, "fork", "--tag", "tiny", "-n", n, "--accel", accel, "--json"],
                     capture_output=True, text=True).stdout
after = resource.getrusage(resource.RUSAGE_CHILDREN)
cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
r = json.loads(out)
print(r["wall_ms"] / 1000, round(cpu, 2), r["alive"], r["accel"])
PY
}
# Mean PSS (MiB) of N kept children; $1 as above.
pss_once() {
    FORKD_CONFINE="$1" "$FORKD" fork --tag tiny -n "$N" --accel "$ACCEL" --keep --json >/dev/null 2>&1
    sleep 2
    "$FORKD" ps --json | python3 -c '
import json, sys
tot = 0; n = 0
for c in json.load(sys.stdin):
    if not c["running"]: continue
    for line in open("/proc/%d/smaps_rollup" % c["pid"]):
        if line.startswith("Pss:"): tot += int(line.split()[1]); n += 1
print(round(tot / 1024 / max(n, 1), 1))'
    "$FORKD" kill --all -q
}

machine="$(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(. /etc/os-release; echo "$PRETTY_NAME"), $(qemu-system-x86_64 --version | head -n1), load before: $(cut -d' ' -f1-3 /proc/loadavg)"
confinement="$("$FORKD" doctor --json | python3 -c '
import json, sys
r = json.load(sys.stdin); r = r if isinstance(r, list) else r.get("checks", [])
print("; ".join(c["detail"] for c in r if c["name"] in ("cgroups", "qemu user")))')"
on=(); off=(); con=(); coff=(); accel=""
for r in $(seq "$ROUNDS"); do
    order="1 0"; (( r % 2 )) || order="0 1"   # alternate which mode goes first
    for mode in $order; do
        read -r wall cpu alive accel < <(fork_once "$mode")
        echo "round $r confine=$mode: ${wall}s wall, ${cpu}s CPU, $alive/$N alive" >&2
        [[ "$alive" == "$N" ]] || { echo "confine.sh: only $alive/$N children came up" >&2; exit 1; }
        if [[ $mode == 1 ]]; then on+=("$wall"); con+=("$cpu"); else off+=("$wall"); coff+=("$cpu"); fi
    done
done
pss_on="$(pss_once 1)"; pss_off="$(pss_once 0)"
med() {
    python3 -c "
import statistics as s
a = [$1]; b = [$2]
print(round(s.median(a), 2), round(s.median(b), 2), round(s.median(a) / s.median(b), 3))"
}
read -r med_on med_off ratio < <(med "$(IFS=,; echo "${on[*]}")" "$(IFS=,; echo "${off[*]}")")
read -r cmed_on cmed_off cratio < <(med "$(IFS=,; echo "${con[*]}")" "$(IFS=,; echo "${coff[*]}")")
echo "wall ${med_on}s vs ${med_off}s: ${ratio}x; CPU ${cmed_on}s vs ${cmed_off}s: ${cratio}x; PSS ${pss_on} vs ${pss_off} MiB/child" >&2
{
    echo
    echo "## confinement cost (bench/confine.sh) — $(date -u +%Y-%m-%dT%H:%MZ)"
    echo
    echo "Machine: $machine. Accelerator: $accel. Guest: tiny recipe, $MEM_MIB MiB RAM."
    echo "Confined: $confinement; QEMU -sandbox (seccomp). Unconfined: FORKD_CONFINE=0."
    echo "Each figure: \`forkd fork --tag tiny -n $N\` until every child answered: wall-clock, and CPU seconds (user+sys of forkd and the QEMUs it reaped); $ROUNDS rounds per mode, alternating which goes first; medians. forkd: $FORKD."
    echo
    echo "| mode | wall s (median) | wall runs | CPU s (median) | CPU runs | PSS MiB/child (kept) |"
    echo "|---|---|---|---|---|---|"
    echo "| confined | $med_on | ${on[*]} | $cmed_on | ${con[*]} | $pss_on |"
    echo "| unconfined | $med_off | ${off[*]} | $cmed_off | ${coff[*]} | $pss_off |"
    echo
    echo "Ratio confined/unconfined: **${ratio}x** wall, **${cratio}x** CPU (goal <= 1.1x)."
} >> "${RESULTS:-$repo/bench/RESULTS.md}"
echo "appended to bench/RESULTS.md" >&2
