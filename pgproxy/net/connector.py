"""Open and log in a server connection; send a CancelRequest to Postgres."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from pgproxy.config import TlsMode
from pgproxy.core.server_login import ServerLogin
from pgproxy.errors import BackendUnavailableError, PgProxyError
from pgproxy.net.server_connection import ServerConnection
from pgproxy.wire import messages

if TYPE_CHECKING:
    from pgproxy.core.pool import Pool
    from pgproxy.net.client_connection import ClientConnection
    from pgproxy.proxy import Proxy

log = logging.getLogger("pgproxy.server")


async def open_server(
    proxy: Proxy,
    pool: Pool[ServerConnection, ClientConnection],
    login: ServerLogin,
    server_id: int,
    address: tuple[str, int],
    connect_timeout: float,
) -> ServerConnection:
    """Connect and log in within `connect_timeout` seconds; raise a `PgProxyError` otherwise."""
    loop = asyncio.get_running_loop()
    host, port = address
    conn: ServerConnection | None = None

    def new_conn() -> ServerConnection:
        nonlocal conn
        conn = ServerConnection(proxy, pool, login, server_id, address)
        return conn

    try:
        async with asyncio.timeout(connect_timeout):
            if proxy.server_tls is None:
                await loop.create_connection(new_conn, host, port)
            else:
                await _connect_tls(
                    loop, host, port, proxy.server_tls, proxy.settings.server_tls_sslmode, new_conn
                )
            assert conn is not None
            await conn.logged_in
    except TimeoutError:
        if conn is not None:
            conn.close()
        raise BackendUnavailableError(
            f"could not connect to server {host}:{port}: "
            f"no answer within server_connect_timeout ({connect_timeout:g} s)"
        ) from None
    except OSError as exc:
        raise BackendUnavailableError(
            f"could not connect to server {host}:{port}: {exc.strerror or exc}"
        ) from None
    except (PgProxyError, asyncio.CancelledError):
        if conn is not None:
            conn.close()
        raise
    return conn


class _SslAnswer(asyncio.Protocol):
    """Sends an SSLRequest and waits for Postgres' one-byte answer."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.answer: asyncio.Future[bytes] = loop.create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(messages.ssl_request())

    def data_received(self, data: bytes) -> None:
        if not self.answer.done():
            assert self.transport is not None
            self.transport.pause_reading()
            self.answer.set_result(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.answer.done():
            self.answer.set_exception(
                BackendUnavailableError("the server closed the connection after SSLRequest")
            )


async def _connect_tls(
    loop: asyncio.AbstractEventLoop,
    host: str,
    port: int,
    context: ssl.SSLContext,
    mode: TlsMode,
    new_conn: Callable[[], ServerConnection],
) -> None:
    """Connect, ask for TLS, and hand the (encrypted, or plain when `mode` allows) transport
    to a new ServerConnection."""
    transport, probe = await loop.create_connection(lambda: _SslAnswer(loop), host, port)
    try:
        answer = await probe.answer
        if answer == b"S":
            # The probe stays the protocol during the handshake: a failed one then reports
            # to it, not to a ServerConnection nobody waits for.
            tls = await loop.start_tls(transport, probe, context, server_hostname=host)
            if tls is None:
                raise BackendUnavailableError("the TLS handshake with the server failed")
            conn = new_conn()
            tls.set_protocol(conn)
            conn.connection_made(tls)
            return
        if len(answer) > 1:
            # Bytes after the answer were not protected by TLS (CVE-2021-23222): drop all.
            raise BackendUnavailableError("the server sent unexpected data after its SSL answer")
        if answer != b"N":
            raise BackendUnavailableError(f"the server answered SSLRequest with {answer!r}")
        if mode.requires:
            raise BackendUnavailableError(
                f"the server does not accept TLS (server_tls_sslmode={mode.value})"
            )
        conn = new_conn()
        transport.set_protocol(conn)
        conn.connection_made(transport)
        transport.resume_reading()
    except ssl.SSLError as exc:
        transport.abort()
        raise BackendUnavailableError(
            f"TLS with the server failed (server_tls_sslmode={mode.value}): {exc.reason or exc}"
        ) from None
    except BaseException:
        transport.abort()
        raise


async def send_cancel(address: tuple[str, int], key: tuple[int, int], limit: float) -> None:
    """Send a CancelRequest on a fresh connection, as the protocol asks; never raises."""
    host, port = address
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(limit):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(messages.cancel_request(*key))
            await writer.drain()
            # Postgres answers by closing; waiting for it keeps the order of events simple.
            await reader.read()
    except (OSError, TimeoutError) as exc:
        log.warning("cancel request to %s:%d failed: %s", host, port, exc)
    finally:
        if writer is not None:
            writer.close()
