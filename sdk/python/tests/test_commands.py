"""Commands in real children: foreground streams, env, stdin, timeouts, background handles."""

from __future__ import annotations

import time

import pytest

import forkd
from forkd import Client, Sandbox


def test_the_contract_run(sb: Sandbox) -> None:
    out: list[str] = []
    err: list[str] = []
    r = sb.commands.run(
        "echo hi; echo oops >&2; exit 3",
        env=None,
        cwd=None,
        stdin=None,
        timeout=30,
        on_stdout=out.append,
        on_stderr=err.append,
    )
    assert (r.exit_code, r.stdout, r.stderr) == (3, "hi\n", "oops\n")
    assert r.stdout_bytes == b"hi\n" and r.stderr_bytes == b"oops\n"
    assert "".join(out) == "hi\n" and "".join(err) == "oops\n"
    assert not r.ok and not r.timed_out and r.signal is None


def test_on_stdout_gets_chunks_as_they_come(sb: Sandbox) -> None:
    seen: list[tuple[float, str]] = []
    t0 = time.monotonic()
    r = sb.commands.run(
        "echo first; sleep 3; echo second",
        on_stdout=lambda s: seen.append((time.monotonic() - t0, s)),
    )
    end = time.monotonic() - t0
    assert r.exit_code == 0 and r.stdout == "first\nsecond\n"
    assert "".join(s for _, s in seen) == "first\nsecond\n"
    first_at = next(t for t, s in seen if "first" in s)
    # "first" reached the callback while the command was still sleeping
    assert end - first_at >= 2.0, (seen, end)


def test_zero_exit_and_binary_stdout(sb: Sandbox) -> None:
    r = sb.commands.run("printf 'a\\377b'")
    assert r.ok and r.exit_code == 0
    assert r.stdout_bytes == b"a\xffb"
    assert r.stdout == "a\ufffdb"


def test_argv_stdin_and_cwd(sb: Sandbox) -> None:
    assert sb.commands.run(["echo", "a  b", "$HOME"]).stdout == "a  b $HOME\n"
    assert sb.commands.run("cat", stdin="hello\n").stdout == "hello\n"
    r = sb.commands.run("od -An -tx1", stdin=b"\x00\xff\x10")
    assert r.stdout.split() == ["00", "ff", "10"]
    assert sb.commands.run("pwd", cwd="/tmp").stdout == "/tmp\n"


def test_fork_env_applies_to_every_child_and_command_env_wins(client: Client) -> None:
    sbs = client.fork("tiny", 10, env={"K": "v", "K2": "w"}, ttl_s=600)
    try:
        assert len(sbs) == 10 and len({s.id for s in sbs}) == 10
        assert all(s.info.get("expires_at") for s in sbs)
        for s in sbs:
            assert s.info["env"] == {"K": "v", "K2": "w"}
            assert s.commands.run("echo $K $K2").stdout == "v w\n"
            assert s.commands.run("echo $K $K2", env={"K": "mine"}).stdout == "mine w\n"
    finally:
        for s in sbs:
            s.kill()


def test_timeout_is_returned_not_raised(sb: Sandbox) -> None:
    t0 = time.monotonic()
    r = sb.commands.run("echo before; sleep 60", timeout=2)
    assert time.monotonic() - t0 < 30
    assert r.timed_out
    assert not r.ok
    assert r.stdout == "before\n"


def test_background_wait_and_output(sb: Sandbox) -> None:
    h = sb.commands.run("echo start; sleep 1; echo done >&2; exit 4", background=True)
    assert isinstance(h, forkd.CommandHandle)
    assert isinstance(h.pid, int) and h.pid > 0
    assert h.id in [c["command_id"] for c in sb.commands.list()]
    r = h.wait(timeout=30)
    assert r.exit_code == 4 and r.stdout == "start\n" and r.stderr == "done\n"
    o = h.output()
    assert not o.running and o.stdout == "start\n" and o.stderr == "done\n"
    assert h.status()["running"] is False
    again = sb.commands.connect(h.id)
    assert again.pid == h.pid


def test_background_signal_and_kill(sb: Sandbox) -> None:
    h = sb.commands.run(
        "trap 'echo got-term; exit 7' TERM; echo ready; while true; do sleep 0.2; done",
        background=True,
    )
    deadline = time.monotonic() + 20
    while "ready" not in h.output().stdout:
        assert time.monotonic() < deadline, "the background command never printed ready"
        time.sleep(0.2)
    h.signal(15)
    r = h.wait(timeout=30)
    assert r.exit_code == 7 and "got-term" in r.stdout

    h2 = sb.commands.run("sleep 600", background=True)
    h2.kill()
    r2 = h2.wait(timeout=30)
    assert r2.signal == 9 or r2.exit_code == 137, r2


def test_background_wait_timeout_raises(sb: Sandbox) -> None:
    h = sb.commands.run("sleep 600", background=True, timeout=None)
    with pytest.raises(forkd.TimeoutError_) as ei:
        h.wait(timeout=1)
    assert isinstance(ei.value, TimeoutError)
    h.kill()
    assert h.wait(timeout=30).exit_code != 0


def test_run_code_in_the_warm_worker(sb: Sandbox) -> None:
    # tiny's warm worker is a shell that ran WARM_SINCE=$(cat /proc/uptime) before the snapshot
    assert sb.run_code("echo $WARM_SINCE | wc -w").strip() == "2"
    sb.run_code("X=41")
    assert sb.run_code("echo $((X+1))").strip() == "42"
