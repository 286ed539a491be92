"""A blocking connection for the proxy's own few queries: the server monitor and auth_query.

Rules of this file:

* worker threads only: every call blocks, and every socket operation gives up after the
  connection's timeout (`TimeoutError`), so a hung server cannot wedge the thread;
* it logs in with `ServerLogin` and asks for TLS as the pool does (`server_tls_*`), so it
  accepts exactly the servers and login methods the pool accepts;
* values come back as text, None for NULL; an ErrorResponse raises `ServerError` once the
  server is ready again, so the connection stays usable;
* a result bigger than `MAX_RESULT` is a `ProtocolError`: these queries read a few rows.

It replaces a client library in the proxy process: that library and its imports cost 4.4 MiB
of resident memory, a tenth of the proxy's footprint, for two small queries.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Sequence
from types import TracebackType

from pgproxy.config import TlsMode
from pgproxy.core.server_login import ServerCredentials, ServerLogin
from pgproxy.errors import BackendUnavailableError, ProtocolError, ServerError
from pgproxy.wire import messages
from pgproxy.wire.codes import BackendCode

# Bytes of messages one query may return before the connection gives up on it.
MAX_RESULT = 16 << 20
_RECV = 65536

Row = tuple[str | None, ...]


class QueryConnection:
    """One logged-in server connection that runs statements one at a time."""

    def __init__(self, sock: socket.socket, leftover: bytes = b"") -> None:
        self._sock = sock
        self._buffer = bytearray(leftover)

    @classmethod
    def connect(
        cls,
        *,
        host: str,
        port: int,
        database: str,
        credentials: ServerCredentials,
        application_name: str,
        timeout: float,
        tls: ssl.SSLContext | None,
        tls_mode: TlsMode,
    ) -> QueryConnection:
        """Connect, ask for TLS when `tls` is given, and log in."""
        sock = socket.create_connection((host, port), timeout)
        try:
            sock.settimeout(timeout)
            if tls is not None:
                sock = _start_tls(sock, host, tls, tls_mode)
            login = ServerLogin(
                database=database,
                credentials=credentials,
                params={"application_name": application_name, "client_encoding": "UTF8"},
            )
            sock.sendall(login.start())
            while True:
                step = login.feed(_recv(sock))
                if step.send:
                    sock.sendall(step.send)
                if step.done:
                    return cls(sock, step.leftover)
        except BaseException:
            sock.close()
            raise

    def query(self, sql: str, params: Sequence[str] = ()) -> list[Row]:
        """Run one statement; its rows. With `params`, they are bound as $1, $2... (text)."""
        if params:
            self._sock.sendall(messages.unnamed_query(sql, params))
        else:
            self._sock.sendall(messages.query(sql))
        rows: list[Row] = []
        error: ServerError | None = None
        received = 0
        while True:
            code, body = self._message()
            received += len(body) + 5
            if received > MAX_RESULT:
                raise ProtocolError(f"the result is over {MAX_RESULT >> 20} MiB")
            if code == BackendCode.DATA_ROW:
                rows.append(_data_row(body))
            elif code == BackendCode.ERROR_RESPONSE:
                error = ServerError(messages.parse_fields(body))
            elif code == BackendCode.READY_FOR_QUERY:
                if error is not None:
                    raise error
                return rows
            elif code in _COPY_STARTS:
                raise ProtocolError("the statement started a COPY; this connection cannot run one")
            # Anything else (RowDescription, CommandComplete, notices, ParameterStatus...) says
            # nothing these callers need.

    def close(self) -> None:
        """Say goodbye (when the socket still works) and close."""
        try:
            self._sock.sendall(messages.terminate())
        except OSError:
            pass
        finally:
            self._sock.close()

    def __enter__(self) -> QueryConnection:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _message(self) -> tuple[int, bytes]:
        buffer = self._buffer
        while len(buffer) < 5:
            buffer += _recv(self._sock)
        length = int.from_bytes(buffer[1:5], signed=True)
        if length < 4 or length > MAX_RESULT:
            raise ProtocolError(f"invalid message length {length} from server")
        while len(buffer) < length + 1:
            buffer += _recv(self._sock)
        code = buffer[0]
        body = bytes(buffer[5 : length + 1])
        del buffer[: length + 1]
        return code, body


_COPY_STARTS = frozenset(
    {BackendCode.COPY_IN_RESPONSE, BackendCode.COPY_OUT_RESPONSE, BackendCode.COPY_BOTH_RESPONSE}
)


def _start_tls(sock: socket.socket, host: str, tls: ssl.SSLContext, mode: TlsMode) -> socket.socket:
    sock.sendall(messages.ssl_request())
    # One byte only: anything the server sent after it stays unread and fails the handshake,
    # so no unencrypted byte is taken as part of the encrypted stream (CVE-2021-23222).
    answer = sock.recv(1)
    if answer == b"S":
        try:
            return tls.wrap_socket(sock, server_hostname=host)
        except ssl.SSLError as exc:
            raise BackendUnavailableError(
                f"TLS with the server failed (server_tls_sslmode={mode.value}): {exc.reason or exc}"
            ) from None
    if answer != b"N":
        raise BackendUnavailableError(f"the server answered SSLRequest with {answer!r}")
    if mode.requires:
        raise BackendUnavailableError(
            f"the server does not accept TLS (server_tls_sslmode={mode.value})"
        )
    return sock


def _recv(sock: socket.socket) -> bytes:
    data = sock.recv(_RECV)
    if not data:
        raise ConnectionResetError("the server closed the connection")
    return data


def _data_row(body: bytes) -> Row:
    count = int.from_bytes(body[:2])
    pos = 2
    values: list[str | None] = []
    for _ in range(count):
        if pos + 4 > len(body):
            raise ProtocolError("invalid DataRow message from server")
        length = int.from_bytes(body[pos : pos + 4], signed=True)
        pos += 4
        if length < 0:
            values.append(None)
            continue
        end = pos + length
        if end > len(body):
            raise ProtocolError("invalid DataRow message from server")
        values.append(body[pos:end].decode())
        pos = end
    return tuple(values)
