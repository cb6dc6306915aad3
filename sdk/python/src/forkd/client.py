"""The blocking client: :class:`Client`, :class:`Sandbox` and what hangs off a sandbox.

Each method describes its call with an operation from ``forkd._core`` and runs it with
:class:`_Executor`, which carries the requests over ``httpx.Client``.
"""

from __future__ import annotations

import contextlib
import json
import os
from types import TracebackType
from typing import Any, Callable, Iterator, Literal, Mapping, Sequence, overload

import httpx

from . import _core as core
from ._core import (
    DEFAULT_COMMAND_TIMEOUT_S,
    DEFAULT_TIMEOUT_S,
    NetworkArg,
    Op,
    Request,
    Response,
    T,
    Target,
)
from .errors import DaemonUnavailable, ForkdError, ForkError, ProtocolError, TimeoutError_
from .models import (
    BranchInfo,
    CommandOutput,
    CommandResult,
    CommandStatus,
    FileEntry,
    Health,
    ImageInfo,
    SandboxInfo,
    WriteInfo,
)

__all__ = ["Client", "Sandbox", "Commands", "CommandHandle", "Files", "ByteStream"]


#: what a request sent on a keep-alive connection the daemon just closed fails with
STALE_CONNECTION = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)


def transport_error(e: httpx.TransportError, target: Target) -> ForkdError:
    """A ``ForkdError`` for an httpx failure (shared with the asyncio client)."""
    if isinstance(e, httpx.TimeoutException):
        return TimeoutError_(
            f"no answer from the daemon at {target.describe()} in time ({type(e).__name__})",
            hint="raise the client's timeout, or the call's own timeout",
        )
    if isinstance(e, (httpx.ConnectError, httpx.UnsupportedProtocol)):
        hint = (
            "start the daemon: forkd serve (it listens on $FORKD_HOME/forkd.sock), or set "
            "FORKD_URL / FORKD_HOME"
        )
        return DaemonUnavailable(
            f"cannot reach the forkd daemon at {target.describe()}: {e}", hint=hint
        )
    return ProtocolError(f"the connection to the daemon at {target.describe()} broke: {e!r}")


def http_timeout(default: float | None, req: Request) -> httpx.Timeout:
    if req.read_timeout is core.DEFAULT:
        return httpx.Timeout(default)
    return httpx.Timeout(default, read=req.read_timeout, write=req.read_timeout)


class _Executor:
    """Runs ``_core`` operations over a blocking ``httpx.Client``."""

    def __init__(self, target: Target, timeout: float | None) -> None:
        self.target = target
        self.timeout = timeout
        transport = httpx.HTTPTransport(uds=target.uds) if target.uds else None
        self.http = httpx.Client(
            base_url=target.base_url,
            transport=transport,
            headers=core.auth_headers(target),
            timeout=timeout,
        )

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except httpx.TransportError as e:
            raise transport_error(e, self.target) from e

    def _build(self, req: Request) -> httpx.Request:
        kw = req.httpx_kwargs()
        if req.content is not None:
            kw["content"] = req.content
        kw["timeout"] = http_timeout(self.timeout, req)
        return self.http.build_request(**kw)

    def _open(self, req: Request) -> httpx.Response:
        """Send and return the response with its body unread; raise the error if it is one."""
        with self._errors():
            try:
                resp = self.http.send(self._build(req), stream=True)
            except STALE_CONNECTION:
                if not req.idempotent:
                    raise
                resp = self.http.send(self._build(req), stream=True)
            if resp.status_code >= 400:
                try:
                    body = resp.read()
                finally:
                    resp.close()
                raise core.error_from_response(resp.status_code, body, resp.reason_phrase)
        return resp

    def execute(self, req: Request) -> Any:
        resp = self._open(req)
        with self._errors(), contextlib.closing(resp):
            if req.consumer is None:
                return Response(resp.status_code, resp.headers, resp.read())
            c = req.consumer
            if core.is_ndjson(resp.headers.get("content-type")):
                for line in resp.iter_lines():
                    ev = core.parse_ndjson_line(line)
                    if ev is not None:
                        for cb, arg in c.on_event(ev):
                            cb(arg)
            else:
                body = resp.read()
                for cb, arg in c.on_body(json.loads(body) if body else None):
                    cb(arg)
            return c.finish()

    def run(self, op: Op[T]) -> T:
        try:
            req = next(op)
            while True:
                try:
                    res = self.execute(req)
                except ForkdError as e:
                    req = op.throw(e)
                    continue
                req = op.send(res)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]

    def stream(self, req: Request) -> ByteStream:
        return ByteStream(self._open(req), self)

    def close(self) -> None:
        self.http.close()


class ByteStream:
    """A download in progress: iterate it for ``bytes`` chunks; closes itself at the end (or
    use it as a context manager / call :meth:`close` to stop early)."""

    def __init__(self, resp: httpx.Response, ex: _Executor) -> None:
        self._resp = resp
        self._ex = ex

    def __iter__(self) -> Iterator[bytes]:
        with self._ex._errors(), contextlib.closing(self._resp):
            yield from self._resp.iter_bytes(core.CHUNK)

    def close(self) -> None:
        self._resp.close()

    def __enter__(self) -> ByteStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Client:
    """A connection to a forkd daemon.

    ``Client()`` finds the local daemon: ``$FORKD_URL`` (with ``$FORKD_TOKEN``) if set, else the
    unix socket ``$FORKD_HOME/forkd.sock`` (``FORKD_HOME`` defaults to
    ``$XDG_DATA_HOME/forkd``, i.e. ``~/.local/share/forkd``). ``Client("http://host:7070",
    token=...)`` talks TCP; ``Client("unix:/path/forkd.sock")`` or ``Client(home=...)`` name a
    socket. ``timeout`` (seconds) applies to plain calls; streams (fork, pull, commands, file
    transfers) have their own.
    """

    def __init__(
        self,
        url: str | os.PathLike[str] | None = None,
        token: str | None = None,
        *,
        home: str | os.PathLike[str] | None = None,
        timeout: float | None = DEFAULT_TIMEOUT_S,
    ) -> None:
        self.target = core.resolve_target(url, token, home)
        self._ex = _Executor(self.target, timeout)

    def __repr__(self) -> str:
        return f"Client({self.target.describe()!r})"

    def _run(self, op: Op[T]) -> T:
        return self._ex.run(op)

    # -- daemon -------------------------------------------------------------------------------

    def health(self) -> Health:
        """``{"status": "ok", "version", "sandboxes", "uptime_s"}``."""
        return self._run(core.op_health())

    def images(self) -> list[ImageInfo]:
        """The images in the daemon's local store."""
        return self._run(core.op_images())

    def pull(
        self,
        ref: str,
        *,
        hub: str | None = None,
        trust: Sequence[str] | None = None,
        insecure: bool = False,
        on_progress: Callable[[dict[str, Any]], Any] | None = None,
    ) -> ImageInfo:
        """Pull ``OWNER/NAME[:VERSION]`` from a hub into the store; ``on_progress`` gets each
        ``{"event": "progress", "phase", "done", "total"}``. Returns the image."""
        return self._run(core.op_pull(ref, hub, trust, insecure, on_progress))

    # -- sandboxes ----------------------------------------------------------------------------

    def fork(
        self,
        image: str,
        count: int = 1,
        *,
        env: Mapping[str, str] | None = None,
        ttl_s: float | None = None,
        labels: Mapping[str, str] | None = None,
        memory_mib: int | None = None,
        network: NetworkArg = None,
        on_progress: Callable[[dict[str, Any]], Any] | None = None,
    ) -> list[Sandbox]:
        """Fork ``count`` children of ``image`` (a local tag, or ``OWNER/NAME[:VERSION]``,
        pulled first if missing).

        ``env`` applies to every command run in them (a command's own ``env`` wins); ``ttl_s``
        kills them that many seconds after creation. If any child fails, raises
        :class:`ForkError` whose ``sandboxes`` are the children that did start (still running)
        and ``errors`` the failures. A request that fails as a whole raises its own error
        (``NotFound`` for an unknown image, ``CapacityError``...) and starts nothing.
        """
        out = self._run(
            core.op_fork(image, count, env, ttl_s, labels, memory_mib, on_progress, network=network)
        )
        sbs = [Sandbox(self, info) for info in out.sandboxes]
        if out.errors:
            raise ForkError(out.message(), sandboxes=sbs, errors=out.errors, result=out.result)
        return sbs

    def create(
        self,
        image: str,
        *,
        env: Mapping[str, str] | None = None,
        ttl_s: float | None = None,
        labels: Mapping[str, str] | None = None,
        memory_mib: int | None = None,
        network: NetworkArg = None,
        on_progress: Callable[[dict[str, Any]], Any] | None = None,
    ) -> Sandbox:
        """One child: ``fork(image, 1, ...)[0]``."""
        return self.fork(
            image,
            1,
            env=env,
            ttl_s=ttl_s,
            labels=labels,
            memory_mib=memory_mib,
            network=network,
            on_progress=on_progress,
        )[0]

    def get(self, sandbox_id: str) -> Sandbox:
        """The sandbox ``sandbox_id`` (``NotFound`` if there is none)."""
        return Sandbox(self, self._run(core.op_get(sandbox_id)))

    def list(self, label: Mapping[str, str] | None = None) -> list[Sandbox]:
        """All sandboxes, or those whose labels include every ``label`` pair."""
        return [Sandbox(self, i) for i in self._run(core.op_list(label))]

    def kill(self, sandbox_id: str) -> bool:
        """Kill a sandbox; False if it was already gone."""
        return self._run(core.op_kill(sandbox_id))

    # -- lifetime -----------------------------------------------------------------------------

    def close(self) -> None:
        self._ex.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Sandbox(core.SandboxView):
    """One running child. Get one with :meth:`create`, :meth:`Client.fork`,
    :meth:`Client.get` or :meth:`connect`. As a context manager it is killed on exit."""

    def __init__(self, client: Client, info: SandboxInfo, *, owns_client: bool = False) -> None:
        self.client = client
        #: the sandbox as the daemon last described it (see :meth:`refresh`)
        self.info: SandboxInfo = info
        self.commands = Commands(self)
        self.files = Files(self)
        self._owns_client = owns_client

    @classmethod
    def create(
        cls,
        image: str,
        client: Client | None = None,
        *,
        env: Mapping[str, str] | None = None,
        ttl_s: float | None = None,
        labels: Mapping[str, str] | None = None,
        memory_mib: int | None = None,
        network: NetworkArg = None,
        on_progress: Callable[[dict[str, Any]], Any] | None = None,
    ) -> Sandbox:
        """Fork one child of ``image``. With no ``client`` a ``Client()`` for the local daemon
        is made and closed when the sandbox is killed."""
        own = client is None
        c = client if client is not None else Client()
        try:
            sb = c.create(
                image,
                env=env,
                ttl_s=ttl_s,
                labels=labels,
                memory_mib=memory_mib,
                network=network,
                on_progress=on_progress,
            )
        except BaseException:
            if own:
                c.close()
            raise
        sb._owns_client = own
        return sb

    @classmethod
    def connect(cls, sandbox_id: str, client: Client | None = None) -> Sandbox:
        """A handle on an existing sandbox."""
        own = client is None
        c = client if client is not None else Client()
        try:
            info = c._run(core.op_get(sandbox_id))
        except BaseException:
            if own:
                c.close()
            raise
        return cls(c, info, owns_client=own)

    def refresh(self) -> SandboxInfo:
        """Fetch the sandbox again; returns (and keeps) the new ``info``."""
        self.info = self.client._run(core.op_get(self.id))
        return self.info

    def pause(self) -> Sandbox:
        """Stop the vCPUs; commands and file calls get ``Conflict`` until :meth:`resume`."""
        self.info = self.client._run(core.op_pause(self.id))
        return self

    def resume(self) -> Sandbox:
        self.info = self.client._run(core.op_resume(self.id))
        return self

    def snapshot(self, tag: str | None = None, *, force: bool = False) -> BranchInfo:
        """Save this sandbox, running, as the image ``tag`` (a fresh name if ``None``): a branch
        that stores only what changed since the image it was forked from. The sandbox is paused
        only while its state is read and runs on. Fork the returned ``tag`` like any image.
        ``Conflict`` if it is paused, busy (a command runs) or the tag exists (unless ``force``).
        """
        return self.client._run(core.op_snapshot(self.id, tag or core.branch_tag(self.image), force))

    def branch(
        self,
        count: int = 1,
        *,
        tag: str | None = None,
        env: Mapping[str, str] | None = None,
        ttl_s: float | None = None,
        labels: Mapping[str, str] | None = None,
        network: NetworkArg = None,
    ) -> list[Sandbox]:
        """:meth:`snapshot` then fork ``count`` children of it: each starts from this sandbox's
        state now (memory, processes, files), and they are independent of it and of each other.
        The branch image stays in the store (``tag``, or the generated one in each child's
        ``image``)."""
        b = self.snapshot(tag)
        return self.client.fork(
            b["tag"], count, env=env, ttl_s=ttl_s, labels=labels, network=network
        )

    def kill(self) -> bool:
        """Kill the sandbox (its QEMU, sockets and overlay go). False if it was already gone."""
        try:
            gone = self.client._run(core.op_kill(self.id))
            self.info = {**self.info, "state": "stopped"}
            return gone
        finally:
            if self._owns_client:
                self.client.close()

    def run_code(self, code: str, timeout: float | None = 60) -> str:
        """Run ``code`` in the image's warm worker (Python with numpy imported, a shell, ...;
        it keeps its state between calls) and return its output."""
        return self.client._run(core.op_run_code(self.id, code, timeout))

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.kill()


class CommandHandle:
    """A background command. Its output is kept by the daemon until the sandbox goes."""

    def __init__(self, sandbox: Sandbox, command_id: str, pid: int | None) -> None:
        self.sandbox = sandbox
        self.command_id = command_id
        self.pid = pid

    @property
    def id(self) -> str:
        return self.command_id

    def __repr__(self) -> str:
        return (
            f"CommandHandle(sandbox={self.sandbox.id!r}, id={self.command_id!r}, pid={self.pid!r})"
        )

    def _run(self, op: Op[T]) -> T:
        return self.sandbox.client._run(op)

    def wait(self, timeout: float | None = None) -> CommandResult:
        """Wait for the command to exit and return its result with its kept output.
        ``timeout`` (s): raise :class:`TimeoutError_` if it is still running by then
        (``None``: wait however long it takes). A non-zero exit is returned, not raised."""
        return self._run(core.op_wait(self.sandbox.id, self.command_id, timeout))

    def output(self) -> CommandOutput:
        """The output so far (the command may still be running)."""
        return self._run(core.op_command_output(self.sandbox.id, self.command_id))

    def status(self) -> CommandStatus:
        return self._run(core.op_command_status(self.sandbox.id, self.command_id))

    def signal(self, sig: int = 15) -> None:
        """Send a signal (a number: 15 = SIGTERM, ``signal.SIGINT``...) to the command."""
        self._run(core.op_signal(self.sandbox.id, self.command_id, int(sig)))

    def kill(self) -> None:
        """SIGKILL."""
        self.signal(9)


class Commands:
    """``sandbox.commands``: run processes in the guest."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._sb = sandbox

    @overload
    def run(
        self,
        cmd: str | Sequence[str],
        *,
        env: Mapping[str, str] | None = ...,
        cwd: str | None = ...,
        stdin: str | bytes | None = ...,
        timeout: float | None = ...,
        on_stdout: Callable[[str], Any] | None = ...,
        on_stderr: Callable[[str], Any] | None = ...,
        background: Literal[False] = ...,
    ) -> CommandResult: ...

    @overload
    def run(
        self,
        cmd: str | Sequence[str],
        *,
        env: Mapping[str, str] | None = ...,
        cwd: str | None = ...,
        stdin: str | bytes | None = ...,
        timeout: float | None = ...,
        on_stdout: None = ...,
        on_stderr: None = ...,
        background: Literal[True],
    ) -> CommandHandle: ...

    def run(
        self,
        cmd: str | Sequence[str],
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: str | bytes | None = None,
        timeout: float | None = DEFAULT_COMMAND_TIMEOUT_S,
        on_stdout: Callable[[str], Any] | None = None,
        on_stderr: Callable[[str], Any] | None = None,
        background: bool = False,
    ) -> CommandResult | CommandHandle:
        """Run ``cmd`` (a string for ``/bin/sh -c``, or an argv list) and return its
        :class:`CommandResult` once it exits. A non-zero exit code is returned, not raised;
        daemon errors (paused sandbox, unknown sandbox...) raise.

        ``env`` adds to (and wins over) the sandbox's env, ``stdin`` is text or bytes,
        ``timeout`` (s) kills the command (``None``: no limit). ``on_stdout``/``on_stderr``
        get each chunk of output as text as it arrives; if one raises, the stream is dropped
        and the daemon kills the command.

        ``background=True`` returns a :class:`CommandHandle` at once instead; ``timeout``
        still applies (pass ``None`` for a command that runs until killed).
        """
        if background:
            if on_stdout is not None or on_stderr is not None:
                raise ValueError(
                    "background commands have no live output: use handle.output() / wait()"
                )
            j = self._sb.client._run(core.op_start(self._sb.id, cmd, env, cwd, stdin, timeout))
            return CommandHandle(self._sb, str(j["command_id"]), j.get("pid"))
        return self._sb.client._run(
            core.op_run(self._sb.id, cmd, env, cwd, stdin, timeout, on_stdout, on_stderr)
        )

    def list(self) -> list[CommandStatus]:
        """The sandbox's background commands."""
        return self._sb.client._run(core.op_commands(self._sb.id))

    def connect(self, command_id: str) -> CommandHandle:
        """A handle on a background command started earlier."""
        st = self._sb.client._run(core.op_command_status(self._sb.id, command_id))
        return CommandHandle(self._sb, command_id, st.get("pid"))


class Files:
    """``sandbox.files``: the guest's filesystem (absolute paths)."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._sb = sandbox

    def _run(self, op: Op[T]) -> T:
        return self._sb.client._run(op)

    def write(self, path: str, data: Any, mode: int | str | None = None) -> WriteInfo:
        """Write ``data`` to ``path``: ``bytes``, ``str`` (UTF-8), a file object (streamed in
        chunks, never read whole) or an iterable of ``bytes``. The file appears whole or not
        at all. ``mode`` e.g. ``0o755``."""
        return self._run(core.op_write(self._sb.id, path, data, mode))

    def read(self, path: str) -> bytes:
        """The file's bytes."""
        return self._run(core.op_read(self._sb.id, path))

    def read_text(self, path: str, encoding: str = "utf-8", errors: str = "replace") -> str:
        return self.read(path).decode(encoding, errors)

    def read_stream(self, path: str) -> ByteStream:
        """Start a download; iterate the result for chunks of bytes (``with`` closes it)."""
        return self._sb.client._ex.stream(core.read_request(self._sb.id, path))

    def iter_bytes(self, path: str) -> Iterator[bytes]:
        """The file's bytes, chunk by chunk."""
        with self.read_stream(path) as s:
            yield from s

    def download(self, path: str, dest: Any) -> int:
        """Copy the guest file into ``dest`` (a local path or a binary file object); returns
        the number of bytes."""
        n = 0
        if isinstance(dest, (str, os.PathLike)):
            with open(dest, "wb") as f:
                return self.download(path, f)
        with self.read_stream(path) as s:
            for chunk in s:
                dest.write(chunk)
                n += len(chunk)
        return n

    def list(self, path: str) -> list[FileEntry]:
        """The entries of the directory ``path``."""
        return self._run(core.op_list_dir(self._sb.id, path))

    def stat(self, path: str) -> FileEntry:
        """The entry for ``path`` (a symlink is described, not followed)."""
        return self._run(core.op_stat(self._sb.id, path))

    def exists(self, path: str) -> bool:
        """Whether ``path`` exists in the guest."""
        return self._run(core.op_exists(self._sb.id, path))

    def mkdir(self, path: str, parents: bool = True) -> None:
        """Make a directory (with its parents unless ``parents=False``)."""
        self._run(core.op_mkdir(self._sb.id, path, parents))

    def remove(self, path: str, recursive: bool = False) -> None:
        """Remove a file, or a directory (``recursive=True`` for a non-empty one)."""
        self._run(core.op_remove(self._sb.id, path, recursive))
