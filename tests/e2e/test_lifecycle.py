"""The real command line as a process: start, graceful drain on SIGTERM, forced stop, logging.

Each test runs `python -m pgproxy` against the session cluster, talks to it with psycopg and
signals it like an orchestrator would (SIGTERM, then maybe a second signal). Its stderr goes
to a file so that tests can read the log while it runs.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import psycopg
import pytest

from pgproxy.localpg import LocalPostgres, free_port
from pgproxy.wire import messages

from .helpers import REPO, cli_env, connect, wait_for


class Notice(NamedTuple):
    severity: str | None
    sqlstate: str | None
    message: str | None


@pytest.fixture
def table(pg: LocalPostgres) -> Iterator[str]:
    """An empty table owned by `app`; dropped afterwards."""
    name = "lifecycle_rows"
    pg.execute(f"CREATE TABLE {name} (id int PRIMARY KEY)", database="app")
    pg.execute(f"ALTER TABLE {name} OWNER TO app", database="app")
    yield name
    pg.execute(f"DROP TABLE {name}", database="app")


def _rows(pg: LocalPostgres, table: str) -> list[int]:
    return [row[0] for row in pg.execute(f"SELECT id FROM {table} ORDER BY id", database="app")]


def _no_app_backends(pg: LocalPostgres) -> None:
    assert pg.wait_for_backends(0, user="app"), f"app backends remain: {pg.backends(user='app')}"


def _drain_socket(conn: psycopg.Connection, timeout: float) -> bytes:
    """Everything the proxy sends on `conn` until it closes; fails if it does not close."""
    sock = socket.socket(fileno=conn.fileno())
    try:
        sock.settimeout(timeout)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        return data
    finally:
        sock.detach()


def _error_fields(data: bytes) -> list[dict[str, str]]:
    """Fields of every ErrorResponse in a stream of backend messages."""
    out = []
    pos = 0
    while pos + 5 <= len(data):
        length = int.from_bytes(data[pos + 1 : pos + 5], "big")
        if data[pos : pos + 1] == b"E":
            out.append(messages.parse_fields(data[pos + 5 : pos + 1 + length]))
        pos += 1 + length
    return out


def _notices(conn: psycopg.Connection) -> list[Notice]:
    """Collect what libpq reports as notices on `conn`.

    An ErrorResponse that arrives while libpq is idle (here: the proxy's FATAL right behind
    the ReadyForQuery of COMMIT, often in the same TCP read) is passed to the notice
    processor by libpq ("unexpected message in IDLE state"), and the next query then only
    reports "server closed the connection unexpectedly". Postgres' own FATALs behave the same.
    """
    seen: list[Notice] = []

    def keep(diag: psycopg.errors.Diagnostic) -> None:
        # The Diagnostic is only valid inside the handler: copy its fields out.
        seen.append(Notice(diag.severity_nonlocalized, diag.sqlstate, diag.message_primary))

    conn.add_notice_handler(keep)
    return seen


def _assert_told_shutting_down(exc: psycopg.Error, notices: list[Notice]) -> None:
    """The client learnt the reason (57P01), as the error itself or as a FATAL notice."""
    if exc.sqlstate == "57P01" or "shutting down" in str(exc):
        return
    told = [n for n in notices if n.sqlstate == "57P01" and n.severity == "FATAL"]
    assert told, f"not told why: {exc!r}, notices {notices}"
    assert "shutting down" in (told[0].message or "")


def test_sigterm_lets_a_linked_client_commit_then_closes_it_and_exits_0(
    pg: LocalPostgres, start_cli, table: str
) -> None:
    proxy = start_cli()
    conn = connect(proxy.port)
    notices = _notices(conn)
    try:
        conn.execute("BEGIN")
        conn.execute(f"INSERT INTO {table} VALUES (1)")
        proxy.process.send_signal(signal.SIGTERM)
        wait_for(proxy.is_refusing, timeout=5, what="new connections to be refused")
        with pytest.raises(psycopg.OperationalError):
            connect(proxy.port, connect_timeout=5).close()

        conn.execute(f"INSERT INTO {table} VALUES (2)")
        conn.execute("COMMIT")
        assert _rows(pg, table) == [1, 2]
        with pytest.raises(psycopg.OperationalError) as caught:
            conn.execute("SELECT 1")
        _assert_told_shutting_down(caught.value, notices)
    finally:
        conn.close()
    assert proxy.wait(timeout=5) == 0, proxy.log()
    _no_app_backends(pg)


def test_sigterm_disconnects_an_idle_client_at_once_with_57p01(
    pg: LocalPostgres, start_cli
) -> None:
    proxy = start_cli()
    conn = connect(proxy.port)
    try:
        conn.execute("SELECT 1")  # logged in, served, back to idle: no server linked
        sent_at = time.monotonic()
        proxy.process.send_signal(signal.SIGTERM)
        received = _drain_socket(conn, timeout=3)
        closed_after = time.monotonic() - sent_at
    finally:
        conn.close()
    errors = _error_fields(received)
    assert len(errors) == 1, received
    assert errors[0]["S"] == "FATAL"
    assert errors[0]["C"] == "57P01"
    assert closed_after < 1.5
    assert proxy.wait(timeout=3) == 0, proxy.log()
    assert time.monotonic() - sent_at < 3
    _no_app_backends(pg)


@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_second_signal_stops_at_once_and_the_open_transaction_is_rolled_back(
    pg: LocalPostgres, start_cli, table: str, second: signal.Signals
) -> None:
    proxy = start_cli()
    conn = connect(proxy.port)
    try:
        conn.execute("BEGIN")
        conn.execute(f"INSERT INTO {table} VALUES (1)")
        proxy.process.send_signal(signal.SIGTERM)
        # Signals are not queued: wait until the first one is handled before the second.
        wait_for(proxy.is_refusing, timeout=5, what="the first signal to be handled")
        sent_at = time.monotonic()
        proxy.process.send_signal(second)
        code = proxy.wait(timeout=3)
        assert time.monotonic() - sent_at < 3
        with pytest.raises(psycopg.OperationalError):
            conn.execute("COMMIT")
    finally:
        conn.close()
    assert code == 0, proxy.log()
    assert "Traceback" not in proxy.log()
    _no_app_backends(pg)
    assert _rows(pg, table) == []


def test_shutdown_timeout_cuts_a_client_that_stays_in_its_transaction(
    pg: LocalPostgres, start_cli, table: str
) -> None:
    proxy = start_cli(shutdown_timeout="1")
    conn = connect(proxy.port)
    try:
        conn.execute("BEGIN")
        conn.execute(f"INSERT INTO {table} VALUES (1)")
        sent_at = time.monotonic()
        notices = _notices(conn)
        proxy.process.send_signal(signal.SIGTERM)
        code = proxy.wait(timeout=6)
        elapsed = time.monotonic() - sent_at
        with pytest.raises(psycopg.OperationalError) as caught:
            conn.execute("COMMIT")
        _assert_told_shutting_down(caught.value, notices)
    finally:
        conn.close()
    assert code == 0, proxy.log()
    assert 0.8 <= elapsed < 4, elapsed
    _no_app_backends(pg)
    assert _rows(pg, table) == []


def test_log_has_one_line_per_login_and_disconnect_and_none_per_query(start_cli) -> None:
    proxy = start_cli()
    conn = connect(proxy.port, application_name="lifecycle-test")
    try:
        conn.execute("SELECT 1")
        before = len(proxy.log().splitlines())
        for i in range(50):
            assert conn.execute("SELECT %s::int", (i,)).fetchone() == (i,)
        after = len(proxy.log().splitlines())
    finally:
        conn.close()
    assert after == before, proxy.log()
    lines = wait_for(
        lambda: proxy.log_lines(" disconnected ("), timeout=5, what="the disconnect line"
    )
    assert len(lines) == 1, lines
    assert "(client_terminate)" in lines[0]
    assert "user=app" in lines[0]
    logins = proxy.log_lines("login: user=app")
    assert len(logins) == 1, proxy.log()
    assert "application_name=lifecycle-test" in logins[0]
    proxy.process.send_signal(signal.SIGTERM)
    assert proxy.wait(timeout=5) == 0


def test_bad_setting_exits_2_with_one_line_naming_it() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pgproxy", "--default-pool-size", "0"],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "default_pool_size" in lines[0]
    assert result.stdout == ""


def test_sighup_reloads_the_config_file_and_a_bad_one_changes_nothing(
    start_cli, tmp_path: Path
) -> None:
    config = tmp_path / "pgproxy.toml"
    config.write_text("query_timeout = 0\n")
    proxy = start_cli("--config", str(config))
    config.write_text("query_timeout = 0.3\n")
    proxy.process.send_signal(signal.SIGHUP)
    wait_for(lambda: "reload: query_timeout: 0.0 -> 0.3" in proxy.log(), what="the reload line")
    with connect(proxy.port) as conn, pytest.raises(psycopg.errors.QueryCanceled):
        conn.execute("SELECT pg_sleep(30)")
    config.write_text("query_timeout = -1\n")
    proxy.process.send_signal(signal.SIGHUP)
    wait_for(lambda: "reload failed, settings unchanged: query_timeout" in proxy.log())
    with connect(proxy.port) as conn, pytest.raises(psycopg.errors.QueryCanceled):
        conn.execute("SELECT pg_sleep(30)")
    assert proxy.process.poll() is None


def test_the_grace_period_fails_readyz_at_once_serves_new_clients_then_drains(
    pg: LocalPostgres, start_cli, table: str
) -> None:
    """A rolling deploy: SIGTERM; /readyz fails while new clients are still served for
    shutdown_grace_period; then idle clients get 57P01, the open transaction commits, exit 0."""
    metrics_port = free_port()
    proxy = start_cli(
        "--shutdown-grace-period", "1.5", "--metrics-listen", f"127.0.0.1:{metrics_port}"
    )
    ready = f"http://127.0.0.1:{metrics_port}/readyz"

    def readyz() -> int:
        try:
            with urllib.request.urlopen(ready, timeout=5) as reply:
                return int(reply.status)
        except urllib.error.HTTPError as exc:
            return exc.code

    assert readyz() == 200
    idle = connect(proxy.port)
    linked = connect(proxy.port)
    try:
        idle.execute("SELECT 1")
        linked.execute("BEGIN")
        linked.execute(f"INSERT INTO {table} VALUES (1)")
        sent_at = time.monotonic()
        proxy.process.send_signal(signal.SIGTERM)
        wait_for(lambda: readyz() == 503, timeout=1, what="/readyz to fail")
        with connect(proxy.port) as late:  # still accepted during the grace period
            assert late.execute("SELECT 2").fetchone() == (2,)
        assert idle.execute("SELECT 3").fetchone() == (3,)
        assert time.monotonic() - sent_at < 1.5  # all of this within the grace period
        wait_for(proxy.is_refusing, timeout=5, what="the listener to close after the grace")
        assert time.monotonic() - sent_at >= 1.4
        received = _drain_socket(idle, timeout=3)
        assert [e["C"] for e in _error_fields(received)] == ["57P01"]
        linked.execute("COMMIT")
    finally:
        idle.close()
        linked.close()
    assert proxy.wait(timeout=10) == 0, proxy.log()
    assert _rows(pg, table) == [1]
