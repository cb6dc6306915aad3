"""The asyncio client: :class:`AsyncClient`, :class:`AsyncSandbox`, mirroring ``forkd.client``.

The calls are the same ``forkd._core`` operations as the blocking client's, run by
:class:`_AsyncExecutor` over ``httpx.AsyncClient``. Callbacks (``on_stdout``, ``on_progress``)
may be plain functions or coroutine functions.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
from types import TracebackType
from typing import (
    Any,
    AsyncIterator,
    Awaitable,
    Callable,
    Generator,
    Literal,
    Mapping,
    Sequence,
    overload,
)

import anyio.to_thread
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
from .client import STALE_CONNECTION, http_timeout, transport_error
from .errors import ForkdError, ForkError
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

__all__ = [
    "AsyncClient",
    "AsyncSandbox",
    "AsyncCommands",
    "AsyncCommandHandle",
    "AsyncFiles",
    "AsyncByteStream",
]


async def _call(cb: Callable[[Any], Any], arg: Any) -> None:
    r = cb(arg)
    if inspect.isawaitable(r):
        await r


async def _from_file(fc: core.FileChunks) -> AsyncIterator[bytes]:
    while True:
        b = await anyio.to_thread.run_sync(fc.read_chunk)
        if not b:
            return
        yield b


async def _from_iter(it: Any) -> AsyncIterator[bytes]:
    for b in it:
        yield b


def _async_content(content: Any) -> Any:
    if content is None or isinstance(content, bytes) or hasattr(content, "__aiter__"):
        return content
    if isinstance(content, core.FileChunks):
        return _from_file(content)
    return _from_iter(content)


class _AsyncExecutor:
    """Runs ``_core`` operations over ``httpx.AsyncClient``."""

    def __init__(self, target: Target, timeout: float | None) -> None:
        self.target = target
        self.timeout = timeout
        transport = httpx.AsyncHTTPTransport(uds=target.uds) if target.uds else None
        self.http = httpx.AsyncClient(
            base_url=target.base_url,
            transport=transport,
            headers=core.auth_headers(target),
            timeout=timeout,
        )

    @contextlib.contextmanager
    def _errors(self) -> Any:
        try:
            yield
        except httpx.TransportError as e:
            raise transport_error(e, self.target) from e

    async def _open(self, req: Request) -> httpx.Response:
        kw = req.httpx_kwargs()
        if req.content is not None:
            kw["content"] = _async_content(req.content)
        kw["timeout"] = http_timeout(self.timeout, req)
        with self._errors():
            try:
                resp = await self.http.send(self.http.build_request(**kw), stream=True)
            except STALE_CONNECTION:
                if not req.idempotent:
                    raise
                resp = await self.http.send(self.http.build_request(**kw), stream=True)
            if resp.status_code >= 400:
                try:
                    body = await resp.aread()
                finally:
                    await resp.aclose()
                raise core.error_from_response(resp.status_code, body, resp.reason_phrase)
        return resp

    async def execute(self, req: Request) -> Any:
        resp = await self._open(req)
        try:
            with self._errors():
                if req.consumer is None:
                    return Response(resp.status_code, resp.headers, await resp.aread())
                c = req.consumer
                if core.is_ndjson(resp.headers.get("content-type")):
                    async for line in resp.aiter_lines():
                        ev = core.parse_ndjson_line(line)
                        if ev is not None:
                            for cb, arg in c.on_event(ev):
                                await _call(cb, arg)
                else:
                    body = await resp.aread()
                    for cb, arg in c.on_body(json.loads(body) if body else None):
                        await _call(cb, arg)
                return c.finish()
        finally:
            await resp.aclose()

    async def run(self, op: Op[T]) -> T:
        try:
            req = next(op)
            while True:
                try:
                    res = await self.execute(req)
                except ForkdError as e:
                    req = op.throw(e)
                    continue
                req = op.send(res)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]

    async def stream(self, req: Request) -> AsyncByteStream:
        return AsyncByteStream(await self._open(req), self)

    async def aclose(self) -> None:
        await self.http.aclose()


class AsyncByteStream:
    """A download in progress: ``async for chunk in stream``; ``async with`` closes it."""

    def __init__(self, resp: httpx.Response, ex: _AsyncExecutor) -> None:
        self._resp = resp
        self._ex = ex

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            with self._ex._errors():
                async for chunk in self._resp.aiter_bytes(core.CHUNK):
                    yield chunk
        finally:
            await self._resp.aclose()

    async def aclose(self) -> None:
        await self._resp.aclose()

    async def __aenter__(self) -> AsyncByteStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class AsyncClient:
    """The asyncio twin of :class:`forkd.Client` (same arguments, same daemon discovery)."""

    def __init__(
        self,
        url: str | os.PathLike[str] | None = None,
        token: str | None = None,
        *,
        home: str | os.PathLike[str] | None = None,
        timeout: float | None = DEFAULT_TIMEOUT_S,
    ) -> None:
        self.target = core.resolve_target(url, token, home)
        self._ex = _AsyncExecutor(self.target, timeout)

    def __repr__(self) -> str:
        return f"AsyncClient({self.target.describe()!r})"

    async def _run(self, op: Op[T]) -> T:
        return await self._ex.run(op)

    async def health(self) -> Health:
        return await self._run(core.op_health())

    async def images(self) -> list[ImageInfo]:
        return await self._run(core.op_images())

    async def pull(
        self,
        ref: str,
        *,
        hub: str | None = None,
        trust: Sequence[str] | None = None,
        insecure: bool = False,
        on_progress: Callable[[dict[str, Any]], Any] | None = None,
    ) -> ImageInfo:
        return await self._run(core.op_pull(ref, hub, trust, insecure, on_progress))

    async def fork(
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
    ) -> list[AsyncSandbox]:
        """See :meth:`forkd.Client.fork`; raises :class:`ForkError` of ``AsyncSandbox``."""
        out = await self._run(
            core.op_fork(image, count, env, ttl_s, labels, memory_mib, on_progress, network=network)
        )
        sbs = [AsyncSandbox(self, info) for info in out.sandboxes]
        if out.errors:
            raise ForkError(out.message(), sandboxes=sbs, errors=out.errors, result=out.result)
        return sbs

    async def create(
        self,
        image: str,
        *,
        env: Mapping[str, str] | None = None,
        ttl_s: float | None = None,
        labels: Mapping[str, str] | None = None,
        memory_mib: int | None = None,
        network: NetworkArg = None,
        on_progress: Callable[[dict[str, Any]], Any] | None = None,
    ) -> AsyncSandbox:
        sbs = await self.fork(
            image,
            1,
            env=env,
            ttl_s=ttl_s,
            labels=labels,
            memory_mib=memory_mib,
            network=network,
            on_progress=on_progress,
        )
        return sbs[0]

    async def get(self, sandbox_id: str) -> AsyncSandbox:
        return AsyncSandbox(self, await self._run(core.op_get(sandbox_id)))

    async def list(self, label: Mapping[str, str] | None = None) -> list[AsyncSandbox]:
        return [AsyncSandbox(self, i) for i in await self._run(core.op_list(label))]

    async def kill(self, sandbox_id: str) -> bool:
        return await self._run(core.op_kill(sandbox_id))

    async def aclose(self) -> None:
        await self._ex.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class _Creating(Awaitable["AsyncSandbox"]):
    """What :meth:`AsyncSandbox.create` returns: ``await`` it for the sandbox, or use it
    directly in ``async with`` (the sandbox is killed on exit)."""

    def __init__(self, coro: Awaitable[AsyncSandbox]) -> None:
        self._coro = coro
        self._sb: AsyncSandbox | None = None

    def __await__(self) -> Generator[Any, None, AsyncSandbox]:
        return self._coro.__await__()

    async def __aenter__(self) -> AsyncSandbox:
        self._sb = await self._coro
        return self._sb

    async def __aexit__(self, *exc: object) -> None:
        if self._sb is not None:
            await self._sb.kill()


class AsyncSandbox(core.SandboxView):
    """The asyncio twin of :class:`forkd.Sandbox`."""

    def __init__(
        self, client: AsyncClient, info: SandboxInfo, *, owns_client: bool = False
    ) -> None:
        self.client = client
        self.info: SandboxInfo = info
        self.commands = AsyncCommands(self)
        self.files = AsyncFiles(self)
        self._owns_client = owns_client

    @classmethod
    def create(
        cls,
        image: str,
        client: AsyncClient | None = None,
        *,
        env: Mapping[str, str] | None = None,
        ttl_s: float | None = None,
        labels: Mapping[str, str] | None = None,
        memory_mib: int | None = None,
        network: NetworkArg = None,
        on_progress: Callable[[dict[str, Any]], Any] | None = None,
    ) -> _Creating:
        """``sb = await AsyncSandbox.create(image)`` or ``async with AsyncSandbox.create(image)
        as sb:``. With no ``client`` an ``AsyncClient()`` is made and closed on kill."""

        async def make() -> AsyncSandbox:
            own = client is None
            c = client if client is not None else AsyncClient()
            try:
                sb = await c.create(
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
                    await c.aclose()
                raise
            sb._owns_client = own
            return sb

        return _Creating(make())

    @classmethod
    async def connect(cls, sandbox_id: str, client: AsyncClient | None = None) -> AsyncSandbox:
        own = client is None
        c = client if client is not None else AsyncClient()
        try:
            info = await c._run(core.op_get(sandbox_id))
        except BaseException:
            if own:
                await c.aclose()
            raise
        return cls(c, info, owns_client=own)

    async def refresh(self) -> SandboxInfo:
        self.info = await self.client._run(core.op_get(self.id))
        return self.info

    async def pause(self) -> AsyncSandbox:
        self.info = await self.client._run(core.op_pause(self.id))
        return self

    async def resume(self) -> AsyncSandbox:
        self.info = await self.client._run(core.op_resume(self.id))
        return self

    async def snapshot(self, tag: str | None = None, *, force: bool = False) -> BranchInfo:
        """See :meth:`forkd.Sandbox.snapshot`."""
        return await self.client._run(
            core.op_snapshot(self.id, tag or core.branch_tag(self.image), force)
        )

    async def branch(
        self,
        count: int = 1,
        *,
        tag: str | None = None,
        env: Mapping[str, str] | None = None,
        ttl_s: float | None = None,
        labels: Mapping[str, str] | None = None,
        network: NetworkArg = None,
    ) -> list[AsyncSandbox]:
        """See :meth:`forkd.Sandbox.branch`."""
        b = await self.snapshot(tag)
        return await self.client.fork(
            b["tag"], count, env=env, ttl_s=ttl_s, labels=labels, network=network
        )

    async def kill(self) -> bool:
        try:
            gone = await self.client._run(core.op_kill(self.id))
            self.info = {**self.info, "state": "stopped"}
            return gone
        finally:
            if self._owns_client:
                await self.client.aclose()

    async def run_code(self, code: str, timeout: float | None = 60) -> str:
        return await self.client._run(core.op_run_code(self.id, code, timeout))

    async def __aenter__(self) -> AsyncSandbox:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.kill()


class AsyncCommandHandle:
    """The asyncio twin of :class:`forkd.CommandHandle`."""

    def __init__(self, sandbox: AsyncSandbox, command_id: str, pid: int | None) -> None:
        self.sandbox = sandbox
        self.command_id = command_id
        self.pid = pid

    @property
    def id(self) -> str:
        return self.command_id

    def __repr__(self) -> str:
        return (
            f"AsyncCommandHandle(sandbox={self.sandbox.id!r}, id={self.command_id!r}, "
            f"pid={self.pid!r})"
        )

    async def _run(self, op: Op[T]) -> T:
        return await self.sandbox.client._run(op)

    async def wait(self, timeout: float | None = None) -> CommandResult:
        return await self._run(core.op_wait(self.sandbox.id, self.command_id, timeout))

    async def output(self) -> CommandOutput:
        return await self._run(core.op_command_output(self.sandbox.id, self.command_id))

    async def status(self) -> CommandStatus:
        return await self._run(core.op_command_status(self.sandbox.id, self.command_id))

    async def signal(self, sig: int = 15) -> None:
        await self._run(core.op_signal(self.sandbox.id, self.command_id, int(sig)))

    async def kill(self) -> None:
        await self.signal(9)


class AsyncCommands:
    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._sb = sandbox

    @overload
    async def run(
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
    async def run(
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
    ) -> AsyncCommandHandle: ...

    async def run(
        self,
        cmd: str | Sequence[str],
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: str | bytes | None = None,
        timeout: float | None = DEFAULT_COMMAND_TIMEOUT_S,
        on_stdout: Callable[[str], Any] | None = None,
        on_stderr: Callable[[str], Any] | None = None,
        background: bool = False,
    ) -> CommandResult | AsyncCommandHandle:
        """See :meth:`forkd.client.Commands.run`; callbacks may be coroutine functions."""
        if background:
            if on_stdout is not None or on_stderr is not None:
                raise ValueError(
                    "background commands have no live output: use handle.output() / wait()"
                )
            j = await self._sb.client._run(
                core.op_start(self._sb.id, cmd, env, cwd, stdin, timeout)
            )
            return AsyncCommandHandle(self._sb, str(j["command_id"]), j.get("pid"))
        return await self._sb.client._run(
            core.op_run(self._sb.id, cmd, env, cwd, stdin, timeout, on_stdout, on_stderr)
        )

    async def list(self) -> list[CommandStatus]:
        return await self._sb.client._run(core.op_commands(self._sb.id))

    async def connect(self, command_id: str) -> AsyncCommandHandle:
        st = await self._sb.client._run(core.op_command_status(self._sb.id, command_id))
        return AsyncCommandHandle(self._sb, command_id, st.get("pid"))


class AsyncFiles:
    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._sb = sandbox

    async def _run(self, op: Op[T]) -> T:
        return await self._sb.client._run(op)

    async def write(self, path: str, data: Any, mode: int | str | None = None) -> WriteInfo:
        """See :meth:`forkd.client.Files.write`; ``data`` may also be an async iterable of
        bytes. File objects are read in a worker thread, chunk by chunk."""
        return await self._run(core.op_write(self._sb.id, path, data, mode))

    async def read(self, path: str) -> bytes:
        return await self._run(core.op_read(self._sb.id, path))

    async def read_text(self, path: str, encoding: str = "utf-8", errors: str = "replace") -> str:
        return (await self.read(path)).decode(encoding, errors)

    async def read_stream(self, path: str) -> AsyncByteStream:
        return await self._sb.client._ex.stream(core.read_request(self._sb.id, path))

    async def iter_bytes(self, path: str) -> AsyncIterator[bytes]:
        s = await self.read_stream(path)
        async with s:
            async for chunk in s:
                yield chunk

    async def download(self, path: str, dest: Any) -> int:
        if isinstance(dest, (str, os.PathLike)):
            with open(dest, "wb") as f:
                return await self.download(path, f)
        n = 0
        async for chunk in self.iter_bytes(path):
            dest.write(chunk)
            n += len(chunk)
        return n

    async def list(self, path: str) -> list[FileEntry]:
        return await self._run(core.op_list_dir(self._sb.id, path))

    async def stat(self, path: str) -> FileEntry:
        """The entry for ``path`` (a symlink is described, not followed)."""
        return await self._run(core.op_stat(self._sb.id, path))

    async def exists(self, path: str) -> bool:
        """Whether ``path`` exists in the guest."""
        return await self._run(core.op_exists(self._sb.id, path))

    async def mkdir(self, path: str, parents: bool = True) -> None:
        await self._run(core.op_mkdir(self._sb.id, path, parents))

    async def remove(self, path: str, recursive: bool = False) -> None:
        await self._run(core.op_remove(self._sb.id, path, recursive))
