#!/usr/bin/env bash
# Benchmark `forkd pack` / `forkd unpack` against the floor `tar -cf - FILES | zstd -T0 -3` and
# `zstd -d | tar -x` on the same synthetic snapshot (sparse 1 GiB memory.bin with ~3% random
# pages, 256 MiB ext4 from mkfs.ext4 -d, 320 KiB state file). Page cache is warm for both.
#
# Usage: bench/pack.sh [RUNS]        (default 3; the best run of each is reported)
# Appends a dated entry to bench/RESULTS.md (section "pack/unpack").
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
for tool in zstd tar mkfs.ext4; do
    command -v "$tool" >/dev/null || { echo "missing $tool: apt-get install zstd tar e2fsprogs" >&2; exit 1; }
done

cargo build --release -q -p forkd-cli --bin forkd
cargo build --release -q -p forkd-store --example synth_snapshot
forkd=$PWD/target/release/forkd
synth=$PWD/target/release/examples/synth_snapshot

work=$(mktemp -d "${TMPDIR:-/var/tmp}/forkd-bench.XXXXXX")
trap 'rm -rf "$work"' EXIT
data=$("$synth" "$work/a" synthetic | tail -n 1)
img=$work/a/images/synthetic
files=(manifest.toml memory.bin rootfs.ext4 vmstate)
logical=$(cd "$img" && stat -c %s "${files[@]}" | awk '{s+=$1} END {print s}')
cat "$img"/* > /dev/null   # warm the page cache for everyone

now() { date +%s.%N; }
best() { sort -g | head -1; }
ours_pack=(); floor_pack=(); ours_unpack=(); floor_unpack=()
for i in $(seq "$runs"); do
    rm -f "$work/ours.zst" "$work/floor.zst"
    t0=$(now); "$forkd" -q --home "$work/a" pack synthetic -o "$work/ours.zst"; t1=$(now)
    ours_pack+=("$(echo "$t1 - $t0" | bc -l)")
    t0=$(now); tar -C "$img" -cf - "${files[@]}" | zstd -q -T0 -3 -o "$work/floor.zst"; t1=$(now)
    floor_pack+=("$(echo "$t1 - $t0" | bc -l)")

    rm -rf "$work/b" "$work/x"; mkdir -p "$work/x"; sync
    t0=$(now); "$forkd" -q --home "$work/b" unpack "$work/ours.zst"; t1=$(now)
    ours_unpack+=("$(echo "$t1 - $t0" | bc -l)")
    t0=$(now); zstd -q -d -c "$work/floor.zst" | tar -x -C "$work/x"; t1=$(now)
    floor_unpack+=("$(echo "$t1 - $t0" | bc -l)")
done
# Same bytes out of both unpackers.
for f in memory.bin rootfs.ext4 vmstate; do
    cmp -s "$work/b/images/synthetic/$f" "$work/x/$f" || { echo "unpacked $f differs" >&2; exit 1; }
done

op=$(printf '%s\n' "${ours_pack[@]}" | best); fp=$(printf '%s\n' "${floor_pack[@]}" | best)
ou=$(printf '%s\n' "${ours_unpack[@]}" | best); fu=$(printf '%s\n' "${floor_unpack[@]}" | best)
mib=$(echo "$logical / 1048576" | bc -l)
ours_size=$(stat -c %s "$work/ours.zst"); floor_size=$(stat -c %s "$work/floor.zst")
disk_ours=$(( $(stat -c %b "$work/b/images/synthetic/memory.bin") * 512 ))
disk_floor=$(( $(stat -c %b "$work/x/memory.bin") * 512 ))
row() { printf '| %-28s | %7.2f s | %8.0f MiB/s | %5.2f |\n' "$1" "$2" "$(echo "$mib / $2" | bc -l)" "$(echo "$2 / $3" | bc -l)"; }
report=$(cat <<EOT

### pack/unpack — $(date -u +%Y-%m-%dT%H:%MZ) (bench/pack.sh, best of $runs)

Machine: $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')), kernel $(uname -r).
Snapshot: $(printf '%.0f' "$mib") MiB logical (memory.bin 1 GiB with $((data >> 20)) MiB of random pages, rootfs.ext4 256 MiB, vmstate 320 KiB).

| command                      |   time    |   throughput   | ours/floor |
|------------------------------|-----------|----------------|-------|
$(row "forkd pack (zstd -3, T=nproc)" "$op" "$fp")
$(row "tar -cf - \\| zstd -T0 -3" "$fp" "$fp")
$(row "forkd unpack" "$ou" "$fu")
$(row "zstd -d \\| tar -x" "$fu" "$fu")

Pack size: ours $((ours_size >> 20)) MiB, floor $((floor_size >> 20)) MiB. memory.bin on disk after unpack:
ours $((disk_ours >> 20)) MiB, floor $((disk_floor >> 20)) MiB (non-zero data: $((data >> 20)) MiB).
Throughput is logical bytes (holes included) per second. Ours includes verifying every sha256
and fsyncing the installed files; the floor does neither.
EOT
)
echo "$report"
if ! grep -q '^## pack/unpack' bench/RESULTS.md; then
    printf '\n## pack/unpack\n\nScript: bench/pack.sh. Each run appends an entry below.\n' >> bench/RESULTS.md
fi
# Append the entry at the end of the pack/unpack section (before the next "## " heading).
python3 - "$report" <<'PY'
import sys
path = "bench/RESULTS.md"
text = open(path).read()
entry = sys.argv[1] + "\n"
start = text.index("\n## pack/unpack")
nxt = text.find("\n## ", start + 1)
text = text + entry if nxt < 0 else text[:nxt] + entry + text[nxt:]
open(path, "w").write(text)
PY
