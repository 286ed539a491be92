"""The drop-in issue's isolation property test, run while servers are cut, killed and stalled.

The workers and the observer of tests/e2e/test_isolation.py (psycopg at two prepare
thresholds, asyncpg, pg8000; seeded random steps checked against a model of a direct
connection) share a transaction pool of 2 servers through the fault relay, while a fault
thread breaks things every few hundred milliseconds: a server connection reset or closed by
the relay, a backend ended with pg_terminate_backend, a server stalled for a moment, latency
switched on and off (and, with PGPROXY_FULL_TESTS=1, Postgres restarted).

A client whose connection a fault ends may only see that as an error of the connection
(08006, 57P01, a closed socket, ...), after which it connects again and its model starts
afresh. Anything else it sees that a direct connection would not show it is a violation, as
in the e2e test: no client may ever see another client's rows, settings, statements,
cursors, locks or open transaction, faults or not.

`PGPROXY_ISOLATION_SEED=<seed>` replays the same steps per worker and the same faults.
"""

from __future__ import annotations

import contextlib
import errno
import random
import socket
import threading
import time
import traceback
from collections import Counter, deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import pg8000.native
import psycopg

from pgproxy.localpg import LocalPostgres
from tests.e2e.conftest import ProxyThread
from tests.e2e.test_isolation import (
    KINDS,
    SEED_ENV,
    Observer,
    Pg8000Client,
    PsycopgClient,
    Run,
    SqlError,
    Violation,
    Worker,
    _seed,
    assert_left_clean,
)

from .helpers import FULL, note_pg8000_messages, scale
from .relay import Relay

STEPS_PER_WORKER = scale(250, 600)
MIN_STEPS = scale(1500, 3500)
DEADLINE = scale(40, 120)  # seconds for every worker to finish its steps
# Errors that mean "your connection is gone" (or the pool could not serve you in time): the
# faults' legitimate effect on a client.
FAULT_SQLSTATES = {"08000", "08003", "08006", "57P01", "57P02", "57P03", "57014"}
RECONNECT_DEADLINE = 15.0
# Messages a pg8000 client remembers having received, for a violation's report.
RECEIVED_KEPT = 16


def fault_error(exc: BaseException, *, closed: bool = False) -> str | None:
    """What kind of connection loss `exc` is, or None when it is something else.

    `closed`: the client's connection is closed now (known for psycopg only)."""
    if isinstance(exc, Violation):
        if closed and "transaction status 'UNKNOWN'" in str(exc):
            # The statement's answer came, then the connection ended before its ReadyForQuery
            # (a fault right after an error, say): psycopg knows no status of a closed one.
            return "closed-after-answer"
        return None
    if isinstance(exc, SqlError):
        if exc.sqlstate in FAULT_SQLSTATES:
            return exc.sqlstate
        if exc.sqlstate is None and "closed the connection" in str(exc):
            return "closed"
        if exc.sqlstate is None and "the connection is closed" in str(exc):
            # psycopg's words for a statement on a connection that it closed itself: the
            # previous statement's answer (an error the step expects, say) came in one read
            # with the FATAL of a fault and the end of the connection.
            return "closed-after-answer"
        if exc.sqlstate is None and closed and "results from command" in str(exc):
            # Postgres ended the session (the terminate fault's FATAL 57P01) after a command's
            # CommandComplete and before its ReadyForQuery, in one write: psycopg counts two
            # results and says only that, as it would directly. Only with the connection
            # closed: two results on a live connection would be an answer that is not its own.
            return "fatal-after-result"
        if exc.sqlstate is None and "lost synchronization with server" in str(exc):
            # A cut inside a message, with pgproxy's error written after the half message:
            # the bug of test_a_server_cut_mid_message_never_hands_the_client_a_corrupted_row
            # (rare here: every answer of these steps is one small read).
            return "misframed"
        return None
    if isinstance(exc, asyncpg.InternalClientError) and "another operation" in str(exc):
        # asyncpg's answer to a FATAL that arrives while it is idle (a backend ended right
        # after a ReadyForQuery), when its next query comes before the close does.
        return "asyncpg-state"
    if isinstance(exc, asyncpg.PostgresError):
        return exc.sqlstate if exc.sqlstate in FAULT_SQLSTATES else None
    if isinstance(exc, asyncpg.InterfaceError) and "closed" in str(exc):
        return "closed"
    if isinstance(exc, pg8000.native.InterfaceError) and "network error" in str(exc):
        return "closed"
    if isinstance(exc, pg8000.native.DatabaseError):
        detail = exc.args[0] if exc.args and isinstance(exc.args[0], dict) else {}
        return detail.get("C") if detail.get("C") in FAULT_SQLSTATES else None
    if isinstance(exc, psycopg.OperationalError):
        return exc.sqlstate or "closed"
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return "closed"
    if isinstance(exc, OSError) and exc.errno == errno.ENOTCONN:
        # The step's own abrupt disconnect found the socket already cut by a fault.
        return "closed"
    return None


class FaultRun(Run):
    def __init__(self, seed: int, port: int, default_work_mem: str) -> None:
        super().__init__(seed, port, default_work_mem)
        self.losses: Counter[str] = Counter()  # connections lost to faults, by kind

    def lost(self, kind: str) -> None:
        with self._lock:
            self.losses[kind] += 1


class SafePg8000Client(Pg8000Client):
    """Pg8000Client whose socket is closed whatever state a fault left it in.

    pg8000 reads and writes through a buffered file over its socket: when its close() fails
    on a dead connection, or the socket is already reset (shutdown() raises), the socket is
    left open until garbage collection. And a fault can end the connection between the login
    and the prepares of the constructor."""

    def __init__(self, *args: Any) -> None:
        self.received: deque[str] = deque(maxlen=RECEIVED_KEPT)
        self.noting = False
        try:
            super().__init__(*args)
        except BaseException as exc:
            exc.add_note(f"pg8000 received last: {list(self.received)}")
            if getattr(self, "conn", None) is not None:
                self.kill()
            raise

    def _prepare_all(self, rng: random.Random) -> None:
        # From here on every message pg8000 handles is noted, for the report of a violation
        # (once: `reprepare` comes here again on the same connection).
        if not self.noting:
            self.noting = True
            note_pg8000_messages(self.conn, self._note)
        super()._prepare_all(rng)

    def _note(self, code: bytes, body: bytes) -> None:
        self.received.append(code.decode() + (repr(body[:40]) if code == b"D" else ""))

    def kill(self) -> None:
        usock, sock = self.conn._usock, self.conn._sock
        self.conn._sock = self.conn._usock = None
        if usock is not None:
            with contextlib.suppress(OSError):
                usock.shutdown(socket.SHUT_RDWR)
        for closer in (sock, usock):
            if closer is not None:
                with contextlib.suppress(Exception):
                    closer.close()

    def close(self) -> None:
        try:
            self.conn.close()
        except Exception:
            self.kill()
            raise


class FaultWorker(Worker):
    """A worker for whom a lost connection is an event, not a violation."""

    run: FaultRun

    def connect(self) -> None:
        if self.kind != "pg8000":
            super().connect()
            return
        self.connections += 1
        self.client = SafePg8000Client(self.run.port, self.startup, self.base, self.rng)
        self._reset_model()

    def first_connect(self) -> None:
        self._reconnect_after_fault(None)

    def _one_step(self, i: int) -> None:
        self.doing = "?"
        step = ""
        try:
            step = self.step()
            self.history.append(step)
            self.check()
        except Exception as exc:
            client = self.client
            closed = isinstance(client, PsycopgClient) and client.conn.closed
            kind = fault_error(exc, closed=closed)
            if kind is None:
                what = str(exc) if isinstance(exc, Violation) else f"unexpected {exc!r}"
                if not isinstance(exc, Violation):
                    where = traceback.extract_tb(exc.__traceback__)[-1]
                    what += f" at {Path(where.filename).name}:{where.lineno}"
                if isinstance(client, SafePg8000Client):
                    what += f"; pg8000 received last: {list(client.received)}"
                what += "".join(f"; {note}" for note in getattr(exc, "__notes__", ()))
                before = list(self.history)[:-1] if step else list(self.history)
                self.run.violation(
                    f"{self.name} step {i} ({step or self.doing}): {what}; steps before: {before}"
                )
            else:
                self.run.lost(kind)
            self.history.append(f"{step or self.doing} (failed: {kind or 'violation'})")
            self._reconnect_after_fault(self.client)
        self.run.stepped()

    def _reconnect_after_fault(self, old: Any) -> None:
        """Drop the connection and connect again; a fault may hit the new one too."""
        if old is not None:
            with contextlib.suppress(Exception):
                old.kill()
        self.client = None
        deadline = time.monotonic() + RECONNECT_DEADLINE
        while True:
            try:
                self.connect()
                return
            except Exception as exc:
                if fault_error(exc) is None or time.monotonic() > deadline:
                    raise
                self.run.lost("reconnect")
                time.sleep(0.05)


class FaultObserver(Observer):
    run: FaultRun

    def _one_step(self) -> None:
        in_transaction = self.rng.random() < 0.15
        try:
            if in_transaction:
                self.conn.execute("BEGIN")
            self.look(in_transaction)
            if in_transaction:
                self.conn.execute("COMMIT")
        except Exception as exc:
            kind = fault_error(exc)
            if kind is None:
                self.run.violation(f"observer step {self.steps}: {exc}")
            else:
                self.run.lost(kind)
            self.conn.close()
            deadline = time.monotonic() + RECONNECT_DEADLINE
            while True:
                try:
                    self.conn = self._connect()
                    break
                except psycopg.OperationalError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        self.steps += 1
        self.run.stepped()


class Faults:
    """A thread breaking a server connection every 20-100 ms."""

    def __init__(self, seed: int, relay: Relay, cluster: LocalPostgres) -> None:
        self.rng = random.Random(f"{seed}:faults")
        self.relay = relay
        self.cluster = cluster
        self.done: Counter[str] = Counter()
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._main, name="faults", daemon=True)

    def _main(self) -> None:
        try:
            restart_at = 3 if FULL else None
            n = 0
            while not self.stop.wait(self.rng.uniform(0.02, 0.1)):
                n += 1
                if restart_at is not None and n % 100 == restart_at:
                    self.cluster.restart()
                    self.done["restart"] += 1
                    continue
                self._one()
        except BaseException as exc:
            self.error = exc

    def _one(self) -> None:
        pids = sorted(self.relay.pids())
        if not pids:
            return
        pid = self.rng.choice(pids)
        kind = self.rng.choice(["reset", "fin", "terminate", "stall", "latency"])
        if kind in ("reset", "fin"):
            self.relay.cut([pid], reset=kind == "reset")
        elif kind == "terminate":
            self.cluster.execute("SELECT pg_terminate_backend($1)", pid)
        elif kind == "stall":
            self.relay.stall([pid])
            time.sleep(self.rng.uniform(0.05, 0.3))
            self.relay.resume([pid])
        else:
            self.relay.delay(0.005)
            time.sleep(self.rng.uniform(0.1, 0.3))
            self.relay.delay(0)
        self.done[kind] += 1


def test_clients_never_see_each_others_session_while_servers_are_cut_and_killed(
    cluster: LocalPostgres, relay: Relay, make_proxy: Callable[..., ProxyThread]
) -> None:
    proxy = make_proxy(default_pool_size="2", query_wait_timeout="10")
    seed = _seed()
    replay = f"{SEED_ENV}={seed}"
    default_work_mem = str(cluster.execute("SHOW work_mem")[0][0])
    run = FaultRun(seed, proxy.port, default_work_mem)

    started_at = time.monotonic()
    workers = [FaultWorker(cid, kind, run) for cid, kind in enumerate(KINDS)]
    observer = FaultObserver(run)
    faults = Faults(seed, relay, cluster)
    workers_done = threading.Event()
    threads = [threading.Thread(target=w.main, name=w.name, daemon=True) for w in workers]
    looker = threading.Thread(target=observer.main, args=(workers_done,), daemon=True)
    for thread in [*threads, looker, faults.thread]:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, started_at + DEADLINE - time.monotonic()))
    stuck = [t.name for t in threads if t.is_alive()]
    faults.stop.set()
    faults.thread.join(30)
    workers_done.set()
    run.stop.set()
    for thread in threads:
        thread.join(10)
    looker.join(10)
    relay.delay(0)
    relay.resume()
    elapsed = time.monotonic() - started_at

    report = "\n".join(run.violations)
    context = f"seed {seed} ({replay}); faults {dict(faults.done)}; losses {dict(run.losses)}"
    assert faults.error is None, f"the fault thread failed: {faults.error!r}"
    assert not stuck, f"{context}: workers still running after {DEADLINE} s: {stuck}"
    assert not run.violations, f"{context}: {len(run.violations)} violations:\n{report}"
    assert run.steps >= MIN_STEPS, f"{context}: only {run.steps} steps in {elapsed:.1f} s"
    # The faults did reach clients, or nothing was tested.
    assert sum(faults.done.values()) >= 15, context
    if FULL:
        assert faults.done["restart"] >= 1, context
    assert sum(n for kind, n in run.losses.items() if kind != "reconnect") >= 5, context

    assert_left_clean(proxy, cluster, run)
