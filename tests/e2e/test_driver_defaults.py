"""The drop-in matrix: drivers at their default settings, through a transaction-mode pool of 2."""

from __future__ import annotations

import asyncio
import threading

import asyncpg
import psycopg
import pytest

from pgproxy.localpg import LocalPostgres

from .helpers import conninfo

CLIENTS = 6


@pytest.fixture(params=["transaction", "session"])
def pool2(request, make_proxy):
    """A pool of 2 in each mode: in session mode the clients queue for the two servers."""
    return make_proxy(default_pool_size="2", pool_mode=request.param)


def _run_threads(target, count: int = CLIENTS) -> None:
    errors: list[BaseException] = []

    def run(n: int) -> None:
        try:
            target(n)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []


def test_psycopg_defaults_executemany_pipeline_cursor_and_copy(
    pg: LocalPostgres, pool2, table: str
) -> None:
    def client(n: int) -> None:
        with psycopg.connect(conninfo(pool2.port)) as conn:  # not autocommit, default threshold
            with conn.cursor() as cur:
                cur.executemany(
                    f"INSERT INTO {table} (client, n, note) VALUES (%s, %s, %s)",
                    [(n, i, f"row {i}") for i in range(50)],
                )
            conn.commit()
            with conn.pipeline():
                cursors = [
                    conn.execute("SELECT %s::int * 10", (i,)) for i in range(20)
                ]  # several Syncs in flight, prepared after the 5th
            assert [c.fetchone() for c in cursors] == [(i * 10,) for i in range(20)]
            with conn.cursor(name=f"srv_{n}") as cur:  # DECLARE ... inside a transaction
                cur.itersize = 7
                cur.execute(f"SELECT n FROM {table} WHERE client = %s ORDER BY n", (n,))
                assert [r[0] for r in cur] == list(range(50))
            conn.commit()
            with (
                conn.cursor() as cur,
                cur.copy(
                    f"COPY (SELECT n FROM {table} WHERE client = {n} ORDER BY n) TO STDOUT"
                ) as copy,
            ):
                got = [int(row[0]) for row in copy.rows()]
            assert got == list(range(50))
            conn.commit()
            for i in range(10):  # the same statement again and again: prepared, shared
                assert conn.execute(
                    f"SELECT count(*) FROM {table} WHERE client = %s AND n < %s", (n, i)
                ).fetchone() == (i,)
            conn.rollback()

    _run_threads(client)


def test_asyncpg_defaults_executemany_copy_cursor_prepared_and_timeout(
    pg: LocalPostgres, pool2, table: str
) -> None:
    async def client(n: int) -> None:
        conn = await asyncpg.connect(
            host="127.0.0.1", port=pool2.port, user="app", password="app-secret", database="app"
        )
        try:
            await conn.executemany(
                f"INSERT INTO {table} (client, n, note) VALUES ($1, $2, $3)",
                [(n, i, f"note {i}") for i in range(40)],
            )
            await conn.copy_records_to_table(
                table, records=[(n, 100 + i, "copied") for i in range(40)]
            )
            async with conn.transaction():
                seen = [r["n"] async for r in conn.cursor(
                    f"SELECT n FROM {table} WHERE client = $1 ORDER BY n", n, prefetch=9
                )]  # fmt: skip
            assert seen == list(range(40)) + [100 + i for i in range(40)]
            stmt = await conn.prepare(f"SELECT count(*) FROM {table} WHERE client = $1")
            assert await stmt.fetchval(n) == 80
            with pytest.raises(asyncio.TimeoutError):
                await conn.execute("SELECT pg_sleep(10)", timeout=0.3)
            assert await conn.fetchval("SELECT $1::int + 1", n) == n + 1
        finally:
            await conn.close()

    async def fifty_tasks() -> None:
        async def one(i: int) -> None:
            conn = await asyncpg.connect(
                host="127.0.0.1", port=pool2.port, user="app", password="app-secret",
                database="app",
            )  # fmt: skip
            try:
                stmt = await conn.prepare("SELECT $1::int * 3")  # same text, everyone
                for k in range(5):
                    assert await stmt.fetchval(i + k) == (i + k) * 3
            finally:
                await conn.close()

        await asyncio.gather(*(one(i) for i in range(50)))

    async def main() -> None:
        await asyncio.gather(*(client(n) for n in range(CLIENTS)))
        await fifty_tasks()

    asyncio.run(main())
    rows = pg.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app' AND query LIKE '%pg_sleep%' "
        "AND state = 'active'"
    )
    assert rows == [(0,)], "the timed-out query must have been cancelled"
