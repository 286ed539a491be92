"""Watchdog: idle-in-transaction warnings, the timeouts, the wait notice, and what they leave."""

from __future__ import annotations

import logging
import time

import psycopg
import psycopg.errors
import pytest

from pgproxy import report
from pgproxy.localpg import LocalPostgres

from .helpers import Background, connect, wait_for


def backend_state(pg: LocalPostgres, pid: int) -> tuple[str | None, int]:
    """(state in pg_stat_activity or None when gone, number of locks it holds but its own)."""
    rows = pg.execute(
        "SELECT state, (SELECT count(*) FROM pg_locks l WHERE l.pid = a.pid "
        "AND l.locktype <> 'virtualxid') FROM pg_stat_activity a WHERE pid = $1",
        pid,
    )
    if not rows:
        return None, 0
    return rows[0][0], int(rows[0][1])


def offender_lines(caplog: pytest.LogCaptureFixture, needle: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "pgproxy" and r.levelno == logging.WARNING and needle in r.getMessage()
    ]


def test_idle_in_transaction_is_named_then_ended_and_its_server_reused_clean(
    pg: LocalPostgres, make_proxy, counter_table, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="pgproxy")
    proxy = make_proxy(
        default_pool_size="1", idle_transaction_warn="0.3", idle_transaction_timeout="2"
    )
    a = connect(proxy.port, application_name="bulk-export-7")
    a.execute("BEGIN")
    pid = a.execute("SELECT pg_backend_pid()").fetchone()[0]
    a.execute("UPDATE safety SET v = 41 WHERE id = 1")
    lines = wait_for(
        lambda: offender_lines(caplog, "idle in transaction"), what="the idle-in-transaction line"
    )
    assert len(lines) == 1
    line = lines[0]
    assert "application_name=bulk-export-7" in line
    assert "UPDATE safety SET v = 41 WHERE id = 1" in line
    assert "user=app database=app" in line
    # Visible in the leak report while it happens.
    leaks = proxy.call(lambda: report.leaks(proxy.proxy, proxy.proxy.now()))
    assert [(r.application_name, r.state) for r in leaks] == [
        ("bulk-export-7", report.IDLE_IN_TRANSACTION)
    ]
    assert leaks[0].last_statement == "UPDATE safety SET v = 41 WHERE id = 1"
    assert backend_state(pg, pid)[0] == "idle in transaction"
    # At the timeout the proxy rolls the server back: Postgres shows it idle, lock-free.
    wait_for(lambda: backend_state(pg, pid) == ("idle", 0), what="the rollback")
    with pytest.raises(psycopg.errors.IdleInTransactionSessionTimeout):
        a.execute("SELECT 1")
    a.close()
    with connect(proxy.port) as b:
        assert b.execute("SELECT pg_backend_pid(), v FROM safety WHERE id = 1").fetchone() == (
            pid,
            0,
        )
    assert backend_state(pg, pid) == ("idle", 0)
    assert len(offender_lines(caplog, "idle in transaction")) == 1  # once per episode
    stats = proxy.call(lambda: proxy.proxy.pools[next(iter(proxy.proxy.pools))].stats)
    assert stats.disconnects.get("idle_transaction_timeout") == 1
    assert stats.errors.get("25P03") == 1


def test_statement_text_stays_out_of_logs_when_tracking_is_off(
    make_proxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="pgproxy")
    proxy = make_proxy(idle_transaction_warn="0.2", track_statement_text="false")
    with connect(proxy.port) as a:
        a.execute("BEGIN")
        a.execute("SELECT 'a secret literal'")
        line = wait_for(lambda: offender_lines(caplog, "idle in transaction"))[0]
        a.execute("ROLLBACK")
    assert "secret" not in line
    assert "(not tracked)" in line


def test_query_timeout_cancels_the_query_and_keeps_the_client(make_proxy) -> None:
    proxy = make_proxy(default_pool_size="1", query_timeout="0.5")
    notices: list[str] = []
    with connect(proxy.port) as a:
        a.add_notice_handler(lambda diag: notices.append(diag.message_primary or ""))
        pid = a.execute("SELECT pg_backend_pid()").fetchone()[0]
        started = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled):
            a.execute("SELECT pg_sleep(30)")
        assert time.monotonic() - started < 10
        assert any("query_timeout" in n for n in notices)
        # Same connection, same server, usable.
        assert a.execute("SELECT pg_backend_pid()").fetchone()[0] == pid


def test_transaction_timeout_ends_a_long_transaction_and_rolls_its_server_back(
    pg: LocalPostgres, make_proxy, counter_table
) -> None:
    proxy = make_proxy(default_pool_size="1", transaction_timeout="1")
    a = connect(proxy.port)
    a.execute("BEGIN")
    pid = a.execute("SELECT pg_backend_pid()").fetchone()[0]
    a.execute("UPDATE safety SET v = 7 WHERE id = 1")

    def ended() -> bool:
        try:
            a.execute("SELECT 1")
        except psycopg.errors.TransactionTimeout:
            return True
        return False

    wait_for(ended, interval=0.1, what="the transaction_timeout error")
    a.close()
    with connect(proxy.port) as b:
        assert b.execute("SELECT pg_backend_pid(), v FROM safety WHERE id = 1").fetchone() == (
            pid,
            0,
        )


def test_transaction_timeout_during_a_query_cancels_it_and_closes_that_server(
    pg: LocalPostgres, make_proxy
) -> None:
    proxy = make_proxy(default_pool_size="1", transaction_timeout="0.5")
    a = connect(proxy.port)
    pid = a.execute("SELECT pg_backend_pid()").fetchone()[0]
    with pytest.raises(psycopg.errors.TransactionTimeout):
        a.execute("SELECT pg_sleep(30)")
    a.close()
    wait_for(lambda: backend_state(pg, pid)[0] is None, what="the backend to be gone")
    with connect(proxy.port) as b:
        assert b.execute("SELECT 1").fetchone() == (1,)


def test_client_idle_timeout_closes_a_silent_client_only(make_proxy) -> None:
    proxy = make_proxy(client_idle_timeout="0.5")
    silent = connect(proxy.port)
    busy = connect(proxy.port)
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        busy.execute("SELECT 1")  # keeps giving its server back: idle for 0 s each time
        time.sleep(0.05)
    with pytest.raises(psycopg.errors.IdleSessionTimeout):
        silent.execute("SELECT 1")
    assert busy.execute("SELECT 2").fetchone() == (2,)
    silent.close()
    busy.close()


def test_a_waiting_client_is_told_why_and_then_served(make_proxy) -> None:
    proxy = make_proxy(default_pool_size="1", query_wait_notify="0.3")
    holder = connect(proxy.port)
    holder.execute("BEGIN")
    holder.execute("SELECT 1")
    notices: list[str] = []
    waiter = connect(proxy.port)
    waiter.add_notice_handler(lambda diag: notices.append(diag.message_primary or ""))
    job = Background(lambda: waiter.execute("SELECT 42").fetchone())
    job.start()
    wait_for(lambda: notices, what="the wait notice")
    assert "waiting for a server connection" in notices[0]
    assert "all 1 are in use" in notices[0]
    waiting = proxy.call(lambda: report.pools(proxy.proxy, proxy.proxy.now()))[0]
    assert waiting.clients[report.WAITING] == 1
    assert waiting.longest_wait > 0
    holder.execute("COMMIT")
    assert job.finish() == (42,)
    assert len(notices) == 1
    holder.close()
    waiter.close()


def test_database_and_user_settings_override_the_global_timeouts(make_proxy) -> None:
    proxy = make_proxy(
        databases=["app=query_timeout=30"],
        user_settings=["app=query_timeout=0.3"],
        query_timeout="0",
    )
    with connect(proxy.port) as a, pytest.raises(psycopg.errors.QueryCanceled):
        a.execute("SELECT pg_sleep(30)")


def test_pool_stats_count_queries_transactions_bytes_and_waits(make_proxy) -> None:
    proxy = make_proxy(default_pool_size="1")
    with connect(proxy.port) as a:
        for _ in range(3):
            a.execute("SELECT 1")
        with a.transaction():
            a.execute("SELECT 1")
            a.execute("SELECT 2")
        with pytest.raises(psycopg.errors.UndefinedTable):
            a.execute("SELECT * FROM no_such_table")
    pool = proxy.call(lambda: report.pools(proxy.proxy, proxy.proxy.now()))[0]
    stats = pool.stats
    # 3 autocommit + BEGIN, 2 selects, COMMIT + the failed one.
    assert stats.queries == 8
    assert stats.transactions == 5
    assert stats.query_time.count == 8
    assert stats.transaction_time.count == 5
    # Timed from each query's start, not from some earlier moment (a prelude, the epoch).
    assert 0 < stats.query_time.sum < 5
    assert 0 < stats.transaction_time.sum < 5
    assert stats.errors == {"42P01": 1}
    assert stats.logins == 1
    assert stats.received > 0 and stats.sent > stats.received
    assert stats.wait_time.count >= 1
    wait_for(lambda: proxy.call(lambda: dict(stats.disconnects)) == {"client_terminate": 1})
