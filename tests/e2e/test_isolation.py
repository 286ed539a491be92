"""Clients sharing two server connections never see one another's session, whatever they do.

Eight workers (psycopg 3 at its default prepare_threshold and at 0, asyncpg with its statement
cache, pg8000 with its own named statements, each twice) run seeded random steps through one
transaction pool of 2 servers: BEGIN/COMMIT/ROLLBACK, SET and SET LOCAL, RESET, statements whose
names collide between clients (`_pg3_0`, `__asyncpg_stmt_1__`, `pg8000_statement_0`) with
different texts, cursors inside transactions and WITH HOLD outside, advisory transaction locks,
errors, savepoints, pinning SETs and abrupt disconnects. After every step each worker checks
what it sees against a model of what a direct connection would show, and an observer on the
same pool checks that it never sees another client's settings, statements, cursors, locks or
open transaction.

A failure names its seed; `PGPROXY_ISOLATION_SEED=<seed> pytest tests/e2e/test_isolation.py`
replays the same steps per worker (the interleaving of the threads still varies).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import random
import socket
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, NoReturn

import asyncpg
import pg8000.native
import psycopg
import pytest

from pgproxy.localpg import LocalPostgres

from .conftest import ProxyThread
from .helpers import APP_PASSWORD, conninfo, kill_socket, wait_for

SEED_ENV = "PGPROXY_ISOLATION_SEED"
STEPS_PER_WORKER = 400
MIN_STEPS = 2000  # the acceptance bar of the drop-in issue, workers and observer together
# psycopg at its default prepare_threshold (5) and at 0, asyncpg, pg8000: each twice.
KINDS = ("psycopg", "psycopg-prepare-all", "asyncpg", "pg8000") * 2
DEADLINE = 40.0  # seconds for every worker to finish its steps
MAX_VIOLATIONS = 20  # enough to see a pattern, short enough to read
ZONES = (
    "Asia/Tokyo",
    "America/New_York",
    "Europe/Paris",
    "Australia/Sydney",
    "America/Sao_Paulo",
    "Africa/Cairo",
    "Asia/Kolkata",
    "Pacific/Auckland",
)
OBSERVER_STARTUP = {"TimeZone": "UTC", "application_name": "observer", "work_mem": "3MB"}
HOLD_CURSOR = "iso_hold"
TRANSACTION_CURSORS = ("iso_a", "iso_b")  # the same names in every worker
OWNER_SETTING = "isotest.owner"  # set LOCAL at BEGIN: whoever sees it sees that transaction
TENANT_SETTING = "isotest.tenant"  # a custom setting some workers SET, as `myapp.tenant` would be

# One round trip shows a client everything the isolation property is about. It runs with one
# parameter, so every driver sends it as a (named, for most of them) prepared statement.
VIEW_COLUMNS = (
    "current_setting('TimeZone'), current_setting('application_name'),"
    " current_setting('work_mem'),"
    f" coalesce(current_setting('{TENANT_SETTING}', true), ''),"
    " pg_current_xact_id_if_assigned()::text,"
    f" current_setting('{OWNER_SETTING}', true),"
    # The unnamed portal running this very query is listed as '' on the extended protocol.
    " (SELECT coalesce(string_agg(name, ',' ORDER BY name), '') FROM pg_cursors"
    "  WHERE name <> ''),"
    # pgproxy prepares every client's statements under its own shared names `pgproxy_<digest>`;
    # any other name on a server is a client's own name leaking.
    " (SELECT coalesce(string_agg(name || ': ' || left(statement, 60), '; ' ORDER BY name), '')"
    "  FROM pg_prepared_statements WHERE left(name, 8) <> 'pgproxy_'),"
    " (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()),"
    " pg_backend_pid()"
)


@dataclass(frozen=True, slots=True)
class View:
    """What one round trip of VIEW_COLUMNS showed a client."""

    mine: int  # the client's own parameter plus its own constant: its statement ran
    timezone: str
    application_name: str
    work_mem: str
    tenant: str  # TENANT_SETTING, '' when never set or reset
    xid: str | None  # the transaction id assigned on this backend, if any
    owner: str  # OWNER_SETTING as set LOCAL by whoever's transaction this is, '' for none
    cursors: str  # names in pg_cursors, comma-separated, sorted
    foreign_statements: str  # prepared statements under a name that is not pgproxy's
    advisory_locks: int
    pid: int = field(default=0, compare=False)  # the backend that answered, for the report

    @classmethod
    def of(cls, row: Any) -> View:
        mine, timezone, application_name, work_mem, tenant, xid, owner, *rest = row
        return cls(mine, timezone, application_name, work_mem, tenant, xid, owner or "", *rest)

    def differences(self, expected: View) -> str:
        return f"backend {self.pid}: " + ", ".join(
            f"{f.name}={getattr(self, f.name)!r} (expected {getattr(expected, f.name)!r})"
            for f in fields(self)
            if f.compare and getattr(self, f.name) != getattr(expected, f.name)
        )


class SqlError(Exception):
    """A server error, whichever driver raised it."""

    def __init__(self, sqlstate: str | None, message: str) -> None:
        super().__init__(f"{sqlstate}: {message}")
        self.sqlstate = sqlstate


class Violation(Exception):  # noqa: N818 -- what the test looks for, not an error of the test
    """A client saw something a direct connection would not have shown it."""


# -- drivers --------------------------------------------------------------------------------


class Client:
    """One driver's connection behind the few calls a step needs."""

    # asyncpg reports only "in a transaction", not whether it failed.
    tells_failed_apart = True

    def run(self, sql: str) -> list[tuple[Any, ...]]:
        raise NotImplementedError

    def view(self, n: int) -> View:
        raise NotImplementedError

    def mine(self, n: int, k: int) -> int:
        """Run the client's statement number k (of 3) with n; it returns n + base + 100 * k."""
        raise NotImplementedError

    def status(self) -> str:
        """Transaction status from the last ReadyForQuery: 'I', 'T' or 'E'."""
        raise NotImplementedError

    def reported(self) -> dict[str, str]:
        """Settings as the driver knows them from ParameterStatus (if it keeps them)."""
        return {}

    def reprepare(self, rng: random.Random) -> None:
        """Close the driver's own named statements and prepare them again, names reshuffled."""

    def kill(self) -> None:
        """Cut the TCP connection without a Terminate message."""
        raise NotImplementedError

    def kill_mid_query(self) -> None:
        self.kill()

    def close(self) -> None:
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class Startup:
    timezone: str
    application_name: str
    work_mem: str  # the value to expect after connecting
    work_mem_option: bool  # sent as `-c work_mem=...`, else the server's default

    def options(self) -> str:
        opts = f"-c TimeZone={self.timezone}"
        return opts + (f" -c work_mem={self.work_mem}" if self.work_mem_option else "")

    def settings(self) -> dict[str, str]:
        return {
            "TimeZone": self.timezone,
            "application_name": self.application_name,
            "work_mem": self.work_mem,
            TENANT_SETTING: "",
        }


class PsycopgClient(Client):
    def __init__(self, port: int, startup: Startup, base: int, prepare_threshold: int) -> None:
        self.conn = psycopg.connect(
            conninfo(
                port, application_name=startup.application_name, options=f"'{startup.options()}'"
            ),
            autocommit=True,
            prepare_threshold=prepare_threshold,
        )
        self.base = base
        self.view_sql = f"SELECT %s::int + {base}, {VIEW_COLUMNS}"

    def _execute(self, sql: str, params: tuple[Any, ...] | None = None) -> list[tuple[Any, ...]]:
        try:
            cur = self.conn.execute(sql, params)  # type: ignore[arg-type]
            return cur.fetchall() if cur.description else []
        except psycopg.Error as exc:
            raise SqlError(exc.sqlstate, str(exc)) from exc

    def run(self, sql: str) -> list[tuple[Any, ...]]:
        return self._execute(sql)

    def view(self, n: int) -> View:
        return View.of(self._execute(self.view_sql, (n,))[0])

    def mine(self, n: int, k: int) -> int:
        return int(self._execute(f"SELECT %s::int + {self.base + 100 * k}", (n,))[0][0])

    def status(self) -> str:
        status = self.conn.info.transaction_status
        return {"IDLE": "I", "INTRANS": "T", "INERROR": "E"}.get(status.name, status.name)

    def reported(self) -> dict[str, str]:
        info = self.conn.info
        return {
            name: value
            for name in ("TimeZone", "application_name")
            if (value := info.parameter_status(name)) is not None
        }

    def kill(self) -> None:
        try:
            kill_socket(self.conn)
        finally:
            # Closed even when the socket was cut already (shutdown() raises ENOTCONN): an
            # open connection left to the garbage collector fails the test at teardown.
            self.conn.close()

    def kill_mid_query(self) -> None:
        # The query is on the wire (and perhaps running) when the socket goes: pgproxy has to
        # cancel it and must not hand that server to anyone before it is idle again.
        pgconn = self.conn.pgconn
        pgconn.send_query(b"SELECT pg_sleep(2)")
        while pgconn.flush():
            pass
        self.kill()

    def close(self) -> None:
        self.conn.close()


class AsyncpgClient(Client):
    """asyncpg on a private event loop, driven from the worker's thread."""

    tells_failed_apart = False

    def __init__(
        self, loop: asyncio.AbstractEventLoop, port: int, startup: Startup, base: int
    ) -> None:
        self.loop = loop
        server_settings = {
            "application_name": startup.application_name,
            "TimeZone": startup.timezone,
        }
        if startup.work_mem_option:
            server_settings["work_mem"] = startup.work_mem
        self.conn = loop.run_until_complete(
            asyncpg.connect(
                host="127.0.0.1",
                port=port,
                user="app",
                password=APP_PASSWORD,
                database="app",
                server_settings=server_settings,
            )
        )
        self.base = base
        self.view_sql = f"SELECT $1::int + {base}, {VIEW_COLUMNS}"

    def _fetch(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        # fetch() prepares every text, even BEGIN or SET: named statements from the cache.
        try:
            rows = self.loop.run_until_complete(self.conn.fetch(sql, *args))
        except asyncpg.PostgresError as exc:
            raise SqlError(exc.sqlstate, str(exc)) from exc
        return [tuple(row) for row in rows]

    def run(self, sql: str) -> list[tuple[Any, ...]]:
        return self._fetch(sql)

    def view(self, n: int) -> View:
        return View.of(self._fetch(self.view_sql, n)[0])

    def mine(self, n: int, k: int) -> int:
        return int(self._fetch(f"SELECT $1::int + {self.base + 100 * k}", n)[0][0])

    def status(self) -> str:
        return "T" if self.conn.is_in_transaction() else "I"

    def kill(self) -> None:
        self.conn.terminate()  # aborts the transport: no Terminate message

    def close(self) -> None:
        self.loop.run_until_complete(self.conn.close(timeout=5))


class Pg8000Client(Client):
    def __init__(self, port: int, startup: Startup, base: int, rng: random.Random) -> None:
        params = {"TimeZone": startup.timezone}
        if startup.work_mem_option:
            params["options"] = f"-c work_mem={startup.work_mem}"
        self.conn = pg8000.native.Connection(
            "app",
            host="127.0.0.1",
            port=port,
            password=APP_PASSWORD,
            database="app",
            application_name=startup.application_name,
            startup_params=params,
        )
        self.base = base
        self.statements: dict[int, Any] = {}
        self._prepare_all(rng)

    def _prepare_all(self, rng: random.Random) -> None:
        # pg8000 names them pg8000_statement_0, _1, ... in preparation order: the same names
        # as every other pg8000 client, for other texts.
        order = [0, 1, 2, 3]
        rng.shuffle(order)
        for k in order:
            self.statements[k] = self.conn.prepare(
                f"SELECT :n::int + {self.base}, {VIEW_COLUMNS}"
                if k == 3
                else f"SELECT :n::int + {self.base + 100 * k}"
            )

    def _call(self, fn: Callable[[], Any]) -> list[tuple[Any, ...]]:
        try:
            rows = fn()
        except pg8000.native.DatabaseError as exc:
            detail = exc.args[0] if exc.args and isinstance(exc.args[0], dict) else {}
            raise SqlError(detail.get("C"), str(exc)) from exc
        return [tuple(row) for row in rows or []]

    def run(self, sql: str) -> list[tuple[Any, ...]]:
        return self._call(lambda: self.conn.run(sql))

    def view(self, n: int) -> View:
        return View.of(self._call(lambda: self.statements[3].run(n=n))[0])

    def mine(self, n: int, k: int) -> int:
        return int(self._call(lambda: self.statements[k].run(n=n))[0][0])

    def status(self) -> str:
        return (self.conn._transaction_status or b"?").decode()  # pg8000 keeps the last Z byte

    def reprepare(self, rng: random.Random) -> None:
        for statement in self.statements.values():
            self._call(statement.close)
        self._prepare_all(rng)

    def kill(self) -> None:
        # pg8000 keeps its socket in _usock and a buffered file over it in _sock.
        sock = self.conn._usock
        sock.shutdown(socket.SHUT_RDWR)
        self.conn._sock.close()
        sock.close()
        self.conn._sock = self.conn._usock = None

    def close(self) -> None:
        self.conn.close()


# -- the run ----------------------------------------------------------------------------------


class Run:
    """What all threads of one run share: the seed, the step count, the violations."""

    def __init__(self, seed: int, port: int, default_work_mem: str) -> None:
        self.seed = seed
        self.port = port
        self.default_work_mem = default_work_mem
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self.steps = 0
        self.violations: list[str] = []

    def stepped(self) -> None:
        with self._lock:
            self.steps += 1

    def violation(self, text: str) -> None:
        with self._lock:
            if len(self.violations) < MAX_VIOLATIONS:
                self.violations.append(text)
            if len(self.violations) >= MAX_VIOLATIONS:
                self.stop.set()


@dataclass(slots=True)
class Transaction:
    xid: str
    saved: dict[str, str]  # session settings at BEGIN: what ROLLBACK returns to
    committed: dict[str, str]  # what COMMIT keeps: SET changes it, SET LOCAL does not
    cursors: dict[str, int] = field(default_factory=dict)  # name -> next g FETCH returns
    locks: int = 0  # advisory transaction locks taken
    failed: bool = False


class Worker:
    """One client doing seeded random steps and checking, after each, what it sees."""

    def __init__(self, cid: int, kind: str, run: Run) -> None:
        self.cid = cid
        self.kind = kind
        self.run = run
        self.name = f"w{cid}/{kind}"
        self.rng = random.Random(f"{run.seed}:{cid}")
        self.base = 1000 * (cid + 1)
        work_mem_option = cid % 2 == 1
        self.startup = Startup(
            timezone=ZONES[cid % len(ZONES)],
            application_name=f"w{cid}",
            work_mem=f"{cid + 1}MB" if work_mem_option else run.default_work_mem,
            work_mem_option=work_mem_option,
        )
        self.history: deque[str] = deque(maxlen=12)
        self.doing = ""  # the step being chosen or done, for a report of what raised
        self.loop: asyncio.AbstractEventLoop | None = None
        self.client: Client | None = None
        self.connections = 0
        self.lock_keys = 0
        self._reset_model()

    def _reset_model(self) -> None:
        self.settings = self.startup.settings()
        self.tx: Transaction | None = None
        self.hold: dict[str, int] = {}
        self.hold_steps_left = 0  # WITH HOLD pins: close it within a few steps
        self.pinned_steps_left = 0  # a SET in a transaction pins until disconnect: leave soon
        # Pinned until it disconnects, the client has its server to itself as on a direct
        # connection: it may see its own statements under its own names there.
        self.session_pinned = False

    # -- connections --

    def connect(self) -> None:
        self.connections += 1
        port = self.run.port
        if self.kind == "psycopg":
            self.client = PsycopgClient(port, self.startup, self.base, prepare_threshold=5)
        elif self.kind == "psycopg-prepare-all":
            self.client = PsycopgClient(port, self.startup, self.base, prepare_threshold=0)
        elif self.kind == "asyncpg":
            assert self.loop is not None
            self.client = AsyncpgClient(self.loop, port, self.startup, self.base)
        else:
            self.client = Pg8000Client(port, self.startup, self.base, self.rng)
        self._reset_model()

    def reconnect(self, *, abrupt: bool) -> None:
        if self.client is not None:
            with contextlib.suppress(Exception):
                self.client.kill() if abrupt else self.client.close()
        self.client = None
        self.connect()

    # -- the loop --

    def first_connect(self) -> None:
        self.connect()

    def main(self) -> None:
        if self.kind == "asyncpg":
            self.loop = asyncio.new_event_loop()
        try:
            self.first_connect()
            for i in range(STEPS_PER_WORKER):
                if self.run.stop.is_set():
                    break
                self._one_step(i)
        except Exception as exc:
            self.run.violation(f"{self.name}: gave up: {exc!r}\n{traceback.format_exc()}")
        finally:
            if self.client is not None:
                with contextlib.suppress(Exception):
                    self.client.close()
            if self.loop is not None:
                self.loop.run_until_complete(self.loop.shutdown_asyncgens())
                self.loop.close()

    def _one_step(self, i: int) -> None:
        self.doing = "?"
        step = ""
        try:
            step = self.step()
            self.history.append(step)
            self.check()
        except Exception as exc:
            what = str(exc) if isinstance(exc, Violation) else f"unexpected {exc!r}"
            before = list(self.history)[:-1] if step else list(self.history)
            self.run.violation(
                f"{self.name} step {i} ({step or self.doing}): {what}; steps before: {before}"
            )
            self.history.append(f"{step or self.doing} (failed)")
            self.reconnect(abrupt=True)  # start again from a known state
        self.run.stepped()

    def step(self) -> str:
        """Do one random step; return its description."""
        if self.pinned_steps_left and self.tx is None:
            self.pinned_steps_left -= 1
            if not self.pinned_steps_left:
                self.doing = "reconnect to end a pin"
                self.reconnect(abrupt=self.rng.random() < 0.5)
                return "reconnect to end a pin"
        if self.hold and self.tx is None:
            self.hold_steps_left -= 1
            if self.hold_steps_left <= 0:
                self.doing = "close_hold"
                return self.close_hold()
        actions, weights = zip(*self._choices(), strict=True)
        action = self.rng.choices(actions, weights)[0]
        self.doing = action.__name__
        return action()

    def _choices(self) -> list[tuple[Callable[[], str], int]]:
        tx = self.tx
        if tx is not None and tx.failed:
            # pg8000 raises on a COMMIT in a failed transaction (it sees the server roll back).
            commit = 0 if self.kind == "pg8000" else 3
            return [(self.rollback, 6), (self.commit, commit), (self.kill, 1)]
        common: list[tuple[Callable[[], str], int]] = [
            (self.mine, 12),
            (self.set_timezone, 5),
            (self.error, 3),
            (self.fetch, 8 if self.hold or (tx is not None and tx.cursors) else 0),
            (self.kill, 1),
            (self.reprepare, 2 if self.kind == "pg8000" else 0),
        ]
        if tx is None:
            return [
                *common,
                (self.begin, 22),
                (self.set_application_name, 5),
                (self.reset, 3),
                (self.declare_hold, 0 if self.hold else 2),
                (self.close_hold, 2 if self.hold else 0),
                (self.set_other, 4),
                (self.kill_mid_query, 1 if self.kind.startswith("psycopg") else 0),
                (self.reconnect_cleanly, 1),
            ]
        return [
            *common,
            (self.set_local_application_name, 5),
            (self.set_other_in_transaction, 0 if self.pinned_steps_left else 1),
            (self.declare, 5 if len(tx.cursors) < len(TRANSACTION_CURSORS) else 0),
            (self.lock, 5),
            (self.savepoint_error, 3),
            (self.commit, 9),
            (self.rollback, 7),
        ]

    # -- steps --

    @property
    def c(self) -> Client:
        assert self.client is not None
        return self.client

    def mine(self) -> str:
        n, k = self.rng.randrange(1000), self.rng.randrange(3)
        got = self.c.mine(n, k)
        if got != n + self.base + 100 * k:
            self._violation(f"own statement {k} returned {got}, not {n + self.base + 100 * k}")
        return f"own statement {k}"

    def begin(self) -> str:
        self.c.run("BEGIN")
        self.c.run(f"SET LOCAL {OWNER_SETTING} = 'w{self.cid}'")
        xid = str(self.c.run("SELECT pg_current_xact_id()::text")[0][0])
        self.tx = Transaction(xid=xid, saved=dict(self.settings), committed=dict(self.settings))
        return "BEGIN"

    def commit(self) -> str:
        tx = self.tx
        assert tx is not None
        self.c.run("COMMIT")
        self.settings = dict(tx.saved if tx.failed else tx.committed)
        self.tx = None
        return "COMMIT (rolls back)" if tx.failed else "COMMIT"

    def rollback(self) -> str:
        assert self.tx is not None
        self.c.run("ROLLBACK")
        self.settings = dict(self.tx.saved)
        self.tx = None
        return "ROLLBACK"

    def set_timezone(self) -> str:
        zone = self.rng.choice(ZONES)
        self.c.run(f"SET TimeZone = '{zone}'")
        self.settings["TimeZone"] = zone
        if self.tx is not None:
            self.tx.committed["TimeZone"] = zone
        return f"SET TimeZone {zone}"

    def set_application_name(self) -> str:
        name = f"w{self.cid}-{self.rng.randrange(40)}"
        self.c.run(f"SET application_name = '{name}'")
        self.settings["application_name"] = name
        return f"SET application_name {name}"

    def set_local_application_name(self) -> str:
        name = f"w{self.cid}-local-{self.rng.randrange(40)}"
        self.c.run(f"SET LOCAL application_name = '{name}'")
        self.settings["application_name"] = name  # visible until the transaction ends
        return f"SET LOCAL application_name {name}"

    def reset(self) -> str:
        what = self.rng.choice(("TimeZone", "application_name", "work_mem", TENANT_SETTING, "ALL"))
        self.c.run(f"RESET {what}")
        startup = self.startup.settings()
        for name in startup if what == "ALL" else (what,):
            self.settings[name] = startup[name]
        return f"RESET {what}"

    def _other_setting(self) -> tuple[str, str]:
        if self.rng.random() < 0.5:
            return "work_mem", f"{64 + self.cid * 8 + self.rng.randrange(8)}kB"
        return TENANT_SETTING, f"tenant-{self.cid}-{self.rng.randrange(20)}"

    def set_other(self) -> str:
        """A plain SET of an unreported setting outside a transaction: follows the client."""
        name, value = self._other_setting()
        self.c.run(f"SET {name} = '{value}'")
        self.settings[name] = value
        return f"SET {name} {value}"

    def set_other_in_transaction(self) -> str:
        """The same inside a transaction block pins the client until it disconnects.

        Past max_pinned_servers the proxy refuses (FATAL 53000) and the client is gone.
        """
        assert self.tx is not None
        name, value = self._other_setting()
        try:
            self.c.run(f"SET {name} = '{value}'")
        except Exception as exc:
            if not _is_pin_refusal(exc):
                raise
            self.reconnect(abrupt=True)
            return f"SET {name} in a transaction: pin refused"
        self.settings[name] = value
        self.tx.committed[name] = value
        self.pinned_steps_left = self.rng.randint(1, 3)
        self.session_pinned = True
        return f"SET {name} {value} in a transaction (pins)"

    def error(self) -> str:
        try:
            self.c.run("SELECT 1/0")
        except SqlError as exc:
            if exc.sqlstate != "22012":
                raise
        else:
            self._violation("SELECT 1/0 did not fail")
        if self.tx is not None:
            self.tx.failed = True
        return "error" if self.tx is None else "error in transaction"

    def savepoint_error(self) -> str:
        self.c.run("SAVEPOINT sp")
        try:
            self.c.run("SELECT 1/0")
        except SqlError as exc:
            if exc.sqlstate != "22012":
                raise
        self.c.run("ROLLBACK TO SAVEPOINT sp")
        return "error rolled back to a savepoint"

    def _cursor_query(self) -> str:
        return f"SELECT g + {self.base} FROM generate_series(1, 5) g"

    def declare(self) -> str:
        assert self.tx is not None
        name = self.rng.choice([n for n in TRANSACTION_CURSORS if n not in self.tx.cursors])
        self.c.run(f"DECLARE {name} CURSOR FOR {self._cursor_query()}")
        self.tx.cursors[name] = 1
        return f"DECLARE {name}"

    def declare_hold(self) -> str:
        self.c.run(f"DECLARE {HOLD_CURSOR} CURSOR WITH HOLD FOR {self._cursor_query()}")
        self.hold[HOLD_CURSOR] = 1
        self.hold_steps_left = self.rng.randint(1, 4)
        return f"DECLARE {HOLD_CURSOR} WITH HOLD (pins while open)"

    def close_hold(self) -> str:
        how = self.rng.choice((f"CLOSE {HOLD_CURSOR}", "CLOSE ALL"))
        self.c.run(how)
        self.hold.clear()
        return how

    def fetch(self) -> str:
        open_cursors = dict(self.hold)
        if self.tx is not None:
            open_cursors.update(self.tx.cursors)
        name = self.rng.choice(sorted(open_cursors))
        rows = self.c.run(f"FETCH 1 FROM {name}")
        g = open_cursors[name]
        expected = [(self.base + g,)] if g <= 5 else []
        if rows != expected:
            self._violation(f"FETCH from {name} gave {rows}, expected {expected}")
        if name in self.hold:
            self.hold[name] = g + 1
        else:
            assert self.tx is not None
            self.tx.cursors[name] = g + 1
        return f"FETCH {name}"

    def lock(self) -> str:
        assert self.tx is not None
        self.lock_keys += 1
        key = self.cid * 1_000_000 + self.lock_keys  # nobody else ever takes this key
        rows = self.c.run(f"SELECT pg_try_advisory_xact_lock({key})")
        if rows != [(True,)]:
            self._violation(f"advisory lock {key}, which only this client uses, was taken")
        self.tx.locks += 1
        return f"advisory xact lock {key}"

    def reprepare(self) -> str:
        self.c.reprepare(self.rng)
        return "close and prepare own statements again"

    def kill(self) -> str:
        where = "outside" if self.tx is None else "inside"
        self.reconnect(abrupt=True)
        return f"abrupt disconnect {where} a transaction"

    def kill_mid_query(self) -> str:
        self.c.kill_mid_query()
        self.client = None
        self.connect()
        return "abrupt disconnect during pg_sleep"

    def reconnect_cleanly(self) -> str:
        self.reconnect(abrupt=False)
        return "close and connect again"

    # -- checks --

    def _violation(self, text: str) -> NoReturn:
        raise Violation(text)

    def check(self) -> None:
        tx = self.tx
        expected_status = "I" if tx is None else "E" if tx.failed else "T"
        status = self.c.status()
        if not self.c.tells_failed_apart and expected_status == "E":
            expected_status = "T"
        if status != expected_status:
            self._violation(f"transaction status {status!r}, expected {expected_status!r}")
        if tx is not None and tx.failed:
            return  # nothing but ROLLBACK runs in a failed transaction
        n = self.rng.randrange(1000)
        cursors = set(self.hold) | (set(tx.cursors) if tx is not None else set())
        expected = View(
            mine=n + self.base,
            timezone=self.settings["TimeZone"],
            application_name=self.settings["application_name"],
            work_mem=self.settings["work_mem"],
            tenant=self.settings[TENANT_SETTING],
            xid=tx.xid if tx is not None else None,
            owner=f"w{self.cid}" if tx is not None else "",
            cursors=",".join(sorted(cursors)),
            foreign_statements="",
            advisory_locks=tx.locks if tx is not None else 0,
        )
        seen = self.c.view(n)
        if self.session_pinned:
            expected = dataclasses.replace(expected, foreign_statements=seen.foreign_statements)
        if seen != expected:
            self._violation(f"saw {seen.differences(expected)}")
        reported = self.c.reported()
        for name, value in reported.items():
            if value != self.settings[name]:
                self._violation(
                    f"driver's ParameterStatus {name}={value!r}, expected {self.settings[name]!r}"
                )


class Observer:
    """A client on the same pool that only ever looks: it must always see a fresh session."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.rng = random.Random(f"{run.seed}:observer")
        self.conn = self._connect()
        self.steps = 0

    def _connect(self) -> psycopg.Connection[Any]:
        options = " ".join(
            f"-c {k}={v}" for k, v in OBSERVER_STARTUP.items() if k != "application_name"
        )
        return psycopg.connect(
            conninfo(
                self.run.port,
                application_name=OBSERVER_STARTUP["application_name"],
                options=f"'{options}'",
            ),
            autocommit=True,
            prepare_threshold=0,  # its view is `_pg3_0`, like the first statement of others
        )

    def main(self, workers_done: threading.Event) -> None:
        try:
            while not workers_done.is_set() and not self.run.stop.is_set():
                self._one_step()
        except Exception as exc:
            self.run.violation(f"observer: gave up: {exc!r}\n{traceback.format_exc()}")
        finally:
            self.conn.close()

    def _one_step(self) -> None:
        in_transaction = self.rng.random() < 0.15
        try:
            if in_transaction:
                self.conn.execute("BEGIN")
            self.look(in_transaction)
            if in_transaction:
                self.conn.execute("COMMIT")
        except Exception as exc:
            self.run.violation(f"observer step {self.steps}: {exc}")
            with contextlib.suppress(psycopg.Error):
                self.conn.execute("ROLLBACK")
            if self.conn.closed or self.conn.broken:
                self.conn = self._connect()
        self.steps += 1
        self.run.stepped()

    def look(self, in_transaction: bool) -> None:
        n = self.rng.randrange(1000)
        row = self.conn.execute(f"SELECT %s::int + 0, {VIEW_COLUMNS}", (n,)).fetchone()
        seen = View.of(row)
        expected = View(
            mine=n,
            timezone=OBSERVER_STARTUP["TimeZone"],
            application_name=OBSERVER_STARTUP["application_name"],
            work_mem=OBSERVER_STARTUP["work_mem"],
            tenant="",
            xid=None,
            owner="",
            cursors="",
            foreign_statements="",
            advisory_locks=0,
        )
        status = self.conn.info.transaction_status.name
        expected_status = "INTRANS" if in_transaction else "IDLE"
        problems = [] if seen == expected else [seen.differences(expected)]
        if status != expected_status:
            problems.append(f"transaction status {status}, expected {expected_status}")
        for name in ("TimeZone", "application_name"):
            value = self.conn.info.parameter_status(name)
            if value != OBSERVER_STARTUP[name]:
                problems.append(f"ParameterStatus {name}={value!r}")
        if problems:
            where = "in its own transaction" if in_transaction else "outside a transaction"
            raise Violation(f"{where}: " + "; ".join(problems))


def _is_pin_refusal(exc: Exception) -> bool:
    """The proxy's FATAL 53000 for a pin past max_pinned_servers, as each driver shows it.

    asyncpg may report it as the connection closing (08003, with the proxy's message); pg8000
    may hit the closed socket while still writing its Sync ("network error").
    """
    if isinstance(exc, SqlError) and exc.sqlstate == "53000":
        return True
    if "too many pinned server connections" in str(exc):
        return True
    return isinstance(exc, pg8000.native.InterfaceError) and "network error" in str(exc)


def _seed() -> int:
    value = os.environ.get(SEED_ENV)
    return int(value) if value else random.SystemRandom().randrange(2**32)


def _app_backends_in_transaction(pg: LocalPostgres) -> list[tuple[Any, ...]]:
    return pg.execute(
        "SELECT pid, state, query FROM pg_stat_activity "
        "WHERE usename = 'app' AND state LIKE 'idle in transaction%'"
    )


def assert_left_clean(proxy: ProxyThread, pg: LocalPostgres, run: Run) -> None:
    """Once every client has gone: nothing is left open, locked or pinned on the servers, and
    two newcomers inside transactions, holding both servers of the pool, see nothing of anyone."""
    wait_for(lambda: proxy.call(lambda: len(proxy.proxy.clients)) == 0, what="no clients left")
    wait_for(lambda: not _app_backends_in_transaction(pg), what="no app backend in transaction")
    wait_for(
        lambda: proxy.call(lambda: all(s.state.pinned is None for s in proxy.proxy.servers)),
        what="no server pinned",
    )
    assert pg.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'") == [(0,)]
    newcomers = [Observer(run), Observer(run)]
    try:
        pids = set()
        for newcomer in newcomers:
            newcomer.conn.execute("BEGIN")
            newcomer.look(in_transaction=True)
            pids.add(newcomer.conn.execute("SELECT pg_backend_pid()").fetchone())
        assert len(pids) == 2, "each newcomer should hold its own server"
    finally:
        for newcomer in newcomers:
            newcomer.conn.close()


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_clients_sharing_two_servers_never_see_each_others_session(
    pg: LocalPostgres, make_proxy, loop: str
) -> None:
    proxy = make_proxy(default_pool_size="2", query_wait_timeout="10", use_uvloop=loop == "uvloop")
    seed = _seed()
    default_work_mem = str(pg.execute("SHOW work_mem")[0][0])
    assert default_work_mem != OBSERVER_STARTUP["work_mem"]
    run = Run(seed, proxy.port, default_work_mem)
    replay = f"{SEED_ENV}={seed}"

    started_at = time.monotonic()
    workers = [Worker(cid, kind, run) for cid, kind in enumerate(KINDS)]
    observer = Observer(run)
    workers_done = threading.Event()
    threads = [threading.Thread(target=w.main, name=w.name, daemon=True) for w in workers]
    looker = threading.Thread(target=observer.main, args=(workers_done,), daemon=True)
    for thread in [*threads, looker]:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, started_at + DEADLINE - time.monotonic()))
    stuck = [t.name for t in threads if t.is_alive()]
    workers_done.set()
    run.stop.set()
    for thread in threads:
        thread.join(10)
    looker.join(10)
    elapsed = time.monotonic() - started_at

    report = "\n".join(run.violations)
    assert not stuck, f"seed {seed} ({replay}): workers still running after {DEADLINE} s: {stuck}"
    assert not run.violations, (
        f"seed {seed} ({replay}): {len(run.violations)} violations:\n{report}"
    )
    assert run.steps >= MIN_STEPS, f"only {run.steps} steps in {elapsed:.1f} s"
    assert observer.steps > 0

    assert_left_clean(proxy, pg, run)


# -- the violations the property test found, one deterministic case each ----------------------


def _connect_with(port: int, timezone: str = "UTC", **kwargs: Any) -> psycopg.Connection[Any]:
    return psycopg.connect(
        conninfo(port, options=f"'-c TimeZone={timezone}'"), autocommit=True, **kwargs
    )


def test_a_vanished_clients_rolled_back_set_does_not_reach_the_next_client(
    pg: LocalPostgres, make_proxy
) -> None:
    proxy = make_proxy(default_pool_size="1")
    gone = _connect_with(proxy.port, "Asia/Kolkata")
    gone.execute("BEGIN")
    gone.execute("SET TimeZone = 'Asia/Tokyo'")
    kill_socket(gone)  # pgproxy rolls back: the server is at Asia/Kolkata again
    gone.close()
    wait_for(lambda: proxy.call(lambda: len(proxy.proxy.clients)) == 0, what="the client to go")
    wait_for(lambda: not _app_backends_in_transaction(pg), what="the rollback")
    with _connect_with(proxy.port, "Asia/Tokyo") as newcomer:
        assert newcomer.execute("SHOW TimeZone").fetchone() == ("Asia/Tokyo",)


def test_statements_prepared_while_a_with_hold_cursor_is_open_stay_their_clients_own(
    pg: LocalPostgres, make_proxy
) -> None:
    proxy = make_proxy(default_pool_size="2")
    a = _connect_with(proxy.port, prepare_threshold=100)
    b = _connect_with(proxy.port, prepare_threshold=100)
    try:
        for conn in (a, b):  # both servers pinned, one each, by an open WITH HOLD cursor
            conn.execute("DECLARE held CURSOR WITH HOLD FOR SELECT 1")
        for conn, who in ((a, "a"), (b, "b")):  # both prepare their `_pg3_0`
            assert conn.execute(f"SELECT '{who}', %s::int", (1,), prepare=True).fetchone() == (
                who,
                1,
            )
        b.execute("CLOSE held")
        a.execute("CLOSE held")  # a's server is now the most recently used idle one
        assert a.execute("SELECT 'a', %s::int", (2,), prepare=True).fetchone() == ("a", 2)
        assert b.execute("SELECT 'b', %s::int", (3,), prepare=True).fetchone() == ("b", 3)
        with _connect_with(proxy.port) as c:
            names = c.execute(
                "SELECT name FROM pg_prepared_statements WHERE left(name, 8) <> 'pgproxy_'"
            ).fetchall()
        assert names == []
    finally:
        a.close()
        b.close()


def test_a_prepared_declare_with_hold_pins_each_time_it_runs(pg: LocalPostgres, make_proxy) -> None:
    proxy = make_proxy(default_pool_size="2")
    with _connect_with(proxy.port, prepare_threshold=0) as a:
        declare = "DECLARE held CURSOR WITH HOLD FOR SELECT g FROM generate_series(1, 3) g"
        a.execute(declare)  # Parse + Bind + Execute: pins
        a.execute("CLOSE held")
        a.execute(declare)  # the same statement again: Bind + Execute only
        with _connect_with(proxy.port) as other:
            assert other.execute("SELECT name FROM pg_cursors WHERE name <> ''").fetchall() == []
        assert a.execute("FETCH 1 FROM held").fetchall() == [(1,)]
        a.execute("CLOSE held")
