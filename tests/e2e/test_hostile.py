"""Hostile and broken clients get an ErrorResponse and a close, and the proxy keeps serving.

Every case here talks raw bytes to the proxy (startup packets, a SCRAM login of our own, bad
frames after login) and then checks the two things that matter: what the bad client saw, and
that a normal client still works and the proxy forgot the bad one (its client count is 0).
"""

from __future__ import annotations

import socket
import struct

import psycopg
import pytest

from pgproxy.wire import messages
from pgproxy.wire.codes import PROTOCOL_VERSION_3
from pgproxy.wire.scram import ScramClientExchange

from .helpers import APP_PASSWORD, connect, wait_for

Message = tuple[str, bytes]

# Authentication request codes (the int32 after an 'R' message's length).
_AUTH_OK = 0
_AUTH_SASL = 10
_AUTH_SASL_CONTINUE = 11
_AUTH_SASL_FINAL = 12


class RawClient:
    """A blocking socket that speaks just enough of protocol 3.0 to be rude on purpose."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self._buffer = b""

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self, size: int) -> bool:
        """Read until `size` bytes are buffered; False at EOF (or a reset) before that."""
        while len(self._buffer) < size:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                return False
            if not chunk:
                return False
            self._buffer += chunk
        return True

    def read_message(self) -> Message | None:
        """The next backend message, or None when the proxy closed the connection."""
        if not self._fill(5):
            assert not self._buffer, f"connection closed inside a message: {self._buffer!r}"
            return None
        code = chr(self._buffer[0])
        (length,) = struct.unpack_from("!i", self._buffer, 1)
        assert 4 <= length < 1 << 20, f"bad length {length} from the proxy"
        assert self._fill(1 + length), "connection closed inside a message"
        body = self._buffer[5 : 1 + length]
        self._buffer = self._buffer[1 + length :]
        return code, body

    def read_until_closed(self) -> list[Message]:
        """Every message until the proxy closes the connection (fails if it never does)."""
        out: list[Message] = []
        while (message := self.read_message()) is not None:
            out.append(message)
        return out

    def expect_error_and_close(self) -> dict[str, str]:
        """The fields of the first ErrorResponse; the connection must then be closed."""
        received = self.read_until_closed()
        errors = [body for code, body in received if code == "E"]
        assert errors, f"no ErrorResponse before the close, got {received!r}"
        return messages.parse_fields(errors[0])

    def login(self, user: str, password: str, database: str) -> list[Message]:
        """StartupMessage + SCRAM-SHA-256; returns what followed the SASL exchange.

        That is AuthenticationOk .. ReadyForQuery on success, or ends with an ErrorResponse.
        """
        self.send(messages.startup_message({"user": user, "database": database}))
        exchange = ScramClientExchange(password)
        code, body = self._expect_auth(_AUTH_SASL)
        self.send(messages.sasl_initial_response("SCRAM-SHA-256", exchange.client_first()))
        code, body = self._expect_auth(_AUTH_SASL_CONTINUE)
        self.send(messages.sasl_response(exchange.handle_server_first(body[4:])))
        rest: list[Message] = []
        while (message := self.read_message()) is not None:
            code, body = message
            if code == "R" and _auth_code(body) == _AUTH_SASL_FINAL:
                exchange.handle_server_final(body[4:])
                continue
            rest.append(message)
            if code in "ZE":
                break
        return rest

    def _expect_auth(self, wanted: int) -> Message:
        message = self.read_message()
        assert message is not None, f"closed while waiting for authentication request {wanted}"
        code, body = message
        assert code == "R", f"expected an authentication request, got {code!r}: {body!r}"
        assert _auth_code(body) == wanted
        return message


def _auth_code(body: bytes) -> int:
    code: int = struct.unpack_from("!i", body)[0]
    return code


def _startup_packet(payload: bytes, *, protocol: int = PROTOCOL_VERSION_3) -> bytes:
    body = struct.pack("!i", protocol) + payload
    return struct.pack("!i", len(body) + 4) + body


def _logged_in(port: int) -> RawClient:
    client = RawClient(port)
    rest = client.login("app", APP_PASSWORD, "app")
    assert rest[-1][0] == "Z", f"login failed: {rest!r}"
    return client


def _login_error(client: RawClient, user: str, password: str, database: str) -> dict[str, str]:
    """Log in expecting a refusal: the ErrorResponse's fields; the proxy must then close."""
    rest = client.login(user, password, database)
    assert rest and rest[-1][0] == "E", f"expected an ErrorResponse, got {rest!r}"
    assert all(code != "Z" for code, _ in rest), rest
    assert client.read_until_closed() == []
    return messages.parse_fields(rest[-1][1])


def _client_count(proxy) -> int:
    return int(proxy.call(lambda: len(proxy.proxy.clients)))


def _assert_still_serving(proxy) -> None:
    """The bad client is forgotten and a well-behaved one is served."""
    wait_for(lambda: _client_count(proxy) == 0, what="the proxy to forget the bad client")
    with connect(proxy.port) as conn:
        assert conn.execute("SELECT 41 + 1").fetchone() == (42,)
    wait_for(lambda: _client_count(proxy) == 0, what="the good client to be forgotten")


# --- startup phase ------------------------------------------------------------------------

_STARTUP_GARBAGE = {
    # A TLS ClientHello sent without SSLRequest: its first 4 bytes read as a huge length.
    "tls_client_hello": bytes.fromhex("160301020001000001fc0303") + b"\x00" * 20,
    "http_request": b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
    "length_zero": b"\x00\x00\x00\x00",
    "length_negative": struct.pack("!i", -8) + b"\x00\x03\x00\x00",
    "length_over_10000": struct.pack("!ii", 10_001, PROTOCOL_VERSION_3),
    "length_below_8": struct.pack("!i", 7) + b"\x00\x03\x00",
    "invalid_utf8_parameter": _startup_packet(
        b"user\x00app\x00application_name\x00\xff\xfe\x00\x00"
    ),
    "no_terminator": _startup_packet(b"user\x00app\x00database\x00app\x00"),
}


@pytest.mark.parametrize("case", sorted(_STARTUP_GARBAGE))
def test_malformed_startup_packet_gets_protocol_violation_and_close(make_proxy, case: str) -> None:
    proxy = make_proxy()
    with RawClient(proxy.port) as bad:
        bad.send(_STARTUP_GARBAGE[case])
        fields = bad.expect_error_and_close()
    assert fields["C"] == "08P01", fields
    assert fields["S"] == "FATAL"
    _assert_still_serving(proxy)


def test_truncated_startup_packet_then_close_is_forgotten(make_proxy) -> None:
    proxy = make_proxy()
    with RawClient(proxy.port) as bad:
        full = _startup_packet(b"user\x00app\x00database\x00app\x00\x00")
        bad.send(full[: len(full) // 2])
        wait_for(lambda: _client_count(proxy) == 1, what="the proxy to see the client")
        bad.sock.shutdown(socket.SHUT_WR)
        # The proxy may answer nothing at all; it must close its side.
        assert all(code == "E" for code, _ in bad.read_until_closed())
    _assert_still_serving(proxy)


def test_protocol_2_startup_is_refused_as_feature_not_supported(make_proxy) -> None:
    proxy = make_proxy()
    with RawClient(proxy.port) as bad:
        bad.send(_startup_packet(b"user\x00app\x00database\x00app\x00\x00", protocol=2 << 16))
        fields = bad.expect_error_and_close()
    assert fields["C"] == "0A000", fields
    assert "2.0" in fields["M"]
    _assert_still_serving(proxy)


def test_replication_startup_is_refused_as_feature_not_supported(make_proxy) -> None:
    proxy = make_proxy()
    with RawClient(proxy.port) as bad:
        bad.send(
            _startup_packet(b"user\x00app\x00database\x00app\x00replication\x00database\x00\x00")
        )
        fields = bad.expect_error_and_close()
    assert fields["C"] == "0A000", fields
    assert "replication" in fields["M"]
    _assert_still_serving(proxy)


# --- after a successful login -------------------------------------------------------------

_AFTER_LOGIN_GARBAGE = {
    # 'y' is no frontend message type.
    "unknown_message_type": b"y" + struct.pack("!i", 8) + b"\x00\x00\x00\x00",
    "length_below_4": b"Q" + struct.pack("!i", 3),
    "length_negative": b"Q" + struct.pack("!i", -1),
    "length_over_1_gib": b"Q" + struct.pack("!i", (1 << 30) + 5),
}


@pytest.mark.parametrize("case", sorted(_AFTER_LOGIN_GARBAGE))
def test_bad_message_after_login_gets_protocol_violation_and_close(make_proxy, case: str) -> None:
    proxy = make_proxy()
    with _logged_in(proxy.port) as bad:
        bad.send(_AFTER_LOGIN_GARBAGE[case])
        fields = bad.expect_error_and_close()
    assert fields["C"] == "08P01", fields
    assert fields["S"] == "FATAL"
    _assert_still_serving(proxy)


def test_bad_message_inside_a_transaction_rolls_it_back(make_proxy, pg) -> None:
    proxy = make_proxy(default_pool_size="1")
    with _logged_in(proxy.port) as bad:
        bad.send(messages.query("BEGIN; SELECT 1"))
        received = []
        while (message := bad.read_message()) is not None:
            received.append(message)
            if message[0] == "Z":
                break
        assert received[-1] == ("Z", b"T"), received
        bad.send(b"Q" + struct.pack("!i", 2))
        fields = bad.expect_error_and_close()
    assert fields["C"] == "08P01", fields
    wait_for(lambda: _idle_in_transaction(pg) == 0, what="the transaction to be rolled back")
    _assert_still_serving(proxy)
    with connect(proxy.port) as conn:
        # In an inherited transaction now() would be older than the statement.
        assert conn.execute("SELECT now() = statement_timestamp()").fetchone() == (True,)


def _idle_in_transaction(pg) -> int:
    rows = pg.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app' "
        "AND state LIKE 'idle in transaction%'"
    )
    return int(rows[0][0])


# --- authentication and routing errors ----------------------------------------------------


def test_wrong_password_and_unknown_user_fail_the_same_way(make_proxy) -> None:
    proxy = make_proxy()
    seen = {}
    for user, password in (("app", "not-the-password"), ("nobody", "whatever")):
        with RawClient(proxy.port) as client:
            fields = _login_error(client, user, password, "app")
        assert fields["C"] == "28P01", fields
        assert fields["M"] == f'password authentication failed for user "{user}"'
        seen[user] = fields
    assert seen["app"].keys() == seen["nobody"].keys()
    assert seen["app"]["S"] == seen["nobody"]["S"] == "FATAL"
    _assert_still_serving(proxy)


def test_wrong_password_through_psycopg_says_password_authentication_failed(make_proxy) -> None:
    proxy = make_proxy()
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(
            f"host=127.0.0.1 port={proxy.port} user=app password=nope dbname=app",
            connect_timeout=10,
        )
    _assert_still_serving(proxy)


def test_unknown_database_with_databases_configured_gets_3d000(make_proxy) -> None:
    proxy = make_proxy(databases=["app=dbname=app"])
    with RawClient(proxy.port) as client:
        fields = _login_error(client, "app", APP_PASSWORD, "nosuchdb")
    assert fields["C"] == "3D000", fields
    assert "nosuchdb" in fields["M"]
    _assert_still_serving(proxy)


def test_nonexistent_upstream_database_relays_postgres_3d000(make_proxy) -> None:
    proxy = make_proxy()
    with RawClient(proxy.port) as client:
        fields = _login_error(client, "app", APP_PASSWORD, "no_such_upstream_db")
    assert fields["C"] == "3D000", fields
    assert fields["M"] == 'database "no_such_upstream_db" does not exist'
    _assert_still_serving(proxy)


def test_client_over_max_client_conn_gets_53300_and_the_others_keep_working(
    make_proxy,
) -> None:
    proxy = make_proxy(max_client_conn="2")
    first = connect(proxy.port)
    second = connect(proxy.port)
    try:
        with RawClient(proxy.port) as third:
            third.send(messages.startup_message({"user": "app", "database": "app"}))
            fields = third.expect_error_and_close()
        assert fields["C"] == "53300", fields
        assert "max_client_conn" in fields["M"]
        with pytest.raises(psycopg.OperationalError, match="no more connections allowed"):
            psycopg.connect(
                f"host=127.0.0.1 port={proxy.port} user=app password={APP_PASSWORD} dbname=app",
                connect_timeout=10,
            )
        assert first.execute("SELECT 1").fetchone() == (1,)
        assert second.execute("SELECT 2").fetchone() == (2,)
    finally:
        first.close()
        second.close()
    _assert_still_serving(proxy)


def test_unreachable_server_gives_08006_could_not_connect(make_proxy) -> None:
    proxy = make_proxy(server="127.0.0.1:1", server_connect_timeout="2")
    with RawClient(proxy.port) as client:
        fields = _login_error(client, "app", APP_PASSWORD, "app")
    assert fields["C"] == "08006", fields
    assert "could not connect" in fields["M"]
    wait_for(lambda: _client_count(proxy) == 0, what="the proxy to forget the client")


def test_a_client_that_floods_while_it_waits_for_a_server_is_held_to_two_chunks(
    make_proxy,
) -> None:
    """A waiting client is read on (most send nothing more), but a second chunk pauses it."""
    proxy = make_proxy(default_pool_size="1")
    chunk_limit = 256 * 1024  # uvloop reads at most this much per data_received

    def held() -> tuple[int, bool]:
        [client] = [c for c in proxy.proxy.clients if c.server is None and c.state is not None]
        assert client.gate is not None
        return sum(map(len, client.state.pending)), client.gate.is_open

    with connect(proxy.port) as holder:
        holder.execute("BEGIN")
        holder.execute("SELECT 1")  # the pool's only server stays with this client
        with _logged_in(proxy.port) as flooder:
            flooder.sock.settimeout(1.0)
            queries = messages.query("SELECT 1") * 4096  # 68 KiB a send
            sent = 0
            try:
                for _ in range(800):  # 54 MiB: far past what the socket buffers take
                    flooder.sock.sendall(queries)
                    sent += len(queries)
            except TimeoutError:
                pass  # the proxy stopped reading: the socket buffers filled up
            else:
                pytest.fail(f"the proxy read all {sent} bytes of a client waiting for a server")
            size, reading = proxy.call(held)
            assert not reading, "the proxy still reads a client that floods while waiting"
            assert 0 < size <= 2 * chunk_limit, f"{size} bytes held of {sent} sent"
        holder.rollback()
    _assert_still_serving(proxy)
