"""Data the SDK returns.

JSON objects that the daemon defines (a sandbox, an image, the health answer) are returned as
the JSON itself, typed with :class:`typing.TypedDict` so editors know their fields; results the
SDK assembles (a command's result, a directory entry) are dataclasses.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any, Mapping, TypedDict

__all__ = [
    "SandboxInfo",
    "PortInfo",
    "PortMapping",
    "Network",
    "BranchInfo",
    "ImageInfo",
    "Health",
    "CommandStatus",
    "CommandResult",
    "CommandOutput",
    "FileEntry",
    "WriteInfo",
]


class PortInfo(TypedDict):
    """A guest port and the host port (on 127.0.0.1) that reaches it, as the daemon lists it
    in a sandbox's ``ports``."""

    guest: int
    host: int


class SandboxInfo(TypedDict, total=False):
    """A sandbox as ``GET /v1/sandboxes/{id}`` returns it."""

    id: str
    image: str
    state: str  # "running" | "paused" | "stopped"
    hostname: str
    pid: int
    created_at: str
    expires_at: str | None
    labels: dict[str, str]
    env: dict[str, str]
    memory_mib: int
    restored_ms: int
    ready_ms: int
    net: bool  # the sandbox has a network (it was created with ``network``)
    ports: list[PortInfo]  # exposed guest ports (``network.expose``)


@dataclass(frozen=True)
class PortMapping:
    """An exposed guest port: ``http://127.0.0.1:{host}/`` on the daemon's host reaches
    port ``guest`` inside the sandbox."""

    guest: int
    host: int

    @classmethod
    def from_json(cls, j: Mapping[str, Any]) -> PortMapping:
        return cls(guest=int(j["guest"]), host=int(j["host"]))


@dataclass
class Network:
    """A sandbox's network, for ``create(..., network=Network(...))`` (a plain dict of the
    same fields works too).

    Without a network a sandbox has none at all. With one (even ``Network()``) it has its own
    user-mode link: guest 10.0.2.15/24, gateway 10.0.2.2, DNS 10.0.2.3, and **all egress is
    denied** except what ``allow`` lists:

    - ``allow``: ``HOST|DOMAIN|CIDR[:PORT]`` rules, e.g. ``"example.com"``,
      ``"*.example.com"`` (its subdomains), ``"10.1.0.0/16:5432"``, ``"host:8000"``.
      ``host`` is the daemon host's loopback (127.0.0.1), which the guest reaches as
      10.0.2.2 (or the name ``host.forkd.internal``). DNS answers only names a rule allows.
    - ``allow_all``: allow every public address (private ranges, the host and
      169.254.0.0/16 still need an explicit ``allow``).
    - ``expose``: guest ports reachable on the host's 127.0.0.1: ``8080`` (a free host port
      per sandbox: see :meth:`Sandbox.host_port`) or ``"18080:8080"`` (host port 18080; one
      sandbox only).
    - ``rate_mbit``: bandwidth of each sandbox in Mbit/s (daemon default 100; 0: no limit).
    """

    allow: list[str] = field(default_factory=list)
    allow_all: bool = False
    expose: list[int | str] = field(default_factory=list)
    rate_mbit: int | None = None

    def to_json(self) -> dict[str, Any]:
        """The request's ``network`` object (unset fields are left to the daemon)."""
        j: dict[str, Any] = {}
        if self.allow:
            j["allow"] = [str(a) for a in self.allow]
        if self.allow_all:
            j["allow_all"] = True
        if self.expose:
            j["expose"] = list(self.expose)
        if self.rate_mbit is not None:
            j["rate_mbit"] = int(self.rate_mbit)
        return j


class BranchInfo(TypedDict, total=False):
    """A running sandbox saved as an image (``POST /v1/sandboxes/{id}/snapshot``)."""

    tag: str  # the new image: fork it like any other
    parent: str  # the image the sandbox was forked from
    digest: str
    pause_ms: int  # how long the sandbox was paused
    dirty_pages: int
    own_pages: int  # 4 KiB pages that differ from the parent's: what the branch stores
    disk_bytes: int
    total_ms: int


class ImageInfo(TypedDict, total=False):
    """An image in the daemon's local store (``GET /v1/images``)."""

    tag: str
    name: str
    version: str
    memory_mib: int
    size_bytes: int
    disk_bytes: int
    created: str


class Health(TypedDict, total=False):
    """``GET /v1/health``."""

    status: str
    version: str
    sandboxes: int
    uptime_s: float


class CommandStatus(TypedDict, total=False):
    """A background command's status."""

    command_id: str
    pid: int
    running: bool
    exit_code: int | None
    signal: int | None
    timed_out: bool
    duration_ms: int | None


def _text(b: bytes) -> str:
    return b.decode("utf-8", errors="replace")


@dataclass
class CommandResult:
    """What a finished command did.

    A non-zero ``exit_code`` is returned here, not raised (unlike E2B): check ``exit_code`` or
    ``ok``. ``signal`` is set when the command was killed by a signal, ``timed_out`` when the
    daemon killed it for running past its timeout.
    """

    exit_code: int | None
    stdout_bytes: bytes = b""
    stderr_bytes: bytes = b""
    signal: int | None = None
    timed_out: bool = False
    duration_ms: int | None = None
    pid: int | None = None
    command_id: str | None = None

    @property
    def stdout(self) -> str:
        """``stdout_bytes`` as UTF-8 (undecodable bytes become U+FFFD)."""
        return _text(self.stdout_bytes)

    @property
    def stderr(self) -> str:
        """``stderr_bytes`` as UTF-8 (undecodable bytes become U+FFFD)."""
        return _text(self.stderr_bytes)

    @property
    def ok(self) -> bool:
        """True when the command exited with status 0 (no signal, no timeout)."""
        return self.exit_code == 0 and not self.timed_out and self.signal is None

    def __repr__(self) -> str:
        return (
            f"CommandResult(exit_code={self.exit_code!r}, stdout={self.stdout!r}, "
            f"stderr={self.stderr!r}, signal={self.signal!r}, timed_out={self.timed_out!r}, "
            f"duration_ms={self.duration_ms!r})"
        )


@dataclass
class CommandOutput:
    """The output a background command has produced so far (the daemon keeps the first 8 MiB
    of each stream; ``*_dropped`` counts the bytes beyond)."""

    stdout_bytes: bytes
    stderr_bytes: bytes
    stdout_dropped: int = 0
    stderr_dropped: int = 0
    running: bool = False

    @property
    def stdout(self) -> str:
        return _text(self.stdout_bytes)

    @property
    def stderr(self) -> str:
        return _text(self.stderr_bytes)

    @classmethod
    def from_json(cls, j: Mapping[str, Any]) -> CommandOutput:
        return cls(
            stdout_bytes=base64.b64decode(j.get("stdout") or ""),
            stderr_bytes=base64.b64decode(j.get("stderr") or ""),
            stdout_dropped=int(j.get("stdout_dropped") or 0),
            stderr_dropped=int(j.get("stderr_dropped") or 0),
            running=bool(j.get("running")),
        )


@dataclass
class FileEntry:
    """One entry of a guest directory."""

    name: str
    path: str
    type: str  # "file" | "dir" | "symlink" | "other"
    size: int = 0
    mode: int | None = None
    mtime: Any = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def is_dir(self) -> bool:
        return self.type == "dir"

    @property
    def is_file(self) -> bool:
        return self.type == "file"

    @classmethod
    def from_json(cls, j: Mapping[str, Any]) -> FileEntry:
        mode = j.get("mode")
        if isinstance(mode, str):  # tolerate "0644"
            try:
                mode = int(mode, 8)
            except ValueError:
                mode = None
        return cls(
            name=str(j.get("name", "")),
            path=str(j.get("path", "")),
            type=str(j.get("type", "other")),
            size=int(j.get("size") or 0),
            mode=mode,
            mtime=j.get("mtime"),
            raw=dict(j),
        )


@dataclass
class WriteInfo:
    """What ``files.write`` stored: the guest path and its size in bytes."""

    path: str
    size: int
