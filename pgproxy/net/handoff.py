"""Handing a server connection to a client and taking it back: once per transaction.

These are the proxy's decisions (`Proxy` keeps the pools, their targets and the settings).
They live here so that mypyc compiles them with the connections that call them
(pgproxy/hotpath.py); `Proxy` calls them too.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Final

from pgproxy.core.server import DisconnectReason

if TYPE_CHECKING:
    from pgproxy.core.pool import Pool
    from pgproxy.net.client_connection import ClientConnection
    from pgproxy.net.server_connection import ServerConnection
    from pgproxy.proxy import Proxy

# A C static when compiled: no module dict lookup per call.
monotonic: Final = time.monotonic


def idle_server_for(proxy: Proxy, client: ClientConnection) -> ServerConnection | None:
    """An idle server of the client's pool taken for it now, if one is free and nobody
    waits before it (else None: the caller holds its bytes and requests one)."""
    pool = client.pool
    if pool is None or not pool.idle or pool.waiters or pool.paused or proxy.draining:
        return None
    server = pool.checkout(client, 0.0)  # an idle server and no waiter: never queues
    assert server is not None
    delay = proxy.check_delay
    if delay is not None and monotonic() - pool.taken_idle_since >= delay:
        pool.put_back(server)  # idle too long: request_server checks it first
        return None
    return server


def request_server(proxy: Proxy, client: ClientConnection) -> None:
    """Link `client` to a server now, or queue it for one."""
    pool = client.pool
    assert pool is not None
    if proxy.draining:
        client.fail(proxy.shutdown_error(), reason=DisconnectReason.SHUTDOWN)
        return
    now = monotonic()
    server = pool.checkout(client, now)
    if server is not None:
        delay = proxy.check_delay
        if delay is None or now - pool.taken_idle_since < delay:
            client.link(server)
            return
        # server_check_query first; the client waits, first in line (nobody waited).
        pool.waiters[client] = now
        proxy.check_server(server, now)
    _serve_waiters_from_idle(proxy, pool, now)
    if pool.launches_needed():
        proxy.replenish(pool)


def _serve_waiters_from_idle(
    proxy: Proxy, pool: Pool[ServerConnection, ClientConnection], now: float
) -> None:
    """Clients wait while servers are idle: those servers were idle past server_check_delay
    and wait for their check (the first waiter started one). Check one more for each waiter
    that no server is on its way to; else a busy pool would serve all its clients on the one
    server checked first, since each checkin hands it to the next waiter."""
    delay = proxy.check_delay
    while (
        pool.idle and not pool.paused and len(pool.waiters) > len(pool.resetting) + pool.connecting
    ):
        server = pool.take_idle()
        if delay is not None and now - pool.taken_idle_since >= delay:
            proxy.check_server(server, now)  # checkin hands it to the first waiter
            continue
        waiter = pool.checkin(server, now)  # fresh: straight to the first waiter
        if waiter is not None:
            waiter.link(server)


def checkin(proxy: Proxy, server: ServerConnection) -> None:
    """A server its client is done with: clean → next waiter or idle; otherwise close."""
    st = server.state
    pool = server.pool
    assert st is not None
    if server.closed:
        return
    if server.cancels_in_flight:
        server.checkin_deferred = True  # Proxy._cancel checks it in when the cancel is done
        return
    now = monotonic()
    if proxy.draining:
        proxy.close_server(server, DisconnectReason.SHUTDOWN)
        return
    if not st.is_clean(pool.welcome or {}):
        proxy.close_server(server, DisconnectReason.DIRTY)
        return
    lifetime = proxy.server_lifetime
    if lifetime > 0 and now - st.created_at >= lifetime:
        proxy.close_server(server, DisconnectReason.LIFETIME)
        return
    # `is`: a RELOAD that moves a pool replaces its target object, and a dataclass's == runs
    # interpreted.
    if server.target is not pool.target or pool.total > pool.size:
        # Moved upstream, or the pool was made smaller by a RELOAD.
        proxy.close_server(server, DisconnectReason.CONFIG_CHANGED)
        return
    st.last_used_at = now
    client = pool.checkin(server, now)
    if client is not None:
        client.link(server)
