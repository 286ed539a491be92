"""CancelRequest with the proxy's own key reaches the server serving that client."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

import psycopg
import pytest

from pgproxy.localpg import LocalPostgres

from .helpers import APP_PASSWORD, Background, connect, wait_for


def _sleeping(pg: LocalPostgres) -> bool:
    rows = pg.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app' "
        "AND state = 'active' AND query LIKE '%pg_sleep%'"
    )
    return int(rows[0][0]) > 0


def test_psql_ctrl_c_cancels_the_query_within_a_second(pg: LocalPostgres, make_proxy) -> None:
    proxy = make_proxy()
    env = dict(os.environ, PGPASSWORD=APP_PASSWORD)
    psql = subprocess.Popen(
        [
            "psql",
            "-h",
            "127.0.0.1",
            "-p",
            str(proxy.port),
            "-U",
            "app",
            "app",
            "-c",
            "SELECT pg_sleep(30)",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: _sleeping(pg), what="pg_sleep to start")
        sent_at = time.monotonic()
        psql.send_signal(signal.SIGINT)
        _, err = psql.communicate(timeout=5)
        elapsed = time.monotonic() - sent_at
    finally:
        psql.kill()
    assert "canceling statement due to user request" in err
    assert elapsed < 1.0


def test_driver_cancel_of_a_client_without_server_cancels_nothing(
    pg: LocalPostgres, make_proxy
) -> None:
    proxy = make_proxy(default_pool_size="1")
    idle = connect(proxy.port)
    idle.execute("SELECT 1")  # logged in and back to idle: no server linked
    busy = connect(proxy.port)
    query = Background(lambda: busy.execute("SELECT pg_sleep(1), 'done'").fetchone()[1])
    query.start()
    wait_for(lambda: _sleeping(pg), what="pg_sleep to start")
    # cancel_safe(): the blocking cancel() holds the GIL inside libpq while it waits for an
    # answer from the proxy, which runs on a thread of this same process.
    idle.cancel_safe()  # the shared server runs the other client's query: it must not be touched
    assert query.finish() == "done"
    assert idle.execute("SELECT 2").fetchone()[0] == 2
    idle.close()
    busy.close()


def test_cancel_with_a_wrong_secret_is_ignored(pg: LocalPostgres, make_proxy) -> None:
    proxy = make_proxy()
    conn = connect(proxy.port)
    pid = conn.pgconn.backend_pid
    assert pid > 0

    query = Background(lambda: conn.execute("SELECT pg_sleep(0.5), 'done'").fetchone()[1])
    query.start()
    wait_for(lambda: _sleeping(pg), what="pg_sleep to start")
    with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
        sock.sendall(
            (16).to_bytes(4, "big")
            + (80877102).to_bytes(4, "big")
            + pid.to_bytes(4, "big")
            + (12345).to_bytes(4, "big")
        )
        assert sock.recv(10) == b""
    assert query.finish() == "done"
    conn.close()


def test_psycopg_cancel_reports_query_canceled(pg: LocalPostgres, make_proxy) -> None:
    proxy = make_proxy()
    conn = connect(proxy.port)
    query = Background(lambda: conn.execute("SELECT pg_sleep(30)"))
    query.start()
    wait_for(lambda: _sleeping(pg), what="pg_sleep to start")
    started = time.monotonic()
    conn.cancel_safe()
    outcome = query.finish()
    assert time.monotonic() - started < 2
    assert isinstance(outcome, psycopg.errors.QueryCanceled)
    assert conn.execute("SELECT 3").fetchone()[0] == 3
    conn.close()


@pytest.fixture(autouse=True)
def _no_sleepers_left(pg: LocalPostgres):
    yield
    wait_for(lambda: not _sleeping(pg), what="no pg_sleep left running")
