"""Sandbox lifecycle, discovery, the error hierarchy, per-child fork failures and TCP + token,
against real `forkd serve` processes."""

from __future__ import annotations

import shutil
import time
import uuid
from pathlib import Path
from typing import Iterator

import pytest

import forkd
from forkd import Client, Sandbox

from .conftest import Daemon, copy_home, free_port, run_forkd, short_tmp


def test_health_and_images(client: Client) -> None:
    h = client.health()
    assert h["status"] == "ok" and "version" in h
    tags = [i["tag"] for i in client.images()]
    assert "tiny" in tags


def test_sandbox_info_get_refresh_and_list_by_label(client: Client) -> None:
    job = uuid.uuid4().hex[:8]
    mine = client.fork("tiny", 2, labels={"job": job})
    other = client.fork("tiny", 1, labels={"job": job + "-other"})
    try:
        for s in mine:
            assert s.info["image"] == "tiny" and s.state == "running"
            assert s.info["labels"] == {"job": job}
            assert client.get(s.id).info["id"] == s.id
            assert s.refresh()["state"] == "running"
        listed = {s.id for s in client.list(label={"job": job})}
        assert listed == {s.id for s in mine}
        assert {s.id for s in mine + other} <= {s.id for s in client.list()}
    finally:
        for s in mine + other:
            s.kill()
    assert client.list(label={"job": job}) == []


def test_pause_and_resume(sb: Sandbox) -> None:
    assert sb.pause() is sb
    assert sb.state == "paused" and sb.refresh()["state"] == "paused"
    with pytest.raises(forkd.Conflict) as ei:
        sb.commands.run("echo no")
    assert ei.value.status == 409 and ei.value.code == "conflict"
    sb.resume()
    assert sb.state == "running"
    assert sb.commands.run("echo yes").stdout == "yes\n"


def test_with_kills_the_sandbox(client: Client) -> None:
    with Sandbox.create("tiny", client=client) as sb:
        sid = sb.id
        assert sb.commands.run("echo in").stdout == "in\n"
    with pytest.raises(forkd.NotFound):
        client.get(sid)
    assert sb.kill() is False  # already gone: not an error


def test_default_client_finds_the_socket_in_forkd_home(daemon_env: Daemon) -> None:
    with Sandbox.create("tiny") as sb:  # no client: Client() from FORKD_HOME
        assert sb.commands.run("hostname").exit_code == 0
        sid = sb.id
    with Client() as c:
        assert c.health()["status"] == "ok"
        with pytest.raises(forkd.NotFound):
            c.get(sid)


def test_xdg_data_home_is_the_default_home(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FORKD_URL", raising=False)
    monkeypatch.delenv("FORKD_HOME", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", "/x/data")
    assert forkd.resolve_target().uds == "/x/data/forkd/forkd.sock"
    monkeypatch.delenv("XDG_DATA_HOME")
    assert forkd.resolve_target().uds == str(Path.home() / ".local/share/forkd/forkd.sock")
    monkeypatch.setenv("FORKD_URL", "http://h:1")
    monkeypatch.setenv("FORKD_TOKEN", "t")
    t = forkd.resolve_target()
    assert (t.base_url, t.uds, t.token) == ("http://h:1", None, "t")


def test_ttl_kills_the_sandbox(client: Client) -> None:
    sb = client.create("tiny", ttl_s=2)
    assert sb.info.get("expires_at")
    deadline = time.monotonic() + 60
    while True:
        try:
            if client.get(sb.id).state == "stopped":
                break
        except forkd.NotFound:
            break
        assert time.monotonic() < deadline, "ttl_s=2 sandbox still there after 60 s"
        time.sleep(0.5)


def test_unknown_image_is_not_found_with_a_hint(client: Client) -> None:
    with pytest.raises(forkd.NotFound) as ei:
        client.fork("no-such-image-x", 1)
    e = ei.value
    assert e.status == 404 and e.code == "not_found" and e.hint
    assert isinstance(e, forkd.ForkdError) and not isinstance(e, forkd.ForkError)


def test_unknown_sandbox_and_bad_request(client: Client) -> None:
    with pytest.raises(forkd.NotFound):
        client.get("tiny-nope-0")
    assert client.kill("tiny-nope-0") is False
    with pytest.raises(forkd.BadRequest) as ei:
        client.fork("tiny", 0)
    assert ei.value.status == 400


def _mem_available_mib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024
    return 0


def test_too_many_children_is_a_capacity_error_and_starts_none(client: Client) -> None:
    # the engine estimates 24 MiB of QEMU + 1/8 of the guest's 192 MiB per tiny child and
    # admits up to 90 % of MemAvailable
    if _mem_available_mib() * 0.9 >= 1000 * 48:
        pytest.skip("this host has room for 1000 tiny children: no capacity error to provoke")
    before = {s.id for s in client.list()}
    with pytest.raises(forkd.CapacityError) as ei:
        client.fork("tiny", 1000)
    assert ei.value.status == 422 and ei.value.code == "capacity"
    assert "MiB" in ei.value.message
    assert {s.id for s in client.list()} == before


def test_no_daemon_is_daemon_unavailable_with_a_hint() -> None:
    home = short_tmp("fkpy-none")
    try:
        with pytest.raises(forkd.DaemonUnavailable) as ei:
            Client(home=home).health()
        assert "forkd serve" in (ei.value.hint or "")
        assert isinstance(ei.value, ConnectionError)
    finally:
        shutil.rmtree(home)


def test_fork_streamed_with_on_progress(client: Client) -> None:
    # on_progress asks for the NDJSON answer; the children are the same
    events: list[dict[str, object]] = []
    sbs = client.fork("tiny", 2, on_progress=events.append)
    try:
        assert len(sbs) == 2
        assert all(s.state == "running" for s in sbs)
        assert [s.commands.run("echo $((1+1))").stdout for s in sbs] == ["2\n", "2\n"]
    finally:
        for s in sbs:
            s.kill()


def test_unknown_image_while_streaming_progress(client: Client) -> None:
    seen: list[dict[str, object]] = []
    with pytest.raises(forkd.NotFound) as ei:
        client.fork("no-such-image-y", 1, on_progress=seen.append)
    assert ei.value.status == 404 and ei.value.hint


def test_pull_into_an_empty_store_then_fork_it(forkd_bin: Path, daemon: Daemon) -> None:
    # push tiny into the main daemon's embedded hub, then pull it through a second daemon whose
    # store is empty (a real download, not a copy of the same content already in the store)
    ref = f"sdktest/tinyp{uuid.uuid4().hex[:6]}"
    run_forkd(forkd_bin, daemon.home, "-q", "push", "tiny", ref, "--unsigned")
    empty = Daemon(forkd_bin, short_tmp("fkpy-pull"))
    try:
        with empty.client() as c:
            assert c.images() == []
            events: list[dict[str, object]] = []
            try:
                img = c.pull(
                    ref, hub=f"file://{daemon.home}/hub", insecure=True, on_progress=events.append
                )
            except forkd.ProtocolError as e:
                if "ended before its done event" in e.message and "panicked" in empty.log_tail(400):
                    pytest.xfail(
                        "forkd serve's pull thread panics (forkd-hub pull.rs: block_in_place "
                        "outside a multi-threaded runtime), so the stream ends without done"
                    )
                raise
            name = ref.split("/")[1]
            assert img["tag"] == name
            assert events and all(e.get("event") == "progress" for e in events)
            assert [i["tag"] for i in c.images()] == [name]
            with Sandbox.create(name, client=c) as sb:
                assert sb.commands.run("echo pulled").stdout == "pulled\n"
    finally:
        empty.stop()
        shutil.rmtree(empty.home, ignore_errors=True)


def test_create_from_a_hub_reference_starts_before_the_image_is_installed(
    forkd_bin: Path, daemon: Daemon
) -> None:
    # A daemon whose store lacks the image forks it lazily: the sandbox runs from a lazy mount
    # while the image downloads, and the image is then installed as a pull leaves it. The
    # sandbox keeps working after that (the detached mount still serves it), and can branch.
    ref = f"sdktest/tinyl{uuid.uuid4().hex[:6]}"
    run_forkd(forkd_bin, daemon.home, "-q", "push", "tiny", ref, "--unsigned")
    home = short_tmp("fkpy-lazy")
    lazy = Daemon(
        forkd_bin, home, env={"FORKD_HUB": f"file://{daemon.home}/hub"}, extra=["--insecure"]
    )
    name = ref.split("/")[1]
    try:
        with lazy.client() as c:
            assert c.images() == []
            with Sandbox.create(ref, client=c) as sb:
                assert sb.commands.run("echo lazy").stdout == "lazy\n"
                deadline = time.monotonic() + 120
                while name not in [i["tag"] for i in c.images()]:
                    assert time.monotonic() < deadline, lazy.log_tail()
                    time.sleep(0.2)
                assert sb.commands.run("cat /proc/sys/kernel/random/uuid").exit_code == 0
                with sb.branch(1)[0] as child:
                    assert child.commands.run("echo branched").stdout == "branched\n"
            mounts = Path("/proc/self/mountinfo").read_text()
            assert str(home / "cache" / "lazy") not in mounts, "the lazy mount was left mounted"
    finally:
        lazy.stop()
        shutil.rmtree(lazy.home, ignore_errors=True)


# -- per-child failures ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def broken_daemon(forkd_bin: Path, tiny_home: Path) -> Iterator[Daemon]:
    """A second daemon whose engine fails child 1 of every fork (FORKD_TEST_BREAK_CHILD=1)."""
    d = Daemon(forkd_bin, copy_home(tiny_home, "fkpy-brk"), env={"FORKD_TEST_BREAK_CHILD": "1"})
    yield d
    d.stop()
    shutil.rmtree(d.home, ignore_errors=True)


def test_fork_error_carries_the_started_children_and_the_errors(broken_daemon: Daemon) -> None:
    with broken_daemon.client() as c:
        with pytest.raises(forkd.ForkError) as ei:
            c.fork("tiny", 3)
        e = ei.value
        assert isinstance(e, forkd.ForkdError)
        assert [x.index for x in e.errors] == [1]
        assert e.errors[0].code and e.errors[0].message
        assert e.code == e.errors[0].code
        assert len(e.sandboxes) == 2
        assert e.result["requested"] == 3 and e.result["created"] == 2
        for s in e.sandboxes:  # the others came up and work
            assert s.commands.run("echo ok").stdout == "ok\n"
            s.kill()
        with pytest.raises(forkd.ForkError) as ei2:
            c.fork("tiny", 2, on_progress=lambda ev: None)  # the same through the stream
        assert [x.index for x in ei2.value.errors] == [1]
        for s in ei2.value.sandboxes:
            s.kill()
        assert c.list() == []


# -- TCP with a bearer token -------------------------------------------------------------------


@pytest.fixture(scope="module")
def tcp_daemon(forkd_bin: Path, tiny_home: Path) -> Iterator[tuple[Daemon, str]]:
    home = copy_home(tiny_home, "fkpy-tcp")
    token = uuid.uuid4().hex
    tf = home / "token"
    tf.write_text(token + "\n")
    tf.chmod(0o600)
    d = Daemon(forkd_bin, home, listen=f"127.0.0.1:{free_port()}", token_file=tf)
    yield d, token
    d.stop()
    shutil.rmtree(home, ignore_errors=True)


def test_tcp_wrong_token_is_unauthorized(tcp_daemon: tuple[Daemon, str]) -> None:
    d, _ = tcp_daemon
    for bad in ("wrong", None):
        with Client(d.url, token=bad) as c:
            assert c.health()["status"] == "ok"  # health needs no token
            with pytest.raises(forkd.Unauthorized) as ei:
                c.list()
            assert ei.value.status == 401 and ei.value.code == "unauthorized"


def test_tcp_right_token_works(
    tcp_daemon: tuple[Daemon, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    d, token = tcp_daemon
    with Client(d.url, token=token) as c:
        with Sandbox.create("tiny", client=c) as sb:
            assert sb.commands.run("echo tcp").stdout == "tcp\n"
            sb.files.write("/tmp/x", b"\x00\x01")
            assert sb.files.read("/tmp/x") == b"\x00\x01"
            assert sb.id in [s.id for s in c.list()]
    monkeypatch.setenv("FORKD_URL", d.url)
    monkeypatch.setenv("FORKD_TOKEN", token)
    with Client() as c:
        assert isinstance(c.list(), list)
