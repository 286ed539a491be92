"""A driver that parses in one round trip and binds in the next keeps working when another
client used the shared server in between (pg8000 and asyncpg do this with the unnamed
statement)."""

from __future__ import annotations

import asyncio
import threading

import asyncpg
import pg8000.native

from pgproxy.localpg import LocalPostgres


def test_pg8000_clients_with_different_statements_share_one_server(
    pg: LocalPostgres, make_proxy
) -> None:
    proxy = make_proxy(default_pool_size="1")
    errors: list[BaseException] = []
    barrier = threading.Barrier(6)

    def client(n: int) -> None:
        conn = pg8000.native.Connection(
            "app", host="127.0.0.1", port=proxy.port, password="app-secret", database="app"
        )
        try:
            barrier.wait()
            for i in range(60):
                # A statement text of this client's own, with a parameter: Parse, then Bind.
                rows = conn.run(f"SELECT CAST(:x AS int) + {n * 1000} AS v{n}", x=i)
                assert rows == [[i + n * 1000]]
        except BaseException as exc:
            errors.append(exc)
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []


def test_asyncpg_without_statement_cache_with_different_statements(
    pg: LocalPostgres, make_proxy
) -> None:
    proxy = make_proxy(default_pool_size="1")

    async def client(n: int) -> None:
        conn = await asyncpg.connect(
            host="127.0.0.1", port=proxy.port, user="app", password="app-secret",
            database="app", statement_cache_size=0,
        )  # fmt: skip
        try:
            for i in range(60):
                value = await conn.fetchval(f"SELECT $1::int + {n * 1000}", i)
                assert value == i + n * 1000
        finally:
            await conn.close()

    async def main() -> None:
        await asyncio.gather(*(client(n) for n in range(6)))

    asyncio.run(main())
