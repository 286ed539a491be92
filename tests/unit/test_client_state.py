"""ClientState: what a client sent, what may go to a server, and when a server is needed."""

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgproxy.core.client import ClientPhase, ClientState
from pgproxy.core.server import ClientView
from pgproxy.errors import ProtocolError
from pgproxy.wire.codes import FrontendCode


def msg(code: str, body: bytes = b"") -> bytes:
    return code.encode() + struct.pack("!i", len(body) + 4) + body


def query(sql: str) -> bytes:
    return msg("Q", sql.encode() + b"\x00")


PARSE = msg("P", b"\x00SELECT 1\x00\x00\x00")
BIND = msg("B", b"\x00\x00\x00\x00\x00\x00\x00\x00")
EXECUTE = msg("E", b"\x00\x00\x00\x00\x00")
SYNC = msg("S")
TERMINATE = msg("X")
COPY_DATA = msg("d", b"1\tone\n")


def new_client() -> ClientState:
    return ClientState(id=7, user="app", database="app", connected_at=0.0, view=ClientView({}, {}))


def codes(msgs: list[tuple[int, bytes, int]]) -> list[int]:
    return [code for code, _body, _end in msgs]


# --- feed ---------------------------------------------------------------------------------


def test_feed_returns_the_chunk_as_received_with_its_watched_messages() -> None:
    client = new_client()
    chunk = PARSE + BIND + EXECUTE + COPY_DATA + SYNC
    out, msgs = client.feed(chunk)
    assert out is chunk  # forwarded by reference, not copied
    assert codes(msgs) == [FrontendCode.PARSE, FrontendCode.BIND, FrontendCode.EXECUTE, ord("S")]
    assert msgs[-1][2] == len(chunk)
    assert not client.terminated


def test_feed_of_unwatched_bytes_only_returns_no_messages() -> None:
    client = new_client()
    out, msgs = client.feed(COPY_DATA)
    assert out == COPY_DATA
    assert msgs == []


def test_terminate_cuts_the_data_before_it() -> None:
    client = new_client()
    out, msgs = client.feed(query("SELECT 1") + SYNC + TERMINATE + query("SELECT 2"))
    assert out == query("SELECT 1") + SYNC
    assert codes(msgs) == [FrontendCode.QUERY, FrontendCode.SYNC]
    assert client.terminated


def test_terminate_alone_forwards_nothing() -> None:
    client = new_client()
    out, msgs = client.feed(TERMINATE)
    assert out == b""
    assert msgs == []
    assert client.terminated
    assert client.at_boundary


def test_terminate_after_unwatched_bytes_keeps_them() -> None:
    client = new_client()
    out, msgs = client.feed(COPY_DATA + TERMINATE)
    assert out == COPY_DATA
    assert msgs == []


def test_terminate_split_across_chunks_leaves_the_client_off_boundary() -> None:
    # The first read's "X\0" went out before it could be recognised: the server now holds
    # half a message, so it must be closed, never pooled. Nothing more may be forwarded.
    client = new_client()
    stream = query("SELECT 1") + TERMINATE
    cut = len(stream) - 3
    outs = [client.feed(chunk)[0] for chunk in (stream[:cut], stream[cut:])]
    assert client.terminated
    assert outs == [stream[:cut], b""]
    assert not client.at_boundary


def test_terminate_with_a_body_is_a_protocol_error() -> None:
    client = new_client()
    with pytest.raises(ProtocolError):
        client.feed(query("SELECT 1") + msg("X", b"junk"))


# --- hold / take_pending ------------------------------------------------------------------


def test_hold_requests_a_server_once_and_remembers_when_the_wait_began() -> None:
    client = new_client()
    first, first_msgs = client.feed(query("SELECT 1"))
    assert client.hold(first, first_msgs, now=10.0)
    assert client.phase is ClientPhase.WAITING
    assert client.waiting_since == 10.0

    second, second_msgs = client.feed(query("SELECT 2"))
    assert not client.hold(second, second_msgs, now=11.0)
    assert client.waiting_since == 10.0
    assert client.pending == [query("SELECT 1"), query("SELECT 2")]
    assert codes(client.pending_msgs) == [FrontendCode.QUERY, FrontendCode.QUERY]


def test_hold_of_nothing_requests_nothing() -> None:
    client = new_client()
    assert not client.hold(b"", [], now=1.0)
    assert client.phase is ClientPhase.IDLE
    assert client.pending == []


def test_hold_of_half_a_message_still_requests_a_server() -> None:
    client = new_client()
    out, msgs = client.feed(query("SELECT 1")[:4])
    assert msgs == []
    assert client.hold(out, msgs, now=2.0)
    assert not client.at_boundary


def test_hold_while_active_does_not_request_another_server() -> None:
    client = new_client()
    client.phase = ClientPhase.ACTIVE
    out, msgs = client.feed(query("SELECT 1"))
    assert not client.hold(out, msgs, now=3.0)
    assert client.pending == [query("SELECT 1")]


def test_take_pending_returns_bytes_in_order_and_empties_the_hold() -> None:
    client = new_client()
    for part in (PARSE + BIND, EXECUTE, SYNC):
        out, msgs = client.feed(part)
        client.hold(out, msgs, now=0.0)
    data, msgs = client.take_pending()
    assert data == PARSE + BIND + EXECUTE + SYNC
    assert codes(msgs) == [
        FrontendCode.PARSE,
        FrontendCode.BIND,
        FrontendCode.EXECUTE,
        FrontendCode.SYNC,
    ]
    assert client.pending == []
    assert client.pending_msgs == []
    assert client.take_pending() == (b"", [])


def test_hold_after_take_pending_while_idle_requests_a_server_again() -> None:
    client = new_client()
    out, msgs = client.feed(query("SELECT 1"))
    client.hold(out, msgs, now=1.0)
    client.take_pending()
    client.phase = ClientPhase.IDLE  # unlinked after its transaction
    out, msgs = client.feed(query("SELECT 2"))
    assert client.hold(out, msgs, now=5.0)
    assert client.waiting_since == 5.0


# --- at_boundary --------------------------------------------------------------------------


def test_at_boundary_is_false_while_half_a_message_is_in() -> None:
    client = new_client()
    whole = query("SELECT 1")
    seen = [client.at_boundary]
    # Half a header, then the header done with half the body, then the rest.
    for piece in (whole[:3], whole[3:8], whole[8:]):
        client.feed(piece)
        seen.append(client.at_boundary)
    assert seen == [True, False, False, True]


def test_at_boundary_is_false_inside_an_unwatched_message() -> None:
    client = new_client()
    client.feed(COPY_DATA[:-1])
    assert not client.at_boundary
    client.feed(COPY_DATA[-1:])
    assert client.at_boundary


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_any_split_forwards_every_byte_and_the_same_messages(data: st.DataObject) -> None:
    stream = query("BEGIN") + PARSE + BIND + EXECUTE + COPY_DATA + SYNC + query("COMMIT")
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    client = new_client()
    forwarded = b""
    seen: list[int] = []
    start = 0
    for stop in [*cuts, len(stream)]:
        out, msgs = client.feed(stream[start:stop])
        forwarded += out
        seen.extend(codes(msgs))
        start = stop
    assert forwarded == stream
    assert seen == [ord(c) for c in "QPBESQ"]
    assert client.at_boundary
