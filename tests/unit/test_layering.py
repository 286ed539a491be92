"""The pure layers stay pure: `wire` and `core` import no I/O, clock, logging or shell module.

Checked on the syntax tree of every module, so an import hidden in a function counts too.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "pgproxy"

# Modules that do I/O, read a clock, write logs, or belong to the asyncio shell's world.
FORBIDDEN = {
    "asyncio",
    "logging",
    "pg8000",
    "prometheus_client",
    "pydantic",
    "pydantic_settings",
    "selectors",
    "socket",
    "ssl",
    "subprocess",
    "threading",
    "time",
    "uvloop",
}

# Imports point inwards: wire ← core ← net/shell.
ALLOWED_PGPROXY = {
    "wire": ("pgproxy.wire", "pgproxy.errors"),
    "core": ("pgproxy.wire", "pgproxy.errors", "pgproxy.core"),
}

MODULES = sorted(path for layer in ALLOWED_PGPROXY for path in (PACKAGE / layer).rglob("*.py"))


def imported_modules(tree: ast.AST, path: Path) -> list[str]:
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the module's package
                package = path.relative_to(PACKAGE.parent).with_suffix("").parts[: -node.level]
                names.append(".".join([*package, *([node.module] if node.module else [])]))
            else:
                names.append(node.module or "")
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "__import__"
        ):
            names.append("__import__")
    return names


def test_the_pure_layers_have_modules_to_check():
    names = {path.name for path in MODULES}
    assert {"scanner.py", "messages.py", "scram.py", "login.py", "server_login.py"} <= names


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_pure_modules_import_nothing_that_does_io_or_reads_the_clock(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    bad = [
        name
        for name in imported_modules(tree, path)
        if name.split(".")[0] in FORBIDDEN or name == "__import__"
    ]
    assert bad == [], f"{path.name} imports {bad}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_pure_modules_import_only_inner_layers_of_pgproxy(path):
    layer = path.relative_to(PACKAGE).parts[0]
    tree = ast.parse(path.read_text(), filename=str(path))
    outward = [
        name
        for name in imported_modules(tree, path)
        if name.split(".")[0] == "pgproxy"
        and not any(
            name == allowed or name.startswith(allowed + ".") for allowed in ALLOWED_PGPROXY[layer]
        )
    ]
    assert outward == [], f"{path.name} imports outer modules {outward}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_pure_modules_do_not_print(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    prints = [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in ("print", "breakpoint")
    ]
    assert prints == [], f"{path.name} prints at lines {prints}"


def test_the_checker_catches_a_hidden_import():
    tree = ast.parse("def f():\n    import time\n    from asyncio import sleep\n")
    assert imported_modules(tree, PACKAGE / "core" / "x.py") == ["time", "asyncio"]


def test_the_checker_resolves_relative_imports():
    tree = ast.parse("from ..net import flow\nfrom . import codes\n")
    assert imported_modules(tree, PACKAGE / "wire" / "x.py") == ["pgproxy.net", "pgproxy.wire"]
