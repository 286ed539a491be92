"""A server that dies right as a transaction ends: its FATAL in the same read as the
ReadyForQuery must not leave the client connected to words of a dead server."""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Callable, Iterator

import pytest

from pgproxy.wire import messages

from .conftest import ProxyThread
from .helpers import wait_for

FATAL = (
    b"SFATAL\x00VFATAL\x00C57P01\x00Mterminating connection due to administrator command\x00\x00"
)


def _msg(code: bytes, body: bytes) -> bytes:
    return code + struct.pack("!I", len(body) + 4) + body


def _read_packet(conn: socket.socket) -> bytes:
    size = struct.unpack("!I", conn.recv(4, socket.MSG_WAITALL))[0]
    return conn.recv(size - 4, socket.MSG_WAITALL)


def _serve(conn: socket.socket) -> None:
    """A trust-auth 'Postgres' that answers the first Query with C, Z and a FATAL, at once."""
    with conn:
        body = _read_packet(conn)
        if struct.unpack("!I", body[:4])[0] == 80877103:  # SSLRequest
            conn.sendall(b"N")
            _read_packet(conn)
        conn.sendall(
            _msg(b"R", struct.pack("!I", 0))
            + _msg(b"S", b"server_version\x0015.0\x00")
            + _msg(b"S", b"client_encoding\x00UTF8\x00")
            + _msg(b"K", struct.pack("!II", 4242, 99))
            + _msg(b"Z", b"I")
        )
        buffer = b""
        while data := conn.recv(65536):
            buffer += data
            if buffer[:1] == b"Q" and len(buffer) >= 1 + struct.unpack("!I", buffer[1:5])[0]:
                conn.sendall(_msg(b"C", b"SELECT 0\x00") + _msg(b"Z", b"I") + _msg(b"E", FATAL))
                return


@pytest.fixture
def dying_server() -> Iterator[int]:
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=_serve, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    listener.close()


def _messages(data: bytes) -> list[tuple[str, bytes]]:
    out, pos = [], 0
    while pos + 5 <= len(data):
        size = struct.unpack("!I", data[pos + 1 : pos + 5])[0]
        out.append((chr(data[pos]), data[pos + 5 : pos + 1 + size]))
        pos += 1 + size
    return out


def test_a_fatal_right_after_ready_for_query_closes_the_client(
    make_proxy: Callable[..., ProxyThread], dying_server: int
) -> None:
    proxy = make_proxy(server=f"127.0.0.1:{dying_server}", auth_type="trust")
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(messages.startup_message({"user": "app", "database": "app"}))
        welcome = b""
        while not welcome.endswith(_msg(b"Z", b"I")):
            welcome += sock.recv(65536)
        sock.sendall(messages.query("SELECT 1"))
        received = b""
        while chunk := sock.recv(65536):  # until pgproxy closes: a deadline via the timeout
            received += chunk
    codes = [code for code, _body in _messages(received)]
    assert codes == ["C", "Z", "E"], codes  # the server's words once, and no error of ours
    assert b"57P01" in _messages(received)[2][1]
    wait_for(
        lambda: proxy.call(lambda: len(proxy.proxy.clients)) == 0,
        what="pgproxy to forget the client",
    )
