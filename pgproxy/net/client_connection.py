"""`ClientConnection`: the asyncio protocol of one client, fed to `ClientLogin`/`ClientState`.

Data path: client bytes go to the linked server as received (one write per chunk); while no
server is linked they are held and reading pauses until the pool hands one over. What to do
with a server when the client is done with it is the proxy's decision (`Proxy.checkin`).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from typing import TYPE_CHECKING, Final, cast

from pgproxy.core.client import ClientPhase, ClientState, uses_unnamed_statement_first
from pgproxy.core.login import (
    Authenticated,
    CancelRequested,
    ClientLogin,
    LoginEvent,
    LookupUser,
    Send,
    StartTls,
)
from pgproxy.core.params import build_prelude
from pgproxy.core.prepared import (
    CLOSE_COMPLETE,
    PARSE_COMPLETE,
    Rewriter,
    TrackerEvents,
    close_target,
    split_parse,
    statement_name,
)
from pgproxy.core.server import HOLD_CURSOR_PIN, DisconnectReason, ServerState
from pgproxy.errors import PgProxyError, ServerError, Severity, TooManyClientsError
from pgproxy.net.flow import GateReason, ReadGate
from pgproxy.net.handoff import checkin, idle_server_for, request_server
from pgproxy.net.tcp import set_keepalive
from pgproxy.net.tls import peer_common_name
from pgproxy.wire import messages
from pgproxy.wire.codes import SSL_REQUEST_CODE, FrontendCode, SqlState, TransactionStatus

if TYPE_CHECKING:
    from pgproxy.admin import AdminSession
    from pgproxy.core.pool import Pool
    from pgproxy.core.stats import PoolStats
    from pgproxy.net.server_connection import ServerConnection
    from pgproxy.proxy import Proxy

log = logging.getLogger("pgproxy.client")
# A C static when compiled: no module dict lookup per call on the data path.
monotonic: Final = time.monotonic

# Seconds a closed client gets to read what is still buffered for it (its last error, the
# rest of a result) before the connection is cut.
CLOSE_FLUSH_TIMEOUT: Final = 2.0
# Seconds a client refused over the limit gets to send its startup packet (to read why).
OVER_LIMIT_WAIT: Final = 1.0

# Final: compiled, C constants instead of a module lookup and an enum compare per use.
_PARSE: Final[int] = FrontendCode.PARSE
_CLOSE: Final[int] = FrontendCode.CLOSE
_SYNC: Final[int] = FrontendCode.SYNC
_FLUSH: Final[int] = FrontendCode.FLUSH
_IDLE: Final[int] = TransactionStatus.IDLE


class ClientConnection(asyncio.Protocol):
    __slots__ = (
        "_abort_timer",
        "_login",
        "_login_timer",
        "_over_limit",
        "address",
        "admin",
        "application_name",
        "cancel_key",
        "closed",
        "connected_at",
        "gate",
        "id",
        "idle_in_transaction_since",
        "linked_at",
        "notices",
        "pool",
        "proxy",
        "released_at",
        "server",
        "state",
        "stats",
        "transport",
        "write_paused",
    )

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.id = proxy.next_id()
        self.transport: asyncio.Transport | None = None
        self.gate: ReadGate | None = None
        self.address = "?"
        self._login: ClientLogin | None = None
        self._login_timer: asyncio.TimerHandle | None = None
        self._abort_timer: asyncio.TimerHandle | None = None
        self._over_limit = False
        self.state: ClientState | None = None
        # The admin console session, for a client of the virtual database (no pool then).
        self.admin: AdminSession | None = None
        self.pool: Pool[ServerConnection, ClientConnection] | None = None
        # The pool's counters, once logged in (None before, and for the admin console).
        self.stats: PoolStats | None = None
        self.server: ServerConnection | None = None
        self.cancel_key: tuple[int, int] | None = None
        self.application_name = ""
        self.write_paused = False
        self.closed = False
        # Set while the client holds a server inside a transaction and has nothing running.
        self.idle_in_transaction_since: float | None = None
        self.connected_at = proxy.now()
        # When the client got its current server (meaningful while `server` is set), and
        # when it last gave one back (or logged in): client_idle_timeout counts from there.
        self.linked_at = 0.0
        self.released_at = self.connected_at
        # The watchdog's one-per-episode warnings: kind → the episode's start it was sent for.
        self.notices: dict[str, float] = {}

    def __repr__(self) -> str:
        return f"C-{self.id}"

    # -- asyncio callbacks -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCP transports implement asyncio.Transport without subclassing it.
        self.transport = transport = cast(asyncio.Transport, transport)
        self.gate = ReadGate(transport)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self.address = f"{peer[0]}:{peer[1]}"
        elif peer:
            self.address = str(peer)
        elif transport.get_extra_info("sockname"):
            self.address = "unix socket"  # a Unix-domain peer has no name
        self._over_limit = not self.proxy.client_connected(self)
        if not self._over_limit:
            self._login = self.proxy.new_client_login()
            set_keepalive(transport, self.proxy.settings)
        timeout = self.proxy.settings.client_login_timeout
        if self._over_limit:
            # Refused anyway: a silent one must not hold its descriptor for a whole login
            # timeout (a flood of them would eat the ones kept for server connections).
            self._login_timer = asyncio.get_running_loop().call_later(
                OVER_LIMIT_WAIT, transport.abort
            )
        elif timeout > 0:
            self._login_timer = asyncio.get_running_loop().call_later(timeout, self._login_expired)

    def data_received(self, data: bytes) -> None:
        try:
            if self.admin is not None:
                self.admin.feed(data)
            elif self.state is not None:
                self._feed_session(data)
            elif self._over_limit:
                self._refuse_over_limit(data)
            elif self._login is not None:
                self._feed_login(data)
        except PgProxyError as exc:
            self.fail(exc)
        except Exception:
            log.exception("%r: internal error; closing", self)
            self.fail(PgProxyError("pgproxy internal error"))

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            self.closed = True
            if self._login_timer is not None:
                self._login_timer.cancel()
            if self._abort_timer is not None:
                self._abort_timer.cancel()
                self._abort_timer = None
            self.proxy.client_lost(self)
        except Exception:
            log.exception("%r: internal error in connection_lost", self)

    def pause_writing(self) -> None:
        self.write_paused = True
        server = self.server
        if server is not None and server.gate is not None:
            server.gate.add(GateReason.PEER_BACKLOG)

    def resume_writing(self) -> None:
        self.write_paused = False
        server = self.server
        if server is not None and server.gate is not None:
            server.gate.discard(GateReason.PEER_BACKLOG)

    # -- login -------------------------------------------------------------------------------

    def _refuse_over_limit(self, data: bytes) -> None:
        # Answer like Postgres does when full: after reading the startup packet, so that the
        # client reads the error instead of a reset. An SSLRequest first gets 'N'.
        if len(data) == 8 and int.from_bytes(data[4:8], "big") == SSL_REQUEST_CODE:
            self.write(b"N")
            return
        self.fail(
            TooManyClientsError(f"no more connections allowed ({self.proxy.client_limit_text()})"),
            reason=DisconnectReason.TOO_MANY_CLIENTS,
        )

    def _feed_login(self, data: bytes) -> None:
        login = self._login
        assert login is not None
        try:
            self._handle_login_events(login.feed(data))
        except PgProxyError as exc:
            self._login_failed(login, exc)

    def _login_failed(self, login: ClientLogin, exc: PgProxyError) -> None:
        """Counted, logged with who and from where (brute force shows), then FATAL."""
        log.warning(
            "login failed for user=%s database=%s from %s: %s",
            login.user or "-",
            login.database or "-",
            self.address,
            exc.message,
        )
        self.proxy.count_login_failure(login.database, login.user)
        self.fail(exc, reason=DisconnectReason.LOGIN_FAILED)

    def _handle_login_events(self, events: list[LoginEvent]) -> None:
        for event in events:
            if isinstance(event, Send):
                self.write(event.data)
            elif isinstance(event, StartTls):
                self._start_tls()
                return
            elif isinstance(event, LookupUser):
                self.proxy.spawn(self._look_up(event.user))
                return
            elif isinstance(event, CancelRequested):
                self.proxy.cancel(event.pid, event.secret)
                self.close(DisconnectReason.CANCEL)
                return
            elif isinstance(event, Authenticated):
                self._login = None
                self.proxy.client_authenticated(self, event)
                return
            else:  # Closed: Terminate during login
                self.close(DisconnectReason.CLIENT_TERMINATE)
                return

    def _start_tls(self) -> None:
        transport = self.transport
        context = self.proxy.client_tls
        assert transport is not None and context is not None
        # Nothing may be read in the clear between the 'S' and the handshake.
        transport.pause_reading()
        transport.write(b"S")
        self.proxy.spawn(self._handshake(transport, context))

    async def _handshake(self, transport: asyncio.Transport, context: ssl.SSLContext) -> None:
        loop = asyncio.get_running_loop()
        timeout = self.proxy.settings.client_login_timeout or None
        try:
            tls = await loop.start_tls(
                transport, self, context, server_side=True, ssl_handshake_timeout=timeout
            )
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            log.warning("TLS handshake with %s failed: %s", self.address, exc)
            self.proxy.count_login_failure()
            if not transport.is_closing():
                transport.abort()
            return
        if tls is None or self.closed or self._login is None:
            if tls is not None:
                tls.abort()
            return
        self.transport = tls
        self.gate = ReadGate(tls)
        cert = tls.get_extra_info("peercert")
        try:
            self._login.tls_started(peer_common_name(cert))
        except PgProxyError as exc:
            self.fail(exc, reason=DisconnectReason.LOGIN_FAILED)

    async def _look_up(self, user: str) -> None:
        cache = self.proxy.auth_cache
        assert cache is not None
        try:
            auth = await cache.fetch(user)
        except PgProxyError as exc:
            if not self.closed:
                self.proxy.count_login_failure()
                self.fail(
                    PgProxyError(
                        "could not look up the password of this user (auth_query); see the "
                        "pgproxy log",
                        sqlstate=exc.sqlstate,
                    ),
                    reason=DisconnectReason.LOGIN_FAILED,
                )
            return
        login = self._login
        if self.closed or login is None:
            return
        try:
            self._handle_login_events(login.user_found(auth))
        except PgProxyError as exc:
            self._login_failed(login, exc)

    def start_session(self, state: ClientState, cancel_key: tuple[int, int]) -> None:
        """Login is accepted: the pool knows the server's parameters."""
        self.state = state
        self.cancel_key = cancel_key
        self.application_name = state.view.wanted.get("application_name", "")
        if self._login_timer is not None:
            self._login_timer.cancel()
            self._login_timer = None

    def finish_login(self, welcome: dict[str, str], leftover: bytes) -> None:
        """Send AuthenticationOk, the session's parameters, its key and ReadyForQuery."""
        st = self.state
        assert st is not None and self.cancel_key is not None
        reported = dict(welcome)
        for name, value in st.view.wanted.items():
            if name in reported:
                reported[name] = value
        st.view.reported.update(reported)
        parts = [messages.authentication_ok()]
        parts.extend(messages.parameter_status(k, v) for k, v in reported.items())
        parts.append(messages.backend_key_data(*self.cancel_key))
        parts.append(messages.ready_for_query(TransactionStatus.IDLE))
        self.write(b"".join(parts))
        if self.gate is not None:
            self.gate.discard(GateReason.WAITING_FOR_SERVER)
        if leftover:
            if self.admin is not None:
                self.admin.feed(leftover)
            else:
                self._feed_session(leftover)

    def _login_expired(self) -> None:
        self._login_timer = None
        if self.state is None and not self.closed:
            self.proxy.count_login_failure()
            self.fail(
                PgProxyError(
                    "client_login_timeout "
                    f"({self.proxy.settings.client_login_timeout:g} s) expired during login",
                    sqlstate="08006",
                ),
                reason=DisconnectReason.LOGIN_TIMEOUT,
            )

    # -- session -----------------------------------------------------------------------------

    def _feed_session(self, data: bytes) -> None:
        st = self.state
        assert st is not None
        stats = self.stats
        if stats is not None:
            stats.received += len(data)
        # Only a linked client's boundary matters below (and it must be read before feed).
        was_at_boundary = self.server is not None and st.at_boundary
        out, msgs = st.feed(data)
        if self.idle_in_transaction_since is not None:
            self.idle_in_transaction_since = None
            self.proxy.idle_in_transaction.pop(self, None)
        server = self.server
        if server is not None:
            sst = server.state
            assert sst is not None
            prefix = b""
            start_mapping = st.rewriter is None and st.uses_named
            if (start_mapping or sst.needs_prelude) and (
                # Only at a quiet moment: nothing owed, no half message either way.
                was_at_boundary and sst.expect_nothing() and sst.scanner.at_boundary
            ):
                if start_mapping and self._may_map(sst):
                    self._start_mapping(sst)
                if sst.needs_prelude and out and sst.transaction_status == _IDLE:
                    # A RESET left the server with its defaults; the client expects its own.
                    prefix = self._prepare(sst, msgs)
            self._forward(server, sst, prefix, out, msgs)
        elif st.pending or not out:
            if st.hold(out, msgs, monotonic()):
                request_server(self.proxy, self)
            if self.server is None and st.pending and not self.closed:
                # More while it waits (a pipeline, a COPY): stop reading, so that held bytes
                # stay two chunks at most.
                assert self.gate is not None
                self.gate.add(GateReason.WAITING_FOR_SERVER)
        elif self._answer_without_server(out, msgs):
            pass
        elif (server := idle_server_for(self.proxy, self)) is not None:
            # The common case in transaction mode: a server is free, nothing waits before
            # us; serve the chunk on it at once, without holding it first.
            self.link(server, out, msgs)
        elif st.hold(out, msgs, monotonic()):
            # No server free: the client waits for one, and reading goes on. A client rarely
            # sends more before its answer, and pausing then resuming would change the epoll
            # set twice per transaction; a second chunk pauses it (above).
            request_server(self.proxy, self)
        if st.terminated:
            self.close(DisconnectReason.CLIENT_TERMINATE)

    def link(
        self,
        server: ServerConnection,
        data: bytes | None = None,
        msgs: list[tuple[int, bytes, int]] | None = None,
    ) -> None:
        """Serve this client's held bytes (or `data`, not held) on `server`, after applying
        its settings there."""
        st = self.state
        sst = server.state
        assert st is not None and sst is not None and self.gate is not None
        assert server.gate is not None
        self.server = server
        server.client = self
        sst.client = st.view
        now = sst.last_used_at = self.linked_at = monotonic()
        stats = self.stats
        if stats is not None:
            if st.phase is ClientPhase.WAITING:
                stats.wait_time.observe(now - st.waiting_since)
            else:
                stats.wait_time.observe_nothing()
        st.phase = ClientPhase.ACTIVE
        if data is None or msgs is None:
            data, msgs = st.take_pending()
        if st.uses_named and self._may_map(sst):
            self._start_mapping(sst)
        prefix = b""
        evicted = sst.statements.overflow()
        if evicted:
            prefix = sst.close_statements(evicted)
            assert self.pool is not None
            self.pool.statement_counts.evictions += len(evicted)
        prefix += self._prepare(sst, msgs)
        self._forward(server, sst, prefix, data, msgs)
        if self.write_paused:
            server.gate.add(GateReason.PEER_BACKLOG)
        if server.write_paused:
            self.gate.add(GateReason.PEER_BACKLOG)
        self.gate.discard(GateReason.WAITING_FOR_SERVER)

    def _answer_without_server(self, data: bytes, msgs: list[tuple[int, bytes, int]]) -> bool:
        """Answer Parse/Close of named statements + Sync here, if the pool knows them.

        A driver that prepares in a round trip of its own (pgbench -M prepared, PQprepare)
        then needs no server for it: waiting for one there can deadlock a client program that
        prepares synchronously while another of its connections holds the server in a
        transaction. The statement is prepared on demand when the client binds it.
        """
        st = self.state
        pool = self.pool
        if (
            not data
            or not msgs  # CopyData only: the rest of a COPY the server already failed
            or msgs[-1][0] != _SYNC  # the cheap tests first: this runs for most chunks
            or not self.proxy.maps_statements
            or pool is None
            or st is None
            or not st.at_boundary
        ):
            return False
        known = pool.known_statements
        replies = []
        for code, body, _end in msgs:
            if code == _PARSE:
                if body[:1] == b"\x00":
                    return False  # the unnamed statement is the server's business
                name, definition = split_parse(body)
                if not name or statement_name(definition) not in known:
                    return False
            elif code == _CLOSE:
                if body[:1] != b"S" or body[1:2] == b"\x00":
                    return False
            elif code not in (_SYNC, _FLUSH):
                return False
        # Every message is answerable: only now change the client's names.
        for code, body, _end in msgs:
            if code == _PARSE:
                name, definition = split_parse(body)
                st.statements.define(name, definition)
                pool.statement_counts.hits += 1
                replies.append(PARSE_COMPLETE)
            elif code == _CLOSE:
                st.statements.forget(close_target(body))
                replies.append(CLOSE_COMPLETE)
            elif code == _SYNC:
                replies.append(messages.ready_for_query(TransactionStatus.IDLE))
        self.write(b"".join(replies))
        return True

    def _may_map(self, sst: ServerState) -> bool:
        """Can this link map statement names? (Transaction mode; server not pinned to us.)"""
        return (
            self.proxy.maps_statements
            and sst.pinned in (None, HOLD_CURSOR_PIN)
            and sst.segment == 0
        )

    def _start_mapping(self, sst: ServerState) -> None:
        st = self.state
        assert st is not None
        assert self.pool is not None
        tracker = sst.start_tracking()
        st.rewriter = Rewriter(st.statements, sst.statements, tracker, self.pool.statement_counts)

    def _forward(
        self,
        server: ServerConnection,
        sst: ServerState,
        prefix: bytes,
        data: bytes,
        msgs: list[tuple[int, bytes, int]],
    ) -> None:
        """Send the proxy's `prefix`, then the client's `data` (names mapped when mapping)."""
        st = self.state
        assert st is not None
        rewriter = st.rewriter
        tracker = sst.tracker
        if rewriter is not None and tracker is not None:
            assert self.pool is not None
            data, msgs = rewriter.feed(data)
        if msgs:
            if sst.segment == 0:
                sst.mark_start(monotonic())
            # Accounted before the bytes go: a pin past the limit must not run at all.
            sst.note_frontend(msgs)
            if sst.new_pin is not None and not self._allow_pin(server, sst.new_pin):
                return
        out = prefix + data if prefix else data
        if out:
            server.write(out)
        if tracker is not None:
            fakes = tracker.take_fakes()
            if fakes:
                self.write(fakes)

    def _allow_pin(self, server: ServerConnection, reason: str) -> bool:
        """Log and count a new pin; refuse it (and close this client) past max_pinned_servers."""
        sst = server.state
        pool = self.pool
        assert sst is not None and pool is not None
        sst.new_pin = None
        if not self.proxy.releases_after_transaction:
            return True  # session mode: every client keeps its server anyway
        if reason != HOLD_CURSOR_PIN:
            limit = self.proxy.settings.max_pinned_servers or max(pool.size - 1, 1)
            pinned = sum(
                1
                for s in pool.active
                if s.state is not None
                and s.state.pinned is not None
                and s.state.pinned != HOLD_CURSOR_PIN
            )
            if pinned > limit:
                log.warning(
                    "%r refused a pin (%s): %d of pool %s's servers are pinned already",
                    self,
                    reason,
                    pinned - 1,
                    pool.key,
                )
                # Nothing was sent; the server's state counts it as sent: close it, unused.
                sst.unpredictable = True
                self.fail(
                    PgProxyError(
                        f"too many pinned server connections in pool {pool.key} "
                        f"(max_pinned_servers {limit}): {reason} would keep one more",
                        sqlstate=SqlState.INSUFFICIENT_RESOURCES,
                        hint="Use session pool_mode for clients that keep session state, "
                        "or raise max_pinned_servers.",
                    ),
                    reason=DisconnectReason.PIN_LIMIT,
                )
                return False
        # Once per pin: the client keeps this server until the state is gone.
        log.info("%r pinned to %r: %s", self, server, reason)
        self.proxy.pins_total += 1
        pool.stats.pins += 1
        return True

    def statement_events(self, sst: ServerState, events: TrackerEvents) -> None:
        """Keep the names true after the server confirmed, refused or skipped Parses."""
        st = self.state
        assert st is not None
        for server_name, client_name in events.failed:
            sst.statements.discard(server_name)
            entry = st.statements.lookup(client_name) if client_name else None
            if entry is not None and entry[1] == server_name:
                st.statements.forget(client_name)
        for client_name in events.unanswered:
            st.statements.forget(client_name)
        for server_name in events.not_closed:
            sst.statements.add(server_name)

    def _prepare(self, sst: ServerState, msgs: list[tuple[int, bytes, int]]) -> bytes:
        """The proxy's own messages that must precede `msgs` on this server, if any.

        The client's settings (the prelude), then its unnamed statement when `msgs` use it
        before parsing their own (the prelude's Query would have destroyed it anyway).
        """
        st = self.state
        assert st is not None
        sst.needs_prelude = False
        prefix = b""
        prelude = build_prelude(st.view.wanted, sst.applied)
        if prelude is not None:
            sst.applied = dict(st.view.wanted)
            prefix = sst.send_proxy_query(prelude)  # its answer ends with the catch-up
        elif st.view.stale:
            # Nothing of the server's is on its way to the client: a message boundary.
            self.write(b"".join(sst.catch_up(st.view)))
        replay = st.last_unnamed_parse
        if (
            replay is not None
            and sst.unnamed_parse != replay
            and uses_unnamed_statement_first(msgs)
        ):
            prefix += sst.replay_unnamed_parse(replay)
        return prefix

    def unlink(self) -> ServerConnection | None:
        server = self.server
        if server is None:
            return None
        self.server = None
        self.released_at = monotonic()
        server.client = None
        if server.state is not None:
            server.state.client = None
            if not server.state.stop_tracking():
                server.state.unpredictable = True  # answers still owed: never reuse it
        if self.state is not None:
            self.state.rewriter = None
        if server.gate is not None:
            server.gate.discard(GateReason.PEER_BACKLOG)
        if self.gate is not None:
            self.gate.discard(GateReason.PEER_BACKLOG)
        if self.state is not None:
            self.state.phase = ClientPhase.IDLE
        return server

    def server_drained(self) -> None:
        """The linked server answered everything it was sent."""
        server = self.server
        st = self.state
        assert server is not None and server.state is not None and st is not None
        sst = server.state
        at_rest = sst.is_idle and st.at_boundary
        if at_rest and self.proxy.draining:
            # Shutting down: the transaction is over, in either pool mode; the server is
            # cleaned up by client_lost like any other.
            self.fail(self.proxy.shutdown_error(), reason=DisconnectReason.SHUTDOWN)
            return
        if (
            at_rest
            and self.proxy.releases_after_transaction
            and sst.pinned is None
            and not sst.unpredictable
        ):
            self.unlink()
            checkin(self.proxy, server)
            return
        if sst.transaction_status != _IDLE:
            now = monotonic()
            self.idle_in_transaction_since = now
            self.proxy.idle_in_transaction[self] = now

    def prelude_failed(self, fields: dict[str, str]) -> None:
        """The proxy's own preparation of this server for the client failed.

        Either applying its startup settings (which a direct connection would have refused at
        login) or re-creating its unnamed statement (its table is gone, for instance).
        """
        err = ServerError(fields)
        err.severity = Severity.FATAL
        self.fail(err)

    # -- output and closing ------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)
            stats = self.stats
            if stats is not None:
                stats.sent += len(data)

    @property
    def mid_message(self) -> bool:
        """A server's message is half forwarded to this client: nothing of ours may go in."""
        server = self.server
        return (
            server is not None and server.state is not None and not server.state.scanner.at_boundary
        )

    def fail(
        self,
        exc: PgProxyError,
        *,
        reason: DisconnectReason | None = None,
        mid_message: bool | None = None,
    ) -> None:
        """Send an ErrorResponse; a FATAL one also closes the connection.

        In the middle of a forwarded message (`mid_message`, default: now) the error would
        land inside it and corrupt it: the connection is closed without it instead."""
        if self.stats is not None and not self.closed:
            self.stats.count_error(exc.sqlstate)
        if self.mid_message if mid_message is None else mid_message:
            self.close(reason or DisconnectReason.PROTOCOL_ERROR, detail=exc.message)
            return
        self.write(messages.error_from_exception(exc))
        if exc.severity == Severity.FATAL:
            if reason is None:
                reason = DisconnectReason.PROTOCOL_ERROR
                if exc.sqlstate.startswith("08"):
                    reason = DisconnectReason.CONNECT_FAILED
            self.close(reason, detail=exc.message)

    def close_admin_session(self) -> None:
        """The admin console's client said Terminate (or SHUTDOWN closed it)."""
        self.close(DisconnectReason.CLIENT_TERMINATE)

    def close(self, reason: DisconnectReason, detail: str = "") -> None:
        if self.closed:
            return
        self.closed = True
        self.proxy.note_client_close_reason(self, reason, detail)
        transport = self.transport
        if transport is not None:
            transport.close()
            if transport.get_write_buffer_size():
                # close() waits for the buffer to drain: a client that never reads would
                # keep the connection, and the server linked to it, forever.
                self._abort_timer = asyncio.get_running_loop().call_later(
                    CLOSE_FLUSH_TIMEOUT, transport.abort
                )
