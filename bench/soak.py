"""Soak: minutes of mixed load through one pgproxy, a PostgreSQL restart and a burst of new
clients in the middle; afterwards the books are checked.

The soak owns its cluster (it restarts PostgreSQL) and its pgproxy: a subprocess with
/metrics and an admin user, so that the checks read the admin console and /metrics as an
operator would. For `seconds` (600 by default; tests/soak/ runs a CI-sized plan of about
30 s) these clients run at once, after a short warm-up that the memory figures leave out:

* pgbench, four workloads (select-only extended and prepared, TPC-B-like simple and
  extended), each in back-to-back segments of `segment_seconds`: a segment whose clients the
  restart aborted ends and the next one starts, so pgbench keeps going through it;
* writers of our own (asyncpg: BEGIN/INSERT/COMMIT, a lone INSERT, a multi-statement simple
  Query; psycopg: INSERT then commit()), each transaction inserting ids nobody else uses into
  `soak_ledger` and remembering what it was told: success, a definite failure (an error
  before the COMMIT, or the server's own error for it) or an unknown outcome (the connection
  died with the COMMIT in flight, which is allowed to go either way);
* a client that leaves in the middle of its transaction after an INSERT (socket cut,
  Terminate, or cut while a query runs), whose rows must never appear; a client that
  connects, queries and leaves; a client whose queries are cancelled (pg_sleep + cancel).

At `restart_at` of the way PostgreSQL is restarted (`pg_ctl restart -m fast`); at
`burst_at` `burst_clients` new connections arrive at once from another process
(`login_storm.storm_process`), each logs in, runs one query and leaves. Then the load stops
and these checks run (`SoakResult.checks`):

1. every write that reported success is in the table; no write that definitely failed, no
   abandoned write and nothing nobody wrote is;
2. pgbench_history holds at least the TPC-B transactions pgbench counted, and at most one
   more per pgbench client that an error aborted (its COMMIT may have been in flight);
3. every client of the burst was served; no client saw an error outside the restart window
   (from the restart until RESTART_GRACE seconds after PostgreSQL is back);
4. once the load has stopped, the admin console and /metrics count only the console's own
   session, every server is idle, there are at most pool-size servers and PostgreSQL sees
   exactly as many backends of the user, none idle in a transaction;
5. the proxy's RSS, read every second, grew by at most 10 % from the first minute to the
   last (medians; the first and last 10 % of runs shorter than 5 minutes).
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import re
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import login_storm
import psycopg
import psycopg.errors
import uvloop
from pgbench_rounds import pgbench_args, pgbench_env
from procfs import CpuClock, rss_kib
from prometheus_client.parser import text_string_to_metric_families
from report import fmt, table
from targets import (
    BENCH,
    HOST,
    REPO,
    PoolerConfig,
    Target,
    allocator_env,
    allocator_text,
    spawn,
    started,
    stop_process,
    tail,
)

from pgproxy.localpg import Credentials, LocalPostgres, LocalPostgresError, free_port

# The operator's login for the admin console (the virtual database `pgproxy`). It is also a
# PostgreSQL role with pg_read_all_stats: pgproxy's monitor logs in as the first user with a
# plaintext password, so its pg_stat_activity probes run during the soak too.
ADMIN = Credentials(user="pgproxy_admin", password="admin-secret", database="pgproxy")
TABLE = "soak_ledger"
INSERT = f"INSERT INTO {TABLE} (id, writer) VALUES ($1, $2)"
INSERT_PSYCOPG = f"INSERT INTO {TABLE} (id, writer) VALUES (%s, %s)"
# (name, pgbench flags): the select-only and TPC-B-like scripts over three query protocols.
PGBENCH_WORKLOADS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("select-extended", ("-S", "-M", "extended")),
    ("select-prepared", ("-S", "-M", "prepared")),
    ("tpcb-simple", ("-M", "simple")),
    ("tpcb-extended", ("-M", "extended")),
)
ASYNCPG_WRITERS = ("asyncpg-tx", "asyncpg-implicit", "asyncpg-multi")
PSYCOPG_WRITERS = ("psycopg-tx",)
# Writer n writes ids n * ID_BLOCK + 0, 1, 2, …: unique without asking anyone.
ID_BLOCK = 10**9
# Errors up to this long after PostgreSQL is back still count as the restart's: each
# client's first statement may meet a server that died with the old postmaster.
RESTART_GRACE = 5.0
RSS_INTERVAL = 1.0
# The bound on RSS growth from the first minute to the last.
RSS_TOLERANCE = 0.10
# Runs shorter than this compare their first and last 10 % instead of whole minutes.
RSS_MINUTE_RUNS = 300.0
# A statement that has not answered after this long is a failure (a hang, not a slow query).
QUERY_TIMEOUT = 60.0
CONNECT_TIMEOUT = 10.0
# After an error a client waits this long before it reconnects, so the restart is no spin.
RETRY_PAUSE = 0.2
# pgbench beyond its -T: connecting its clients and saying goodbye.
PGBENCH_GRACE = 120.0
# How long the counts may take to come back to rest once the load has stopped.
SETTLE_TIMEOUT = 30.0
# The burst: all clients start within one tick of the storm's arrival loop, and the answered
# ones stay until every one is answered (all inside pgproxy at once, whatever the machine).
BURST_SPREAD = 0.001
# The pauses of the cheaper clients between rounds, and when the cancel is sent.
CHURN_PAUSE = 0.02
ABANDON_PAUSE = 0.05
CANCEL_AFTER = 0.1
CANCEL_SLEEP = "SELECT pg_sleep(1)"
# Errors our clients may raise; anything else is a bug in this file and ends the client.
CLIENT_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    # asyncpg's own state machine tripping over a message it did not expect.
    asyncpg.InternalClientError,
    psycopg.Error,
)
SUCCEEDED, FAILED, UNKNOWN = "succeeded", "failed", "unknown"


@dataclass(frozen=True, slots=True)
class SoakPlan:
    """How long, how many, and when the restart and the burst happen."""

    seconds: float = 600.0
    pool_size: int = 20
    burst_clients: int = 5000
    pgbench_clients: int = 6  # per pgbench workload
    writers: int = 3  # per writer kind
    scale: int = 10
    segment_seconds: float = 30.0
    warm_up_seconds: float = 5.0
    restart_at: float = 0.4  # of the way through `seconds`
    burst_at: float = 0.6
    allocator: str = "pymalloc"  # or "jemalloc", as the container image runs pgproxy

    @classmethod
    def ci(cls) -> SoakPlan:
        """The CI-sized soak of tests/soak/: about 30 s, the same checks."""
        return cls(
            seconds=30.0,
            burst_clients=500,
            pgbench_clients=2,
            writers=1,
            scale=1,
            segment_seconds=10.0,
            warm_up_seconds=3.0,
        )

    @property
    def max_client_conn(self) -> int:
        # The burst, everyone else, the console and a margin.
        return self.burst_clients + 4 * self.pgbench_clients + 8 * self.writers + 200


# -- what the clients saw --------------------------------------------------------------


def describe(exc: BaseException) -> str:
    """One line: the exception's type, its SQLSTATE if any, the first line of its message."""
    sqlstate = getattr(exc, "sqlstate", None)
    lines = str(exc).strip().splitlines()
    text = f": {lines[0][:160]}" if lines else ""
    return f"{type(exc).__name__}{f' {sqlstate}' if sqlstate else ''}{text}"


def connection_broke(exc: BaseException) -> bool:
    """True when `exc` says the connection is gone rather than that the server refused:
    no SQLSTATE at all (the socket, a timeout), class 08 or an administrator's shutdown."""
    sqlstate = getattr(exc, "sqlstate", None)
    return sqlstate is None or sqlstate.startswith("08") or sqlstate in {"57P01", "57P02", "57P03"}


@dataclass
class Ledger:
    """One client's books: ids by outcome, rounds that went well, the errors it saw."""

    kind: str
    succeeded: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    unknown: list[int] = field(default_factory=list)
    # Rows written in transactions that were deliberately never committed.
    abandoned: list[int] = field(default_factory=list)
    # Transactions (writers), connections (churn) or cancels (canceller) that went well.
    ok: int = 0
    # Outcomes that are neither success nor error, e.g. a cancel that came too late.
    other: Counter[str] = field(default_factory=Counter)
    # (monotonic time, description)
    errors: list[tuple[float, str]] = field(default_factory=list)
    # The client stopped on an exception this file did not expect.
    crashed: str | None = None

    def record(self, ids: Sequence[int], outcome: str, exc: BaseException | None = None) -> None:
        if outcome == SUCCEEDED:
            self.succeeded.extend(ids)
            self.ok += 1
        elif outcome == FAILED:
            self.failed.extend(ids)
        else:
            self.unknown.extend(ids)
        if exc is not None:
            self.error(exc)

    def error(self, exc: BaseException) -> None:
        self.errors.append((time.monotonic(), describe(exc)))


class Ids:
    """Hands each writer its own block of ids."""

    def __init__(self) -> None:
        self._next_block = 1
        self._lock = threading.Lock()

    def block(self) -> Iterator[int]:
        with self._lock:
            start = self._next_block * ID_BLOCK
            self._next_block += 1
        return iter(range(start, start + ID_BLOCK))


# -- asyncpg clients (one uvloop thread) -----------------------------------------------


async def asyncpg_connect(port: int) -> asyncpg.Connection:
    return await asyncpg.connect(
        host=HOST,
        port=port,
        user=BENCH.user,
        password=BENCH.password,
        database=BENCH.database,
        ssl=False,
        timeout=CONNECT_TIMEOUT,
    )


def asyncpg_steps(
    conn: asyncpg.Connection, kind: str, ids: Sequence[int]
) -> list[Callable[[], Awaitable[object]]]:
    """The statements of one transaction; the last one is the one that commits."""
    t = QUERY_TIMEOUT
    if kind == "asyncpg-tx":
        # BEGIN and COMMIT without arguments go as simple Queries, the INSERT as a named
        # prepared statement (asyncpg's statement cache).
        return [
            lambda: conn.execute("BEGIN", timeout=t),
            lambda: conn.execute(INSERT, ids[0], kind, timeout=t),
            lambda: conn.execute("COMMIT", timeout=t),
        ]
    if kind == "asyncpg-implicit":
        return [lambda: conn.execute(INSERT, ids[0], kind, timeout=t)]
    # asyncpg-multi: one simple Query holding the whole transaction, two rows.
    values = f"({ids[0]}, '{kind}'), ({ids[1]}, '{kind}')"
    sql = f"BEGIN; INSERT INTO {TABLE} (id, writer) VALUES {values}; COMMIT"
    return [lambda: conn.execute(sql, timeout=t)]


async def run_asyncpg_transaction(
    conn: asyncpg.Connection, kind: str, ids: Sequence[int], ledger: Ledger
) -> str:
    steps = asyncpg_steps(conn, kind, ids)
    for number, step in enumerate(steps):
        try:
            await step()
        except CLIENT_ERRORS as exc:
            committing = number == len(steps) - 1
            outcome = UNKNOWN if committing and connection_broke(exc) else FAILED
            ledger.record(ids, outcome, exc)
            return outcome
    ledger.record(ids, SUCCEEDED)
    return SUCCEEDED


async def asyncpg_writer(
    kind: str, ids: Iterator[int], port: int, stop: threading.Event, ledger: Ledger
) -> None:
    rows = 2 if kind == "asyncpg-multi" else 1
    conn: asyncpg.Connection | None = None
    try:
        while not stop.is_set():
            if conn is None:
                try:
                    conn = await asyncpg_connect(port)
                except CLIENT_ERRORS as exc:
                    ledger.error(exc)
                    await asyncio.sleep(RETRY_PAUSE)
                    continue
            batch = [next(ids) for _ in range(rows)]
            if await run_asyncpg_transaction(conn, kind, batch, ledger) != SUCCEEDED:
                # Whatever state the connection is in, start afresh.
                conn.terminate()
                conn = None
                await asyncio.sleep(RETRY_PAUSE)
    finally:
        if conn is not None:
            await close_asyncpg(conn)


async def close_asyncpg(conn: asyncpg.Connection) -> None:
    try:
        await conn.close(timeout=5)
    except CLIENT_ERRORS:
        conn.terminate()


async def abandoner(ids: Iterator[int], port: int, stop: threading.Event, ledger: Ledger) -> None:
    """Opens a transaction, inserts a row and leaves without COMMIT: by cutting the socket,
    by a polite Terminate, or by cutting it while a query runs. None of these rows may ever
    be committed."""
    rounds = 0
    while not stop.is_set():
        rounds += 1
        try:
            conn = await asyncpg_connect(port)
        except CLIENT_ERRORS as exc:
            ledger.error(exc)
            await asyncio.sleep(RETRY_PAUSE)
            continue
        row = next(ids)
        ledger.abandoned.append(row)
        try:
            await conn.execute("BEGIN", timeout=QUERY_TIMEOUT)
            await conn.execute(INSERT, row, "abandoned", timeout=QUERY_TIMEOUT)
            ledger.ok += 1
            if rounds % 3 == 2:
                running = asyncio.ensure_future(conn.execute("SELECT pg_sleep(0.5)"))
                await asyncio.sleep(0.02)
                conn.terminate()
                # It fails with the connection; that is the point.
                await asyncio.gather(running, return_exceptions=True)
        except CLIENT_ERRORS as exc:
            ledger.error(exc)
        finally:
            if rounds % 3 == 1 and not conn.is_closed():
                await close_asyncpg(conn)  # Terminate in the middle of the transaction
            else:
                conn.terminate()  # the socket closes without a word
        await asyncio.sleep(ABANDON_PAUSE)


async def churner(port: int, stop: threading.Event, ledger: Ledger) -> None:
    """Connects, runs one query and leaves, over and over."""
    while not stop.is_set():
        try:
            conn = await asyncpg_connect(port)
        except CLIENT_ERRORS as exc:
            ledger.error(exc)
            await asyncio.sleep(RETRY_PAUSE)
            continue
        try:
            await conn.fetchval("SELECT 1", timeout=QUERY_TIMEOUT)
            ledger.ok += 1
        except CLIENT_ERRORS as exc:
            ledger.error(exc)
        finally:
            await close_asyncpg(conn)
        await asyncio.sleep(CHURN_PAUSE)


async def guarded(ledger: Ledger, work: Awaitable[None]) -> None:
    """Run a client; an exception this file did not expect is recorded, not lost."""
    try:
        await work
    except Exception as exc:  # noqa: BLE001 - recorded and reported as a crash of the client
        ledger.crashed = describe(exc)


# -- psycopg clients (a thread each) ---------------------------------------------------


def psycopg_connect(port: int, *, autocommit: bool) -> psycopg.Connection[Any]:
    return psycopg.connect(
        host=HOST,
        port=port,
        user=BENCH.user,
        password=BENCH.password,
        dbname=BENCH.database,
        sslmode="disable",
        connect_timeout=int(CONNECT_TIMEOUT),
        autocommit=autocommit,
    )


def psycopg_writer(ids: Iterator[int], port: int, stop: threading.Event, ledger: Ledger) -> None:
    """INSERT (psycopg opens the transaction; after five runs it prepares the statement),
    then commit()."""
    conn: psycopg.Connection[Any] | None = None
    try:
        while not stop.is_set():
            if conn is None:
                try:
                    conn = psycopg_connect(port, autocommit=False)
                except psycopg.Error as exc:
                    ledger.error(exc)
                    time.sleep(RETRY_PAUSE)
                    continue
            row = next(ids)
            outcome = psycopg_transaction(conn, row, ledger)
            if outcome != SUCCEEDED:
                conn.close()
                conn = None
                time.sleep(RETRY_PAUSE)
    finally:
        if conn is not None:
            conn.close()


def psycopg_transaction(conn: psycopg.Connection[Any], row: int, ledger: Ledger) -> str:
    try:
        conn.execute(INSERT_PSYCOPG, (row, ledger.kind))
    except psycopg.Error as exc:
        ledger.record([row], FAILED, exc)
        return FAILED
    try:
        conn.commit()
    except psycopg.Error as exc:
        outcome = UNKNOWN if connection_broke(exc) else FAILED
        ledger.record([row], outcome, exc)
        return outcome
    ledger.record([row], SUCCEEDED)
    return SUCCEEDED


def canceller(port: int, stop: threading.Event, ledger: Ledger) -> None:
    """Runs pg_sleep(1), cancels it after CANCEL_AFTER seconds, then checks the connection
    still answers: a cancel must reach the right server and leave nothing behind."""
    conn: psycopg.Connection[Any] | None = None
    try:
        while not stop.is_set():
            if conn is None:
                try:
                    conn = psycopg_connect(port, autocommit=True)
                except psycopg.Error as exc:
                    ledger.error(exc)
                    time.sleep(RETRY_PAUSE)
                    continue
            timer = threading.Timer(CANCEL_AFTER, cancel_quietly, args=(conn,))
            timer.start()
            try:
                conn.execute(CANCEL_SLEEP)
                ledger.other["cancel came too late"] += 1
            except psycopg.errors.QueryCanceled:
                ledger.ok += 1
            except psycopg.Error as exc:
                ledger.error(exc)
            finally:
                timer.cancel()
                timer.join()
            try:
                conn.execute("SELECT 1")
            except psycopg.Error as exc:
                ledger.error(exc)
                conn.close()
                conn = None
                time.sleep(RETRY_PAUSE)
    finally:
        if conn is not None:
            conn.close()


def cancel_quietly(conn: psycopg.Connection[Any]) -> None:
    # A connection the restart closed has nothing to cancel.
    with contextlib.suppress(psycopg.Error):
        conn.cancel_safe(timeout=CONNECT_TIMEOUT)


# -- pgbench in segments ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Segment:
    workload: str
    started_at: float
    ended_at: float
    returncode: int
    processed: int
    # pgbench clients that an error aborted (each may have had a COMMIT in flight).
    aborted_clients: int
    first_error: str | None


def parse_segment(workload: str, started_at: float, returncode: int, output: str) -> Segment:
    processed = re.search(r"number of transactions actually processed: (\d+)", output)
    aborted = len(re.findall(r"client \d+ (?:script \d+ )?aborted", output))
    errors = [line for line in output.splitlines() if "error:" in line or "FATAL" in line]
    return Segment(
        workload,
        started_at,
        time.monotonic(),
        returncode,
        int(processed.group(1)) if processed else 0,
        aborted,
        errors[0][:200] if errors and returncode != 0 else None,
    )


class PgbenchLoop(threading.Thread):
    """Back-to-back pgbench segments of one workload until `deadline`."""

    def __init__(
        self,
        pgbench: str,
        workload: tuple[str, tuple[str, ...]],
        port: int,
        clients: int,
        segment_seconds: float,
        deadline: float,
    ) -> None:
        super().__init__(daemon=True, name=f"pgbench {workload[0]}")
        self.pgbench = pgbench
        self.name_, self.flags = workload
        self.port = port
        self.clients = clients
        self.segment_seconds = segment_seconds
        self.deadline = deadline
        self.segments: list[Segment] = []

    def run(self) -> None:
        while (remaining := self.deadline - time.monotonic()) >= 1:
            seconds = int(min(self.segment_seconds, remaining))
            command = [
                self.pgbench, *self.flags, "-n", "-c", str(self.clients), "-j", "1",
                "-T", str(seconds), *pgbench_args(self.port), BENCH.database,
            ]  # fmt: skip
            started_at = time.monotonic()
            try:
                done = subprocess.run(
                    command,
                    env=pgbench_env(),
                    stdin=subprocess.DEVNULL,
                    capture_output=True,
                    text=True,
                    timeout=seconds + PGBENCH_GRACE,
                    check=False,
                )
                returncode, output = done.returncode, done.stdout + done.stderr
            except subprocess.TimeoutExpired as exc:
                returncode, output = -1, f"error: pgbench hung: {exc}"
            segment = parse_segment(self.name_, started_at, returncode, output)
            self.segments.append(segment)
            if returncode != 0:
                time.sleep(RETRY_PAUSE)


# -- the operator's view: admin console and /metrics -----------------------------------


class Console:
    """An admin-console session (psycopg sends a plain Query for each SHOW) and /metrics."""

    def __init__(self, port: int, metrics_port: int | None) -> None:
        self.metrics_port = metrics_port
        self.conn = psycopg.connect(
            host=HOST,
            port=port,
            user=ADMIN.user,
            password=ADMIN.password,
            dbname=ADMIN.database,
            sslmode="disable",
            autocommit=True,
            prepare_threshold=None,
            connect_timeout=int(CONNECT_TIMEOUT),
        )

    def show(self, item: str) -> list[dict[str, Any]]:
        cur = self.conn.execute(f"SHOW {item}")
        names = [d.name for d in cur.description or ()]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    def lists(self) -> dict[str, int]:
        return {row["list"]: row["items"] for row in self.show("LISTS")}

    def metrics(self) -> dict[str, float]:
        return scrape(self.metrics_port) if self.metrics_port else {}

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Console:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def scrape(metrics_port: int) -> dict[str, float]:
    """/metrics as {name: value}; families with labels are summed over them."""
    url = f"http://{HOST}:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return values


class Watch(threading.Thread):
    """Every RSS_INTERVAL: the proxy's VmRSS and, from /metrics, its client connections."""

    def __init__(self, pid: int, metrics_port: int | None) -> None:
        super().__init__(daemon=True, name="watch")
        self.pid = pid
        self.metrics_port = metrics_port
        # (monotonic time, RSS KiB, client connections or None)
        self.samples: list[tuple[float, int, float | None]] = []
        self.scrape_errors = 0
        self._stopped = threading.Event()

    def run(self) -> None:
        while True:
            self.sample()
            if self._stopped.wait(RSS_INTERVAL):
                return

    def sample(self) -> None:
        rss = rss_kib(self.pid)
        clients: float | None = None
        if self.metrics_port:
            try:
                clients = scrape(self.metrics_port).get("pgproxy_client_connections")
            except (OSError, ValueError):
                self.scrape_errors += 1
        if rss is not None:
            self.samples.append((time.monotonic(), rss, clients))

    def stop(self) -> None:
        self._stopped.set()
        self.join()


# -- the run ---------------------------------------------------------------------------


@dataclass
class Check:
    name: str
    passed: bool
    detail: str


@dataclass
class Rest:
    """What the proxy and PostgreSQL hold once the load has stopped."""

    lists: dict[str, int] = field(default_factory=dict)
    pool: dict[str, Any] = field(default_factory=dict)
    server_states: Counter[str] = field(default_factory=Counter)
    metrics_clients: float | None = None
    metrics_logging_in: float | None = None
    pg_backends: int = -1
    pg_idle_in_transaction: int = -1
    waited_seconds: float = 0.0

    def problems(self, pool_size: int) -> list[str]:
        servers = sum(self.server_states.values())
        problems = []
        if self.lists.get("used_clients") != 1:
            problems.append(f"used_clients {self.lists.get('used_clients')} (want 1: the console)")
        problems += [
            f"{name} {self.lists.get(name)}"
            for name in ("login_clients", "waiting_clients", "login_servers")
            if self.lists.get(name) != 0
        ]
        if self.metrics_clients != 1:
            problems.append(f"pgproxy_client_connections {self.metrics_clients} (want 1)")
        if self.metrics_logging_in != 0:
            problems.append(f"pgproxy_clients_logging_in {self.metrics_logging_in}")
        if set(self.server_states) - {"idle"}:
            problems.append(f"servers not idle: {dict(self.server_states)}")
        if servers > pool_size:
            problems.append(f"{servers} servers > pool size {pool_size}")
        if self.pg_backends != servers:
            problems.append(f"PostgreSQL has {self.pg_backends} backends, the proxy {servers}")
        if self.pg_idle_in_transaction:
            problems.append(f"{self.pg_idle_in_transaction} backends idle in transaction")
        return problems


@dataclass
class SoakResult:
    plan: SoakPlan
    started_at: float = 0.0  # monotonic: the end of the warm-up, when measuring starts
    ended_at: float = 0.0
    restart_started_at: float | None = None
    restart_seconds: float | None = None
    restart_error: str | None = None
    burst_at: float | None = None
    burst: dict[str, Any] = field(default_factory=dict)
    segments: list[Segment] = field(default_factory=list)
    ledgers: list[Ledger] = field(default_factory=list)
    hung_clients: list[str] = field(default_factory=list)
    # The books: rows in the table, and how the clients' records compare with them.
    rows: int = 0
    missing: int = 0
    phantom: int = 0
    abandoned_found: int = 0
    stray: int = 0
    unknown_committed: int = 0
    history_rows: int = 0
    rss: list[tuple[float, int, float | None]] = field(default_factory=list)
    rss_settled_kib: int | None = None
    cpu_seconds: float | None = None
    rest: Rest = field(default_factory=Rest)
    log_tracebacks: int = 0
    log_errors: list[str] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)

    # -- derived figures ---------------------------------------------------------------

    def in_restart_window(self, at: float) -> bool:
        if self.restart_started_at is None:
            return False
        back_at = self.restart_started_at + (self.restart_seconds or 0.0)
        return self.restart_started_at <= at <= back_at + RESTART_GRACE

    def errors_outside(self, ledger: Ledger) -> list[str]:
        return [text for at, text in ledger.errors if not self.in_restart_window(at)]

    def segments_aborted_outside(self) -> list[Segment]:
        """Segments that failed with no overlap with the restart window."""
        return [
            s
            for s in self.segments
            if s.returncode != 0
            and not (
                self.restart_started_at is not None
                and s.started_at
                <= self.restart_started_at + (self.restart_seconds or 0.0) + RESTART_GRACE
                and s.ended_at >= self.restart_started_at
            )
        ]

    def rss_window_seconds(self) -> float:
        seconds = self.plan.seconds
        return 60.0 if seconds >= RSS_MINUTE_RUNS else seconds * 0.1

    def rss_first_last(self) -> tuple[float | None, float | None]:
        window = self.rss_window_seconds()
        first = [kib for at, kib, _ in self.rss if at - self.started_at <= window]
        last = [kib for at, kib, _ in self.rss if self.ended_at - at <= window]
        return (
            statistics.median(first) if first else None,
            statistics.median(last) if last else None,
        )

    def rss_growth(self) -> float | None:
        first, last = self.rss_first_last()
        return (last - first) / first if first and last is not None else None

    def tpcb_processed(self) -> tuple[int, int]:
        """(TPC-B transactions pgbench counted, TPC-B clients aborted)."""
        tpcb = [s for s in self.segments if s.workload.startswith("tpcb")]
        return sum(s.processed for s in tpcb), sum(s.aborted_clients for s in tpcb)

    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]


def database_setup(pg: LocalPostgres, pgbench: str, scale: int) -> str:
    """Users, pgbench's tables, the ledger; returns the bench user's SCRAM secret."""
    pg.create_user(BENCH.user, BENCH.password)
    pg.create_database(BENCH.database, owner=BENCH.user)
    ensure_admin_role(pg)
    subprocess.run(
        [pgbench, "-i", "-q", "-s", str(scale), *pgbench_args(pg.port), BENCH.database],
        env=pgbench_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        check=True,
    )
    pg.execute(
        f"CREATE TABLE {TABLE} (id bigint PRIMARY KEY, writer text NOT NULL,"
        f" written_at timestamptz NOT NULL DEFAULT now());"
        f"ALTER TABLE {TABLE} OWNER TO {BENCH.user}",
        database=BENCH.database,
    )
    rows = pg.execute("SELECT rolpassword FROM pg_authid WHERE rolname = $1", BENCH.user)
    secret: str = rows[0][0]
    return secret


def ensure_admin_role(pg: LocalPostgres) -> None:
    """The console's user as a PostgreSQL role too, for pgproxy's monitor (see ADMIN)."""
    if not pg.execute("SELECT 1 FROM pg_roles WHERE rolname = $1", ADMIN.user):
        pg.create_user(ADMIN.user, ADMIN.password)
        pg.execute(f"GRANT pg_read_all_stats TO {ADMIN.user}")


def start_pgproxy_with_console(
    workdir: Path, pg: LocalPostgres, config: PoolerConfig, *, name: str = "pgproxy"
) -> Target:
    """pgproxy as bench/targets.py starts it (one worker, transaction pooling, /metrics and
    the monitor on), plus an admin user for the console."""
    port = free_port(HOST)
    metrics_port = free_port(HOST)
    command = [
        sys.executable, "-m", "pgproxy",
        "--listen", f"{HOST}:{port}",
        "--server", f"{pg.host}:{pg.port}",
        "--user", f"{BENCH.user}:{config.scram_secret}",
        "--user", f"{ADMIN.user}:{ADMIN.password}",
        "--admin-users", ADMIN.user,
        "--default-pool-size", str(config.pool_size),
        "--pool-mode", "transaction",
        "--max-client-conn", str(config.max_client_conn),
        "--metrics-listen", f"{HOST}:{metrics_port}",
        "--workers", "1",
    ]  # fmt: skip
    log = workdir / f"{name}.log"
    process = spawn(command, log, cwd=REPO, env=allocator_env(config.allocator))
    return started(Target(name, port, process, metrics_port=metrics_port), log)


class Burst:
    """login_storm's storm process: started (and logged in once) early, fired on `fire()`."""

    def __init__(self, port: int, clients: int) -> None:
        context = multiprocessing.get_context("spawn")
        self.pipe, child_end = context.Pipe()
        self.clients = clients
        self.process = context.Process(
            target=login_storm.storm_process,
            args=(child_end, port, clients, BURST_SPREAD, True),
            daemon=True,
        )
        self.process.start()
        self.error: str | None = None
        if not self.pipe.poll(login_storm.CHILD_START_TIMEOUT):
            self.error = "the burst's process did not start"
        elif (ready := self.pipe.recv()) != "ready":
            self.error = str(ready)

    def fire(self) -> dict[str, Any]:
        if self.error is not None:
            return {"error": self.error}
        self.pipe.send("go")
        if not self.pipe.poll(login_storm.CLIENT_TIMEOUT + self.clients / 100):
            return {"error": "the burst did not finish"}
        outcome: dict[str, Any] = self.pipe.recv()
        return outcome

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.pipe.send("stop")  # a process still waiting for 'go' leaves
        self.process.join(10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.pipe.close()


class Load:
    """Every client of the soak but the burst; `stop()` ends them and waits."""

    def __init__(self, plan: SoakPlan, pgbench: str, port: int, deadline: float) -> None:
        self.plan = plan
        self.port = port
        self.stopping = threading.Event()
        self.ids = Ids()
        self.pgbench = [
            PgbenchLoop(pgbench, w, port, plan.pgbench_clients, plan.segment_seconds, deadline)
            for w in PGBENCH_WORKLOADS
        ]
        self.ledgers: list[Ledger] = []
        self.threads: list[threading.Thread] = []
        for _ in range(plan.writers):
            for kind in PSYCOPG_WRITERS:
                ledger = self._ledger(kind)
                self.threads.append(
                    self._thread(
                        kind, psycopg_writer, self.ids.block(), port, self.stopping, ledger
                    )
                )
        ledger = self._ledger("psycopg-cancel")
        self.threads.append(self._thread("cancel", canceller, port, self.stopping, ledger))
        self.asyncio_thread = threading.Thread(target=self._asyncio_main, name="asyncpg")

    def _ledger(self, kind: str) -> Ledger:
        self.ledgers.append(Ledger(kind))
        return self.ledgers[-1]

    def _thread(self, name: str, target: Callable[..., None], *args: object) -> threading.Thread:
        ledger = args[-1]
        assert isinstance(ledger, Ledger)

        def run() -> None:
            try:
                target(*args)
            except Exception as exc:  # noqa: BLE001 - recorded and reported as a crash
                ledger.crashed = describe(exc)

        return threading.Thread(target=run, name=name, daemon=True)

    def _asyncio_main(self) -> None:
        uvloop.run(self._asyncio_clients())

    async def _asyncio_clients(self) -> None:
        work = []
        for _ in range(self.plan.writers):
            for kind in ASYNCPG_WRITERS:
                ledger = self._ledger(kind)
                writer = asyncpg_writer(kind, self.ids.block(), self.port, self.stopping, ledger)
                work.append(guarded(ledger, writer))
        ledger = self._ledger("asyncpg-abandon")
        work.append(guarded(ledger, abandoner(self.ids.block(), self.port, self.stopping, ledger)))
        ledger = self._ledger("asyncpg-churn")
        work.append(guarded(ledger, churner(self.port, self.stopping, ledger)))
        await asyncio.gather(*work)

    def start(self) -> None:
        for thread in [*self.pgbench, *self.threads, self.asyncio_thread]:
            thread.start()

    def stop(self) -> list[str]:
        """Stop every client; returns the names of those that did not finish (hung)."""
        self.stopping.set()
        hung = []
        deadline = time.monotonic() + QUERY_TIMEOUT + PGBENCH_GRACE
        for thread in [*self.threads, self.asyncio_thread, *self.pgbench]:
            thread.join(max(0.1, deadline - time.monotonic()))
            if thread.is_alive():
                hung.append(thread.name)
        return hung


def sleep_until(at: float) -> None:
    time.sleep(max(0.0, at - time.monotonic()))


def run_soak(plan: SoakPlan, pgbench: str, workdir: Path) -> SoakResult:
    """A cluster of its own, pgproxy in front of it, the load, the checks."""
    workdir.mkdir(parents=True, exist_ok=True)
    # The pool, pgproxy's monitor, our superuser checks and pgbench -i.
    pg = LocalPostgres(max_connections=plan.pool_size + 30, settings={"shared_buffers": "128MB"})
    with pg:
        print(f"soak: PostgreSQL on port {pg.port}; pgbench -i -s {plan.scale} …", flush=True)
        secret = database_setup(pg, pgbench, plan.scale)
        config = PoolerConfig(plan.pool_size, plan.max_client_conn, secret, plan.allocator)
        target = start_pgproxy_with_console(workdir, pg, config)
        if target.skipped:
            raise RuntimeError(target.skipped)
        try:
            return Soak(plan, pg, target, pgbench, workdir / "pgproxy.log").run()
        finally:
            stop_process(target.process)


class Soak:
    def __init__(
        self, plan: SoakPlan, pg: LocalPostgres, target: Target, pgbench: str, log: Path
    ) -> None:
        self.plan = plan
        self.pg = pg
        self.target = target
        self.pgbench = pgbench
        self.log = log
        self.result = SoakResult(plan)

    def run(self) -> SoakResult:
        plan, result, target = self.plan, self.result, self.target
        assert target.pid is not None
        burst = Burst(target.port, plan.burst_clients)
        try:
            result.started_at = time.monotonic() + plan.warm_up_seconds
            result.ended_at = result.started_at + plan.seconds
            load = Load(plan, self.pgbench, target.port, result.ended_at)
            load.start()
            print(
                f"soak: {plan.seconds:g} s of load after {plan.warm_up_seconds:g} s of warm-up; "
                f"restart at {plan.restart_at * plan.seconds:.0f} s, burst of "
                f"{plan.burst_clients:,} at {plan.burst_at * plan.seconds:.0f} s",
                flush=True,
            )
            sleep_until(result.started_at)
            watch = Watch(target.pid, target.metrics_port)
            watch.start()
            cpu = CpuClock(target.pid)
            try:
                sleep_until(result.started_at + plan.restart_at * plan.seconds)
                self.restart()
                sleep_until(result.started_at + plan.burst_at * plan.seconds)
                result.burst_at = time.monotonic()
                result.burst = burst.fire()
                self.print_burst()
                sleep_until(result.ended_at)
            finally:
                result.hung_clients = load.stop()
                watch.stop()
                result.cpu_seconds = cpu.elapsed()
            result.rss = watch.samples
            result.segments = [s for loop in load.pgbench for s in loop.segments]
            result.ledgers = load.ledgers
        finally:
            burst.stop()
        print("soak: load stopped; checking the books", flush=True)
        self.settle()
        self.read_back()
        self.read_log()
        self.judge()
        return result

    def restart(self) -> None:
        result = self.result
        result.restart_started_at = time.monotonic()
        try:
            self.pg.restart()
        except LocalPostgresError as exc:
            result.restart_error = str(exc).splitlines()[0]
        result.restart_seconds = time.monotonic() - result.restart_started_at
        print(
            f"soak: PostgreSQL restarted in {result.restart_seconds:.1f} s"
            + (f" ERROR: {result.restart_error}" if result.restart_error else ""),
            flush=True,
        )

    def print_burst(self) -> None:
        burst = self.result.burst
        served = len(burst.get("latencies", []))
        p99 = login_storm.percentile(burst.get("latencies", []), 0.99)
        problem = burst.get("first_error") or burst.get("error")
        print(
            f"soak: burst {served:,}/{self.plan.burst_clients:,} served"
            + (f", p99 {p99:.2f} s" if p99 is not None else "")
            + (f" ERROR: {problem}" if problem else ""),
            flush=True,
        )

    def settle(self) -> None:
        """Poll the console, /metrics and pg_stat_activity until the load's traces are gone
        or SETTLE_TIMEOUT passes; keeps the last reading."""
        result = self.result
        started_at = time.monotonic()
        with Console(self.target.port, self.target.metrics_port) as console:
            while True:
                rest = self.read_rest(console)
                rest.waited_seconds = time.monotonic() - started_at
                result.rest = rest
                if not rest.problems(self.plan.pool_size):
                    break
                if rest.waited_seconds > SETTLE_TIMEOUT:
                    break
                time.sleep(0.5)
        result.rss_settled_kib = rss_kib(self.target.pid) if self.target.pid else None

    def read_rest(self, console: Console) -> Rest:
        rest = Rest(lists=console.lists())
        pools = [p for p in console.show("POOLS") if p["database"] == BENCH.database]
        rest.pool = pools[0] if pools else {}
        rest.server_states = Counter(
            s["state"] for s in console.show("SERVERS") if s["user"] == BENCH.user
        )
        metrics = console.metrics()
        rest.metrics_clients = metrics.get("pgproxy_client_connections")
        rest.metrics_logging_in = metrics.get("pgproxy_clients_logging_in")
        counts = self.pg.execute(
            "SELECT count(*), count(*) FILTER (WHERE state LIKE 'idle in transaction%')"
            " FROM pg_stat_activity WHERE backend_type = 'client backend' AND usename = $1",
            BENCH.user,
        )
        rest.pg_backends, rest.pg_idle_in_transaction = counts[0]
        return rest

    def read_back(self) -> None:
        result = self.result
        found = {row[0] for row in self.pg.execute(f"SELECT id FROM {TABLE}", database="bench")}
        succeeded = {i for ledger in result.ledgers for i in ledger.succeeded}
        failed = {i for ledger in result.ledgers for i in ledger.failed}
        unknown = {i for ledger in result.ledgers for i in ledger.unknown}
        abandoned = {i for ledger in result.ledgers for i in ledger.abandoned}
        result.rows = len(found)
        result.missing = len(succeeded - found)
        result.phantom = len(failed & found)
        result.abandoned_found = len(abandoned & found)
        result.stray = len(found - succeeded - unknown - failed - abandoned)
        result.unknown_committed = len(unknown & found)
        (result.history_rows,) = self.pg.execute(
            "SELECT count(*) FROM pgbench_history", database=BENCH.database
        )[0]

    def read_log(self) -> None:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        self.result.log_tracebacks = text.count("Traceback")
        self.result.log_errors = [line for line in text.splitlines() if " ERROR " in line][:5]
        if not text:
            self.result.log_errors = [tail(self.log) or "(no log)"]

    def judge(self) -> None:
        result, plan = self.result, self.plan
        succeeded = sum(len(ledger.succeeded) for ledger in result.ledgers)
        unknown = sum(len(ledger.unknown) for ledger in result.ledgers)
        failed = sum(len(ledger.failed) for ledger in result.ledgers)
        abandoned = sum(len(ledger.abandoned) for ledger in result.ledgers)
        processed, aborted = result.tpcb_processed()
        errors_outside = [e for ledger in result.ledgers for e in result.errors_outside(ledger)]
        crashed = [
            f"{ledger.kind}: {ledger.crashed}" for ledger in result.ledgers if ledger.crashed
        ]
        segments_outside = result.segments_aborted_outside()
        burst = result.burst
        served = len(burst.get("latencies", []))
        growth = result.rss_growth()
        rest_problems = result.rest.problems(plan.pool_size)
        result.checks = [
            Check(
                "every write reported committed is in the table",
                result.missing == 0 and succeeded > 0,
                f"{succeeded:,} rows reported committed, {result.missing:,} missing",
            ),
            Check(
                "no failed, abandoned or unknown-to-anyone row is in the table",
                result.phantom == 0 and result.abandoned_found == 0 and result.stray == 0,
                f"{result.phantom} of {failed:,} failed, {result.abandoned_found} of "
                f"{abandoned:,} abandoned, {result.stray} stray; of {unknown:,} rows with an "
                f"unknown outcome {result.unknown_committed:,} were committed",
            ),
            Check(
                "pgbench_history matches pgbench's count",
                processed <= result.history_rows <= processed + aborted,
                f"{result.history_rows:,} rows; pgbench counted {processed:,} TPC-B "
                f"transactions, {aborted} clients aborted",
            ),
            Check(
                f"burst: all {plan.burst_clients:,} clients served",
                served == plan.burst_clients and not burst.get("errors"),
                f"{served:,} served, {burst.get('errors', '?')} errors"
                + (
                    f": {burst.get('first_error') or burst.get('error')}"
                    if burst.get("errors") or burst.get("error")
                    else ""
                ),
            ),
            Check(
                "no client error outside the restart window",
                not errors_outside and not segments_outside and not crashed,
                "; ".join(
                    [*Counter(errors_outside).keys()][:3]
                    + [f"pgbench {s.workload}: {s.first_error}" for s in segments_outside][:3]
                    + crashed
                )
                or "none",
            ),
            Check(
                "no client hung",
                not result.hung_clients,
                ", ".join(result.hung_clients) or "none",
            ),
            Check(
                "PostgreSQL restarted",
                result.restart_error is None and result.restart_seconds is not None,
                result.restart_error or f"in {fmt(result.restart_seconds, 1)} s",
            ),
            Check(
                "clients and servers back to rest (console, /metrics, pg_stat_activity)",
                not rest_problems,
                "; ".join(rest_problems)
                or f"after {result.rest.waited_seconds:.1f} s: 1 client (the console), "
                f"{sum(result.rest.server_states.values())} idle servers = PostgreSQL's "
                f"{result.rest.pg_backends} backends",
            ),
            Check(
                f"RSS grew at most {RSS_TOLERANCE:.0%} from the first to the last "
                f"{duration_words(result.rss_window_seconds())}",
                growth is not None and growth <= RSS_TOLERANCE,
                f"{fmt_growth(growth)}",
            ),
            Check(
                "no traceback in pgproxy's log",
                result.log_tracebacks == 0,
                f"{result.log_tracebacks} tracebacks",
            ),
        ]


def fmt_growth(growth: float | None) -> str:
    return "—" if growth is None else f"{growth:+.1%}"


def duration_words(seconds: float) -> str:
    return "minute" if seconds == 60.0 else f"{seconds:g} s"


# -- report ----------------------------------------------------------------------------


def mib(kib: float | None) -> str:
    return fmt(kib / 1024 if kib is not None else None, 1)


def render(result: SoakResult) -> list[str]:
    plan = result.plan
    lines = [
        f"## Soak: {plan.seconds / 60:g} min of mixed load, a PostgreSQL restart and a burst "
        f"of {plan.burst_clients:,} clients",
        "",
        f"One pgproxy (one worker, transaction pooling, pool size {plan.pool_size}, /metrics "
        f"and the monitor on) in front of a cluster of its own, for {plan.seconds:g} s after "
        f"{plan.warm_up_seconds:g} s of warm-up: pgbench "
        f"({', '.join(name for name, _ in PGBENCH_WORKLOADS)}; {plan.pgbench_clients} clients "
        f"each, in segments of {plan.segment_seconds:g} s), {plan.writers} writer(s) of each "
        f"kind ({', '.join((*ASYNCPG_WRITERS, *PSYCOPG_WRITERS))}) inserting ids of their own "
        "into a ledger table, a client that abandons its transactions (socket cut, Terminate, "
        "cut during a query), a client that connects, queries and leaves, and one whose "
        f"queries are cancelled. PostgreSQL restarted (`pg_ctl restart -m fast`) at "
        f"{plan.restart_at * plan.seconds:.0f} s; {plan.burst_clients:,} new clients at once "
        "(SCRAM login, `SELECT 1`, then connected until all are answered, so that all are "
        f"inside pgproxy at once; goodbye) at {plan.burst_at * plan.seconds:.0f} s. "
        f"Errors count as the restart's from its start to {RESTART_GRACE:g} s after "
        f"PostgreSQL is back. {allocator_text(plan.allocator)}.",
        "",
        *table(
            ["check", "result", "detail"],
            [[c.name, "pass" if c.passed else "**FAIL**", c.detail] for c in result.checks],
            "lll",
        ),
        *render_clients(result),
        *render_memory(result),
        *render_rest(result),
    ]
    if result.log_errors:
        lines += ["pgproxy's log, first ERROR lines:", "", "```", *result.log_errors, "```", ""]
    return lines


def render_clients(result: SoakResult) -> list[str]:
    rows = []
    by_workload: dict[str, list[Segment]] = {}
    for segment in result.segments:
        by_workload.setdefault(segment.workload, []).append(segment)
    outside_segments = result.segments_aborted_outside()
    for workload, segments in by_workload.items():
        failed = [s for s in segments if s.returncode != 0]
        outside = [s for s in failed if s in outside_segments]
        seconds = sum(s.ended_at - s.started_at for s in segments)
        processed = sum(s.processed for s in segments)
        rows.append(
            [
                f"pgbench {workload}",
                f"{processed:,} tx ({fmt(processed / seconds if seconds else None)} tps), "
                f"{len(segments)} segments",
                "—",
                f"{len(failed) - len(outside)} segments",
                f"{len(outside)} segments",
                next((s.first_error or "" for s in failed), ""),
            ]
        )
    by_kind: dict[str, list[Ledger]] = {}
    for ledger in result.ledgers:
        by_kind.setdefault(ledger.kind, []).append(ledger)
    for kind, ledgers in by_kind.items():
        errors = [e for ledger in ledgers for e in ledger.errors]
        errors_outside = [e for ledger in ledgers for e in result.errors_outside(ledger)]
        other = sum((ledger.other for ledger in ledgers), Counter[str]())
        ok = sum(ledger.ok for ledger in ledgers)
        rows_failed = sum(len(ledger.failed) for ledger in ledgers)
        unknown = sum(len(ledger.unknown) for ledger in ledgers)
        what = {
            "asyncpg-abandon": "transactions abandoned",
            "asyncpg-churn": "connections",
            "psycopg-cancel": "queries cancelled",
        }.get(kind, "tx committed")
        rows.append(
            [
                f"{len(ledgers)} x {kind}",
                f"{ok:,} {what}"
                + "".join(f", {n:,} {name}" for name, n in other.items())
                + (
                    f"; {rows_failed:,} rows failed, {unknown:,} unknown"
                    if rows_failed or unknown
                    else ""
                ),
                f"{unknown:,}" if what == "tx committed" else "—",
                f"{len(errors) - len(errors_outside):,}",
                f"{len(errors_outside):,}",
                Counter(text for _, text in errors).most_common(1)[0][0] if errors else "",
            ]
        )
    burst = result.burst
    latencies = burst.get("latencies", [])
    p50 = login_storm.percentile(latencies, 0.5)
    p99 = login_storm.percentile(latencies, 0.99)
    took = burst["finished_at"] - burst["started_at"] if "finished_at" in burst else None
    rows.append(
        [
            f"burst of {result.plan.burst_clients:,}",
            f"{len(latencies):,} served in {fmt(took, 1)} s (connect+login+query p50 "
            f"{fmt(p50, 2)} s, p99 {fmt(p99, 2)} s)",
            "—",
            "—",
            f"{burst.get('errors', '—')}",
            str(burst.get("first_error") or burst.get("error") or ""),
        ]
    )
    during: Counter[str] = Counter()
    kinds: dict[str, set[str]] = {}
    for ledger in result.ledgers:
        for at, text in ledger.errors:
            if result.in_restart_window(at):
                during[text] += 1
                kinds.setdefault(text, set()).add(ledger.kind)
    return [
        "What the clients did and saw. Unknown outcome = the connection died with the COMMIT "
        "in flight (allowed; the table shows which way each went). Errors during the "
        "restart are expected; errors outside it are failures.",
        "",
        *table(
            [
                "clients",
                "done",
                "unknown outcome",
                "errors during restart",
                "errors outside",
                "most common error",
            ],
            rows,
            "lrrrrl",
        ),
        "Every error our clients saw during the restart, by kind (pgbench's are in its "
        "segments above):",
        "",
        *table(
            ["error", "times", "clients"],
            [
                [f"`{text}`", str(n), ", ".join(sorted(kinds[text]))]
                for text, n in during.most_common()
            ],
            "lrl",
        ),
    ]


def render_memory(result: SoakResult) -> list[str]:
    first, last = result.rss_first_last()
    samples = result.rss
    peak = max(samples, key=lambda s: s[1]) if samples else None
    peak_clients = max((s[2] for s in samples if s[2] is not None), default=None)
    window = duration_words(result.rss_window_seconds())
    cpu = result.cpu_seconds
    return [
        f"pgproxy's memory, VmRSS read every {RSS_INTERVAL:g} s ({len(samples)} readings), and "
        "its CPU over the soak:",
        "",
        *table(
            [
                f"RSS first {window} MiB",
                f"RSS last {window} MiB",
                "growth",
                "peak MiB (at s)",
                "most clients (/metrics)",
                "RSS at rest after the load MiB",
                "pgproxy CPU s (share of one core)",
            ],
            [
                [
                    mib(first),
                    mib(last),
                    fmt_growth(result.rss_growth()),
                    f"{mib(peak[1])} ({peak[0] - result.started_at:.0f})" if peak else "—",
                    fmt(peak_clients),
                    mib(result.rss_settled_kib),
                    f"{fmt(cpu, 0)} ({fmt(cpu / result.plan.seconds * 100 if cpu else None)} %)",
                ]
            ],
            "rrrrrrr",
        ),
        "RSS over the run, one reading per 10 % of it (MiB): "
        + ", ".join(mib(kib) for kib in rss_profile(result))
        + ".",
        "",
    ]


def rss_profile(result: SoakResult, points: int = 11) -> list[int]:
    """The RSS reading nearest to each tenth of the run."""
    if not result.rss:
        return []
    marks = [result.started_at + result.plan.seconds * i / (points - 1) for i in range(points)]

    def nearest(mark: float) -> int:
        return min(result.rss, key=lambda sample: abs(sample[0] - mark))[1]

    return [nearest(m) for m in marks]


def render_rest(result: SoakResult) -> list[str]:
    rest = result.rest
    lists = rest.lists
    return [
        f"At rest, {rest.waited_seconds:.1f} s after the load stopped (the console's own "
        "session is the one client):",
        "",
        *table(
            [
                "used_clients",
                "login / waiting clients",
                "servers (SHOW SERVERS)",
                "pgproxy_client_connections",
                "PostgreSQL backends (idle in tx)",
                "pool size",
            ],
            [
                [
                    fmt(lists.get("used_clients")),
                    f"{fmt(lists.get('login_clients'))} / {fmt(lists.get('waiting_clients'))}",
                    ", ".join(f"{n} {state}" for state, n in rest.server_states.items()) or "0",
                    fmt(rest.metrics_clients),
                    f"{rest.pg_backends} ({rest.pg_idle_in_transaction})",
                    str(result.plan.pool_size),
                ]
            ],
            "rrrrrr",
        ),
    ]


def print_summary(result: SoakResult) -> None:
    for check in result.checks:
        print(f"soak: {'pass' if check.passed else 'FAIL'}  {check.name}: {check.detail}")
