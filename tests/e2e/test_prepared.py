"""Protocol-level named prepared statements in transaction mode, drivers at their defaults."""

from __future__ import annotations

import asyncio
import os
import subprocess
import threading

import asyncpg
import psycopg
import pytest

from pgproxy.localpg import LocalPostgres

from .helpers import conninfo


def _server_view(proxy):
    return proxy.call(
        lambda: [(s.state.pinned, len(s.state.statements)) for s in proxy.proxy.servers]
    )


def test_psycopg_prepared_statements_are_shared_not_pinned(pg: LocalPostgres, make_proxy) -> None:
    proxy = make_proxy(default_pool_size="2")
    errors: list[BaseException] = []
    barrier = threading.Barrier(6)

    def client(n: int) -> None:
        try:
            # prepare_threshold left at psycopg's default (5): the 6th run is prepared.
            with psycopg.connect(conninfo(proxy.port), autocommit=True) as conn:
                barrier.wait()
                for i in range(30):
                    shared = conn.execute("SELECT %s::int * 2", (i,)).fetchone()
                    mine = conn.execute(f"SELECT %s::int + {n}", (i,)).fetchone()
                    assert shared == (i * 2,)
                    assert mine == (i + n,)
                    with conn.transaction():
                        assert conn.execute("SELECT %s::text", (f"t{n}",)).fetchone() == (f"t{n}",)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    view = _server_view(proxy)
    assert len(view) <= 2
    assert all(pinned is None for pinned, _ in view), view
    assert any(count > 0 for _, count in view), "nothing was prepared under the proxy's names"


def test_asyncpg_statement_cache_and_explicit_prepare_work_across_servers(
    pg: LocalPostgres, make_proxy
) -> None:
    proxy = make_proxy(default_pool_size="2")

    async def client(n: int) -> None:
        conn = await asyncpg.connect(
            host="127.0.0.1", port=proxy.port, user="app", password="app-secret", database="app"
        )
        try:
            stmt = await conn.prepare("SELECT $1::int * $2::int")
            for i in range(40):
                assert await conn.fetchval("SELECT $1::int + 1", i) == i + 1
                assert await stmt.fetchval(i, n) == i * n
                async with conn.transaction():
                    assert await conn.fetchval(f"SELECT $1::int - {n}", i) == i - n
        finally:
            await conn.close()

    async def main() -> None:
        await asyncio.gather(*(client(n) for n in range(10)))

    asyncio.run(main())
    view = _server_view(proxy)
    assert all(pinned is None for pinned, _ in view), view


def test_a_failed_parse_leaves_no_stale_statement(pg: LocalPostgres, make_proxy) -> None:
    proxy = make_proxy(default_pool_size="1")
    with psycopg.connect(conninfo(proxy.port), autocommit=True, prepare_threshold=0) as conn:
        with pytest.raises(psycopg.errors.UndefinedTable):
            conn.execute("SELECT * FROM no_such_table WHERE 1 = %s", (1,))
        conn.execute("CREATE TABLE IF NOT EXISTS no_such_table (a int)")
        try:
            assert conn.execute("SELECT * FROM no_such_table WHERE 1 = %s", (1,)).fetchall() == []
            assert conn.execute("SELECT %s::int", (5,)).fetchone() == (5,)
        finally:
            conn.execute("DROP TABLE no_such_table")


def test_least_recently_used_statements_are_evicted_and_prepared_again(
    pg: LocalPostgres, make_proxy
) -> None:
    proxy = make_proxy(default_pool_size="1", max_prepared_statements="3")
    with psycopg.connect(conninfo(proxy.port), autocommit=True, prepare_threshold=0) as conn:
        for round_ in range(3):
            for k in range(6):
                assert conn.execute(f"SELECT %s::int + {k}", (round_,)).fetchone() == (round_ + k,)
    # The set is trimmed when the server is next linked (a quiet moment for a Close + Sync).
    with psycopg.connect(conninfo(proxy.port), autocommit=True) as other:
        other.execute("SELECT 1")
    counts = [count for _, count in _server_view(proxy)]
    assert counts and max(counts) <= 3


def test_pgbench_prepared_tpcb_with_more_clients_than_servers_on_one_thread(
    pg: LocalPostgres, make_proxy
) -> None:
    """pgbench prepares synchronously: a Parse that waited for a server deadlocked its thread
    while another of its clients held that server inside a transaction."""
    pg.create_database("pgb", owner="app")
    env = dict(os.environ, PGPASSWORD="app-secret")
    try:
        subprocess.run(
            ["pgbench", "-i", "-s", "1", "-q", "-h", pg.host, "-p", str(pg.port), "-U", "app",
             "pgb"],
            env=env, check=True, capture_output=True,
        )  # fmt: skip
        proxy = make_proxy(default_pool_size="2", query_wait_timeout="10")
        result = subprocess.run(
            ["pgbench", "-M", "prepared", "-n", "-c", "8", "-j", "1", "-t", "20",
             "-h", "127.0.0.1", "-p", str(proxy.port), "-U", "app", "pgb"],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    finally:
        pg.execute("DROP DATABASE pgb WITH (FORCE)")
    assert result.returncode == 0, result.stderr[-500:]
    assert "number of transactions actually processed: 160/160" in result.stdout
    assert "number of failed transactions: 0 " in result.stdout


def test_discard_all_by_the_client_forgets_its_statements_like_a_server_would(
    pg: LocalPostgres, make_proxy
) -> None:
    proxy = make_proxy(default_pool_size="1")
    with psycopg.connect(conninfo(proxy.port), autocommit=True) as conn:
        conn.prepare_threshold = 0
        assert conn.execute("SELECT %s::int", (1,)).fetchone() == (1,)
        conn.execute("DISCARD ALL")
        # psycopg knows DISCARD ALL drops its statements and prepares again: it must work.
        assert conn.execute("SELECT %s::int", (2,)).fetchone() == (2,)
    assert all(count == 0 or pinned is None for pinned, count in _server_view(proxy))
