"""MessageScanner: framing by length, watched types only, any split of the stream."""

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgproxy.errors import ProtocolError
from pgproxy.wire.scanner import MessageScanner


def msg(code: str | int, body: bytes = b"") -> bytes:
    code_byte = ord(code) if isinstance(code, str) else code
    return bytes((code_byte,)) + struct.pack("!i", len(body) + 4) + body


def feed_in_pieces(scanner: MessageScanner, stream: bytes, cuts: list[int]):
    """Feed `stream` split at `cuts`; return (code, body, absolute end) for every frame."""
    frames = []
    start = 0
    for stop in [*sorted(set(cuts)), len(stream)]:
        for code, body, end in scanner.feed(stream[start:stop]):
            frames.append((code, body, start + end))
        start = stop
    return frames


messages_strategy = st.lists(
    st.tuples(st.integers(0, 255), st.binary(max_size=40)), min_size=0, max_size=12
)


@settings(max_examples=300)
@given(
    messages=messages_strategy,
    watched=st.sets(st.integers(0, 255)),
    data=st.data(),
    keep=st.integers(0, 50),
)
def test_any_split_of_a_stream_yields_the_same_frames_as_feeding_it_whole(
    messages, watched, data, keep
):
    stream = b"".join(msg(code, body) for code, body in messages)
    expected = []
    offset = 0
    for code, body in messages:
        offset += 5 + len(body)
        if code in watched:
            expected.append((code, body[:keep], offset))
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=10))
    scanner = MessageScanner(watched, keep=keep)
    assert feed_in_pieces(scanner, stream, cuts) == expected
    assert scanner.at_boundary


@settings(max_examples=200)
@given(
    messages=messages_strategy,
    watched=st.sets(st.integers(0, 255)),
    marked=st.sets(st.integers(0, 255)),
    data=st.data(),
)
def test_marked_messages_come_with_no_body_only_while_marking(messages, watched, marked, data):
    stream = b"".join(msg(code, body) for code, body in messages)
    marking, plain = [], []
    offset = 0
    for code, body in messages:
        offset += 5 + len(body)
        if code in watched:
            marking.append((code, body, offset))
            plain.append((code, body, offset))
        elif code in marked:
            marking.append((code, b"", offset))
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=10))
    scanner = MessageScanner(watched, marked=marked)
    scanner.marking = True
    assert feed_in_pieces(scanner, stream, cuts) == marking
    scanner.marking = False
    assert not scanner.marking
    assert feed_in_pieces(scanner, stream, cuts) == plain
    assert scanner.at_boundary


@given(messages=messages_strategy, watched=st.sets(st.integers(0, 255)))
def test_feeding_one_byte_at_a_time_finds_every_watched_message(messages, watched):
    stream = b"".join(msg(code, body) for code, body in messages)
    scanner = MessageScanner(watched)
    frames = feed_in_pieces(scanner, stream, list(range(len(stream))))
    assert [(c, b) for c, b, _ in frames] == [(c, b) for c, b in messages if c in watched]
    assert scanner.at_boundary


def test_end_is_the_offset_in_the_chunk_just_past_each_watched_message():
    chunk = msg("D", b"row") + msg("C", b"SELECT 1\x00") + msg("Z", b"I")
    frames = MessageScanner([ord("C"), ord("Z")]).feed(chunk)
    assert frames == [(ord("C"), b"SELECT 1\x00", 8 + 14), (ord("Z"), b"I", len(chunk))]


def test_end_counts_from_the_start_of_the_chunk_where_a_split_message_completes():
    scanner = MessageScanner([ord("Z")])
    whole = msg("Z", b"I") + msg("D", b"xx")
    assert scanner.feed(whole[:3]) == []
    assert not scanner.at_boundary
    assert scanner.feed(whole[3:]) == [(ord("Z"), b"I", 3)]
    assert scanner.at_boundary


def test_unwatched_messages_are_skipped_without_being_returned():
    scanner = MessageScanner([ord("Z")])
    assert scanner.feed(msg("D", b"x" * 100) + msg("C", b"done\x00")) == []
    assert scanner.at_boundary


def test_a_split_unwatched_body_is_skipped_across_chunks():
    scanner = MessageScanner([ord("Z")])
    stream = msg("D", b"x" * 100) + msg("Z", b"T")
    assert scanner.feed(stream[:50]) == []
    assert not scanner.at_boundary
    assert scanner.feed(stream[50:104]) == []
    assert scanner.feed(stream[104:]) == [(ord("Z"), b"T", len(stream) - 104)]


def test_a_watched_body_longer_than_keep_is_truncated_to_keep_bytes():
    scanner = MessageScanner([ord("E")], keep=4)
    chunk = msg("E", b"0123456789") + msg("Z", b"I")
    assert scanner.feed(chunk) == [(ord("E"), b"0123", 15)]


def test_a_split_watched_body_longer_than_keep_is_truncated_and_the_rest_skipped():
    scanner = MessageScanner([ord("E"), ord("Z")], keep=4)
    stream = msg("E", b"0123456789") + msg("Z", b"I")
    assert scanner.feed(stream[:7]) == []
    assert scanner.feed(stream[7:12]) == []
    assert scanner.feed(stream[12:]) == [(ord("E"), b"0123", 3), (ord("Z"), b"I", 9)]


def test_a_watched_message_with_an_empty_body_completes_with_its_header():
    scanner = MessageScanner([ord("S")])
    stream = msg("S")
    assert scanner.feed(stream[:2]) == []
    assert scanner.feed(stream[2:]) == [(ord("S"), b"", 3)]
    assert scanner.at_boundary


def test_an_empty_chunk_changes_nothing():
    scanner = MessageScanner([ord("Z")])
    assert scanner.feed(b"") == []
    assert scanner.at_boundary


@pytest.mark.parametrize("length", [-1, 0, 3])
def test_a_length_below_four_is_a_protocol_violation(length):
    scanner = MessageScanner([ord("Z")])
    with pytest.raises(ProtocolError, match="less than 4") as info:
        scanner.feed(b"Z" + struct.pack("!i", length))
    assert info.value.sqlstate == "08P01"


def test_a_length_over_max_length_is_a_protocol_violation():
    scanner = MessageScanner([], max_length=100)
    with pytest.raises(ProtocolError, match="over the limit of 100"):
        scanner.feed(b"D" + struct.pack("!i", 101))


def test_a_bad_length_in_a_split_header_is_a_protocol_violation():
    scanner = MessageScanner([])
    scanner.feed(b"D\x00")
    with pytest.raises(ProtocolError):
        scanner.feed(b"\x00\x00\x02")


def test_reset_forgets_a_partial_message():
    scanner = MessageScanner([ord("Z")])
    scanner.feed(msg("Z", b"I")[:4])
    scanner.reset()
    assert scanner.at_boundary
    assert scanner.feed(msg("Z", b"E")) == [(ord("Z"), b"E", 6)]


@given(st.lists(st.binary(max_size=64), max_size=8), st.sets(st.integers(0, 255)))
def test_garbage_never_raises_anything_but_protocol_error(chunks, watched):
    scanner = MessageScanner(watched, keep=16, max_length=1 << 16)
    try:
        for chunk in chunks:
            scanner.feed(chunk)
    except ProtocolError:
        pass
