"""Capacity: ten thousand client connections on one worker, a few hundred of them busy.

Per pooler (fresh, one worker, transaction pooling, pool size 20, max_client_conn above the
crowd): after one query and a settle (the baseline), one child process logs in
`clients - active` idle clients (SCRAM-SHA-256, `pgclient`, IDLE_CONCURRENCY at a time) and
keeps them silent; then ACTIVE_PROCESSES child processes log in `active` clients that, on
'go', run `SELECT 1` one after the other for `seconds`, each timing its queries. So the
pooler holds every client at once while the active ones keep all of its servers busy.
Afterwards every idle client runs one query too (proof that it is still connected and
served), and all of them leave.

Reported: errors of every kind (logins, queries, idle clients dropped or unanswered; the
issue asks for zero), KiB per idle client = (RSS with the idle clients - RSS before) / idle
clients, RSS with everyone and at its peak, the active clients' throughput and latency (each
has one query in flight, so 500 of them queue for 20 servers: latency = queue), pooler CPU
per query, and what the pooler and PostgreSQL count half-way through: client connections
(admin console, pgproxy) and server connections (pg_stat_activity). Clients are ours
(`pgclient`, as in the idle and login-storm sections), cheap enough that one process keeps
thousands logged in and two keep 500 busy: asyncpg would spend more CPU than the pooler.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, cast

import idle_clients
import login_storm
import pgclient
import uvloop
from procfs import CpuClock, RssSampler, rss_kib
from report import fmt, ratio, table
from soak import Console
from targets import BENCH, HOST, Target

from pgproxy.errors import PgProxyError
from pgproxy.localpg import LocalPostgres
from pgproxy.wire.messages import query, terminate

SQL = login_storm.SQL
ANSWER_END = login_storm.ANSWER_END
# Logins in flight at once per process, as in the idle section.
IDLE_CONCURRENCY = 100
ACTIVE_CONCURRENCY = 50
ACTIVE_PROCESSES = 2
LOGIN_TIMEOUT = 60.0
# Let the pooler finish what the last logins started before its RSS is read.
SETTLE_SECONDS = 1.0
# A child that does not report within this long (beyond its own work) has failed.
CHILD_TIMEOUT = 120.0
# Each idle client's final query: 9,500 of them queue for 20 servers at once.
CHECK_TIMEOUT = 120.0


# -- clients (in the child processes) --------------------------------------------------


class Client(asyncio.Protocol):
    """Logs in (`ready`), then runs SQL when asked: once (`ask`) or in a loop (`run`)."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.login = pgclient.Login(BENCH)
        self.ready: asyncio.Future[None] = loop.create_future()
        self.finished: asyncio.Future[None] = loop.create_future()
        self.transport: asyncio.Transport | None = None
        self.tail = b""
        self.sent_at = 0.0
        self.until = 0.0  # run() keeps asking until this moment
        self.latencies: list[float] = []
        self.errors: list[str] = []
        # Lost its connection after logging in, without being asked to close.
        self.dropped = False
        self.closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCP transport is not an asyncio.Transport subclass, but has its methods.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.login.startup())

    def data_received(self, data: bytes) -> None:
        if self.transport is None:
            return
        if not self.ready.done():
            try:
                reply = self.login.feed(data)
            except (pgclient.LoginError, PgProxyError) as exc:
                self.ready.set_exception(exc)
                return
            if reply:
                self.transport.write(reply)
            if self.login.is_ready:
                self.ready.set_result(None)
            return
        self.tail = (self.tail + data)[-pgclient.TAIL :]
        if not self.tail.endswith(pgclient.READY_IDLE):
            return
        if ANSWER_END in self.tail:
            self.latencies.append(time.monotonic() - self.sent_at)
        else:
            self.errors.append(f"unexpected answer: {self.tail!r}")
        self.tail = b""
        if time.monotonic() < self.until:
            self._send()
        elif not self.finished.done():
            self.finished.set_result(None)

    def _send(self) -> None:
        assert self.transport is not None
        self.sent_at = time.monotonic()
        self.transport.write(query(SQL))

    def ask(self) -> None:
        """One query; `finished` resolves at its answer."""
        self._send()

    def run(self, until: float) -> None:
        """Queries one after the other until `until`; `finished` resolves after the last."""
        self.until = until
        self._send()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_exception(exc or ConnectionError("closed during the login"))
            return
        if not self.closing:
            self.dropped = True
            self.errors.append(f"connection lost: {exc!r}")
        if not self.finished.done():
            self.finished.set_result(None)

    def close(self) -> None:
        self.closing = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(terminate())
            self.transport.close()


async def log_in(port: int, count: int, concurrency: int) -> tuple[list[Client], list[str]]:
    """`count` logged-in clients, `concurrency` logins at a time; and the failures."""
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(concurrency)

    async def one() -> Client:
        async with gate, asyncio.timeout(LOGIN_TIMEOUT):
            _, client = await loop.create_connection(Client, HOST, port)
            try:
                await client.ready
            except BaseException:
                client.close()
                raise
            return client

    outcomes = await asyncio.gather(*(one() for _ in range(count)), return_exceptions=True)
    clients = [o for o in outcomes if isinstance(o, Client)]
    errors = [repr(o) for o in outcomes if not isinstance(o, Client)]
    return clients, errors


async def receive(pipe: Connection) -> object:
    """The parent's next command, without blocking the loop."""
    return await asyncio.get_running_loop().run_in_executor(None, pipe.recv)


async def close_all(clients: Sequence[Client]) -> None:
    for client in clients:
        client.close()
    await asyncio.sleep(0.1)  # let the Terminates go out


def idle_process(pipe: Connection, port: int, count: int) -> None:
    uvloop.run(hold_idle(pipe, port, count))


async def hold_idle(pipe: Connection, port: int, count: int) -> None:
    """Log in, report, stay silent; on 'check' one query each; on 'close' leave."""
    started_at = time.monotonic()
    clients, errors = await log_in(port, count, IDLE_CONCURRENCY)
    pipe.send(
        {
            "logged_in": len(clients),
            "errors": len(errors),
            "first_error": errors[0] if errors else None,
            "seconds": time.monotonic() - started_at,
        }
    )
    while await receive(pipe) == "check":
        for client in clients:
            client.ask()
        _, pending = await asyncio.wait(
            [c.finished for c in clients if not c.finished.done()], timeout=CHECK_TIMEOUT
        )
        problems = [e for c in clients for e in c.errors]
        pipe.send(
            {
                "answered": sum(1 for c in clients if c.latencies),
                "unanswered": len(pending),
                "dropped": sum(1 for c in clients if c.dropped),
                "errors": len(problems),
                "first_error": problems[0] if problems else None,
            }
        )
    await close_all(clients)
    pipe.send("closed")


def active_process(pipe: Connection, port: int, count: int, seconds: float) -> None:
    uvloop.run(keep_busy(pipe, port, count, seconds))


async def keep_busy(pipe: Connection, port: int, count: int, seconds: float) -> None:
    """Log in, report; on 'go' run queries for `seconds`, report; on 'close' leave."""
    clients, errors = await log_in(port, count, ACTIVE_CONCURRENCY)
    pipe.send(
        {
            "logged_in": len(clients),
            "errors": len(errors),
            "first_error": errors[0] if errors else None,
        }
    )
    if await receive(pipe) == "go":
        started_at = time.monotonic()
        for client in clients:
            client.run(started_at + seconds)
        _, pending = await asyncio.wait([c.finished for c in clients], timeout=seconds + 60)
        problems = [e for c in clients for e in c.errors]
        pipe.send(
            {
                "latencies": [x for c in clients for x in c.latencies],
                "seconds": time.monotonic() - started_at,
                "errors": len(problems) + len(pending),
                "first_error": problems[0] if problems else None,
                "dropped": sum(1 for c in clients if c.dropped),
            }
        )
        await receive(pipe)  # 'close'
    await close_all(clients)
    pipe.send("closed")


# -- the parent ------------------------------------------------------------------------


class Child:
    """A client process (spawned: it imports what it needs afresh) and our end of its pipe."""

    def __init__(self, target: Callable[..., None], *args: object) -> None:
        context = multiprocessing.get_context("spawn")
        self.pipe, child_end = context.Pipe()
        self.process = context.Process(target=target, args=(child_end, *args), daemon=True)
        self.process.start()

    def ask(self, command: str | None, timeout: float) -> Any:
        """Send `command` (if any) and wait for the answer; None if none came in time."""
        if command is not None:
            self.pipe.send(command)
        if not self.pipe.poll(timeout):
            return None
        return self.pipe.recv()

    def stop(self) -> None:
        self.process.join(10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.pipe.close()


@dataclass
class CapacityResult:
    target: str
    clients: int
    active: int
    seconds: float
    idle_logged_in: int = 0
    active_logged_in: int = 0
    login_seconds: float = 0.0
    queries: int = 0
    active_seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    idle_answered: int = 0
    cpu_seconds: float | None = None
    rss_before_kib: int | None = None
    rss_idle_kib: int | None = None
    rss_all_kib: int | None = None
    rss_peak_kib: int | None = None
    rss_after_kib: int | None = None
    # Half-way through the busy phase: PostgreSQL's backends of the user, and the pooler's
    # own count of client connections (pgproxy's admin console; None for PgBouncer).
    pg_backends: int | None = None
    console_clients: int | None = None
    console_clients_after: int | None = None
    # Every problem, by kind → count; and the first message of each.
    errors: dict[str, int] = field(default_factory=dict)
    first_errors: list[str] = field(default_factory=list)

    def error(self, kind: str, count: int, first: str | None = None) -> None:
        if count:
            self.errors[kind] = self.errors.get(kind, 0) + count
            if first:
                self.first_errors.append(f"{kind}: {first}")

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def kib_per_idle_client(self) -> float | None:
        if not self.idle_logged_in or self.rss_idle_kib is None or self.rss_before_kib is None:
            return None
        return (self.rss_idle_kib - self.rss_before_kib) / self.idle_logged_in

    @property
    def qps(self) -> float | None:
        return self.queries / self.active_seconds if self.active_seconds else None


def shares(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def measure(
    target: Target, pg: LocalPostgres, clients: int, active: int, seconds: float
) -> CapacityResult:
    """One pooler: baseline, idle crowd, busy clients, check, goodbye."""
    assert target.pid is not None
    result = CapacityResult(target.name, clients, active, seconds)
    console = Console(target.port, target.metrics_port) if target.metrics_port else None
    children: list[Child] = []
    try:
        idle_clients.first_query(target)
        time.sleep(SETTLE_SECONDS)
        result.rss_before_kib = rss_kib(target.pid)
        started_at = time.monotonic()
        idle = Child(idle_process, target.port, clients - active)
        children.append(idle)
        report = idle.ask(None, CHILD_TIMEOUT + clients / 100)
        if report is None:
            result.error("idle clients' process", 1, "did not report")
            return result
        result.idle_logged_in = report["logged_in"]
        result.login_seconds = report["seconds"]
        result.error("idle login", report["errors"], report["first_error"])
        time.sleep(SETTLE_SECONDS)
        result.rss_idle_kib = rss_kib(target.pid)
        busy = [
            Child(active_process, target.port, share, seconds)
            for share in shares(active, ACTIVE_PROCESSES)
        ]
        children += busy
        for child in busy:
            report = child.ask(None, CHILD_TIMEOUT)
            if report is None:
                result.error("active clients' process", 1, "did not report")
                return result
            result.active_logged_in += report["logged_in"]
            result.error("active login", report["errors"], report["first_error"])
        result.login_seconds = time.monotonic() - started_at
        time.sleep(SETTLE_SECONDS)
        run_busy(result, target, pg, busy, console, seconds)
        result.rss_all_kib = rss_kib(target.pid)
        report = idle.ask("check", CHECK_TIMEOUT + 30)
        if report is None:
            result.error("idle check", 1, "no answer")
        else:
            result.idle_answered = report["answered"]
            result.error("idle client dropped", report["dropped"])
            result.error("idle client unanswered", report["unanswered"])
            result.error("idle client query", report["errors"], report["first_error"])
        for child in children:
            if child.ask("close", 30) != "closed":
                result.error("close", 1, "a client process did not close its clients")
        time.sleep(SETTLE_SECONDS)
        result.rss_after_kib = rss_kib(target.pid)
        if console is not None:
            result.console_clients_after = console.lists().get("used_clients")
    finally:
        for child in children:
            child.stop()
        if console is not None:
            console.close()
    print_result(result)
    return result


def run_busy(
    result: CapacityResult,
    target: Target,
    pg: LocalPostgres,
    busy: Sequence[Child],
    console: Console | None,
    seconds: float,
) -> None:
    """Start the active clients, look at the counts half-way, collect their figures."""
    assert target.pid is not None
    cpu = CpuClock(target.pid)
    with RssSampler(target.pid) as sampler:
        for child in busy:
            child.pipe.send("go")
        time.sleep(seconds / 2)
        result.pg_backends = pg.backends(user=BENCH.user)
        if console is not None:
            result.console_clients = console.lists().get("used_clients")
        for child in busy:
            report = child.ask(None, seconds + CHILD_TIMEOUT)
            if report is None:
                result.error("active clients' process", 1, "no figures")
                continue
            result.latencies += report["latencies"]
            result.active_seconds = max(result.active_seconds, report["seconds"])
            result.error("active query", report["errors"], report["first_error"])
            result.error("active client dropped", report["dropped"])
    result.queries = len(result.latencies)
    result.cpu_seconds = cpu.elapsed()
    result.rss_peak_kib = sampler.peak_kib


def run_capacity(
    targets: Sequence[Target], pg: LocalPostgres, clients: int, active: int, seconds: float
) -> list[CapacityResult]:
    return [
        measure(target, pg, clients, active, seconds)
        for target in targets
        if target.pid is not None
    ]


# -- report ----------------------------------------------------------------------------


def ms(seconds: float | None) -> str:
    return fmt(seconds * 1000 if seconds is not None else None, 1)


def mib(kib: int | None) -> str:
    return fmt(kib / 1024 if kib is not None else None, 1)


def percentile(values: Sequence[float], fraction: float) -> float | None:
    return login_storm.percentile(values, fraction)


def print_result(r: CapacityResult) -> None:
    print(
        f"capacity {r.target:<10} {r.idle_logged_in + r.active_logged_in:,} clients, "
        f"{fmt(r.kib_per_idle_client, 1)} KiB per idle client, {fmt(r.qps)} q/s "
        f"(p99 {ms(percentile(r.latencies, 0.99))} ms), {r.error_count} errors"
        + (f": {'; '.join(r.first_errors[:3])}" if r.first_errors else ""),
        flush=True,
    )


def render(
    results: Sequence[CapacityResult], clients: int, active: int, seconds: float
) -> list[str]:
    rows = []
    for r in results:
        cpu_per_1000 = (
            r.cpu_seconds / r.queries * 1000 if r.cpu_seconds is not None and r.queries else None
        )
        rows.append(
            [
                r.target,
                f"{r.idle_logged_in:,} + {r.active_logged_in:,}",
                f"**{r.error_count}**",
                fmt(r.kib_per_idle_client, 2),
                mib(r.rss_before_kib),
                mib(r.rss_idle_kib),
                mib(r.rss_peak_kib),
                mib(r.rss_after_kib),
                fmt(r.qps),
                ms(percentile(r.latencies, 0.5)),
                ms(percentile(r.latencies, 0.99)),
                ms(max(r.latencies, default=None)),
                fmt(cpu_per_1000, 3),
                fmt(r.cpu_seconds / r.active_seconds * 100 if r.cpu_seconds and r.active_seconds
                    else None),
                fmt(r.pg_backends),
                f"{fmt(r.console_clients)} → {fmt(r.console_clients_after)}"
                if r.console_clients is not None
                else "—",
                f"{r.idle_answered:,}",
            ]
        )  # fmt: skip
    per_client = {r.target: r.kib_per_idle_client for r in results}
    qps = {r.target: r.qps for r in results}
    errors = [f"{r.target}: {e}" for r in results for e in r.first_errors]
    return [
        f"## Capacity: {clients:,} client connections, {active:,} of them busy, on one worker",
        "",
        f"Pool size 20, one worker, transaction pooling. {clients - active:,} idle clients log "
        f"in (SCRAM-SHA-256, {IDLE_CONCURRENCY} logins in flight, one process) and stay "
        f"silent; then {active:,} more log in ({ACTIVE_PROCESSES} processes) and for "
        f"{seconds:g} s each runs `{SQL}` one query after the other, so {active:,} queries "
        "are always queued for the pool's servers; then every idle client runs one query too "
        "(answered = still connected and served), and all leave. Errors = failed logins, "
        "failed or unanswered queries and clients dropped, all kinds together. KiB per idle "
        "client = (RSS with the idle clients - RSS before) / idle clients; RSS peak is over "
        "the busy phase with every client connected. Latency is one query's, queue included. "
        "Clients (PostgreSQL backends, pooler's count) are read half-way through the busy "
        "phase: pg_stat_activity, and pgproxy's `SHOW LISTS` used_clients (the console "
        "included), then again once all clients have left.",
        "",
        *table(
            [
                "pooler",
                "clients idle + busy",
                "errors",
                "KiB per idle client",
                "RSS before MiB",
                "RSS with idle MiB",
                "RSS peak MiB",
                "RSS after MiB",
                "busy q/s",
                "p50 ms",
                "p99 ms",
                "max ms",
                "pooler CPU ms / 1000 q",
                "pooler CPU %",
                "PostgreSQL backends",
                "pooler's clients, then after",
                "idle clients answered",
            ],
            rows,
            "lrrrrrrrrrrrrrrrr",
        ),
        "pgproxy / PgBouncer: memory per idle client "
        f"**{ratio(per_client.get('pgproxy'), per_client.get('pgbouncer'))}**, busy "
        f"throughput **{ratio(qps.get('pgproxy'), qps.get('pgbouncer'))}**.",
        "",
        *(["Errors:", "", "```", *errors, "```", ""] if errors else []),
    ]
