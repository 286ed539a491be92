"""Build pgproxy, with its hot path compiled to C by mypyc.

The modules in `COMPILED` run for every message a client or server sends; compiled, they cost
about a fifth less CPU per transaction (README, Performance). They stay plain, strictly typed
Python: without a C compiler pgproxy installs and runs them interpreted.

PGPROXY_COMPILE chooses: `auto` (the default) compiles when it can and says so when it cannot,
`1` fails the build instead (the container image), `0` does not try.
"""

import os
import runpy
import sys
from pathlib import Path
from typing import Any

from setuptools import setup
from setuptools.command.build_ext import build_ext

# pgproxy/hotpath.py lists them, for this build and for the start-up log that names the result.
MODULES = runpy.run_path(str(Path(__file__).parent / "pgproxy" / "hotpath.py"))["MODULES"]
COMPILED = [name.replace(".", "/") + ".py" for name in MODULES]

MODE = os.environ.get("PGPROXY_COMPILE", "auto")
if MODE not in ("auto", "0", "1"):
    sys.exit(f"PGPROXY_COMPILE: {MODE!r} is not auto, 0 or 1")


class OptionalBuildExt(build_ext):
    """With PGPROXY_COMPILE=auto, a failed compilation leaves the modules interpreted."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:
            if MODE == "1":
                raise
            print(f"pgproxy: hot path not compiled ({exc}); it runs interpreted", file=sys.stderr)


def fix_bytes_slice(extensions: list[Any]) -> None:
    """Build with a corrected copy of mypyc's bytes_ops.c.

    Its bytes slice returns a negative length when the end comes before the start, which
    Python answers with b"": compiled, `data[5:2]` raises SystemError. Client bytes reach
    such slices (a Bind whose statement name is not terminated), so the copy clamps the
    length at 0. tests/unit/test_prepared.py fails when a build slices the wrong way.
    """
    import mypyc

    text = (Path(mypyc.__file__).parent / "lib-rt" / "bytes_ops.c").read_text()
    wrong = "Py_ssize_t slice_len = endn - startn;"
    if text.count(wrong) != 1:
        return  # changed upstream; the test says whether the slice is right now
    fixes = Path("build", "mypyc-fixes")
    fixes.mkdir(parents=True, exist_ok=True)
    right = "Py_ssize_t slice_len = endn > startn ? endn - startn : 0;"
    (fixes / "bytes_ops.c").write_text(text.replace(wrong, right))
    for extension in extensions:
        # Before mypyc's own lib-rt: `#include <bytes_ops.c>` finds the copy.
        extension.include_dirs.insert(0, str(fixes.resolve()))


def extensions() -> list[object]:
    if MODE == "0":
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        if MODE == "1":
            raise
        print("pgproxy: mypyc is not installed; the hot path runs interpreted", file=sys.stderr)
        return []
    try:
        # group_name: one shared library, pgproxy__mypyc, instead of one named by a hash.
        built = list(mypycify(COMPILED, opt_level="3", group_name="pgproxy"))
    except (Exception, SystemExit) as exc:  # mypyc type-checks first, and exits on an error
        if MODE == "1":
            raise
        print(f"pgproxy: mypyc failed ({exc}); the hot path runs interpreted", file=sys.stderr)
        return []
    fix_bytes_slice(built)
    return built


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
