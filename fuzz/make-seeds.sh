#!/usr/bin/env bash
# Build seed corpora for the fuzz targets from real packs made by the forkd binary.
# Usage: fuzz/make-seeds.sh [path/to/forkd]   (default: target/debug/forkd)
set -euo pipefail
cd "$(dirname "$0")"
forkd=${1:-../target/debug/forkd}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p seeds/manifest seeds/pack_reader
python3 - "$work" <<'PY'
import hashlib, io, os, sys, tarfile
work = sys.argv[1]
mem = bytearray(64 * 1024)
for i in range(0, len(mem), 16384):
    mem[i:i + 4096] = bytes((i // 4096 + j) % 251 + 1 for j in range(4096))
files = {"memory.bin": bytes(mem), "vmstate": b"QEVM" + bytes(range(256)) * 8, "empty": b""}
entries = "".join(
    f'[files."{n}"]\nsize = {len(d)}\nsha256 = "{hashlib.sha256(d).hexdigest()}"\n\n' for n, d in files.items()
)
manifest = f'''format_version = 1
name = "seed"
version = "1.0"
description = "fuzz seed"
base_image = "none"
arch = "x86_64"
memory_mib = 1
created_at = "2026-01-01T00:00:00Z"
forkd_version = "0.1.0"

[engine]
name = "qemu"
version = "7.2.0"
machine_type = "pc-i440fx-7.2"
cpu_model = "qemu64"

[labels]
licence = "Apache-2.0"

{entries}'''
open(os.path.join(work, "manifest.toml"), "w").write(manifest)
buf = io.BytesIO()
with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as t:
    for n, d in [("manifest.toml", manifest.encode())] + list(files.items()):
        ti = tarfile.TarInfo(n); ti.size = len(d); t.addfile(ti, io.BytesIO(d))
open(os.path.join(work, "seed.tar"), "wb").write(buf.getvalue())
PY
cp "$work/manifest.toml" seeds/manifest/seed.toml
zstd -q -f "$work/seed.tar" -o "$work/seed.tar.zst"
# Install through the real unpacker, then pack again: the output has GNU sparse entries.
FORKD_HOME="$work/home" "$forkd" -q unpack "$work/seed.tar.zst"
FORKD_HOME="$work/home" "$forkd" -q pack seed -o "$work/seed.forkd-snapshot.tar.zst"
zstd -q -d -f "$work/seed.forkd-snapshot.tar.zst" -o "$work/sparse.tar"
{ printf '\0'; cat "$work/seed.tar"; } > seeds/pack_reader/plain-tar
{ printf '\0'; cat "$work/sparse.tar"; } > seeds/pack_reader/sparse-tar
{ printf '\1'; cat "$work/seed.forkd-snapshot.tar.zst"; } > seeds/pack_reader/packed-zst
echo "seeds written to fuzz/seeds/"
