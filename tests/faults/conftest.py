"""Fixtures of the fault tests: a cluster of their own, the relay, proxies in front of either.

The session cluster `pg` of tests/conftest.py is shared with every other test and must never
be restarted, so these tests run their own (`fault_pg`), which they may restart, stop and
start. Each test gets it running and without `app` backends (`cluster`), a fresh relay in
front of it (`relay`), and `make_proxy(**settings)`: a pgproxy on its own uvloop thread whose
`server` is the relay (or, with `direct=True`, the cluster itself). Where a real process
matters (signals, RLIMIT_NOFILE), `start_cli(...)` runs `python -m pgproxy` instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pgproxy.localpg import LocalPostgres
from tests.e2e.conftest import ProxyThread
from tests.e2e.helpers import ProxyProcess, spawn_cli, stop_cli

from .helpers import APP, pg_start, terminate_app_backends
from .relay import Relay


@pytest.fixture(scope="session")
def fault_pg() -> Iterator[LocalPostgres]:
    """A cluster only the fault tests use; low max_connections, so that leaks show."""
    with LocalPostgres(max_connections=40) as cluster:
        cluster.create_user(APP.user, APP.password)
        cluster.create_database(APP.database, owner=APP.user)
        yield cluster


@pytest.fixture
def cluster(fault_pg: LocalPostgres) -> Iterator[LocalPostgres]:
    """`fault_pg`, running, with no `app` backend left over from an earlier test."""
    if not fault_pg.is_running:
        pg_start(fault_pg)
    terminate_app_backends(fault_pg)
    yield fault_pg
    if not fault_pg.is_running:
        pg_start(fault_pg)


@pytest.fixture
def relay(cluster: LocalPostgres) -> Iterator[Relay]:
    with Relay((cluster.host, cluster.port)) as started:
        yield started


@pytest.fixture
def make_proxy(cluster: LocalPostgres, relay: Relay) -> Iterator[Callable[..., ProxyThread]]:
    """`make_proxy(default_pool_size="4", ...)`: a proxy whose server is the relay."""
    started: list[ProxyThread] = []

    def make(*, direct: bool = False, **overrides: object) -> ProxyThread:
        port = cluster.port if direct else relay.port
        flags: dict[str, object] = {
            "listen": "127.0.0.1:0",
            "server": f"127.0.0.1:{port}",
            "users": [f"{APP.user}:{APP.password}"],
            "default_pool_size": "4",
            "query_wait_timeout": "10",
            "server_connect_timeout": "3",
            # A test that leaves a client linked must not cost 30 s at teardown.
            "shutdown_timeout": "2",
            # Off unless a test asks: parallel proxies would fight over port 9127.
            "metrics_listen": "",
            "monitor_interval": "0",
        }
        flags.update(overrides)
        proxy = ProxyThread(flags).start()
        started.append(proxy)
        return proxy

    yield make
    for proxy in started:
        proxy.stop()


@pytest.fixture
def start_cli(cluster: LocalPostgres, tmp_path: Path) -> Iterator[Callable[..., ProxyProcess]]:
    """`start_cli("--default-pool-size", "3", nofile=300)`: `python -m pgproxy` in front of
    the cluster (RLIMIT_NOFILE set in the child when `nofile` is given), once it listens."""
    started: list[ProxyProcess] = []

    def start(*extra: str, nofile: int | None = None) -> ProxyProcess:
        server, user = f"127.0.0.1:{cluster.port}", f"{APP.user}:{APP.password}"
        proxy = spawn_cli(server, user, tmp_path, extra, nofile=nofile)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        stop_cli(proxy)
