"""The exceptions the SDK raises.

Every error that comes from the daemon (an HTTP status with ``{"error": {"code", "message",
"hint"}}``) is raised as a subclass of :class:`ForkdError`, chosen by its ``code``; the status
and the hint are kept on the exception. A command that exits non-zero is *not* an error: see
:class:`forkd.CommandResult`.
"""

from __future__ import annotations

import builtins
from typing import Any, Generic, Mapping, TypeVar

__all__ = [
    "ForkdError",
    "BadRequest",
    "Unauthorized",
    "NotFound",
    "Conflict",
    "TooLarge",
    "CapacityError",
    "InternalError",
    "GuestError",
    "TimeoutError_",
    "DaemonUnavailable",
    "ProtocolError",
    "ForkError",
    "ChildError",
    "PortNotExposed",
]


class ForkdError(Exception):
    """Base class of every error the SDK raises.

    ``code`` is the daemon's stable error code (``not_found``, ``conflict``, ...), ``message``
    and ``hint`` are for people, ``status`` is the HTTP status (for an error that arrived inside
    a streamed 200 answer, the status its code stands for; ``None`` when the error did not come
    from the daemon, e.g. it could not be reached).
    """

    code: str = "internal"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        hint: str | None = None,
        status: int | None = None,
        body: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.hint = hint
        self.status = status
        #: the whole ``error`` object as the daemon sent it (empty if there was none)
        self.body: dict[str, Any] = dict(body or {})

    def __str__(self) -> str:
        s = self.message
        if self.hint:
            s += f" (hint: {self.hint})"
        return s

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(code={self.code!r}, message={self.message!r}, "
            f"hint={self.hint!r}, status={self.status!r})"
        )


class BadRequest(ForkdError):
    """400: malformed or wrong request fields (the message names the field)."""

    code = "bad_request"


class Unauthorized(ForkdError):
    """401: TCP without the right bearer token."""

    code = "unauthorized"


class NotFound(ForkdError):
    """404: unknown sandbox, command or image (for an image the hint says how to get it)."""

    code = "not_found"


class Conflict(ForkdError):
    """409: the sandbox is paused (resume it first) or busy in a way that forbids the call."""

    code = "conflict"


class TooLarge(ForkdError):
    """413: a body over its limit."""

    code = "too_large"


class CapacityError(ForkdError):
    """422: the children do not fit in the host's memory; none was started."""

    code = "capacity"


class InternalError(ForkdError):
    """500: anything else that failed in the daemon."""

    code = "internal"


class GuestError(ForkdError):
    """502: the guest reported an error; ``guest_code`` says which (the daemon sends e.g.
    ``no_space``, ``not_found``; docs/API.md spells them ``enospc``, ``enoent``)."""

    code = "guest"

    def __init__(self, message: str, *, guest_code: str | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.guest_code = guest_code

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", guest_code={self.guest_code!r})"


class TimeoutError_(ForkdError, builtins.TimeoutError):
    """504 from the daemon (the guest did not answer in time, or ``wait`` ran out), or the
    SDK's own HTTP timeout. Also a builtin :class:`TimeoutError`."""

    code = "timeout"


class DaemonUnavailable(ForkdError, builtins.ConnectionError):
    """The daemon could not be reached (no socket, connection refused...)."""

    code = "unavailable"


class ProtocolError(ForkdError):
    """The daemon's answer was not what the API promises (e.g. a stream cut before its end)."""

    code = "protocol"


class PortNotExposed(KeyError):
    """``sandbox.host_port(guest_port)`` for a guest port the sandbox does not expose (a
    client-side lookup: no daemon call failed). Also a builtin :class:`KeyError`."""

    def __str__(self) -> str:  # KeyError would show its message quoted
        return str(self.args[0]) if self.args else ""


class ChildError(ForkdError):
    """One child of a fork that failed; ``index`` is its position in the request."""

    def __init__(self, message: str, *, index: int, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.index = index


S = TypeVar("S")


class ForkError(ForkdError, Generic[S]):
    """Some children of a fork failed to start.

    ``sandboxes`` are the children that did start (they are running: kill them or use them),
    ``errors`` one :class:`ChildError` per failed child, ``result`` the daemon's whole answer.
    ``code`` is the first failed child's code.
    """

    code = "fork"

    def __init__(
        self,
        message: str,
        *,
        sandboxes: list[S],
        errors: list[ChildError],
        result: Mapping[str, Any] | None = None,
    ) -> None:
        first = errors[0] if errors else None
        super().__init__(
            message,
            code=first.code if first else "fork",
            hint=first.hint if first else None,
            status=first.status if first else None,
        )
        self.sandboxes: list[S] = sandboxes
        self.errors: list[ChildError] = errors
        self.result: dict[str, Any] = dict(result or {})


_BY_CODE: dict[str, type[ForkdError]] = {
    "bad_request": BadRequest,
    "unauthorized": Unauthorized,
    "not_found": NotFound,
    "conflict": Conflict,
    "too_large": TooLarge,
    "capacity": CapacityError,
    "internal": InternalError,
    "guest": GuestError,
    "timeout": TimeoutError_,
}

_BY_STATUS: dict[int, type[ForkdError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Unauthorized,
    404: NotFound,
    409: Conflict,
    413: TooLarge,
    422: CapacityError,
    500: InternalError,
    502: GuestError,
    504: TimeoutError_,
}


_STATUS_BY_CODE: dict[str, int] = {
    "bad_request": 400,
    "unauthorized": 401,
    "not_found": 404,
    "conflict": 409,
    "too_large": 413,
    "capacity": 422,
    "internal": 500,
    "guest": 502,
    "timeout": 504,
}


def error_from_json(
    err: Mapping[str, Any] | None, status: int | None = None, *, index: int | None = None
) -> ForkdError:
    """Build the exception for an ``{"code", "message", "hint", ...}`` error object.

    The class is chosen by ``code`` first, then by HTTP status; unknown codes keep their code
    on a plain :class:`ForkdError` (or the status's class)."""
    err = dict(err or {})
    code = str(err.get("code") or "")
    if status is None:
        # an error inside a 200 stream (fork, pull, a command): the status its code stands for
        status = _STATUS_BY_CODE.get(code)
    message = str(err.get("message") or (f"HTTP {status}" if status else "error"))
    hint = err.get("hint")
    hint = str(hint) if hint else None
    cls: type[ForkdError] = _BY_CODE.get(code) or (
        _BY_STATUS.get(status, ForkdError) if status else ForkdError
    )
    kw: dict[str, Any] = {"code": code or None, "hint": hint, "status": status, "body": err}
    if index is not None:
        return ChildError(message, index=index, **kw)
    if cls is GuestError:
        gc = err.get("guest_code")
        return GuestError(message, guest_code=str(gc) if gc else None, **kw)
    return cls(message, **kw)
