"""The hostile inputs the issue names, one by one, against a live proxy; and a memory bound.

Each case talks raw bytes to one proxy shared by the module and checks what came back: a FATAL
ErrorResponse with the expected SQLSTATE, then a close. The proxy must never log an internal
error, must forget every bad client, and must still serve a normal one afterwards.
"""

from __future__ import annotations

import gc
import logging
import struct
import time
import tracemalloc
from collections.abc import Callable

import pytest

from pgproxy.wire import messages
from pgproxy.wire.codes import PROTOCOL_VERSION_3
from pgproxy.wire.scram import ScramClientExchange, md5_response
from tests.e2e.helpers import APP_PASSWORD, wait_for

from .conftest import RawClient, assert_still_serving, client_count, logged_in
from .support import FULL, auth_code, error_fields, packet, startup_packet, typed

pytestmark = pytest.mark.usefixtures("pgproxy_log")

V3 = struct.pack("!i", PROTOCOL_VERSION_3)
GIB = 1 << 30
MIB = 1 << 20


def expect_fatal(client: RawClient, sqlstate: str) -> dict[str, str]:
    """The proxy's one FATAL ErrorResponse, then its close (EOF or reset)."""
    received = client.read_until_closed()
    assert client.closed
    errors = error_fields(received)
    assert len(errors) == 1, received
    assert received[-1][0] == "E", received
    assert errors[0]["S"] == "FATAL", errors
    assert errors[0]["C"] == sqlstate, errors
    return errors[0]


# --- startup packets ---------------------------------------------------------------------------

STARTUP_CASES = {
    "length_0": struct.pack("!i", 0),
    "length_negative": struct.pack("!i", -1) + V3,
    "length_min_int32": struct.pack("!i", -(2**31)) + V3,
    "length_0x7fffffff": struct.pack("!i", 0x7FFFFFFF) + V3,
    "length_over_1_gib": struct.pack("!i", GIB + 5) + V3,
    "length_10001": struct.pack("!i", 10_001) + V3,
    "invalid_utf8_user_name": startup_packet([(b"user", b"\xc3\x28")]),
    "invalid_utf8_parameter_name": startup_packet([(b"user", b"app"), (b"\xff\xfe", b"x")]),
    "invalid_utf8_parameter_value": startup_packet([(b"user", b"app"), (b"options", b"\x80")]),
    "invalid_utf8_database": startup_packet([(b"user", b"app"), (b"database", b"\xed\xa0\x80")]),
    "parameter_without_value": packet(V3 + b"user\x00app\x00database\x00\x00"),
    "duplicate_parameter": startup_packet([(b"user", b"app"), (b"user", b"app")]),
    "cancel_request_too_long": packet(struct.pack("!iII", 80877102, 1, 2) + b"\x00" * 4),
    "ssl_request_too_long": packet(struct.pack("!i", 80877103) + b"\x00"),
}


@pytest.mark.parametrize("case", sorted(STARTUP_CASES))
def test_hostile_startup_packet_gets_08p01_and_a_close(scram_proxy, case):
    with RawClient(scram_proxy.port) as client:
        client.send(STARTUP_CASES[case])
        # No half-close: the answer must come from the bytes alone.
        expect_fatal(client, "08P01")
    assert_still_serving(scram_proxy)


def test_startup_packet_without_a_user_gets_28000(scram_proxy):
    with RawClient(scram_proxy.port) as client:
        client.send(startup_packet([(b"database", b"app")]))
        expect_fatal(client, "28000")


@pytest.mark.parametrize("half_close", [False, True])
def test_a_one_mib_startup_packet_is_refused_with_08p01(scram_proxy, half_close):
    body = V3 + b"user\x00app\x00application_name\x00" + b"a" * MIB + b"\x00\x00"
    with RawClient(scram_proxy.port) as client:
        sent = client.send(packet(body))
        if half_close and sent:
            client.shutdown_write()
        fields = expect_fatal(client, "08P01")
    assert "invalid length of startup packet" in fields["M"]
    assert_still_serving(scram_proxy)


# --- message headers during authentication ----------------------------------------------------


def at_sasl(port: int) -> RawClient:
    client = RawClient(port)
    client.send(messages.startup_message({"user": "app", "database": "app"}))
    request = client.read_message()
    assert request is not None and auth_code(request[1]) == 10, request
    return client


@pytest.mark.parametrize("length", [0, 3, -1, -(2**31), 0x7FFFFFFF, GIB + 5, 65_540])
def test_hostile_length_of_a_sasl_message_gets_08p01(scram_proxy, length):
    with at_sasl(scram_proxy.port) as client:
        client.send(b"p" + struct.pack("!i", length))
        fields = expect_fatal(client, "08P01")
    assert "invalid message length" in fields["M"]


def test_a_one_mib_sasl_initial_response_gets_08p01(scram_proxy):
    with at_sasl(scram_proxy.port) as client:
        client.send(messages.sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=" + b"a" * MIB))
        expect_fatal(client, "08P01")


def _sasl_initial(mechanism: bytes, length: int, data: bytes) -> bytes:
    return typed("p", mechanism + b"\x00" + struct.pack("!i", length) + data)


SASL_INITIAL_CASES = {
    "unknown_mechanism": _sasl_initial(b"SCRAM-SHA-1", 11, b"n,,n=,r=abc"),
    "plus_mechanism": _sasl_initial(b"SCRAM-SHA-256-PLUS", 11, b"p,,n=,r=abc"),
    "empty_mechanism": _sasl_initial(b"", 11, b"n,,n=,r=abc"),
    "negative_data_length": _sasl_initial(b"SCRAM-SHA-256", -2, b""),
    "minus_one_with_data": _sasl_initial(b"SCRAM-SHA-256", -1, b"n,,n=,r=abc"),
    "data_length_0x7fffffff": _sasl_initial(b"SCRAM-SHA-256", 0x7FFFFFFF, b"n,,n=,r=abc"),
    "data_length_over_1_gib": _sasl_initial(b"SCRAM-SHA-256", GIB + 5, b"n,,n=,r=abc"),
    "no_data_length": typed("p", b"SCRAM-SHA-256\x00\x00\x00"),
    "truncated_client_first": _sasl_initial(b"SCRAM-SHA-256", 5, b"n,,n="),
    "client_first_channel_binding": _sasl_initial(b"SCRAM-SHA-256", 15, b"p=tls,,n=,r=abc"),
    "client_first_invalid_utf8": _sasl_initial(b"SCRAM-SHA-256", 11, b"n,,n=,r=\xff\xfe\xfd"),
    "not_a_password_message": typed("Q", b"SELECT 1\x00"),
}


@pytest.mark.parametrize("case", sorted(SASL_INITIAL_CASES))
def test_broken_sasl_initial_response_gets_08p01(scram_proxy, case):
    with at_sasl(scram_proxy.port) as client:
        client.send(SASL_INITIAL_CASES[case])
        expect_fatal(client, "08P01")


def at_client_final(port: int, password: str = APP_PASSWORD) -> tuple[RawClient, bytes]:
    """A client whose proxy waits for client-final; and the right client-final."""
    client = at_sasl(port)
    exchange = ScramClientExchange(password)
    client.send(messages.sasl_initial_response("SCRAM-SHA-256", exchange.client_first()))
    cont = client.read_message()
    assert cont is not None and cont[1] is not None and auth_code(cont[1]) == 11, cont
    return client, exchange.handle_server_first(cont[1][4:])


def _replace(final: bytes, **attributes: str) -> bytes:
    parts = dict(part.split("=", 1) for part in final.decode().split(","))
    parts.update(attributes)
    return ",".join(f"{k}={v}" for k, v in parts.items()).encode()


CLIENT_FINAL_CASES: dict[str, tuple[Callable[[bytes], bytes], str]] = {
    "wrong_nonce": (lambda f: _replace(f, r="bm90LXRoZS1ub25jZQ"), "08P01"),
    "nonce_prefix_only": (lambda f: _replace(f, r=f.split(b"r=")[1][:10].decode()), "08P01"),
    "channel_binding_y": (lambda f: _replace(f, c="eSws"), "08P01"),
    "channel_binding_p": (lambda f: _replace(f, c="cD10bHMtdW5pcXVlLCw="), "08P01"),
    "channel_binding_not_base64": (lambda f: _replace(f, c="b!ws"), "08P01"),
    "proof_not_base64": (lambda f: _replace(f, p="!!!!"), "08P01"),
    "proof_too_short": (lambda f: _replace(f, p="AAAA"), "08P01"),
    "proof_wrong": (lambda f: _replace(f, p="A" * 43 + "="), "28P01"),
    "truncated_before_proof": (lambda f: f[: f.index(b",p=")], "08P01"),
    "truncated_in_proof": (lambda f: f[:-10], "08P01"),
    "truncated_to_nothing": (lambda f: b"", "08P01"),
    "one_mib": (lambda f: f + b"," + b"x=" + b"a" * MIB, "08P01"),
    "invalid_utf8": (lambda f: f + b"\xff", "08P01"),
}


@pytest.mark.parametrize("case", sorted(CLIENT_FINAL_CASES))
def test_broken_client_final_gets_an_error_and_never_a_login(scram_proxy, case):
    change, sqlstate = CLIENT_FINAL_CASES[case]
    client, final = at_client_final(scram_proxy.port)
    with client:
        client.send(messages.sasl_response(change(final)))
        expect_fatal(client, sqlstate)
        assert all(code != "R" or auth_code(body) != 0 for code, body in client.transcript()), (
            "AuthenticationOk"
        )


MD5_CASES = {
    "empty_body": (typed("p", b""), "08P01"),
    "empty_password": (typed("p", b"\x00"), "28P01"),
    "two_strings": (typed("p", b"md5\x00x\x00"), "08P01"),
    "wrong_hash": (typed("p", b"md5" + b"0" * 32 + b"\x00"), "28P01"),
    "longest_allowed": (typed("p", b"x" * 65_534 + b"\x00"), "28P01"),
    "over_long_1_mib": (typed("p", b"x" * MIB + b"\x00"), "08P01"),
    "length_0x7fffffff": (b"p" + struct.pack("!i", 0x7FFFFFFF), "08P01"),
    "length_negative": (b"p" + struct.pack("!i", -5), "08P01"),
}


@pytest.mark.parametrize("case", sorted(MD5_CASES))
def test_md5_password_message_cases(md5_proxy, case):
    data, sqlstate = MD5_CASES[case]
    with RawClient(md5_proxy.port) as client:
        client.send(messages.startup_message({"user": "app", "database": "app"}))
        request = client.read_message()
        assert request is not None and auth_code(request[1]) == 5, request
        client.send(data)
        expect_fatal(client, sqlstate)
    assert_still_serving(md5_proxy)


def test_md5_with_the_right_password_still_logs_in(md5_proxy):
    with RawClient(md5_proxy.port) as client:
        client.send(messages.startup_message({"user": "app", "database": "app"}))
        request = client.read_message()
        assert request is not None and request[1] is not None
        client.send(messages.password_message(md5_response(APP_PASSWORD, "app", request[1][4:])))
        assert client.read_until("ZE")[-1] == ("Z", b"I")


# --- message headers after login ------------------------------------------------------------


@pytest.mark.parametrize(
    "header",
    [
        b"Q" + struct.pack("!i", 0),
        b"Q" + struct.pack("!i", -(2**31)),
        b"Q" + struct.pack("!i", 0x7FFFFFFF),
        b"P" + struct.pack("!i", GIB + 1),
        b"d" + struct.pack("!i", -4),
        b"y" + struct.pack("!i", 4),  # no such message type
        b"p" + struct.pack("!i", 8) + b"x\x00\x00\x00",  # a password message after login
    ],
)
def test_hostile_message_header_after_login_gets_08p01(scram_proxy, header):
    with logged_in(scram_proxy.port) as client:
        client.send(header)
        expect_fatal(client, "08P01")
    assert_still_serving(scram_proxy)


def test_a_hostile_header_inside_a_transaction_gets_08p01_and_the_proxy_recovers(scram_proxy):
    with logged_in(scram_proxy.port) as client:
        client.send(messages.query("BEGIN; SELECT 1"))
        assert client.read_until("Z")[-1] == ("Z", b"T")
        client.send(b"Q" + struct.pack("!i", 0x7FFFFFFF))
        expect_fatal(client, "08P01")
    assert_still_serving(scram_proxy)


# --- memory -----------------------------------------------------------------------------------

# Hostile connections per measured round, and the bound: after a warm-up round, another
# MEMORY_ROUND of them (bad startup packets, 1 MiB ones, broken SASL, wrong passwords, clients
# gone mid-packet, and logged-in clients that break the framing or leave half a message on a
# server) may leave at most MEMORY_BOUND bytes more allocated in the process (tracemalloc, all
# threads). A leaked ClientConnection costs about 4.4 KiB (measured by leaking them on
# purpose), and the 1 MiB packets pass through 64-256 KiB read buffers: any per-connection
# leak shows up as several times the bound.
MEMORY_ROUND = 5000 if FULL else 500
MEMORY_BOUND = 64 * 1024


def _hostile_round(port: int, count: int) -> int:
    """`count` hostile connections of six kinds, in turn; returns how many were failed logins."""
    cases = [
        *STARTUP_CASES.values(),
        packet(V3 + b"user\x00app\x00application_name\x00" + b"a" * MIB + b"\x00\x00"),
    ]
    failed_logins = 0
    for i in range(count):
        kind = i % 6
        failed_logins += kind < 3
        if kind == 0:
            with RawClient(port) as client:
                client.send(cases[i % len(cases)])
                client.read_until_closed()
        elif kind == 1:
            with at_sasl(port) as client:
                client.send(SASL_INITIAL_CASES["negative_data_length"])
                client.read_until_closed()
        elif kind == 2:
            client, final = at_client_final(port, password="wrong")
            with client:
                client.send(messages.sasl_response(final))
                client.read_until_closed()
        elif kind == 3:
            with RawClient(port) as client:
                # Half a startup packet, then gone: nothing was answered, all is forgotten.
                client.send(messages.startup_message({"user": "app"})[:9])
        elif kind == 4:
            with logged_in(port) as client:
                # A query on a server, then a header of 0x7fffffff: 08P01, the server goes back.
                client.send(messages.query("SELECT 1"))
                client.read_until("Z")
                client.send(b"Q" + struct.pack("!i", 0x7FFFFFFF))
                client.read_until_closed()
        else:
            with logged_in(port) as client:
                # Half a Query, then gone: the server has half a message and must be closed.
                client.send(messages.query("SELECT 1")[:7])
    return failed_logins


def test_hostile_connections_leave_no_memory_behind(scram_proxy):
    pgproxy_logger = logging.getLogger("pgproxy")
    level = pgproxy_logger.level
    # Warnings (one per failed login) would pile up in pytest's log capture, not in pgproxy.
    pgproxy_logger.setLevel(logging.ERROR)
    tracemalloc.start(1)
    try:
        _hostile_round(scram_proxy.port, MEMORY_ROUND)  # warm-up: caches, pools, lazy imports
        wait_for(lambda: client_count(scram_proxy) == 0, what="the warm-up clients to go")
        gc.collect()
        before = tracemalloc.take_snapshot()
        failures = scram_proxy.call(lambda: scram_proxy.proxy.login_failures)
        started = time.monotonic()
        expected_failures = _hostile_round(scram_proxy.port, MEMORY_ROUND)
        elapsed = time.monotonic() - started
        failures = scram_proxy.call(lambda: scram_proxy.proxy.login_failures) - failures
        wait_for(lambda: client_count(scram_proxy) == 0, what="the hostile clients to go")
        gc.collect()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
        pgproxy_logger.setLevel(level)
    ignore = [
        tracemalloc.Filter(False, tracemalloc.__file__),
        tracemalloc.Filter(False, "*/_pytest/*"),
        tracemalloc.Filter(False, logging.__file__),
    ]
    diff = after.filter_traces(ignore).compare_to(before.filter_traces(ignore), "filename")
    growth = sum(stat.size_diff for stat in diff)
    top = "\n".join(str(stat) for stat in diff[:8])
    print(f"{MEMORY_ROUND} hostile connections in {elapsed:.2f} s: {growth} bytes more\n{top}")
    assert failures == expected_failures, "every refused login is counted"
    assert growth < MEMORY_BOUND, f"{growth} bytes more after {MEMORY_ROUND} connections:\n{top}"
    state = scram_proxy.call(
        lambda: (
            len(scram_proxy.proxy.clients),
            len(scram_proxy.proxy._close_reasons),
            {(key.database, key.user) for key in scram_proxy.proxy.pools},
        )
    )
    # Nothing per client is left, and no pool exists but the one normal logins made.
    assert state[:2] == (0, 0), "clients or close reasons left behind"
    assert state[2] <= {("app", "app")}, state
    assert_still_serving(scram_proxy)
