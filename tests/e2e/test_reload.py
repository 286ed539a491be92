"""RELOAD (and SIGHUP): settings read again and applied to a running proxy."""

from __future__ import annotations

from collections.abc import Callable

import psycopg
import pytest

from pgproxy import report
from pgproxy.config import Settings, load_settings
from pgproxy.errors import ConfigError
from pgproxy.localpg import LocalPostgres

from .conftest import ProxyThread
from .helpers import APP_PASSWORD, connect, conninfo


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


def test_a_bad_configuration_changes_nothing(pg: LocalPostgres, make_proxy) -> None:
    proxy = make_proxy()
    reload = reloading(proxy, base_flags(pg, proxy))
    before = proxy.proxy.settings
    with pytest.raises(ConfigError) as info:
        reload(default_pool_size="0")
    assert info.value.setting == "default_pool_size"
    assert proxy.proxy.settings is before
