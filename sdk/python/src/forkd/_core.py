"""The one implementation of the API that the sync and the asyncio clients share.

Every API call is written once here, as an *operation*: a generator that yields
:class:`Request` descriptions and receives what the executor made of them (a
:class:`Response`, or for NDJSON streams whatever the request's :class:`Consumer` finished
with). Errors are decoded here too. ``forkd.client`` and ``forkd.aio`` only carry requests
over httpx (blocking or awaited) and wrap the results in their own ``Sandbox`` classes.
"""

from __future__ import annotations

import base64
import codecs
import json
import math
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import (
    Any,
    Callable,
    Generator,
    Generic,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
    TypeVar,
    Union,
)
from urllib.parse import quote

from .errors import (
    ChildError,
    ForkdError,
    GuestError,
    NotFound,
    PortNotExposed,
    ProtocolError,
    TimeoutError_,
    error_from_json,
)
from .models import (
    BranchInfo,
    CommandOutput,
    CommandResult,
    CommandStatus,
    FileEntry,
    Health,
    ImageInfo,
    Network,
    PortMapping,
    SandboxInfo,
    WriteInfo,
)

T = TypeVar("T")

API = "/v1"
NDJSON = "application/x-ndjson"
#: seconds added to a command's own timeout before the client gives up reading its stream
STREAM_MARGIN_S = 30.0
#: default timeout of a plain request (connect, read, write, pool)
DEFAULT_TIMEOUT_S = 60.0
#: default ``timeout`` of a command, as the daemon's
DEFAULT_COMMAND_TIMEOUT_S = 60
#: chunk size for uploads from file objects and downloads
CHUNK = 256 * 1024
#: how long one ``wait`` request may block on the daemon when the caller waits forever
WAIT_SLICE_S = 60

Callback = Callable[[Any], Any]
Pending = list[tuple[Callback, Any]]


class _Default:
    def __repr__(self) -> str:
        return "DEFAULT"


DEFAULT: Any = _Default()


# --------------------------------------------------------------------------------------------
# Where the daemon is


def default_home() -> Path:
    """``$FORKD_HOME``, else ``$XDG_DATA_HOME/forkd``, else ``~/.local/share/forkd``."""
    home = os.environ.get("FORKD_HOME")
    if home:
        return Path(home)
    xdg = os.environ.get("XDG_DATA_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "share"
    )
    return Path(xdg) / "forkd"


@dataclass(frozen=True)
class Target:
    """How to reach a daemon: an HTTP base URL, or a unix socket (``uds``)."""

    base_url: str
    uds: str | None = None
    token: str | None = None

    def describe(self) -> str:
        return f"unix socket {self.uds}" if self.uds else self.base_url


def resolve_target(
    url: str | os.PathLike[str] | None = None,
    token: str | None = None,
    home: str | os.PathLike[str] | None = None,
) -> Target:
    """Find the daemon.

    - ``url`` given: ``http(s)://host:port``, ``unix:/path/to/forkd.sock`` or a socket path.
    - else ``home`` given: the socket ``home/forkd.sock``.
    - else ``$FORKD_URL`` if set, else the socket ``$FORKD_HOME/forkd.sock`` (see
      :func:`default_home`).

    ``token`` defaults to ``$FORKD_TOKEN``; it is only sent over TCP.
    """
    if token is None:
        token = os.environ.get("FORKD_TOKEN") or None
    if url is None and home is None:
        url = os.environ.get("FORKD_URL") or None
    if url is None:
        sock = Path(home) if home is not None else default_home()
        return Target("http://forkd", uds=str(sock / "forkd.sock"))
    u = os.fspath(url)
    if u.startswith("unix:"):
        path = u[len("unix:") :]
        while path.startswith("//"):
            path = path[1:]
        return Target("http://forkd", uds=path)
    if u.startswith("/") or u.startswith("."):
        return Target("http://forkd", uds=u)
    if "://" not in u:
        u = "http://" + u
    return Target(u.rstrip("/"), token=token)


def auth_headers(target: Target) -> dict[str, str]:
    h = {"User-Agent": "forkd-python/0.1.0"}
    if target.token and not target.uds:
        h["Authorization"] = f"Bearer {target.token}"
    return h


# --------------------------------------------------------------------------------------------
# Requests, responses, errors


@dataclass
class Request:
    """One HTTP request an operation wants made.

    ``consumer`` set: the answer is streamed (NDJSON lines, or one JSON body if the daemon
    answered with plain JSON) into it and the executor hands back ``consumer.finish()``.
    ``read_timeout``: ``DEFAULT`` keeps the client's timeout, ``None`` means no read timeout.
    """

    method: str
    path: str
    params: list[tuple[str, str]] = field(default_factory=list)
    json: Any = DEFAULT
    content: Any = None  # bytes | Iterable[bytes] | FileChunks (async: also AsyncIterable)
    headers: dict[str, str] = field(default_factory=dict)
    read_timeout: Any = DEFAULT
    consumer: Consumer[Any] | None = None

    @property
    def idempotent(self) -> bool:
        """Safe to send again when a pooled keep-alive connection turns out to be closed."""
        return self.method in ("GET", "HEAD", "DELETE") and self.content is None

    def httpx_kwargs(self) -> dict[str, Any]:
        """The arguments of ``httpx.Client.build_request`` that do not depend on sync/async
        (``content`` and ``timeout`` are added by the executor)."""
        kw: dict[str, Any] = {"method": self.method, "url": self.path, "headers": self.headers}
        if self.params:
            kw["params"] = self.params
        if self.json is not DEFAULT:
            kw["json"] = self.json
        return kw


@dataclass
class Response:
    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        try:
            return json.loads(self.body) if self.body else None
        except ValueError as e:
            raise ProtocolError(
                f"the daemon's answer is not JSON: {self.body[:200]!r}", status=self.status
            ) from e


def error_from_response(status: int, body: bytes, reason: str = "") -> ForkdError:
    """The exception for an HTTP error answer ``{"error": {"code", "message", "hint"}}``
    (or whatever else the body is)."""
    err: Any = None
    try:
        j = json.loads(body) if body else None
        err = j.get("error") if isinstance(j, dict) else None
        if isinstance(err, str):
            err = {"message": err}
    except ValueError:
        pass
    if not isinstance(err, dict):
        text = body.decode("utf-8", "replace").strip()[:500]
        err = {"message": f"HTTP {status} {reason}".strip() + (f": {text}" if text else "")}
    return error_from_json(err, status)


def is_ndjson(content_type: str | None) -> bool:
    return bool(content_type) and "ndjson" in str(content_type).lower()


def parse_ndjson_line(line: str | bytes) -> dict[str, Any] | None:
    """One NDJSON line as a dict, ``None`` for a blank line."""
    if isinstance(line, bytes):
        line = line.decode("utf-8", "replace")
    line = line.strip()
    if not line:
        return None
    try:
        ev = json.loads(line)
    except ValueError as e:
        raise ProtocolError(f"bad NDJSON line from the daemon: {line[:200]!r}") from e
    if not isinstance(ev, dict):
        raise ProtocolError(f"NDJSON line is not an object: {line[:200]!r}")
    return ev


class Consumer(Generic[T]):
    """Receives a streamed answer, event by event. ``on_event`` returns the user callbacks to
    call (the executor calls them, and awaits them in asyncio if they are coroutines)."""

    def on_event(self, ev: dict[str, Any]) -> Pending:
        raise NotImplementedError

    def on_body(self, body: Any) -> Pending:
        """The daemon answered with one JSON document instead of NDJSON."""
        raise ProtocolError(f"expected an NDJSON stream, got {str(body)[:200]}")

    def finish(self) -> T:
        raise NotImplementedError


def _b64(ev: Mapping[str, Any]) -> bytes:
    data = ev.get("data") or ""
    try:
        return base64.b64decode(data)
    except (ValueError, TypeError) as e:
        raise ProtocolError(f"bad base64 in stream event: {str(data)[:80]!r}") from e


class CommandConsumer(Consumer[CommandResult]):
    """A foreground command's stream: start, stdout/stderr chunks, then exit or error."""

    def __init__(self, on_stdout: Callback | None, on_stderr: Callback | None) -> None:
        self.on_stdout = on_stdout
        self.on_stderr = on_stderr
        self.pid: int | None = None
        self.out = bytearray()
        self.err = bytearray()
        self.exit: dict[str, Any] | None = None
        self.error: dict[str, Any] | None = None
        self._dec_out = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._dec_err = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def on_event(self, ev: dict[str, Any]) -> Pending:
        t = ev.get("type")
        if t == "start":
            self.pid = ev.get("pid")
        elif t == "stdout":
            data = _b64(ev)
            self.out += data
            if self.on_stdout is not None:
                text = self._dec_out.decode(data)
                if text:
                    return [(self.on_stdout, text)]
        elif t == "stderr":
            data = _b64(ev)
            self.err += data
            if self.on_stderr is not None:
                text = self._dec_err.decode(data)
                if text:
                    return [(self.on_stderr, text)]
        elif t == "exit":
            self.exit = ev
        elif t == "error":
            self.error = ev.get("error") if isinstance(ev.get("error"), dict) else dict(ev)
        return []

    def finish(self) -> CommandResult:
        if self.error is not None:
            raise error_from_json(self.error)
        if self.exit is None:
            raise ProtocolError("the command's stream ended before its exit event")
        return CommandResult(
            exit_code=self.exit.get("exit_code"),
            stdout_bytes=bytes(self.out),
            stderr_bytes=bytes(self.err),
            signal=self.exit.get("signal"),
            timed_out=bool(self.exit.get("timed_out")),
            duration_ms=self.exit.get("duration_ms"),
            pid=self.pid,
        )


class DoneConsumer(Consumer[dict[str, Any]]):
    """``progress``/``child`` events then ``done`` or ``error``: pull and fork streams."""

    def __init__(
        self, on_progress: Callback | None = None, on_child: Callback | None = None
    ) -> None:
        self.on_progress = on_progress
        self.on_child = on_child
        self.done: dict[str, Any] | None = None

    def on_event(self, ev: dict[str, Any]) -> Pending:
        kind = ev.get("event")
        if kind == "progress":
            return [(self.on_progress, ev)] if self.on_progress else []
        if kind == "child":
            return [(self.on_child, ev)] if self.on_child else []
        if kind == "done":
            self.done = ev
        elif kind == "error":
            err = ev.get("error")
            raise error_from_json(err if isinstance(err, dict) else {"message": str(ev)})
        return []

    def on_body(self, body: Any) -> Pending:
        if not isinstance(body, dict):
            raise ProtocolError(f"unexpected answer: {str(body)[:200]}")
        self.done = body
        return []

    def finish(self) -> dict[str, Any]:
        if self.done is None:
            raise ProtocolError("the stream ended before its done event")
        return self.done


# --------------------------------------------------------------------------------------------
# Upload bodies


class FileChunks:
    """A binary or text file object read in chunks (executors iterate it: sync directly,
    asyncio in a worker thread), so an upload never holds the whole file in memory."""

    def __init__(self, f: Any, chunk: int = CHUNK) -> None:
        self.f = f
        self.chunk = chunk

    def read_chunk(self) -> bytes:
        b = self.f.read(self.chunk)
        if isinstance(b, str):
            b = b.encode("utf-8")
        return bytes(b) if b else b""

    def __iter__(self) -> Iterator[bytes]:
        while True:
            b = self.read_chunk()
            if not b:
                return
            yield b


def upload_body(data: Any) -> Any:
    """``bytes``/``str`` as bytes, a file object as :class:`FileChunks`, an iterable of bytes
    (sync, or async for the asyncio client) as it is."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    if isinstance(data, str):
        return data.encode("utf-8")
    if hasattr(data, "read"):
        return FileChunks(data)
    if hasattr(data, "__aiter__"):
        return data
    if isinstance(data, Iterable):
        return (bytes(c) if not isinstance(c, str) else c.encode("utf-8") for c in data)
    raise TypeError(f"cannot upload a {type(data).__name__}: give bytes, str or a file object")


# --------------------------------------------------------------------------------------------
# Operations

Op = Generator[Request, Any, T]


def _sb(sid: str) -> str:
    return f"{API}/sandboxes/{quote(sid, safe='')}"


#: the longest timeout the daemon takes (30 days): what ``timeout=None`` sends where the API
#: has no "no limit" value
MAX_TIMEOUT_S = 30 * 86400


def _secs(timeout: float | None, none: int = 0) -> int:
    """A timeout in whole seconds for the API (rounded up); ``None`` becomes ``none``."""
    if timeout is None:
        return none
    if timeout < 0:
        raise ValueError("timeout must be >= 0")
    return min(int(math.ceil(timeout)), MAX_TIMEOUT_S)


def _stream_timeout(timeout_s: int) -> float | None:
    """The client's read timeout for an answer that may take ``timeout_s`` to come."""
    return None if timeout_s in (0, MAX_TIMEOUT_S) else timeout_s + STREAM_MARGIN_S


def _json(req: Request) -> Op[Any]:
    r = yield req
    return r.json()


def _none(req: Request) -> Op[None]:
    yield req
    return None


def op_health() -> Op[Health]:
    return _json(Request("GET", f"{API}/health"))


def op_images() -> Op[list[ImageInfo]]:
    j = yield from _json(Request("GET", f"{API}/images"))
    return list(j.get("images", [])) if isinstance(j, dict) else []


def op_pull(
    ref: str,
    hub: str | None = None,
    trust: Sequence[str] | None = None,
    insecure: bool = False,
    on_progress: Callback | None = None,
) -> Op[ImageInfo]:
    body = {"ref": ref, "hub": hub, "trust": list(trust or []), "insecure": insecure}
    done = yield Request(
        "POST",
        f"{API}/images/pull",
        json=body,
        headers={"Accept": NDJSON},
        read_timeout=None,
        consumer=DoneConsumer(on_progress),
    )
    img = done.get("image", done)
    return img  # type: ignore[no-any-return]


@dataclass
class ForkOutcome:
    """The daemon's answer to a fork: the children that came up and the ones that failed."""

    sandboxes: list[SandboxInfo]
    errors: list[ChildError]
    result: dict[str, Any]

    def message(self) -> str:
        req = self.result.get("requested", len(self.sandboxes) + len(self.errors))
        first = self.errors[0]
        return (
            f"{len(self.errors)} of {req} children of {self.result.get('image', '?')} failed; "
            f"first: child {first.index}: {first.message}"
        )


#: what ``network=`` takes: a :class:`Network`, a dict of its fields, ``True`` (a network
#: with everything denied, as ``{}``) or ``None``/``False`` (no network at all)
NetworkArg = Union[Network, Mapping[str, Any], bool, None]


def network_body(network: NetworkArg) -> dict[str, Any] | None:
    """The request's ``network`` object, ``None`` for no network. The fields are checked by
    the daemon (a bad rule or port raises :class:`BadRequest` naming it)."""
    if network is None or network is False:
        return None
    if network is True:
        return {}
    if isinstance(network, Network):
        return network.to_json()
    if isinstance(network, Mapping):
        return {
            str(k): list(v) if isinstance(v, (tuple, set, frozenset)) else v
            for k, v in network.items()
        }
    raise TypeError(
        f"network must be a forkd.Network, a dict or True, not {type(network).__name__}"
    )


def op_fork(
    image: str,
    count: int = 1,
    env: Mapping[str, str] | None = None,
    ttl_s: float | None = None,
    labels: Mapping[str, str] | None = None,
    memory_mib: int | None = None,
    on_progress: Callback | None = None,
    on_child: Callback | None = None,
    network: NetworkArg = None,
) -> Op[ForkOutcome]:
    body: dict[str, Any] = {
        "image": image,
        "count": int(count),
        "env": dict(env or {}),
        "ttl_s": None if ttl_s is None else _secs(ttl_s),
        "labels": dict(labels or {}),
        "memory_mib": memory_mib,
    }
    net = network_body(network)
    if net is not None:
        # only when asked for: a daemon without networks refuses the unknown field
        body["network"] = net
    # stream (NDJSON) only when someone listens to the progress: the plain answer reports a
    # refused request with its own HTTP status
    streamed = on_progress is not None or on_child is not None
    res = yield Request(
        "POST",
        f"{API}/sandboxes",
        json=body,
        headers={"Accept": NDJSON if streamed else "application/json"},
        read_timeout=None,
        consumer=DoneConsumer(on_progress, on_child),
    )
    # the done event carries the plain answer's fields, either inline or under "result"
    if isinstance(res.get("result"), dict) and "results" not in res:
        res = res["result"]
    res = {k: v for k, v in res.items() if k != "event"}
    sandboxes: list[SandboxInfo] = []
    errors: list[ChildError] = []
    for i, item in enumerate(res.get("results") or []):
        idx = int(item.get("index", i))
        if item.get("sandbox"):
            sandboxes.append(item["sandbox"])
        else:
            err = item.get("error") or {"message": "no sandbox and no error in the answer"}
            e = error_from_json(err, index=idx)
            assert isinstance(e, ChildError)
            errors.append(e)
    return ForkOutcome(sandboxes, errors, res)


def op_list(label: Mapping[str, str] | None = None) -> Op[list[SandboxInfo]]:
    params = [("label", f"{k}={v}") for k, v in (label or {}).items()]
    j = yield from _json(Request("GET", f"{API}/sandboxes", params=params))
    return list(j.get("sandboxes", [])) if isinstance(j, dict) else []


def op_get(sid: str) -> Op[SandboxInfo]:
    return _json(Request("GET", _sb(sid)))


def op_kill(sid: str) -> Op[bool]:
    """True if the sandbox was killed now, False if it was already gone."""
    try:
        yield Request("DELETE", _sb(sid))
    except NotFound:
        return False
    return True


def op_pause(sid: str) -> Op[SandboxInfo]:
    return _json(Request("POST", f"{_sb(sid)}/pause"))


def op_resume(sid: str) -> Op[SandboxInfo]:
    return _json(Request("POST", f"{_sb(sid)}/resume"))


def op_snapshot(sid: str, tag: str, force: bool = False) -> Op[BranchInfo]:
    return _json(
        Request(
            "POST",
            f"{_sb(sid)}/snapshot",
            json={"tag": tag, "force": force},
            read_timeout=600.0,
        )
    )


def branch_tag(image: str) -> str:
    """A fresh tag for a branch of a sandbox of ``image`` (``OWNER/NAME:V`` → ``NAME-br-…``)."""
    name = image.rsplit("/", 1)[-1].split(":", 1)[0].split("@", 1)[0] or "sandbox"
    return f"{name[:80]}-br-{secrets.token_hex(4)}"


def command_body(
    cmd: str | Sequence[str],
    env: Mapping[str, str] | None,
    cwd: str | None,
    stdin: str | bytes | None,
    timeout_s: int,
    background: bool,
) -> dict[str, Any]:
    body: dict[str, Any] = {"background": background, "timeout_s": timeout_s}
    if isinstance(cmd, str):
        body["cmd"] = cmd
    else:
        body["argv"] = [str(a) for a in cmd]
        if not body["argv"]:
            raise ValueError("argv must not be empty")
    if env:
        body["env"] = {str(k): str(v) for k, v in env.items()}
    if cwd is not None:
        body["cwd"] = cwd
    if isinstance(stdin, str):
        body["stdin"] = stdin
    elif stdin is not None:
        body["stdin_data"] = base64.b64encode(bytes(stdin)).decode("ascii")
    return body


def op_run(
    sid: str,
    cmd: str | Sequence[str],
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    stdin: str | bytes | None = None,
    timeout: float | None = DEFAULT_COMMAND_TIMEOUT_S,
    on_stdout: Callback | None = None,
    on_stderr: Callback | None = None,
) -> Op[CommandResult]:
    t = _secs(timeout, none=MAX_TIMEOUT_S)
    result: CommandResult = yield Request(
        "POST",
        f"{_sb(sid)}/commands",
        json=command_body(cmd, env, cwd, stdin, t, False),
        headers={"Accept": NDJSON},
        read_timeout=_stream_timeout(t),
        consumer=CommandConsumer(on_stdout, on_stderr),
    )
    return result


def op_start(
    sid: str,
    cmd: str | Sequence[str],
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    stdin: str | bytes | None = None,
    timeout: float | None = None,
) -> Op[dict[str, Any]]:
    """Start a background command: ``{"command_id", "pid"}``."""
    body = command_body(cmd, env, cwd, stdin, _secs(timeout), True)
    return _json(Request("POST", f"{_sb(sid)}/commands", json=body))


def _cmd(sid: str, cid: str) -> str:
    return f"{_sb(sid)}/commands/{quote(cid, safe='')}"


def op_commands(sid: str) -> Op[list[CommandStatus]]:
    j = yield from _json(Request("GET", f"{_sb(sid)}/commands"))
    return list(j.get("commands", [])) if isinstance(j, dict) else []


def op_command_status(sid: str, cid: str) -> Op[CommandStatus]:
    return _json(Request("GET", _cmd(sid, cid)))


def op_command_output(sid: str, cid: str) -> Op[CommandOutput]:
    j = yield from _json(Request("GET", f"{_cmd(sid, cid)}/output"))
    return CommandOutput.from_json(j or {})


def op_wait(sid: str, cid: str, timeout: float | None = None) -> Op[CommandResult]:
    """Wait until the command exits (``timeout=None``: however long it takes; else raise
    :class:`TimeoutError_` after ``timeout`` s), then fetch its output."""
    while True:
        slice_s = WAIT_SLICE_S if timeout is None else _secs(timeout)
        req = Request(
            "POST",
            f"{_cmd(sid, cid)}/wait",
            params=[("timeout_s", str(slice_s))],
            read_timeout=slice_s + STREAM_MARGIN_S,
        )
        try:
            status = yield from _json(req)
        except TimeoutError_ as e:
            if timeout is None and e.status == 504:
                continue
            raise
        if isinstance(status, dict) and status.get("running"):
            if timeout is None:
                continue
            raise TimeoutError_(f"command {cid} still running after {timeout} s", status=504)
        break
    out = yield from op_command_output(sid, cid)
    return CommandResult(
        exit_code=status.get("exit_code"),
        stdout_bytes=out.stdout_bytes,
        stderr_bytes=out.stderr_bytes,
        signal=status.get("signal"),
        timed_out=bool(status.get("timed_out")),
        duration_ms=status.get("duration_ms"),
        pid=status.get("pid"),
        command_id=cid,
    )


def op_signal(sid: str, cid: str, sig: int) -> Op[None]:
    return _none(Request("POST", f"{_cmd(sid, cid)}/signal", json={"signal": int(sig)}))


def op_run_code(sid: str, code: str, timeout: float | None = 60) -> Op[str]:
    t = _secs(timeout, none=MAX_TIMEOUT_S)
    j = yield from _json(
        Request(
            "POST",
            f"{_sb(sid)}/run",
            json={"code": code, "timeout_s": t},
            read_timeout=_stream_timeout(t),
        )
    )
    if not isinstance(j, dict):
        raise ProtocolError(f"unexpected answer to run: {str(j)[:200]}")
    return str(j.get("output", ""))


def _file_req(method: str, sid: str, suffix: str, path: str, **params: Any) -> Request:
    if not path.startswith("/"):
        raise ValueError(f"guest paths are absolute: {path!r}")
    q = [("path", path)] + [(k, str(v)) for k, v in params.items() if v is not None]
    return Request(method, f"{_sb(sid)}/files{suffix}", params=q)


def op_write(sid: str, path: str, data: Any, mode: int | str | None = None) -> Op[WriteInfo]:
    if isinstance(mode, int):
        mode = format(mode, "04o")
    req = _file_req("PUT", sid, "", path, mode=mode)
    req.content = upload_body(data)
    req.headers["Content-Type"] = "application/octet-stream"
    req.read_timeout = None
    j = yield from _json(req)
    j = j if isinstance(j, dict) else {}
    return WriteInfo(path=str(j.get("path", path)), size=int(j.get("size") or 0))


def read_request(sid: str, path: str) -> Request:
    """The download request; executors stream its body (``files.read_stream``)."""
    req = _file_req("GET", sid, "", path)
    req.read_timeout = None
    return req


def op_read(sid: str, path: str) -> Op[bytes]:
    r = yield read_request(sid, path)
    return r.body  # type: ignore[no-any-return]


def op_list_dir(sid: str, path: str) -> Op[list[FileEntry]]:
    j = yield from _json(_file_req("GET", sid, "/list", path))
    entries = j.get("entries", []) if isinstance(j, dict) else []
    return [FileEntry.from_json(e) for e in entries]


def op_stat(sid: str, path: str) -> Op[FileEntry]:
    j = yield from _json(_file_req("GET", sid, "/stat", path))
    return FileEntry.from_json(j or {})


def op_exists(sid: str, path: str) -> Op[bool]:
    """``stat`` that answers False for a missing path instead of raising."""
    try:
        yield from op_stat(sid, path)
    except NotFound:
        return False
    except GuestError as e:
        if e.guest_code in ("enoent", "not_found"):
            return False
        raise
    return True


def op_mkdir(sid: str, path: str, parents: bool = True) -> Op[None]:
    return _none(_file_req("POST", sid, "/mkdir", path, parents="true" if parents else None))


def op_remove(sid: str, path: str, recursive: bool = False) -> Op[None]:
    return _none(_file_req("DELETE", sid, "", path, recursive="true" if recursive else None))


class SandboxView:
    """What a sandbox object knows of itself from its last description; shared by the sync
    :class:`forkd.Sandbox` and :class:`forkd.AsyncSandbox`."""

    info: SandboxInfo

    @property
    def id(self) -> str:
        return self.info["id"]

    @property
    def state(self) -> str:
        """``running``, ``paused`` or ``stopped``, as of the last call that returned it."""
        return self.info.get("state", "")

    @property
    def image(self) -> str:
        return self.info.get("image", "")

    @property
    def net(self) -> bool:
        """Whether the sandbox has a network (it was created with ``network=``)."""
        return bool(self.info.get("net", False))

    @property
    def ports(self) -> list[PortMapping]:
        """The exposed guest ports (``network={"expose": [...]}``) and the host ports on
        127.0.0.1 that reach them."""
        return [PortMapping.from_json(p) for p in self.info.get("ports") or []]

    def host_port(self, guest_port: int) -> int:
        """The host port (on the daemon host's 127.0.0.1) that reaches ``guest_port`` in the
        sandbox. ``KeyError`` (with the exposed ports) if that guest port is not exposed."""
        for p in self.ports:
            if p.guest == int(guest_port):
                return p.host
        exposed = ", ".join(str(p.guest) for p in self.ports) or "none"
        why = "" if self.net else "; the sandbox has no network at all"
        raise PortNotExposed(
            f"guest port {guest_port} of sandbox {self.id} is not exposed (exposed guest "
            f"ports: {exposed}{why}); create the sandbox with "
            f"network={{'expose': [{int(guest_port)}]}} to reach it from the host"
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(id={self.id!r}, state={self.state!r})"
