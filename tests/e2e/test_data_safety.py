"""A client that vanishes never leaves its server connection dirty for the next client."""

from __future__ import annotations

import psycopg
import pytest

from pgproxy.localpg import LocalPostgres

from .helpers import Background, connect, kill_socket, wait_for


def _app_backends(pg: LocalPostgres) -> list[tuple]:
    return pg.execute(
        "SELECT pid, state, query FROM pg_stat_activity "
        "WHERE usename = 'app' AND backend_type = 'client backend'"
    )


def _locks_on_safety(pg: LocalPostgres) -> int:
    rows = pg.execute(
        "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation "
        "WHERE c.relname = 'safety'",
        database="app",
    )
    return int(rows[0][0])


@pytest.mark.parametrize("how", ["killed", "terminated"])
def test_client_gone_mid_transaction_is_rolled_back_and_server_reused_clean(
    pg: LocalPostgres, make_proxy, counter_table, how: str
) -> None:
    proxy = make_proxy(default_pool_size="1")
    a = connect(proxy.port)
    a.execute("BEGIN")
    a.execute("UPDATE safety SET v = v + 1 WHERE id = 1")
    pid_a = a.execute("SELECT pg_backend_pid()").fetchone()[0]
    assert _locks_on_safety(pg) > 0
    if how == "killed":
        kill_socket(a)
    a.close()

    wait_for(lambda: _locks_on_safety(pg) == 0, what="the row lock to go")
    wait_for(
        lambda: all(state == "idle" for _, state, _ in _app_backends(pg)),
        what="no app backend idle in transaction",
    )
    with connect(proxy.port) as b:
        pid_b, xact = b.execute(
            "SELECT pg_backend_pid(), pg_current_xact_id_if_assigned()"
        ).fetchone()
        status = b.info.transaction_status
        value = b.execute("SELECT v FROM safety WHERE id = 1").fetchone()[0]
    assert pid_b == pid_a, "the server connection should have been rolled back and reused"
    assert xact is None
    assert status == psycopg.pq.TransactionStatus.IDLE
    assert value == 0, "the vanished client's update must have been rolled back"


def test_client_killed_mid_query_has_its_query_cancelled(pg: LocalPostgres, make_proxy) -> None:
    proxy = make_proxy(default_pool_size="1")
    a = connect(proxy.port)
    query = Background(lambda: a.execute("SELECT pg_sleep(30)"))
    query.start()
    wait_for(
        lambda: any("pg_sleep" in (q or "") and s == "active" for _, s, q in _app_backends(pg)),
        what="pg_sleep to run",
    )
    kill_socket(a)
    assert isinstance(query.finish(), psycopg.Error)
    a.close()
    wait_for(
        lambda: not any("pg_sleep" in (q or "") and s == "active" for _, s, q in _app_backends(pg)),
        timeout=5,
        what="the backend to stop sleeping",
    )
    with connect(proxy.port) as b:
        assert b.execute("SELECT 7").fetchone()[0] == 7
        assert b.info.transaction_status == psycopg.pq.TransactionStatus.IDLE


def test_client_killed_mid_copy_in_leaves_no_copy_behind(
    pg: LocalPostgres, make_proxy, counter_table
) -> None:
    proxy = make_proxy(default_pool_size="1")
    a = connect(proxy.port)
    copy_cm = a.cursor().copy("COPY safety (id, v) FROM STDIN")
    copy = copy_cm.__enter__()
    copy.write_row((2, 2))
    copy.write_row((3, 3))
    wait_for(
        lambda: any("COPY" in (q or "") for _, _, q in _app_backends(pg)), what="COPY to start"
    )
    kill_socket(a)
    a.close()
    wait_for(
        lambda: not any(s == "active" and "COPY" in (q or "") for _, s, q in _app_backends(pg)),
        what="the COPY backend to end",
    )
    with connect(proxy.port) as b:
        rows = b.execute("SELECT id FROM safety ORDER BY id").fetchall()
        assert b.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    assert rows == [(1,)], "a half-done COPY must not be committed"


def test_client_killed_mid_result_does_not_pass_rows_to_next_client(
    pg: LocalPostgres, make_proxy
) -> None:
    proxy = make_proxy(default_pool_size="1")
    a = connect(proxy.port)
    cur = a.cursor()
    # A result far larger than the socket buffers, so the server is still sending.
    cur.execute("SELECT repeat('a', 1000) FROM generate_series(1, 200000)")
    kill_socket(a)
    a.close()
    for _ in range(3):
        with connect(proxy.port) as b:
            assert b.execute("SELECT 'mine'").fetchall() == [("mine",)]
            assert b.info.transaction_status == psycopg.pq.TransactionStatus.IDLE


def test_client_vanishing_between_transactions_keeps_server_in_pool(
    pg: LocalPostgres, make_proxy
) -> None:
    proxy = make_proxy(default_pool_size="1")
    a = connect(proxy.port)
    pid_a = a.execute("SELECT pg_backend_pid()").fetchone()[0]
    kill_socket(a)
    a.close()
    with connect(proxy.port) as b:
        assert b.execute("SELECT pg_backend_pid()").fetchone()[0] == pid_a


def test_idle_transaction_timeout_ends_the_client_and_returns_its_server_rolled_back(
    pg: LocalPostgres, make_proxy, counter_table
) -> None:
    proxy = make_proxy(default_pool_size="1", idle_transaction_timeout="1")
    a = connect(proxy.port)
    a.execute("BEGIN")
    a.execute("UPDATE safety SET v = 99 WHERE id = 1")
    pid_a = a.execute("SELECT pg_backend_pid()").fetchone()[0]
    with connect(proxy.port) as b:
        # b waits for the only server until the watchdog ends a's idle transaction.
        pid_b, value = b.execute("SELECT pg_backend_pid(), v FROM safety WHERE id = 1").fetchone()
    assert pid_b == pid_a, "the server should have been rolled back and reused, not closed"
    assert value == 0
    with pytest.raises(psycopg.errors.IdleInTransactionSessionTimeout) as info:
        a.execute("SELECT 1")
    assert "idle-in-transaction timeout" in str(info.value)
    a.close()
