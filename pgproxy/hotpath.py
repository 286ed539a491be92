"""The modules every forwarded message runs through, compiled to C by mypyc when pgproxy is
built with a C compiler (setup.py), and how the start-up log names what is in use.

This file is read by setup.py before pgproxy is installed: the standard library only.
"""

from __future__ import annotations

import importlib
import importlib.machinery
from pathlib import Path

# setup.py compiles these; any other module stays interpreted.
MODULES = (
    "pgproxy.wire.scanner",
    "pgproxy.net.flow",
    "pgproxy.net.client_connection",
    "pgproxy.net.server_connection",
    "pgproxy.net.handoff",
    "pgproxy.core.client",
    "pgproxy.core.pool",
    "pgproxy.core.server",
    "pgproxy.core.prepared",
    "pgproxy.core.params",
    "pgproxy.core.session_state",
    "pgproxy.core.stats",
)


def _file(name: str) -> Path:
    return Path(importlib.import_module(name).__file__ or "")


def _is_extension(path: Path) -> bool:
    return path.name.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))


def compiled() -> list[str]:
    """The modules of MODULES that were loaded from a compiled extension."""
    return [name for name in MODULES if _is_extension(_file(name))]


def stale() -> list[str]:
    """Compiled modules older than the source beside them (an in-place build, then an edit):
    what runs is not what the file says."""
    found = []
    for name in MODULES:
        path = _file(name)
        source = path.parent / f"{name.rsplit('.', 1)[-1]}.py"
        if (
            _is_extension(path)
            and source.exists()
            and source.stat().st_mtime > path.stat().st_mtime
        ):
            found.append(name)
    return found


def describe() -> str:
    """The start-up log line."""
    done = compiled()
    if len(done) == len(MODULES):
        return "hot path: compiled (mypyc)"
    if not done:
        return "hot path: interpreted (not compiled when installed; README, Performance)"
    return f"hot path: partly compiled ({len(done)} of {len(MODULES)} modules)"
