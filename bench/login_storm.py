"""A login storm: thousands of new connections within about a second, beside a linked client.

Per pooler (fresh, max_client_conn above the storm): a linked client logs in first and runs
`SELECT 1` in a loop, one query after the other, timing each. After a second of that (the
baseline), a child process opens `clients` connections spread evenly over `seconds`; each
logs in (SCRAM-SHA-256), runs one `SELECT 1` and says goodbye. Reported: how long the
pooler took to serve them all, failures, its CPU per login, and the linked client's latency
during the storm beside its baseline: a pooler that does expensive work per login on its
one thread (PBKDF2, say) makes the linked client wait for it.

The storm runs in its own process (uvloop, `pgclient.Login`) so that its Python work does
not delay the linked client's; both processes time with CLOCK_MONOTONIC, which they share.
The storm's clients are cheap: `pgproxy.wire.scram` caches their salted password, so 2,000
logins run PBKDF2 once, where libpq or asyncpg would run it 2,000 times (~2 s of CPU on
the client side alone). The linked client's queries go through the pool's queue like the
storm's, first come first served, in both poolers.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import cast

import pgclient
import uvloop
from procfs import CpuClock
from report import fmt, ratio, table
from targets import BENCH, HOST, Target

from pgproxy.errors import PgProxyError
from pgproxy.wire.messages import query, terminate

SQL = "SELECT 1"
# What ends a good answer to SQL: CommandComplete "SELECT 1", then ReadyForQuery('I').
ANSWER_END = b"SELECT 1\x00" + pgclient.READY_IDLE
# The linked client's latency with no storm, measured just before it.
BASELINE_SECONDS = 1.0
# A storm client that is not served within this long counts as failed.
CLIENT_TIMEOUT = 60.0
# How often the storm starts the connections that are due (evenly spread over `seconds`).
ARRIVAL_TICK = 0.005
# Starting the storm's process (spawn: imports pgproxy and uvloop) and its first login.
CHILD_START_TIMEOUT = 30.0


@dataclass
class StormResult:
    target: str
    clients: int
    served: int = 0
    # From the first connection attempt to the last client's answer; and to the last attempt.
    serve_seconds: float = 0.0
    arrival_seconds: float = 0.0
    cpu_seconds: float | None = None
    # Each new client's connect + login + query, in seconds.
    logins: list[float] = field(default_factory=list)
    # The linked client's query latencies (seconds): before the storm, and during it.
    baseline: list[float] = field(default_factory=list)
    during: list[float] = field(default_factory=list)
    errors: int = 0
    error: str | None = None


def percentile(values: Sequence[float], fraction: float) -> float | None:
    """Nearest-rank percentile; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))]


# -- the linked client -----------------------------------------------------------------


class LinkedClient(threading.Thread):
    """Logged in before the storm; runs SQL one query after another, timing each."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.sock = pgclient.connect(port, BENCH)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # (sent at, answered at) per query, monotonic seconds.
        self.queries: list[tuple[float, float]] = []
        self.failure: BaseException | None = None
        self._stopping = threading.Event()

    def run(self) -> None:
        message = query(SQL)
        try:
            while not self._stopping.is_set():
                sent_at = time.monotonic()
                self.sock.sendall(message)
                tail = b""
                while not tail.endswith(pgclient.READY_IDLE):
                    chunk = self.sock.recv(4096)
                    if not chunk:
                        raise ConnectionError("the pooler closed the linked client")
                    tail = (tail + chunk)[-pgclient.TAIL :]
                if ANSWER_END not in tail:
                    raise ConnectionError(f"unexpected answer to {SQL!r}: {tail!r}")
                self.queries.append((sent_at, time.monotonic()))
        except (OSError, ConnectionError) as exc:
            self.failure = exc

    def latencies(self, start: float, end: float) -> list[float]:
        """Latencies of the queries that were in flight at some moment of [start, end]."""
        return [done - sent for sent, done in self.queries if done > start and sent < end]

    def stop(self) -> None:
        self._stopping.set()
        self.join(CLIENT_TIMEOUT)
        pgclient.close(self.sock)


# -- the storm (in its own process) ----------------------------------------------------


class StormClient(asyncio.Protocol):
    """Logs in, runs SQL once and leaves; `answered` resolves at its answer."""

    def __init__(self) -> None:
        self.login = pgclient.Login(BENCH)
        self.answered: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self.tail = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCP transport is not an asyncio.Transport subclass, but has its methods.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.login.startup())

    def data_received(self, data: bytes) -> None:
        if self.answered.done() or self.transport is None:
            return
        if not self.login.is_ready:
            self._on_login(self.transport, data)
            return
        self.tail = (self.tail + data)[-pgclient.TAIL :]
        if self.tail.endswith(pgclient.READY_IDLE):
            if ANSWER_END in self.tail:
                self.answered.set_result(None)
            else:
                self.answered.set_exception(ConnectionError(f"unexpected answer: {self.tail!r}"))

    def _on_login(self, transport: asyncio.Transport, data: bytes) -> None:
        try:
            reply = self.login.feed(data)
        except (pgclient.LoginError, PgProxyError) as exc:
            self.answered.set_exception(exc)
            return
        if reply:
            transport.write(reply)
        if self.login.is_ready:
            transport.write(query(SQL))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.answered.done():
            self.answered.set_exception(exc or ConnectionError("closed before the answer"))

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(terminate())
            self.transport.close()


class Together:
    """Keeps every answered client connected until all have been answered or have failed."""

    def __init__(self, count: int) -> None:
        self.left = count
        self.everyone = asyncio.Event()

    def done(self) -> None:
        self.left -= 1
        if self.left <= 0:
            self.everyone.set()


async def one_client(port: int, together: Together | None = None) -> float:
    """Connect, log in, query, leave; returns how long until the answer (seconds). With
    `together`, it leaves only once every client of the storm has its answer."""
    loop = asyncio.get_running_loop()
    started_at = time.monotonic()
    client: StormClient | None = None
    try:
        try:
            async with asyncio.timeout(CLIENT_TIMEOUT):
                _, client = await loop.create_connection(StormClient, HOST, port)
                await client.answered
        finally:
            if together is not None:
                together.done()
        latency = time.monotonic() - started_at
        if together is not None:
            await together.everyone.wait()  # each client ends within CLIENT_TIMEOUT
        return latency
    finally:
        if client is not None:
            client.close()


async def run_storm(
    port: int, count: int, seconds: float, *, hold: bool = False
) -> dict[str, object]:
    """Start `count` clients evenly over `seconds`; wait for every one of them. `hold`: the
    answered ones stay connected until all are answered (all inside the pooler at once)."""
    together = Together(count) if hold else None
    tasks: list[asyncio.Task[float]] = []
    started_at = time.monotonic()
    while len(tasks) < count:
        due = min(count, int((time.monotonic() - started_at) / seconds * count) + 1)
        tasks.extend(
            asyncio.create_task(one_client(port, together)) for _ in range(due - len(tasks))
        )
        await asyncio.sleep(ARRIVAL_TICK)
    arrived_at = time.monotonic()
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    finished_at = time.monotonic()
    answered = [o for o in outcomes if isinstance(o, float)]
    errors = [o for o in outcomes if not isinstance(o, float)]
    return {
        "started_at": started_at,
        "arrived_at": arrived_at,
        "finished_at": finished_at,
        "latencies": answered,
        "errors": len(errors),
        "first_error": repr(errors[0]) if errors else None,
    }


def storm_process(
    pipe: Connection, port: int, count: int, seconds: float, hold: bool = False
) -> None:
    """The storm's process: one warm-up login (fills the SCRAM key cache), 'ready', wait for
    'go', storm (`run_storm`), send the outcome back."""
    try:
        uvloop.run(one_client(port))
    except (OSError, TimeoutError, pgclient.LoginError, PgProxyError) as exc:
        pipe.send({"error": f"warm-up login failed: {exc!r}"})
        return
    pipe.send("ready")
    if pipe.recv() == "go":
        pipe.send(uvloop.run(run_storm(port, count, seconds, hold=hold)))


# -- one pooler ------------------------------------------------------------------------


def measure_storm(target: Target, count: int, seconds: float) -> StormResult:
    result = StormResult(target.name, count)
    try:
        linked = LinkedClient(target.port)
    except (OSError, pgclient.LoginError) as exc:
        result.error = f"linked client could not log in: {exc}"
        return result
    context = multiprocessing.get_context("spawn")
    parent_end, child_end = context.Pipe()
    child = context.Process(
        target=storm_process, args=(child_end, target.port, count, seconds), daemon=True
    )
    linked.start()
    child.start()
    try:
        if not parent_end.poll(CHILD_START_TIMEOUT):
            result.error = "the storm's process did not start"
            return result
        ready = parent_end.recv()
        if ready != "ready":
            result.error = str(ready)
            return result
        # The linked client alone, for its baseline latency (a measuring period).
        baseline_from = time.monotonic()
        time.sleep(BASELINE_SECONDS)
        cpu = CpuClock(target.pid)
        parent_end.send("go")
        if not parent_end.poll(CLIENT_TIMEOUT + count / 100):
            result.error = "the storm did not finish"
            return result
        storm = parent_end.recv()
        result.cpu_seconds = cpu.elapsed()
    finally:
        linked.stop()
        child.join(10)
        if child.is_alive():
            child.kill()
            child.join()
    started_at, finished_at = storm["started_at"], storm["finished_at"]
    result.logins, result.errors = storm["latencies"], storm["errors"]
    result.served = len(result.logins)
    result.serve_seconds = finished_at - started_at
    result.arrival_seconds = storm["arrived_at"] - started_at
    result.baseline = linked.latencies(baseline_from, started_at)
    result.during = linked.latencies(started_at, finished_at)
    if storm["first_error"]:
        result.error = f"{storm['errors']} clients failed, the first: {storm['first_error']}"
    if linked.failure is not None:
        result.error = f"linked client failed: {linked.failure!r}"
    print(
        f"login storm {target.name:<17} {result.served:,}/{count:,} served in "
        f"{result.serve_seconds:.2f} s, new client p99 {ms(percentile(result.logins, 0.99))} ms; "
        f"linked client p99 {ms(percentile(result.during, 0.99))}"
        f" ms, max {ms(max(result.during, default=None))} ms"
        + (f"  ERROR: {result.error}" if result.error else ""),
        flush=True,
    )
    return result


def run_login_storm(targets: Sequence[Target], count: int, seconds: float) -> list[StormResult]:
    return [measure_storm(target, count, seconds) for target in targets if target.pid is not None]


# -- report ----------------------------------------------------------------------------


def ms(seconds: float | None) -> str:
    return fmt(seconds * 1000 if seconds is not None else None, 2)


def render(results: Sequence[StormResult], count: int, seconds: float) -> list[str]:
    rows = [
        [
            r.target,
            f"{r.served:,}",
            f"{r.errors:,}",
            fmt(r.arrival_seconds, 2),
            fmt(r.serve_seconds, 2),
            ms(percentile(r.logins, 0.5)),
            ms(percentile(r.logins, 0.99)),
            fmt(r.cpu_seconds / count * 1000 if r.cpu_seconds is not None else None, 3),
            ms(percentile(r.baseline, 0.5)),
            f"{len(r.during):,}",
            ms(percentile(r.during, 0.5)),
            ms(percentile(r.during, 0.99)),
            ms(max(r.during, default=None)),
            r.error or "",
        ]
        for r in results
    ]
    worst = {r.target: max(r.during, default=None) for r in results}
    new = {r.target: percentile(r.logins, 0.99) for r in results}
    return [
        f"## Login storm: {count:,} new connections in {seconds:g} s",
        "",
        f"A linked client, logged in beforehand, runs `{SQL}` one query after another while "
        f"{count:,} new clients connect, spread evenly over {seconds:g} s (another process); "
        "each logs in (SCRAM-SHA-256, the pooler holds the user's secret: no PBKDF2 on its "
        f"side), runs `{SQL}` and leaves. Served in = from the first connection attempt to the "
        "last answer; arrivals took = until the last attempt started; new client = one client's "
        "connect, login and query. Pooler CPU is over the "
        "whole storm, per new client. The linked client's latencies are those of its queries "
        "in flight during the storm; baseline = the second before it.",
        "",
        *table(
            [
                "pooler",
                "served",
                "errors",
                "arrivals took s",
                "served in s",
                "new client p50 ms",
                "new client p99 ms",
                "pooler CPU ms / login",
                "linked baseline p50 ms",
                "linked queries during storm",
                "linked p50 ms",
                "linked p99 ms",
                "linked max ms",
                "error",
            ],
            rows,
            "lrrrrrrrrrrrrl",
        ),
        "pgproxy / PgBouncer, a new client's p99: "
        f"**{ratio(new.get('pgproxy'), new.get('pgbouncer'))}**; the linked client's longest "
        f"wait: **{ratio(worst.get('pgproxy'), worst.get('pgbouncer'))}**.",
        "",
    ]
