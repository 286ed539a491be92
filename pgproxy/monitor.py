"""A thread that reads pg_stat_activity on the server, for /metrics.

Rules of this file:

* The reader runs on its own daemon thread with its own single `QueryConnection`: blocking
  reads never run on the event loop. It reconnects after a failure at the same interval,
  and every socket operation has a timeout, so a hung server cannot wedge it.
* The thread publishes `BackendHealth`, a frozen snapshot, by replacing one reference; the
  loop thread reads that reference (`snapshot()`) when Prometheus scrapes. Nothing is ever
  mutated in place, so there are no locks.
* Logs one line when reads start to work and one on each change between up and down, never
  one per poll.

Only client backends (`backend_type = 'client backend'`) are counted: background workers,
autovacuum and WAL senders have slots of their own, so client backends are what runs into
`max_connections`. The monitor's own connection is one of them (application_name
`pgproxy_monitor`, state active).

Privileges: to see the state of other roles' backends the monitor's role needs
`pg_read_all_stats` (or superuser). Without it pg_stat_activity shows NULL as their state
and transaction start; those backends are counted with state "unknown" and are left out of
the oldest-transaction age.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pgproxy.config import PasswordKind, Settings
from pgproxy.core.server_login import ServerCredentials
from pgproxy.errors import PgProxyError, ProtocolError, ServerError
from pgproxy.net.query_client import QueryConnection, Row

log = logging.getLogger("pgproxy.monitor")

# Seconds any one connect, query or result read may take before the connection is dropped
# and retried at the next interval.
SOCKET_TIMEOUT = 5.0
# How long `stop()` waits for the thread: it runs on the event loop, which must not stall.
# A thread stuck in a socket call ends on its own within SOCKET_TIMEOUT (it is a daemon).
STOP_JOIN = 1.0
APPLICATION_NAME = "pgproxy_monitor"
# The server's `state` texts as label values (pg_stat_activity documents these six).
STATE_LABELS = {
    "active": "active",
    "idle": "idle",
    "idle in transaction": "idle_in_transaction",
    "idle in transaction (aborted)": "idle_in_transaction_aborted",
    "fastpath function call": "fastpath_function_call",
    "disabled": "disabled",
}
# A backend whose state the monitor's role may not see (no pg_read_all_stats).
UNKNOWN_STATE = "unknown"

_ACTIVITY_SQL = (
    "SELECT state, application_name, count(*)::int8 FROM pg_stat_activity"
    " WHERE backend_type = 'client backend' GROUP BY 1, 2"
)
# now() is this statement's transaction start; a transaction that began after it gives a
# small negative age, clamped to 0 in Python.
_OLDEST_SQL = (
    "SELECT coalesce(extract(epoch FROM now() - min(xact_start)), 0)::float8"
    " FROM pg_stat_activity"
    " WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
)

# True for superusers too.
_SEES_ALL_SQL = "SELECT pg_has_role('pg_read_all_stats', 'USAGE')"
_HIDDEN_NOTE = " (the role lacks pg_read_all_stats: other roles' backends count as state unknown)"


@dataclass(frozen=True, slots=True)
class Activity:
    """What one read of pg_stat_activity found."""

    # Client backends by state label (STATE_LABELS values or UNKNOWN_STATE), sorted.
    by_state: tuple[tuple[str, int], ...]
    # Client backends by application_name ("" when not set), most first.
    by_application: tuple[tuple[str, int], ...]
    # Age of the oldest open transaction among the visible client backends (0: none).
    oldest_transaction: float
    max_connections: int


@dataclass(frozen=True, slots=True)
class BackendHealth:
    """The monitor's latest result; replaced as a whole after every attempt."""

    up: bool  # the last read succeeded
    reason: str  # why it is down ("" when up)
    # Unix time of the last successful read, None if none succeeded yet.
    last_success_at: float | None
    # What the last read found; None while down (stale numbers are not exported).
    activity: Activity | None = None


@dataclass(frozen=True, slots=True)
class MonitorLogin:
    """Who the monitor logs in as, and where."""

    host: str
    port: int
    user: str
    password: str | None = field(repr=False)
    database: str


def monitor_login(settings: Settings) -> MonitorLogin | str:
    """The monitor's credentials, or why there are none.

    A forced server user (`server = postgresql://user:password@...`) is used as the proxy
    itself uses it (its password from the URL, else from its `users` entry if plaintext, else
    none, for trust). Otherwise: the first of `users` with a plaintext password, console users
    (`admin_users`, `stats_users`) last; a SCRAM or md5 secret cannot log in to Postgres on
    its own.
    """
    server = settings.server
    database = server.dbname or "postgres"
    plaintext = {
        u.name: u.password for u in settings.users if u.password_kind is PasswordKind.PLAINTEXT
    }
    if server.user is not None:
        password = server.password if server.password is not None else plaintext.get(server.user)
        return MonitorLogin(server.host, server.port, server.user, password, database)
    # Console users are often names only the proxy knows (as PgBouncer's admin_users are).
    console = {*settings.admin_users, *settings.stats_users}
    first = min(plaintext.items(), key=lambda item: item[0] in console, default=None)
    if first is not None:
        return MonitorLogin(server.host, server.port, first[0], first[1], database)
    return "no credentials: give the server URL a user and password, or a user a plaintext password"


def state_label(state: str | None) -> str:
    """A pg_stat_activity `state` as a label value; NULL (hidden from us) is "unknown"."""
    if state is None:
        return UNKNOWN_STATE
    known = STATE_LABELS.get(state)
    if known is not None:
        return known
    return "".join(ch if ch.isalnum() else "_" for ch in state.lower()).strip("_") or "other"


def activity_from_rows(
    rows: Iterable[Sequence[Any]], oldest_transaction: float, max_connections: int
) -> Activity:
    """Rows of (state, application_name, count) → an `Activity`."""
    by_state = dict.fromkeys(
        ("active", "idle", "idle_in_transaction", "idle_in_transaction_aborted", UNKNOWN_STATE), 0
    )
    by_application: dict[str, int] = {}
    for state, application_name, count in rows:
        label = state_label(state)
        by_state[label] = by_state.get(label, 0) + int(count)
        name = application_name or ""
        by_application[name] = by_application.get(name, 0) + int(count)
    return Activity(
        by_state=tuple(sorted(by_state.items())),
        by_application=tuple(sorted(by_application.items(), key=lambda kv: (-kv[1], kv[0]))),
        oldest_transaction=max(float(oldest_transaction), 0.0),
        max_connections=max_connections,
    )


def describe_error(exc: BaseException) -> str:
    """One short line for a failed connect or read."""
    if isinstance(exc, ServerError):
        fields = exc.fields
        return f"{fields.get('S', 'ERROR')} {fields.get('C', '')}: {fields.get('M', '')}"
    if isinstance(exc, PgProxyError):
        return " ".join(exc.message.split())
    if isinstance(exc, TimeoutError):
        return f"no answer within {SOCKET_TIMEOUT:g} s"
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class ServerMonitor:
    """Reads pg_stat_activity every `monitor_interval` seconds on a daemon thread."""

    def __init__(self, settings: Settings, tls: ssl.SSLContext | None) -> None:
        self.settings = settings
        self.tls = tls  # the proxy's context for Postgres (None: no TLS)
        self.interval = settings.monitor_interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Replaced (never mutated) by the thread; read by the loop. None: no attempt yet.
        self._snapshot: BackendHealth | None = None

    def snapshot(self) -> BackendHealth | None:
        return self._snapshot

    def start(self) -> None:
        login = monitor_login(self.settings)
        if isinstance(login, str):
            log.warning("server monitor off: %s", login)
            self._snapshot = BackendHealth(up=False, reason=login, last_success_at=None)
            return
        self._thread = threading.Thread(
            target=self._run, args=(login,), name="pgproxy-monitor", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(STOP_JOIN)

    # -- the thread --------------------------------------------------------------------------

    def _run(self, login: MonitorLogin) -> None:
        conn: QueryConnection | None = None
        max_connections = 0
        sees_all = True  # the role may read every backend's state (pg_read_all_stats)
        was_up: bool | None = None
        last_success_at: float | None = None
        while not self._stop.is_set():
            try:
                if conn is None:
                    conn = self._connect(login)
                    max_connections = int(_value(conn.query("SHOW max_connections")))
                    sees_all = _value(conn.query(_SEES_ALL_SQL)) == "t"
                activity = read_activity(conn, max_connections)
            except Exception as exc:  # noqa: BLE001 - any failure means down; it is reported
                _close(conn)
                conn = None
                reason = describe_error(exc)
                if was_up is not False:
                    log.warning(
                        "server monitor: cannot read pg_stat_activity on %s:%d as %s: %s "
                        "(retrying every %g s)",
                        login.host,
                        login.port,
                        login.user,
                        reason,
                        self.interval,
                    )
                was_up = False
                self._snapshot = BackendHealth(
                    up=False, reason=reason, last_success_at=last_success_at
                )
            else:
                if was_up is not True:
                    log.info(
                        "server monitor: reading pg_stat_activity on %s:%d as %s every %g s%s",
                        login.host,
                        login.port,
                        login.user,
                        self.interval,
                        "" if sees_all else _HIDDEN_NOTE,
                    )
                was_up = True
                last_success_at = time.time()
                self._snapshot = BackendHealth(
                    up=True, reason="", last_success_at=last_success_at, activity=activity
                )
            self._stop.wait(self.interval)
        _close(conn)

    def _connect(self, login: MonitorLogin) -> QueryConnection:
        return QueryConnection.connect(
            host=login.host,
            port=login.port,
            database=login.database,
            credentials=ServerCredentials(user=login.user, password=login.password),
            application_name=APPLICATION_NAME,
            timeout=SOCKET_TIMEOUT,
            tls=self.tls,
            tls_mode=self.settings.server_tls_sslmode,
        )


def read_activity(conn: QueryConnection, max_connections: int) -> Activity:
    rows = conn.query(_ACTIVITY_SQL)
    oldest = _value(conn.query(_OLDEST_SQL))
    return activity_from_rows(rows, float(oldest), max_connections)


def _value(rows: list[Row]) -> str:
    """The one non-NULL value a one-row, one-column query returns."""
    value = rows[0][0] if rows and rows[0] else None
    if value is None:
        raise ProtocolError("the server returned no value")
    return value


def _close(conn: QueryConnection | None) -> None:
    if conn is None:
        return
    # A broken connection may fail to say goodbye; it is dropped either way.
    with contextlib.suppress(Exception):
        conn.close()
