"""RELOAD (and SIGHUP): settings read again and applied to a running proxy."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from pathlib import Path

import asyncpg
import psycopg
import pytest

from pgproxy import report
from pgproxy.config import Settings, load_settings
from pgproxy.errors import ConfigError
from pgproxy.localpg import LocalPostgres

from .conftest import ProxyThread
from .helpers import APP_PASSWORD, connect, conninfo, spawn_cli, stop_cli, wait_for


def reloading(proxy: ProxyThread, base: dict[str, object]) -> Callable[..., list[str]]:
    """`reload(**changes)`: reload `proxy` as if its configuration now said base + changes."""

    def reload(**changes: object) -> list[str]:
        flags = {**base, **changes}

        def read() -> Settings:
            return load_settings(flags, environ={})

        proxy.proxy._reload_settings = read
        return list(proxy.call(proxy.proxy.reload))

    return reload


def base_flags(pg: LocalPostgres, proxy: ProxyThread) -> dict[str, object]:
    return {
        "listen": "127.0.0.1:0",
        "server": f"{pg.host}:{pg.port}",
        "users": [f"app:{APP_PASSWORD}"],
        "default_pool_size": "2",
        "query_wait_timeout": "30",
        "metrics_listen": "",
        "monitor_interval": "0",
    }


def test_reload_applies_users_pool_sizes_and_timeouts_live(pg: LocalPostgres, make_proxy) -> None:
    proxy = make_proxy()
    base = base_flags(pg, proxy)
    reload = reloading(proxy, base)
    with connect(proxy.port) as conn:
        conn.execute("SELECT 1")
    assert reload() == []
    pg.execute("DO $$BEGIN CREATE ROLE ops LOGIN PASSWORD 'ops-pw'; EXCEPTION WHEN "
               "duplicate_object THEN NULL; END$$")  # fmt: skip
    lines = reload(
        users=[f"app:{APP_PASSWORD}", "ops:ops-pw"],
        default_pool_size="5",
        query_timeout="12",
        pool_mode="session",
    )
    assert "users: app, ops" in lines
    assert "default_pool_size: 2 -> 5" in lines
    assert "query_timeout: 0.0 -> 12.0" in lines
    assert "pool_mode: changed in the configuration, needs a restart" in lines
    pool = proxy.call(lambda: report.pools(proxy.proxy, proxy.proxy.now()))[0]
    assert pool.size == 5
    assert proxy.proxy.settings.pool_mode.value == "transaction"  # kept until a restart
    with psycopg.connect(conninfo(proxy.port, user="ops", password="ops-pw", dbname="app")) as ops:
        assert ops.execute("SELECT current_user").fetchone() == ("ops",)


def test_a_reloaded_server_lifetime_replaces_servers_at_their_next_checkin(
    pg: LocalPostgres, make_proxy
) -> None:
    """checkin reads server_lifetime from an attribute of the proxy, not from the settings
    (it runs once per transaction): a RELOAD must reach that attribute. (The watchdog, which
    retires idle servers, reads the settings; the attribute is checked for that reason.)"""
    proxy = make_proxy(default_pool_size="1")
    reload = reloading(proxy, {**base_flags(pg, proxy), "default_pool_size": "1"})
    with connect(proxy.port) as conn:
        first = conn.execute("SELECT pg_backend_pid()").fetchone()
        assert conn.execute("SELECT pg_backend_pid()").fetchone() == first  # 3600 s: kept
        assert "server_lifetime: 3600.0 -> 0.2" in reload(server_lifetime="0.2")
        assert proxy.proxy.server_lifetime == 0.2

        def replaced() -> bool:
            return conn.execute("SELECT pg_backend_pid()").fetchone() != first

        wait_for(replaced, timeout=5, what="the server to be replaced after its lifetime")


def test_a_bad_configuration_changes_nothing(pg: LocalPostgres, make_proxy) -> None:
    proxy = make_proxy()
    reload = reloading(proxy, base_flags(pg, proxy))
    before = proxy.proxy.settings
    with pytest.raises(ConfigError) as info:
        reload(default_pool_size="0")
    assert info.value.setting == "default_pool_size"
    assert proxy.proxy.settings is before


class Load:
    """Clients running short transactions through a proxy until `stop`, counting them and
    keeping any error (a client stops at its first)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.stop = asyncio.Event()
        self.errors: list[BaseException] = []
        self.done = 0

    async def client(self) -> None:
        conn = await asyncpg.connect(
            host="127.0.0.1", port=self.port, user="app", password=APP_PASSWORD, database="app"
        )
        try:
            while not self.stop.is_set():
                try:
                    async with conn.transaction():
                        await conn.fetchval("SELECT pg_sleep(0.005)")
                        await conn.fetchval("SELECT 1")
                    self.done += 1
                except Exception as exc:
                    self.errors.append(exc)
                    return
        finally:
            await conn.close()


def test_reload_resizes_a_pool_under_load_without_a_single_client_error(
    pg: LocalPostgres, make_proxy
) -> None:
    proxy = make_proxy()
    reload = reloading(proxy, base_flags(pg, proxy))
    load = Load(proxy.port)

    def size() -> int:
        return int(proxy.call(lambda: report.pools(proxy.proxy, proxy.proxy.now())[0].size))

    async def run() -> list[int]:
        tasks = [asyncio.create_task(load.client()) for _ in range(30)]
        sizes = []
        for pool_size in ("6", "3", "8", "2"):
            await asyncio.sleep(0.3)  # load runs at the old size for a while
            await asyncio.to_thread(reload, default_pool_size=pool_size)
            sizes.append(await asyncio.to_thread(size))
            peak = await asyncio.to_thread(pg.backends, user="app")
            assert peak <= max(int(pool_size), 8)
        await asyncio.sleep(0.3)
        load.stop.set()
        await asyncio.gather(*tasks)
        return sizes

    sizes = asyncio.run(run())
    assert not load.errors, load.errors[:3]
    assert sizes == [6, 3, 8, 2]
    assert load.done > 100
    # Shrunk to 2: the extra servers were closed as they came back.
    wait_for(lambda: pg.backends(user="app") <= 2, what="the pool to shrink to 2 servers")


def test_sighup_resizes_a_pool_under_load_without_a_single_client_error(
    pg: LocalPostgres, tmp_path: Path
) -> None:
    """The operator's path: `python -m pgproxy --config FILE`, the file edited, SIGHUP."""
    config = tmp_path / "pgproxy.toml"
    config.write_text("default_pool_size = 6\nquery_wait_timeout = 30\n")
    proxy = spawn_cli(
        f"{pg.host}:{pg.port}", f"app:{APP_PASSWORD}", tmp_path, ["--config", str(config)]
    )
    load = Load(proxy.port)

    async def run() -> None:
        tasks = [asyncio.create_task(load.client()) for _ in range(30)]
        before = 6
        for size in (3, 8, 2):
            served = load.done
            # Load runs at the old size until some transactions have gone through it.
            await asyncio.to_thread(wait_for, lambda n=served: load.done >= n + 50)
            config.write_text(f"default_pool_size = {size}\nquery_wait_timeout = 30\n")
            proxy.process.send_signal(signal.SIGHUP)
            line = f"reload: default_pool_size: {before} -> {size}"
            await asyncio.to_thread(wait_for, lambda line=line: proxy.log_lines(line))
            before = size
        served = load.done
        await asyncio.to_thread(wait_for, lambda: load.done >= served + 50)
        load.stop.set()
        await asyncio.gather(*tasks)

    try:
        asyncio.run(run())
        assert not load.errors, load.errors[:3]
        # Shrunk to 2: the extra servers were closed as they came back.
        wait_for(lambda: pg.backends(user="app") <= 2, what="the pool to shrink to 2 servers")
    finally:
        stop_cli(proxy)


def test_a_moved_upstream_lets_the_open_transaction_finish_then_replaces_its_server(
    pg: LocalPostgres, make_proxy
) -> None:
    proxy = make_proxy()
    reload = reloading(proxy, base_flags(pg, proxy))
    with connect(proxy.port) as busy, connect(proxy.port) as other:
        busy.execute("BEGIN")
        old_pid = busy.execute("SELECT pg_backend_pid()").fetchone()
        # The same cluster under another name: for the proxy, a new address.
        lines = reload(server=f"localhost:{pg.port}")
        assert f"server: postgresql://{pg.host}:{pg.port} -> postgresql://localhost:{pg.port}" in (
            lines
        )
        assert busy.execute("SELECT pg_backend_pid()").fetchone() == old_pid  # undisturbed
        busy.execute("COMMIT")

        def old_backend_gone() -> bool:
            rows = pg.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", old_pid[0])
            return rows == [(0,)]

        wait_for(old_backend_gone, what="the old server to be closed once back")
        assert other.execute("SELECT pg_backend_pid()").fetchone() != old_pid
        assert busy.execute("SELECT 1").fetchone() == (1,)
