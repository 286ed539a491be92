"""pgproxy bugs the fuzzers found, reproduced live, kept as regression tests.

All fixed: a Parse/Close with an unterminated name before a server is linked (ValueError,
XX000), a /metrics target urlsplit cannot parse (500 with a traceback), a server's SCRAM
iteration count past int32 (OverflowError in the server login) or of over 4300 digits
(ValueError from int()).
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
from collections.abc import Iterator

import pytest

from pgproxy.localpg import LocalPostgres
from pgproxy.wire import messages
from tests.e2e.conftest import ProxyThread

from .conftest import RawClient, assert_still_serving, logged_in, start_proxy
from .support import error_fields, split_backend, typed


def internal_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        f"{r.name}: {r.getMessage()}"
        for r in caplog.records
        if r.name.startswith("pgproxy") and (r.levelno >= logging.ERROR or r.exc_info)
    ]


# --- Parse/Close with an unterminated name, then Sync, on a client without a server ----------

UNTERMINATED = {
    "parse_without_any_nul": typed("P", b"s1") + messages.sync(),
    "close_statement_without_nul": typed("C", b"Ss1") + messages.sync(),
    "close_statement_with_no_name_at_all": typed("C", b"S") + messages.sync(),
}


@pytest.mark.parametrize("case", sorted(UNTERMINATED))
def test_unterminated_name_in_parse_or_close_before_sync_is_no_internal_error(
    scram_proxy, pgproxy_log, case
):
    with logged_in(scram_proxy.port) as client:
        start = len(client.received)
        client.send(UNTERMINATED[case])
        client.read_until("ZE")
        client.send(messages.terminate())
        client.shutdown_write()
        client.read_until_closed()
        fields = error_fields(split_backend(bytes(client.received[start:])))
    # Postgres answers ERROR 08P01 "invalid string in message" (or pgproxy refuses it itself).
    assert [f["C"] for f in fields] == ["08P01"], fields
    assert internal_errors(pgproxy_log) == []
    assert_still_serving(scram_proxy)


# --- /metrics: an absolute target with a bad bracketed host ------------------------------------


@pytest.fixture(scope="module")
def metrics_proxy(pg: LocalPostgres) -> Iterator[ProxyThread]:
    proxy = start_proxy(pg, metrics_listen="127.0.0.1:0")
    yield proxy
    proxy.stop()


def http_get(port: int, target: str) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, data


@pytest.mark.parametrize("target", ["http://[", "http://[foo]/metrics"])
def test_metrics_endpoint_answers_400_to_a_bad_bracketed_host(metrics_proxy, pgproxy_log, target):
    status, _data = http_get(metrics_proxy.proxy.metrics_port, target)
    assert status == 400
    assert internal_errors(pgproxy_log) == []


def test_metrics_endpoint_still_answers_after_bad_targets(metrics_proxy):
    assert http_get(metrics_proxy.proxy.metrics_port, "http://[")[0] == 400
    status, data = http_get(metrics_proxy.proxy.metrics_port, "/metrics")
    assert status == 200 and b"pgproxy_login_failures_total" in data


def _recv_exact(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


# --- a hostile server: a SCRAM iteration count past int32 --------------------------------------


class HostileServer:
    """A TCP listener that answers every login with SCRAM and an absurd iteration count."""

    def __init__(self, iterations: bytes) -> None:
        self.iterations = iterations
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _addr = self.sock.accept()
            except OSError:
                return
            with conn:
                self._login(conn)

    def _login(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        try:
            while True:  # an SSLRequest first (refused), then the StartupMessage
                length = struct.unpack("!i", _recv_exact(conn, 4))[0]
                code = struct.unpack("!i", _recv_exact(conn, length - 4)[:4])[0]
                if code != 80877103:
                    break
                conn.sendall(b"N")
            conn.sendall(messages.authentication_sasl(["SCRAM-SHA-256"]))
            length = struct.unpack("!i", _recv_exact(conn, 5)[1:])[0]
            body = _recv_exact(conn, length - 4)
            client_first = messages.parse_sasl_initial_response(body)[1] or b""
            nonce = client_first.split(b"r=")[1]
            server_first = b"r=" + nonce + b"srv,s=c2FsdA==,i=" + self.iterations
            conn.sendall(messages.authentication_sasl_continue(server_first))
            conn.recv(65536)  # the proxy's answer, or its close
        except Exception:  # whatever the proxy sent or did: this server only plays its part
            pass

    def close(self) -> None:
        self.sock.close()


def _login_through(pg: LocalPostgres, server: HostileServer) -> list[dict[str, str]]:
    """A client's login through a proxy in front of `server`: its error fields."""
    proxy = start_proxy(pg, server=f"127.0.0.1:{server.port}", server_connect_timeout="5")
    try:
        with RawClient(proxy.port) as client:
            rest = client.scram_login("app", "app-secret")
            client.read_until_closed()
        return error_fields(rest)
    finally:
        proxy.stop()
        server.close()


def test_a_hostile_servers_iteration_count_past_int32_is_a_clear_login_error(pg, pgproxy_log):
    fields = _login_through(pg, HostileServer(b"99999999999"))
    assert [f["C"] for f in fields] == ["08006"], fields
    assert "bad iteration count" in fields[0]["M"], fields
    assert internal_errors(pgproxy_log) == []


def test_a_hostile_servers_iteration_count_of_5000_digits_is_a_clear_login_error(pg, caplog):
    caplog.set_level(logging.WARNING, logger="pgproxy")
    fields = _login_through(pg, HostileServer(b"9" * 5000))
    assert [f["C"] for f in fields] == ["08006"], fields
    assert internal_errors(caplog) == []
    assert "bad iteration count" in fields[0]["M"], fields
