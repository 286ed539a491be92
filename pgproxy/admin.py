"""The admin console: the virtual database `pgproxy` (alias `pgbouncer`), simple queries only.

Rules of this file:

* `AdminSession.feed` frames the client's bytes and answers every Query itself: each
  statement (split on `;`) gets RowDescription, DataRows and CommandComplete, then one
  ReadyForQuery, like a Postgres backend. Extended-protocol messages get 0A000 and the
  session goes on; broken framing gets 08P01 and a close.
* SHOW commands answer from `pgproxy.report`, built on demand on the event loop thread; the
  others call the proxy's admin methods. Nothing here blocks: PAUSE waits by polling with
  `call_later`, and meanwhile the client's further messages are queued, in order.
* Column names and meanings follow PgBouncer's where they are the same (so its users and its
  Prometheus exporter feel at home); pgproxy's own columns come after them. Every column is
  sent as text. Passwords are never shown.
* The parsing and encoding helpers at the top are pure and unit-tested without a loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel

from pgproxy import __version__, report
from pgproxy.config import DatabaseEntry, Settings, UserEntry, UserSettings
from pgproxy.errors import ConfigError, PgProxyError, ProtocolError, Severity
from pgproxy.wire import messages
from pgproxy.wire.codes import BackendCode, FrontendCode, SqlState, TransactionStatus
from pgproxy.wire.scanner import MessageScanner
from pgproxy.workers import PeerError

if TYPE_CHECKING:
    from pgproxy.proxy import Proxy

log = logging.getLogger("pgproxy")

# Database names that reach the console instead of a pool (unless `databases` lists them).
ADMIN_DATABASES = ("pgproxy", "pgbouncer")

# A console message longer than this is not a command anyone typed: 08P01 and close.
MAX_MESSAGE = 1 << 20
# How often a PAUSE checks whether the paused pools' servers are all back.
PAUSE_POLL_INTERVAL = 0.05

# Type OIDs of the columns (pg_type): all values are sent as text, the OID only tells
# clients such as psql how to align and parse them.
TEXT_OID = 25
INT8_OID = 20
NUMERIC_OID = 1700

# SQLSTATEs only the console sends (Appendix A, "PostgreSQL Error Codes").
SYNTAX_ERROR = "42601"
UNDEFINED_OBJECT = "42704"
INSUFFICIENT_PRIVILEGE = "42501"
INVALID_PARAMETER_VALUE = "22023"

# Statements that modify nothing: stats_users may run them.
_READ_ONLY_VERBS = frozenset({"SHOW", "SET"})

# Messages of the extended query protocol (and FunctionCall): the console refuses them.
_EXTENDED = frozenset(
    {
        FrontendCode.PARSE,
        FrontendCode.BIND,
        FrontendCode.DESCRIBE,
        FrontendCode.EXECUTE,
        FrontendCode.CLOSE,
        FrontendCode.FLUSH,
        FrontendCode.FUNCTION_CALL,
    }
)
_WATCHED = frozenset({FrontendCode.QUERY, FrontendCode.TERMINATE, FrontendCode.SYNC, *_EXTENDED})
# CopyData/CopyDone/CopyFail outside a COPY are ignored, as Postgres does.
_VALID = _WATCHED | {FrontendCode.COPY_DATA, FrontendCode.COPY_DONE, FrontendCode.COPY_FAIL}


def admin_welcome() -> dict[str, str]:
    """ParameterStatus values a console client gets at login."""
    return {
        # libpq reads the leading number: a plain version keeps psql from guessing "0.0".
        "server_version": __version__,
        "server_encoding": "UTF8",
        "client_encoding": "UTF8",
        "DateStyle": "ISO, MDY",
        "integer_datetimes": "on",
        "standard_conforming_strings": "on",
        "application_name": "",
    }


# --- pure helpers: parsing ---------------------------------------------------------------


def console_error(message: str, sqlstate: str, *, hint: str | None = None) -> PgProxyError:
    """An ERROR (not FATAL): the session answers it and goes on."""
    return PgProxyError(message, sqlstate=sqlstate, severity=Severity.ERROR, hint=hint)


def split_statements(text: str) -> list[str]:
    """The statements of a Query, split on `;` outside quotes; empty ones dropped."""
    out: list[str] = []
    start = 0
    quote = ""
    for pos, char in enumerate(text):
        if quote:
            if char == quote:
                quote = ""  # a doubled quote closes and reopens: same result
        elif char in "'\"":
            quote = char
        elif char == ";":
            out.append(text[start:pos])
            start = pos + 1
    out.append(text[start:])
    return [s.strip() for s in out if s.strip()]


def _words(statement: str) -> list[str]:
    """Whitespace-separated words; a double-quoted word keeps its case and spaces."""
    words: list[str] = []
    pos = 0
    n = len(statement)
    while pos < n:
        if statement[pos].isspace():
            pos += 1
            continue
        if statement[pos] == '"':
            word = []
            pos += 1
            while True:
                end = statement.find('"', pos)
                if end < 0:
                    raise console_error(
                        f"unterminated quoted identifier in {statement!r}", SYNTAX_ERROR
                    )
                word.append(statement[pos:end])
                if statement.startswith('"', end + 1):  # "" inside quotes is one quote
                    word.append('"')
                    pos = end + 2
                    continue
                pos = end + 1
                break
            words.append("".join(word))
            continue
        end = pos
        while end < n and not statement[end].isspace():
            end += 1
        words.append(statement[pos:end])
        pos = end
    return words


@dataclass(frozen=True, slots=True)
class Command:
    """One parsed console statement: the verb upper-cased, `argument` as written (or None)."""

    verb: str
    argument: str | None = None


# verb → (whether it takes an argument: "no", "optional" or "required", what the argument is)
_VERBS: dict[str, tuple[str, str]] = {
    "SHOW": ("required", "an item, e.g. SHOW POOLS"),
    "PAUSE": ("optional", "a database"),
    "RESUME": ("optional", "a database"),
    "KILL": ("required", "a database"),
    "KILL_CLIENT": ("required", "a client id (the id column of SHOW CLIENTS)"),
    "RELOAD": ("no", ""),
    "SHUTDOWN": ("no", ""),
}
# PgBouncer commands pgproxy does not have: a clearer error than "unknown command".
_UNSUPPORTED_VERBS = frozenset(
    {"SUSPEND", "DISABLE", "ENABLE", "RECONNECT", "WAIT_CLOSE", "UPGRADE", "REFRESH"}
)
_HELP_HINT = "SHOW HELP lists the commands"


def parse_command(statement: str) -> Command:
    """One statement → `Command`; raises a 42601 ERROR for anything that is not a command."""
    words = _words(statement)
    if not words:
        raise console_error("empty statement", SYNTAX_ERROR)
    verb = words[0].upper()
    if verb == "SET":  # psql and exporters send some; nothing to set here
        return Command("SET")
    spec = _VERBS.get(verb)
    if spec is None:
        if verb in _UNSUPPORTED_VERBS:
            raise console_error(
                f"{verb} is not supported by pgproxy",
                SqlState.FEATURE_NOT_SUPPORTED,
                hint=_HELP_HINT,
            )
        raise console_error(
            f"unknown admin console command: {_shorten(statement)}",
            SYNTAX_ERROR,
            hint=f"the console runs pgproxy's commands, not SQL; {_HELP_HINT}",
        )
    arity, what = spec
    args = words[1:]
    if len(args) > 1 or (args and arity == "no"):
        raise console_error(
            f"too many arguments to {verb}: {_shorten(statement)}", SYNTAX_ERROR, hint=_HELP_HINT
        )
    if not args and arity == "required":
        raise console_error(f"{verb} needs {what}", SYNTAX_ERROR, hint=_HELP_HINT)
    argument = args[0] if args else None
    if verb == "SHOW" and argument is not None:
        argument = argument.upper()
    return Command(verb, argument)


def _shorten(text: str, limit: int = 80) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --- pure helpers: encoding --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    type_oid: int = TEXT_OID


Value = str | int | float | None

_SUFFIX_OIDS = {"": TEXT_OID, "i": INT8_OID, "n": NUMERIC_OID}


def columns(spec: str) -> tuple[Column, ...]:
    """`"database cl_active:i wait_seconds:n"` → columns: text, `:i` int8, `:n` numeric."""
    out = []
    for word in spec.split():
        name, _, kind = word.partition(":")
        out.append(Column(name, _SUFFIX_OIDS[kind]))
    return tuple(out)


def _message(code: int, body: bytes) -> bytes:
    return bytes((code,)) + (len(body) + 4).to_bytes(4, "big") + body


def row_description(cols: Sequence[Column]) -> bytes:
    """RowDescription ('T'): per field name, table OID 0, column 0, type, size, typmod -1, text."""
    parts = [len(cols).to_bytes(2, "big")]
    for col in cols:
        size = 8 if col.type_oid == INT8_OID else -1
        parts.append(col.name.encode() + b"\x00")
        parts.append(b"\x00\x00\x00\x00\x00\x00")  # table OID, attribute number
        parts.append(col.type_oid.to_bytes(4, "big"))
        parts.append(size.to_bytes(2, "big", signed=True))
        parts.append(b"\xff\xff\xff\xff\x00\x00")  # typmod -1, format 0 (text)
    return _message(BackendCode.ROW_DESCRIPTION, b"".join(parts))


def text_value(value: Value) -> str | None:
    """How a value reads in a column: seconds with millisecond precision, ints as is."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "1" if value else "0"  # PgBouncer's paused/disabled columns are 0 or 1
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def data_row(values: Sequence[Value]) -> bytes:
    """DataRow ('D'): each value as text, None as NULL (length -1)."""
    parts = [len(values).to_bytes(2, "big")]
    for value in values:
        text = text_value(value)
        if text is None:
            parts.append(b"\xff\xff\xff\xff")
        else:
            raw = text.encode()
            parts.append(len(raw).to_bytes(4, "big"))
            parts.append(raw)
    return _message(BackendCode.DATA_ROW, b"".join(parts))


def command_complete(tag: str) -> bytes:
    return _message(BackendCode.COMMAND_COMPLETE, tag.encode() + b"\x00")


def empty_query_response() -> bytes:
    return _message(BackendCode.EMPTY_QUERY_RESPONSE, b"")


def encode_result(cols: Sequence[Column], rows: Iterable[Sequence[Value]], tag: str) -> bytes:
    """A whole result: RowDescription, the DataRows, CommandComplete."""
    parts = [row_description(cols)]
    for row in rows:
        if len(row) != len(cols):
            raise ValueError(f"row has {len(row)} values for {len(cols)} columns")
        parts.append(data_row(row))
    parts.append(command_complete(tag))
    return b"".join(parts)


def split_address(address: str) -> tuple[str, int | None]:
    """`host:port` (the host may be an IPv6 address with colons) → host and port."""
    host, colon, port = address.rpartition(":")
    if not colon or not port.isdigit():
        return address, None
    return host, int(port)


def whole_and_micro(seconds: float) -> tuple[int, int]:
    """PgBouncer's `wait`/`wait_us` pairs: whole seconds and the microseconds after them."""
    micros = max(round(seconds * 1_000_000), 0)
    return micros // 1_000_000, micros % 1_000_000


def config_text(value: object) -> str:
    """A setting's value for SHOW CONFIG; users show names only, the server URL no password."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Enum):
        return str(value.value)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, UserEntry):
        return value.name
    if isinstance(value, DatabaseEntry | UserSettings):
        return " ".join(f"{k}={v}" for k, v in value.model_dump(exclude_none=True).items())
    if isinstance(value, Mapping):
        return "; ".join(
            f"{name}={text}" if (text := config_text(entry)) else str(name)
            for name, entry in value.items()
        )
    if isinstance(value, tuple | list):
        return ",".join(config_text(item) for item in value)
    if isinstance(value, BaseModel):
        return str(value)  # Address, Upstream: their __str__ leaves the password out
    return str(value)


# --- column sets -------------------------------------------------------------------------

POOLS_COLUMNS = columns(
    "database user cl_active:i cl_waiting:i sv_active:i sv_idle:i sv_used:i sv_tested:i "
    "sv_login:i maxwait:i maxwait_us:i pool_mode "
    "cl_idle_in_transaction:i cl_idle:i pool_size:i paused:i"
)
CLIENTS_COLUMNS = columns(
    "type user database state addr port:i connect_time request_time wait:i wait_us:i id:i "
    "link:i application_name state_seconds:n holding_seconds:n last_statement"
)
SERVERS_COLUMNS = columns(
    "type user database state addr port:i connect_time request_time wait:i wait_us:i id:i "
    "link:i remote_pid:i application_name state_seconds:n pinned prepared_statements:i"
)
STATS_COLUMNS = columns(
    "database total_xact_count:i total_query_count:i total_received:i total_sent:i "
    "total_xact_time:i total_query_time:i total_wait_time:i "
    "avg_xact_count:i avg_query_count:i avg_recv:i avg_sent:i "
    "avg_xact_time:i avg_query_time:i avg_wait_time:i "
    "total_errors:i total_logins:i total_login_failures:i total_disconnects:i total_pins:i "
    "total_statement_hits:i total_statement_prepares:i"
)
DATABASES_COLUMNS = columns(
    "name host port:i database force_user pool_size:i min_pool_size:i pool_mode "
    "current_connections:i current_client_connections:i paused:i"
)
USERS_COLUMNS = columns("name pool_mode pool_size:i console")
CONFIG_COLUMNS = columns("key value default changeable")
VERSION_COLUMNS = columns("version")
LISTS_COLUMNS = columns("list items:i")
LEAKS_COLUMNS = columns(
    "id:i user database application_name addr port:i state holding_seconds:n state_seconds:n "
    "last_statement link:i"
)
HELP_COLUMNS = columns("command description")

HELP_ROWS: tuple[tuple[str, str], ...] = (
    ("SHOW POOLS", "clients and servers of each (database, user) pool, by state"),
    ("SHOW CLIENTS", "every client connection: who, from where, doing what"),
    ("SHOW SERVERS", "every server connection and the client it serves"),
    ("SHOW STATS", "per database: transactions, queries, bytes and times since start"),
    ("SHOW DATABASES", "the databases clients may use and where they point"),
    ("SHOW USERS", "the configured users and what they may do"),
    ("SHOW CONFIG", "every setting: value, default, whether RELOAD can change it"),
    ("SHOW LISTS", "how many databases, users, pools, clients and servers there are"),
    ("SHOW LEAKS", "clients holding a server connection, longest first, last statement"),
    ("SHOW VERSION", "the pgproxy version"),
    ("SHOW HELP", "this list"),
    ("PAUSE [db]", "hand out no server connections; answers once none is in use"),
    ("RESUME [db]", "undo PAUSE (and KILL): waiting clients get servers again"),
    ("KILL db", "disconnect the database's clients and servers; it stays paused until RESUME"),
    ("KILL_CLIENT id", "disconnect one client (the id column of SHOW CLIENTS)"),
    ("RELOAD", "re-read the configuration; notices say what changed"),
    ("SHUTDOWN", "stop pgproxy as on SIGTERM: linked clients finish their transaction"),
    ("SET ...", "accepted and ignored"),
)
SHOW_ITEMS = (
    "POOLS",
    "CLIENTS",
    "SERVERS",
    "STATS",
    "DATABASES",
    "USERS",
    "CONFIG",
    "LISTS",
    "LEAKS",
    "VERSION",
    "HELP",
)


Table = tuple[tuple[Column, ...], list[tuple[Value, ...]]]


# SHOW items answered from every worker's rows (workers > 1); the others are the same in all.
GATHERED_ITEMS = frozenset({"POOLS", "CLIENTS", "SERVERS", "STATS", "DATABASES", "LISTS", "LEAKS"})
# Commands every worker must run (workers > 1).
_GATHERED_VERBS = frozenset({"PAUSE", "RESUME", "KILL", "KILL_CLIENT", "RELOAD"})
# SHOW LISTS rows that count configuration or pool keys, the same in each worker.
_LISTS_SHARED = frozenset({"databases", "users", "pools"})


def merge_tables(item: str, tables: Sequence[Sequence[Sequence[Value]]]) -> list[tuple[Value, ...]]:
    """The rows of one SHOW item from several workers, as one proxy's."""
    rows = [tuple(row) for table in tables for row in table]
    if item in ("CLIENTS", "SERVERS"):
        return rows
    if item == "LEAKS":
        return sorted(rows, key=lambda r: -float(r[7] or 0))  # holding_seconds
    merged: dict[tuple[Value, ...], list[Value]] = {}
    keyed = 2 if item == "POOLS" else 1
    for row in rows:
        key = row[:keyed]
        old = merged.get(key)
        if old is None:
            merged[key] = list(row)
        else:
            _COMBINE[item](old, row)
    if item == "STATS":
        for merged_row in merged.values():
            _stats_means(merged_row, rows)
    return [tuple(row) for row in merged.values()]


def _add(into: list[Value], row: Sequence[Value], columns: Iterable[int]) -> None:
    for i in columns:
        a, b = into[i], row[i]
        into[i] = b if a is None else a if b is None else a + b  # type: ignore[operator]


def _combine_pools(into: list[Value], row: Sequence[Value]) -> None:
    _add(into, row, (2, 3, 4, 5, 6, 7, 8, 12, 13, 14))
    if (row[9], row[10]) > (into[9], into[10]):
        into[9], into[10] = row[9], row[10]
    into[15] = max(into[15], row[15])  # type: ignore[type-var]


def _combine_stats(into: list[Value], row: Sequence[Value]) -> None:
    _add(into, row, (*range(1, 12), *range(15, len(row))))


def _stats_means(into: list[Value], rows: Sequence[Sequence[Value]]) -> None:
    """avg_xact_time, avg_query_time, avg_wait_time: total time over total count, the counts
    recovered from each worker's total and mean."""
    for total_col, mean_col in ((5, 12), (6, 13), (7, 14)):
        time_sum = 0.0
        count = 0.0
        for row in rows:
            if row[0] == into[0] and row[mean_col]:
                time_sum += float(row[total_col])  # type: ignore[arg-type]
                count += float(row[total_col]) / float(row[mean_col])  # type: ignore[arg-type]
        into[mean_col] = round(time_sum / count) if count else 0


def _combine_databases(into: list[Value], row: Sequence[Value]) -> None:
    _add(into, row, (8, 9))
    into[10] = max(into[10], row[10])  # type: ignore[type-var]


def _combine_lists(into: list[Value], row: Sequence[Value]) -> None:
    if into[0] in _LISTS_SHARED:
        into[1] = max(into[1], row[1])  # type: ignore[type-var]
    else:
        _add(into, row, (1,))


_COMBINE: dict[str, Callable[[list[Value], Sequence[Value]], None]] = {
    "POOLS": _combine_pools,
    "STATS": _combine_stats,
    "DATABASES": _combine_databases,
    "LISTS": _combine_lists,
}


def local_table(proxy: Proxy, item: str) -> list[tuple[Value, ...]]:
    """This process's rows of a SHOW item."""
    session = AdminSession(proxy, "", may_modify=False, write=_ignore, close=_nothing)
    return AdminSession._SHOW[item](session)[1]


def _ignore(_data: bytes) -> None:
    pass


def _nothing() -> None:
    pass


async def pause_until_quiet(proxy: Proxy, database: str | None) -> bool:
    """PAUSE here and wait until no server is in use; False if resumed before that."""
    proxy.pause(database)
    while not proxy.paused_and_quiet(database):
        if not (proxy.paused_all if database is None else proxy.is_paused(database)):
            return False
        await asyncio.sleep(PAUSE_POLL_INTERVAL)
    return True


def reload_lines(proxy: Proxy) -> dict[str, Any]:
    """RELOAD here: {"changes": [...]} or {"error": why nothing changed}."""
    try:
        return {"changes": proxy.reload()}
    except ConfigError as exc:
        return {"error": str(exc)}


def _timestamp(wall: float) -> str:
    return datetime.fromtimestamp(wall, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


# --- the session -------------------------------------------------------------------------


def _mean_us(seconds: float, count: int) -> int:
    return round(seconds * 1_000_000 / count) if count else 0


@dataclass(slots=True)
class _DatabaseTotals:
    """SHOW STATS: the counters of one database's pools, summed."""

    xacts: int = 0
    queries: int = 0
    received: int = 0
    sent: int = 0
    xact_seconds: float = 0.0
    query_seconds: float = 0.0
    wait_seconds: float = 0.0
    xact_count: int = 0  # observations in the histograms (the means' denominators)
    query_count: int = 0
    wait_count: int = 0
    errors: int = 0
    logins: int = 0
    login_failures: int = 0
    disconnects: int = 0
    pins: int = 0
    statement_hits: int = 0
    statement_prepares: int = 0

    def add(self, pool: report.PoolReport) -> None:
        s = pool.stats
        self.xacts += s.transactions
        self.queries += s.queries
        self.received += s.received
        self.sent += s.sent
        self.xact_seconds += s.transaction_time.sum
        self.query_seconds += s.query_time.sum
        self.wait_seconds += s.wait_time.sum
        self.xact_count += s.transaction_time.count
        self.query_count += s.query_time.count
        self.wait_count += s.wait_time.count
        self.errors += sum(s.errors.values())
        self.logins += s.logins
        self.login_failures += s.login_failures
        self.disconnects += sum(s.disconnects.values())
        self.pins += s.pins
        self.statement_hits += pool.statements.hits
        self.statement_prepares += pool.statements.prepares

    def row(self, database: str, uptime: float | None) -> tuple[Value, ...]:
        def rate(total: int) -> int | None:
            return None if uptime is None else round(total / uptime)

        return (
            database,
            self.xacts,
            self.queries,
            self.received,
            self.sent,
            round(self.xact_seconds * 1_000_000),
            round(self.query_seconds * 1_000_000),
            round(self.wait_seconds * 1_000_000),
            rate(self.xacts),
            rate(self.queries),
            rate(self.received),
            rate(self.sent),
            _mean_us(self.xact_seconds, self.xact_count),
            _mean_us(self.query_seconds, self.query_count),
            _mean_us(self.wait_seconds, self.wait_count),
            self.errors,
            self.logins,
            self.login_failures,
            self.disconnects,
            self.pins,
            self.statement_hits,
            self.statement_prepares,
        )


@dataclass(slots=True)
class _PauseWait:
    """A PAUSE waiting for the paused pools' servers to come back."""

    database: str | None
    timer: asyncio.TimerHandle | None = None


class AdminSession:
    """One console client: feed it the client's bytes; it writes the answers."""

    def __init__(
        self,
        proxy: Proxy,
        user: str,
        *,
        may_modify: bool,
        write: Callable[[bytes], None],
        close: Callable[[], None],
    ) -> None:
        self.proxy = proxy
        self.user = user
        self.may_modify = may_modify
        self._write = write
        self._close = close
        self._scanner = MessageScanner(
            _WATCHED, keep=MAX_MESSAGE, max_length=MAX_MESSAGE + 4, valid=_VALID
        )
        # Messages received but not handled yet (only while a PAUSE waits).
        self._inbox: deque[tuple[int, bytes]] = deque()
        # The rest of the current Query's statements (only while a PAUSE waits).
        self._statements: deque[str] = deque()
        self._pause: _PauseWait | None = None
        # A command asking the other workers (workers > 1); the session waits for it.
        self._task: asyncio.Task[bytes] | None = None
        # After an extended-protocol message: discard until Sync, as Postgres does after an error.
        self._skipping_to_sync = False
        self._closed = False

    # -- input --------------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        if self._closed:
            return
        try:
            frames = self._scanner.feed(data)
        except ProtocolError as exc:
            self._fail(str(exc.message))
            return
        self._inbox.extend((code, body) for code, body, _end in frames)
        self._drain()

    def cancel(self) -> None:
        """A CancelRequest for this session: stop waiting for a PAUSE (the pools stay paused)."""
        if self._task is not None:
            self._task.cancel()
        if self._pause is not None:
            self._end_pause(
                console_error(
                    "canceling statement due to user request: PAUSE stopped waiting, the pools "
                    "stay paused (RESUME undoes it)",
                    SqlState.QUERY_CANCELED,
                )
            )

    def connection_lost(self) -> None:
        """The client is gone: stop any timer."""
        self._closed = True
        self._stop_pause_timer()
        self._pause = None
        if self._task is not None:
            self._task.cancel()
        self._inbox.clear()
        self._statements.clear()

    def _fail(self, message: str) -> None:
        """Broken framing: FATAL 08P01, then close."""
        self._write(messages.error_response("FATAL", SqlState.PROTOCOL_VIOLATION, message))
        self._closed = True
        self._stop_pause_timer()
        self._close()

    def _drain(self) -> None:
        """Handle queued messages in order until one has to wait (a PAUSE) or none are left."""
        while self._inbox and self._pause is None and self._task is None and not self._closed:
            code, body = self._inbox.popleft()
            self._handle(code, body)

    def _handle(self, code: int, body: bytes) -> None:
        if code == FrontendCode.TERMINATE:
            self._closed = True
            self._close()
        elif code == FrontendCode.SYNC:
            self._skipping_to_sync = False
            self._write(messages.ready_for_query(TransactionStatus.IDLE))
        elif code in _EXTENDED:
            if self._skipping_to_sync:
                return
            self._write(
                messages.error_response(
                    "ERROR",
                    SqlState.FEATURE_NOT_SUPPORTED,
                    "the admin console speaks the simple query protocol only",
                    hint="send the command as a plain Query, e.g. psql -c 'SHOW POOLS'",
                )
            )
            if code == FrontendCode.FUNCTION_CALL:
                # FunctionCall is answered on its own, with no Sync after it.
                self._write(messages.ready_for_query(TransactionStatus.IDLE))
            else:
                self._skipping_to_sync = True
        elif code == FrontendCode.QUERY:
            self._skipping_to_sync = False
            text = body.split(b"\x00", 1)[0].decode("utf-8", "replace")
            statements = split_statements(text)
            if not statements:
                self._write(
                    empty_query_response() + messages.ready_for_query(TransactionStatus.IDLE)
                )
                return
            self._statements.extend(statements)
            self._run_statements()

    def _run_statements(self) -> None:
        """Answer the current Query's statements; stop at the first error, like Postgres.

        Each answer is written as soon as it is ready, so that a waiting PAUSE's notice comes
        after the answers of the statements before it.
        """
        while self._statements:
            statement = self._statements.popleft()
            try:
                answer = self._execute(statement)
            except PgProxyError as exc:
                answer = messages.error_from_exception(exc)
                self._statements.clear()
            except Exception:
                log.exception("admin console: %r failed", statement)
                answer = messages.error_response(
                    "ERROR", SqlState.INTERNAL_ERROR, "pgproxy internal error (see its log)"
                )
                self._statements.clear()
            if answer is None:  # a PAUSE or the other workers are awaited; the rest comes after
                return
            self._write(answer)
        self._write(messages.ready_for_query(TransactionStatus.IDLE))

    # -- commands -----------------------------------------------------------------------

    def _execute(self, statement: str) -> bytes | None:
        """One statement's answer; None when it must wait (PAUSE)."""
        command = parse_command(statement)
        if not self.may_modify and command.verb not in _READ_ONLY_VERBS:
            raise console_error(
                f'{command.verb} is for admin_users only; user "{self.user}" is a stats user '
                "and may run SHOW commands",
                INSUFFICIENT_PRIVILEGE,
            )
        if self.proxy.peers is not None and (
            command.verb in _GATHERED_VERBS
            or (command.verb == "SHOW" and command.argument in GATHERED_ITEMS)
        ):
            if command.verb in ("PAUSE", "RESUME", "KILL") and command.argument is not None:
                self._known_database(command.argument)
            self._task = asyncio.get_running_loop().create_task(self._everywhere(command))
            self._task.add_done_callback(self._everywhere_done)
            return None
        match command.verb:
            case "SET":
                return command_complete("SET")
            case "SHOW":
                assert command.argument is not None
                return self._show(command.argument)
            case "PAUSE":
                return self._pause_command(command.argument)
            case "RESUME":
                return self._resume(command.argument)
            case "KILL":
                assert command.argument is not None
                return self._kill(command.argument)
            case "KILL_CLIENT":
                assert command.argument is not None
                return self._kill_client(command.argument)
            case "RELOAD":
                return self._reload()
            case "SHUTDOWN":
                log.info("admin console: SHUTDOWN by %s", self.user)
                self.proxy.request_shutdown()
                return command_complete("SHUTDOWN")
        raise AssertionError(command.verb)  # parse_command returns only the verbs above

    async def _everywhere(self, command: Command) -> bytes:
        """A command run by this worker and the others (workers > 1), answered as one."""
        proxy = self.proxy
        peers = proxy.peers
        assert peers is not None
        verb, argument = command.verb, command.argument
        out: list[bytes] = []

        def answered(answers: list[tuple[int, Any]]) -> list[Any]:
            ok = []
            for index, answer in answers:
                if isinstance(answer, Exception):
                    out.append(
                        messages.notice_response(
                            "WARNING",
                            SqlState.SUCCESSFUL_COMPLETION,
                            f"worker {index} did not answer: {answer}",
                        )
                    )
                else:
                    ok.append(answer)
            return ok

        match verb:
            case "SHOW":
                assert argument is not None
                cols, rows = self._SHOW[argument](self)
                others = answered(await peers.ask_others("show", item=argument))
                out.append(encode_result(cols, merge_tables(argument, [rows, *others]), "SHOW"))
            case "PAUSE":
                log.info("admin console: PAUSE %s by %s", argument or "(all)", self.user)
                local, others_answers = await asyncio.gather(
                    pause_until_quiet(proxy, argument),
                    peers.ask_others("pause", timeout=None, database=argument),
                )
                if not (local and all(answered(others_answers))):
                    raise console_error(
                        "PAUSE interrupted: the pools were resumed before they were quiet",
                        SqlState.QUERY_CANCELED,
                    )
                out.append(command_complete("PAUSE"))
            case "RESUME":
                log.info("admin console: RESUME %s by %s", argument or "(all)", self.user)
                proxy.resume(argument)
                answered(await peers.ask_others("resume", database=argument))
                out.append(command_complete("RESUME"))
            case "KILL":
                assert argument is not None
                log.info("admin console: KILL %s by %s", argument, self.user)
                killed = proxy.kill_database(argument)
                killed += sum(answered(await peers.ask_others("kill", database=argument)))
                out.append(self._killed(argument, killed))
            case "KILL_CLIENT":
                assert argument is not None
                client_id = self._client_id(argument)
                log.info("admin console: KILL_CLIENT %d by %s", client_id, self.user)
                owner = peers.spec.owner(client_id)
                if owner == peers.spec.index:
                    found = proxy.kill_client(client_id)
                else:
                    try:
                        found = bool(await peers.ask(owner, "kill_client", id=client_id))
                    except PeerError as exc:
                        raise console_error(
                            f"worker {owner}, which numbered client {client_id}, did not "
                            f"answer: {exc}",
                            SqlState.INTERNAL_ERROR,
                        ) from None
                if not found:
                    raise self._no_client(client_id)
                out.append(command_complete("KILL_CLIENT"))
            case "RELOAD":
                log.info("admin console: RELOAD by %s", self.user)
                results = [reload_lines(proxy), *answered(await peers.ask_others("reload"))]
                errors = [r["error"] for r in results if "error" in r]
                if errors:
                    raise console_error(
                        f"RELOAD failed, nothing changed: {errors[0]}", INVALID_PARAMETER_VALUE
                    )
                out.append(self._reloaded(results[0]["changes"]))
        return b"".join(out)

    def _everywhere_done(self, task: asyncio.Task[bytes]) -> None:
        self._task = None
        if self._closed:
            return
        try:
            answer = task.result()
        except asyncio.CancelledError:
            answer = messages.error_response(
                "ERROR", SqlState.QUERY_CANCELED, "canceling statement due to user request"
            )
            self._statements.clear()
        except PgProxyError as exc:
            answer = messages.error_from_exception(exc)
            self._statements.clear()
        except Exception:
            log.exception("admin console: command failed")
            answer = messages.error_response(
                "ERROR", SqlState.INTERNAL_ERROR, "pgproxy internal error (see its log)"
            )
            self._statements.clear()
        self._write(answer)
        self._run_statements()
        self._drain()

    def _known_database(self, name: str) -> None:
        """Raise 3D000 unless `name` is a configured database or one with a pool."""
        proxy = self.proxy
        if name in proxy.settings.databases or any(k.database == name for k in proxy.pools):
            return
        raise console_error(
            f'database "{name}" does not exist',
            SqlState.INVALID_CATALOG_NAME,
            hint="SHOW DATABASES lists them (a database appears once a client has used it)",
        )

    def _pause_command(self, database: str | None) -> bytes | None:
        if database is not None:
            self._known_database(database)
        log.info("admin console: PAUSE %s by %s", database or "(all)", self.user)
        self.proxy.pause(database)
        if self.proxy.paused_and_quiet(database):
            return command_complete("PAUSE")
        busy = sum(
            len(pool.active) + len(pool.resetting) + pool.connecting
            for key, pool in self.proxy.pools.items()
            if database is None or key.database == database
        )
        self._write(
            messages.notice_response(
                "NOTICE",
                SqlState.SUCCESSFUL_COMPLETION,
                f"PAUSE: waiting for {busy} server connection(s) still in use; SHOW LEAKS in "
                "another session names the clients holding them",
            )
        )
        self._pause = _PauseWait(database)
        self._schedule_pause_poll()
        return None

    def _schedule_pause_poll(self) -> None:
        assert self._pause is not None
        loop = asyncio.get_running_loop()
        self._pause.timer = loop.call_later(PAUSE_POLL_INTERVAL, self._poll_pause)

    def _poll_pause(self) -> None:
        wait = self._pause
        if wait is None or self._closed:
            return
        wait.timer = None
        proxy = self.proxy
        try:
            still_paused = (
                proxy.paused_all if wait.database is None else proxy.is_paused(wait.database)
            )
            if not still_paused:
                self._end_pause(
                    console_error(
                        "PAUSE interrupted: the pools were resumed before they were quiet",
                        SqlState.QUERY_CANCELED,
                    )
                )
            elif proxy.paused_and_quiet(wait.database):
                self._end_pause(None)
            else:
                self._schedule_pause_poll()
        except Exception:  # a timer callback: nothing may escape into the loop's handler
            log.exception("admin console: PAUSE poll failed")
            self._end_pause(
                console_error("pgproxy internal error (see its log)", SqlState.INTERNAL_ERROR)
            )

    def _end_pause(self, error: PgProxyError | None) -> None:
        """Answer the waiting PAUSE, run the rest of its Query, then the queued messages."""
        self._stop_pause_timer()
        self._pause = None
        if error is None:
            self._write(command_complete("PAUSE"))
        else:
            self._write(messages.error_from_exception(error))
            self._statements.clear()
        self._run_statements()
        self._drain()

    def _stop_pause_timer(self) -> None:
        if self._pause is not None and self._pause.timer is not None:
            self._pause.timer.cancel()
            self._pause.timer = None

    def _resume(self, database: str | None) -> bytes:
        if database is not None and database not in self.proxy.paused_databases:
            self._known_database(database)
        log.info("admin console: RESUME %s by %s", database or "(all)", self.user)
        self.proxy.resume(database)
        return command_complete("RESUME")

    def _kill(self, database: str) -> bytes:
        self._known_database(database)
        log.info("admin console: KILL %s by %s", database, self.user)
        return self._killed(database, self.proxy.kill_database(database))

    def _killed(self, database: str, killed: int) -> bytes:
        notice = messages.notice_response(
            "NOTICE",
            SqlState.SUCCESSFUL_COMPLETION,
            f'KILL: {killed} client(s) of database "{database}" disconnected; it stays paused '
            "until RESUME",
        )
        return notice + command_complete("KILL")

    def _kill_client(self, argument: str) -> bytes:
        client_id = self._client_id(argument)
        log.info("admin console: KILL_CLIENT %d by %s", client_id, self.user)
        if not self.proxy.kill_client(client_id):
            raise self._no_client(client_id)
        return command_complete("KILL_CLIENT")

    @staticmethod
    def _client_id(argument: str) -> int:
        try:
            return int(argument)
        except ValueError:
            raise console_error(
                f"KILL_CLIENT needs a client id (a number), got {argument!r}",
                SYNTAX_ERROR,
                hint="the id column of SHOW CLIENTS",
            ) from None

    @staticmethod
    def _no_client(client_id: int) -> PgProxyError:
        return console_error(
            f"no client with id {client_id}",
            UNDEFINED_OBJECT,
            hint="SHOW CLIENTS lists them; console sessions cannot be killed",
        )

    def _reload(self) -> bytes:
        log.info("admin console: RELOAD by %s", self.user)
        try:
            changes = self.proxy.reload()
        except ConfigError as exc:
            raise console_error(
                f"RELOAD failed, nothing changed: {exc}", INVALID_PARAMETER_VALUE
            ) from None
        return self._reloaded(changes)

    @staticmethod
    def _reloaded(changes: Sequence[str]) -> bytes:
        lines = changes or ["RELOAD: nothing changed"]
        notices = [
            messages.notice_response("NOTICE", SqlState.SUCCESSFUL_COMPLETION, line)
            for line in lines
        ]
        return b"".join(notices) + command_complete("RELOAD")

    # -- SHOW ---------------------------------------------------------------------------

    def _show(self, item: str) -> bytes:
        build = self._SHOW.get(item)
        if build is None:
            raise console_error(
                f"unknown SHOW item {item!r}",
                UNDEFINED_OBJECT,
                hint="SHOW accepts " + ", ".join(SHOW_ITEMS),
            )
        cols, rows = build(self)
        return encode_result(cols, rows, "SHOW")

    def _show_pools(self) -> Table:
        """One row per pool.

        cl_active counts clients linked to a server (running, or idle in a transaction, the
        latter also in cl_idle_in_transaction), as PgBouncer's; cl_idle clients hold nothing;
        sv_used is servers being reset after their client; sv_tested is always 0.
        """
        rows: list[tuple[Value, ...]] = []
        for p in report.pools(self.proxy, self.proxy.now()):
            maxwait, maxwait_us = whole_and_micro(p.longest_wait)
            iit = p.clients.get(report.IDLE_IN_TRANSACTION, 0)
            rows.append(
                (
                    p.database,
                    p.user,
                    p.clients.get(report.ACTIVE, 0) + iit,
                    p.clients.get(report.WAITING, 0),
                    p.servers.get(report.SERVER_ACTIVE, 0),
                    p.servers.get(report.SERVER_IDLE, 0),
                    p.servers.get(report.SERVER_RESETTING, 0),
                    0,
                    p.servers.get(report.SERVER_LOGIN, 0),
                    maxwait,
                    maxwait_us,
                    p.pool_mode,
                    iit,
                    p.clients.get(report.IDLE, 0),
                    p.size,
                    p.paused,
                )
            )
        return POOLS_COLUMNS, rows

    def _show_clients(self) -> Table:
        """One row per client, console sessions included.

        request_time is when the client entered its current state (NULL when idle); wait is
        how long a waiting client has waited for a server.
        """
        now = self.proxy.now()
        wall = time.time()
        rows: list[tuple[Value, ...]] = []
        for c in report.clients(self.proxy, now):
            host, port = split_address(c.address)
            timed = c.state in (report.ACTIVE, report.WAITING, report.IDLE_IN_TRANSACTION)
            wait, wait_us = whole_and_micro(c.state_for if c.state == report.WAITING else 0.0)
            rows.append(
                (
                    "C",
                    c.user,
                    c.database,
                    c.state,
                    host,
                    port,
                    _timestamp(wall - c.connected_for),
                    _timestamp(wall - c.state_for) if timed else None,
                    wait,
                    wait_us,
                    c.id,
                    c.server_id,
                    c.application_name,
                    c.state_for,
                    c.holding_for,
                    c.last_statement,
                )
            )
        return CLIENTS_COLUMNS, rows

    def _show_servers(self) -> Table:
        """One row per server connection.

        request_time is when an idle server became idle, or when the client of an active one
        got it; application_name is its client's.
        """
        now = self.proxy.now()
        wall = time.time()
        by_id = {c.id: c for c in report.clients(self.proxy, now)}
        rows: list[tuple[Value, ...]] = []
        for s in report.servers(self.proxy, now):
            host, port = split_address(s.address)
            client = by_id.get(s.client_id) if s.client_id is not None else None
            if s.state == report.SERVER_IDLE:
                since: float | None = s.state_for
            elif client is not None and client.holding_for is not None:
                since = client.holding_for
            else:
                since = None
            rows.append(
                (
                    "S",
                    s.user,
                    s.database,
                    s.state,
                    host,
                    port,
                    _timestamp(wall - s.connected_for),
                    None if since is None else _timestamp(wall - since),
                    0,
                    0,
                    s.id,
                    s.client_id,
                    s.backend_pid,
                    "" if client is None else client.application_name,
                    s.state_for,
                    s.pinned,
                    s.prepared_statements,
                )
            )
        return SERVERS_COLUMNS, rows

    def _show_stats(self) -> Table:
        """Per database (its pools summed), since the proxy started.

        Times are in microseconds, as PgBouncer's. avg_xact_time, avg_query_time and
        avg_wait_time are means per transaction, query and waiting client; avg_xact_count,
        avg_query_count, avg_recv and avg_sent are per second since start (PgBouncer's are
        over its last stats_period).
        """
        proxy = self.proxy
        now = proxy.now()
        uptime = max(now - proxy.started_at, 1e-6)
        totals: dict[str, _DatabaseTotals] = {}
        for p in report.pools(proxy, now):
            totals.setdefault(p.database, _DatabaseTotals()).add(p)
        rows = [t.row(database, uptime) for database, t in totals.items()]
        return STATS_COLUMNS, rows

    def _show_databases(self) -> Table:
        """The configured databases, then databases with a pool that are not configured;
        `*` stands for any other name when unlisted names are allowed."""
        proxy = self.proxy
        settings = proxy.settings
        upstream = settings.server
        servers: dict[str, int] = {}
        clients: dict[str, int] = {}
        for key, pool in proxy.pools.items():
            servers[key.database] = servers.get(key.database, 0) + pool.total
        for client in proxy.clients:
            if client.pool is not None:
                name = client.pool.key.database
                clients[name] = clients.get(name, 0) + 1

        def row(
            name: str, entry: DatabaseEntry | None, dbname: str | None, current: bool
        ) -> tuple[Value, ...]:
            policy = settings.policy(name, "")
            return (
                name,
                (entry.host if entry else None) or upstream.host,
                (entry.port if entry else None) or upstream.port,
                dbname,
                upstream.user,
                policy.pool_size,
                min(settings.min_pool_size, policy.pool_size),
                settings.pool_mode.value,
                servers.get(name, 0) if current else 0,
                clients.get(name, 0) if current else 0,
                proxy.is_paused(name),
            )

        rows = [
            row(name, entry, entry.dbname or name, True)
            for name, entry in settings.databases.items()
        ]
        pooled = sorted({k.database for k in proxy.pools} - set(settings.databases))
        rows.extend(row(name, None, upstream.dbname or name, True) for name in pooled)
        if not settings.databases or upstream.dbname:
            rows.append(row("*", None, upstream.dbname, False))
        return DATABASES_COLUMNS, rows

    def _show_users(self) -> Table:
        """Configured users (never their passwords); console: admin, stats or empty."""
        settings = self.proxy.settings
        rows: list[tuple[Value, ...]] = []
        for user in settings.users:
            entry = settings.user_settings.get(user.name)
            role = (
                "admin"
                if user.name in settings.admin_users
                else "stats"
                if user.name in settings.stats_users
                else ""
            )
            size = entry.pool_size if entry is not None else None
            rows.append((user.name, settings.pool_mode.value, size, role))
        return USERS_COLUMNS, rows

    def _show_config(self) -> Table:
        """Every setting; changeable says whether RELOAD applies a new value."""
        # Imported here: pgproxy.proxy imports this module.
        from pgproxy.proxy import RESTART_ONLY

        settings = self.proxy.settings
        rows: list[tuple[Value, ...]] = []
        for name, field in Settings.model_fields.items():
            default = field.get_default(call_default_factory=True)
            rows.append(
                (
                    name,
                    config_text(getattr(settings, name)),
                    config_text(default),
                    "no" if name in RESTART_ONLY else "yes",
                )
            )
        return CONFIG_COLUMNS, rows

    def _show_version(self) -> Table:
        return VERSION_COLUMNS, [(f"pgproxy {__version__}",)]

    def _show_lists(self) -> Table:
        proxy = self.proxy
        now = proxy.now()
        client_states = [c.state for c in report.clients(proxy, now)]
        server_states = [s.state for s in report.servers(proxy, now)]
        databases = set(proxy.settings.databases) | {k.database for k in proxy.pools}
        rows: list[tuple[Value, ...]] = [
            ("databases", len(databases)),
            ("users", len(proxy.settings.users)),
            ("pools", len(proxy.pools)),
            ("used_clients", len(client_states)),
            ("login_clients", client_states.count(report.LOGIN)),
            ("waiting_clients", client_states.count(report.WAITING)),
            ("used_servers", len(server_states)),
            ("idle_servers", server_states.count(report.SERVER_IDLE)),
            ("login_servers", server_states.count(report.SERVER_LOGIN)),
        ]
        return LISTS_COLUMNS, rows

    def _show_leaks(self) -> Table:
        """Clients holding a server connection, longest first, with their last statement."""
        rows: list[tuple[Value, ...]] = []
        for c in report.leaks(self.proxy, self.proxy.now()):
            host, port = split_address(c.address)
            rows.append(
                (
                    c.id,
                    c.user,
                    c.database,
                    c.application_name,
                    host,
                    port,
                    c.state,
                    c.holding_for,
                    c.state_for,
                    c.last_statement,
                    c.server_id,
                )
            )
        return LEAKS_COLUMNS, rows

    def _show_help(self) -> Table:
        return HELP_COLUMNS, [tuple(r) for r in HELP_ROWS]

    _SHOW: ClassVar[dict[str, Callable[[AdminSession], Table]]] = {
        "POOLS": _show_pools,
        "CLIENTS": _show_clients,
        "SERVERS": _show_servers,
        "STATS": _show_stats,
        "DATABASES": _show_databases,
        "USERS": _show_users,
        "CONFIG": _show_config,
        "VERSION": _show_version,
        "LISTS": _show_lists,
        "LEAKS": _show_leaks,
        "HELP": _show_help,
    }
