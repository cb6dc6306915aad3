"""The MCP server (`python -m forkd.mcp`) through a real MCP client session over stdio."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import pytest

import forkd

from .conftest import Daemon

pytestmark = pytest.mark.anyio


def _is_error(result: Any) -> bool:
    # mcp 2 spells it is_error, mcp 1 isError
    return bool(getattr(result, "is_error", None) or getattr(result, "isError", False))


def _text(result: Any) -> str:
    assert not _is_error(result), result
    return "".join(getattr(c, "text", "") for c in result.content)


async def test_mcp_stdio_session(daemon: Daemon, client: forkd.Client) -> None:
    try:
        from mcp import ClientSession, StdioServerParameters
        from mcp.client.stdio import stdio_client
    except ImportError:
        pytest.fail("the MCP SDK is missing: pip install './sdk/python[mcp]'", pytrace=False)

    env = {k: v for k, v in os.environ.items() if not k.startswith("FORKD_")}
    env["FORKD_HOME"] = str(daemon.home)
    params = StdioServerParameters(command=sys.executable, args=["-m", "forkd.mcp"], env=env)
    async with stdio_client(params) as (read, write):
        async with ClientSession(read, write) as session:
            await session.initialize()
            tools = {t.name for t in (await session.list_tools()).tools}
            assert tools == {
                "create_sandbox",
                "run_command",
                "run_code",
                "read_file",
                "write_file",
                "list_sandboxes",
                "kill_sandbox",
                "branch_sandbox",
            }
            created = json.loads(
                _text(await session.call_tool("create_sandbox", {"image": "tiny"}))
            )
            (sb,) = created["sandboxes"]
            sid = sb["id"]
            try:
                listed = json.loads(_text(await session.call_tool("list_sandboxes", {})))
                assert sid in [s["id"] for s in listed["sandboxes"]]

                r = json.loads(
                    _text(
                        await session.call_tool(
                            "run_command", {"sandbox_id": sid, "cmd": "echo hi", "timeout_s": 30}
                        )
                    )
                )
                assert r["exit_code"] == 0 and r["stdout"] == "hi\n"

                w = _text(
                    await session.call_tool(
                        "write_file",
                        {"sandbox_id": sid, "path": "/tmp/m.txt", "content": "héllo mcp\n"},
                    )
                )
                assert "/tmp/m.txt" in w
                got = _text(
                    await session.call_tool("read_file", {"sandbox_id": sid, "path": "/tmp/m.txt"})
                )
                assert got == "héllo mcp\n"
                # the SDK sees the same file; a binary one is reported, not dumped
                assert client.get(sid).files.read("/tmp/m.txt") == "héllo mcp\n".encode()
                client.get(sid).files.write("/tmp/b.bin", b"\x00\xff" * 10)
                b = _text(
                    await session.call_tool("read_file", {"sandbox_id": sid, "path": "/tmp/b.bin"})
                )
                assert "binary" in b and "20 bytes" in b

                code = _text(
                    await session.call_tool(
                        "run_code", {"sandbox_id": sid, "code": "echo $((6*7))"}
                    )
                )
                assert code.strip() == "42"

                # branch: two new sandboxes that start from this one's state
                await session.call_tool("run_code", {"sandbox_id": sid, "code": "MCP_V=branched"})
                br = json.loads(
                    _text(await session.call_tool("branch_sandbox", {"sandbox_id": sid, "count": 2}))
                )
                kids = [s["id"] for s in br["sandboxes"]]
                assert len(kids) == 2 and br["image"] and sid not in kids
                for kid in kids:
                    got = _text(
                        await session.call_tool("run_code", {"sandbox_id": kid, "code": "echo $MCP_V"})
                    )
                    assert got.strip() == "branched"
                    await session.call_tool("kill_sandbox", {"sandbox_id": kid})

                bad = await session.call_tool(
                    "run_command", {"sandbox_id": "tiny-nope-0", "cmd": "true"}
                )
                assert _is_error(bad)
                assert "not_found" in "".join(getattr(c, "text", "") for c in bad.content)
            finally:
                k = _text(await session.call_tool("kill_sandbox", {"sandbox_id": sid}))
                assert sid in k
            listed = json.loads(_text(await session.call_tool("list_sandboxes", {})))
            assert sid not in [s["id"] for s in listed["sandboxes"]]
