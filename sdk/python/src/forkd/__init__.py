"""forkd: a Python client for the forkd daemon (``forkd serve``).

    from forkd import Client, Sandbox

    with Sandbox.create("tiny") as sb:
        r = sb.commands.run("echo hi")
        print(r.exit_code, r.stdout)

The blocking API is :class:`Client` and :class:`Sandbox`; the asyncio one
:class:`AsyncClient` and :class:`AsyncSandbox`. ``python -m forkd.mcp`` is an MCP server
over the same calls (``pip install 'forkd[mcp]'``).
"""

from ._core import default_home, resolve_target
from .aio import (
    AsyncByteStream,
    AsyncClient,
    AsyncCommandHandle,
    AsyncCommands,
    AsyncFiles,
    AsyncSandbox,
)
from .client import ByteStream, Client, CommandHandle, Commands, Files, Sandbox
from .errors import (
    BadRequest,
    CapacityError,
    ChildError,
    Conflict,
    DaemonUnavailable,
    ForkdError,
    ForkError,
    GuestError,
    InternalError,
    NotFound,
    PortNotExposed,
    ProtocolError,
    TimeoutError_,
    TooLarge,
    Unauthorized,
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
    PortInfo,
    PortMapping,
    SandboxInfo,
    WriteInfo,
)

__version__ = "0.1.0"

__all__ = [
    "Client",
    "Sandbox",
    "Commands",
    "CommandHandle",
    "Files",
    "ByteStream",
    "AsyncClient",
    "AsyncSandbox",
    "AsyncCommands",
    "AsyncCommandHandle",
    "AsyncFiles",
    "AsyncByteStream",
    "CommandResult",
    "CommandOutput",
    "CommandStatus",
    "FileEntry",
    "WriteInfo",
    "SandboxInfo",
    "Network",
    "PortMapping",
    "PortInfo",
    "BranchInfo",
    "ImageInfo",
    "Health",
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
    "default_home",
    "resolve_target",
    "__version__",
]
