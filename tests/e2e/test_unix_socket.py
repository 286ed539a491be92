"""The Unix-domain socket listener: DIR/.s.PGSQL.<port>, as psql -h DIR expects it."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import psycopg

from pgproxy.localpg import LocalPostgres, free_port

from .conftest import ProxyThread
from .helpers import APP_PASSWORD, REPO, cli_env


def test_clients_and_psql_connect_through_the_socket_and_show_as_unix(
    make_proxy: Callable[..., ProxyThread], tmp_path: Path
) -> None:
    proxy = make_proxy(
        unix_socket_dir=str(tmp_path),
        unix_socket_mode="0700",
        users=[f"app:{APP_PASSWORD}", "admin:admin-pw"],
        admin_users="admin",
    )
    path = tmp_path / f".s.PGSQL.{proxy.port}"
    assert stat.S_ISSOCK(path.stat().st_mode)
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
    with psycopg.connect(
        host=str(tmp_path), port=proxy.port, user="app", password=APP_PASSWORD, dbname="app"
    ) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        with psycopg.connect(
            host=str(tmp_path),
            port=proxy.port,
            user="admin",
            password="admin-pw",
            dbname="pgproxy",
            autocommit=True,
        ) as admin:
            addresses = [row[4] for row in admin.execute("SHOW CLIENTS").fetchall()]
        assert addresses.count("unix socket") == 2
    psql = shutil.which("psql")
    if psql is not None:
        out = subprocess.run(
            [
                psql,
                "-h",
                str(tmp_path),
                "-p",
                str(proxy.port),
                "-U",
                "app",
                "app",
                "-Atc",
                "SELECT 7",
            ],
            env={**os.environ, "PGPASSWORD": APP_PASSWORD},
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        assert out.stdout.strip() == "7"
    proxy.stop()
    assert not path.exists()  # removed at shutdown


def test_a_stale_socket_file_is_replaced(
    make_proxy: Callable[..., ProxyThread], tmp_path: Path
) -> None:
    port = free_port()
    stale = tmp_path / f".s.PGSQL.{port}"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(stale))  # bound, never listening: what a killed process leaves behind
    dead.close()
    proxy = make_proxy(listen=f"127.0.0.1:{port}", unix_socket_dir=str(tmp_path))
    with psycopg.connect(
        host=str(tmp_path), port=proxy.port, user="app", password=APP_PASSWORD, dbname="app"
    ) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def _start_fails(pg: LocalPostgres, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pgproxy", "--server", f"{pg.host}:{pg.port}",
         "--metrics-listen", "", "--monitor-interval", "0", *flags],
        cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip


def test_a_socket_in_use_or_a_taken_port_exits_2_with_one_line(
    pg: LocalPostgres, tmp_path: Path
) -> None:
    port = free_port()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as live:
        live.bind(str(tmp_path / f".s.PGSQL.{port}"))
        live.listen()
        result = _start_fails(
            pg, "--listen", f"127.0.0.1:{port}", "--unix-socket-dir", str(tmp_path)
        )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1] == (
        f"pgproxy: invalid setting unix_socket_dir: {tmp_path}/.s.PGSQL.{port} is in use by "
        "another process"
    )
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        result = _start_fails(pg, "--listen", f"127.0.0.1:{busy}")
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"pgproxy: invalid setting listen: 127.0.0.1:{busy}: "), last
    assert "Traceback" not in result.stderr
