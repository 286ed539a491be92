"""A minimal PostgreSQL client for what pgbench cannot do: big results and idle crowds.

It speaks just enough of the protocol: StartupMessage, SCRAM-SHA-256 (the client side of
`pgproxy.wire.scram`, whose key cache makes 10,000 logins with one salt cheap), one simple
Query, Terminate. `Login` is sans-I/O, bytes in and bytes out, so the blocking client of the
large-result section and the asyncio client of the idle section share it. Not a driver: it
trusts the server and knows the shape of the results it asks for.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import cast

from pgproxy.errors import PgProxyError
from pgproxy.localpg import Credentials
from pgproxy.wire.messages import (
    parse_authentication,
    parse_fields,
    query,
    sasl_initial_response,
    sasl_response,
    startup_message,
    terminate,
)
from pgproxy.wire.scram import SCRAM_SHA_256, ScramClientExchange

HOST = "127.0.0.1"
# ReadyForQuery('I'): how every result we ask for ends.
READY_IDLE = b"Z\x00\x00\x00\x05I"
# A fast client asks the kernel for up to this much per recv; a slow one for a little.
FAST_CHUNK = 1 << 20
SLOW_CHUNK = 64 << 10
# Bytes kept from the end of the stream: enough for CommandComplete + ReadyForQuery.
TAIL = 64
# Authentication codes (PostgreSQL docs, "Message Formats" → AuthenticationXXX).
AUTH_OK, AUTH_SASL, AUTH_SASL_CONTINUE, AUTH_SASL_FINAL = 0, 10, 11, 12


class LoginError(Exception):
    """The server refused the login or spoke something this client does not."""


class Login:
    """The client side of a login: StartupMessage, then SCRAM-SHA-256 until ReadyForQuery."""

    def __init__(self, credentials: Credentials) -> None:
        self.credentials = credentials
        self.scram = ScramClientExchange(credentials.password)
        self.buffer = bytearray()
        self.is_ready = False

    def startup(self) -> bytes:
        return startup_message(
            {
                "user": self.credentials.user,
                "database": self.credentials.database,
                "application_name": "pgproxy-bench",
            }
        )

    def feed(self, data: bytes) -> bytes:
        """Bytes from the server → bytes to send back (maybe none); sets `is_ready`."""
        self.buffer += data
        return b"".join(self._handle(code, body) for code, body in self._messages())

    def _messages(self) -> Iterator[tuple[int, bytes]]:
        while len(self.buffer) >= 5:
            end = 1 + int.from_bytes(self.buffer[1:5])
            if len(self.buffer) < end:
                return
            code, body = self.buffer[0], bytes(self.buffer[5:end])
            del self.buffer[:end]
            yield code, body

    def _handle(self, code: int, body: bytes) -> bytes:
        if code == ord("E"):
            raise LoginError(parse_fields(body).get("M", "login refused"))
        if code == ord("Z"):
            self.is_ready = True
        if code != ord("R"):
            return b""  # ParameterStatus, BackendKeyData, NoticeResponse
        auth, payload = parse_authentication(body)
        if auth == AUTH_SASL:
            return sasl_initial_response(SCRAM_SHA_256, self.scram.client_first())
        if auth == AUTH_SASL_CONTINUE:
            return sasl_response(self.scram.handle_server_first(payload))
        if auth == AUTH_SASL_FINAL:
            self.scram.handle_server_final(payload)
            return b""
        if auth == AUTH_OK:
            return b""
        raise LoginError(f"unsupported authentication request {auth}")


# -- blocking: one connection reading a big result -------------------------------------


def connect(port: int, credentials: Credentials, timeout: float = 30.0) -> socket.socket:
    """A logged-in blocking socket."""
    sock = socket.create_connection((HOST, port), timeout=timeout)
    try:
        login = Login(credentials)
        sock.sendall(login.startup())
        while not login.is_ready:
            data = sock.recv(SLOW_CHUNK)
            if not data:
                raise LoginError("the server closed the connection during the login")
            if reply := login.feed(data):
                sock.sendall(reply)
    except BaseException:
        sock.close()
        raise
    return sock


def close(sock: socket.socket) -> None:
    """Say goodbye (Terminate) if the connection still works, and close it."""
    with sock, contextlib.suppress(OSError):
        sock.sendall(terminate())


@dataclass(frozen=True, slots=True)
class Transfer:
    received: int  # bytes, protocol framing included
    seconds: float  # from sending the Query to its ReadyForQuery

    @property
    def mb_per_s(self) -> float:
        return self.received / self.seconds / 1e6 if self.seconds else 0.0


def read_result(
    sock: socket.socket, sql: str, command_tag: str, rate: float | None = None
) -> Transfer:
    """Run `sql` as one simple Query and read its whole result, at most `rate` bytes/s.

    Messages are not parsed (that would make this client the bottleneck): the result ends
    at ReadyForQuery, which no DataRow of the bench tables can imitate, and succeeded if
    CommandComplete with `command_tag` comes right before it.
    """
    buffer = bytearray(SLOW_CHUNK if rate else FAST_CHUNK)
    view = memoryview(buffer)
    sock.sendall(query(sql))
    started = time.monotonic()
    received = 0
    tail = b""
    while not tail.endswith(READY_IDLE):
        n = sock.recv_into(buffer)
        if n == 0:
            raise ConnectionError(f"connection closed after {received:,} bytes")
        received += n
        tail = (tail + view[max(0, n - TAIL) : n])[-TAIL:]
        if rate:
            # Sleep off any lead over the wanted rate: the kernel buffers fill up and the
            # pooler sees a client that reads slowly, as a distant or busy one would.
            ahead = received / rate - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)
    seconds = time.monotonic() - started
    if f"{command_tag}\x00".encode() + READY_IDLE not in tail:
        raise ConnectionError(f"result did not end with {command_tag!r}: {tail!r}")
    return Transfer(received, seconds)


# -- asyncio: many idle connections ----------------------------------------------------


class IdleClient(asyncio.Protocol):
    """Logs in, then stays silent; `ready` resolves once logged in."""

    def __init__(self, credentials: Credentials) -> None:
        self.login = Login(credentials)
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCP transport is not an asyncio.Transport subclass, but has its methods.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.login.startup())

    def data_received(self, data: bytes) -> None:
        if self.ready.done():
            return  # logged in: whatever comes now (a NOTICE, say) is not our business
        try:
            reply = self.login.feed(data)
        except (LoginError, PgProxyError) as exc:
            self.ready.set_exception(exc)
            self.close()
            return
        if reply and self.transport is not None:
            self.transport.write(reply)
        if self.login.is_ready:
            self.ready.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_exception(exc or LoginError("connection closed during the login"))

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(terminate())
            self.transport.close()


async def open_idle_clients(
    port: int, credentials: Credentials, count: int, *, concurrency: int, login_timeout: float
) -> tuple[list[IdleClient], list[BaseException]]:
    """Log `count` clients in, `concurrency` logins at a time; returns clients and errors.

    Gives up on the logins still pending when even 100 logins a second would have been done,
    so that a pooler that stops answering costs a minute, not hours.
    """
    loop = asyncio.get_running_loop()
    # Bounded: 10,000 SYNs at once overflow the listen backlog and turn into 1-3 s retries.
    gate = asyncio.Semaphore(concurrency)

    async def one() -> IdleClient:
        async with gate, asyncio.timeout(login_timeout):
            _, client = await loop.create_connection(lambda: IdleClient(credentials), HOST, port)
            try:
                await client.ready
            except BaseException:
                client.close()
                raise
            return client

    tasks = [asyncio.create_task(one()) for _ in range(count)]
    done, pending = await asyncio.wait(tasks, timeout=login_timeout + count / 100)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    clients = [t.result() for t in done if t.exception() is None]
    errors = [e for t in done if (e := t.exception()) is not None]
    if pending:
        errors.append(TimeoutError(f"{len(pending)} logins still pending at the deadline"))
    return clients, errors
