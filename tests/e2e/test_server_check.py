"""server_check_delay / server_check_query: a server idle that long is checked before reuse."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from pgproxy.localpg import LocalPostgres

from .conftest import ProxyThread
from .helpers import connect, wait_for

DELAY = 0.3


@pytest.fixture
def checks(pg: LocalPostgres) -> Iterator[Callable[[], int]]:
    """A sequence the check query advances: how many checks Postgres ran."""
    pg.execute("CREATE SEQUENCE check_runs; ALTER SEQUENCE check_runs OWNER TO app", database="app")

    def count() -> int:
        rows = pg.execute("SELECT last_value, is_called FROM check_runs", database="app")
        value, called = rows[0]
        return int(value) if called else 0

    yield count
    pg.execute("DROP SEQUENCE check_runs", database="app")


def _backend(conn) -> int:
    return int(conn.execute("SELECT pg_backend_pid()").fetchone()[0])


def test_a_long_idle_server_is_checked_before_reuse_and_a_fresh_one_is_not(
    make_proxy: Callable[..., ProxyThread], checks: Callable[[], int]
) -> None:
    proxy = make_proxy(
        default_pool_size="1",
        server_check_delay=str(DELAY),
        server_check_query="SELECT nextval('check_runs')",
    )
    with connect(proxy.port) as conn:
        first = _backend(conn)
        assert _backend(conn) == first  # reused at once: no check
        assert checks() == 0
        time.sleep(DELAY + 0.2)  # the idleness under test, not a synchronisation
        assert _backend(conn) == first  # checked, passed, and the same server served
        assert checks() == 1
        assert _backend(conn) == first
        assert checks() == 1


def test_a_server_that_fails_its_check_is_replaced_and_the_client_never_knows(
    make_proxy: Callable[..., ProxyThread], pg: LocalPostgres, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pgproxy")
    proxy = make_proxy(
        default_pool_size="1",
        server_check_delay=str(DELAY),
        server_check_query="SELECT 1/0",
    )
    with connect(proxy.port) as conn:
        first = _backend(conn)
        time.sleep(DELAY + 0.2)
        second = _backend(conn)  # no error: the client waited for a fresh server
        assert second != first
        wait_for(
            lambda: (
                pg.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", first) == [(0,)]
            ),
            what="the failed server to be closed",
        )
    closed = [
        r.getMessage() for r in caplog.records if "closed (server_check_failed)" in r.getMessage()
    ]
    assert len(closed) == 1, closed


def test_an_empty_check_query_turns_checks_off(
    make_proxy: Callable[..., ProxyThread], checks: Callable[[], int]
) -> None:
    proxy = make_proxy(default_pool_size="1", server_check_delay="0", server_check_query="")
    with connect(proxy.port) as conn:
        first = _backend(conn)
        time.sleep(0.1)
        assert _backend(conn) == first
    assert checks() == 0


def test_clients_that_queue_behind_a_check_get_every_idle_server_not_only_the_checked_one(
    make_proxy: Callable[..., ProxyThread], checks: Callable[[], int]
) -> None:
    """After an idle spell every server needs its check. The first client's request starts
    one; the clients queued behind it must get the other servers too (each checked), not wait
    for the first one in turn: that made a busy pool serve everyone on one server."""
    size, clients, hold = 4, 8, 0.4
    proxy = make_proxy(
        default_pool_size=str(size),
        server_check_delay=str(DELAY),
        server_check_query="SELECT nextval('check_runs')",
    )
    warm = [connect(proxy.port) for _ in range(size)]
    for conn in warm:
        conn.execute("BEGIN")
        conn.execute("SELECT 1")  # each holds a server: the pool opens all of them
    for conn in warm:
        conn.close()
    time.sleep(DELAY + 0.2)  # the idleness under test, not a synchronisation
    start = threading.Barrier(clients)

    def one() -> int:
        with connect(proxy.port) as conn:
            start.wait()
            with conn.transaction():
                pid = _backend(conn)
                conn.execute("SELECT pg_sleep(%s)", (hold,))
            return pid

    with ThreadPoolExecutor(clients) as pool:
        began = time.monotonic()
        pids = list(pool.map(lambda _: one(), range(clients)))
        elapsed = time.monotonic() - began
    assert len(set(pids)) == size, f"{clients} transactions ran on {len(set(pids))} server(s)"
    assert checks() == size
    # Two waves of `size`; on one server it would be `clients` transactions in a row.
    assert elapsed < clients * hold * 0.75, f"{elapsed:.1f} s"
