"""Pool maintenance seen from outside: warm-up, idle and lifetime expiry, queue order, waits.

The watchdog ticks once a second, so the timing settings here are 1 s and the polls allow a
few ticks. Backend pids (`pg_backend_pid()`) tell which server connection served a query.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import datetime
from functools import partial

import psycopg
import pytest

from pgproxy.core.pool import PoolKey
from pgproxy.localpg import LocalPostgres

from .helpers import connect, wait_for

APP_POOL = PoolKey("app", "app")


def _pid(conn: psycopg.Connection) -> int:
    row = conn.execute("SELECT pg_backend_pid()").fetchone()
    assert row is not None
    return int(row[0])


def _waiters(proxy) -> int:
    return int(proxy.call(lambda: len(proxy.proxy.pools[APP_POOL].waiters)))


def _has_waiters(proxy, count: int) -> bool:
    return _waiters(proxy) == count


def _backend_alive(pg: LocalPostgres, pid: int) -> bool:
    rows = pg.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = $1::int", pid)
    return int(rows[0][0]) == 1


class Background:
    """Run one query on a connection in a thread; `result()` is its row or its exception."""

    def __init__(self, conn: psycopg.Connection, sql: str) -> None:
        self._out: list[object] = []
        self._thread = threading.Thread(target=self._run, args=(conn, sql), daemon=True)
        self._thread.start()

    def _run(self, conn: psycopg.Connection, sql: str) -> None:
        try:
            self._out.append(conn.execute(sql).fetchone())
        except BaseException as exc:
            self._out.append(exc)

    def result(self, timeout: float = 10) -> object:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the background query did not finish"
        return self._out[0]


def test_min_pool_size_tops_the_pool_up_after_the_first_login(
    make_proxy, pg_backends: Callable[..., int]
) -> None:
    proxy = make_proxy(min_pool_size="2")
    assert proxy.server_count() == 0  # nothing is opened before a pool exists
    with connect(proxy.port):
        wait_for(lambda: proxy.server_count() == 2, what="the pool to reach min_pool_size")
        wait_for(lambda: pg_backends() == 2, what="2 app backends on Postgres")
    # min_pool_size keeps them after the client leaves.
    time.sleep(1.5)  # not a synchronisation: asserting that nothing is closed
    assert proxy.server_count() == 2


def test_idle_server_is_closed_after_server_idle_timeout(make_proxy, pg: LocalPostgres) -> None:
    proxy = make_proxy(server_idle_timeout="1")
    with connect(proxy.port) as conn:
        pid = _pid(conn)
        returned_at = time.monotonic()
        wait_for(lambda: proxy.server_count() == 0, timeout=5, what="the idle server to close")
        closed_after = time.monotonic() - returned_at
        wait_for(lambda: not _backend_alive(pg, pid), what="its backend to end")
        assert 0.9 <= closed_after <= 3.5, closed_after
        # The client is untouched and gets a fresh server.
        assert _pid(conn) != pid


def test_server_idle_timeout_never_closes_a_server_in_a_transaction(
    make_proxy, pg: LocalPostgres
) -> None:
    proxy = make_proxy(server_idle_timeout="1")
    with connect(proxy.port) as conn:
        conn.execute("BEGIN")
        pid = _pid(conn)
        time.sleep(3)  # not a synchronisation: three ticks past the timeout, nothing may happen
        assert proxy.server_count() == 1
        assert _backend_alive(pg, pid)
        assert _pid(conn) == pid
        conn.execute("COMMIT")


def test_server_lifetime_waits_for_the_client_then_replaces_the_server(
    make_proxy, pg: LocalPostgres
) -> None:
    proxy = make_proxy(server_lifetime="1", default_pool_size="1")
    with connect(proxy.port) as holder:
        holder.execute("BEGIN")
        old_pid = _pid(holder)
        time.sleep(2)  # not a synchronisation: past its lifetime, the server must stay
        assert _pid(holder) == old_pid
        holder.execute("COMMIT")
    wait_for(lambda: not _backend_alive(pg, old_pid), what="the old backend to end")
    with connect(proxy.port) as conn:
        new_pid = _pid(conn)
    assert new_pid != old_pid


def test_most_recently_returned_idle_server_is_reused_first(make_proxy) -> None:
    proxy = make_proxy(default_pool_size="2")
    first = connect(proxy.port)
    second = connect(proxy.port)
    third = connect(proxy.port)
    try:
        first.execute("BEGIN")
        pid_a = _pid(first)
        second.execute("BEGIN")
        pid_b = _pid(second)
        assert pid_a != pid_b
        first.execute("COMMIT")
        second.execute("COMMIT")  # b is now the most recently used
        assert _pid(third) == pid_b

        first.execute("BEGIN")
        assert _pid(first) == pid_b  # third gave b back, still on top
        second.execute("BEGIN")
        assert _pid(second) == pid_a
        first.execute("COMMIT")
        second.execute("COMMIT")  # now a is on top
        assert _pid(third) == pid_a
    finally:
        for conn in (first, second, third):
            conn.close()


def test_waiting_clients_are_served_in_arrival_order(make_proxy) -> None:
    proxy = make_proxy(default_pool_size="1")
    holder = connect(proxy.port)
    waiting = [connect(proxy.port) for _ in range(4)]
    try:
        holder.execute("BEGIN")
        holder_pid = _pid(holder)
        queries = []
        for count, conn in enumerate(waiting, start=1):
            queries.append(Background(conn, "SELECT clock_timestamp(), pg_backend_pid()"))
            wait_for(partial(_has_waiters, proxy, count), what=f"{count} waiters queued")
        holder.execute("COMMIT")
        results = [query.result() for query in queries]
    finally:
        holder.close()
        for conn in waiting:
            conn.close()
    rows: list[tuple[datetime, int]] = []
    for result in results:
        assert isinstance(result, tuple), result
        rows.append(result)
    assert {pid for _, pid in rows} == {holder_pid}  # pool of one: the same server
    times = [at for at, _ in rows]
    assert times == sorted(times), "waiters were not served first come, first served"


def test_query_wait_timeout_fails_the_waiter_and_spares_the_holder(
    make_proxy, pg: LocalPostgres
) -> None:
    proxy = make_proxy(default_pool_size="1", query_wait_timeout="1")
    holder = connect(proxy.port)
    waiter = connect(proxy.port)
    try:
        holder.execute("BEGIN")
        pid = _pid(holder)
        started = time.monotonic()
        with pytest.raises(psycopg.Error) as caught:
            waiter.execute("SELECT 1")
        waited = time.monotonic() - started
        assert caught.value.sqlstate == "57014", repr(caught.value)
        message = caught.value.diag.message_primary or ""
        assert "query_wait_timeout" in message
        assert "app/app" in message
        assert 0.9 <= waited <= 3.5, waited
        assert _pid(holder) == pid
        holder.execute("COMMIT")
        assert _pid(holder) == pid
        assert _waiters(proxy) == 0
    finally:
        holder.close()
        waiter.close()
