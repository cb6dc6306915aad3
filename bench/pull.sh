#!/usr/bin/env bash
# Pull benchmark (issue 3): time `forkd pull` of a ~1.5 GiB synthetic snapshot (about 660 MiB of
# data) from `forkd hub serve` on loopback, next to two floors on the same bytes, measured in
# the same run:
#   - curl -o /dev/null of the image's pack (`forkd pack`), served by the same server;
#   - zstd -d | tar -x of that pack into a fresh directory.
# Prints the times and pull / slower floor (goal <= 1.2). Appends a section to bench/RESULTS.md.
#
#   bench/pull.sh [--runs N] [--no-record]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
RUNS=3
RECORD=1
while [ $# -gt 0 ]; do
    case "$1" in
        --runs) RUNS="$2"; shift 2 ;;
        --no-record) RECORD=0; shift ;;
        *) die "unknown option $1" ;;
    esac
done

apt_install zstd curl e2fsprogs tar python3
need_cargo
say "building forkd (release)"
cargo build --release -p forkd-cli >&2
FORKD="$PWD/target/release/forkd"

W="$(mktemp -d "${BENCH_DIR:-/var/tmp}/forkd-bench-pull.XXXXXX")"
SERVER_PID=""
cleanup() {
    [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null || true
    if [ -n "${BENCH_KEEP:-}" ]; then echo "kept $W" >&2; else rm -rf "$W"; fi
}
trap cleanup EXIT

say "making the synthetic snapshot in $W"
mkdir -p "$W/src" "$W/rootdir"
python3 - "$W" <<'PY'
import os, random, sys, hashlib
w = sys.argv[1]
rnd = random.Random(42)
words = b"the quick brown fox jumps over lazy dog import numpy as np def return class lambda".split()
text = b" ".join(rnd.choice(words) for _ in range(700_000))[: 4 << 20]
def textish(n):
    o = rnd.randrange(0, len(text) - n) if n < len(text) else 0
    return text[o:o + n]
PAGE, CL = 4096, 64 * 4096
# memory.bin: 1 GiB apparent, clusters of 256 KiB: 30% random, 15% text-like, the rest holes.
with open(f"{w}/src/memory.bin", "wb") as f:
    f.truncate(1 << 30)
    for off in range(0, 1 << 30, CL):
        r = rnd.random()
        if r < 0.30:
            f.seek(off); f.write(os.urandom(CL))
        elif r < 0.45:
            f.seek(off); f.write(textish(CL))
with open(f"{w}/src/vmstate", "wb") as f:
    f.write(os.urandom(1 << 20))
# rootfs contents: 100 MiB random + 150 MiB text-like, 64 files.
for i in range(64):
    with open(f"{w}/rootdir/file{i:02}.bin", "wb") as f:
        n = 4 << 20
        f.write(os.urandom((100 << 20) // 64) if i % 5 < 2 else textish(min(n, len(text) - 1)))
PY
mkfs.ext4 -q -F -d "$W/rootdir" "$W/src/rootfs.ext4" 512M >/dev/null 2>&1
python3 - "$W" <<'PY'
import hashlib, os, sys, datetime
w = sys.argv[1]
def sha(p):
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while b := f.read(8 << 20):
            h.update(b)
    return h.hexdigest()
files = ["memory.bin", "rootfs.ext4", "vmstate"]
now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
lines = ['format_version = 1', 'name = "bench"', 'version = "1"', 'description = "pull benchmark"',
         'arch = "x86_64"', 'memory_mib = 1024', f'created_at = "{now}"', 'forkd_version = "0.1.0"', '',
         '[engine]', 'name = "qemu"', 'version = "7.2.0"', 'machine_type = "pc-i440fx-7.2"', 'cpu_model = "qemu64"', '']
for n in files:
    p = f"{w}/src/{n}"
    lines += [f'[files."{n}"]', f'size = {os.path.getsize(p)}', f'sha256 = "{sha(p)}"', '']
open(f"{w}/src/manifest.toml", "w").write("\n".join(lines))
PY
(cd "$W/src" && tar -c manifest.toml memory.bin rootfs.ext4 vmstate | zstd -q -T0 -1 -o "$W/seed.tar.zst")
PUB="$W/pub"
"$FORKD" --home "$PUB" -q unpack "$W/seed.tar.zst" --tag bench
rm -rf "$W/src" "$W/rootdir" "$W/seed.tar.zst"
"$FORKD" --home "$PUB" key generate >/dev/null
KEY="$(sed -n 2p "$PUB/keys/forkd.pub")"
"$FORKD" --home "$PUB" -q pack bench -o "$W/bench.forkd-snapshot.tar.zst"

say "starting forkd hub serve on loopback"
mkdir -p "$W/hub"
head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$W/token"
"$FORKD" --home "$W/srvhome" hub serve --listen 127.0.0.1:0 --root "$W/hub" --token-file "$W/token" > "$W/serve.out" &
SERVER_PID=$!
for _ in $(seq 1 100); do grep -q "http://" "$W/serve.out" 2>/dev/null && break; sleep 0.1; done
URL="$(grep -o 'http://[^ ]*' "$W/serve.out" | head -n1)"
[ -n "$URL" ] || die "hub serve did not start"
"$FORKD" --home "$PUB" push bench bench/snap --hub "$URL" --token-file "$W/token" -q
cp "$W/bench.forkd-snapshot.tar.zst" "$W/hub/bench.forkd-snapshot.tar.zst"

apparent=$(du -sb --apparent-size "$PUB/images/bench" | cut -f1)
data=$(du -sB1 "$PUB/images/bench" | cut -f1)
packsz=$(stat -c %s "$W/bench.forkd-snapshot.tar.zst")
hubsz=$(du -sB1 "$W/hub/blobs" | cut -f1)

t() { local s e; s=$(date +%s.%N); "$@"; e=$(date +%s.%N); echo "$e - $s" | bc -l; }
best() { sort -g | head -n1; }

# Each timed command starts from a clean, quiet disk: the previous output is removed and
# everything written back (`sync`) before the clock starts, outside the timing. Deleting an
# fsynced 640 MiB image on a `discard` mount takes 1-3 s here, and an earlier untar's dirty
# pages would otherwise be written back during the next pull's fsync.
clean() { rm -rf "$W/$1"; sync; }
pull_once() {
    "$FORKD" --home "$W/c" -q pull bench/snap --tag bench --hub "$URL" --trust "$KEY" >/dev/null
}
curl_once() { curl -sf -o /dev/null "${URL}bench.forkd-snapshot.tar.zst"; }
untar_once() {
    zstd -q -d -c "$W/bench.forkd-snapshot.tar.zst" | tar -x -C "$W/x"
}

verify_once() { untar_once && (cd "$W/x" && sha256sum memory.bin rootfs.ext4 vmstate >/dev/null); }
command -v bc >/dev/null || apt_install bc
say "warming the page cache"
curl_once; clean c; pull_once
say "timing ($RUNS runs each, best kept)"
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
P=(); C=(); U=(); V=()
for _ in $(seq 1 "$RUNS"); do
    clean c; P+=("$(t pull_once)")
    clean x; C+=("$(t curl_once)")
    clean x; mkdir "$W/x"; U+=("$(t untar_once)")
    clean x; mkdir "$W/x"; V+=("$(t verify_once)")
done
# The pulled bytes equal the source (sha256 of every file).
for f in memory.bin rootfs.ext4 vmstate; do
    a=$(sha256sum < "$PUB/images/bench/$f"); b=$(sha256sum < "$W/c/images/bench/$f")
    [ "$a" = "$b" ] || die "pulled $f differs from the source"
done
pull=$(printf '%s\n' "${P[@]}" | best)
curl_t=$(printf '%s\n' "${C[@]}" | best)
untar=$(printf '%s\n' "${U[@]}" | best)
verify=$(printf '%s\n' "${V[@]}" | best)
slower=$(echo "if ($curl_t > $untar) $curl_t else $untar" | bc -l)
ratio=$(echo "$pull / $slower" | bc -l)
pulled_disk=$(du -sB1 "$W/c/images/bench" | cut -f1)

mib() { echo "scale=1; $1 / 1048576" | bc -l; }
report=$(cat <<REP
## pull (bench/pull.sh) — $(date -u +%Y-%m-%dT%H:%MZ)

Snapshot: $(mib "$apparent") MiB apparent, $(mib "$data") MiB on disk (memory.bin 1 GiB sparse with
30% random + 15% text-like 256 KiB clusters, rootfs.ext4 512 MiB with 250 MiB of files, vmstate 1 MiB).
Hub blobs: $(mib "$hubsz") MiB; pack: $(mib "$packsz") MiB. Server: \`forkd hub serve\` on 127.0.0.1.
Best of $RUNS runs (interleaved; before each, the previous output is removed and \`sync\`ed, untimed), warm page cache, $(nproc) CPUs, $(uname -r); load average
$LOAD_START at the start and $(cut -d' ' -f1-3 /proc/loadavg) at the end (other jobs share the machine).

| what | seconds |
|---|---|
| \`forkd pull\` (8 parallel chunk downloads, sha256 of each blob, decompress, sparse write, fsync + install) | $(printf %.3f "$pull") |
| floor: \`curl -o /dev/null\` of the pack from the same server | $(printf %.3f "$curl_t") |
| floor: \`zstd -d \| tar -x\` of the same pack | $(printf %.3f "$untar") |
| **pull / slower floor** (goal ≤ 1.2) | **$(printf %.2f "$ratio")** |
| for reference: \`zstd -d \| tar -x\` then \`sha256sum\` of the files (a whole-file check) | $(printf %.3f "$verify") |

Pulled image on disk: $(mib "$pulled_disk") MiB (holes kept). All runs: pull ${P[*]}; curl ${C[*]}; untar ${U[*]}; untar+sha256sum ${V[*]}.
REP
)
echo "$report"
if [ "$RECORD" = 1 ]; then
    printf '\n%s\n' "$report" >> bench/RESULTS.md
    say "appended to bench/RESULTS.md"
fi
