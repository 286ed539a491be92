"""Named prepared statements: server-side names, per-server LRU, and response plans."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgproxy.core.prepared import (
    CLOSE_COMPLETE,
    PARSE_COMPLETE,
    TRACKED_BACKEND,
    Action,
    ClientStatements,
    Expected,
    ResponseTracker,
    Rewriter,
    ServerStatements,
    StatementCounts,
    TrackerEvents,
    parse_message,
    split_parse,
    statement_name,
)
from pgproxy.wire.codes import FrontendCode as F
from pgproxy.wire.scanner import MessageScanner


def msg(code: str, body: bytes = b"") -> bytes:
    return code.encode() + (len(body) + 4).to_bytes(4, "big") + body


BIND_COMPLETE = msg("2")
ROW = msg("D", b"\x00\x01\x00\x00\x00\x011")
COMPLETE = msg("C", b"SELECT 1\x00")
READY = msg("Z", b"I")
ERROR = msg("E", b"SERROR\x00C42P01\x00Mno such table\x00\x00")


def run(tracker: ResponseTracker, data: bytes) -> tuple[bytes, TrackerEvents]:
    events = TrackerEvents()
    frames = MessageScanner(TRACKED_BACKEND).feed(data)
    return tracker.feed(data, frames, events), events


def expect(tracker: ResponseTracker, *entries: tuple[int, Action]) -> None:
    for code, action in entries:
        tracker.expect(Expected(code, action, statement=b"s1" if code == F.PARSE else b""))


def test_statement_names_depend_only_on_the_definition() -> None:
    a = statement_name(b"SELECT $1\x00\x00\x00")
    assert a == statement_name(b"SELECT $1\x00\x00\x00")
    assert a != statement_name(b"SELECT $2\x00\x00\x00")
    assert a.startswith(b"pgproxy_")
    assert len(a) < 64  # NAMEDATALEN


def test_split_parse_and_parse_message_round_trip() -> None:
    body = b"stmt\x00SELECT 1\x00\x00\x00"
    name, definition = split_parse(body)
    assert (name, definition) == (b"stmt", b"SELECT 1\x00\x00\x00")
    assert parse_message(name, definition) == msg("P", body)


def test_client_names_map_to_shared_server_names() -> None:
    a, b = ClientStatements(), ClientStatements()
    assert a.define(b"q", b"SELECT 1\x00\x00\x00") == b.define(b"other", b"SELECT 1\x00\x00\x00")
    assert a.lookup(b"q") == (b"SELECT 1\x00\x00\x00", statement_name(b"SELECT 1\x00\x00\x00"))
    a.forget(b"q")
    assert a.lookup(b"q") is None
    assert b.lookup(b"other") is not None


def test_a_failed_parse_removes_every_client_name_pointing_at_it() -> None:
    c = ClientStatements()
    server_name = c.define(b"a", b"bad\x00\x00\x00")
    c.define(b"b", b"bad\x00\x00\x00")
    c.define(b"c", b"good\x00\x00\x00")
    c.forget_server_name(server_name)
    assert set(c.by_name) == {b"c"}


def test_server_set_evicts_least_recently_used_but_not_the_ones_in_use() -> None:
    s = ServerStatements(capacity=2)
    for name in (b"a", b"b", b"c"):
        s.add(name)
    assert s.use(b"a")  # now b is the least recently used
    assert not s.use(b"zzz")
    assert s.overflow(keep=frozenset({b"b"})) == [b"c"]
    assert list(s.names) == [b"b", b"a"]
    assert s.overflow() == []


def test_plain_forwarding_passes_everything() -> None:
    t = ResponseTracker()
    expect(t, (F.PARSE, Action.FORWARD), (F.BIND, Action.FORWARD), (F.EXECUTE, Action.FORWARD),
           (F.SYNC, Action.FORWARD))  # fmt: skip
    data = PARSE_COMPLETE + BIND_COMPLETE + ROW + COMPLETE + READY
    out, events = run(t, data)
    assert out is data  # nothing withheld or added: passed on without a copy
    assert events.prepared == [b"s1"]
    assert len(t) == 0


def test_parse_prepared_before_a_clients_bind_is_withheld() -> None:
    t = ResponseTracker()
    expect(t, (F.PARSE, Action.PREPARE), (F.BIND, Action.FORWARD), (F.EXECUTE, Action.FORWARD),
           (F.SYNC, Action.FORWARD))  # fmt: skip
    data = PARSE_COMPLETE + BIND_COMPLETE + ROW + COMPLETE + READY
    out, events = run(t, data)
    assert out == BIND_COMPLETE + ROW + COMPLETE + READY
    assert events.prepared == [b"s1"]


def test_fake_parse_complete_is_emitted_in_order() -> None:
    t = ResponseTracker()
    t.expect(Expected(F.BIND, Action.FORWARD))
    t.expect(Expected(F.PARSE, Action.FAKE, fake=PARSE_COMPLETE))
    t.expect(Expected(F.SYNC, Action.FORWARD))
    assert t.take_fakes() == b""  # the Bind's answer comes first
    out, _ = run(t, BIND_COMPLETE + READY)
    assert out == BIND_COMPLETE + PARSE_COMPLETE + READY


def test_fake_at_the_head_is_available_before_any_server_bytes() -> None:
    t = ResponseTracker()
    t.expect(Expected(F.PARSE, Action.FAKE, fake=PARSE_COMPLETE))
    t.expect(Expected(F.CLOSE, Action.FAKE, fake=CLOSE_COMPLETE))
    t.expect(Expected(F.SYNC, Action.FORWARD))
    assert t.take_fakes() == PARSE_COMPLETE + CLOSE_COMPLETE
    out, _ = run(t, READY)
    assert out == READY


def test_error_skips_to_sync_and_drops_fakes_and_reports_parses() -> None:
    t = ResponseTracker()
    t.expect(Expected(F.BIND, Action.FORWARD))
    t.expect(
        Expected(F.PARSE, Action.FAKE, fake=PARSE_COMPLETE, statement=b"shared", client_name=b"a")
    )
    t.expect(Expected(F.PARSE, Action.FORWARD, statement=b"mine", client_name=b"b"))
    t.expect(Expected(F.EXECUTE, Action.FORWARD))
    t.expect(Expected(F.SYNC, Action.FORWARD))
    out, events = run(t, ERROR + READY)
    assert out == ERROR + READY  # no ParseComplete: the server skipped that Parse
    assert events.failed == [(b"mine", b"b")]
    assert events.unanswered == [b"a"]
    assert len(t) == 0


def test_error_in_a_parse_prepared_on_demand_still_reaches_the_client() -> None:
    t = ResponseTracker()
    expect(t, (F.PARSE, Action.PREPARE), (F.BIND, Action.FORWARD), (F.SYNC, Action.FORWARD))
    out, events = run(t, ERROR + READY)
    assert out == ERROR + READY
    assert events.failed == [(b"s1", b"")]


def test_error_in_a_parse_prepared_on_demand_arrives_whole_when_split() -> None:
    t = ResponseTracker()
    expect(t, (F.PARSE, Action.PREPARE), (F.BIND, Action.FORWARD), (F.SYNC, Action.FORWARD))
    notice = msg("N", b"SNOTICE\x00C00000\x00Mhello\x00\x00")
    data = notice + ERROR + READY
    scanner = MessageScanner(TRACKED_BACKEND)
    out = bytearray()
    events = TrackerEvents()
    for i in range(len(data)):
        chunk = data[i : i + 1]
        out += t.feed(chunk, scanner.feed(chunk), events)
    assert bytes(out) == ERROR + READY
    assert len(t) == 0


def test_nothing_of_the_proxys_own_query_reaches_the_client_not_even_its_error() -> None:
    # The session prelude's answer cut by a FATAL (its backend terminated): no byte of it, its
    # DataRow least of all, may reach the client. ServerState reports the error instead.
    description = msg("T", b"\x00\x01set_config\x00" + bytes(18))
    fatal = msg("E", b"SFATAL\x00C57P01\x00Mterminating connection\x00\x00")
    data = description + ROW + fatal
    for split in range(len(data) + 1):
        t = ResponseTracker()
        t.expect(Expected(F.QUERY, Action.SWALLOW))
        expect(t, (F.BIND, Action.FORWARD), (F.SYNC, Action.FORWARD))
        scanner = MessageScanner(TRACKED_BACKEND)
        events = TrackerEvents()
        out = t.feed(data[:split], scanner.feed(data[:split]), events)
        out += t.feed(data[split:], scanner.feed(data[split:]), events)
        assert out == b"", split


def test_answers_split_across_chunks_keep_their_fate() -> None:
    t = ResponseTracker()
    expect(t, (F.PARSE, Action.PREPARE), (F.BIND, Action.FORWARD), (F.EXECUTE, Action.FORWARD),
           (F.SYNC, Action.FORWARD))  # fmt: skip
    data = PARSE_COMPLETE + BIND_COMPLETE + ROW + ROW + COMPLETE + READY
    scanner = MessageScanner(TRACKED_BACKEND)
    out = bytearray()
    events = TrackerEvents()
    for i in range(0, len(data), 3):
        chunk = data[i : i + 3]
        out += t.feed(chunk, scanner.feed(chunk), events)
    # Bytes of a message are forwarded as they come; the swallowed ParseComplete is split, so
    # its bytes fall under the head's fate as they arrive.
    assert bytes(out) == BIND_COMPLETE + ROW + ROW + COMPLETE + READY


def test_simple_query_errors_do_not_skip_anything() -> None:
    t = ResponseTracker()
    expect(t, (F.QUERY, Action.FORWARD), (F.QUERY, Action.FORWARD))
    data = ERROR + READY + COMPLETE + READY
    out, _ = run(t, data)
    assert out == data
    assert len(t) == 0


def test_a_skipped_eviction_close_is_reported_so_the_statement_stays_known() -> None:
    t = ResponseTracker()
    t.expect(Expected(F.BIND, Action.FORWARD))
    t.expect(Expected(F.CLOSE, Action.SWALLOW, statement=b"old"))
    t.expect(Expected(F.SYNC, Action.FORWARD))
    out, events = run(t, ERROR + READY)
    assert out == ERROR + READY
    assert events.not_closed == [b"old"]


def test_rewriter_maps_names_prepares_on_demand_and_answers_known_parses() -> None:
    client, server, tracker = ClientStatements(), ServerStatements(), ResponseTracker()
    counts = StatementCounts()
    rewriter = Rewriter(client, server, tracker, counts)
    definition = b"SELECT $1\x00\x00\x00"
    parse = msg("P", b"s1\x00" + definition)
    bind = msg("B", b"\x00s1\x00\x00\x00\x00\x00\x00\x00")
    sync = msg("S")
    # The first Parse goes to the server under the proxy's name; split anywhere, same result.
    out, sent = rewriter.feed(parse[:3])
    assert (out, sent) == (b"", [])
    assert not rewriter.at_boundary
    out, _ = rewriter.feed(parse[3:] + bind + sync)
    server_name = statement_name(definition)
    assert out.startswith(parse_message(server_name, definition))
    assert server_name in out[len(parse_message(server_name, definition)) :]
    assert rewriter.at_boundary
    assert counts.prepares == 1
    # Another client's Parse of the same statement is answered by the proxy.
    other = ClientStatements()
    tracker2 = ResponseTracker()
    out, _ = Rewriter(other, server, tracker2, counts).feed(parse + sync)
    assert out == sync
    assert tracker2.take_fakes() == PARSE_COMPLETE
    assert counts.hits == 1
    # On a server without it, a Bind is preceded by a quiet Parse.
    out, _ = Rewriter(other, ServerStatements(), ResponseTracker(), counts).feed(bind + sync)
    assert out.startswith(parse_message(server_name, definition))
    assert counts.reprepares == 1


def linked(
    *statements: bytes,
) -> tuple[Rewriter, ClientStatements, ServerStatements, ResponseTracker]:
    """A rewriter whose client defined s1, s2... and whose server has them all."""
    client, server, tracker = ClientStatements(), ServerStatements(), ResponseTracker()
    for i, definition in enumerate(statements, 1):
        server.add(client.define(b"s%d" % i, definition))
    return Rewriter(client, server, tracker, StatementCounts()), client, server, tracker


def test_rewriter_passes_a_chunk_with_nothing_to_map_without_copying_it() -> None:
    rewriter, _client, _server, tracker = linked()
    chunk = (msg("P", b"\x00SELECT 1\x00\x00\x00") + msg("B", b"\x00\x00" + bytes(6))
             + msg("D", b"P\x00") + msg("E", bytes(5)) + msg("S"))  # fmt: skip
    out, sent = rewriter.feed(chunk)
    assert out is chunk
    assert [code for code, _body, _end in sent] == [F.PARSE, F.BIND, F.DESCRIBE, F.EXECUTE, F.SYNC]
    # Nothing to account for before the Sync: its entry stands for the whole segment.
    assert len(tracker) == 1


def test_rewriter_maps_bind_and_describe_of_a_statement_in_place() -> None:
    definition = b"SELECT $1\x00\x00\x00"
    rewriter, _client, _server, tracker = linked(definition)
    server_name = statement_name(definition)
    bind = msg("B", b"portal\x00s1\x00\x00\x00\x00\x01\x00\x00\x00\x0242\x00\x00")
    chunk = bind + msg("D", b"Ss1\x00") + msg("E", b"portal\x00" + bytes(4)) + msg("S")
    out, sent = rewriter.feed(chunk)
    assert out == (
        msg("B", b"portal\x00" + server_name + b"\x00\x00\x00\x00\x01\x00\x00\x00\x0242\x00\x00")
        + msg("D", b"S" + server_name + b"\x00") + msg("E", b"portal\x00" + bytes(4)) + msg("S")
    )  # fmt: skip
    assert sent[0] == (F.BIND, b"portal\x00" + server_name + b"\x00", 0)
    assert len(tracker) == 1


@pytest.mark.parametrize(
    "body",
    [b"portal-and-no-terminator", b"portal\x00s1-and-no-terminator", b"", b"\x00"],
)
def test_a_bind_with_an_unterminated_name_is_left_for_the_server_to_refuse(body: bytes) -> None:
    """Hostile input: the name ends before it starts. Interpreted, the slice is b""; the
    compiled build once raised SystemError here (setup.py, fix_bytes_slice)."""
    rewriter, _client, _server, tracker = linked(b"SELECT $1\x00\x00\x00")
    chunk = msg("B", body) + msg("S")
    out, sent = rewriter.feed(chunk)
    assert out == chunk
    assert sent[0][0] == F.BIND
    assert len(tracker) == 1


def test_an_error_in_a_collapsed_segment_ends_at_its_ready_for_query() -> None:
    definition = b"SELECT $1\x00\x00\x00"
    rewriter, _client, _server, tracker = linked(definition)
    rewriter.feed(msg("B", b"\x00s1\x00" + bytes(6)) + msg("E", bytes(5)) + msg("S"))
    # Then a Parse the proxy answers itself: its ParseComplete must wait for that Sync.
    rewriter.feed(msg("P", b"s9\x00" + definition) + msg("S"))
    out, events = run(tracker, ERROR)
    assert out == ERROR
    out, events = run(tracker, READY + READY)
    assert out == READY + PARSE_COMPLETE + READY
    assert len(tracker) == 0
    assert events.unanswered == []


def test_held_entries_position_a_fake_after_the_messages_before_it() -> None:
    definition = b"SELECT $1\x00\x00\x00"
    rewriter, client, _server, tracker = linked(definition)
    # Bind, then a known Parse in the same segment: if the Bind fails, the server skips the
    # rest up to Sync, so the client must get no ParseComplete and the name is not defined.
    rewriter.feed(msg("B", b"\x00s1\x00" + bytes(6)) + msg("P", b"s9\x00" + definition) + msg("S"))
    assert tracker.take_fakes() == b""
    out, events = run(tracker, ERROR + READY)
    assert out == ERROR + READY
    assert events.unanswered == [b"s9"]
    # The other way: the Bind succeeds, then the ParseComplete comes in its place.
    tracker2 = ResponseTracker()
    rewriter2 = Rewriter(client, _server, tracker2, StatementCounts())
    rewriter2.feed(msg("B", b"\x00s1\x00" + bytes(6)) + msg("P", b"s9\x00" + definition) + msg("S"))
    out, _events = run(tracker2, BIND_COMPLETE + READY)
    assert out == BIND_COMPLETE + PARSE_COMPLETE + READY


_DEFINITIONS = [b"SELECT $1\x00\x00\x00", b"SELECT 2\x00\x00\x00"]
_MESSAGES = [
    msg("P", b"s1\x00" + _DEFINITIONS[0]),
    msg("P", b"s2\x00" + _DEFINITIONS[1]),
    msg("P", b"\x00SELECT 3\x00\x00\x00"),
    msg("B", b"\x00s1\x00" + bytes(6)),
    msg("B", b"p\x00s2\x00" + bytes(6)),
    msg("B", b"\x00unknown\x00" + bytes(6)),
    msg("D", b"Ss1\x00"),
    msg("D", b"Pp\x00"),
    msg("E", bytes(5)),
    msg("C", b"Ss2\x00"),
    msg("C", b"Pp\x00"),
    msg("H"),
    msg("S"),
    msg("Q", b"SELECT 1\x00"),
    msg("d", b"row\n"),
]


@given(
    st.lists(st.sampled_from(_MESSAGES), max_size=30),
    st.lists(st.integers(min_value=0, max_value=400), max_size=8),
    st.booleans(),
)
def test_rewriting_does_not_depend_on_how_the_stream_is_cut(
    stream: list[bytes], cuts: list[int], prepared_here: bool
) -> None:
    data = b"".join(stream)

    def rewrite(chunks: list[bytes]) -> tuple[bytes, list[int], list[Expected], StatementCounts]:
        client, server, tracker = ClientStatements(), ServerStatements(), ResponseTracker()
        client.define(b"s1", _DEFINITIONS[0])
        if prepared_here:
            server.add(statement_name(_DEFINITIONS[0]))
        counts = StatementCounts()
        rewriter = Rewriter(client, server, tracker, counts)
        out, codes = b"", []
        for chunk in chunks:
            part, sent = rewriter.feed(chunk)
            out += part
            codes += [code for code, _body, _end in sent]
        assert rewriter.at_boundary
        return out, codes, list(tracker._queue), counts

    bounds = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    chunks = [data[a:b] for a, b in itertools.pairwise(bounds)]
    out, codes, _entries, counts = rewrite([data])
    cut_out, cut_codes, _cut_entries, cut_counts = rewrite(chunks)
    assert (cut_out, cut_codes, cut_counts) == (out, codes, counts)
