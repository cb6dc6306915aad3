"""The MCP tools, each a thin call into the asyncio SDK."""

from __future__ import annotations

import argparse
import functools
import json
import sys
from typing import Annotated, Any, Awaitable, Callable, TypeVar

from .. import AsyncClient, ForkdError, ForkError, __version__

try:  # mcp >= 2 renamed FastMCP to MCPServer
    from mcp.server.mcpserver import MCPServer as _Server
    from mcp.server.mcpserver.exceptions import ToolError
    from pydantic import BaseModel, ConfigDict, Field  # the MCP SDK's own dependency
except ImportError:  # pragma: no cover - mcp 1.x
    try:
        from mcp.server.fastmcp import FastMCP as _Server  # type: ignore[attr-defined,no-redef]
        from mcp.server.fastmcp.exceptions import ToolError  # type: ignore[import-not-found,no-redef]
    except ImportError as e:
        raise SystemExit(
            "forkd.mcp needs the MCP SDK: pip install 'forkd[mcp]' (or pip install mcp)"
        ) from e

#: ``read_file`` returns at most this much text
MAX_READ_BYTES = 1024 * 1024

TOOLS = (
    "create_sandbox",
    "run_command",
    "run_code",
    "read_file",
    "write_file",
    "list_sandboxes",
    "kill_sandbox",
)

INSTRUCTIONS = """\
forkd sandboxes are Linux virtual machines forked copy-on-write from a warmed snapshot of an
image: they start in well under a second, each with its own disk and processes. Create one with
create_sandbox (image e.g. "tiny" or "python-numpy"), run shell commands with run_command,
code in the image's warm worker with run_code, move text files with write_file/read_file, and
kill_sandbox when done. Paths are absolute paths inside the guest. Sandboxes have no network
unless create_sandbox is given `network`, and then egress is denied except what it allows."""


def _summary(info: Any) -> dict[str, Any]:
    keys = ("id", "image", "state", "hostname", "created_at", "expires_at", "labels", "net")
    out = {k: info.get(k) for k in keys if k in info}
    if info.get("ports"):
        # guest port -> host port: http://127.0.0.1:{host}/ on the daemon's host reaches it
        out["ports"] = [{"guest": p["guest"], "host": p["host"]} for p in info["ports"]]
    return out


class NetworkSpec(BaseModel):
    """A sandbox's network (see create_sandbox)."""

    model_config = ConfigDict(extra="forbid")

    allow: list[str] = Field(
        default_factory=list,
        description=(
            'Egress allowlist: HOST|DOMAIN|CIDR[:PORT] rules such as "pypi.org", '
            '"*.example.com", "10.1.0.0/16:5432". "host:PORT" allows the daemon '

            "host's own 127.0.0.1:PORT, which the sandbox reaches as 10.0.2.2:PORT (or "
            "host.forkd.internal:PORT). Everything not listed is denied, and DNS answers only "
            "allowed names."
        ),
    )
    allow_all: bool = Field(
        False,
        description=(
            "Allow every public address (private ranges, the host and 169.254.0.0/16 still "
            "need an explicit allow rule)."
        ),
    )
    expose: list[int | str] = Field(
        default_factory=list,
        description=(
            "Guest ports to reach from the host's 127.0.0.1: 8080 (a free host port is "
            "picked; the result's ports say which) or '18080:8080' (fixed host port, "
            "count must be 1)."
        ),
    )
    rate_mbit: int | None = Field(
        None, description="Bandwidth per sandbox in Mbit/s (default 100; 0: unlimited)."
    )


F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def _forkd_errors(fn: F) -> F:
    """Report the daemon's errors to the model as tool errors with their code and hint
    (other exceptions stay crashes, whose text the MCP SDK keeps on the server)."""

    @functools.wraps(fn)
    async def wrapper(*a: Any, **kw: Any) -> Any:
        try:
            return await fn(*a, **kw)
        except ForkdError as e:
            raise ToolError(f"{e.code}: {e}") from e

    return wrapper  # type: ignore[return-value]


def build_server(url: str | None = None, token: str | None = None, home: str | None = None) -> Any:
    """The MCP server with forkd's tools, talking to the daemon given (or the default one)."""
    server = _Server("forkd", instructions=INSTRUCTIONS)
    state: dict[str, AsyncClient] = {}

    def client() -> AsyncClient:
        # made on first use, inside the server's event loop
        if "c" not in state:
            state["c"] = AsyncClient(url, token, home=home)
        return state["c"]

    @server.tool()
    @_forkd_errors
    async def create_sandbox(
        image: str,
        count: int = 1,
        network: Annotated[
            NetworkSpec | None,
            Field(
                description=(
                    "Give the sandboxes a network. Omitted: no network at all. Egress is "
                    "denied by default: only `allow` rules are reachable ({} = a network "
                    "with nothing allowed, e.g. for `expose` only)."
                )
            ),
        ] = None,
    ) -> str:
        """Fork `count` new sandboxes (Linux VMs) from `image` (a local image tag such as "tiny"
        or "python-numpy", or a hub reference OWNER/NAME[:VERSION]). Returns their ids.

        Without `network` a sandbox has no network at all. With it (even {}) it gets its own
        link (guest 10.0.2.15, gateway 10.0.2.2, DNS 10.0.2.3) where ALL egress is DENIED by
        default: only what `network.allow` lists is reachable. "host:PORT" in allow means the
        daemon host's 127.0.0.1:PORT, reached from the sandbox at 10.0.2.2:PORT.
        `network.expose` makes guest ports reachable on the host's 127.0.0.1; each sandbox's
        `ports` in the result maps guest port -> host port."""
        net = network.model_dump(exclude_defaults=True) if network is not None else None
        try:
            sbs = await client().fork(image, count, network=net)
        except ForkError as e:
            return json.dumps(
                {
                    "sandboxes": [_summary(s.info) for s in e.sandboxes],
                    "errors": [
                        {"index": x.index, "code": x.code, "message": x.message} for x in e.errors
                    ],
                },
                indent=1,
            )
        return json.dumps({"sandboxes": [_summary(s.info) for s in sbs]}, indent=1)

    @server.tool()
    @_forkd_errors
    async def run_command(sandbox_id: str, cmd: str, timeout_s: int = 60) -> str:
        """Run a shell command (/bin/sh -c) in a sandbox and wait for it (killed after
        `timeout_s` seconds). Returns exit_code, stdout and stderr as JSON."""
        sb = await client().get(sandbox_id)
        r = await sb.commands.run(cmd, timeout=timeout_s)
        return json.dumps(
            {
                "exit_code": r.exit_code,
                "signal": r.signal,
                "timed_out": r.timed_out,
                "stdout": r.stdout,
                "stderr": r.stderr,
            },
            indent=1,
        )

    @server.tool()
    @_forkd_errors
    async def run_code(sandbox_id: str, code: str, timeout_s: int = 60) -> str:
        """Run code in the sandbox image's warm worker (e.g. Python with numpy already
        imported as np in "python-numpy"; a shell in "tiny"). State persists between calls.
        Returns the worker's output."""
        sb = await client().get(sandbox_id)
        return await sb.run_code(code, timeout=timeout_s)

    @server.tool()
    @_forkd_errors
    async def read_file(sandbox_id: str, path: str) -> str:
        """Read a text file from a sandbox (absolute path). Binary files are not returned:
        the answer says the file is binary and how large it is."""
        sb = await client().get(sandbox_id)
        data = bytearray()
        truncated = False
        s = await sb.files.read_stream(path)
        async with s:
            async for chunk in s:
                data += chunk
                if len(data) > MAX_READ_BYTES:
                    truncated = True
                    break
        blob = bytes(data[:MAX_READ_BYTES])
        try:
            if b"\x00" in blob:
                raise UnicodeDecodeError("utf-8", blob, 0, 1, "NUL byte")
            text = blob.decode("utf-8") if not truncated else blob.decode("utf-8", "ignore")
        except UnicodeDecodeError:
            size = "more than %d" % MAX_READ_BYTES if truncated else str(len(blob))
            return (
                f"[binary file: {path} is {size} bytes and not UTF-8 text; it is not shown. "
                f"Use run_command (e.g. xxd, base64, file) to inspect it.]"
            )
        if truncated:
            text += f"\n[truncated: {path} is larger than {MAX_READ_BYTES} bytes]"
        return text

    @server.tool()
    @_forkd_errors
    async def write_file(sandbox_id: str, path: str, content: str) -> str:
        """Write text `content` (UTF-8) to the absolute `path` in a sandbox, replacing the
        file. Parent directories must exist."""
        sb = await client().get(sandbox_id)
        info = await sb.files.write(path, content)
        return f"wrote {info.size} bytes to {info.path}"

    @server.tool()
    @_forkd_errors
    async def list_sandboxes() -> str:
        """List the daemon's sandboxes (id, image, state...) as JSON."""
        sbs = await client().list()
        return json.dumps({"sandboxes": [_summary(s.info) for s in sbs]}, indent=1)

    @server.tool()
    @_forkd_errors
    async def branch_sandbox(sandbox_id: str, count: int = 1) -> str:
        """Branch a running sandbox: save its current state (memory, processes, files) as a new
        image and fork `count` new sandboxes from it. Each starts exactly where the source is
        now; the source keeps running, and none sees the others' later changes. Returns the
        branch image and the new sandboxes' ids."""
        src = await client().get(sandbox_id)
        b = await src.snapshot()
        try:
            sbs = await client().fork(b["tag"], count)
        except ForkError as e:
            sbs = e.sandboxes
        return json.dumps(
            {"image": b["tag"], "pause_ms": b.get("pause_ms"),
             "sandboxes": [_summary(s.info) for s in sbs]},
            indent=1,
        )

    @server.tool()
    @_forkd_errors
    async def kill_sandbox(sandbox_id: str) -> str:
        """Kill a sandbox; its VM, disk and processes are gone."""
        gone = await client().kill(sandbox_id)
        return f"killed {sandbox_id}" if gone else f"{sandbox_id} was already gone"

    return server


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="forkd-mcp",
        description="MCP server (stdio) exposing forkd sandboxes as tools.",
    )
    p.add_argument("--url", help="daemon URL http://HOST:PORT (default: $FORKD_URL or the socket)")
    p.add_argument("--token", help="bearer token for TCP (default: $FORKD_TOKEN)")
    p.add_argument("--home", help="FORKD_HOME whose forkd.sock to use")
    p.add_argument("--version", action="version", version=f"forkd-mcp {__version__}")
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    build_server(a.url, a.token, a.home).run("stdio")


if __name__ == "__main__":  # pragma: no cover
    main()
