"""Files in real children: binary-safe round trips, streaming both ways, list/mkdir/remove."""

from __future__ import annotations

import hashlib
import io
import os

import pytest

import forkd
from forkd import Sandbox


def test_binary_round_trip(sb: Sandbox) -> None:
    data = b"\x00\xff" * 1000
    w = sb.files.write("/tmp/in.bin", data)
    assert (w.path, w.size) == ("/tmp/in.bin", 2000)
    assert sb.files.read("/tmp/in.bin") == data
    assert sb.commands.run("wc -c < /tmp/in.bin").stdout.strip() == "2000"


def test_5mib_random_file_streamed_both_ways(sb: Sandbox, tmp_path: os.PathLike[str]) -> None:
    data = os.urandom(5 * 1024 * 1024)
    digest = hashlib.sha256(data).hexdigest()
    # upload from a file object: streamed in chunks, not read whole
    w = sb.files.write("/tmp/big.bin", io.BytesIO(data))
    assert w.size == len(data)
    guest = sb.commands.run("sha256sum /tmp/big.bin").stdout.split()[0]
    assert guest == digest
    # download, chunk by chunk
    h = hashlib.sha256()
    n = 0
    chunks = 0
    with sb.files.read_stream("/tmp/big.bin") as s:
        for chunk in s:
            h.update(chunk)
            n += len(chunk)
            chunks += 1
    assert (n, h.hexdigest()) == (len(data), digest)
    assert chunks > 1
    assert hashlib.sha256(b"".join(sb.files.iter_bytes("/tmp/big.bin"))).hexdigest() == digest
    # and the whole thing at once, and into a local file
    assert hashlib.sha256(sb.files.read("/tmp/big.bin")).hexdigest() == digest
    local = os.path.join(os.fspath(tmp_path), "big.bin")
    assert sb.files.download("/tmp/big.bin", local) == len(data)
    with open(local, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == digest


def test_write_str_file_object_and_mode(sb: Sandbox, tmp_path: os.PathLike[str]) -> None:
    sb.files.write("/tmp/t.txt", "héllo\n")
    assert sb.files.read_text("/tmp/t.txt") == "héllo\n"
    local = os.path.join(os.fspath(tmp_path), "script.sh")
    with open(local, "w") as f:
        f.write("#!/bin/sh\necho from-script\n")
    with open(local, "rb") as f:
        sb.files.write("/tmp/script.sh", f, mode=0o755)
    assert sb.commands.run("/tmp/script.sh").stdout == "from-script\n"
    sb.files.write("/tmp/empty", b"")
    assert sb.files.read("/tmp/empty") == b""


def test_list_mkdir_remove(sb: Sandbox) -> None:
    sb.files.mkdir("/tmp/d/e")  # parents by default
    sb.files.write("/tmp/d/e/f.txt", b"12345")
    entries = {e.name: e for e in sb.files.list("/tmp/d/e")}
    assert set(entries) == {"f.txt"}
    f = entries["f.txt"]
    assert f.type == "file" and f.is_file and f.size == 5 and f.path == "/tmp/d/e/f.txt"
    top = {e.name: e for e in sb.files.list("/tmp/d")}
    assert top["e"].type == "dir" and top["e"].is_dir
    assert "d" in {e.name for e in sb.files.list("/tmp")}

    st = sb.files.stat("/tmp/d/e/f.txt")
    assert (st.name, st.type, st.size) == ("f.txt", "file", 5)
    assert sb.files.exists("/tmp/d/e") and not sb.files.exists("/tmp/d/nope")

    sb.files.remove("/tmp/d/e/f.txt")
    assert sb.files.list("/tmp/d/e") == []
    sb.files.write("/tmp/d/e/g", b"x")
    sb.files.remove("/tmp/d", recursive=True)
    assert "d" not in {e.name for e in sb.files.list("/tmp")}
    with pytest.raises(forkd.ForkdError):
        sb.files.mkdir("/tmp/x/y/z", parents=False)


def test_missing_file_is_an_error(sb: Sandbox) -> None:
    with pytest.raises((forkd.NotFound, forkd.GuestError)) as ei:
        sb.files.read("/no/such/file")
    e = ei.value
    if isinstance(e, forkd.GuestError):
        # docs/API.md names the guest's codes after errno (enoent), the daemon may say not_found
        assert e.guest_code in ("enoent", "not_found") and e.status == 502
    else:
        assert e.status == 404


def test_full_disk_is_a_guest_error_and_leaves_no_half_file(sb: Sandbox) -> None:
    # tiny's root disk is ~60 MB: fill all but 1 MiB of what is free, then upload 8 MiB
    # (more than that plus ext4's blocks reserved for root)
    fill = "fallocate -l $(( $(df -k / | awk 'NR==2{print $4}') - 1024 ))k /tmp/filler"
    assert sb.commands.run(fill).exit_code == 0
    with pytest.raises(forkd.GuestError) as ei:
        sb.files.write("/tmp/fill.bin", (b"\x01" * (1 << 20) for _ in range(8)))
    e = ei.value
    assert e.status == 502 and e.code == "guest"
    # docs/API.md says enospc; the daemon names it no_space
    assert e.guest_code in ("enospc", "no_space")
    names = [x.name for x in sb.files.list("/tmp")]
    assert not any("fill.bin" in n for n in names), names
