"""Drivers outside Python through a transaction-mode proxy with a pool of 2: node-postgres, pgjdbc.

Each driver runs a small program of its own (tests/drivers/) with several concurrent clients
that reuse the same statement names for different SQL, checking every row themselves; this file
runs it against a fresh proxy and checks its exit code, its success line and that the proxy kept
to its pool. `make test` installs the runtimes (npm ci, Debian's libpostgresql-jdbc-java); a
test is skipped only when its runtime really is missing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from pgproxy.localpg import Credentials
from tests.e2e.conftest import ProxyThread

DRIVERS = Path(__file__).resolve().parent.parent / "drivers"
NODE_DIR = DRIVERS / "node"
JDBC_SOURCE = DRIVERS / "jdbc" / "PreparedThreshold.java"
# Where Debian's libpostgresql-jdbc-java puts the driver; PGJDBC_JAR overrides.
JDBC_JARS = ("/usr/share/java/postgresql.jar", "/usr/share/java/postgresql-jdbc4.jar")
POOL = 2


def run_driver(
    command: list[str], proxy: ProxyThread, creds: Credentials, cwd: Path | None = None
) -> str:
    """Run a driver program against `proxy`; return its success line, or fail with its output."""
    args = ["127.0.0.1", str(proxy.port), creds.user, creds.password, creds.database]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    result = subprocess.run(
        [*command, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=110
    )
    output = f"--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-5000:]}"
    assert result.returncode == 0, f"{command[0]} exited with {result.returncode}\n{output}"
    ok = [line for line in result.stdout.splitlines() if line.startswith("OK ")]
    assert ok, f"no success line\n{output}"
    return ok[-1]


def assert_kept_to_pool(proxy: ProxyThread, line: str) -> None:
    """The clients were served by at most POOL server connections, by both accounts."""
    backends = re.search(r"backends=(\d+)", line)
    assert backends is not None, line
    limit = proxy.settings.default_pool_size
    assert 1 <= int(backends.group(1)) <= limit, line
    assert proxy.server_count() <= limit


def test_node_postgres_named_queries_with_one_name_for_different_sql_per_client(
    pool2: ProxyThread, app_credentials: Credentials
) -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed (make test installs node-postgres when it is)")
    if not (NODE_DIR / "node_modules" / "pg").is_dir():
        pytest.fail(f"node is installed but node-postgres is not: run `npm ci` in {NODE_DIR}")
    proxy = pool2
    line = run_driver([node, "named_queries.js"], proxy, app_credentials, cwd=NODE_DIR)
    assert "6 clients" in line, line
    assert_kept_to_pool(proxy, line)


def jdbc_jar() -> str | None:
    candidates = [os.environ.get("PGJDBC_JAR", ""), *JDBC_JARS]
    return next((jar for jar in candidates if jar and Path(jar).is_file()), None)


def test_pgjdbc_prepare_threshold_names_collide_across_connections_with_different_sql(
    pool2: ProxyThread, app_credentials: Credentials, tmp_path: Path
) -> None:
    java, javac, jar = shutil.which("java"), shutil.which("javac"), jdbc_jar()
    if java is None or javac is None:
        pytest.skip("java/javac are not installed (make test installs a JDK when root)")
    if jar is None:
        pytest.skip(
            "the PostgreSQL JDBC driver is not installed: apt-get install libpostgresql-jdbc-java"
        )
    compiled = subprocess.run(
        [javac, "-cp", jar, "-d", str(tmp_path), str(JDBC_SOURCE)],
        capture_output=True, text=True, timeout=110,
    )  # fmt: skip
    assert compiled.returncode == 0, compiled.stderr
    proxy = pool2
    classpath = f"{tmp_path}{os.pathsep}{jar}"
    line = run_driver([java, "-cp", classpath, "PreparedThreshold"], proxy, app_credentials)
    assert "6 threads" in line and "prepareThreshold 5" in line, line
    assert_kept_to_pool(proxy, line)
