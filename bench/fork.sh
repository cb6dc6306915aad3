#!/usr/bin/env bash
# Fork benchmark: N = 1, 10, 50, 100 children from the tiny parent, against cold-booting the
# same N VMs from the kernel. Appends a section to bench/RESULTS.md.
#
#   bench/fork.sh [N ...]          (default: 1 10 50 100)
# Env: FORKD_ACCEL (default auto), COLD_CAP (default 20: cold boots above this N are measured
#      at COLD_CAP and extrapolated linearly, and the table says so), FORKD (forkd binary).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/.." && pwd)"
NS=("${@:-1 10 50 100}"); NS=(${NS[*]})
ACCEL="${FORKD_ACCEL:-auto}"
COLD_CAP="${COLD_CAP:-20}"
# The assets CI keeps, set explicitly (forkd's own default is $FORKD_HOME/assets).
export FORKD_ASSETS="${FORKD_ASSETS:-/var/cache/forkd-ci/assets}"
"$repo/scripts/setup-engine.sh"
if [[ -z "${FORKD:-}" ]]; then
    (cd "$repo" && cargo build --release -q -j2 -p forkd-cli)
    FORKD="$repo/target/release/forkd"
fi
ASSETS="$("$repo/recipes/tiny/build.sh")"
export FORKD_HOME="$(mktemp -d /tmp/forkd-bench.XXXXXX)"
trap '"$FORKD" kill --all -q >/dev/null 2>&1 || true; rm -rf "$FORKD_HOME"' EXIT

"$FORKD" -q build-tiny --assets "$ASSETS" --accel "$ACCEL"
MEM_MIB=256
accel_used="$("$FORKD" fork --tag tiny -n 1 --accel "$ACCEL" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["accel"])')"

# Sum of Pss (kB) over the kept children's QEMU processes.
pss_kb() {
    "$FORKD" ps --json | python3 -c '
import json, sys
tot = 0; n = 0
for c in json.load(sys.stdin):
    if not c["running"]: continue
    for line in open("/proc/%d/smaps_rollup" % c["pid"]):
        if line.startswith("Pss:"): tot += int(line.split()[1]); n += 1
print(tot, n)'
}

# Cold boot: N fresh VMs from the kernel (same machine, RAM not file-backed), timed until
# every agent answers hello.
cold_boot() {
    python3 - "$1" "$ASSETS" "$MEM_MIB" "$accel_used" <<'PY'
import json, os, socket, subprocess, sys, tempfile, time
n, assets, mem, accel = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
tmp = tempfile.mkdtemp(prefix="cold", dir="/tmp")
procs, socks, failed = [], [], set()
t0 = time.time()
for i in range(n):
    s = f"{tmp}/a{i}.sock"
    socks.append(s)
    procs.append(subprocess.Popen([
        "qemu-system-x86_64", "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-machine", "pc-i440fx-7.2,smm=off,vmport=off", "-accel", accel, "-cpu", "qemu64",
        "-m", f"{mem}M", "-kernel", f"{assets}/vmlinuz", "-initrd", f"{assets}/initrd.img",
        "-append", "console=ttyS0 quiet panic=-1 no_timer_check", "-serial", f"file:{tmp}/c{i}.log",
        "-drive", f"if=none,id=root,file={assets}/rootfs.ext4,format=raw,snapshot=on",
        "-device", "virtio-serial-pci,id=vser0,addr=0x3", "-device", "virtio-blk-pci,drive=root,addr=0x4",
        "-chardev", f"socket,id=agent,path={s},server=on,wait=off",
        "-device", "virtserialport,bus=vser0.0,chardev=agent,name=forkd.agent"],
        stdout=subprocess.DEVNULL, stderr=open(f"{tmp}/q{i}.log", "w"), env=dict(os.environ, TMPDIR=tmp)))
pending = set(range(n))
conns = {}
while pending and time.time() - t0 < 600:
    for i in list(pending):
        if procs[i].poll() is not None:  # QEMU exited: this VM will never answer
            pending.discard(i); failed.add(i); continue
        try:
            if i not in conns:
                c = socket.socket(socket.AF_UNIX); c.connect(socks[i]); c.settimeout(0.05); conns[i] = c
            conns[i].sendall(b'{"v":1,"id":1,"op":"hello"}\n')
            if b'"ok":true' in conns[i].recv(4096):
                pending.discard(i)
        except socket.timeout:
            pass
        except OSError:
            conns.pop(i, None)
    time.sleep(0.05)
dt = time.time() - t0
for p in procs: p.kill()
for p in procs: p.wait()
for i in sorted(failed)[:3]:
    sys.stderr.write(f"cold boot VM {i} exited: " + open(f"{tmp}/q{i}.log").read() + open(f"{tmp}/c{i}.log").read()[-600:] + "\n")
subprocess.run(["rm", "-rf", tmp])
print(f"{dt:.2f} {n - len(pending) - len(failed)}")
PY
}

machine="$(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(. /etc/os-release; echo "$PRETTY_NAME"), $(qemu-system-x86_64 --version | head -n1), load before: $(cut -d' ' -f1-3 /proc/loadavg)"
rows=()
printf '%6s %12s %8s %14s %12s %10s %9s\n' N fork_wall_s alive pss_mib_child cold_wall_s speedup kept_wall
for n in "${NS[@]}"; do
    fork_json="$("$FORKD" fork --tag tiny -n "$n" --accel "$ACCEL" --json 2>/dev/null || true)"
    read -r fwall alive < <(echo "$fork_json" | python3 -c 'import json,sys; r=json.load(sys.stdin); print(r["wall_ms"]/1000, r["alive"])')
    keep_json="$("$FORKD" fork --tag tiny -n "$n" --accel "$ACCEL" --keep --json 2>/dev/null || true)"
    kwall="$(echo "$keep_json" | python3 -c 'import json,sys; print(json.load(sys.stdin)["wall_ms"]/1000)' 2>/dev/null || echo nan)"
    sleep 2
    read -r pss cnt < <(pss_kb)
    pss_child="$(python3 -c "print(round($pss/1024/max($cnt,1),1))")"
    "$FORKD" kill --all -q
    cold_n=$n; note=""
    if (( n > COLD_CAP )); then cold_n=$COLD_CAP; note=" (measured at N=$COLD_CAP, scaled linearly x$(python3 -c "print($n / $COLD_CAP)"))"; fi
    read -r cwall cup < <(cold_boot "$cold_n")
    cwall_n="$(python3 -c "print(round($cwall * $n / $cold_n, 2))")"
    speed="$(python3 -c "print(round($cwall_n / max($fwall, 0.001), 1))")"
    printf '%6s %12s %8s %14s %12s %10s %9s\n' "$n" "$fwall" "$alive/$n" "$pss_child" "$cwall_n" "${speed}x" "$kwall"
    rows+=("| $n | $fwall | $alive/$n | $kwall | $pss_child | $cwall_n$note ($cup/$cold_n up) | ${speed}x |")
done

{
    echo
    echo "## fork ($(date -u +%Y-%m-%dT%H:%MZ))"
    echo
    echo "Machine: $machine. Accelerator: $accel_used. Guest: tiny recipe (busybox + forkd-agent, Debian cloud kernel), $MEM_MIB MiB RAM, 1 vCPU."
    echo "fork = \`forkd fork --tag tiny -n N\` wall-clock until every child's agent answered and took its identity;"
    echo "kept = the same with \`--keep\` (children stay up, so they compete for CPU); PSS = sum of Pss (smaps_rollup) over the kept children / N;"
    echo "cold = N fresh QEMU boots of the same kernel/initrd/rootfs until every agent answers."
    echo
    echo "| N | fork wall s | alive | kept wall s | PSS MiB/child | cold boot wall s | fork vs cold |"
    echo "|---|---|---|---|---|---|---|"
    printf '%s\n' "${rows[@]}"
    echo
    echo "Goals: 100 children < 10 s; <= 30 MiB PSS per child; >= 10x faster than cold boot."
} >> "${RESULTS:-$repo/bench/RESULTS.md}"
echo "appended to bench/RESULTS.md" >&2
