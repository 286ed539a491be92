"""Proxy fixtures: a real pgproxy on its own uvloop thread in front of the session cluster."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvloop

from pgproxy.config import load_settings
from pgproxy.localpg import Credentials, LocalPostgres
from pgproxy.proxy import Proxy

from .helpers import ProxyProcess, spawn_cli, stop_cli


class ProxyThread:
    """A `Proxy` serving on an event loop in a background thread."""

    def __init__(self, flags: dict[str, object], *, use_uvloop: bool = True) -> None:
        self.settings = load_settings(flags, environ={})
        self.proxy = Proxy(self.settings)
        self._use_uvloop = use_uvloop
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="pgproxy", daemon=True)
        self._done: asyncio.Event | None = None

    @property
    def port(self) -> int:
        return self.proxy.listen_port

    def start(self) -> ProxyThread:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("proxy did not start within 10 s")
        if self._error is not None:
            raise self._error
        return self

    def _main(self) -> None:
        factory = uvloop.new_event_loop if self._use_uvloop else asyncio.new_event_loop
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(self._serve())

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._done = asyncio.Event()
        try:
            await self.proxy.start()
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        await self._done.wait()
        await self.proxy.drain()

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the proxy's loop (the only safe place to read its state)."""
        assert self._loop is not None
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def run() -> None:
            try:
                fut.set_result(fn())
            except BaseException as exc:
                fut.set_exception(exc)

        self._loop.call_soon_threadsafe(run)
        return fut.result(timeout=10)

    def stop(self) -> None:
        if self._loop is not None and self._done is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._done.set)
        self._thread.join(30)

    def server_count(self) -> int:
        return int(self.call(lambda: len(self.proxy.servers)))


@pytest.fixture
def make_proxy(
    pg: LocalPostgres, app_credentials: Credentials
) -> Iterator[Callable[..., ProxyThread]]:
    """`make_proxy(default_pool_size="2", ...)`: start a proxy with these settings overridden."""
    started: list[ProxyThread] = []

    def make(*, use_uvloop: bool = True, **overrides: object) -> ProxyThread:
        flags: dict[str, object] = {
            "listen": "127.0.0.1:0",
            "server": f"{pg.host}:{pg.port}",
            "users": [f"{app_credentials.user}:{app_credentials.password}"],
            "default_pool_size": "2",
            "query_wait_timeout": "30",
            # Off unless a test asks: parallel proxies would fight over port 9127.
            "metrics_listen": "",
            "monitor_interval": "0",
        }
        flags.update(overrides)
        proxy = ProxyThread(flags, use_uvloop=use_uvloop).start()
        started.append(proxy)
        return proxy

    yield make
    for proxy in started:
        proxy.stop()


# In session mode every connected client keeps a server: the pool must hold the test's
# concurrent clients (up to 8 at once), still well under the cluster's max_connections.
SESSION_POOL = 10


@pytest.fixture(params=["transaction", "session"])
def pool2(request: pytest.FixtureRequest, make_proxy: Callable[..., ProxyThread]) -> ProxyThread:
    """Transaction mode with 2 server connections; session mode with one per client."""
    if request.param == "session":
        return make_proxy(default_pool_size=str(SESSION_POOL), pool_mode="session")
    return make_proxy(default_pool_size="2")


@pytest.fixture
def table(pg: LocalPostgres, app_credentials: Credentials) -> Iterator[str]:
    """A fresh table `(client int, n int, note text)` owned by `app`, dropped afterwards."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    pg.execute(
        f"CREATE TABLE {name} (client int NOT NULL, n int NOT NULL, note text);"
        f"ALTER TABLE {name} OWNER TO {app_credentials.user}",
        database=app_credentials.database,
    )
    yield name
    pg.execute(f"DROP TABLE IF EXISTS {name}", database=app_credentials.database)


@pytest.fixture
def proxy(make_proxy: Callable[..., ProxyThread]) -> ProxyThread:
    """A transaction-mode proxy with a pool of 2 for the `app` user."""
    return make_proxy()


@pytest.fixture
def counter_table(pg: LocalPostgres) -> Iterator[None]:
    """Table `safety (id, v)` owned by `app` with the row (1, 0), dropped afterwards."""
    pg.execute("CREATE TABLE safety (id int PRIMARY KEY, v int NOT NULL)", database="app")
    pg.execute("ALTER TABLE safety OWNER TO app", database="app")
    pg.execute("INSERT INTO safety VALUES (1, 0)", database="app")
    yield
    pg.execute("DROP TABLE safety", database="app")


@pytest.fixture
def start_cli(pg: LocalPostgres, tmp_path: Path) -> Iterator[Callable[..., ProxyProcess]]:
    """`start_cli("--shutdown-timeout", "1")`: the CLI serving, once its port accepts."""
    started: list[ProxyProcess] = []

    def start(*extra: str, shutdown_timeout: str = "20") -> ProxyProcess:
        defaults = ["--default-pool-size", "2", "--shutdown-timeout", shutdown_timeout]
        proxy = spawn_cli(f"{pg.host}:{pg.port}", "app:app-secret", tmp_path, [*defaults, *extra])
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        stop_cli(proxy)
