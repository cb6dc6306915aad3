"""Fixtures: a real `forkd serve` (from $FORKD_BIN, default target/debug/forkd) in a temporary
FORKD_HOME holding the `tiny` image, and real children forked from it. Nothing is mocked.

The `tiny` image is built once per session with `forkd build-tiny` (assets from
$FORKD_ASSETS, default /var/cache/forkd-ci/assets; make them with scripts/setup-engine.sh), or
copied from $FORKD_TEST_TINY_HOME (a FORKD_HOME that already holds it) if that is set.
Missing pieces FAIL the tests with what to install or run; nothing is skipped silently.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

import forkd

REPO = Path(__file__).resolve().parents[3]
ASSETS = Path(os.environ.get("FORKD_ASSETS") or "/var/cache/forkd-ci/assets")
#: how long a daemon may take to answer /v1/health after it starts
START_TIMEOUT_S = 60.0


def die(msg: str) -> None:
    pytest.fail(msg, pytrace=False)


def short_tmp(prefix: str) -> Path:
    # unix socket paths must stay under ~100 bytes: keep homes short, in /tmp
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORKD_")}
    # the Rust tests run QEMU under TCG; the snapshot and its children must agree
    env["FORKD_ACCEL"] = os.environ.get("FORKD_ACCEL", "tcg")
    env["FORKD_ASSETS"] = str(ASSETS)
    return env


def run_forkd(bin_: Path, home: Path, *args: str, timeout: float = 900) -> str:
    env = base_env() | {"FORKD_HOME": str(home)}
    p = subprocess.run([str(bin_), *args], env=env, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        die(f"`forkd {' '.join(args)}` failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p.stdout


class Daemon:
    """One `forkd serve` process with its own FORKD_HOME."""

    def __init__(
        self,
        bin_: Path,
        home: Path,
        *,
        listen: str | None = None,
        token_file: Path | None = None,
        env: dict[str, str] | None = None,
        extra: list[str] | None = None,
    ) -> None:
        self.bin = bin_
        self.home = home
        self.listen = listen
        self.token_file = token_file
        self.log_path = home / "serve-test.log"
        args = [str(bin_), "serve"]
        if listen:
            args += ["--listen", listen]
        if token_file:
            args += ["--token-file", str(token_file)]
        args += extra or []
        full_env = base_env() | {"FORKD_HOME": str(home)} | (env or {})
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            args, env=full_env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self._wait_ready()

    @property
    def url(self) -> str:
        assert self.listen
        return f"http://{self.listen}"

    def client(self, **kw: object) -> forkd.Client:
        if self.listen:
            return forkd.Client(self.url, **kw)  # type: ignore[arg-type]
        return forkd.Client(home=self.home, **kw)  # type: ignore[arg-type]

    def log_tail(self, n: int = 60) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-n:])

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                die(
                    f"`forkd serve` exited with {self.proc.returncode} at start "
                    f"(FORKD_HOME={self.home}):\n{self.log_tail()}"
                )
            try:
                with self.client(timeout=5) as c:
                    if c.health().get("status") == "ok":
                        return
            except forkd.ForkdError as e:
                last = e
            time.sleep(0.2)
        self.stop()
        die(
            f"`forkd serve` did not answer /v1/health in {START_TIMEOUT_S} s ({last}):\n"
            + self.log_tail()
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def forkd_bin() -> Path:
    p = Path(os.environ.get("FORKD_BIN") or REPO / "target" / "debug" / "forkd")
    if not p.is_file():
        die(
            f"the forkd binary is not at {p}: build it with `cargo build -p forkd-cli` at the "
            f"repo root, or set FORKD_BIN"
        )
    if not shutil.which("qemu-system-x86_64"):
        die("QEMU is missing: apt-get install qemu-system-x86 (or run scripts/setup-engine.sh)")
    return p


@pytest.fixture(scope="session")
def tiny_home(forkd_bin: Path) -> Iterator[Path]:
    """A FORKD_HOME holding the `tiny` image, used as a template: daemons get copies."""
    reuse = os.environ.get("FORKD_TEST_TINY_HOME")
    if reuse:
        if not (Path(reuse).is_dir()):
            die(f"FORKD_TEST_TINY_HOME={reuse} is not a directory")
        yield Path(reuse)
        return
    missing = [
        n for n in ("vmlinuz", "initrd.img", "rootfs.ext4") if not (ASSETS / "tiny" / n).is_file()
    ]
    if missing:
        die(
            f"the tiny image's assets are missing in {ASSETS / 'tiny'} ({', '.join(missing)}): "
            f"run `bash scripts/setup-engine.sh` (or set FORKD_ASSETS)"
        )
    home = short_tmp("fkpy-tpl")
    run_forkd(forkd_bin, home, "-q", "build-tiny", "--mem-mib", "192")
    yield home
    shutil.rmtree(home, ignore_errors=True)


def copy_home(template: Path, prefix: str) -> Path:
    home = short_tmp(prefix)
    for entry in template.iterdir():
        if entry.name in ("run", "tmp", "forkd.sock", "log") or entry.name.endswith(".log"):
            continue
        subprocess.run(["cp", "-a", "--reflink=auto", str(entry), str(home)], check=True)
    return home


@pytest.fixture(scope="session")
def daemon(forkd_bin: Path, tiny_home: Path) -> Iterator[Daemon]:
    """The main daemon, on a unix socket."""
    d = Daemon(forkd_bin, copy_home(tiny_home, "fkpy-"))
    yield d
    d.stop()
    shutil.rmtree(d.home, ignore_errors=True)


@pytest.fixture(scope="session")
def client(daemon: Daemon) -> Iterator[forkd.Client]:
    with daemon.client() as c:
        yield c


@pytest.fixture
def sb(client: forkd.Client) -> Iterator[forkd.Sandbox]:
    """One fresh `tiny` child, killed after the test."""
    s = forkd.Sandbox.create("tiny", client=client)
    try:
        yield s
    finally:
        s.kill()


@pytest.fixture
def daemon_env(daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> Daemon:
    """The process environment pointing `Client()` (no arguments) at the main daemon."""
    monkeypatch.delenv("FORKD_URL", raising=False)
    monkeypatch.delenv("FORKD_TOKEN", raising=False)
    monkeypatch.setenv("FORKD_HOME", str(daemon.home))
    return daemon


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def python() -> str:
    return sys.executable
