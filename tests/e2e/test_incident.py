"""The incident pgproxy exists for: hundreds of clients against a small max_connections."""

from __future__ import annotations

import asyncio
import random
import resource
import threading

import asyncpg
import pg8000.native
import pytest

from pgproxy.localpg import LocalPostgres

CLIENTS = 500
POOL = 10
SESSION_QUERY = (
    "SELECT session_key, session_data, expire_date FROM django_session "
    "WHERE expire_date > now() AND session_key = $1 LIMIT 21"
)


@pytest.fixture
def django_sessions(pg: LocalPostgres):
    pg.execute(
        "CREATE TABLE django_session (session_key varchar(40) PRIMARY KEY, "
        "session_data text NOT NULL, expire_date timestamptz NOT NULL)",
        database="app",
    )
    pg.execute("ALTER TABLE django_session OWNER TO app", database="app")
    pg.execute(
        "INSERT INTO django_session SELECT 'key' || i, repeat('x', 200), now() + interval '1 day' "
        "FROM generate_series(1, 1000) i",
        database="app",
    )
    yield
    pg.execute("DROP TABLE django_session", database="app")


class BackendSampler(threading.Thread):
    """Samples the number of `app` backends in pg_stat_activity until stopped."""

    def __init__(self, pg: LocalPostgres) -> None:
        super().__init__(daemon=True)
        self.conn = pg8000.native.Connection(
            pg.superuser, host=pg.host, port=pg.port, password=pg.superuser_password
        )
        self.stop_event = threading.Event()
        self.samples: list[int] = []

    def run(self) -> None:
        while not self.stop_event.is_set():
            rows = self.conn.run(
                "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app' "
                "AND backend_type = 'client backend'"
            )
            self.samples.append(int(rows[0][0]))
            self.stop_event.wait(0.01)
        self.conn.close()


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096 <= hard or (soft < hard and hard == resource.RLIM_INFINITY):
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))


async def _one_client(port: int, connected: asyncio.Barrier, finished: asyncio.Barrier) -> None:
    conn = await asyncpg.connect(
        host="127.0.0.1",
        port=port,
        user="app",
        password="app-secret",
        database="app",
        statement_cache_size=0,
        timeout=60,
    )
    try:
        await connected.wait()
        for _ in range(3):
            key = f"key{random.randint(1, 1200)}"
            rows = await conn.fetch(SESSION_QUERY, key)
            assert len(rows) <= 1
            if rows:
                assert rows[0]["session_key"] == key
        await finished.wait()  # everybody stays connected until all are done
    finally:
        await conn.close()


async def _run_clients(port: int, count: int) -> list[BaseException]:
    connected = asyncio.Barrier(count)
    finished = asyncio.Barrier(count)
    results = await asyncio.gather(
        *(_one_client(port, connected, finished) for _ in range(count)), return_exceptions=True
    )
    return [r for r in results if isinstance(r, BaseException)]


@pytest.mark.timeout(180)
def test_500_clients_share_10_server_connections_without_errors(
    pg: LocalPostgres, make_proxy, django_sessions
) -> None:
    _raise_fd_limit()
    proxy = make_proxy(
        default_pool_size=str(POOL), max_client_conn="2000", query_wait_timeout="120"
    )
    sampler = BackendSampler(pg)
    sampler.start()
    try:
        errors = asyncio.run(_run_clients(proxy.port, CLIENTS))
    finally:
        sampler.stop_event.set()
        sampler.join(10)
    assert errors == [], f"{len(errors)} clients failed, first: {errors[:3]!r}"
    assert sampler.samples, "the sampler took no sample"
    assert max(sampler.samples) <= POOL
    assert max(sampler.samples) >= 1
    assert proxy.server_count() <= POOL


def test_the_same_clients_directly_exhaust_max_connections(pg: LocalPostgres) -> None:
    """Without the proxy, the cluster of this test run refuses clients: the incident itself."""
    conns: list[pg8000.native.Connection] = []
    refused = []
    try:
        for _ in range(40):
            try:
                conns.append(
                    pg8000.native.Connection(
                        "app", host=pg.host, port=pg.port, password="app-secret", database="app"
                    )
                )
            except pg8000.exceptions.DatabaseError as exc:
                refused.append(exc)
    finally:
        for conn in conns:
            conn.close()
    assert refused, "max_connections did not refuse anyone"
    assert refused[0].args[0]["C"] in ("53300", "53400")
