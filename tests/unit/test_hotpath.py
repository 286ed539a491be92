"""The compiled hot path: what setup.py builds, what the start-up log says, stale builds."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import pytest

from pgproxy import hotpath

REPO = Path(__file__).resolve().parents[2]


def test_every_listed_module_is_a_source_file_of_the_package() -> None:
    for name in hotpath.MODULES:
        assert (REPO / (name.replace(".", "/") + ".py")).is_file(), name


@pytest.mark.skipif(
    not os.environ.get("PGPROXY_EXPECT_COMPILED"),
    reason="set by `make test`, which compiles the hot path first",
)
def test_make_test_runs_the_compiled_hot_path() -> None:
    assert hotpath.compiled() == list(hotpath.MODULES)
    assert hotpath.describe() == "hot path: compiled (mypyc)"


def test_the_log_line_says_what_runs() -> None:
    done = hotpath.compiled()
    line = hotpath.describe()
    if not done:
        assert line.startswith("hot path: interpreted")
    elif len(done) < len(hotpath.MODULES):
        assert line == f"hot path: partly compiled ({len(done)} of {len(hotpath.MODULES)} modules)"
    else:
        assert line == "hot path: compiled (mypyc)"


def test_a_module_compiled_before_its_source_changed_is_stale() -> None:
    done = hotpath.compiled()
    if not done:
        pytest.skip("the hot path is interpreted here")
    built = Path(importlib.import_module(done[0]).__file__ or "")
    source = built.parent / (done[0].rsplit(".", 1)[-1] + ".py")
    before = built.stat()
    try:
        # As if the source were edited after the build: the build is now the older one.
        os.utime(built, (before.st_atime, source.stat().st_mtime - 1))
        assert hotpath.stale() == [done[0]]
    finally:
        os.utime(built, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert hotpath.stale() == []
