"""psycopg2 at its defaults through a transaction-mode pgproxy: 6 client threads, a pool of 2.

psycopg2 is not in autocommit mode by default: its first statement after a commit or rollback
sends BEGIN, so nearly everything here runs inside transactions. Each test runs its client in 6
threads at once (psycopg2 releases the GIL while it waits on the network, so the proxy's thread
runs meanwhile) and checks that they saw at most 2 server connections. `conn.cancel()` is never
called: it is blocking C code and would deadlock with the proxy's thread.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from decimal import Decimal
from typing import Any, TypeVar

import psycopg2
import psycopg2.errors
import psycopg2.extensions

from pgproxy.localpg import Credentials
from tests.e2e.conftest import ProxyThread

T = TypeVar("T")

CLIENTS = 6
POOL = 2


def connect(proxy: ProxyThread, creds: Credentials) -> psycopg2.extensions.connection:
    return psycopg2.connect(
        host="127.0.0.1",
        port=proxy.port,
        user=creds.user,
        password=creds.password,
        dbname=creds.database,
        connect_timeout=15,
    )


def run_clients(
    proxy: ProxyThread, creds: Credentials, work: Callable[[Any, int, threading.Barrier], T]
) -> list[T]:
    """Run `work(conn, index, barrier)` on CLIENTS threads, each with its own connection.

    Re-raises the first failure; a failing client breaks the barrier so that the others fail
    fast instead of waiting for its timeout. Every connection is closed, whatever happens.
    """
    barrier = threading.Barrier(CLIENTS, timeout=20)

    def guarded(index: int) -> T:
        try:
            conn = connect(proxy, creds)
            try:
                return work(conn, index, barrier)
            finally:
                conn.close()
        except BaseException:
            barrier.abort()
            raise

    with ThreadPoolExecutor(CLIENTS) as pool:
        futures = [pool.submit(guarded, i) for i in range(CLIENTS)]
        return [f.result(timeout=60) for f in futures]


def backend_pid(cur: Any) -> int:
    cur.execute("SELECT pg_backend_pid()")
    return int(cur.fetchone()[0])


def assert_shared(proxy: ProxyThread, pids: set[int]) -> None:
    """The clients ran on at most the pool's server connections: they really were shared."""
    limit = proxy.settings.default_pool_size
    assert 1 <= len(pids) <= limit, pids
    assert proxy.server_count() <= limit


def test_parameter_queries_of_every_common_type_come_back_unchanged(
    pool2: ProxyThread, app_credentials: Credentials
) -> None:
    def client(conn: Any, i: int, barrier: threading.Barrier) -> set[int]:
        conn.autocommit = True  # each query its own transaction: the server changes hands
        cur = conn.cursor()
        barrier.wait()
        pids = set()
        for k in range(20):
            values = (
                i * 1000 + k,
                f"client {i} 'quoted' query {k}",
                None,
                Decimal(f"{i}.{k:02d}"),
                date(2024, 1 + i, 1 + k),
                [i, k],
                b"\x00\xff" * k,
            )
            cur.execute(
                "SELECT %s::int, %s::text, %s::text, %s::numeric, %s::date, %s::int[], %s::bytea,"
                " pg_backend_pid()",
                values,
            )
            row = cur.fetchone()
            assert row[:5] == values[:5]
            assert row[5] == values[5]
            assert bytes(row[6]) == values[6]
            pids.add(row[7])
        cur.execute("SELECT %(a)s + %(b)s", {"a": i, "b": 1})
        assert cur.fetchone() == (i + 1,)
        return pids

    pids = set().union(*run_clients(pool2, app_credentials, client))
    assert_shared(pool2, pids)


def test_commits_are_seen_by_every_client_and_rollbacks_by_none(
    pool2: ProxyThread, app_credentials: Credentials, table: str
) -> None:
    def client(conn: Any, i: int, barrier: threading.Barrier) -> tuple[list[Any], set[int]]:
        cur = conn.cursor()
        pid = backend_pid(cur)  # psycopg2 sent BEGIN first: the transaction keeps this server
        cur.execute(f"INSERT INTO {table} VALUES (%s, 1, 'kept')", (i,))
        assert backend_pid(cur) == pid
        conn.commit()
        second = backend_pid(cur)
        cur.execute(f"INSERT INTO {table} VALUES (%s, 2, 'discarded')", (i,))
        cur.execute(f"SELECT count(*) FROM {table} WHERE client = %s", (i,))
        assert cur.fetchone() == (2,)
        assert backend_pid(cur) == second
        conn.rollback()
        barrier.wait()  # every client has committed one row and rolled back the other
        cur.execute(f"SELECT client, n, note FROM {table} ORDER BY client")
        rows = cur.fetchall()
        conn.rollback()
        return rows, {pid, second}

    results = run_clients(pool2, app_credentials, client)
    for rows, _ in results:
        assert rows == [(i, 1, "kept") for i in range(CLIENTS)]
    assert_shared(pool2, set().union(*(pids for _, pids in results)))


def test_an_error_inside_a_transaction_then_rollback_leaves_the_connection_usable(
    pool2: ProxyThread, app_credentials: Credentials, table: str
) -> None:
    def client(conn: Any, i: int, barrier: threading.Barrier) -> tuple[int, int]:
        cur = conn.cursor()
        barrier.wait()
        pid = backend_pid(cur)
        cur.execute(f"INSERT INTO {table} VALUES (%s, 1, 'lost')", (i,))
        try:
            cur.execute("SELECT %s::int / %s::int", (i, 0))
        except psycopg2.errors.DivisionByZero:
            pass
        else:
            raise AssertionError("division by zero did not fail")
        assert conn.info.transaction_status == psycopg2.extensions.TRANSACTION_STATUS_INERROR
        try:
            cur.execute("SELECT 1")
        except psycopg2.errors.InFailedSqlTransaction:
            pass
        else:
            raise AssertionError("a failed transaction accepted a statement")
        conn.rollback()
        cur.execute(f"INSERT INTO {table} VALUES (%s, 2, 'kept')", (i,))
        conn.commit()
        cur.execute("SELECT %s::int * 2", (i,))
        doubled = cur.fetchone()[0]
        conn.rollback()
        return doubled, pid

    results = run_clients(pool2, app_credentials, client)
    assert [doubled for doubled, _ in results] == [i * 2 for i in range(CLIENTS)]
    assert_shared(pool2, {pid for _, pid in results})
    conn = connect(pool2, app_credentials)
    try:
        cur = conn.cursor()
        cur.execute(f"SELECT client, note FROM {table} ORDER BY client")
        assert cur.fetchall() == [(i, "kept") for i in range(CLIENTS)]
    finally:
        conn.close()


def test_executemany_rows_from_six_clients_all_arrive(
    pool2: ProxyThread, app_credentials: Credentials, table: str
) -> None:
    rows_per_client = 300

    def client(conn: Any, i: int, barrier: threading.Barrier) -> int:
        cur = conn.cursor()
        barrier.wait()
        cur.executemany(
            f"INSERT INTO {table} (client, n, note) VALUES (%s, %s, %s)",
            [(i, n, f"row {n}") for n in range(rows_per_client)],
        )
        assert cur.rowcount == rows_per_client
        pid = backend_pid(cur)
        conn.commit()
        return pid

    pids = set(run_clients(pool2, app_credentials, client))
    assert_shared(pool2, pids)
    conn = connect(pool2, app_credentials)
    try:
        cur = conn.cursor()
        cur.execute(f"SELECT client, count(*), sum(n) FROM {table} GROUP BY client ORDER BY 1")
        expected_sum = rows_per_client * (rows_per_client - 1) // 2
        assert cur.fetchall() == [(i, rows_per_client, expected_sum) for i in range(CLIENTS)]
    finally:
        conn.close()


def test_copy_expert_in_and_out_round_trips_each_clients_rows(
    pool2: ProxyThread, app_credentials: Credentials, table: str
) -> None:
    def client(conn: Any, i: int, barrier: threading.Barrier) -> tuple[str, str, set[int]]:
        cur = conn.cursor()
        sent = "".join(f"{i}\t{n}\tclient {i}, row {n}\n" for n in range(2000))
        barrier.wait()
        pids = {backend_pid(cur)}
        cur.copy_expert(f"COPY {table} (client, n, note) FROM STDIN", io.StringIO(sent))
        assert cur.rowcount == 2000
        conn.commit()
        received = io.StringIO()
        cur.copy_expert(
            f"COPY (SELECT client, n, note FROM {table} WHERE client = {i} ORDER BY n) TO STDOUT",
            received,
        )
        pids.add(backend_pid(cur))
        conn.commit()
        return sent, received.getvalue(), pids

    results = run_clients(pool2, app_credentials, client)
    for sent, received, _ in results:
        assert received == sent
    assert_shared(pool2, set().union(*(pids for _, _, pids in results)))


def test_named_cursor_inside_a_transaction_fetches_every_batch(
    pool2: ProxyThread, app_credentials: Credentials
) -> None:
    def client(conn: Any, i: int, barrier: threading.Barrier) -> tuple[int, int, int, set[int]]:
        barrier.wait()
        pids = {backend_pid(conn.cursor())}
        # The same cursor name in every client: cursors live in each client's own transaction.
        cur = conn.cursor(name="c")
        cur.execute("SELECT n, %s::int FROM generate_series(1, 10000) n", (i,))
        batches = 0
        count = 0
        total = 0
        while rows := cur.fetchmany(1000):
            batches += 1
            count += len(rows)
            total += sum(n for n, _ in rows)
            assert {client for _, client in rows} == {i}
        pids.add(backend_pid(conn.cursor()))
        cur.close()
        conn.commit()
        return batches, count, total, pids

    results = run_clients(pool2, app_credentials, client)
    for batches, count, total, _ in results:
        assert (batches, count, total) == (10, 10000, 10000 * 10001 // 2)
    assert_shared(pool2, set().union(*(pids for *_, pids in results)))


def test_withhold_named_cursor_keeps_fetching_across_commits(
    pool2: ProxyThread, app_credentials: Credentials, table: str
) -> None:
    def client(conn: Any, i: int, barrier: threading.Barrier) -> tuple[int, int, set[int]]:
        barrier.wait()
        cur = conn.cursor(name="c", withhold=True)
        cur.execute("SELECT n, %s::int FROM generate_series(1, 5000) n", (i,))
        conn.commit()  # a WITH HOLD cursor outlives its transaction
        writer = conn.cursor()
        pids = set()
        count = 0
        total = 0
        while rows := cur.fetchmany(500):
            count += len(rows)
            total += sum(n for n, _ in rows)
            assert {client for _, client in rows} == {i}
            writer.execute(f"INSERT INTO {table} VALUES (%s, %s, 'batch')", (i, count))
            pids.add(backend_pid(writer))
            conn.commit()
        cur.close()
        conn.commit()
        return count, total, pids

    results = run_clients(pool2, app_credentials, client)
    for count, total, _ in results:
        assert (count, total) == (5000, 5000 * 5001 // 2)
    assert_shared(pool2, set().union(*(pids for *_, pids in results)))
    conn = connect(pool2, app_credentials)
    try:
        cur = conn.cursor()
        cur.execute(f"SELECT client, count(*) FROM {table} GROUP BY client ORDER BY client")
        assert cur.fetchall() == [(i, 10) for i in range(CLIENTS)]
    finally:
        conn.close()
