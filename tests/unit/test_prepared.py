"""Named prepared statements: server-side names, per-server LRU, and response plans."""

from __future__ import annotations

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
    assert t.is_plain
    data = PARSE_COMPLETE + BIND_COMPLETE + ROW + COMPLETE + READY
    out, events = run(t, data)
    assert out == data
    assert events.prepared == [b"s1"]
    assert len(t) == 0


def test_swallowed_parse_before_a_clients_bind_is_withheld() -> None:
    t = ResponseTracker()
    expect(t, (F.PARSE, Action.SWALLOW), (F.BIND, Action.FORWARD), (F.EXECUTE, Action.FORWARD),
           (F.SYNC, Action.FORWARD))  # fmt: skip
    assert not t.is_plain
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


def test_error_in_a_swallowed_parse_still_reaches_the_client() -> None:
    t = ResponseTracker()
    expect(t, (F.PARSE, Action.SWALLOW), (F.BIND, Action.FORWARD), (F.SYNC, Action.FORWARD))
    out, events = run(t, ERROR + READY)
    assert out == ERROR + READY
    assert events.failed == [(b"s1", b"")]


def test_answers_split_across_chunks_keep_their_fate() -> None:
    t = ResponseTracker()
    expect(t, (F.PARSE, Action.SWALLOW), (F.BIND, Action.FORWARD), (F.EXECUTE, Action.FORWARD),
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
    rewriter = Rewriter()
    definition = b"SELECT $1\x00\x00\x00"
    parse = msg("P", b"s1\x00" + definition)
    bind = msg("B", b"\x00s1\x00\x00\x00\x00\x00\x00\x00")
    sync = msg("S")
    # The first Parse goes to the server under the proxy's name; split anywhere, same result.
    out, sent = rewriter.feed(parse[:3], client=client, server=server, tracker=tracker,
                              counts=counts)  # fmt: skip
    assert (out, sent) == (b"", [])
    assert not rewriter.at_boundary
    out, _ = rewriter.feed(parse[3:] + bind + sync, client=client, server=server,
                           tracker=tracker, counts=counts)  # fmt: skip
    server_name = statement_name(definition)
    assert out.startswith(parse_message(server_name, definition))
    assert server_name in out[len(parse_message(server_name, definition)) :]
    assert rewriter.at_boundary
    assert counts.prepares == 1
    # Another client's Parse of the same statement is answered by the proxy.
    other = ClientStatements()
    tracker2 = ResponseTracker()
    out, _ = Rewriter().feed(parse + sync, client=other, server=server, tracker=tracker2,
                             counts=counts)  # fmt: skip
    assert out == sync
    assert tracker2.take_fakes() == PARSE_COMPLETE
    assert counts.hits == 1
    # On a server without it, a Bind is preceded by a quiet Parse.
    out, _ = Rewriter().feed(bind + sync, client=other, server=ServerStatements(),
                             tracker=ResponseTracker(), counts=counts)  # fmt: skip
    assert out.startswith(parse_message(server_name, definition))
    assert counts.reprepares == 1
