"""Fuzzing message framing (`MessageScanner`, `ClientState`) and what a session's text does.

The scanner is the data path's hot loop; here it is fed streams with hostile lengths (0,
negative, below 4, past `max_length`, 0x7fffffff), invalid types and cut messages, split at
random points, under random settings. It must find exactly what a naive framer reading the
whole stream finds, and on bad framing raise `ProtocolError` and nothing else.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgproxy.core.client import ClientState
from pgproxy.core.params import build_prelude, quote_literal, startup_settings
from pgproxy.core.server import FRONTEND_VALID, ClientView
from pgproxy.core.session_state import SessionEffect, inspect
from pgproxy.errors import FeatureNotSupportedError, ProtocolError
from pgproxy.wire.scanner import MessageScanner

from .support import SPECIAL_LENGTHS, chunks, fuzz_settings, split_points, typed

CODES = st.sampled_from(b"QPBDESHXdcfCFpy\x00\xff") | st.integers(0, 255)


@st.composite
def streams(draw) -> bytes:
    """Messages with true lengths, some with a hostile length instead, maybe cut at the end."""
    parts = []
    for _ in range(draw(st.integers(0, 8))):
        message = typed(draw(CODES), draw(st.binary(max_size=48)))
        if draw(st.integers(0, 7)) == 7:
            length = draw(st.sampled_from(SPECIAL_LENGTHS))
            message = message[:1] + struct.pack("!i", length) + message[5:]
        parts.append(message)
    stream = b"".join(parts)
    if stream and draw(st.booleans()):
        stream = stream[: draw(st.integers(0, len(stream)))]
    return stream


def reference_frames(stream: bytes, table: dict[int, str], keep: int, max_length: int):
    """What a framer that sees the whole stream at once finds: (frames, error?, at_boundary)."""
    frames = []
    pos = 0
    n = len(stream)
    while n - pos >= 5:
        code = stream[pos]
        length = struct.unpack_from("!i", stream, pos + 1)[0]
        if length < 4 or length > max_length or table[code] == "invalid":
            return frames, True
        end = pos + 1 + length
        if end > n:
            return frames, False
        if table[code] == "watch":
            frames.append((code, stream[pos + 5 : end][:keep], end))
        elif table[code] == "mark":
            frames.append((code, b"", end))
        pos = end
    return frames, False


@fuzz_settings(ci=600)
@given(
    stream=streams(),
    watched=st.sets(CODES, max_size=6),
    valid=st.none() | st.sets(CODES, max_size=10),
    marked=st.sets(CODES, max_size=3),
    marking=st.booleans(),
    keep=st.sampled_from([0, 1, 5, 48, 1 << 20]),
    max_length=st.sampled_from([4, 20, 64, 1 << 30]),
    data=st.data(),
)
def test_any_split_of_any_stream_frames_like_the_whole_or_raises_protocol_error(
    stream, watched, valid, marked, marking, keep, max_length, data
):
    table = {}
    for code in range(256):
        kind = "skip" if valid is None or code in valid else "invalid"
        if code in watched:
            kind = "watch"
        elif marking and code in marked:
            kind = "mark"
        table[code] = kind
    expected, error = reference_frames(stream, table, keep, max_length)

    scanner = MessageScanner(watched, keep=keep, max_length=max_length, valid=valid, marked=marked)
    scanner.marking = marking
    got = []
    raised = False
    start = 0
    for piece in chunks(stream, data.draw(split_points(stream))):
        try:
            got += [(code, body, start + end) for code, body, end in scanner.feed(piece)]
        except ProtocolError:
            raised = True
            break
        start += len(piece)
    assert raised == error
    if error:
        assert got == expected[: len(got)]
    else:
        assert got == expected
        assert scanner.at_boundary == (not _ends_inside_a_message(stream))


def _ends_inside_a_message(stream: bytes) -> bool:
    """Does the stream end inside a message (header or body)?"""
    pos = 0
    n = len(stream)
    while pos < n:
        if n - pos < 5:
            return True
        end = pos + 1 + struct.unpack_from("!i", stream, pos + 1)[0]
        if end > n:
            return True
        pos = end
    return False


@pytest.mark.parametrize("length", [0, 3, -1, -(2**31), 0x7FFFFFFF, (1 << 30) + 1])
@pytest.mark.parametrize("split", [None, 1, 3])
def test_hostile_header_lengths_raise_protocol_error_in_one_piece_or_split(length, split):
    header = b"Q" + struct.pack("!i", length)
    scanner = MessageScanner({ord("Q")}, max_length=1 << 30)
    if split is not None:
        assert scanner.feed(header[:split]) == []
        header = header[split:]
    with pytest.raises(ProtocolError, match="invalid message length"):
        scanner.feed(header)


# --- ClientState: what a logged-in client's bytes become --------------------------------------


@fuzz_settings(ci=400)
@given(
    msgs=st.lists(
        st.tuples(st.sampled_from(sorted(FRONTEND_VALID)) | CODES, st.binary(max_size=40)),
        max_size=10,
    ),
    data=st.data(),
)
def test_client_state_forwards_a_prefix_of_what_it_got_or_raises_protocol_error(msgs, data):
    stream = b"".join(typed(code, body) for code, body in msgs)
    state = ClientState(id=1, user="app", database="app", connected_at=0.0, view=ClientView({}, {}))
    forwarded = b""
    for piece in chunks(stream, data.draw(split_points(stream))):
        if state.terminated:
            break
        try:
            out, _watched = state.feed(piece)
        except ProtocolError:
            return
        forwarded += out
    # Everything before a Terminate goes to the server, byte for byte; the Terminate never.
    terminate_at = next((i for i, (code, _body) in enumerate(msgs) if code == ord("X")), len(msgs))
    valid = all(code in FRONTEND_VALID for code, _body in msgs[:terminate_at])
    if valid:
        before = b"".join(typed(c, b) for c, b in msgs[:terminate_at])
        assert forwarded.startswith(before)
        torn = forwarded[len(before) :]
        # A Terminate split across reads: its first bytes went out with the earlier read,
        # and the state says so (that server must not be reused).
        assert torn == typed("X", b"")[: len(torn)]
        assert state.torn == bool(torn)
        assert state.terminated == (terminate_at < len(msgs))


# --- what a Query's text and the startup parameters do to the session --------------------------

SQL_WORDS = st.sampled_from(
    [
        "SET",
        "set",
        "RESET",
        "SESSION",
        "LOCAL",
        "ALL",
        "TIME ZONE",
        "NAMES",
        "DISCARD",
        "DEALLOCATE",
        "DECLARE",
        "HOLD",
        "CLOSE",
        "CREATE",
        "TEMP",
        "LISTEN",
        "PREPARE",
        "LOAD",
        "set_config(",
        "advisory_lock",
        "'x''y'",
        '"A b"',
        "=",
        "TO",
        "DEFAULT",
        ";",
        "--",
        "/*",
        "*/",
        "\n",
        "\x00",
        "é",
    ]
)


@fuzz_settings(ci=400)
@given(
    sql=st.lists(SQL_WORDS | st.text(max_size=8), max_size=10).map(" ".join).map(str.encode)
    | st.binary(max_size=80)
)
def test_inspecting_any_query_text_never_raises(sql):
    effect = inspect(sql)
    assert effect is None or isinstance(effect, SessionEffect)


@fuzz_settings(ci=300)
@given(
    params=st.dictionaries(
        st.sampled_from(["options", "application_name", "TimeZone", "search_path", "a.b", "x-y"])
        | st.text(max_size=10),
        st.text(max_size=30)
        | st.lists(
            st.sampled_from(["-c", "--", "a=b", "-ca=b", "--x-y=1", "\\ ", "\\", "=", "-c x"]),
            max_size=4,
        ).map(" ".join),
        max_size=4,
    )
)
def test_startup_parameters_become_settings_or_a_feature_not_supported_error(params):
    try:
        wanted = startup_settings(params)
    except FeatureNotSupportedError:
        return
    prelude = build_prelude(wanted, {})
    # Every value reaches the server only inside a quoted literal of set_config().
    assert prelude is None or prelude.startswith("SELECT pg_catalog.set_config(")
    for value in wanted.values():
        assert prelude is not None and quote_literal(value) in prelude
