"""Helpers of the fault tests: the cluster's stop/start, errors as SQLSTATEs, raw sockets."""

from __future__ import annotations

import asyncio
import functools
import os
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

import asyncpg
import pg8000.native
import psycopg

from pgproxy.localpg import Credentials, LocalPostgres
from tests.e2e.conftest import ProxyThread
from tests.e2e.helpers import wait_for

APP = Credentials(user="app", password="app-secret", database="app")

# PGPROXY_FULL_TESTS=1: the long variants (200 clients, several restarts, longer runs).
FULL = os.environ.get("PGPROXY_FULL_TESTS") == "1"


def scale(ci: int, full: int) -> int:
    return full if FULL else ci


# -- the cluster --------------------------------------------------------------------------------


def pg_stop(cluster: LocalPostgres) -> None:
    """Stop Postgres (fast shutdown), keeping its data and port, unlike `cluster.stop()`."""
    cluster._pg_ctl("stop", "-m", "fast")


def pg_start(cluster: LocalPostgres) -> None:
    """Start it again on the same port after `pg_stop`."""
    cluster._pg_ctl("start", "-l", str(cluster.log_path))


def terminate_app_backends(cluster: LocalPostgres) -> None:
    """End every `app` backend and wait until they are gone."""
    cluster.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'app'")
    assert cluster.wait_for_backends(0, user="app"), "app backends would not go"


def live_backend_pids(cluster: LocalPostgres) -> set[int]:
    rows = cluster.execute("SELECT pid FROM pg_stat_activity WHERE usename = 'app'")
    return {int(row[0]) for row in rows}


# -- the proxy ----------------------------------------------------------------------------------


def server_pids(proxy: ProxyThread) -> set[int]:
    """Backend pids of the server connections the proxy holds (logged in, not closed)."""

    def read() -> set[int]:
        return {
            s.state.backend_key[0]
            for s in proxy.proxy.servers
            if s.state is not None and s.state.backend_key is not None and not s.closed
        }

    return set(proxy.call(read))


def client_count(proxy: ProxyThread) -> int:
    return int(proxy.call(lambda: len(proxy.proxy.clients)))


def pool_counts(proxy: ProxyThread) -> dict[str, int]:
    """idle/active/resetting/connecting/waiters summed over the proxy's pools."""

    def read() -> dict[str, int]:
        out = {"idle": 0, "active": 0, "resetting": 0, "connecting": 0, "waiters": 0}
        for pool in proxy.proxy.pools.values():
            out["idle"] += len(pool.idle)
            out["active"] += len(pool.active)
            out["resetting"] += len(pool.resetting)
            out["connecting"] += pool.connecting
            out["waiters"] += len(pool.waiters)
        return out

    return dict(proxy.call(read))


def buffered(proxy: ProxyThread) -> int:
    """Bytes the proxy holds in its transports' write buffers, both directions."""

    def read() -> int:
        p = proxy.proxy
        return sum(
            c.transport.get_write_buffer_size()
            for c in [*p.clients, *p.servers]
            if c.transport is not None and not c.transport.is_closing()
        )

    return int(proxy.call(read))


def assert_pool_whole(proxy: ProxyThread, cluster: LocalPostgres, servers: int) -> None:
    """The proxy holds live backends only, and `servers` clients in transactions at once
    (a whole pool) each get a server and use it without an error."""
    wait_for(
        lambda: server_pids(proxy) <= live_backend_pids(cluster),
        timeout=5,
        what="the proxy to hold only live backends",
    )

    async def hold_all() -> set[int]:
        conns = [await asyncpg_connect(proxy.port) for _ in range(servers)]
        try:
            transactions = [conn.transaction() for conn in conns]
            for tr in transactions:
                await tr.start()
            pids = {int(await conn.fetchval("SELECT pg_backend_pid()")) for conn in conns}
            for tr in transactions:
                await tr.commit()
            return pids
        finally:
            for conn in conns:
                await conn.close(timeout=5)

    assert len(asyncio.run(hold_all())) == servers


def wait_until_quiet(proxy: ProxyThread, timeout: float = 10.0) -> None:
    """No client, and every server of the proxy idle in its pool."""

    def quiet() -> bool:
        counts = pool_counts(proxy)
        return (
            client_count(proxy) == 0
            and counts["active"] == 0
            and counts["resetting"] == 0
            and counts["connecting"] == 0
        )

    wait_for(quiet, timeout=timeout, what="the proxy to be quiet")


# -- clients and their errors -------------------------------------------------------------------


def psycopg_connect(port: int, **kwargs: Any) -> psycopg.Connection[Any]:
    kwargs.setdefault("autocommit", True)
    kwargs.setdefault("prepare_threshold", None)
    kwargs.setdefault("connect_timeout", 10)
    return psycopg.connect(
        host="127.0.0.1",
        port=port,
        user=APP.user,
        password=APP.password,
        dbname=APP.database,
        **kwargs,
    )


async def asyncpg_connect(port: int, **kwargs: Any) -> asyncpg.Connection:
    kwargs.setdefault("timeout", 10)
    return await asyncpg.connect(
        host="127.0.0.1",
        port=port,
        user=APP.user,
        password=APP.password,
        database=APP.database,
        **kwargs,
    )


def note_pg8000_messages(
    conn: pg8000.native.Connection, note: Callable[[bytes, bytes], None]
) -> None:
    """From now on `note(code, body)` sees every message `conn` handles, before pg8000 does.
    Once per connection: a second call would note every message twice."""
    handlers = conn.message_types
    for code, handler in list(handlers.items()):
        handlers[code] = functools.partial(_noting, note, code, handler)


def _noting(
    note: Callable[[bytes, bytes], None],
    code: bytes,
    handler: Callable[[bytes, Any], None],
    data: bytes,
    context: Any,
) -> None:
    note(code, data)
    handler(data, context)


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE a driver's exception carries, whichever driver raised it."""
    if isinstance(exc, psycopg.Error):
        return exc.sqlstate
    if isinstance(exc, asyncpg.PostgresError):
        return str(exc.sqlstate)
    if isinstance(exc, pg8000.native.DatabaseError):
        detail = exc.args[0] if exc.args and isinstance(exc.args[0], dict) else {}
        return detail.get("C")
    return None


def error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".strip()


# -- raw sockets --------------------------------------------------------------------------------


def startup_packet(user: str = APP.user, database: str = APP.database) -> bytes:
    params = f"user\x00{user}\x00database\x00{database}\x00\x00".encode()
    body = struct.pack("!i", 196608) + params
    return struct.pack("!i", len(body) + 4) + body


def read_message(sock: socket.socket) -> tuple[bytes, bytes]:
    """One backend message (type, body); raises ConnectionError when the socket closes."""
    head = _read_exactly(sock, 5)
    (length,) = struct.unpack("!i", head[1:])
    return head[:1], _read_exactly(sock, length - 4)


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def error_fields(body: bytes) -> dict[str, str]:
    fields = {}
    for part in body.split(b"\x00"):
        if part:
            fields[part[:1].decode()] = part[1:].decode(errors="replace")
    return fields


def closed_by_peer(sock: socket.socket, timeout: float) -> tuple[bool, bytes]:
    """Read until the peer closes (True) or `timeout` passes (False); what it sent."""
    sock.settimeout(0.2)
    deadline = time.monotonic() + timeout
    data = b""
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return True, data
        if not chunk:
            return True, data
        data += chunk
    return False, data


def errors_in(data: bytes) -> list[dict[str, str]]:
    """Fields of every ErrorResponse in a stream of whole backend messages."""
    out = []
    pos = 0
    while pos + 5 <= len(data):
        (length,) = struct.unpack("!i", data[pos + 1 : pos + 5])
        if data[pos : pos + 1] == b"E":
            out.append(error_fields(data[pos + 5 : pos + 1 + length]))
        pos += 1 + length
    return out


def login_error(port: int, timeout: float = 10.0) -> asyncpg.PostgresError:
    """The error a fresh login through the proxy fails with (asyncpg keeps its SQLSTATE,
    libpq does not for errors during login)."""

    async def attempt() -> asyncpg.PostgresError:
        try:
            conn = await asyncpg_connect(port, timeout=timeout)
        except asyncpg.PostgresError as exc:
            return exc
        await conn.close()
        raise AssertionError("the login succeeded")

    return asyncio.run(attempt())
