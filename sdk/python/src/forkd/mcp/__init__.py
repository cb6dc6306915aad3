"""An MCP server (stdio) that gives an agent forkd sandboxes: ``python -m forkd.mcp`` or the
``forkd-mcp`` script. Needs the ``mcp`` extra: ``pip install 'forkd[mcp]'``.

The daemon is found like ``forkd.Client()`` finds it (``FORKD_URL``/``FORKD_TOKEN``, else the
socket in ``FORKD_HOME``), or with ``--url``/``--token``/``--home``.
"""

from __future__ import annotations

from typing import Any


def main(argv: list[str] | None = None) -> None:
    from .server import main as _main

    _main(argv)


def __getattr__(name: str) -> Any:
    if name in ("build_server", "TOOLS"):
        from . import server

        return getattr(server, name)
    raise AttributeError(name)
