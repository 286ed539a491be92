"""COPY FROM STDIN / TO STDOUT through a transaction-mode proxy, with real drivers and psql.

As in test_drivers.py, more clients run at once than the pool has servers, so that a server
that is released too early (mid-COPY) or handed over dirty shows up as wrong data or errors.
Each client writes its own rows, tagged with its index, and reads exactly those back.
"""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from psycopg import errors as pg_errors

from pgproxy.localpg import Credentials, LocalPostgres
from tests.e2e.conftest import ProxyThread
from tests.e2e.test_drivers import (
    CLIENTS,
    HOST,
    asyncpg_connect,
    pg8000_connect,
    psycopg_connect,
    run_clients,
)

ROWS = 2000


def rows_text(client: int, count: int = ROWS) -> str:
    """COPY text format: client, n, note (with a tab and a backslash to escape)."""
    return "".join(f"{client}\t{n}\tnote {n} \\\\ \\t end\n" for n in range(count))


def app_rows(pg: LocalPostgres, creds: Credentials, table: str) -> list[tuple[int, int]]:
    """(client, row count) per client, read directly from Postgres (not through the proxy)."""
    rows = pg.execute(
        f"SELECT client, count(*) FROM {table} GROUP BY client ORDER BY client",
        database=creds.database,
    )
    return [(int(c), int(n)) for c, n in rows]


# -- pg8000 ------------------------------------------------------------------------------------


def test_pg8000_copy_in_and_out_from_six_clients_round_trips_each_clients_rows(
    pool2: ProxyThread, app_credentials: Credentials, pg: LocalPostgres, table: str
) -> None:
    def client(i: int, barrier: threading.Barrier) -> None:
        sent = rows_text(i)
        with pg8000_connect(pool2, app_credentials) as conn:
            barrier.wait()
            conn.run(f"COPY {table} (client, n, note) FROM STDIN", stream=io.StringIO(sent))
            assert conn.row_count == ROWS
            out = io.StringIO()
            conn.run(
                f"COPY (SELECT client, n, note FROM {table} WHERE client = {i} ORDER BY n)"
                " TO STDOUT",
                stream=out,
            )
            assert out.getvalue() == sent
            assert conn.run("SELECT CAST(:i AS int) + 1", i=i) == [[i + 1]]

    run_clients(CLIENTS, client)
    assert app_rows(pg, app_credentials, table) == [(i, ROWS) for i in range(CLIENTS)]


# -- psycopg 3 ---------------------------------------------------------------------------------


def test_psycopg_copy_in_and_out_from_six_clients_round_trips_each_clients_rows(
    pool2: ProxyThread, app_credentials: Credentials, pg: LocalPostgres, table: str
) -> None:
    def client(i: int, barrier: threading.Barrier) -> None:
        with psycopg_connect(pool2, app_credentials, autocommit=True) as conn:
            barrier.wait()
            with conn.cursor() as cur:
                with cur.copy(f"COPY {table} (client, n, note) FROM STDIN") as copy:
                    for n in range(ROWS):
                        copy.write_row((i, n, f"note {n} \\ \t end"))
                assert cur.rowcount == ROWS
                with cur.copy(
                    f"COPY (SELECT client, n, note FROM {table} WHERE client = %s ORDER BY n)"
                    " TO STDOUT",
                    (i,),
                ) as copy:
                    received = b"".join(bytes(chunk) for chunk in copy)
                assert received.decode() == rows_text(i)
                # Typed rows, the other way of reading a COPY out.
                with cur.copy(
                    f"COPY (SELECT n, note FROM {table} WHERE client = %s AND n < 3 ORDER BY n)"
                    " TO STDOUT",
                    (i,),
                ) as copy:
                    copy.set_types(["int4", "text"])
                    assert list(copy.rows()) == [(n, f"note {n} \\ \t end") for n in range(3)]
            row = conn.execute("SELECT %s::int * 2", (i,)).fetchone()
            assert row == (i * 2,)

    run_clients(CLIENTS, client)
    assert app_rows(pg, app_credentials, table) == [(i, ROWS) for i in range(CLIENTS)]


def test_psycopg_copy_inside_a_transaction_is_rolled_back_with_it(
    pool2: ProxyThread, app_credentials: Credentials, pg: LocalPostgres, table: str
) -> None:
    def client(i: int, barrier: threading.Barrier) -> None:
        with psycopg_connect(pool2, app_credentials) as conn:
            barrier.wait()
            with conn.cursor() as cur:
                with cur.copy(f"COPY {table} (client, n) FROM STDIN") as copy:
                    copy.write(f"{i}\t1\n{i}\t2\n")
                row = cur.execute(f"SELECT count(*) FROM {table} WHERE client = %s", (i,))
                assert row.fetchone() == (2,)
            if i % 2:
                conn.commit()
            else:
                conn.rollback()

    run_clients(CLIENTS, client)
    assert app_rows(pg, app_credentials, table) == [(i, 2) for i in range(CLIENTS) if i % 2]


def bad_copy(conn, table: str, i: int) -> None:  # type: ignore[no-untyped-def]
    """A COPY FROM whose 100th row is not an int, followed by many more rows.

    The server fails the COPY at the bad row while the client is still sending; its
    ErrorResponse and ReadyForQuery overtake the rest of the client's CopyData.
    """
    with conn.cursor() as cur, cur.copy(f"COPY {table} (client, n, note) FROM STDIN") as copy:
        for n in range(ROWS * 5):
            copy.write(f"{i}\t{'oops' if n == 100 else n}\tbad batch\n")


def test_psycopg_copy_in_with_bad_data_fails_and_the_connection_goes_on(
    pool2: ProxyThread, app_credentials: Credentials, pg: LocalPostgres, table: str
) -> None:
    def client(i: int, barrier: threading.Barrier) -> list[tuple[int, ...]]:
        with psycopg_connect(pool2, app_credentials, autocommit=True) as conn:
            barrier.wait()
            with pytest.raises(pg_errors.InvalidTextRepresentation):
                bad_copy(conn, table, i)
            # Normal use of the same connection: queries, and a good COPY.
            assert conn.execute("SELECT %s::int + 10", (i,)).fetchone() == (i + 10,)
            with conn.cursor() as cur, cur.copy(f"COPY {table} (client, n) FROM STDIN") as cp:
                cp.write(f"{i}\t1\n{i}\t2\n{i}\t3\n")
            return conn.execute(
                f"SELECT n FROM {table} WHERE client = %s ORDER BY n", (i,)
            ).fetchall()

    assert run_clients(CLIENTS, client) == [[(1,), (2,), (3,)]] * CLIENTS
    assert app_rows(pg, app_credentials, table) == [(i, 3) for i in range(CLIENTS)]


def test_psycopg_copy_aborted_by_the_client_sends_copyfail_and_the_connection_goes_on(
    pool2: ProxyThread, app_credentials: Credentials, pg: LocalPostgres, table: str
) -> None:
    class CopyAbortedError(Exception):
        pass

    def aborted_copy(conn, i: int) -> None:  # type: ignore[no-untyped-def]
        with conn.cursor() as cur, cur.copy(f"COPY {table} (client, n) FROM STDIN") as copy:
            copy.write(f"{i}\t1\n")
            raise CopyAbortedError  # psycopg answers with CopyFail

    def client(i: int, barrier: threading.Barrier) -> tuple[int, ...] | None:
        with psycopg_connect(pool2, app_credentials, autocommit=True) as conn:
            barrier.wait()
            with pytest.raises(CopyAbortedError):
                aborted_copy(conn, i)
            return conn.execute("SELECT %s::int", (i,)).fetchone()

    assert run_clients(CLIENTS, client) == [(i,) for i in range(CLIENTS)]
    assert app_rows(pg, app_credentials, table) == []


def test_psycopg_large_copy_out_to_several_clients_arrives_whole(
    pool2: ProxyThread, app_credentials: Credentials
) -> None:
    """A few MB per client through two servers: back-pressure must not lose or mix bytes."""
    total = 100_000

    def client(i: int, barrier: threading.Barrier) -> tuple[int, int]:
        with psycopg_connect(pool2, app_credentials, autocommit=True) as conn:
            barrier.wait()
            lines = 0
            checksum = 0
            with (
                conn.cursor() as cur,
                cur.copy(
                    "COPY (SELECT %s::int, g, repeat('x', 20) FROM generate_series(1, %s) g)"
                    " TO STDOUT",
                    (i, total),
                ) as copy,
            ):
                tail = b""
                for chunk in copy:
                    data = tail + bytes(chunk)
                    *complete, tail = data.split(b"\n")
                    for line in complete:
                        client_, n, _pad = line.split(b"\t")
                        assert int(client_) == i
                        checksum += int(n)
                        lines += 1
                assert tail == b""
            return lines, checksum

    expected = (total, total * (total + 1) // 2)
    assert run_clients(CLIENTS, client) == [expected] * CLIENTS


def test_psycopg_copy_works_on_plain_asyncio(
    make_proxy: Callable[..., ProxyThread],
    app_credentials: Credentials,
    pg: LocalPostgres,
    table: str,
) -> None:
    proxy = make_proxy(use_uvloop=False, default_pool_size="1")

    def client(i: int, barrier: threading.Barrier) -> None:
        with psycopg_connect(proxy, app_credentials, autocommit=True) as conn:
            barrier.wait()
            with conn.cursor() as cur:
                with cur.copy(f"COPY {table} (client, n, note) FROM STDIN") as copy:
                    copy.write(rows_text(i, 500))
                with cur.copy(
                    f"COPY (SELECT * FROM {table} WHERE client = %s ORDER BY n) TO STDOUT", (i,)
                ) as copy:
                    assert b"".join(bytes(c) for c in copy).decode() == rows_text(i, 500)

    run_clients(3, client)
    assert app_rows(pg, app_credentials, table) == [(i, 500) for i in range(3)]


# -- asyncpg -----------------------------------------------------------------------------------


def test_asyncpg_copy_to_table_and_copy_from_query_from_ten_tasks(
    pool2: ProxyThread, app_credentials: Credentials, pg: LocalPostgres, table: str
) -> None:
    async def task(i: int, start: asyncio.Event) -> None:
        conn = await asyncpg_connect(pool2, app_credentials)
        try:
            await start.wait()
            status = await conn.copy_to_table(
                table,
                source=io.BytesIO(rows_text(i).encode()),
                columns=["client", "n", "note"],
            )
            assert status == f"COPY {ROWS}"
            # Binary COPY as well (asyncpg encodes the records itself).
            status = await conn.copy_records_to_table(
                table,
                records=[(i, ROWS + n, "binary") for n in range(100)],
                columns=["client", "n", "note"],
            )
            assert status == "COPY 100"
            out = io.BytesIO()
            status = await conn.copy_from_query(
                f"SELECT client, n, note FROM {table} WHERE client = $1 AND n < $2 ORDER BY n",
                i,
                ROWS,
                output=out,
            )
            assert status == f"COPY {ROWS}"
            assert out.getvalue().decode() == rows_text(i)
            assert await conn.fetchval("SELECT $1::int * 3", i) == i * 3
        finally:
            await conn.close()

    async def main() -> None:
        start = asyncio.Event()
        tasks = [asyncio.create_task(task(i, start)) for i in range(10)]
        start.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 60)

    asyncio.run(main())
    assert app_rows(pg, app_credentials, table) == [(i, ROWS + 100) for i in range(10)]
    assert pool2.server_count() <= pool2.settings.default_pool_size


# -- psql --------------------------------------------------------------------------------------


def run_psql(
    proxy: ProxyThread, creds: Credentials, *args: str
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PGPASSWORD=creds.password, PGCONNECT_TIMEOUT="15")
    command = ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", HOST, "-p", str(proxy.port)]
    command += ["-U", creds.user, "-d", creds.database, *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=30, check=False)


def test_psql_copy_in_and_out_from_six_processes_round_trips_each_file(
    pool2: ProxyThread,
    app_credentials: Credentials,
    pg: LocalPostgres,
    table: str,
    tmp_path: Path,
) -> None:
    def client(i: int, barrier: threading.Barrier) -> None:
        source = tmp_path / f"in-{i}.tsv"
        target = tmp_path / f"out-{i}.tsv"
        source.write_text(rows_text(i))
        barrier.wait()
        done = run_psql(
            pool2,
            app_credentials,
            "-c",
            f"\\copy {table} (client, n, note) FROM '{source}'",
            "-c",
            f"\\copy (SELECT client, n, note FROM {table} WHERE client = {i} ORDER BY n)"
            f" TO '{target}'",
        )
        assert done.returncode == 0, done.stderr
        assert target.read_text() == rows_text(i)

    run_clients(CLIENTS, client)
    assert app_rows(pg, app_credentials, table) == [(i, ROWS) for i in range(CLIENTS)]


def test_psql_copy_with_bad_data_stops_the_script_and_writes_nothing(
    pool2: ProxyThread,
    app_credentials: Credentials,
    pg: LocalPostgres,
    table: str,
    tmp_path: Path,
) -> None:
    source = tmp_path / "bad.tsv"
    source.write_text(rows_text(0, 50) + "0\tnot-a-number\tbad\n" + rows_text(0, 50))
    done = run_psql(
        pool2,
        app_credentials,
        "-c",
        f"\\copy {table} (client, n, note) FROM '{source}'",
        "-c",
        "SELECT 'never printed'",
    )
    assert done.returncode == 1, done.stderr
    assert "invalid input syntax for type integer" in done.stderr
    assert "never printed" not in done.stdout
    assert app_rows(pg, app_credentials, table) == []
    again = run_psql(pool2, app_credentials, "-A", "-t", "-c", f"SELECT count(*) FROM {table}")
    assert (again.returncode, again.stdout) == (0, "0\n"), again.stderr
