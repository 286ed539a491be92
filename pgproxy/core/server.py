"""`ServerState`: what a server connection owes, its transaction status, and whether it is clean.

Every transition of a server connection's protocol state lives here; this file never touches a
socket or a clock (times are arguments). The shell calls `note_frontend` with the messages it
forwards and `feed` with the bytes the server sends back.

How the link boundary is found (PostgreSQL docs, "Message Flow"): every Query, Sync and
FunctionCall is answered by exactly one ReadyForQuery, in order, *except* a Sync the server
reads while in COPY-IN mode, which it ignores ("The backend will ignore Flush and Sync messages
received during copy-in mode"). So the state keeps the ordered list of what still owes a
ReadyForQuery, and when CopyInResponse arrives it works out which queued Syncs the server will
skip. When the bytes do not allow a certain answer the connection is marked `unpredictable`:
it stays with its client and is closed afterwards, never reused.
"""

from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Final

from pgproxy.core.params import TRACKED_STARTUP_PARAMS
from pgproxy.core.prepared import (
    TRACKED_BACKEND,
    Action,
    ClientStatements,
    Expected,
    ResponseTracker,
    ServerStatements,
    TrackerEvents,
    close_statement_message,
    plain_entry,
)
from pgproxy.core.session_state import SessionEffect, inspect
from pgproxy.core.stats import PoolStats
from pgproxy.wire import messages
from pgproxy.wire.codes import BackendCode, FrontendCode, TransactionStatus
from pgproxy.wire.scanner import Frame, MessageScanner

# Final ints: compiled, each is a C constant instead of a module lookup and an enum compare.
_Q: Final[int] = FrontendCode.QUERY
_S: Final[int] = FrontendCode.SYNC
_F: Final[int] = FrontendCode.FUNCTION_CALL
_E: Final[int] = FrontendCode.EXECUTE
_H: Final[int] = FrontendCode.FLUSH
_P: Final[int] = FrontendCode.PARSE
_B: Final[int] = FrontendCode.BIND
_X: Final[int] = FrontendCode.TERMINATE
_COPY_DONE: Final[int] = FrontendCode.COPY_DONE
_COPY_FAIL: Final[int] = FrontendCode.COPY_FAIL
_READY_FOR_QUERY: Final[int] = BackendCode.READY_FOR_QUERY
_PARAMETER_STATUS: Final[int] = BackendCode.PARAMETER_STATUS
_ERROR_RESPONSE: Final[int] = BackendCode.ERROR_RESPONSE
_COPY_IN_RESPONSE: Final[int] = BackendCode.COPY_IN_RESPONSE
_COPY_BOTH_RESPONSE: Final[int] = BackendCode.COPY_BOTH_RESPONSE
_IDLE: Final[int] = TransactionStatus.IDLE

# Queue entries: the frontend code, with the "segment" state of a Sync in the bits above.
# A segment is what the client sent since the previous entry; for COPY we need to know whether
# it holds exactly one Execute with nothing but Flush after it.
_SEG_EMPTY: Final = 0  # nothing, or only Flush
_SEG_PRE: Final = 1  # messages, but no Execute yet
_SEG_ONE_EXECUTE: Final = 2  # exactly one Execute, then at most Flush
_SEG_DIRTY: Final = 3  # anything else
_PROXY: Final = 0  # a query the proxy sent itself; its answers never reach the client

FRONTEND_WATCHED = frozenset(
    {
        FrontendCode.QUERY,
        FrontendCode.PARSE,
        FrontendCode.BIND,
        FrontendCode.DESCRIBE,
        FrontendCode.CLOSE,
        FrontendCode.EXECUTE,
        FrontendCode.SYNC,
        FrontendCode.FLUSH,
        FrontendCode.FUNCTION_CALL,
        FrontendCode.TERMINATE,
        FrontendCode.COPY_DONE,
        FrontendCode.COPY_FAIL,
    }
)
# Messages a client may send once logged in (PostgreSQL docs, "Message Formats"); anything
# else is refused by the proxy instead of costing a server connection.
FRONTEND_VALID = FRONTEND_WATCHED | {FrontendCode.COPY_DATA}

BACKEND_WATCHED = frozenset(
    {
        BackendCode.READY_FOR_QUERY,
        BackendCode.PARAMETER_STATUS,
        BackendCode.ERROR_RESPONSE,
        BackendCode.COPY_IN_RESPONSE,
        BackendCode.COPY_BOTH_RESPONSE,
    }
)


HOLD_CURSOR_PIN: Final = "WITH HOLD cursor"


class DisconnectReason(Enum):
    """Why a connection was closed; shared by logs, admin and metrics."""

    CLIENT_CLOSE = "client_close"
    CLIENT_TERMINATE = "client_terminate"
    SERVER_CLOSE = "server_close"
    SERVER_FATAL = "server_fatal"
    PROTOCOL_ERROR = "protocol_error"
    LOGIN_FAILED = "login_failed"
    LOGIN_TIMEOUT = "login_timeout"
    WAIT_TIMEOUT = "query_wait_timeout"
    IDLE_TRANSACTION_TIMEOUT = "idle_transaction_timeout"
    PIN_LIMIT = "max_pinned_servers"
    CONNECT_FAILED = "connect_failed"
    TOO_MANY_CLIENTS = "max_client_conn"
    DIRTY = "dirty"
    CLIENT_GONE_MID_QUERY = "client_gone_mid_query"
    RESET_FAILED = "reset_failed"
    IDLE_TIMEOUT = "server_idle_timeout"
    LIFETIME = "server_lifetime"
    SHUTDOWN = "shutdown"
    INTERNAL_ERROR = "internal_error"
    UNEXPECTED_DATA = "unexpected_data"
    CANCEL = "cancel_request"
    ADMIN_KILL = "admin_kill"
    TRANSACTION_TIMEOUT = "transaction_timeout"
    QUERY_TIMEOUT = "query_timeout"
    CLIENT_IDLE_TIMEOUT = "client_idle_timeout"
    CONFIG_CHANGED = "config_changed"
    CHECK_FAILED = "server_check_failed"


@dataclass(slots=True)
class ServerState:
    """The protocol state of one logged-in server connection."""

    id: int
    created_at: float
    backend_key: tuple[int, int] | None
    # ParameterStatus values as the server last reported them (canonical spelling).
    params: dict[str, str]
    # Settings the proxy applied with `build_prelude`, as the client spelled them.
    applied: dict[str, str] = field(default_factory=dict)
    transaction_status: int = TransactionStatus.IDLE
    last_used_at: float = 0.0
    # Entries that still owe a ReadyForQuery, oldest first.
    queue: deque[int] = field(default_factory=deque)
    # True while the head of `queue` is the proxy's own query: its output is swallowed.
    swallowing: bool = False
    # Set by `feed` when a ReadyForQuery emptied the queue; the shell reads and clears it.
    drained: bool = False
    # The server reads the client's COPY data now (CopyInResponse seen, CopyDone/Fail not yet).
    copy_in: bool = False
    # What the client sent since the last queue entry (see _SEG_*).
    segment: int = _SEG_EMPTY
    # The bytes no longer allow knowing when the server is done: never reuse it.
    unpredictable: bool = False
    # Why the connection must stay with its client until the client leaves (None: it need not).
    pinned: str | None = None
    # The server said FATAL: it is about to close.
    fatal: bool = False
    # A reported parameter that does not follow the client changed since login.
    untracked_param_changed: bool = False
    # Fields of an ErrorResponse to one of the proxy's own queries.
    proxy_error: dict[str, str] | None = None
    # ParameterStatus messages to send the client (client's view catching up after a prelude).
    outbox: list[bytes] = field(default_factory=list)
    # Tracked settings the statements in progress reset (RESET x; all of them after RESET ALL
    # or DISCARD ALL): their ParameterStatus shows the server's default, not the client's wish.
    resetting: frozenset[str] = frozenset()
    resetting_all: bool = False
    # ReadyForQuery messages until the statements that reset are done (then resetting ends).
    reset_depth: int = 0
    # The server's settings differ from the client's after a RESET: re-apply before the next
    # message outside a transaction.
    needs_prelude: bool = False
    # Plain SETs waiting for their ReadyForQuery: [answers still to come, (name, value)...].
    pending_sets: list[list[Any]] = field(default_factory=list)
    # WITH HOLD cursors open on this server (they outlive transactions: the client keeps it).
    hold_cursors: set[bytes] = field(default_factory=set)
    # Set when the server becomes pinned; read and cleared by the shell.
    new_pin: str | None = None
    # What executing each prepared statement (by the name sent to the server) does to the
    # session, for the few that reset settings or deallocate; and the one bound last.
    statement_effects: dict[bytes, SessionEffect] = field(default_factory=dict)
    bound_statement: bytes = b""
    # Body of the Parse that created the unnamed statement this server holds now (None: none).
    unnamed_parse: bytes | None = None
    # Named statements prepared on this server under the proxy's names (kept across clients).
    statements: ServerStatements = field(default_factory=ServerStatements)
    # While the link maps statement names: what the server owes, message by message (the
    # scanner then also reports every message that ends an answer).
    tracker: ResponseTracker | None = None
    # What the tracker reports from one chunk; emptied by the shell after each.
    tracker_events: TrackerEvents = field(default_factory=TrackerEvents)
    # The tracker of the previous link, kept for the next: one link per transaction.
    spare_tracker: ResponseTracker | None = None
    # A COPY started by the extended protocol under a tracker: its skipped Syncs cannot be
    # told apart, so the tracker would wait forever; such a link is failed.
    extended_copy: bool = False
    # The client this connection serves now, if any.
    client: "ClientView | None" = None
    # The pool's counters (None in unit tests that do not count), and when the query and
    # the transaction in progress began (see `mark_start`).
    stats: PoolStats | None = None
    query_started_at: float = 0.0
    transaction_started_at: float = 0.0
    scanner: MessageScanner = field(
        default_factory=lambda: MessageScanner(BACKEND_WATCHED, marked=TRACKED_BACKEND)
    )

    # -- link boundary -----------------------------------------------------------------------

    @property
    def is_idle(self) -> bool:
        """Nothing owed, not in a transaction, not mid-COPY: the server waits for a new query."""
        return (
            not self.queue
            and not self.copy_in
            and self.transaction_status == _IDLE
            and self.segment == _SEG_EMPTY
            and self.scanner.at_boundary
        )

    def is_clean(self, baseline: dict[str, str]) -> bool:
        """May this connection serve another client? `baseline`: the pool's welcome params.

        Settings the proxy tracks are replayed per client; any other reported parameter that
        differs from a fresh connection's (e.g. session_authorization) is leftover state.
        """
        if (
            not self.is_idle
            or self.unpredictable
            or self.pinned
            or self.fatal
            or self.proxy_error is not None
        ):
            return False
        if not self.untracked_param_changed:
            return True
        for name, value in self.params.items():
            if name.lower() in TRACKED_STARTUP_PARAMS:
                continue
            if baseline.get(name, value) != value:
                return False
        return True

    # -- frontend → server -------------------------------------------------------------------

    def note_frontend(self, msgs: list[tuple[int, bytes, int]]) -> None:
        """Account for watched client messages just forwarded to this server."""
        for code, body, _end in msgs:
            if self.copy_in:
                if code in (_S, _H):
                    continue  # ignored by the server in copy-in mode
                if code in (_COPY_DONE, _COPY_FAIL):
                    self.copy_in = False
                    continue
                # Any other message makes the server fail the COPY; from then on we cannot
                # tell which of the already queued Syncs it skipped.
                self.copy_in = False
                self.unpredictable = True
            if code in (_Q, _F):
                self.queue.append(code)
                self.segment = _SEG_EMPTY
                if code == _Q:
                    self.unnamed_parse = None  # a simple Query destroys the unnamed statement
                    effect = inspect(body)
                    if effect is not None:
                        queue = self.queue
                        quiet = self.transaction_status == _IDLE and all(
                            queue[i] == _PROXY for i in range(len(queue) - 1)
                        )
                        self._apply(effect, len(queue), quiet=quiet)
            elif code == _S:
                self.queue.append(_S | (self.segment << 8))
                self.segment = _SEG_EMPTY
            elif code == _E:
                self.segment = _SEG_ONE_EXECUTE if self.segment <= _SEG_PRE else _SEG_DIRTY
                if self.statement_effects:
                    effect = self.statement_effects.get(self.bound_statement)
                    if effect is not None:
                        # Answered by the ReadyForQuery of the next Sync, not queued yet.
                        self._apply(
                            SessionEffect(
                                resets=effect.resets,
                                reset_all=effect.reset_all,
                                deallocate_all=effect.deallocate_all,
                                closed_cursors=effect.closed_cursors,
                                close_all_cursors=effect.close_all_cursors,
                                sets=effect.sets,
                                pin=effect.pin,
                                hold_cursors=effect.hold_cursors,
                            ),
                            len(self.queue) + 1,
                            # The first Execute since the last Sync, nothing else pending.
                            quiet=self.segment == _SEG_ONE_EXECUTE
                            and self.transaction_status == _IDLE
                            and all(entry == _PROXY for entry in self.queue),
                        )
            elif code in (_H, _X):
                pass
            elif code in (_COPY_DONE, _COPY_FAIL):
                # Outside COPY the server ignores these; but if it may be about to enter COPY
                # (something is pending), this one would end that COPY early.
                if self.queue or self.segment != _SEG_EMPTY:
                    self.unpredictable = True
            else:
                if code == _P:
                    if body[:1] == b"\x00":
                        self.unnamed_parse = body
                    elif self.pinned is None and self.tracker is None:
                        # A named prepared statement lives on this server only (unless the
                        # proxy maps names: then the statement is the proxy's).
                        self._pin("named prepared statement")
                    name_end = body.find(b"\x00")
                    effect = inspect(body[name_end + 1 :])
                    if self.statement_effects:
                        # A new definition under this name (the unnamed one, above all).
                        self.statement_effects.pop(body[:name_end], None)
                    if effect is not None:
                        # A pin or a cursor is taken at once (when unsure, keep the server);
                        # what the statement sets, resets or closes happens when it runs.
                        if (effect.pin is not None and not effect.sets) or effect.hold_cursors:
                            self._apply(
                                SessionEffect(pin=effect.pin, hold_cursors=effect.hold_cursors), 0
                            )
                        if (
                            effect.sets
                            or effect.resets
                            or effect.reset_all
                            or effect.deallocate_all
                            or effect.closed_cursors
                            or effect.close_all_cursors
                            or effect.hold_cursors
                            or effect.pin
                        ):
                            self.statement_effects[body[:name_end]] = effect
                elif code == _B:
                    portal_end = body.find(b"\x00")
                    self.bound_statement = body[portal_end + 1 : body.find(b"\x00", portal_end + 1)]
                if self.segment == _SEG_ONE_EXECUTE:
                    self.segment = _SEG_DIRTY
                elif self.segment == _SEG_EMPTY:
                    self.segment = _SEG_PRE

    def _settle_sets(self) -> None:
        """A ReadyForQuery came: SETs whose statement is done now follow the client."""
        still = []
        for entry in self.pending_sets:
            entry[0] -= 1
            if entry[0] > 0:
                still.append(entry)
                continue
            for name, value in entry[1]:
                self.applied[name] = value
                if self.client is not None:
                    self.client.wanted[name] = value
        self.pending_sets = still

    def _pin(self, reason: str) -> None:
        if self.pinned is None:
            self.new_pin = reason  # the shell logs it and counts it, then clears it
        self.pinned = reason

    def start_tracking(self) -> ResponseTracker:
        """Track answers message by message (only where nothing is outstanding)."""
        assert not self.queue and self.scanner.at_boundary
        tracker = self.tracker = self.spare_tracker or ResponseTracker()
        self.spare_tracker = None
        self.scanner.marking = True
        return tracker

    def stop_tracking(self) -> bool:
        """End tracking at the end of a link; False if something was still owed (not clean)."""
        tracker = self.tracker
        if tracker is None:
            return True
        self.tracker = None
        self.scanner.marking = False
        if len(tracker):
            return False
        self.spare_tracker = tracker
        return True

    def _apply(self, effect: SessionEffect, depth: int, *, quiet: bool = False) -> None:
        """Account for what a statement does; `depth`: ReadyForQuery messages until it is done.

        `quiet`: it runs outside a transaction block with nothing of the client's before it,
        so a plain SET can be followed instead of pinning.
        """
        pin = effect.pin
        if effect.sets and quiet:
            self.pending_sets.append([depth, effect.sets])
            pin = None
        if pin is not None and (self.pinned is None or self.pinned == HOLD_CURSOR_PIN):
            self._pin(pin)
            if effect.pin == "LOAD":
                self.unpredictable = True  # a loaded library cannot be unloaded: close it later
        if effect.close_all_cursors:
            self.hold_cursors.clear()
        elif effect.closed_cursors:
            self.hold_cursors -= effect.closed_cursors
        if effect.hold_cursors:
            self.hold_cursors |= effect.hold_cursors
        if self.pinned is None and self.hold_cursors:
            self._pin(HOLD_CURSOR_PIN)
        elif self.pinned == HOLD_CURSOR_PIN and not self.hold_cursors:
            # Every WITH HOLD cursor is closed: no state is left, the server may go back.
            self.pinned = None
        if effect.deallocate_all:
            self.statements.clear()
            self.statement_effects.clear()
            if self.client is not None:
                self.client.statements.clear()
        if not effect.resets and not effect.reset_all:
            return
        # The server goes back to its defaults; the client expects its startup values.
        client = self.client
        if effect.reset_all:
            self.applied.clear()
            self.resetting_all = True
            if client is not None:
                client.wanted.clear()
                client.wanted.update(client.startup)
        else:
            for name in effect.resets:
                self.applied.pop(name, None)
                if client is not None:
                    if name in client.startup:
                        client.wanted[name] = client.startup[name]
                    else:
                        client.wanted.pop(name, None)
            self.resetting |= effect.resets
        self.reset_depth = depth
        self.needs_prelude = True

    def send_proxy_query(self, sql: str) -> bytes:
        """A Query message of the proxy's own; everything it produces is kept from the client.

        Only when the server owes the client nothing: swallowing starts at a chunk boundary.
        """
        self.unnamed_parse = None
        if self.tracker is not None:
            self.tracker.expect(plain_entry(_Q, Action.SWALLOW))
        return self.send_proxy_messages(messages.query(sql))

    def send_proxy_messages(self, raw: bytes) -> bytes:
        """Like `send_proxy_query` for ready-made messages answered by one ReadyForQuery."""
        assert all(entry == _PROXY for entry in self.queue)
        self.queue.append(_PROXY)
        if len(self.queue) == 1:
            self.swallowing = True
        return raw

    def replay_unnamed_parse(self, body: bytes) -> bytes:
        """Parse + Sync recreating a client's unnamed statement here; the answers are swallowed."""
        self.unnamed_parse = body
        if self.tracker is not None:
            self.tracker.expect(plain_entry(_P, Action.SWALLOW))
            self.tracker.expect(plain_entry(_S, Action.SWALLOW))
        return self.send_proxy_messages(
            b"P" + (len(body) + 4).to_bytes(4, "big") + body + messages.sync()
        )

    def close_statements(self, names: list[bytes]) -> bytes:
        """Close + Sync for statements evicted from this server (answers swallowed)."""
        raw = b"".join([close_statement_message(name) for name in names]) + messages.sync()
        if self.tracker is not None:
            for name in names:
                self.tracker.expect(Expected(FrontendCode.CLOSE, Action.SWALLOW, statement=name))
            self.tracker.expect(plain_entry(_S, Action.SWALLOW))
        return self.send_proxy_messages(raw)

    # -- server → frontend -------------------------------------------------------------------

    def mark_start(self, now: float) -> None:
        """Before client messages go: if the server owed the client nothing, a query starts.

        (Only the proxy's own queries, a prelude say, may be ahead of it.)
        """
        if self.segment != _SEG_EMPTY or (
            self.queue and any(entry != _PROXY for entry in self.queue)
        ):
            return
        self.query_started_at = now
        if self.transaction_status == _IDLE:
            self.transaction_started_at = now

    def feed(self, data: bytes, frames: list[Frame] | None = None, now: float = 0.0) -> int:
        """Account for bytes from the server; return the offset where the client's bytes start.

        `frames`: what `scanner` made of `data` already, if the caller scanned it (to give the
        tracker); `now` times the queries and transactions it ends, when counting. When
        `swallowing` is false on entry the caller has already forwarded the whole chunk (the
        fast path) and the result is 0. Otherwise bytes up to the ReadyForQuery that ends the
        proxy's own query are withheld.
        """
        start = len(data) if self.swallowing else 0
        if frames is None:
            frames = self.scanner.feed(data)
        for code, body, end in frames:
            if code == _READY_FOR_QUERY:
                self.transaction_status = body[0] if body else _IDLE
                if not self.queue:
                    self.unpredictable = True
                    continue
                head = self.queue.popleft()
                stats = self.stats
                if stats is not None and head != _PROXY:
                    stats.queries += 1
                    stats.query_time.observe(now - self.query_started_at)
                    self.query_started_at = now  # the next one queued runs from here
                    if self.transaction_status == _IDLE:
                        stats.transactions += 1
                        stats.transaction_time.observe(now - self.transaction_started_at)
                        self.transaction_started_at = now
                if self.pending_sets:
                    self._settle_sets()
                if self.reset_depth:
                    self.reset_depth -= 1
                    if not self.reset_depth:
                        self.resetting_all = False
                        self.resetting = frozenset()
                if head == _PROXY:
                    self.swallowing = bool(self.queue) and self.queue[0] == _PROXY
                    if not self.swallowing:
                        start = end
                        self._catch_up_client()
                elif self.queue and self.queue[0] == _PROXY:
                    self.swallowing = True
                if not self.queue:
                    self.drained = True
            elif code == _PARAMETER_STATUS:
                name, value = messages.parse_parameter_status(body)
                self.params[name] = value
                key = _tracked_key(name)
                if key is None:
                    self.untracked_param_changed = True
                client = self.client
                if client is not None and not self.swallowing:
                    # The client saw this message: its view and its wishes follow the server.
                    client.reported[name] = value
                following = key is not None and not self.resetting_all and key not in self.resetting
                if key is not None and following:
                    if client is None:
                        # The proxy's ROLLBACK for a client that left reverted its SET: only
                        # what the server has now changes.
                        self.applied[key] = value
                    elif not self.swallowing:
                        client.wanted[key] = value
                        self.applied[key] = value
                elif (
                    key is not None
                    and client is not None
                    and not self.swallowing
                    and client.wanted.get(key, value) != value
                ):
                    # A RESET showed the client the server's default, not its startup value:
                    # it is told again before anything more reaches it (`catch_up`).
                    client.stale = True
            elif code == _ERROR_RESPONSE:
                fields = messages.parse_fields(body)
                if fields.get("V", fields.get("S")) in ("FATAL", "PANIC"):
                    self.fatal = True
                if self.swallowing:
                    self.proxy_error = fields
                elif self.stats is not None:
                    self.stats.count_error(fields.get("C", "XX000"))
                self.copy_in = False
                # A SET of the statement group that failed (or was skipped) changed nothing.
                self.pending_sets = [e for e in self.pending_sets if e[0] > 1]
            elif code == _COPY_IN_RESPONSE:
                self._enter_copy_in()
            elif code == _COPY_BOTH_RESPONSE:  # replication only, never expected
                self.unpredictable = True
            # Anything else was marked for the tracker only.
        return start

    def _enter_copy_in(self) -> None:
        queue = self.queue
        if not queue:
            # Extended protocol with no Sync sent yet: the segment holds the COPY's Execute.
            if self.segment != _SEG_ONE_EXECUTE:
                self.unpredictable = True
            self.segment = _SEG_EMPTY
            self.copy_in = True
            return
        head = queue[0]
        if head == _Q:
            self.copy_in = True
            if len(queue) > 1 or self.segment != _SEG_EMPTY:
                self.unpredictable = True  # pipelined past a COPY: the server aborts the COPY
            return
        if head & 0xFF != _S or head >> 8 != _SEG_ONE_EXECUTE:
            self.unpredictable = True
            self.copy_in = True
            return
        # The queued Sync came right after the COPY's Execute: the server will skip it, and
        # any Sync queued after it with nothing in between.
        self.extended_copy = True
        queue.popleft()
        while queue and queue[0] == _S | (_SEG_EMPTY << 8):
            queue.popleft()
        if queue or self.segment != _SEG_EMPTY:
            self.unpredictable = True
        self.copy_in = True

    def _catch_up_client(self) -> None:
        """After a prelude, tell the client the server's canonical spelling of its settings."""
        client = self.client
        if client is not None:
            self.outbox.extend(self.catch_up(client))

    def catch_up(self, client: "ClientView") -> list[bytes]:
        """ParameterStatus messages for what `client` was told otherwise than this server,
        which has the client's settings applied, says now."""
        client.stale = False
        reported = client.reported
        out = []
        for name, value in self.params.items():
            if reported.get(name) != value:
                reported[name] = value
                out.append(messages.parameter_status(name, value))
        return out

    def expect_nothing(self) -> bool:
        """True when the server owes nothing and waits for input (safe to write to or close)."""
        return not self.queue and not self.copy_in


def _tracked_key(name: str) -> str | None:
    """The `wanted` key of a reported parameter that follows the client, else None."""
    return name if name.lower() in TRACKED_STARTUP_PARAMS else None


class ClientView:
    """What a server connection needs to know of the client it serves (its session view)."""

    __slots__ = ("reported", "stale", "startup", "statements", "wanted")

    def __init__(self, wanted: dict[str, str], reported: dict[str, str]) -> None:
        # Told a value of a setting it did not ask for (by a RESET): see `ServerState.catch_up`.
        self.stale = False
        # The client's named prepared statements (its names → the proxy's).
        self.statements = ClientStatements()
        # The settings of the client's startup packet: what RESET returns to.
        self.startup = dict(wanted)
        # Settings the client asked for (startup values, then its own SETs of reported ones).
        self.wanted = wanted
        # ParameterStatus values the client has been told.
        self.reported = reported
