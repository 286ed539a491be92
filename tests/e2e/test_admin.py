"""The admin console, the virtual database `pgproxy`, driven by psql and psycopg.

psycopg sends a plain Query for `execute(sql)` without parameters (and `prepare_threshold=None`
keeps it from preparing repeated ones), which is what the console speaks.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from pgproxy.config import Settings, load_settings
from pgproxy.localpg import Credentials, LocalPostgres

from .conftest import ProxyThread
from .helpers import APP_PASSWORD, Background, connect, conninfo, wait_for

ADMIN_PASSWORD = "adminpw"
WATCHER_PASSWORD = "watchpw"


@pytest.fixture
def console(make_proxy: Callable[..., ProxyThread], app_credentials: Credentials) -> ProxyThread:
    """A proxy with the app user, an admin user and a stats-only user."""
    return make_proxy(
        admin_users="admin",
        stats_users="watcher",
        users=[
            f"{app_credentials.user}:{app_credentials.password}",
            f"admin:{ADMIN_PASSWORD}",
            f"watcher:{WATCHER_PASSWORD}",
        ],
    )


def admin_connect(
    port: int, user: str = "admin", password: str = ADMIN_PASSWORD, dbname: str = "pgproxy"
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


def show(conn: psycopg.Connection, item: str) -> list[dict[str, Any]]:
    cur = conn.execute(f"SHOW {item}")
    assert cur.description is not None
    names = [d.name for d in cur.description]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def pool_row(conn: psycopg.Connection, database: str = "app") -> dict[str, Any]:
    rows = [r for r in show(conn, "POOLS") if r["database"] == database]
    assert len(rows) == 1, rows
    return rows[0]


def psql(
    pg: LocalPostgres, port: int, *args: str, user: str = "admin", password: str = ADMIN_PASSWORD
) -> subprocess.CompletedProcess[str]:
    binary = pg.bindir / "psql"
    return subprocess.run(
        [str(binary), "-X", "-A", "-F", "|", "-h", "127.0.0.1", "-p", str(port), "-U", user, *args],
        env=dict(os.environ, PGPASSWORD=password),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


# --- psql: the acceptance check -------------------------------------------------------------


def test_psql_runs_the_show_commands_with_pgbouncer_columns(
    pg: LocalPostgres, console: ProxyThread
) -> None:
    with connect(console.port) as app:
        app.execute("SELECT 1")
        commands = [
            "SHOW POOLS",
            "SHOW CLIENTS",
            "SHOW SERVERS",
            "SHOW STATS",
            "SHOW DATABASES",
            "SHOW USERS",
            "SHOW CONFIG",
            "SHOW VERSION",
            "SHOW LISTS",
            "SHOW LEAKS",
            "show help;",
        ]
        args = [part for command in commands for part in ("-c", command)]
        result = psql(pg, console.port, "-v", "ON_ERROR_STOP=1", "pgproxy", *args)
    assert result.returncode == 0, result.stderr
    out = result.stdout.splitlines()
    assert out[0].startswith(
        "database|user|cl_active|cl_waiting|sv_active|sv_idle|sv_used|sv_tested|sv_login|"
        "maxwait|maxwait_us|pool_mode|"
    )
    assert any(line.startswith("app|app|") for line in out)
    assert any(line.startswith("type|user|database|state|addr|port|connect_time") for line in out)
    assert any(line.startswith("database|total_xact_count|total_query_count") for line in out)
    assert any(line.startswith("name|host|port|database|force_user|pool_size") for line in out)
    assert "key|value|default|changeable" in out
    assert any(line.startswith("default_pool_size|2|20|") for line in out)
    assert f"pgproxy {__import__('pgproxy').__version__}" in out
    assert "list|items" in out
    assert any(line.startswith("PAUSE [db]|") for line in out)
    assert "ERROR" not in result.stderr


def test_psql_reaches_the_console_under_the_pgbouncer_alias_and_reports_errors(
    pg: LocalPostgres, console: ProxyThread
) -> None:
    ok = psql(pg, console.port, "pgbouncer", "-c", "SHOW VERSION")
    assert ok.returncode == 0, ok.stderr
    assert "pgproxy" in ok.stdout
    bad = psql(pg, console.port, "pgproxy", "-v", "ON_ERROR_STOP=1", "-c", "SELECT 1")
    assert bad.returncode != 0
    assert "unknown admin console command" in bad.stderr
    assert "SHOW HELP" in bad.stderr


def test_psql_as_an_ordinary_user_is_refused_at_login(
    pg: LocalPostgres, console: ProxyThread
) -> None:
    result = psql(
        pg, console.port, "pgproxy", "-c", "SHOW POOLS", user="app", password=APP_PASSWORD
    )
    assert result.returncode != 0
    assert "may not use the admin console" in result.stderr


# --- who may do what ------------------------------------------------------------------------


def test_ordinary_user_is_refused_at_login(console: ProxyThread) -> None:
    with pytest.raises(psycopg.OperationalError, match="may not use the admin console"):
        admin_connect(console.port, user="app", password=APP_PASSWORD)


def test_stats_user_may_show_but_gets_42501_for_pause(console: ProxyThread) -> None:
    with admin_connect(console.port, user="watcher", password=WATCHER_PASSWORD) as watcher:
        assert show(watcher, "VERSION")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="admin_users only"):
            watcher.execute("PAUSE")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            watcher.execute("KILL_CLIENT 1")
        watcher.execute("SET application_name = 'exporter'")
        assert show(watcher, "LISTS")  # the session goes on
    assert console.call(lambda: console.proxy.paused_all) is False


# --- PAUSE / RESUME / KILL ------------------------------------------------------------------


def test_pause_holds_a_clients_query_until_resume(console: ProxyThread) -> None:
    with connect(console.port) as app, admin_connect(console.port) as admin:
        app.execute("SELECT 1")  # the pool exists and has an idle server
        admin.execute("PAUSE app")
        assert pool_row(admin)["paused"] == 1
        query = Background(lambda: app.execute("SELECT 2").fetchone())
        query.start()
        wait_for(lambda: pool_row(admin)["cl_waiting"] == 1, what="the query to wait")
        assert query.is_alive()
        admin.execute("RESUME app")
        assert query.finish() == (2,)
        assert pool_row(admin)["paused"] == 0


def test_pause_answers_only_once_an_open_transaction_has_ended(console: ProxyThread) -> None:
    notices: list[str] = []
    with (
        psycopg.connect(conninfo(console.port), autocommit=False) as holder,
        admin_connect(console.port) as pauser,
        admin_connect(console.port) as watcher,
    ):
        holder.execute("SELECT 1")  # BEGIN; SELECT 1: holds a server, idle in transaction
        pauser.add_notice_handler(lambda diag: notices.append(diag.message_primary or ""))
        pause = Background(lambda: pauser.execute("PAUSE"))
        pause.start()
        wait_for(lambda: pool_row(watcher)["paused"] == 1, what="the pool to be paused")
        pause.join(0.3)
        assert pause.is_alive(), "PAUSE answered while a server was still in use"
        holder.commit()
        assert not isinstance(pause.finish(), BaseException)
        assert any("waiting for 1 server connection" in n for n in notices), notices
        watcher.execute("RESUME")
        holder.execute("SELECT 1")  # served again after RESUME
        holder.commit()


def test_pause_resume_and_kill_of_an_unknown_database_answer_3d000(console: ProxyThread) -> None:
    with admin_connect(console.port) as admin:
        for command in ("PAUSE nosuchdb", "RESUME nosuchdb", "KILL nosuchdb"):
            with pytest.raises(psycopg.errors.InvalidCatalogName, match="nosuchdb"):
                admin.execute(command)
        assert show(admin, "VERSION")
    assert console.call(lambda: console.proxy.paused_databases) == set()


def test_kill_disconnects_the_databases_clients_until_resume(console: ProxyThread) -> None:
    with connect(console.port) as victim, admin_connect(console.port) as admin:
        victim.execute("SELECT 1")
        notices: list[str] = []
        admin.add_notice_handler(lambda diag: notices.append(diag.message_primary or ""))
        admin.execute("KILL app")
        assert any("1 client(s)" in n for n in notices), notices
        with pytest.raises(psycopg.OperationalError):
            victim.execute("SELECT 1")
        assert pool_row(admin)["paused"] == 1
        admin.execute("RESUME app")
    with connect(console.port) as again:
        assert again.execute("SELECT 3").fetchone() == (3,)


def test_kill_client_disconnects_that_client_only(console: ProxyThread) -> None:
    with (
        connect(console.port, application_name="victim") as victim,
        connect(console.port, application_name="bystander") as bystander,
        admin_connect(console.port) as admin,
    ):
        victim.execute("SELECT 1")
        ids = {r["application_name"]: r["id"] for r in show(admin, "CLIENTS")}
        admin.execute(f"KILL_CLIENT {ids['victim']}")
        with pytest.raises(psycopg.OperationalError):
            victim.execute("SELECT 1")
        assert bystander.execute("SELECT 2").fetchone() == (2,)
        with pytest.raises(psycopg.errors.UndefinedObject, match="no client with id 999999"):
            admin.execute("KILL_CLIENT 999999")
        with pytest.raises(psycopg.errors.SyntaxError):
            admin.execute("KILL_CLIENT victim")


def test_shutdown_asks_the_proxy_to_stop(console: ProxyThread) -> None:
    with admin_connect(console.port) as admin:
        admin.execute("SHUTDOWN")
    assert console.call(lambda: console.proxy._stop is not None and console.proxy._stop.is_set())


# --- what SHOW reports ----------------------------------------------------------------------


def test_show_clients_shows_application_name_and_state(console: ProxyThread) -> None:
    with (
        connect(console.port, application_name="annotator-7") as app,
        admin_connect(console.port) as admin,
    ):
        app.execute("SELECT 1")
        rows = show(admin, "CLIENTS")
        mine = [r for r in rows if r["application_name"] == "annotator-7"]
        assert len(mine) == 1
        row = mine[0]
        assert (row["type"], row["user"], row["database"], row["state"]) == (
            "C",
            "app",
            "app",
            "idle",
        )
        assert row["addr"] == "127.0.0.1"
        assert isinstance(row["port"], int)
        assert row["link"] is None
        assert row["last_statement"] == "SELECT 1"
        # The console sessions are clients too.
        assert any(r["database"] == "pgproxy" and r["user"] == "admin" for r in rows)


def test_show_leaks_names_a_client_idle_in_transaction_with_its_last_statement(
    console: ProxyThread,
) -> None:
    with (
        psycopg.connect(
            conninfo(console.port, application_name="leaky-worker"),
            autocommit=False,
            prepare_threshold=None,
        ) as holder,
        admin_connect(console.port) as admin,
    ):
        holder.execute("SELECT 42 AS leak_marker")

        def leak() -> dict[str, Any] | None:
            rows = [r for r in show(admin, "LEAKS") if r["application_name"] == "leaky-worker"]
            return rows[0] if rows and rows[0]["state"] == "idle_in_transaction" else None

        row = wait_for(leak, what="the transaction to show as a leak")
        assert row is not None
        assert row["last_statement"] == "SELECT 42 AS leak_marker"
        assert (row["user"], row["database"], row["addr"]) == ("app", "app", "127.0.0.1")
        assert float(str(row["holding_seconds"])) >= 0
        server_id = row["link"]
        servers = {r["id"]: r for r in show(admin, "SERVERS")}
        assert servers[server_id]["state"] == "active"
        assert servers[server_id]["application_name"] == "leaky-worker"
        assert servers[server_id]["remote_pid"] > 0
        assert pool_row(admin)["cl_idle_in_transaction"] == 1
        holder.rollback()
        wait_for(lambda: not show(admin, "LEAKS"), what="the leak to end")


def test_show_stats_databases_lists_and_config(
    console: ProxyThread, app_credentials: Credentials
) -> None:
    with connect(console.port) as app, admin_connect(console.port) as admin:
        for n in range(3):
            app.execute(f"SELECT {n}")
        stats = [r for r in show(admin, "STATS") if r["database"] == "app"]
        assert len(stats) == 1
        for name in ("total_xact_count", "total_query_count", "total_received", "total_sent"):
            assert isinstance(stats[0][name], int) and stats[0][name] >= 0, name
        databases = {r["name"]: r for r in show(admin, "DATABASES")}
        assert databases["app"]["database"] == "app"
        assert databases["app"]["current_client_connections"] == 1
        assert databases["app"]["pool_size"] == 2
        assert "*" in databases  # any other name goes upstream as is
        lists = {r["list"]: r["items"] for r in show(admin, "LISTS")}
        assert lists["pools"] == 1
        assert lists["users"] == 3
        assert lists["used_clients"] >= 2
        config = {r["key"]: r for r in show(admin, "CONFIG")}
        assert set(config) == set(Settings.model_fields)
        assert config["users"]["value"] == "app,admin,watcher"
        assert config["admin_users"]["value"] == "admin"
        assert config["listen"]["changeable"] == "no"
        assert config["default_pool_size"]["changeable"] == "yes"
        text = repr(show(admin, "CONFIG"))
        for secret in (ADMIN_PASSWORD, WATCHER_PASSWORD, app_credentials.password):
            assert secret not in text


# --- protocol -------------------------------------------------------------------------------


def test_errors_and_extended_protocol_leave_the_session_usable(console: ProxyThread) -> None:
    with admin_connect(console.port) as admin:
        with pytest.raises(psycopg.errors.FeatureNotSupported, match="simple query protocol"):
            admin.execute("SHOW %s", ["POOLS"])  # parameters: Parse, Bind, Execute, Sync
        with pytest.raises(psycopg.errors.UndefinedObject, match="unknown SHOW item"):
            admin.execute("SHOW NOPE")
        with pytest.raises(psycopg.errors.SyntaxError, match="unknown admin console command"):
            admin.execute("SELECT 1")
        admin.execute("SET client_min_messages = warning")
        cur = admin.execute("SHOW VERSION; SHOW LISTS;")
        assert cur.fetchone() is not None
        assert cur.nextset()
        lists: dict[str, int] = dict(cur.fetchall())
        assert lists["users"] == 3


def test_reload_applies_a_new_configuration_and_refuses_a_bad_one(
    pg: LocalPostgres, console: ProxyThread, app_credentials: Credentials
) -> None:
    flags: dict[str, object] = {
        "listen": "127.0.0.1:0",
        "server": f"{pg.host}:{pg.port}",
        "users": [
            f"{app_credentials.user}:{app_credentials.password}",
            f"admin:{ADMIN_PASSWORD}",
            f"watcher:{WATCHER_PASSWORD}",
        ],
        "admin_users": "admin",
        "stats_users": "watcher",
        "default_pool_size": "5",
        "query_wait_timeout": "30",
        "metrics_listen": "",
        "monitor_interval": "0",
    }
    # What the command line gives the proxy: a way to read its configuration again.
    console.proxy._reload_settings = lambda: load_settings(flags, environ={})
    notices: list[str] = []
    with admin_connect(console.port) as admin:
        admin.add_notice_handler(lambda diag: notices.append(diag.message_primary or ""))
        admin.execute("RELOAD")
        assert "default_pool_size: 2 -> 5" in notices
        config = {r["key"]: r["value"] for r in show(admin, "CONFIG")}
        assert config["default_pool_size"] == "5"
        flags["default_pool_size"] = "0"
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="default_pool_size"):
            admin.execute("RELOAD")
        config = {r["key"]: r["value"] for r in show(admin, "CONFIG")}
        assert config["default_pool_size"] == "5"
