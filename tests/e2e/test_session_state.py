"""Session state the pool cannot move keeps its client on one server, and never leaks."""

from __future__ import annotations

import psycopg
import pytest

from pgproxy.localpg import LocalPostgres

from .helpers import connect


def test_set_outside_a_transaction_follows_its_client_and_reaches_nobody_else(
    pg: LocalPostgres, make_proxy
) -> None:
    proxy = make_proxy(default_pool_size="2")
    a = connect(proxy.port)
    a.execute("SET work_mem = '7MB'")
    pids = set()
    for _ in range(5):
        with connect(proxy.port) as b:
            assert b.execute("SHOW work_mem").fetchone()[0] == "4MB"
        pid, value = a.execute("SELECT pg_backend_pid(), current_setting('work_mem')").fetchone()
        pids.add(pid)
        assert value == "7MB"  # on whichever server `a` gets
    assert all(p is None for p in proxy.call(lambda: [s.state.pinned for s in proxy.proxy.servers]))
    a.execute("RESET work_mem")
    assert a.execute("SHOW work_mem").fetchone()[0] == "4MB"
    a.close()
    # Once it left, its server was reset before reuse.
    with connect(proxy.port) as c, connect(proxy.port) as d:
        c.execute("BEGIN")
        d.execute("BEGIN")
        rows = [x.execute("SELECT current_setting('work_mem')").fetchone()[0] for x in (c, d)]
        assert rows == ["4MB", "4MB"]


def test_set_inside_a_transaction_pins_and_is_reset_before_reuse(
    pg: LocalPostgres, make_proxy
) -> None:
    proxy = make_proxy(default_pool_size="2")
    a = connect(proxy.port)
    a.execute("BEGIN")
    a.execute("SET work_mem = '9MB'")
    a.execute("COMMIT")
    pid_a = a.execute("SELECT pg_backend_pid()").fetchone()[0]
    with connect(proxy.port) as b:
        assert b.execute("SHOW work_mem").fetchone()[0] == "4MB"
    assert a.execute("SELECT pg_backend_pid(), current_setting('work_mem')").fetchone() == (
        pid_a,
        "9MB",
    )
    a.close()
    with connect(proxy.port) as c, connect(proxy.port) as d:
        c.execute("BEGIN")
        d.execute("BEGIN")
        rows = [x.execute("SELECT current_setting('work_mem')").fetchone()[0] for x in (c, d)]
        assert rows == ["4MB", "4MB"]


def test_temp_table_and_advisory_lock_are_dropped_before_the_server_is_reused(
    pg: LocalPostgres, make_proxy
) -> None:
    proxy = make_proxy(default_pool_size="1")
    with connect(proxy.port) as a:
        a.execute("CREATE TEMP TABLE scratch (a int)")
        a.execute("SELECT pg_advisory_lock(4242)")
        pid_a = a.execute("SELECT pg_backend_pid()").fetchone()[0]
    with connect(proxy.port) as b:
        pid_b, temp_tables = b.execute(
            "SELECT pg_backend_pid(), count(*) FROM pg_class WHERE relname = 'scratch'"
        ).fetchone()
        locks = b.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = 4242"
        ).fetchone()[0]
    assert pid_b == pid_a
    assert temp_tables == 0
    assert locks == 0


def test_a_closed_with_hold_cursor_gives_the_server_back(pg: LocalPostgres, make_proxy) -> None:
    """Django's .iterator() outside a transaction declares one; closing it must unpin."""
    proxy = make_proxy(default_pool_size="1", query_wait_timeout="3")
    with connect(proxy.port) as a:
        a.execute('DECLARE "Big" NO SCROLL CURSOR WITH HOLD FOR SELECT generate_series(1, 100)')
        assert len(a.execute('FETCH FORWARD 1000 FROM "Big"').fetchall()) == 100
        # While the cursor is open the server stays with `a`: nobody else may see it.
        assert proxy.call(lambda: [s.state.pinned for s in proxy.proxy.servers]) == [
            "WITH HOLD cursor"
        ]
        a.execute('CLOSE "Big"')
        with connect(proxy.port) as b:  # would wait 3 s and fail if `a` kept the server
            assert b.execute("SELECT 1").fetchone() == (1,)
        assert a.execute("SELECT 2").fetchone() == (2,)
    assert proxy.proxy.pins_total == 1


def test_notify_reaches_a_pinned_listener(pg: LocalPostgres, make_proxy) -> None:
    proxy = make_proxy(default_pool_size="2")
    with connect(proxy.port) as listener, connect(proxy.port) as sender:
        listener.execute("LISTEN jobs")
        sender.execute("NOTIFY jobs, 'hello'")
        notices = listener.notifies(timeout=5, stop_after=1)
        received = [(n.channel, n.payload) for n in notices]
    assert received == [("jobs", "hello")]


def test_pins_past_max_pinned_servers_are_refused_and_the_pool_stays_usable(
    pg: LocalPostgres, make_proxy
) -> None:
    proxy = make_proxy(default_pool_size="2")  # max_pinned_servers 0: 2 - 1 = 1 pin allowed
    with connect(proxy.port) as a, connect(proxy.port) as b:
        a.execute("LISTEN first")
        with pytest.raises(psycopg.OperationalError) as info:
            b.execute("LISTEN second")
        assert "max_pinned_servers" in str(info.value)
        assert info.value.sqlstate == "53000"
        with connect(proxy.port) as c:  # the unpinned server still serves everyone else
            assert c.execute("SELECT 1").fetchone() == (1,)
        listening = pg.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE query = 'LISTEN second'"
        )
        assert listening == [(0,)], "the refused LISTEN must not have run"
    assert proxy.proxy.pins_total == 1
