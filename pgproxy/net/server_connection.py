"""`ServerConnection`: the asyncio protocol of one connection to Postgres, fed to `ServerState`.

Data path: bytes from the server go to the linked client first, as received, then the state
looks at them. The proxy's own queries (session prelude, rollback, reset) are the only case
where bytes are withheld. Decisions about where the connection goes next are the proxy's.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Final, cast

from pgproxy.core.prepared import ServerStatements
from pgproxy.core.server import DisconnectReason, ServerState
from pgproxy.core.server_login import ServerLogin
from pgproxy.errors import (
    BackendUnavailableError,
    FeatureNotSupportedError,
    PgProxyError,
    ProtocolError,
)
from pgproxy.net.flow import GateReason, ReadGate
from pgproxy.net.tcp import set_keepalive

if TYPE_CHECKING:
    from pgproxy.core.pool import Pool
    from pgproxy.net.client_connection import ClientConnection
    from pgproxy.proxy import Proxy

log = logging.getLogger("pgproxy.server")
# A C static when compiled: no module dict lookup per call on the data path.
monotonic: Final = time.monotonic


class ServerConnection(asyncio.Protocol):
    __slots__ = (
        "_login",
        "address",
        "cancels_in_flight",
        "checkin_deferred",
        "checking",
        "client",
        "closed",
        "gate",
        "id",
        "logged_in",
        "pool",
        "proxy",
        "query_cancelled",
        "reset_started_at",
        "resets_session",
        "state",
        "target",
        "transport",
        "write_paused",
    )

    def __init__(
        self,
        proxy: Proxy,
        pool: Pool[ServerConnection, ClientConnection],
        login: ServerLogin,
        server_id: int,
        address: tuple[str, int],
    ) -> None:
        self.proxy = proxy
        self.pool = pool
        self.id = server_id
        self.address = address
        self._login: ServerLogin | None = login
        self.logged_in: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.state: ServerState | None = None
        self.transport: asyncio.Transport | None = None
        self.gate: ReadGate | None = None
        self.client: ClientConnection | None = None
        self.write_paused = False
        self.closed = False
        # When a rollback/reset after a client left began (None: not resetting).
        self.reset_started_at: float | None = None
        # The reset in progress runs server_reset_query (not only a rollback).
        self.resets_session = False
        # The proxy query in progress is server_check_query, before a client gets it.
        self.checking = False
        # CancelRequests sent for this server and not yet answered (closed) by Postgres; the
        # server waits for them before it serves anyone else (checkin_deferred).
        self.cancels_in_flight = 0
        self.checkin_deferred = False
        # query_timeout: (start of the query cancelled, when the cancel was sent), or None.
        self.query_cancelled: tuple[float, float] | None = None
        # Where it connected to (a PoolTarget); a RELOAD that moves the pool replaces it.
        self.target: object = None

    def __repr__(self) -> str:
        return f"S-{self.id}"

    # -- asyncio callbacks -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCP transports implement asyncio.Transport without subclassing it.
        self.transport = transport = cast(asyncio.Transport, transport)
        self.gate = ReadGate(transport)
        set_keepalive(transport, self.proxy.settings)
        assert self._login is not None
        transport.write(self._login.start())

    def data_received(self, data: bytes) -> None:
        try:
            st = self.state
            if st is None:
                self._feed_login(data)
                return
            client = self.client
            if client is not None:
                tracker = st.tracker
                if tracker is not None:
                    events = st.tracker_events
                    frames = st.scanner.feed(data)
                    out = tracker.feed(data, frames, events)
                    st.feed(data, frames, monotonic())
                    if st.outbox:
                        client.write(b"".join(st.outbox))
                        st.outbox.clear()
                    if out:
                        client.write(out)
                    if events.prepared:
                        self.pool.note_prepared(events.prepared)
                        events.prepared.clear()
                    if events.failed or events.unanswered or events.not_closed:
                        client.statement_events(st, events)
                        events.clear()
                    if st.extended_copy:
                        raise FeatureNotSupportedError(
                            "COPY through the extended protocol, with named prepared "
                            "statements, is not supported in transaction mode"
                        )
                elif st.swallowing:
                    start = st.feed(data, None, monotonic())
                    if st.outbox:
                        client.write(b"".join(st.outbox))
                        st.outbox.clear()
                    if start < len(data):
                        client.write(data[start:])
                else:
                    client.write(data)
                    st.feed(data, None, monotonic())
                if st.proxy_error is not None:
                    client.prelude_failed(st.proxy_error)
                elif st.fatal:
                    # The server is going (a FATAL, perhaps right after the ReadyForQuery that
                    # ended the transaction, in the same read): the client has read it, so it
                    # is closed as Postgres would close it, not handed a dead server's words
                    # and kept.
                    client.close(DisconnectReason.SERVER_FATAL)
                    self.proxy.close_server(self, DisconnectReason.SERVER_FATAL)
                elif st.drained:
                    st.drained = False
                    client.server_drained()
            elif self.reset_started_at is not None:
                st.feed(data)
                st.outbox.clear()
                if st.drained:
                    st.drained = False
                    self.proxy.finish_reset(self)
            else:
                # An idle pooled server has nothing to say; whatever it is (a FATAL before
                # closing, most likely), the connection cannot be trusted any more.
                self.proxy.close_server(self, DisconnectReason.UNEXPECTED_DATA)
        except PgProxyError as exc:
            log.warning("%r: %s; closing", self, exc.message)
            self._fail_client(exc)
            self.proxy.close_server(self, DisconnectReason.PROTOCOL_ERROR)
        except Exception:
            log.exception("%r: internal error; closing", self)
            self._fail_client(PgProxyError("pgproxy internal error"))
            self.proxy.close_server(self, DisconnectReason.INTERNAL_ERROR)

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            if not self.logged_in.done():
                self.logged_in.set_exception(
                    BackendUnavailableError(
                        f"server {self.address[0]}:{self.address[1]} closed the connection "
                        "during login" + (f": {exc}" if exc else "")
                    )
                )
            self.proxy.server_lost(self)
        except Exception:
            log.exception("%r: internal error in connection_lost", self)

    def pause_writing(self) -> None:
        self.write_paused = True
        client = self.client
        if client is not None and client.gate is not None:
            client.gate.add(GateReason.PEER_BACKLOG)

    def resume_writing(self) -> None:
        self.write_paused = False
        client = self.client
        if client is not None and client.gate is not None:
            client.gate.discard(GateReason.PEER_BACKLOG)

    # -- helpers -----------------------------------------------------------------------------

    def _feed_login(self, data: bytes) -> None:
        assert self._login is not None and self.transport is not None
        if self.logged_in.done():
            # Nobody waits for this login any more (cancelled at shutdown, or timed out).
            self.transport.close()
            return
        try:
            step = self._login.feed(data)
        except PgProxyError as exc:
            if isinstance(exc, ProtocolError):
                # The server broke the protocol: for the waiting clients the server is
                # unavailable (08006), not their own violation (08P01).
                exc = BackendUnavailableError(
                    f"server {self.address[0]}:{self.address[1]} broke the protocol during "
                    f"login: {exc.message}"
                )
            if not self.logged_in.done():
                self.logged_in.set_exception(exc)
            self.transport.close()
            return
        if step.send:
            self.transport.write(step.send)
        if step.done:
            if step.leftover:
                self.logged_in.set_exception(
                    BackendUnavailableError("server sent data after ReadyForQuery at login")
                )
                self.transport.close()
                return
            self._login = None
            now = monotonic()
            self.state = ServerState(
                id=self.id,
                created_at=now,
                backend_key=step.backend_key,
                stats=self.pool.stats,
                params=dict(step.parameters),
                last_used_at=now,
                statements=ServerStatements(capacity=self.proxy.settings.max_prepared_statements),
            )
            self.logged_in.set_result(None)

    def _fail_client(self, exc: PgProxyError) -> None:
        client = self.client
        if client is not None:
            client.fail(exc)

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def close(self) -> None:
        """Close the socket (Terminate first when the server waits for input)."""
        if self.closed:
            return
        self.closed = True
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        st = self.state
        if st is not None and st.expect_nothing() and st.scanner.at_boundary:
            transport.write(b"X\x00\x00\x00\x04")
        transport.close()
