#!/usr/bin/env bash
# Network benchmark (issue 11): the fork bench with and without `--net`, in one run.
#   - fork N children (default 100) of tiny, without a network and with `--net`, alternated
#     R times (default 2); wall-clock medians and their ratio (goal: <= 1.3x); and of the same
#     snapshot made without a NIC (layout v1), for what the NIC costs a child without a network;
#   - PSS per child of N kept children: QEMU alone without a network, QEMU plus its forkd-net
#     back end with one (goal: <= +5 MiB per child);
#   - throughput of one child to a host sink through its back end at the default rate.
# Appends a section to bench/RESULTS.md.
#
#   bench/net.sh [N]
# Env: R (rounds, default 2), FORKD (binary, default target/release/forkd), FORKD_ACCEL (tcg).
set -euo pipefail
shopt -s inherit_errexit  # a failed fork inside $(...) stops the bench
cd "$(dirname "$0")/.."
. scripts/lib.sh
N="${1:-100}"
R="${R:-2}"
export FORKD_ACCEL="${FORKD_ACCEL:-tcg}"
export FORKD_ASSETS="${FORKD_ASSETS:-/var/cache/forkd-ci/assets}"
FORKD="${FORKD:-$PWD/target/release/forkd}"
[ -x "$FORKD" ] || cargo build --release --locked -q -p forkd-cli
work="$(mktemp -d /tmp/fkn.XXXXXX)"
export FORKD_HOME="$work/home"
cleanup() { "$FORKD" -q kill --all >/dev/null 2>&1 || true; kill "${sink_pid:-0}" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
machine="$(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(qemu-system-x86_64 --version | head -n1), load before: $(cut -d' ' -f1-3 /proc/loadavg)"

median() { python3 -c "import statistics,sys; print(f'{statistics.median(float(x) for x in sys.argv[1:]):.2f}')" "$@"; }
# fork_s [TAG] ARGS...: wall seconds of one fork of N, as forkd reports it; fails unless all
# came up.
fork_s() {
    local tag=tiny
    case "${1:-}" in tiny*) tag="$1"; shift ;; esac
    "$FORKD" fork --tag "$tag" -n "$N" --json "$@" 2>/dev/null | python3 -c '
import json,sys; r=json.load(sys.stdin)
assert r["alive"] == r["requested"], "%d/%d up" % (r["alive"], r["requested"])
print(r["wall_ms"]/1000)'
}
# pss_mib PATTERN: MiB of Pss summed over processes whose command line matches PATTERN.
pss_mib() {
    python3 - "$1" <<'PY'
import os, re, sys
pat = re.compile(sys.argv[1]); tot = 0
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
        if not pat.search(cmd): continue
        for line in open(f"/proc/{pid}/smaps_rollup"):
            if line.startswith("Pss:"): tot += int(line.split()[1])
    except OSError: pass
print(f"{tot/1024:.1f}")
PY
}

say "building the tiny parent, and the same without a NIC (layout v1, as before issue 11)"
assets="$(recipes/tiny/build.sh)"
"$FORKD" -q build-tiny --assets "$assets"
FORKD_TEST_LAYOUT=forkd-pc-v1 "$FORKD" -q build-tiny --assets "$assets" --tag tiny-v1

plain=(); net=(); v1=()
for r in $(seq 1 "$R"); do
    say "round $r/$R: fork $N without a NIC (v1), without a network, then with --net"
    v1+=("$(fork_s tiny-v1)")
    plain+=("$(fork_s)")
    net+=("$(fork_s --net)")
done
o="$(median "${v1[@]}")"; p="$(median "${plain[@]}")"; q="$(median "${net[@]}")"
ratio="$(python3 -c "print(f'{$q / $p:.2f}')")"
nic_ratio="$(python3 -c "print(f'{$p / $o:.2f}')")"

say "PSS of $N kept children, without and with a network"
"$FORKD" -q fork --tag tiny -n "$N" --keep >/dev/null; sleep 2
pss_plain="$(pss_mib 'qemu-system')"; "$FORKD" -q kill --all >/dev/null
"$FORKD" -q fork --tag tiny -n "$N" --keep --net >/dev/null; sleep 2
pss_q="$(pss_mib 'qemu-system')"; pss_d="$(pss_mib '__netd')"; "$FORKD" -q kill --all >/dev/null
per_plain="$(python3 -c "print(f'{$pss_plain / $N:.1f}')")"
per_net="$(python3 -c "print(f'{($pss_q + $pss_d) / $N:.1f}')")"
per_d="$(python3 -c "print(f'{$pss_d / $N:.1f}')")"
delta="$(python3 -c "print(f'{($pss_q + $pss_d - $pss_plain) / $N:+.1f}')")"

say "throughput of one child to a host sink (default rate: 100 Mbit/s)"
sink_port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
python3 - "$sink_port" > "$work/sink.out" <<'PY' &
import socket, sys, time
l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("127.0.0.1", int(sys.argv[1]))); l.listen(1)
c, _ = l.accept(); t = time.time(); n = 0
while True:
    b = c.recv(1 << 16)
    if not b: break
    n += len(b)
print(f"{n} {time.time() - t:.3f}")
PY
sink_pid=$!
sleep 0.5
"$FORKD" -q fork --tag tiny --allow "host:$sink_port" \
    --exec "dd if=/dev/zero bs=64k count=256 2>/dev/null | nc 10.0.2.2 $sink_port" >/dev/null
wait "$sink_pid" || true
read -r bytes secs < "$work/sink.out"
mbit="$(python3 -c "print(f'{$bytes * 8 / $secs / 1e6:.1f}')")"

{
    echo
    echo "## net ($(date -u +%Y-%m-%dT%H:%MZ))"
    echo
    echo "Machine: $machine. Accelerator: $FORKD_ACCEL. Guest: tiny (256 MiB), 1 vCPU. Release build."
    echo "fork = \`forkd fork --tag tiny -n $N\` wall-clock as forkd reports it (all children up, each with its own"
    echo "identity; with \`--net\` also its back end started, its NIC plugged in and configured, carrier up), median of $R, alternated."
    echo "PSS = sum of Pss (smaps_rollup) over the $N kept children's processes / $N."
    echo
    echo "| what | without network | with --net | ratio / delta | goal |"
    echo "|---|---|---|---|---|"
    echo "| fork $N, wall s (runs: ${plain[*]} / ${net[*]}) | $p | $q | ${ratio}x | <= 1.3x |"
    echo "| what the NIC costs a child without a network: fork $N of a v1 snapshot (no NIC) vs v2, wall s (runs: ${v1[*]}) | $o (v1) | $p (v2, no --net) | ${nic_ratio}x | ~1.0x |"
    echo "| PSS per child, MiB (QEMU; + back end) | $per_plain | $per_net (back end $per_d) | $delta MiB | <= +5 MiB |"
    echo "| one child to a host sink, 16 MiB | — | $mbit Mbit/s | — | (rate cap 100) |"
} >> "${RESULTS:-bench/RESULTS.md}"
echo "appended to bench/RESULTS.md" >&2
