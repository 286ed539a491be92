"""Which allocator holds the proxy's memory, said once at start.

Python's own small-object allocator (pymalloc) keeps a 1 MiB arena as long as one object in it
lives, so the memory of a burst of clients mostly stays with the process after they leave.
With ``PYTHONMALLOC=malloc`` and jemalloc preloaded (as the container image runs pgproxy),
freed pages go back to the system within seconds. README, "Memory", says how.
"""

from __future__ import annotations

import os
from pathlib import Path

# Preloaded allocators that give freed pages back, by the name their library file carries.
_KNOWN = ("jemalloc", "mimalloc", "tcmalloc")


def allocator(maps: str | None = None, environ: dict[str, str] | None = None) -> str:
    """``jemalloc``, ``mimalloc``, ``tcmalloc``, ``malloc`` (glibc) or ``pymalloc``."""
    env = os.environ if environ is None else environ
    if env.get("PYTHONMALLOC", "") not in ("malloc", "malloc_debug"):
        return "pymalloc"
    if maps is None:
        try:
            maps = Path("/proc/self/maps").read_text()
        except OSError:
            maps = ""
    for line in maps.splitlines():
        library = line.rsplit("/", 1)[-1]
        for name in _KNOWN:
            if library.startswith(f"lib{name}"):
                return name
    return "malloc"


def describe(name: str) -> str:
    """The start-up log line's words for `name`."""
    if name == "pymalloc":
        return (
            "memory allocator: pymalloc (the memory of a burst of clients stays with the "
            "process after they leave; README, Memory)"
        )
    return f"memory allocator: {name} (PYTHONMALLOC=malloc)"
