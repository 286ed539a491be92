"""The throw-away cluster itself: it starts, enforces SCRAM, honours settings, restarts."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pg8000.native
import pytest

from pgproxy.localpg import Credentials, LocalPostgres, LocalPostgresError, find_pg_bindir


def connect(pg: LocalPostgres, user: str, password: str, database: str) -> pg8000.native.Connection:
    return pg8000.native.Connection(
        user, host=pg.host, port=pg.port, database=database, password=password, timeout=10
    )


def test_app_user_logs_in_over_tcp_with_scram(
    pg: LocalPostgres, app_credentials: Credentials
) -> None:
    creds = app_credentials
    with connect(pg, creds.user, creds.password, creds.database) as conn:
        assert conn.run("SELECT current_user, current_database()") == [["app", "app"]]
        assert conn.run("SELECT rolsuper FROM pg_roles WHERE rolname = current_user") == [[False]]
    (stored,) = pg.execute("SELECT rolpassword FROM pg_authid WHERE rolname = $1", creds.user)[0]
    assert stored.startswith("SCRAM-SHA-256$")
    hba = pg.execute("SELECT DISTINCT auth_method FROM pg_hba_file_rules WHERE type = 'host'")
    assert hba == [("scram-sha-256",)]


def test_wrong_password_is_rejected(pg: LocalPostgres, app_credentials: Credentials) -> None:
    with pytest.raises(pg8000.native.DatabaseError) as info:
        connect(pg, app_credentials.user, "not-the-password", app_credentials.database)
    assert info.value.args[0]["C"] == "28P01"


def test_max_connections_is_as_asked(pg: LocalPostgres) -> None:
    assert pg.execute("SHOW max_connections") == [("30",)]


def test_pg_backends_counts_only_other_connections(
    pg: LocalPostgres, app_credentials: Credentials, pg_backends: Callable[..., int]
) -> None:
    assert pg_backends() == 0
    with connect(pg, app_credentials.user, app_credentials.password, app_credentials.database):
        assert pg_backends() == 1
        assert pg_backends(database="postgres") == 0
    # Closing the socket ends the backend asynchronously: poll with a deadline.
    assert pg.wait_for_backends(0, user=app_credentials.user, timeout=10)


def test_settings_and_dsn_round_trip() -> None:
    with LocalPostgres(max_connections=7, settings={"cluster_name": "it's quoted"}) as pg:
        pg.create_user("odd user", "p@ss:w/rd")
        pg.create_database("odd db", owner="odd user")
        assert pg.execute("SHOW max_connections") == [("7",)]
        assert pg.execute("SHOW cluster_name") == [("it's quoted",)]
        dsn = pg.dsn("odd user", "p@ss:w/rd", "odd db")
        assert dsn == f"postgresql://odd%20user:p%40ss%3Aw%2Frd@127.0.0.1:{pg.port}/odd%20db"
        base = pg.base
        assert base is not None
    assert not base.exists()


def test_restart_keeps_data_and_port() -> None:
    with LocalPostgres(max_connections=5) as pg:
        pg.execute("CREATE TABLE kept (x int); INSERT INTO kept VALUES (42)")
        port, started = pg.port, pg.execute("SELECT pg_postmaster_start_time()")
        pg.restart()
        assert pg.port == port
        assert pg.execute("SELECT pg_postmaster_start_time()") != started
        assert pg.execute("SELECT x FROM kept") == [(42,)]


def test_failed_start_reports_the_server_log_and_cleans_up() -> None:
    pg = LocalPostgres(settings={"shared_buffers": "plenty"})
    with pytest.raises(LocalPostgresError, match=r'invalid value for parameter "shared_buffers"'):
        pg.start()
    assert pg.base is not None
    assert not pg.base.exists()
    pg.stop()  # idempotent after a failed start


def test_stop_is_idempotent_and_execute_after_stop_fails() -> None:
    pg = LocalPostgres()
    pg.stop()  # never started
    pg.start()
    pg.stop()
    pg.stop()
    with pytest.raises(LocalPostgresError, match="not started"):
        pg.execute("SELECT 1")


def test_find_pg_bindir_prefers_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real = find_pg_bindir()
    assert (real / "initdb").is_file()
    monkeypatch.setenv("PG_BINDIR", str(tmp_path))
    with pytest.raises(RuntimeError, match="PG_BINDIR"):
        find_pg_bindir()
    monkeypatch.setenv("PG_BINDIR", str(real))
    assert find_pg_bindir() == real
