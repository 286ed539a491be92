"""The allocator named in the start-up log, from the environment and the process's maps."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pgproxy import memory

MAPS = """\
7f0000000000-7f0000021000 r-xp 00000000 08:01 123 /usr/lib/x86_64-linux-gnu/libc.so.6
7f1000000000-7f1000040000 r-xp 00000000 08:01 456 /usr/lib/x86_64-linux-gnu/libjemalloc.so.2
7f2000000000-7f2000001000 rw-p 00000000 00:00 0
"""


def test_python_own_allocator_unless_pythonmalloc_says_malloc() -> None:
    assert memory.allocator(MAPS, {}) == "pymalloc"
    assert memory.allocator(MAPS, {"PYTHONMALLOC": "pymalloc"}) == "pymalloc"


def test_a_preloaded_allocator_is_named_by_its_library() -> None:
    assert memory.allocator(MAPS, {"PYTHONMALLOC": "malloc"}) == "jemalloc"
    mimalloc = MAPS.replace("libjemalloc.so.2", "libmimalloc.so.2.0")
    assert memory.allocator(mimalloc, {"PYTHONMALLOC": "malloc"}) == "mimalloc"


def test_glibc_malloc_when_nothing_is_preloaded() -> None:
    plain = MAPS.replace("libjemalloc.so.2", "libz.so.1")
    assert memory.allocator(plain, {"PYTHONMALLOC": "malloc"}) == "malloc"


def test_the_log_line_points_a_pymalloc_user_to_the_readme() -> None:
    assert "README, Memory" in memory.describe("pymalloc")
    assert memory.describe("jemalloc") == "memory allocator: jemalloc (PYTHONMALLOC=malloc)"


def _host_jemalloc() -> Path | None:
    return next(Path("/usr/lib").glob("*/libjemalloc.so.2"), None)


def test_a_real_process_with_jemalloc_preloaded_is_seen_as_jemalloc() -> None:
    library = _host_jemalloc()
    if library is None:
        pytest.skip("no libjemalloc.so.2 (apt-get install libjemalloc2)")
    found = subprocess.run(
        [sys.executable, "-c", "from pgproxy import memory; print(memory.allocator())"],
        env={"LD_PRELOAD": str(library), "PYTHONMALLOC": "malloc", "PATH": "/usr/bin:/bin"},
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        check=True,
    )
    assert found.stdout.strip() == "jemalloc", found.stderr
