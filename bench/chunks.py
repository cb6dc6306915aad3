#!/usr/bin/env python3
"""How much of one image's bytes another image already holds, by chunking granularity (issue 12).

For each pair (FIRST, SECOND) of image directories and each file (rootfs.ext4, memory.bin):
the share of SECOND's non-zero bytes that sit in chunks whose sha256 also occurs in FIRST's
file, for
  - fixed 4 MiB chunks (the hub today),
  - fixed 64 KiB chunks,
  - content-defined chunks (gear hash; 16 KiB min, 64 KiB average, 256 KiB max),
  - 4 KiB pages.
All-zero chunks are left out of both the numerator and the denominator (they cost nothing to
store or fetch: the pack and the hub skip holes).

  bench/chunks.py FIRST_DIR SECOND_DIR [LABEL]       (needs numpy)

Prints one Markdown table row per file.
"""
import hashlib
import os
import sys

import numpy as np

MIB = 1 << 20
BLOCK = 64 * MIB
WINDOW = 64  # bytes that a gear hash depends on (64-bit shifts)
CDC_MIN, CDC_AVG_BITS, CDC_MAX = 16 << 10, 16, 256 << 10

# A fixed pseudo-random gear table (a deterministic seed: every run cuts alike).
GEAR = np.random.default_rng(0x666F726B64).integers(0, 2**63, size=256, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
MASK = np.uint64(((1 << CDC_AVG_BITS) - 1) << (64 - CDC_AVG_BITS))


def fixed_cuts(size, step):
    return list(range(0, size, step)) + [size]


def gear_candidates(path, size):
    """Offsets i (end of byte i) where the gear hash over the last 64 bytes has its top bits 0."""
    out = []
    with open(path, "rb") as f:
        tail = np.zeros(0, dtype=np.uint8)
        base = 0
        while base < size:
            block = np.frombuffer(f.read(BLOCK), dtype=np.uint8)
            if block.size == 0:
                break
            data = np.concatenate([tail, block])
            g = GEAR[data]
            h = np.zeros(data.size, dtype=np.uint64)
            # h[i] = sum_k gear[data[i-k]] << k, k < 64 (what h = (h << 1) + gear[b] leaves).
            for k in range(WINDOW):
                h[k:] += g[: data.size - k] << np.uint64(k)
            start = tail.size
            hits = np.nonzero((h[start:] & MASK) == 0)[0]
            out.extend((base + hits + 1).tolist())
            base += block.size
            tail = data[-(WINDOW - 1):]
    return out


def cdc_cuts(path, size):
    cuts, last = [0], 0
    for c in gear_candidates(path, size):
        while c - last > CDC_MAX:
            last += CDC_MAX
            cuts.append(last)
        if c - last >= CDC_MIN:
            cuts.append(c)
            last = c
    while size - last > CDC_MAX:
        last += CDC_MAX
        cuts.append(last)
    if cuts[-1] != size:
        cuts.append(size)
    return cuts


def chunks(path, cuts):
    """(sha256, length) of every non-zero chunk between consecutive cuts."""
    out = []
    with open(path, "rb") as f:
        for a, b in zip(cuts, cuts[1:]):
            f.seek(a)
            d = f.read(b - a)
            if d.count(0) == len(d):
                continue
            out.append((hashlib.sha256(d).digest(), len(d)))
    return out


def share(first, second, cut):
    s1, s2 = os.path.getsize(first), os.path.getsize(second)
    have = {h for h, _ in chunks(first, cut(first, s1))}
    mine = chunks(second, cut(second, s2))
    total = sum(n for _, n in mine)
    found = sum(n for h, n in mine if h in have)
    return found / total if total else 0.0, total


def main():
    first, second = sys.argv[1], sys.argv[2]
    label = sys.argv[3] if len(sys.argv) > 3 else f"{os.path.basename(second)} after {os.path.basename(first)}"
    ways = [
        ("fixed 4 MiB", lambda p, s: fixed_cuts(s, 4 * MIB)),
        ("fixed 64 KiB", lambda p, s: fixed_cuts(s, 64 << 10)),
        ("CDC avg 64 KiB", cdc_cuts),
        ("4 KiB pages", lambda p, s: fixed_cuts(s, 4096)),
    ]
    for name in ("rootfs.ext4", "memory.bin"):
        a, b = os.path.join(first, name), os.path.join(second, name)
        cells = []
        nonzero = 0
        for _, cut in ways:
            frac, nonzero = share(a, b, cut)
            cells.append(f"{frac * 100:.0f}%")
        print(f"| {label}, {name} ({nonzero / MIB:.0f} MiB non-zero) | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
