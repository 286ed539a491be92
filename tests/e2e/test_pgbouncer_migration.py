"""Migrating from PgBouncer: `pgproxy --pgbouncer-config pgbouncer.ini` serves clients.

A realistic PgBouncer deployment is written to a temporary directory: two databases (aliases
of the same database, with their own pool sizes), auth_type = scram-sha-256, an auth_file with
the SCRAM secret Postgres stores for `app` (as `SELECT rolpassword FROM pg_authid` gives it,
the usual way to fill userlist.txt), a plain-text admin and an md5 user, an `%include`, and a
few settings pgproxy does not have. The real command line runs it as a process.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from pgproxy.config import Settings
from pgproxy.localpg import LocalPostgres, free_port
from pgproxy.wire.scram import md5_secret

from .helpers import APP_PASSWORD, REPO, Background, ProxyProcess, cli_env, wait_for

ADMIN_PASSWORD = "admin-secret"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


@pytest.fixture
def pgbouncer_ini(pg: LocalPostgres, tmp_path: Path) -> tuple[Path, int]:
    """/etc/pgbouncer as it was, in tmp_path; returns the ini and the port it listens on."""
    (secret,) = pg.execute("SELECT rolpassword FROM pg_authid WHERE rolname = 'app'")[0]
    assert secret.startswith("SCRAM-SHA-256$")
    port = free_port()
    write(
        tmp_path / "userlist.txt",
        f"""
        "app" "{secret}"
        "pgadmin" "{ADMIN_PASSWORD}"
        "legacy" "{md5_secret("legacy", "legacy-secret")}"
        """,
    )
    write(
        tmp_path / "pgbouncer.d/tuning.ini",
        """
        ; tuning, kept apart
        query_wait_timeout = 20
        so_reuseport = 1
        """,
    )
    ini = write(
        tmp_path / "pgbouncer.ini",
        f"""
        ;; PgBouncer configuration file
        [databases]
        app = host={pg.host} port={pg.port} dbname=app pool_size=3
        app_batch = host={pg.host} port={pg.port} dbname=app pool_size=1

        [pgbouncer]
        logfile = /var/log/pgbouncer/pgbouncer.log
        pidfile = /var/run/pgbouncer/pgbouncer.pid
        listen_addr = 127.0.0.1
        listen_port = {port}
        unix_socket_dir = {tmp_path}
        auth_type = scram-sha-256
        auth_file = userlist.txt
        admin_users = pgadmin
        pool_mode = transaction
        default_pool_size = 2
        max_client_conn = 50
        server_idle_timeout = 30
        ignore_startup_parameters = extra_float_digits
        %include pgbouncer.d/tuning.ini
        """,
    )
    return ini, port


@pytest.fixture
def started(tmp_path: Path) -> Iterator[list[ProxyProcess]]:
    """Processes started by a test; killed afterwards if the test left them running."""
    processes: list[ProxyProcess] = []
    yield processes
    for proxy in processes:
        if proxy.process.poll() is None:
            proxy.process.kill()
            proxy.process.wait(timeout=10)


def run_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pgproxy", *args],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def connect(
    port: int, dbname: str, user: str = "app", password: str = APP_PASSWORD
) -> psycopg.Connection:
    return psycopg.connect(
        host="127.0.0.1",
        port=port,
        user=user,
        password=password,
        dbname=dbname,
        autocommit=True,
        prepare_threshold=None,
    )


def rows(conn: psycopg.Connection, command: str) -> list[dict[str, object]]:
    cursor = conn.execute(command)
    assert cursor.description is not None
    names = [column.name for column in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def test_a_pgbouncer_ini_is_served_with_its_databases_pool_sizes_and_users(
    pg: LocalPostgres,
    pgbouncer_ini: tuple[Path, int],
    tmp_path: Path,
    started: list[ProxyProcess],
) -> None:
    ini, port = pgbouncer_ini
    log_path = tmp_path / "pgproxy.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pgproxy",
                "--pgbouncer-config",
                str(ini),
                # Off: parallel test runs would fight over port 9127, and the monitor logs.
                "--metrics-listen",
                "",
                "--monitor-interval",
                "0",
            ],
            cwd=REPO,
            env=cli_env(),
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    proxy = ProxyProcess(process, port, log_path)
    started.append(proxy)

    def accepting() -> bool:
        assert process.poll() is None, f"pgproxy exited early:\n{proxy.log()}"
        return not proxy.is_refusing()

    wait_for(accepting, timeout=15, what="pgproxy to accept connections")

    # One warning line per setting pgproxy does not have, naming the key and its file:line.
    warnings = proxy.log_lines("pgproxy: pgbouncer.ini: ")
    tuning = tmp_path / "pgbouncer.d/tuning.ini"
    expected = [
        f"{ini}:7: logfile: not supported",
        f"{ini}:8: pidfile: not supported",
        f"{ini}:19: ignore_startup_parameters: not supported",
        f"{tuning}:3: so_reuseport: not supported",
        f"{tmp_path / 'userlist.txt'}:3: user 'legacy' has an md5 secret",
    ]
    if "unix_socket_dir" not in Settings.model_fields:
        expected.append(f"{ini}:11: unix_socket_dir: not supported")
    assert len(warnings) == len(expected), proxy.log()
    for needle in expected:
        assert any(needle in line for line in warnings), f"{needle!r} not in {warnings}"

    # Clients log in by SCRAM through both aliases; pgproxy passes the login through to
    # Postgres with the stored secret (no plain-text password anywhere in the files).
    with connect(port, "app") as app, connect(port, "app_batch") as batch:
        assert app.execute("SELECT current_database(), current_user").fetchone() == ("app", "app")
        assert batch.execute("SELECT current_database()").fetchone() == ("app",)

        # app_batch has pool_size=1: while one client holds its server in a transaction,
        # another client of app_batch waits, and goes on once the first commits.
        with connect(port, "app_batch") as waiter:
            batch.execute("BEGIN")
            batch.execute("SELECT 1")
            queued = Background(lambda: waiter.execute("SELECT 42").fetchone())
            queued.start()
            with connect(port, "pgproxy", "pgadmin", ADMIN_PASSWORD) as admin:

                def batch_pool() -> dict[str, object] | None:
                    for row in rows(admin, "SHOW POOLS"):
                        if row["database"] == "app_batch" and row["cl_waiting"] == 1:
                            return row
                    return None

                pool = wait_for(batch_pool, what="a client waiting in app_batch's pool")
                assert pool is not None
                assert (pool["pool_size"], pool["sv_active"]) == (1, 1)
                databases = {row["name"]: row for row in rows(admin, "SHOW DATABASES")}
                pools = {row["database"]: row for row in rows(admin, "SHOW POOLS")}
            batch.execute("COMMIT")
            assert queued.finish() == (42,)

        assert (databases["app"]["pool_size"], databases["app_batch"]["pool_size"]) == (3, 1)
        assert databases["app"]["database"] == databases["app_batch"]["database"] == "app"
        assert databases["app"]["port"] == pg.port
        assert databases["app"]["pool_mode"] == "transaction"
        assert pools["app"]["pool_size"] == 3
        # The md5 user was left out: pgproxy could not log it in with scram-sha-256.
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            connect(port, "app", "legacy", "legacy-secret").close()

    process.send_signal(signal.SIGTERM)
    assert proxy.wait(timeout=20) == 0, proxy.log()


def test_a_missing_pgbouncer_ini_is_one_line_and_exit_2(tmp_path: Path) -> None:
    result = run_cli("--pgbouncer-config", str(tmp_path / "missing.ini"))
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == (
        f"pgproxy: invalid setting pgbouncer_config: {tmp_path / 'missing.ini'}: no such file\n"
    )


@pytest.mark.parametrize("flag", ["-V", "--version"])
def test_version_answers_to_pgbouncers_flags(flag: str) -> None:
    result = run_cli(flag)
    assert result.returncode == 0
    assert result.stdout.startswith("pgproxy ")


def test_help_lists_the_pgbouncer_flags() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    for flag in ("--pgbouncer-config PATH", "-q, --quiet", "-d, --daemon", "-V, --version"):
        assert flag in result.stdout


def test_daemon_mode_is_refused_with_a_reason(tmp_path: Path) -> None:
    result = run_cli("-d", "--pgbouncer-config", str(tmp_path / "pgbouncer.ini"))
    assert result.returncode == 2
    assert result.stderr.startswith("pgproxy: --daemon is not supported: pgproxy runs in the")
    assert result.stderr.count("\n") == 1
