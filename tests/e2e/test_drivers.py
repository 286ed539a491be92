"""Real drivers through a transaction-mode proxy whose pool is smaller than its client count.

Every test runs more concurrent clients than the pool has server connections, so that server
connections really are shared between clients; most of them also check that the clients saw
at most `pool size` distinct backends. COPY lives in test_copy.py, session settings in
test_session_defaults.py.
"""

from __future__ import annotations

import asyncio
import os
import select
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import asyncpg
import pg8000.native
import psycopg
import pytest
from psycopg import errors as pg_errors

from pgproxy.localpg import Credentials, LocalPostgres
from tests.e2e.conftest import ProxyThread

T = TypeVar("T")

HOST = "127.0.0.1"
CLIENTS = 6
POOL = 2


# -- helpers -----------------------------------------------------------------------------------


def pg8000_connect(proxy: ProxyThread, creds: Credentials) -> pg8000.native.Connection:
    return pg8000.native.Connection(
        creds.user,
        host=HOST,
        port=proxy.port,
        database=creds.database,
        password=creds.password,
        timeout=15,
    )


def psycopg_connect(proxy: ProxyThread, creds: Credentials, **kwargs: Any) -> psycopg.Connection:
    kwargs.setdefault("prepare_threshold", None)
    return psycopg.connect(
        host=HOST,
        port=proxy.port,
        user=creds.user,
        password=creds.password,
        dbname=creds.database,
        connect_timeout=15,
        **kwargs,
    )


async def asyncpg_connect(proxy: ProxyThread, creds: Credentials) -> asyncpg.Connection:
    return await asyncpg.connect(
        host=HOST,
        port=proxy.port,
        user=creds.user,
        password=creds.password,
        database=creds.database,
        statement_cache_size=0,
        timeout=15,
    )


def run_clients(count: int, work: Callable[[int, threading.Barrier], T]) -> list[T]:
    """Run `work(index, barrier)` in `count` threads at once; re-raise the first failure.

    The barrier lets the clients line up (e.g. "everyone has committed") without sleeping; a
    failing client breaks it so that the others fail fast instead of waiting for its timeout.
    """
    barrier = threading.Barrier(count, timeout=20)

    def guarded(index: int) -> T:
        try:
            return work(index, barrier)
        except BaseException:
            barrier.abort()
            raise

    with ThreadPoolExecutor(count) as pool:
        futures = [pool.submit(guarded, i) for i in range(count)]
        return [f.result(timeout=60) for f in futures]


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


@pytest.fixture(params=[True, False], ids=["uvloop", "asyncio"])
def pool2_any_loop(
    make_proxy: Callable[..., ProxyThread], request: pytest.FixtureRequest
) -> ProxyThread:
    """Pool of 2 on uvloop, then on plain asyncio: the plain-asyncio subset."""
    return make_proxy(default_pool_size=str(POOL), use_uvloop=request.param)


def assert_shared(proxy: ProxyThread, pids: set[int]) -> None:
    """The clients ran on at most the pool's server connections: they really were shared."""
    limit = proxy.settings.default_pool_size
    assert 1 <= len(pids) <= limit, pids
    assert proxy.server_count() <= limit


# -- pg8000 ------------------------------------------------------------------------------------


def test_pg8000_parameter_queries_from_six_clients_share_two_servers(
    pool2: ProxyThread, app_credentials: Credentials
) -> None:
    def client(i: int, barrier: threading.Barrier) -> set[int]:
        pids = set()
        with pg8000_connect(pool2, app_credentials) as conn:
            barrier.wait()
            for k in range(20):
                rows = conn.run(
                    "SELECT CAST(:a AS int) * 1000 + CAST(:b AS int), :s, pg_backend_pid()",
                    a=i,
                    b=k,
                    s=f"client {i} query {k}",
                )
                assert rows[0][:2] == [i * 1000 + k, f"client {i} query {k}"]
                pids.add(rows[0][2])
        return pids

    pids = set().union(*run_clients(CLIENTS, client))
    assert_shared(pool2, pids)


def test_pg8000_commits_are_seen_by_other_clients_and_rollbacks_are_not(
    pool2: ProxyThread, app_credentials: Credentials, table: str
) -> None:
    def client(i: int, barrier: threading.Barrier) -> list[Any]:
        with pg8000_connect(pool2, app_credentials) as conn:
            conn.run("BEGIN")
            pid = conn.run("SELECT pg_backend_pid()")[0][0]
            conn.run(f"INSERT INTO {table} VALUES (:i, 1, 'kept')", i=i)
            # Inside a transaction the client keeps its server.
            assert conn.run("SELECT pg_backend_pid()")[0][0] == pid
            assert conn.run(f"SELECT count(*) FROM {table} WHERE client = :i", i=i) == [[1]]
            conn.run("COMMIT")
            conn.run("BEGIN")
            pid = conn.run("SELECT pg_backend_pid()")[0][0]
            conn.run(f"INSERT INTO {table} VALUES (:i, 2, 'discarded')", i=i)
            assert conn.run("SELECT pg_backend_pid()")[0][0] == pid
            conn.run("ROLLBACK")
            barrier.wait()  # every client has committed its row and rolled back the other
            return conn.run(f"SELECT client, n, note FROM {table} ORDER BY client")

    for rows in run_clients(CLIENTS, client):
        assert rows == [[i, 1, "kept"] for i in range(CLIENTS)]


def test_pg8000_error_inside_transaction_then_rollback_leaves_connection_usable(
    pool2: ProxyThread, app_credentials: Credentials, table: str
) -> None:
    def client(i: int, barrier: threading.Barrier) -> list[Any]:
        with pg8000_connect(pool2, app_credentials) as conn:
            barrier.wait()
            conn.run("BEGIN")
            conn.run(f"INSERT INTO {table} VALUES (:i, 1, 'lost')", i=i)
            with pytest.raises(pg8000.native.DatabaseError) as div:
                conn.run("SELECT CAST(:i AS int) / CAST(:z AS int)", i=i, z=0)
            assert div.value.args[0]["C"] == "22012"
            # Still the same failed transaction, on the same server.
            with pytest.raises(pg8000.native.DatabaseError) as aborted:
                conn.run("SELECT 1")
            assert aborted.value.args[0]["C"] == "25P02"
            conn.run("ROLLBACK")
            conn.run(f"INSERT INTO {table} VALUES (:i, 2, 'kept')", i=i)
            return conn.run("SELECT CAST(:i AS int) * 2", i=i)

    results = run_clients(CLIENTS, client)
    assert results == [[[i * 2]] for i in range(CLIENTS)]
    with pg8000_connect(pool2, app_credentials) as conn:
        rows = conn.run(f"SELECT client, note FROM {table} ORDER BY client")
    assert rows == [[i, "kept"] for i in range(CLIENTS)]


# -- psycopg 3, prepare_threshold=None ---------------------------------------------------------


def test_psycopg_parameter_queries_and_transactions_from_six_clients(
    pool2: ProxyThread, app_credentials: Credentials, table: str
) -> None:
    def client(i: int, barrier: threading.Barrier) -> tuple[set[int], list[Any]]:
        pids = set()
        with psycopg_connect(pool2, app_credentials) as conn:
            barrier.wait()
            for k in range(10):
                row = conn.execute(
                    "SELECT %s::int * 100 + %s::int, %s::text, pg_backend_pid()",
                    (i, k, f"c{i}"),
                ).fetchone()
                assert row is not None and row[:2] == (i * 100 + k, f"c{i}")
                pids.add(row[2])
                conn.commit()
            # psycopg opens the transaction implicitly; commit and rollback end it.
            conn.execute(f"INSERT INTO {table} VALUES (%s, 1, 'kept')", (i,))
            conn.commit()
            conn.execute(f"INSERT INTO {table} VALUES (%s, 2, 'discarded')", (i,))
            conn.rollback()
            with conn.transaction():
                conn.execute(f"INSERT INTO {table} VALUES (%s, 3, 'block')", (i,))
            barrier.wait()
            rows = conn.execute(f"SELECT client, n FROM {table} ORDER BY client, n").fetchall()
            conn.commit()
            return pids, rows

    results = run_clients(CLIENTS, client)
    expected = [(i, n) for i in range(CLIENTS) for n in (1, 3)]
    for _pids, rows in results:
        assert rows == expected
    assert_shared(pool2, set().union(*(pids for pids, _ in results)))


def test_psycopg_error_inside_transaction_then_rollback_leaves_connection_usable(
    pool2: ProxyThread, app_credentials: Credentials
) -> None:
    def client(i: int, barrier: threading.Barrier) -> int:
        with psycopg_connect(pool2, app_credentials) as conn:
            barrier.wait()
            conn.execute("SELECT 1")
            with pytest.raises(pg_errors.UndefinedTable):
                conn.execute("SELECT * FROM no_such_table_here")
            assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
            with pytest.raises(pg_errors.InFailedSqlTransaction):
                conn.execute("SELECT 1")
            conn.rollback()
            assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
            row = conn.execute("SELECT %s::int + 1", (i,)).fetchone()
            conn.commit()
            assert row is not None
            return int(row[0])

    assert run_clients(CLIENTS, client) == [i + 1 for i in range(CLIENTS)]


def test_psycopg_executemany_rows_from_six_clients_all_arrive(
    pool2: ProxyThread, app_credentials: Credentials, table: str
) -> None:
    def client(i: int, barrier: threading.Barrier) -> list[Any]:
        with psycopg_connect(pool2, app_credentials, autocommit=True) as conn:
            barrier.wait()
            with conn.cursor() as cur:
                cur.executemany(
                    f"INSERT INTO {table} VALUES (%s, %s, %s)",
                    [(i, n, f"row {n}") for n in range(50)],
                )
                cur.executemany(
                    f"INSERT INTO {table} VALUES (%s, %s, 'returned') RETURNING n * 2",
                    [(i, 1000 + n) for n in range(5)],
                    returning=True,
                )
                returned = []
                while True:
                    returned.extend(cur.fetchall())
                    if not cur.nextset():
                        break
            assert returned == [((1000 + n) * 2,) for n in range(5)]
            barrier.wait()
            return conn.execute(
                f"SELECT client, count(*), sum(n) FROM {table} GROUP BY client ORDER BY client"
            ).fetchall()

    expected = [(i, 55, sum(range(50)) + sum(range(1000, 1005))) for i in range(CLIENTS)]
    for rows in run_clients(CLIENTS, client):
        assert rows == expected


def test_psycopg_pipeline_statements_up_to_a_sync_run_on_one_server(
    pool2: ProxyThread, app_credentials: Credentials
) -> None:
    def client(i: int, barrier: threading.Barrier) -> None:
        with psycopg_connect(pool2, app_credentials, autocommit=True) as conn:
            barrier.wait()
            for _round in range(5):
                with conn.pipeline():
                    cursors = [
                        conn.execute("SELECT %s::int, %s::int, pg_backend_pid()", (i, k))
                        for k in range(8)
                    ]
                rows = [c.fetchone() for c in cursors]
                assert [r[:2] for r in rows if r is not None] == [(i, k) for k in range(8)]
                # One Sync (at the end of the block): the link lasts until it is answered.
                assert len({r[2] for r in rows if r is not None}) == 1

    run_clients(CLIENTS, client)


def next_result(pgconn: psycopg.pq.abc.PGconn) -> psycopg.pq.abc.PGresult | None:
    """`PQgetResult` without blocking inside libpq.

    psycopg's C wrapper keeps the GIL in a blocking libpq call; the proxy runs on a thread of
    this process, so the test must wait in `select` (which releases it) instead.
    """
    while True:
        pgconn.consume_input()
        if not pgconn.is_busy():
            return pgconn.get_result()
        if not select.select([pgconn.socket], [], [], 10)[0]:
            raise TimeoutError("no answer from the proxy within 10 s")


def send_pipeline(pgconn: psycopg.pq.abc.PGconn, statements: list[bytes]) -> list[Any]:
    """Send every statement followed by its own Sync, all before reading anything back.

    psycopg's `Pipeline.sync()` waits for the results it syncs, so several Syncs in flight
    need libpq's pipeline calls (psycopg.pq) directly. Returns, per statement, its rows or
    the SQLSTATE of its error.
    """
    pgconn.enter_pipeline_mode()
    for sql in statements:
        pgconn.send_query_params(sql, None)
        pgconn.pipeline_sync()
    while pgconn.flush():
        select.select([], [pgconn.socket], [], 10)
    out: list[Any] = []
    for _ in statements:
        res = next_result(pgconn)
        assert res is not None
        if res.status == psycopg.pq.ExecStatus.TUPLES_OK:
            out.append([res.get_value(0, c) for c in range(res.nfields)])
        else:
            out.append(res.error_field(psycopg.pq.DiagnosticField.SQLSTATE))
        assert next_result(pgconn) is None
        sync = next_result(pgconn)
        assert sync is not None and sync.status == psycopg.pq.ExecStatus.PIPELINE_SYNC
    pgconn.exit_pipeline_mode()
    return out


def test_psycopg_pipeline_with_several_syncs_in_flight_gets_its_own_results(
    pool2_any_loop: ProxyThread, app_credentials: Credentials
) -> None:
    pool2 = pool2_any_loop

    def client(i: int, barrier: threading.Barrier) -> None:
        with psycopg_connect(pool2, app_credentials, autocommit=True) as conn:
            barrier.wait()
            for _round in range(5):
                selects = [f"SELECT {i}, {k}, pg_backend_pid()".encode() for k in range(6)]
                # Eight Sync segments sent before reading anything back: a transaction over
                # the first ones, then an error that aborts only its own segment.
                statements = [b"BEGIN", *selects[:3], b"COMMIT", b"SELECT 1 / 0", *selects[3:]]
                out = send_pipeline(conn.pgconn, statements)
                assert out[0] is None and out[4] is None  # BEGIN, COMMIT: no rows, no error
                assert out[5] == b"22012"
                rows = out[1:4] + out[6:]
                assert [r[:2] for r in rows] == [
                    [str(i).encode(), str(k).encode()] for k in range(6)
                ]
                # Inside BEGIN..COMMIT the server answers ReadyForQuery('T'): the link holds
                # even though each statement has its own Sync. (Between idle segments the
                # proxy may move the client: it cannot see what is still in flight.)
                assert len({r[2] for r in out[1:4]}) == 1
            row = conn.execute("SELECT %s::int", (i,)).fetchone()
            assert row == (i,)

    run_clients(CLIENTS, client)


def test_psycopg_pipeline_error_aborts_only_its_sync_segment(
    pool2: ProxyThread, app_credentials: Credentials, table: str
) -> None:
    def client(i: int, barrier: threading.Barrier) -> list[Any]:
        with psycopg_connect(pool2, app_credentials, autocommit=True) as conn:
            barrier.wait()

            def failing_pipeline() -> None:
                with conn.pipeline() as p:
                    conn.execute(f"INSERT INTO {table} VALUES (%s, 1, 'before')", (i,))
                    p.sync()
                    conn.execute("SELECT 1 / 0")
                    conn.execute(f"INSERT INTO {table} VALUES (%s, 2, 'skipped')", (i,))
                    p.sync()

            with pytest.raises(pg_errors.DivisionByZero):
                failing_pipeline()
            # The pipeline is over; the connection serves ordinary queries again.
            assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
            with conn.pipeline() as p:
                conn.execute(f"INSERT INTO {table} VALUES (%s, 3, 'after')", (i,))
                p.sync()
                cur = conn.execute(f"SELECT n FROM {table} WHERE client = %s ORDER BY n", (i,))
            return cur.fetchall()

    assert run_clients(CLIENTS, client) == [[(1,), (3,)]] * CLIENTS


def query_is_active(pg: LocalPostgres, tag: str) -> Callable[[], bool]:
    def check() -> bool:
        rows = pg.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE $1",
            f"%{tag}%",
        )
        return bool(rows[0][0] == 1)

    return check


def busy_client(proxy: ProxyThread, creds: Credentials, i: int, stop: threading.Event) -> int:
    """Run short queries until `stop`; any QueryCanceled (a misrouted cancel) raises."""
    done = 0
    with psycopg_connect(proxy, creds, autocommit=True) as conn:
        while not stop.is_set():
            row = conn.execute("SELECT %s::int, pg_sleep(0.002)", (i,)).fetchone()
            assert row is not None and row[0] == i
            done += 1
    return done


def test_psycopg_cancel_interrupts_only_the_sleeping_client_within_two_seconds(
    pool2_any_loop: ProxyThread, app_credentials: Credentials, pg: LocalPostgres
) -> None:
    pool2 = pool2_any_loop
    # cancel_safe(), not cancel(): psycopg's C `PGcancel.cancel()` holds the GIL while libpq
    # waits for the cancel connection to close, and the proxy runs on a thread of this very
    # process, so it could never answer. The legacy call is covered from a subprocess below.
    stop = threading.Event()
    tag = f"cancel-me-{uuid.uuid4().hex[:8]}"
    with (
        psycopg_connect(pool2, app_credentials, autocommit=True) as sleeper,
        ThreadPoolExecutor(4) as pool,
    ):
        others = [pool.submit(busy_client, pool2, app_credentials, i, stop) for i in range(3)]
        try:
            sleeping = pool.submit(sleeper.execute, f"SELECT pg_sleep(30) /* {tag} */")
            assert wait_until(query_is_active(pg, tag)), "the sleep never started on a server"
            started = time.monotonic()
            sleeper.cancel_safe(timeout=5)
            with pytest.raises(pg_errors.QueryCanceled):
                sleeping.result(timeout=10)
            elapsed = time.monotonic() - started
        finally:
            stop.set()
        counts = [f.result(timeout=20) for f in others]
        assert elapsed < 3.0
        # The cancel reached only the sleeper's server: the others never saw QueryCanceled
        # (they would have raised above) and the canceled client goes on normally.
        assert all(n > 0 for n in counts)
        row = sleeper.execute("SELECT 'still usable'").fetchone()
        assert row == ("still usable",)


CANCEL_CHILD = """
import sys, threading, time
import psycopg

port, password, tag = sys.argv[1], sys.argv[2], sys.argv[3]
conn = psycopg.connect(host="127.0.0.1", port=port, user="app", password=password,
                       dbname="app", prepare_threshold=None, autocommit=True)
outcome = []
def sleep():
    try:
        conn.execute(f"SELECT pg_sleep(30) /* {tag} */")
        outcome.append("finished")
    except psycopg.errors.QueryCanceled:
        outcome.append("canceled")
worker = threading.Thread(target=sleep)
worker.start()
print("started", flush=True)
sys.stdin.readline()
started = time.monotonic()
conn.cancel()
worker.join(10)
elapsed = time.monotonic() - started
print(outcome[0] if outcome else "hung", elapsed, conn.execute("SELECT 40 + 2").fetchone()[0])
conn.close()
"""


def test_psycopg_legacy_cancel_from_another_process_interrupts_the_query(
    pool2: ProxyThread, app_credentials: Credentials, pg: LocalPostgres
) -> None:
    tag = f"cancel-me-{uuid.uuid4().hex[:8]}"
    child = subprocess.Popen(
        [sys.executable, "-c", CANCEL_CHILD, str(pool2.port), app_credentials.password, tag],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline() == "started\n"
        assert wait_until(query_is_active(pg, tag)), "the sleep never started on a server"
        child.stdin.write("go\n")
        child.stdin.flush()
        out, err = child.communicate(timeout=20)
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
    assert child.returncode == 0, err
    outcome, elapsed, after = out.split()
    assert outcome == "canceled"
    assert float(elapsed) < 3.0
    assert after == "42"


def test_asyncpg_timeout_cancels_the_query_and_the_connection_goes_on(
    pool2: ProxyThread, app_credentials: Credentials
) -> None:
    """asyncpg answers a timeout by sending a CancelRequest and waiting for the error."""

    async def main() -> None:
        conn = await asyncpg_connect(pool2, app_credentials)
        others = [await asyncpg_connect(pool2, app_credentials) for _ in range(3)]
        try:
            started = time.monotonic()
            with pytest.raises(asyncio.TimeoutError):
                await conn.fetchval("SELECT pg_sleep(30)", timeout=0.5)
            assert time.monotonic() - started < 3.0
            results = await asyncio.gather(
                conn.fetchval("SELECT $1::int", 7),
                *(o.fetchval("SELECT $1::int * 2", k) for k, o in enumerate(others)),
            )
            assert results == [7, 0, 2, 4]
        finally:
            for c in [conn, *others]:
                await c.close()

    asyncio.run(main())


# -- psycopg 3, default prepare_threshold ------------------------------------------------------


def test_psycopg_prepared_statements_are_correct_and_other_clients_are_still_served(
    pool2: ProxyThread, app_credentials: Credentials
) -> None:
    """One client prepares (threshold 5) and is pinned; three others share the other server."""

    def preparing(barrier: threading.Barrier) -> int:
        with psycopg_connect(pool2, app_credentials, prepare_threshold=5, autocommit=True) as c:
            barrier.wait()
            for k in range(20):
                row = c.execute("SELECT %s::int * 3, %s::text", (k, f"p{k}")).fetchone()
                assert row == (k * 3, f"p{k}")
            prepared = c.execute(
                "SELECT count(*) FROM pg_prepared_statements WHERE statement LIKE '%%* 3%%'"
            ).fetchone()
            assert prepared is not None
            return int(prepared[0])

    def plain(i: int, barrier: threading.Barrier) -> int:
        with psycopg_connect(pool2, app_credentials, autocommit=True) as conn:
            barrier.wait()
            for k in range(20):
                row = conn.execute("SELECT %s::int * 3 + %s::int", (k, i)).fetchone()
                assert row == (k * 3 + i,)
        return i

    def client(i: int, barrier: threading.Barrier) -> int:
        return preparing(barrier) if i == 0 else plain(i, barrier)

    results = run_clients(4, client)
    assert results[0] == 1, "psycopg did not prepare a named statement: the test tests nothing"
    assert results[1:] == [1, 2, 3]


def test_psycopg_prepared_statement_names_do_not_collide_on_a_reused_server(
    make_proxy: Callable[..., ProxyThread], app_credentials: Credentials
) -> None:
    """psycopg names its statements _pg3_0, _pg3_1...: a server reused after a preparing
    client left must not still hold them."""
    proxy = make_proxy(default_pool_size="1")
    pids = set()
    for round_ in range(3):
        with psycopg_connect(proxy, app_credentials, prepare_threshold=0, autocommit=True) as c:
            for k in range(6):
                row = c.execute("SELECT %s::int + %s::int", (k, round_)).fetchone()
                assert row == (k + round_,)
            row = c.execute("SELECT pg_backend_pid()").fetchone()
            assert row is not None
            pids.add(row[0])
    assert len(pids) == 1, "the single server was not reused: the test tests nothing"


# -- asyncpg, statement_cache_size=0 -----------------------------------------------------------


def test_asyncpg_ten_tasks_fetch_execute_and_transactions_through_two_servers(
    pool2_any_loop: ProxyThread, app_credentials: Credentials, table: str
) -> None:
    pool2 = pool2_any_loop

    async def task(i: int, start: asyncio.Event) -> set[int]:
        conn = await asyncpg_connect(pool2, app_credentials)
        try:
            await start.wait()
            pids = set()
            for k in range(10):
                row = await conn.fetchrow(
                    "SELECT $1::int * 100 + $2::int AS v, $3::text AS s, pg_backend_pid() AS p",
                    i,
                    k,
                    f"t{i}",
                )
                assert row is not None and (row["v"], row["s"]) == (i * 100 + k, f"t{i}")
                pids.add(row["p"])
            assert await conn.fetchval("SELECT $1::text || '!'", "x") == "x!"
            status = await conn.execute(f"INSERT INTO {table} VALUES ($1, 0, 'plain')", i)
            assert status == "INSERT 0 1"
            async with conn.transaction():
                await conn.execute(f"INSERT INTO {table} VALUES ($1, 1, 'kept')", i)
                pid = await conn.fetchval("SELECT pg_backend_pid()")
                await conn.execute(f"INSERT INTO {table} VALUES ($1, 2, 'kept')", i)
                assert await conn.fetchval("SELECT pg_backend_pid()") == pid

            async def failing_transaction() -> None:
                async with conn.transaction():
                    await conn.execute(f"INSERT INTO {table} VALUES ($1, 3, 'lost')", i)
                    await conn.fetchval("SELECT 1 / ($1::int - $1::int)", i)

            with pytest.raises(asyncpg.DivisionByZeroError):
                await failing_transaction()
            # An error without the context manager: explicit ROLLBACK, then business as usual.
            await conn.execute("BEGIN")
            with pytest.raises(asyncpg.UndefinedTableError):
                await conn.execute("SELECT * FROM no_such_table_here")
            with pytest.raises(asyncpg.InFailedSQLTransactionError):
                await conn.fetchval("SELECT 1")
            await conn.execute("ROLLBACK")
            assert not conn.is_in_transaction()
            rows = await conn.fetch(f"SELECT n FROM {table} WHERE client = $1 ORDER BY n", i)
            assert [r["n"] for r in rows] == [0, 1, 2]
            return pids
        finally:
            await conn.close()

    async def main() -> list[set[int]]:
        start = asyncio.Event()
        tasks = [asyncio.create_task(task(i, start)) for i in range(10)]
        start.set()
        return await asyncio.wait_for(asyncio.gather(*tasks), 60)

    pids = set().union(*asyncio.run(main()))
    assert_shared(pool2, pids)
    with pg8000_connect(pool2, app_credentials) as conn:
        assert conn.run(f"SELECT count(*) FROM {table}") == [[30]]


# -- psql --------------------------------------------------------------------------------------


def psql(
    proxy: ProxyThread, creds: Credentials, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PGPASSWORD=creds.password, PGCONNECT_TIMEOUT="15")
    return subprocess.run(
        [
            "psql",
            "-X",
            "-q",
            "-A",
            "-t",
            "-h",
            HOST,
            "-p",
            str(proxy.port),
            "-U",
            creds.user,
            "-d",
            creds.database,
            *args,
        ],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=False,
    )


def test_psql_runs_queries_from_six_concurrent_processes(
    pool2: ProxyThread, app_credentials: Credentials
) -> None:
    def client(i: int, barrier: threading.Barrier) -> str:
        barrier.wait()
        done = psql(
            pool2,
            app_credentials,
            "-c",
            f"SELECT {i} * 7, current_user",
            "-c",
            "SELECT string_agg(g::text, ',') FROM generate_series(1, 5) g",
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    outputs = run_clients(CLIENTS, client)
    assert outputs == [f"{i * 7}|app\n1,2,3,4,5\n" for i in range(CLIENTS)]
    assert pool2.server_count() <= pool2.settings.default_pool_size


def test_psql_on_error_stop_script_with_error_inside_begin_leaves_nothing_behind(
    pool2: ProxyThread, app_credentials: Credentials, table: str
) -> None:
    def client(i: int, barrier: threading.Barrier) -> subprocess.CompletedProcess[str]:
        script = (
            "BEGIN;\n"
            f"INSERT INTO {table} VALUES ({i}, 1, 'lost');\n"
            "SELECT 1 / 0;\n"
            f"INSERT INTO {table} VALUES ({i}, 2, 'never');\n"
            "COMMIT;\n"
        )
        barrier.wait()
        return psql(pool2, app_credentials, "-v", "ON_ERROR_STOP=1", stdin=script)

    for done in run_clients(CLIENTS, client):
        assert done.returncode == 3, (done.returncode, done.stderr)
        assert "division by zero" in done.stderr
    # psql left inside a failed transaction; the proxy rolled it back before reusing the
    # server: nothing was written, and the next clients are not in a failed transaction.
    for _ in range(POOL + 1):
        done = psql(pool2, app_credentials, "-c", f"SELECT count(*) FROM {table}")
        assert (done.returncode, done.stdout) == (0, "0\n"), done.stderr
