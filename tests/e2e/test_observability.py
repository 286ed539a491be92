"""What an operator sees while it happens: /metrics and the admin console under real load."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import asyncpg
import psycopg
import psycopg.errors
import pytest

from pgproxy.localpg import LocalPostgres

from .conftest import ProxyThread
from .helpers import APP_PASSWORD, connect
from .test_incident import _raise_fd_limit
from .test_metrics import APP, HISTOGRAMS, POOL_COUNTERS, POOL_GAUGES, Scrape, scrape_until

ADMIN = ("admin", "admin-pw")


def console(proxy: ProxyThread) -> psycopg.Connection:
    return psycopg.connect(
        host="127.0.0.1",
        port=proxy.port,
        user=ADMIN[0],
        password=ADMIN[1],
        dbname="pgproxy",
        autocommit=True,
        prepare_threshold=None,
    )


def rows(conn: psycopg.Connection, command: str) -> list[dict[str, object]]:
    cur = conn.execute(command)
    assert cur.description is not None
    names = [d.name for d in cur.description]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def observed_proxy(make_proxy: Callable[..., ProxyThread], **flags: str) -> ProxyThread:
    return make_proxy(
        users=[f"app:{APP_PASSWORD}", f"{ADMIN[0]}:{ADMIN[1]}"],
        admin_users=ADMIN[0],
        metrics_listen="127.0.0.1:0",
        **flags,
    )


def test_an_idle_transaction_shows_in_metrics_and_console_until_it_is_ended(
    make_proxy, counter_table
) -> None:
    proxy = observed_proxy(
        make_proxy,
        default_pool_size="1",
        idle_transaction_warn="0.2",
        idle_transaction_timeout="3",
    )
    offender = connect(proxy.port, application_name="export-worker-3")
    offender.execute("BEGIN")
    offender.execute("UPDATE safety SET v = 5 WHERE id = 1")
    s = scrape_until(
        proxy,
        lambda s: (s.value("pgproxy_idle_in_transaction_longest_seconds", **APP) or 0) > 0,
        "the idle transaction in /metrics",
    )
    assert s.value("pgproxy_clients", **APP, state="idle_in_transaction") == 1
    assert (s.value("pgproxy_longest_hold_seconds", **APP) or 0) > 0
    assert s.value("pgproxy_servers", **APP, state="active") == 1
    with console(proxy) as admin:
        leaks = rows(admin, "SHOW LEAKS")
        assert len(leaks) == 1
        assert leaks[0]["application_name"] == "export-worker-3"
        assert leaks[0]["last_statement"] == "UPDATE safety SET v = 5 WHERE id = 1"
        pool = next(r for r in rows(admin, "SHOW POOLS") if r["database"] == "app")
        assert pool["cl_idle_in_transaction"] == 1
        # At the timeout it is gone from both, and counted.
        s = scrape_until(
            proxy,
            lambda s: (
                s.value(
                    "pgproxy_client_disconnects_total", **APP, reason="idle_transaction_timeout"
                )
                == 1
            ),
            "the timeout to be counted",
        )
        assert s.value("pgproxy_clients", **APP, state="idle_in_transaction") == 0
        assert s.value("pgproxy_servers", **APP, state="active") == 0
        assert rows(admin, "SHOW LEAKS") == []
    with pytest.raises(psycopg.errors.IdleInTransactionSessionTimeout):
        offender.execute("SELECT 1")
    offender.close()


CLIENTS = 500


class Load(threading.Thread):
    """CLIENTS asyncpg clients: each logs in, runs 3 short queries, stays until released."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.done_queries = threading.Event()
        self.release = threading.Event()
        self.errors: list[BaseException] = []

    def run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        queried = asyncio.Barrier(CLIENTS + 1)
        results = await asyncio.gather(
            *(self._client(queried) for _ in range(CLIENTS)),
            self._wait(queried),
            return_exceptions=True,
        )
        self.errors = [r for r in results if isinstance(r, BaseException)]
        self.done_queries.set()  # also on failure, so the test does not wait for nothing

    async def _wait(self, queried: asyncio.Barrier) -> None:
        await queried.wait()
        self.done_queries.set()

    async def _client(self, queried: asyncio.Barrier) -> None:
        conn = await asyncpg.connect(
            host="127.0.0.1",
            port=self.port,
            user="app",
            password=APP_PASSWORD,
            database="app",
            timeout=60,
        )
        try:
            for _ in range(3):
                assert await conn.fetchval("SELECT $1::text FROM pg_sleep(0.005)", "x") == "x"
            await queried.wait()
            await asyncio.get_running_loop().run_in_executor(None, self.release.wait, 60)
        finally:
            await conn.close()


@pytest.mark.timeout(180)
def test_metrics_under_a_500_client_load_are_complete_and_sane(
    pg: LocalPostgres, make_proxy
) -> None:
    _raise_fd_limit()
    proxy = observed_proxy(
        make_proxy,
        default_pool_size="2",
        max_client_conn="2000",
        query_wait_timeout="120",
        monitor_interval="0.2",
    )
    load = Load(proxy.port)
    load.start()
    try:
        during = scrape_until(
            proxy,
            lambda s: (s.value("pgproxy_clients", **APP, state="waiting") or 0) > 0,
            "clients waiting for the saturated pool",
        )
        assert (during.value("pgproxy_longest_wait_seconds", **APP) or 0) > 0
        assert (during.value("pgproxy_servers", **APP, state="active") or 0) <= 2
        assert load.done_queries.wait(120), "the clients did not finish their queries"
        assert load.errors == [], f"{len(load.errors)} failed, first: {load.errors[:3]!r}"
        after = scrape_until(
            proxy,
            lambda s: (
                s.value("pgproxy_clients", **APP, state="idle") == CLIENTS
                and s.value("pgproxy_pg_max_connections") is not None
            ),
            "every client idle, and the monitor up",
        )
        check_every_family(after)
        assert after.value("pgproxy_clients", **APP, state="waiting") == 0
        assert after.value("pgproxy_longest_wait_seconds", **APP) == 0
        assert after.value("pgproxy_client_connections") == CLIENTS
        assert after.value("pgproxy_servers", **APP, state="active") == 0
        assert (after.value("pgproxy_servers", **APP, state="idle") or 0) <= 2
        assert (after.value("pgproxy_queries_total", **APP) or 0) >= 3 * CLIENTS
        assert after.value("pgproxy_logins_total", **APP) == CLIENTS
        assert (after.value("pgproxy_wait_seconds_count", **APP) or 0) >= 3 * CLIENTS
        # Waits happened: some took longer than the shortest bucket.
        assert (after.value("pgproxy_wait_seconds_sum", **APP) or 0) > 0
        assert after.value("pgproxy_pg_max_connections") == 30
        assert after.value("pgproxy_pg_monitor_up") == 1
        # The pool kept Postgres far from max_connections whatever the client count.
        pg_connections = sum(v for n, _ls, v in after.samples if n == "pgproxy_pg_connections")
        assert 1 <= pg_connections <= 10
    finally:
        load.release.set()
        load.join(60)


def check_every_family(s: Scrape) -> None:
    for name in POOL_GAUGES:
        assert s.types.get(name) == "gauge", name
    for name in POOL_COUNTERS:
        assert s.types.get(name) == "counter", name
    for name in HISTOGRAMS:
        assert s.types.get(name) == "histogram", name
    for name in (
        "pgproxy_clients",
        "pgproxy_servers",
        "pgproxy_up",
        "pgproxy_client_connections",
        "pgproxy_pg_connections",
        "pgproxy_pg_connections_by_application",
        "pgproxy_pg_oldest_transaction_seconds",
        "pgproxy_pg_max_connections",
    ):
        assert s.types.get(name) == "gauge", name
    by_app = {ls["application_name"]: v for n, ls, v in s.samples if n.endswith("by_application")}
    assert by_app.get("pgproxy_monitor") == 1
