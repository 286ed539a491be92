"""Open and log in a server connection; send a CancelRequest to Postgres."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

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
    try:
        async with asyncio.timeout(connect_timeout):
            _, conn = await loop.create_connection(
                lambda: ServerConnection(proxy, pool, login, server_id, address), host, port
            )
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
