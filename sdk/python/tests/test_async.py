"""The asyncio client against the real daemon."""

from __future__ import annotations

import hashlib
import io
import os

import pytest

import forkd
from forkd import AsyncClient, AsyncSandbox

from .conftest import Daemon

pytestmark = pytest.mark.anyio


async def test_async_create_run_files_kill(daemon: Daemon) -> None:
    async with AsyncClient(home=daemon.home) as ac:
        assert (await ac.health())["status"] == "ok"
        chunks: list[str] = []

        async def on_out(s: str) -> None:  # coroutine callbacks are awaited
            chunks.append(s)

        async with AsyncSandbox.create("tiny", client=ac, env={"K": "v"}) as sb:
            sid = sb.id
            r = await sb.commands.run("echo hi $K; echo oops >&2; exit 3", on_stdout=on_out)
            assert (r.exit_code, r.stdout, r.stderr) == (3, "hi v\n", "oops\n")
            assert "".join(chunks) == "hi v\n"
            data = os.urandom(1024 * 1024 + 7)
            w = await sb.files.write("/tmp/a.bin", io.BytesIO(data))
            assert w.size == len(data)
            assert await sb.files.read("/tmp/a.bin") == data
            got = b"".join([c async for c in sb.files.iter_bytes("/tmp/a.bin")])
            assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
            assert [e.name for e in await sb.files.list("/tmp") if e.name == "a.bin"] == ["a.bin"]
            h = await sb.commands.run("echo bg; exit 5", background=True)
            res = await h.wait(timeout=30)
            assert (res.exit_code, res.stdout) == (5, "bg\n")
            await sb.pause()
            assert sb.state == "paused"
            with pytest.raises(forkd.Conflict):
                await sb.commands.run("true")
            await sb.resume()
            assert (await sb.refresh())["state"] == "running"
        with pytest.raises(forkd.NotFound):
            await ac.get(sid)

        sb2 = await AsyncSandbox.create("tiny", client=ac)
        assert sb2.id in [s.id for s in await ac.list()]
        assert await sb2.kill() is True
        assert await sb2.kill() is False
        with pytest.raises(forkd.NotFound):
            await ac.fork("no-such-image-x")


async def test_async_default_client(daemon_env: Daemon) -> None:
    sb = await AsyncSandbox.create("tiny")
    try:
        assert (await sb.commands.run("echo x")).stdout == "x\n"
    finally:
        await sb.kill()
