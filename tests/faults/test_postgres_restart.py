"""Postgres restarts and pg_terminate_backend under load: clear errors, no hang, fast recovery.

The load is many clients (60; 200 with PGPROXY_FULL_TESTS=1) each running short insert
transactions through one transaction pool, while Postgres is restarted (once; three times in
the full run). What a client may see is pinned down:

* a transaction caught by the restart fails with an error that says why (Postgres' own
  57P01, the proxy's 08006 "server connection lost", 57P03 while Postgres starts, ...),
  never by hanging: each transaction has a deadline of query_wait_timeout plus a margin;
* a few seconds after Postgres is back, every transaction succeeds again;
* nothing acknowledged as committed is lost, nothing never attempted appears;
* afterwards the pool holds no dead server connection: every one is a live backend, and as
  many clients as the pool has servers all get one and use it without an error.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator

import psycopg
import pytest

from pgproxy.localpg import LocalPostgres
from tests.e2e.conftest import ProxyThread
from tests.e2e.helpers import Background, wait_for

from .helpers import (
    assert_pool_whole,
    pool_counts,
    psycopg_connect,
    scale,
    server_pids,
)
from .load import HUNG, Load

POOL = 10
QUERY_WAIT_TIMEOUT = 5.0
# Each transaction's deadline: the longest a client may wait for a server, plus a margin for
# the transaction itself on a busy 2-core machine. Past it the client counts as hung.
DEADLINE = QUERY_WAIT_TIMEOUT + 5.0
# Postgres is back (pg_ctl start returned): from this long after it, no transaction may fail.
RECOVERY = 5.0
# SQLSTATEs a transaction caught by a restart may fail with, and what they say.
CLEAR_ERRORS = {
    "57P01": "Postgres: terminating connection due to administrator command",
    "57P02": "Postgres: crash of another server process",
    "57P03": "Postgres: the database system is starting up / shutting down",
    "08006": "pgproxy: server connection lost / could not connect",
    "08003": "asyncpg: connection closed in the middle of an operation, with the reason",
    "57014": "pgproxy: query_wait_timeout",
}


@pytest.fixture
def rows(cluster: LocalPostgres) -> Iterator[str]:
    name = f"r_{uuid.uuid4().hex[:10]}"
    cluster.execute(
        f"CREATE TABLE {name} (client int NOT NULL, n int NOT NULL, PRIMARY KEY (client, n));"
        f"ALTER TABLE {name} OWNER TO app",
        database="app",
    )
    yield name
    cluster.execute(f"DROP TABLE IF EXISTS {name}", database="app")


def _unclear(load: Load) -> list[str]:
    """Failures that do not say why: no SQLSTATE we expect, and no message naming a cause."""
    out = []
    for o in load.failures():
        if o.error == HUNG:
            continue  # counted on their own
        if o.sqlstate in CLEAR_ERRORS:
            continue
        # A driver that finds the socket closed after the FATAL reports the close itself;
        # the message still carries the reason (libpq: "server closed the connection").
        if o.sqlstate is None and "closed" in (o.error or ""):
            continue
        # asyncpg, when Postgres' FATAL arrives right behind a ReadyForQuery and its next
        # query goes out before the close comes: it does the same connected to Postgres
        # directly (checked: ~2 per restart of 30 direct clients).
        if (o.error or "").startswith("InternalClientError: cannot switch to state"):
            continue
        out.append(f"client {o.client} {o.what}: {o.error}")
    return out


def test_postgres_restarts_under_load_fail_in_flight_transactions_clearly_and_recover(
    cluster: LocalPostgres, make_proxy: Callable[..., ProxyThread], rows: str
) -> None:
    clients = scale(60, 200)
    restarts = scale(1, 3)
    proxy = make_proxy(
        default_pool_size=str(POOL),
        query_wait_timeout=str(QUERY_WAIT_TIMEOUT),
        server_connect_timeout="2",
        # Direct: the relay has faults of its own; here Postgres itself goes away.
        direct=True,
    )
    load = Load(proxy.port, clients, rows, deadline=DEADLINE).start()
    down_at: list[float] = []  # restart began
    back_at: list[float] = []  # restart returned: Postgres accepts connections again
    try:
        for _ in range(restarts):
            warm_from = time.monotonic()
            wait_for(
                lambda since=warm_from: load.commits_since(since) >= clients,
                timeout=30,
                what="the load to run",
            )
            down_at.append(time.monotonic())
            cluster.restart()
            back_at.append(time.monotonic())
            # Every client must get transactions through again after the restart.
            wait_for(
                lambda since=back_at[-1] + RECOVERY: load.commits_since(since) >= 2 * clients,
                timeout=RECOVERY + 30,
                what="transactions after the restart",
            )
    finally:
        load.stop()

    summary = load.summary()
    hung = [o for o in load.outcomes if o.error == HUNG]
    assert not hung, f"{len(hung)} operations hung past {DEADLINE} s:\n{summary}"
    assert not _unclear(load), "\n".join(_unclear(load)[:20]) + "\n" + summary
    # Each restart cost errors (otherwise nothing was tested) ...
    assert load.failures(), summary
    # ... and none began later than RECOVERY after Postgres was back (and ended before the
    # next restart began).
    for back, next_down in zip(back_at, [*down_at[1:], float("inf")], strict=True):
        late = [
            o for o in load.failures() if o.started_at >= back + RECOVERY and o.ended_at < next_down
        ]
        assert not late, f"{len(late)} failures > {RECOVERY} s after Postgres was back:\n{summary}"
    # Every client got through after the last restart.
    served = {o.client for o in load.outcomes if o.ok and o.started_at >= back_at[-1]}
    assert served == set(range(clients)), (
        f"clients never served again: {set(range(clients)) - served}"
    )

    stored = {
        (int(c), int(n))
        for c, n in cluster.execute(f"SELECT client, n FROM {rows}", database="app")
    }
    assert load.committed <= stored, f"acknowledged commits lost: {len(load.committed - stored)}"
    assert stored <= load.attempted

    assert_pool_whole(proxy, cluster, POOL)
    assert pool_counts(proxy)["waiters"] == 0


def test_an_idle_pool_survives_a_restart_without_a_single_client_error(
    cluster: LocalPostgres, make_proxy: Callable[..., ProxyThread]
) -> None:
    """Every pooled server dies while idle; the next clients never see one of them."""
    proxy = make_proxy(default_pool_size=str(POOL), direct=True)
    assert_pool_whole(proxy, cluster, POOL)  # fills the pool: POOL idle servers
    before = server_pids(proxy)
    assert len(before) == POOL
    cluster.restart()
    # Postgres told each idle backend FATAL 57P01 before it went; the proxy closed them all.
    wait_for(lambda: not server_pids(proxy) & before, timeout=5, what="dead servers to go")
    assert_pool_whole(proxy, cluster, POOL)


@pytest.mark.parametrize("where", ["idle", "in_transaction", "mid_query"])
def test_pg_terminate_backend_of_a_pooled_server(
    cluster: LocalPostgres, make_proxy: Callable[..., ProxyThread], where: str
) -> None:
    """An idle server killed by pg_terminate_backend is dropped unseen; a client whose server
    is killed under it gets 57P01 (Postgres' FATAL, relayed) and the next one is served."""
    proxy = make_proxy(default_pool_size="2", direct=True)
    with psycopg_connect(proxy.port) as victim, psycopg_connect(proxy.port) as bystander:
        if where == "idle":
            pid = victim.execute("SELECT pg_backend_pid()").fetchone()[0]
            cluster.execute("SELECT pg_terminate_backend($1)", pid)
            wait_for(lambda: pid not in server_pids(proxy), timeout=5, what="the server to go")
            assert victim.execute("SELECT 1").fetchone() == (1,)  # on a fresh server
        else:
            victim.execute("BEGIN")
            pid = victim.execute("SELECT pg_backend_pid()").fetchone()[0]
            if where == "mid_query":
                call = Background(lambda: victim.execute("SELECT pg_sleep(30)"))
                call.start()
                wait_for(
                    lambda: cluster.execute(
                        "SELECT 1 FROM pg_stat_activity WHERE pid = $1 AND wait_event = 'PgSleep'",
                        pid,
                    ),
                    what="the sleep to run",
                )
            else:
                call = Background(lambda: victim.execute("SELECT 1"))
            cluster.execute("SELECT pg_terminate_backend($1)", pid)
            if where != "mid_query":
                call.start()
            outcome = call.finish(timeout=5)  # no hang
            assert isinstance(outcome, psycopg.OperationalError), outcome
            assert outcome.sqlstate == "57P01", outcome
            assert victim.closed or victim.broken
        assert bystander.execute("SELECT 2").fetchone() == (2,)
        wait_for(lambda: pid not in server_pids(proxy), timeout=5, what="the server to go")
    with psycopg_connect(proxy.port) as newcomer:
        assert newcomer.execute("SELECT 3").fetchone() == (3,)


def test_a_server_fatal_reaches_the_client_once(
    cluster: LocalPostgres, make_proxy: Callable[..., ProxyThread]
) -> None:
    """Postgres says FATAL 57P01 and closes: the client hears exactly that, as directly.

    Found by these tests: pgproxy used to add its own "FATAL 08006 server connection lost",
    and psycopg's commit() then raised InternalError("received 2 results from command
    'COMMIT'") without a SQLSTATE, where a direct connection raises AdminShutdown (57P01).
    """
    proxy = make_proxy(default_pool_size="2", direct=True)
    with psycopg_connect(proxy.port, autocommit=False) as conn:
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]  # BEGIN, then holds it
        cluster.execute("SELECT pg_terminate_backend($1)", pid)
        wait_for(lambda: pid not in server_pids(proxy), timeout=5, what="the server to go")
        with pytest.raises(psycopg.OperationalError) as caught:
            conn.commit()
    assert caught.value.sqlstate == "57P01"
