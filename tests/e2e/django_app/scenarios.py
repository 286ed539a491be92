"""What the Django tests do through pgproxy, one function per test; imported after django.setup().

Each scenario takes the JSON arguments given to __main__.py and returns something JSON can
encode; test_django.py asserts on it. Threads stand for a web server's worker threads: Django
gives every thread its own database connection, and each thread closes its connections with
`connections.close_all()` when it is done, as Django does at the end of a request.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from django.core.management import call_command
from django.db import IntegrityError, connection, connections, transaction
from django.db.migrations.recorder import MigrationRecorder

from tests.e2e.django_app.models import Account, Reading

T = TypeVar("T")


class RollbackRequestedError(Exception):
    """Raised inside an atomic block to make Django roll it back."""


def in_threads(count: int, work: Callable[[int, threading.Barrier], T]) -> list[T]:
    """Run `work(index, barrier)` on `count` threads at once; re-raise the first failure."""
    barrier = threading.Barrier(count, timeout=30)

    def guarded(index: int) -> T:
        try:
            return work(index, barrier)
        except BaseException:
            barrier.abort()
            raise
        finally:
            connections.close_all()

    with ThreadPoolExecutor(count) as pool:
        futures = [pool.submit(guarded, i) for i in range(count)]
        return [f.result(timeout=60) for f in futures]


def backend_pid() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        (pid,) = cursor.fetchone()
    return int(pid)


def wait_for(predicate: Callable[[], bool], *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


# -- scenarios -----------------------------------------------------------------------------------


def migrate(args: dict[str, Any]) -> dict[str, Any]:
    """`manage.py migrate` into the empty database, then what it recorded and created."""
    call_command("migrate", verbosity=0, interactive=False)
    # `migrate --check` exits non-zero when a migration is still unapplied.
    call_command("migrate", check_unapplied=True, verbosity=0)
    applied = sorted(
        f"{app}.{name}" for app, name in MigrationRecorder(connection).applied_migrations()
    )
    tables = sorted(connection.introspection.table_names())
    connections.close_all()
    return {"applied": applied, "tables": tables}


def sessions(args: dict[str, Any]) -> dict[str, Any]:
    """Database-backed sessions from 6 threads: create, load (the incident's query), update."""
    from django.contrib.sessions.backends.db import SessionStore
    from django.contrib.sessions.models import Session

    per_client = 10

    def client(i: int, barrier: threading.Barrier) -> dict[str, Any]:
        pids = {backend_pid()}
        barrier.wait()
        keys = []
        for k in range(per_client):
            store = SessionStore()
            store["client"] = i
            store["k"] = k
            store.create()
            keys.append(store.session_key)
        loaded = []
        for key in keys:
            store = SessionStore(session_key=key)
            loaded.append([store["client"], store["k"]])
            store["seen"] = True
            store.save()
        seen = [SessionStore(session_key=key).get("seen", False) for key in keys]
        exists = [SessionStore().exists(key) for key in keys]
        expired = SessionStore()
        expired["client"] = i
        expired.set_expiry(-60)
        expired.save()
        expired_loads_empty = SessionStore(session_key=expired.session_key).load() == {}
        # All six connections are still open here. Were any of them pinned to a server, the
        # four others could not run a statement until it disconnected, and this would hang.
        barrier.wait()
        pids.add(backend_pid())
        return {
            "loaded": loaded,
            "seen": seen,
            "exists": exists,
            "expired_loads_empty": expired_loads_empty,
            "pids": sorted(pids),
        }

    clients = in_threads(6, client)
    stored = Session.objects.count()
    SessionStore.clear_expired()
    after_clear = Session.objects.count()
    connections.close_all()
    return {"clients": clients, "stored": stored, "after_clear": after_clear}


def atomic(args: dict[str, Any]) -> list[dict[str, Any]]:
    """Nested atomic blocks from 6 threads: savepoints kept, rolled back, a failed outer block."""

    def client(i: int, barrier: threading.Barrier) -> dict[str, Any]:
        prefix = f"atomic-{i}-"
        barrier.wait()
        pids = set()
        with transaction.atomic():
            pids.add(backend_pid())
            Account.objects.create(name=prefix + "outer", balance=1)
            with transaction.atomic():  # a savepoint that is released
                Account.objects.create(name=prefix + "kept savepoint", balance=2)
            try:
                with transaction.atomic():  # a savepoint rolled back by an exception
                    Account.objects.create(name=prefix + "rolled back savepoint", balance=3)
                    raise RollbackRequestedError
            except RollbackRequestedError:
                pass
            try:
                with transaction.atomic():  # a savepoint rolled back after a database error
                    Account.objects.create(name=prefix + "outer", balance=4)
            except IntegrityError:
                pass
            Account.objects.filter(name=prefix + "outer").update(balance=10)
            pids.add(backend_pid())
            same_server_in_transaction = len(pids) == 1
        try:
            with transaction.atomic():  # an outer block rolled back by an exception
                Account.objects.create(name=prefix + "rolled back outer", balance=5)
                Account.objects.filter(name=prefix + "outer").update(balance=0)
                raise RollbackRequestedError
        except RollbackRequestedError:
            pass
        barrier.wait()  # six open connections, none may hold a server between transactions
        rows = list(
            Account.objects.filter(name__startswith=prefix)
            .order_by("name")
            .values_list("name", "balance")
        )
        return {
            "rows": [[name.removeprefix(prefix), balance] for name, balance in rows],
            "same_server_in_transaction": same_server_in_transaction,
            "in_atomic_block": connection.in_atomic_block,
            "pid": backend_pid(),
        }

    return in_threads(6, client)


def select_for_update(args: dict[str, Any]) -> dict[str, Any]:
    """Two threads lock the same row; the second must wait until the first commits.

    A superuser connection straight to PostgreSQL (`observer` DSN) watches pg_stat_activity, so
    that the first thread commits only once the second is seen waiting for the row lock.
    """
    from django.db.backends.postgresql.base import Database

    Account.objects.create(name="locked", balance=100)
    observer = Database.connect(args["observer"])
    observer.autocommit = True
    a_locked = threading.Event()
    out: dict[str, Any] = {}

    def b_is_waiting_for_the_lock() -> bool:
        cursor = observer.cursor()
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s"
            " AND wait_event_type = 'Lock' AND query LIKE %s",
            [args["name"], "%FOR UPDATE%"],
        )
        (count,) = cursor.fetchone()
        cursor.close()
        return bool(count)

    def a(barrier: threading.Barrier) -> None:
        with transaction.atomic():
            account = Account.objects.select_for_update().get(name="locked")
            out["a_pid"] = backend_pid()
            a_locked.set()
            wait_for(b_is_waiting_for_the_lock, timeout=10, what="B to wait for the row lock")
            out["b_was_seen_waiting"] = True
            account.balance += 1
            account.save()
            out["a_wrote"] = account.balance

    def b(barrier: threading.Barrier) -> None:
        if not a_locked.wait(10):
            raise AssertionError("A did not lock the row within 10 s")
        with transaction.atomic():
            account = Account.objects.select_for_update().get(name="locked")
            out["b_read"] = account.balance
            out["b_pid"] = backend_pid()
            account.balance += 1
            account.save()

    try:
        in_threads(2, lambda i, barrier: (a, b)[i](barrier))
    finally:
        observer.close()
    out["final"] = Account.objects.get(name="locked").balance
    connections.close_all()
    return out


def iterate(args: dict[str, Any]) -> list[dict[str, Any]]:
    """`.iterator(chunk_size=...)` over every Reading from `args["threads"]` threads at once.

    With Django's defaults the iterator is a server-side cursor: outside a transaction (even
    threads) Django declares it WITH HOLD, inside `atomic()` (odd threads) WITHOUT HOLD. Each
    thread also looks at pg_cursors while iterating.
    """

    def client(i: int, barrier: threading.Barrier) -> dict[str, Any]:
        barrier.wait()
        if i % 2:
            with transaction.atomic():
                return read_all(i)
        return read_all(i)

    def read_all(i: int) -> dict[str, Any]:
        count = 0
        total = 0
        labels_match = True
        open_cursors: list[list[Any]] = []
        for reading in Reading.objects.order_by("id").iterator(chunk_size=args["chunk_size"]):
            n, label = reading.n, reading.label
            if count == 0:
                with connection.cursor() as cursor:
                    cursor.execute("SELECT name, is_holdable FROM pg_cursors")
                    open_cursors = [list(row) for row in cursor.fetchall()]
            count += 1
            total += n
            labels_match = labels_match and label == str(n)
        return {
            "count": count,
            "total": total,
            "labels_match": labels_match,
            "open_cursors": open_cursors,
            "disable_server_side_cursors": connection.settings_dict.get(
                "DISABLE_SERVER_SIDE_CURSORS"
            ),
            "in_atomic_block": connection.in_atomic_block,
        }

    return in_threads(args["threads"], client)
