"""Branching a running sandbox through the SDK (issue 10): ``sb.snapshot(tag)`` and
``sb.branch(n)`` against a real daemon and real children."""

from __future__ import annotations

import uuid

import pytest

import forkd
from forkd import Client, Sandbox


def test_branch_children_start_from_the_sources_state(client: Client, sb: Sandbox) -> None:
    # State in the warm worker (a shell variable), in memory (a tmpfs file) and on disk.
    sb.run_code("BRANCH_VAR=from-source")
    sb.files.write("/root/disk.txt", "on disk\n")
    sb.commands.run("echo in memory > /run/mem.txt")
    kids = sb.branch(3)
    try:
        assert len(kids) == 3 and len({k.id for k in kids}) == 3
        for k in kids:
            assert k.run_code("echo $BRANCH_VAR").strip() == "from-source"
            assert k.files.read("/root/disk.txt") == b"on disk\n"
            assert k.commands.run("cat /run/mem.txt").stdout == "in memory\n"
            assert k.commands.run("hostname").stdout.strip() == k.info["hostname"]
        # Writes in one grandchild reach neither its siblings nor the source.
        kids[0].files.write("/root/only-0.txt", "zero")
        kids[0].run_code("BRANCH_VAR=changed")
        assert kids[1].commands.run("test -e /root/only-0.txt").exit_code != 0
        assert kids[1].run_code("echo $BRANCH_VAR").strip() == "from-source"
        assert sb.commands.run("test -e /root/only-0.txt").exit_code != 0
        # The source runs on, and can be branched again.
        assert sb.refresh()["state"] == "running"
        assert sb.run_code("echo $BRANCH_VAR").strip() == "from-source"
        image = kids[0].image
        assert any(i["tag"] == image for i in client.images())
    finally:
        for k in kids:
            k.kill()


def test_snapshot_returns_what_was_saved_and_refuses_bad_states(
    client: Client, sb: Sandbox
) -> None:
    tag = "sdk-br-" + uuid.uuid4().hex[:8]
    b = sb.snapshot(tag)
    assert b["tag"] == tag and b["parent"] == "tiny"
    assert b["digest"].startswith("sha256:") and b["pause_ms"] >= 0
    assert b["own_pages"] <= b["dirty_pages"]
    # The tag exists now: refused unless forced.
    with pytest.raises(forkd.Conflict):
        sb.snapshot(tag)
    assert sb.snapshot(tag, force=True)["tag"] == tag
    # Paused: refused with a hint to resume.
    sb.pause()
    with pytest.raises(forkd.Conflict) as ei:
        sb.snapshot()
    assert "paused" in str(ei.value)
    sb.resume()
    # Busy: a background command is running.
    h = sb.commands.run("sleep 30", background=True)
    with pytest.raises(forkd.Conflict) as ei:
        sb.snapshot()
    assert "busy" in str(ei.value)
    h.kill()
    # A bad tag is a bad request; a sandbox that is gone is not found.
    with pytest.raises(forkd.BadRequest):
        sb.snapshot("Bad Tag!")
    other = client.create("tiny")
    other.kill()
    with pytest.raises((forkd.NotFound, forkd.Conflict)):
        other.snapshot()
