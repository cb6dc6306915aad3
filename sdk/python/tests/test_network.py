"""Sandbox networks through the SDK and the MCP server: ``network=`` on create/fork/branch
(default-deny egress, ``host:PORT`` rules reaching the daemon host's loopback as 10.0.2.2),
``expose`` with ``sb.ports``/``sb.host_port``, and bad entries refused up front. Real daemon,
real tiny children, real HTTP servers on the host's 127.0.0.1.

The tiny guest is busybox: ``wget -O-`` (its ``-T`` segfaults in busybox 1.35, so the command's
own timeout bounds it), ``nc`` and ``httpd``.
"""

from __future__ import annotations

import http.server
import json
import os
import socket
import sys
import threading
import time
import urllib.request
import uuid
from typing import Any, Iterator

import pytest

import forkd
from forkd import AsyncClient, AsyncSandbox, Client, Sandbox

from .conftest import Daemon, free_port
from .test_mcp import _is_error, _text

#: the daemon host's 127.0.0.1 as a sandbox sees it
HOST = "10.0.2.2"


class HostServer:
    """An HTTP server on the host's 127.0.0.1 (a thread) that answers ``body`` and records
    every request it gets."""

    def __init__(self, body: str) -> None:
        hits: list[str] = []
        payload = body.encode()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                hits.append(self.path)
                self.send_response(200)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *a: Any) -> None:
                pass

        self.hits = hits
        self.body = body
        self.srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.srv.server_address[1])
        self.thread = threading.Thread(target=self.srv.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.srv.shutdown()
        self.srv.server_close()


@pytest.fixture
def servers() -> Iterator[tuple[HostServer, HostServer]]:
    """Two host servers: tests allow the first and not the second."""
    a, b = HostServer("allowed server\n"), HostServer("forbidden server\n")
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def fetch(sb: Sandbox, url: str) -> forkd.CommandResult:
    return sb.commands.run(f"wget -O- {url}", timeout=30)


def http_get(port: int, deadline_s: float = 15.0) -> str:
    """GET http://127.0.0.1:port/ from the host, retrying while the guest's server starts."""
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
                return str(r.read().decode())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def serve_in_guest(sb: Sandbox, body: str, port: int = 8080) -> None:
    sb.files.mkdir("/www")
    sb.files.write("/www/index.html", body)
    r = sb.commands.run(f"httpd -p {port} -h /www", timeout=30)  # busybox httpd daemonises
    assert r.ok, r


def test_allowed_host_port_is_reached_and_nothing_else(
    client: Client, servers: tuple[HostServer, HostServer]
) -> None:
    a, b = servers
    sb = Sandbox.create("tiny", client=client, network={"allow": [f"host:{a.port}"]})
    try:
        assert sb.net is True and sb.ports == []
        r = fetch(sb, f"http://{HOST}:{a.port}/hello")
        assert r.ok, r
        assert r.stdout == a.body
        assert a.hits == ["/hello"]
        # the host alias resolves through the sandbox's filtered DNS
        r = fetch(sb, f"http://host.forkd.internal:{a.port}/alias")
        assert r.ok and r.stdout == a.body, r
        # another port of the same host is not allowed: refused, and the server sees nothing
        r = fetch(sb, f"http://{HOST}:{b.port}/")
        assert r.exit_code not in (0, None), r
        assert "refused" in r.stderr.lower(), r
        r = sb.commands.run(f"echo hi | nc {HOST} {b.port}", timeout=30)
        assert r.exit_code != 0, r
        # names no rule allows are not resolved
        r = fetch(sb, "http://example.com/")
        assert r.exit_code != 0, r
        assert b.hits == []

        # branch: each child gets the network its branch() call asks for, not the source's
        (kid,) = sb.branch(1, network={"allow": [f"host:{b.port}"]})
        try:
            assert kid.net is True
            r = fetch(kid, f"http://{HOST}:{b.port}/from-branch")
            assert r.ok and r.stdout == b.body, r
            assert b.hits == ["/from-branch"]
            r = fetch(kid, f"http://{HOST}:{a.port}/")
            assert r.exit_code != 0, r
            assert a.hits == ["/hello", "/alias"]
        finally:
            kid.kill()
    finally:
        sb.kill()


def test_without_network_nothing_is_reachable(
    client: Client, sb: Sandbox, servers: tuple[HostServer, HostServer]
) -> None:
    a, _ = servers
    assert sb.net is False and sb.ports == []
    r = fetch(sb, f"http://{HOST}:{a.port}/")
    assert r.exit_code not in (0, None), r
    assert "Network is unreachable" in r.stderr, r
    assert a.hits == []
    with pytest.raises(forkd.PortNotExposed) as ei:
        sb.host_port(8080)
    assert "no network" in str(ei.value) and "8080" in str(ei.value)


def test_exposed_port_per_sandbox(client: Client) -> None:
    sbs = client.fork("tiny", 2, network={"expose": [8080]})
    try:
        for s in sbs:
            assert s.net is True
            (pm,) = s.ports
            assert pm.guest == 8080 and pm.host == s.host_port(8080) and pm.host > 0
            serve_in_guest(s, f"page of {s.id}\n")
        # each sandbox has its own host port, and each answers with its own page
        assert len({s.host_port(8080) for s in sbs}) == 2
        for s in sbs:
            assert http_get(s.host_port(8080)) == f"page of {s.id}\n"
        # get() and list() report the same ports
        listed = {s.id: s for s in client.list()}
        for s in sbs:
            assert client.get(s.id).ports == s.ports
            assert listed[s.id].ports == s.ports and listed[s.id].net
            assert s.refresh()["ports"] == [{"guest": 8080, "host": s.host_port(8080)}]
        # a port that is not exposed is a clear client-side error (also a KeyError)
        with pytest.raises(KeyError) as ei:
            sbs[0].host_port(9999)
        assert isinstance(ei.value, forkd.PortNotExposed)
        assert "9999" in str(ei.value) and "8080" in str(ei.value)
    finally:
        for s in sbs:
            s.kill()


def test_fixed_host_port_and_a_taken_one(client: Client) -> None:
    before = {s.id for s in client.list()}
    # a host port in use: refused before any child starts
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(forkd.Conflict) as ei:
            client.create("tiny", network=forkd.Network(expose=[f"{port}:8080"]))
        assert ei.value.status == 409 and str(port) in str(ei.value)
    assert {s.id for s in client.list()} == before

    # the typed model; a free host port given by number
    port = free_port()
    net = forkd.Network(expose=[f"{port}:8080"], rate_mbit=50)
    with Sandbox.create("tiny", client=client, network=net) as sb:
        assert sb.ports == [forkd.PortMapping(guest=8080, host=port)]
        assert sb.host_port(8080) == port
        serve_in_guest(sb, "fixed\n")
        assert http_get(port) == "fixed\n"


@pytest.mark.parametrize(
    "network, named",
    [
        ({"allow": ["10.0.0.0/33"]}, "10.0.0.0/33"),
        ({"allow": ["host:8000", "bad host!:1"]}, "bad host!:1"),
        ({"expose": ["x:80"]}, "x:80"),
        ({"expose": [0]}, 'expose "0"'),
        ({"expose": [70000]}, 'expose "70000"'),
        ({"allowed": ["host:8000"]}, "allowed"),
        (forkd.Network(allow=["*.example.com:99999"]), "*.example.com:99999"),
    ],
)
def test_bad_network_is_a_bad_request_that_creates_nothing(
    client: Client, network: Any, named: str
) -> None:
    before = {s.id for s in client.list()}
    with pytest.raises(forkd.BadRequest) as ei:
        client.fork("tiny", 2, network=network)
    e = ei.value
    assert e.status == 400 and e.code == "bad_request"
    assert named in e.message, e.message
    # the streamed form (progress callback) refuses it the same way, before the stream
    with pytest.raises(forkd.BadRequest) as ei:
        Sandbox.create("tiny", client=client, network=network, on_progress=lambda ev: None)
    assert named in ei.value.message
    assert {s.id for s in client.list()} == before


def test_a_fixed_host_port_serves_one_sandbox_only(client: Client) -> None:
    before = {s.id for s in client.list()}
    with pytest.raises(forkd.BadRequest) as ei:
        client.fork("tiny", 2, network={"expose": [f"{free_port()}:8080"]})
    assert ei.value.status == 400 and "one child only" in ei.value.message
    assert {s.id for s in client.list()} == before


def test_network_argument_type_is_checked(client: Client) -> None:
    with pytest.raises(TypeError):
        client.create("tiny", network="host:8000")  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_async_network(daemon: Daemon, servers: tuple[HostServer, HostServer]) -> None:
    a, b = servers
    async with AsyncClient(home=daemon.home) as ac:
        net = forkd.Network(allow=[f"host:{a.port}"], expose=[8080])
        async with AsyncSandbox.create("tiny", client=ac, network=net) as sb:
            assert sb.net and [p.guest for p in sb.ports] == [8080]
            assert (await ac.get(sb.id)).host_port(8080) == sb.host_port(8080)
            r = await sb.commands.run(f"wget -O- http://{HOST}:{a.port}/async", timeout=30)
            assert r.ok and r.stdout == a.body, r
            r = await sb.commands.run(f"wget -O- http://{HOST}:{b.port}/", timeout=30)
            assert r.exit_code != 0, r
            assert a.hits == ["/async"] and b.hits == []
        with pytest.raises(forkd.BadRequest) as ei:
            await ac.create("tiny", network={"allow": ["10.0.0.0/33"]})
        assert "10.0.0.0/33" in ei.value.message


@pytest.mark.anyio
async def test_mcp_create_sandbox_with_network(
    daemon: Daemon, client: Client, servers: tuple[HostServer, HostServer]
) -> None:
    from mcp import ClientSession, StdioServerParameters
    from mcp.client.stdio import stdio_client

    a, _ = servers
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORKD_")}
    env["FORKD_HOME"] = str(daemon.home)
    params = StdioServerParameters(command=sys.executable, args=["-m", "forkd.mcp"], env=env)
    label = uuid.uuid4().hex[:8]
    async with stdio_client(params) as (read, write):
        async with ClientSession(read, write) as session:
            await session.initialize()
            tools = {t.name: t for t in (await session.list_tools()).tools}
            desc = tools["create_sandbox"].description or ""
            assert "denied" in desc.lower() and "host:PORT" in desc

            net = {"allow": [f"host:{a.port}"], "expose": [8080]}
            created = json.loads(
                _text(await session.call_tool("create_sandbox", {"image": "tiny", "network": net}))
            )
            (sb,) = created["sandboxes"]
            sid = sb["id"]
            try:
                assert sb["net"] is True
                (pm,) = sb["ports"]
                assert pm["guest"] == 8080 and pm["host"] == client.get(sid).host_port(8080)
                listed = json.loads(_text(await session.call_tool("list_sandboxes", {})))
                (mine,) = [s for s in listed["sandboxes"] if s["id"] == sid]
                assert mine["ports"] == sb["ports"]

                r = json.loads(
                    _text(
                        await session.call_tool(
                            "run_command",
                            {"sandbox_id": sid, "cmd": f"wget -O- http://{HOST}:{a.port}/{label}"},
                        )
                    )
                )
                assert r["exit_code"] == 0 and r["stdout"] == a.body, r
                assert a.hits == [f"/{label}"]
                serve_in_guest(client.get(sid), "via mcp\n")
                assert http_get(pm["host"]) == "via mcp\n"

                # a bad rule and an unknown field are tool errors that name them
                bad = await session.call_tool(
                    "create_sandbox", {"image": "tiny", "network": {"allow": ["10.0.0.0/33"]}}
                )
                assert _is_error(bad)
                text = "".join(getattr(c, "text", "") for c in bad.content)
                assert "bad_request" in text and "10.0.0.0/33" in text
                bad = await session.call_tool(
                    "create_sandbox", {"image": "tiny", "network": {"allowed": ["host:1"]}}
                )
                assert _is_error(bad)
                assert "allowed" in "".join(getattr(c, "text", "") for c in bad.content)
            finally:
                await session.call_tool("kill_sandbox", {"sandbox_id": sid})
    assert sid not in {s.id for s in client.list()}
