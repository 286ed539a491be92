"""Fuzzing a live listener: hypothesis-made clients against one running proxy per module.

Before login, during SCRAM and md5, after login and on the admin console, each example opens
a raw socket, sends mutated protocol bytes and reads until the proxy closes (with a deadline:
a hang fails the test). What came back must be well framed and either a normal answer or a
FATAL ErrorResponse with an expected SQLSTATE followed by the close; AuthenticationOk must
never come without the right password. At the end no error was logged, the proxy forgot every
client, Postgres has no more backends than the pool allows, and a normal client is served.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from pgproxy.localpg import LocalPostgres
from pgproxy.wire import messages
from pgproxy.wire.scram import ScramClientExchange, md5_response
from tests.e2e.helpers import APP_PASSWORD

from .conftest import STATS_PASSWORD, STATS_USER, RawClient, assert_still_serving, logged_in
from .support import (
    FRAMING_SAFE,
    INTERNAL_ERROR,
    SESSION_FATAL_SQLSTATES,
    Message,
    auth_code,
    check_login_transcript,
    error_fields,
    fuzz_settings,
    is_pgproxy_internal_error,
    mutated,
    split_backend,
    startup_packet,
    typed,
)
from .test_console_fuzz import console_input

pytestmark = pytest.mark.usefixtures("pgproxy_log")

POOL_SIZE = 2  # conftest.start_proxy's default_pool_size
PROXIES = 2  # this module's: scram_proxy and md5_proxy


def finish(proxy, pg: LocalPostgres) -> None:
    """After a whole run: clients forgotten, servers within the pool, a normal client served."""
    assert_still_serving(proxy)
    assert proxy.server_count() <= POOL_SIZE
    assert pg.backends(user="app") <= POOL_SIZE * PROXIES


def send_and_close(client: RawClient, data: bytes, *, wait: bool) -> list[Message]:
    """Send, give the proxy a moment to answer on its own (`wait`), half-close, read to the end."""
    client.send(data)
    if wait:
        client.read_until_closed(idle=0.05)
    client.shutdown_write()
    return client.read_until_closed()


# --- before login ------------------------------------------------------------------------------

USERS = st.sampled_from([b"app", b"nobody", b"", b"\xc3\xa9", b"\xff"])
PARAM_NAMES = st.sampled_from(
    [b"database", b"application_name", b"options", b"client_encoding", b"replication", b"_pq_.x"]
)
PARAM_VALUES = st.sampled_from(
    [b"app", b"pgproxy", b"-c work_mem=1MB", b"UTF8", b"true", b"", b"\xff\xfe", b"x" * 9000]
) | st.binary(max_size=16)


@st.composite
def prelogin_streams(draw) -> bytes:
    requests = st.sampled_from([messages.ssl_request(), messages.gssenc_request()])
    packets = [draw(requests) for _ in range(draw(st.integers(0, 2)))]
    pairs = [(b"user", draw(USERS))]
    pairs += draw(st.lists(st.tuples(PARAM_NAMES, PARAM_VALUES), max_size=3))
    minor = draw(st.sampled_from([0, 0, 0, 5]))
    major = draw(st.sampled_from([3, 3, 3, 3, 2, 1234]))
    packets.append(startup_packet(pairs, protocol=(major << 16) | minor))
    if draw(st.integers(0, 9)) == 9:
        packets = [messages.cancel_request(draw(st.integers(0, 2**32 - 1)), 1)]
    if draw(st.booleans()):
        packets = draw(mutated(packets, is_typed=False))
    stream = b"".join(packets)
    if draw(st.integers(0, 9)) == 9:
        stream += draw(st.binary(max_size=64))
    return stream


@fuzz_settings(ci=60, full=3000)
@given(stream=prelogin_streams(), wait=st.booleans())
def test_any_startup_phase_bytes_get_a_normal_answer_or_a_fatal_error_and_a_close(
    scram_proxy, pg, stream, wait
):
    with RawClient(scram_proxy.port) as client:
        received = send_and_close(client, stream, wait=wait)
    assert client.closed
    check_login_transcript(received, may_log_in=False)
    codes = [code for code, _body in received]
    fields = error_fields(received)
    event(f"{''.join(codes)} {fields[0]['C'] if fields else ''}")


def test_startup_fuzz_left_the_proxy_serving(scram_proxy, pg):
    finish(scram_proxy, pg)


# --- SCRAM --------------------------------------------------------------------------------------

PASSWORDS = st.sampled_from([APP_PASSWORD, APP_PASSWORD, "wrong", "", "x" * 100_000])
MECHANISMS = st.sampled_from(["SCRAM-SHA-256"] * 5 + ["SCRAM-SHA-256-PLUS", "PLAIN", ""])


@st.composite
def maybe_mutated(draw, message: bytes) -> bytes:
    """`message`, or one time in three a mutation of it."""
    if draw(st.integers(0, 2)) == 2:
        return b"".join(draw(mutated([message], is_typed=True, types=[ord("p"), ord("X")])))
    return message


def answer(client: RawClient, data, message: bytes) -> Message | None:
    """Send `message` (maybe mutated) and read the proxy's next message; None when the message
    was mutated (the proxy may rightly wait for more: the caller half-closes instead)."""
    sent = data.draw(maybe_mutated(message))
    client.send(sent)
    if sent != message:
        event("mutated")
        return None
    return client.read_message()


def is_auth(message: Message | None, code: int) -> bool:
    return message is not None and message[0] == "R" and auth_code(message[1]) == code


def end_conversation(client: RawClient, last: Message | None) -> None:
    """Say goodbye after a login, half-close, and read everything up to the close."""
    if last is not None and last[0] == "R" and auth_code(last[1]) == 0:
        client.read_until("ZE")
        client.send(messages.terminate())
    client.shutdown_write()
    client.read_until_closed()


@fuzz_settings(ci=60, full=3000)
@given(
    user=st.sampled_from(["app", "app", "nobody", STATS_USER]),
    password=PASSWORDS,
    mechanism=MECHANISMS,
    without_data=st.integers(0, 5),
    data=st.data(),
)
def test_any_scram_conversation_logs_in_only_with_the_right_password(
    scram_proxy, pg, user, password, mechanism, without_data, data
):
    rightful = user == "app" and password == APP_PASSWORD
    exchange = ScramClientExchange(password)
    with RawClient(scram_proxy.port) as client:
        client.send(messages.startup_message({"user": user, "database": "app"}))
        last = client.read_message()
        assert is_auth(last, 10), last
        first = None if without_data == 0 else exchange.client_first()
        last = answer(client, data, messages.sasl_initial_response(mechanism, first))
        if first is None and is_auth(last, 11) and last == ("R", struct.pack("!i", 11)):
            # The empty challenge: client-first comes in a SASLResponse of its own.
            last = answer(client, data, messages.sasl_response(exchange.client_first()))
        if is_auth(last, 11):
            assert last is not None and last[1] is not None
            last = answer(
                client, data, messages.sasl_response(exchange.handle_server_first(last[1][4:]))
            )
            if is_auth(last, 12):
                last = client.read_message()
        end_conversation(client, last)
    got_in = check_login_transcript(client.transcript(), may_log_in=rightful)
    event("logged in" if got_in else "refused")


@fuzz_settings(ci=40, full=2000)
@given(password=PASSWORDS, data=st.data())
def test_any_md5_conversation_logs_in_only_with_the_right_password(md5_proxy, pg, password, data):
    rightful = password == APP_PASSWORD
    with RawClient(md5_proxy.port) as client:
        client.send(messages.startup_message({"user": "app", "database": "app"}))
        request = client.read_message()
        assert is_auth(request, 5) and request is not None and request[1] is not None
        response = md5_response(password, "app", request[1][4:])
        end_conversation(client, answer(client, data, messages.password_message(response)))
    got_in = check_login_transcript(client.transcript(), may_log_in=rightful)
    event("logged in" if got_in else "refused")


def test_auth_fuzz_left_the_proxies_serving(scram_proxy, md5_proxy, pg):
    finish(scram_proxy, pg)
    finish(md5_proxy, pg)


# --- after login ---------------------------------------------------------------------------------

NAMES = st.sampled_from([b"", b"s1", b"s2", b"\xff\xfe"])
# Statements that cannot run long or change anything outside the session; mutations may still
# turn them into something else, which Postgres then refuses.
SQL = st.sampled_from(
    [
        b"SELECT 1",
        b"SELECT $1::int",
        b"BEGIN",
        b"COMMIT",
        b"ROLLBACK",
        b"SELECT 1/0",
        b"SELECT * FROM no_such_table",
        b"SET application_name = 'fuzz'",
        b"SET work_mem = '2MB'",
        b"RESET ALL",
        b"DISCARD ALL",
        b"LISTEN fuzz",
        b"DECLARE c CURSOR WITH HOLD FOR SELECT 1",
        b"CLOSE ALL",
        b"PREPARE p AS SELECT 1",
        b"DEALLOCATE ALL",
        b"COPY (SELECT 1) TO STDOUT",
        b"SELECT repeat('x', 70000)",
        b"SELECT '\xff'",
        b"",
        b";",
    ]
)
# Mostly the terminator a name needs; sometimes none (Postgres: "invalid string in message").
NUL = st.sampled_from([b"\x00"] * 7 + [b""])
INT16 = struct.Struct("!h").pack
INT32 = struct.Struct("!i").pack


@st.composite
def frontend_messages(draw) -> bytes:
    kind = draw(st.sampled_from("QPBDECSHdcfFr"))
    name, sql = draw(NAMES), draw(SQL)
    if kind == "Q":
        return typed("Q", sql + b"\x00")
    if kind == "P":
        types = draw(st.lists(st.sampled_from([0, 23, 25, -1]), max_size=2))
        if draw(NUL) == b"":
            return typed("P", name)  # not even the name is terminated
        return typed(
            "P", name + b"\x00" + sql + b"\x00" + INT16(len(types)) + b"".join(map(INT32, types))
        )
    if kind == "B":
        values = draw(st.lists(st.sampled_from([b"1", b"x", b""]), max_size=2))
        params = b"".join(INT32(len(v)) + v for v in values)
        body = draw(NAMES) + b"\x00" + name + b"\x00" + INT16(0) + INT16(len(values)) + params
        return typed("B", body + INT16(0))
    if kind in "DC":
        return typed(kind, draw(st.sampled_from([b"S", b"P", b"X"])) + name + draw(NUL))
    if kind == "E":
        return typed("E", name + b"\x00" + INT32(draw(st.sampled_from([0, 1, -1]))))
    if kind in "SHc":
        return typed(kind, b"")
    if kind == "d":
        return typed("d", draw(st.binary(max_size=16)))
    if kind == "f":
        return typed("f", b"fuzz\x00")
    if kind == "F":  # FunctionCall of a function that does not exist
        return typed("F", INT32(1) + INT16(0) + INT16(0) + INT16(0))
    return typed(draw(st.sampled_from(b"QPBDECSHdcfF")), draw(st.binary(max_size=24)))


PROBE = "fuzz-probe"


@fuzz_settings(ci=60, full=3000)
@given(
    msgs=st.lists(frontend_messages(), max_size=8),
    well_framed=st.booleans(),
    data=st.data(),
)
def test_any_session_traffic_is_answered_or_refused_and_a_probe_still_runs(
    scram_proxy, pg, msgs, well_framed, data
):
    if well_framed:
        msgs = data.draw(
            mutated(msgs, is_typed=True, operations=FRAMING_SAFE, types=list(b"QPBDECSHdcfF"))
        )
    else:
        msgs = data.draw(mutated(msgs, is_typed=True, max_mutations=4))
    stream = b"".join(msgs)
    with logged_in(scram_proxy.port) as client:
        start = len(client.received)
        if well_framed:
            # Anything still open ends at Sync, an aborted transaction at ROLLBACK; then the
            # probe must run (unless a FATAL error or a Terminate closed the connection).
            client.send(stream + messages.sync() + messages.query(f"ROLLBACK; SELECT '{PROBE}'"))
            answered = read_probe(client)
            terminated = any(m[:1] == b"X" for m in msgs)
            fatal = sorted(
                {f["C"] for f in error_fields(session(client, start)) if f["S"] == "FATAL"}
            )
            if not answered:
                assert fatal or terminated, f"no probe answer, no FATAL: {session(client, start)}"
            event(f"well framed: {'probe answered' if answered else 'closed'} {fatal}")
            client.send(messages.terminate())
        else:
            client.send(stream)
            client.shutdown_write()
            client.read_until_closed()
            event("broken framing")
        client.shutdown_write()
        client.read_until_closed()
        check_session(session(client, start))


def read_probe(client: RawClient) -> bool:
    """Read until the probe's row and its ReadyForQuery (True), or the close (False)."""
    seen = False
    while (message := client.read_message()) is not None:
        code, body = message
        if code == "D" and body is not None and PROBE.encode() in body:
            seen = True
        elif code == "Z" and seen:
            return True
    return False


def session(client: RawClient, start: int) -> list[Message]:
    return split_backend(bytes(client.received[start:]))


def check_session(received: list[Message]) -> None:
    for i, fields in enumerate(error_fields(received)):
        assert not is_pgproxy_internal_error(fields), fields
        if fields.get("S") == "FATAL":
            assert fields.get("C") in SESSION_FATAL_SQLSTATES | {"08P01"}, fields
            assert i == len(error_fields(received)) - 1, "errors after a FATAL one"


def test_session_fuzz_left_the_proxy_serving(scram_proxy, pg):
    finish(scram_proxy, pg)


# --- the admin console ---------------------------------------------------------------------------


@fuzz_settings(ci=40, full=2000)
@given(msgs=console_input())
def test_any_console_traffic_of_a_stats_user_is_answered_or_refused(scram_proxy, msgs):
    with RawClient(scram_proxy.port) as client:
        rest = client.scram_login(STATS_USER, STATS_PASSWORD, database="pgproxy")
        assert rest[-1][0] == "Z", rest
        start = len(client.received)
        client.send(b"".join(msgs))
        client.shutdown_write()
        client.read_until_closed()
        received = session(client, start)
    assert all(body is not None for _code, body in received)
    for fields in error_fields(received):
        assert fields["C"] != INTERNAL_ERROR, fields  # the console's errors are all pgproxy's
        if fields["S"] == "FATAL":
            assert fields["C"] == "08P01", fields
        else:
            # A stats user may only SHOW (and SET): the others get 42501.
            assert fields["C"] in {"42601", "42704", "42501", "0A000"}, fields
    event("some SHOW answered" if any(c == "T" for c, _b in received) else "no SHOW answered")


def test_console_fuzz_left_the_proxy_serving(scram_proxy, pg):
    finish(scram_proxy, pg)
