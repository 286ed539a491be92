"""`Load`: many clients running short transactions through the proxy while faults happen.

The clients are asyncpg and psycopg (async) connections, half each, on one plain asyncio loop
in a thread of their own. Every transaction inserts a row `(client, n)` and is timed with a
deadline of its own; the outcome of each (committed, failed with which error, or hung past
its deadline) is recorded with its start and end, so that a test can ask what happened
before, during and after a fault. A client whose transaction failed drops its connection and
connects again, as an application's pool would.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import asyncpg
import psycopg

from .helpers import APP, asyncpg_connect, error_text, sqlstate

HUNG = "hung"  # the error of an operation that passed its deadline


@dataclass(frozen=True, slots=True)
class Outcome:
    client: int
    what: str  # "connect" or "transaction"
    started_at: float
    ended_at: float
    error: str | None  # None: it worked; HUNG; else "SQLSTATE Type: message"
    sqlstate: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class Load:
    """`clients` connections to `port`, each inserting into `table` until `stop()`."""

    def __init__(
        self,
        port: int,
        clients: int,
        table: str,
        *,
        deadline: float,
        sleep: float = 0.005,
    ) -> None:
        self.port = port
        self.clients = clients
        self.table = table
        self.deadline = deadline
        self.sleep = sleep
        self.outcomes: list[Outcome] = []
        self.committed: set[tuple[int, int]] = set()
        self.attempted: set[tuple[int, int]] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name="fault-load", daemon=True)
        self.crash: BaseException | None = None

    # -- control (test thread) --

    def start(self) -> Load:
        self._thread.start()
        return self

    def stop(self, timeout: float = 60.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the load did not stop"
        if self.crash is not None:
            raise AssertionError(f"the load crashed: {self.crash!r}") from self.crash

    def commits_since(self, since: float) -> int:
        return sum(1 for o in list(self.outcomes) if o.ok and o.started_at >= since)

    def failures(self) -> list[Outcome]:
        return [o for o in list(self.outcomes) if not o.ok]

    def summary(self) -> str:
        kinds = Counter(
            f"{o.what}: {o.sqlstate or '-'} {(o.error or '')[:90]}" for o in self.failures()
        )
        ok = sum(1 for o in self.outcomes if o.ok)
        lines = [f"{ok} ok, {len(self.outcomes) - ok} failed"]
        lines += [f"  {n:5d} x {kind}" for kind, n in kinds.most_common(15)]
        return "\n".join(lines)

    # -- the clients (load thread) --

    def _main(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as exc:
            self.crash = exc

    async def _run(self) -> None:
        await asyncio.gather(*(self._client(cid) for cid in range(self.clients)))

    async def _client(self, cid: int) -> None:
        use_asyncpg = cid % 2 == 0
        conn: Any = None
        n = 0
        try:
            while not self._stop.is_set():
                if conn is None:
                    conn = await self._timed(cid, "connect", self._connect(use_asyncpg))
                    if conn is None:
                        await asyncio.sleep(0.05)
                        continue
                n += 1
                self.attempted.add((cid, n))
                coro = (
                    self._asyncpg_transaction(conn, cid, n)
                    if use_asyncpg
                    else self._psycopg_transaction(conn, cid, n)
                )
                if await self._timed(cid, "transaction", coro) is None:
                    await _close(conn)
                    conn = None
                else:
                    self.committed.add((cid, n))
        finally:
            if conn is not None:
                await _close(conn)

    async def _timed(self, cid: int, what: str, coro: Any) -> Any:
        """Run `coro` under the deadline; record the outcome; None when it failed."""
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.deadline):
                result = await coro
        except TimeoutError:
            self.outcomes.append(Outcome(cid, what, started, time.monotonic(), HUNG))
            return None
        except (
            asyncpg.PostgresError,
            asyncpg.InterfaceError,
            asyncpg.InternalClientError,
            psycopg.Error,
            OSError,
        ) as exc:
            self.outcomes.append(
                Outcome(cid, what, started, time.monotonic(), error_text(exc), sqlstate(exc))
            )
            return None
        self.outcomes.append(Outcome(cid, what, started, time.monotonic(), None))
        return result if result is not None else True

    async def _connect(self, use_asyncpg: bool) -> Any:
        if use_asyncpg:
            return await asyncpg_connect(self.port, timeout=self.deadline)
        return await psycopg.AsyncConnection.connect(
            host="127.0.0.1",
            port=self.port,
            user=APP.user,
            password=APP.password,
            dbname=APP.database,
            autocommit=True,
            connect_timeout=int(self.deadline),
        )

    async def _asyncpg_transaction(self, conn: asyncpg.Connection, cid: int, n: int) -> bool:
        async with conn.transaction():
            await conn.execute(f"INSERT INTO {self.table} VALUES ($1, $2)", cid, n)
            if self.sleep:
                await conn.execute(f"SELECT pg_sleep({self.sleep})")
        return True

    async def _psycopg_transaction(
        self, conn: psycopg.AsyncConnection[Any], cid: int, n: int
    ) -> bool:
        async with conn.transaction():
            await conn.execute(f"INSERT INTO {self.table} VALUES (%s, %s)", (cid, n))
            if self.sleep:
                await conn.execute(f"SELECT pg_sleep({self.sleep})")
        return True


async def _close(conn: Any) -> None:
    if isinstance(conn, asyncpg.Connection):
        conn.terminate()
        return
    with contextlib.suppress(Exception):
        await asyncio.wait_for(conn.close(), 2)
