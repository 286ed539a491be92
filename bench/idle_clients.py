"""Thousands of logged-in, silent clients: what each costs a pooler in memory.

One asyncio process (uvloop) logs the clients in with `pgclient.IdleClient`, a bounded
number at a time, and keeps them open and silent while the pooler's RSS is read; then it
closes them and reads the RSS once more. The poolers are fresh, started with
max_client_conn above the crowd, and have served one query before the baseline so that
their one-time start-up allocations do not count as per-client memory. Logged-in clients
that never send a query hold no server connection, in either pooler.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

import pgclient
import uvloop
from procfs import CpuClock, rss_kib
from report import fmt, ratio, table
from targets import BENCH, Target

# Logins in flight at once; well below PgBouncer's listen_backlog and the kernel's somaxconn.
CONCURRENCY = 100
LOGIN_TIMEOUT = 60.0
# Let the pooler finish what the last logins started before its RSS is read.
SETTLE_SECONDS = 1.0


@dataclass
class IdleResult:
    target: str
    requested: int
    logged_in: int = 0
    login_seconds: float = 0.0
    cpu_seconds: float | None = None
    rss_before_kib: int | None = None
    rss_idle_kib: int | None = None
    rss_closed_kib: int | None = None
    error: str | None = None

    @property
    def kib_per_client(self) -> float | None:
        if not self.logged_in or self.rss_idle_kib is None or self.rss_before_kib is None:
            return None
        return (self.rss_idle_kib - self.rss_before_kib) / self.logged_in


def first_query(target: Target) -> None:
    """One login and one query: the pooler's lazy start-up work happens before the baseline."""
    sock = pgclient.connect(target.port, BENCH)
    try:
        pgclient.read_result(sock, "SELECT 1", "SELECT 1")
    finally:
        pgclient.close(sock)


async def hold_idle(target: Target, result: IdleResult) -> None:
    """Log the crowd in, read the pooler's RSS while they sit idle, close them, read again."""
    assert target.pid is not None
    cpu = CpuClock(target.pid)
    started = time.monotonic()
    clients, errors = await pgclient.open_idle_clients(
        target.port, BENCH, result.requested, concurrency=CONCURRENCY, login_timeout=LOGIN_TIMEOUT
    )
    result.login_seconds = time.monotonic() - started
    result.cpu_seconds = cpu.elapsed()
    result.logged_in = len(clients)
    if errors:
        result.error = f"{len(errors)} logins failed, the first: {errors[0]!r}"
    await asyncio.sleep(SETTLE_SECONDS)
    result.rss_idle_kib = rss_kib(target.pid)
    for client in clients:
        client.close()
    await asyncio.sleep(SETTLE_SECONDS)
    result.rss_closed_kib = rss_kib(target.pid)


def measure_idle(target: Target, count: int) -> IdleResult:
    assert target.pid is not None
    result = IdleResult(target.name, count)
    try:
        first_query(target)
    except (OSError, pgclient.LoginError) as exc:
        result.error = f"first query failed: {exc}"
        return result
    time.sleep(SETTLE_SECONDS)
    result.rss_before_kib = rss_kib(target.pid)
    uvloop.run(hold_idle(target, result))
    per_client = result.kib_per_client
    print(
        f"idle {target.name:<17} {result.logged_in:>6,} clients in {result.login_seconds:.1f} s"
        + (f", {per_client:.1f} KiB per idle client" if per_client is not None else "")
        + (f"  ERROR: {result.error}" if result.error else ""),
        flush=True,
    )
    return result


def run_idle(targets: Sequence[Target], count: int) -> list[IdleResult]:
    return [measure_idle(target, count) for target in targets if target.pid is not None]


def render(results: Sequence[IdleResult], count: int) -> list[str]:
    def mib(kib: int | None) -> str:
        return fmt(kib / 1024 if kib is not None else None, 1)

    rows = [
        [
            r.target,
            f"{r.logged_in:,}",
            fmt(r.kib_per_client, 1),
            mib(r.rss_before_kib),
            mib(r.rss_idle_kib),
            mib(r.rss_closed_kib),
            fmt(r.logged_in / r.login_seconds if r.login_seconds else None),
            fmt(r.cpu_seconds / r.logged_in * 1000 if r.cpu_seconds and r.logged_in else None, 3),
            r.error or "",
        ]
        for r in results
    ]
    per_client = {r.target: r.kib_per_client for r in results}
    return [
        f"## {count:,} idle clients",
        "",
        f"{count:,} clients log in (SCRAM-SHA-256, {CONCURRENCY} logins in flight) and then "
        "stay connected and silent. KiB per idle client = (RSS with the clients - RSS "
        "before) / clients logged in; the pooler had served one query before the baseline. "
        "Login CPU is the pooler's CPU over all the logins, divided by their number.",
        "",
        *table(
            [
                "pooler",
                "logged in",
                "KiB per idle client",
                "RSS before MiB",
                "RSS with clients MiB",
                "RSS after they left MiB",
                "logins / s",
                "pooler CPU ms / login",
                "error",
            ],
            rows,
            "lrrrrrrrl",
        ),
        "pgproxy / PgBouncer memory per idle client: "
        f"**{ratio(per_client.get('pgproxy'), per_client.get('pgbouncer'))}**.",
        "",
    ]
