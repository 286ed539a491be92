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
        return list(mypycify(COMPILED, opt_level="3", group_name="pgproxy"))
    except (Exception, SystemExit) as exc:  # mypyc type-checks first, and exits on an error
        if MODE == "1":
            raise
        print(f"pgproxy: mypyc failed ({exc}); the hot path runs interpreted", file=sys.stderr)
        return []


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
