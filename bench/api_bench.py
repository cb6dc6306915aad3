"""The issue-8 API benchmarks, against a running `forkd serve` (bench/api.sh starts it).

Each measurement is printed as one JSON line; bench/api.sh turns them into a RESULTS section.

  tasks     50 tasks in 50 children through the SDK (fork, write 64 KiB, run, read, kill)
            against `forkd fork -n 50 --exec` of the same command (floor x1.5)
  overhead  commands.run("true") p50 against the agent's own round trip (+5 ms)
  files     100 MiB written and read back, sha256 intact, daemon RSS sampled throughout
  idle      100 idle children: daemon RSS; paused children's CPU from /proc
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import os
import statistics
import subprocess
import sys
import threading
import time

from forkd import Client

FORKD = os.environ["FORKD"]
DAEMON_PID = int(os.environ["DAEMON_PID"])
TAG = os.environ.get("TAG", "tiny")
# The task each child runs: read the input, write an output next to it, print its digest.
TASK = "sha256sum /tmp/in.bin | cut -d' ' -f1 > /tmp/out.txt && wc -c < /tmp/in.bin >> /tmp/out.txt"


def out(**kw) -> None:
    print(json.dumps(kw), flush=True)


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class RssSampler:
    """Highest VmRSS of the daemon while the block runs, sampled every 20 ms."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, 0, threading.Event()

    def __enter__(self) -> "RssSampler":
        def loop() -> None:
            while not self._stop.is_set():
                self.peak = max(self.peak, rss_kib(self.pid))
                time.sleep(0.02)

        self._t = threading.Thread(target=loop, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()


def cli_floor(n: int) -> float:
    """`forkd fork -n N --exec` of the same work (the input made in the guest instead)."""
    cmd = f"head -c 65536 /dev/urandom > /tmp/in.bin && {TASK} && cat /tmp/out.txt"
    t0 = time.time()
    p = subprocess.run(
        [FORKD, "fork", "--tag", TAG, "-n", str(n), "--exec", cmd, "--json"],
        capture_output=True, text=True, env=dict(os.environ, FORKD_URL=""),
    )
    wall = time.time() - t0
    if p.returncode != 0:
        sys.exit(f"the CLI floor failed: {p.stderr}")
    rep = json.loads(p.stdout)
    assert rep["alive"] == n, rep
    return wall


def sdk_tasks(c: Client, n: int) -> float:
    data = os.urandom(65536)
    want = hashlib.sha256(data).hexdigest()
    t0 = time.time()
    sbs = c.fork(TAG, n)

    def one(sb) -> None:
        sb.files.write("/tmp/in.bin", data)
        r = sb.commands.run(TASK)
        assert r.exit_code == 0, (r.exit_code, r.stderr)
        got = sb.files.read("/tmp/out.txt").decode().split()
        assert got == [want, "65536"], got
        sb.kill()

    with cf.ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(one, sbs))
    return time.time() - t0


def agent_rtt(n: int) -> float:
    """p50 of the agent's own round trip for `true`, on a child kept without the daemon,
    measured by the engine's client directly on the agent socket (examples/agent_rtt)."""
    p = subprocess.run(
        [os.environ["AGENT_RTT"], os.environ["RTT_SOCK"], str(n)],
        capture_output=True, text=True, check=True,
    )
    return json.loads(p.stdout)["p50_ms"]


def api_p50(c: Client, n: int) -> float:
    sb = c.fork(TAG, 1)[0]
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        r = sb.commands.run("true")
        times.append((time.perf_counter() - t0) * 1000)
        assert r.exit_code == 0
    sb.kill()
    return statistics.median(times)


def files(c: Client) -> dict:
    sb = c.fork(TAG, 1)[0]
    # The tiny guest's / and /tmp are smaller than 100 MiB: give the file a tmpfs of its own.
    r = sb.commands.run("mkdir -p /big && mount -t tmpfs -o size=120m tmpfs /big")
    assert r.exit_code == 0, r.stderr
    size = 100 << 20
    chunk = os.urandom(1 << 20)
    h = hashlib.sha256()

    def gen():
        for _ in range(size // len(chunk)):
            h.update(chunk)
            yield chunk

    with RssSampler(DAEMON_PID) as s:
        t0 = time.time()
        sb.files.write("/big/big.bin", gen())
        t_write = time.time() - t0
        h2 = hashlib.sha256()
        t0 = time.time()
        got = 0
        for piece in sb.files.read_stream("/big/big.bin"):
            h2.update(piece)
            got += len(piece)
        t_read = time.time() - t0
    sb.kill()
    assert got == size and h.hexdigest() == h2.hexdigest(), "100 MiB came back different"
    return {"write_s": t_write, "read_s": t_read, "peak_rss_kib": s.peak}


def proc_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def idle(c: Client, n: int) -> dict:
    sbs = c.fork(TAG, n)
    time.sleep(2)
    rss = rss_kib(DAEMON_PID)
    pids = [sb.info["pid"] for sb in sbs]
    t0 = [proc_ticks(p) for p in pids]
    time.sleep(5)
    running_ticks = sum(proc_ticks(p) for p in pids) - sum(t0)
    for sb in sbs:
        sb.pause()
    t0 = [proc_ticks(p) for p in pids]
    time.sleep(5)
    paused_ticks = sum(proc_ticks(p) for p in pids) - sum(t0)
    rss_after = rss_kib(DAEMON_PID)
    hz = os.sysconf("SC_CLK_TCK")
    for sb in sbs:
        sb.kill()
    return {
        "children": n,
        "daemon_rss_kib": max(rss, rss_after),
        "running_cpu_s_per_child_per_s": running_ticks / hz / n / 5,
        "paused_cpu_s_per_child_per_s": paused_ticks / hz / n / 5,
        "paused_ticks_total": paused_ticks,
    }


def main() -> None:
    which = sys.argv[1:] or ["tasks", "overhead", "files", "idle"]
    c = Client()
    if "tasks" in which:
        n = int(os.environ.get("TASKS_N", "50"))
        floor = cli_floor(n)
        sdk = sdk_tasks(c, n)
        out(bench="tasks", n=n, sdk_s=sdk, cli_floor_s=floor, ratio=sdk / floor, goal="<= 1.5")
    if "overhead" in which and os.environ.get("RTT_SOCK"):
        n = int(os.environ.get("RTT_N", "100"))
        rtt = agent_rtt(n)
        api = api_p50(c, n)
        out(bench="overhead", n=n, api_p50_ms=api, agent_p50_ms=rtt, extra_ms=api - rtt, goal="<= +5 ms")
    if "files" in which:
        out(bench="files", **files(c), goal="sha256 intact, RSS < 64 MiB")
    if "idle" in which:
        out(bench="idle", **idle(c, int(os.environ.get("IDLE_N", "100"))), goal="RSS <= 64 MiB, paused ~0 CPU")


if __name__ == "__main__":
    main()
