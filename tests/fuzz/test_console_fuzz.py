"""Fuzzing the admin console's framing and commands, and the /metrics endpoint's HTTP parser.

`AdminSession.feed` runs against a real, unstarted `Proxy` (empty pools, no loop needed) and
gets Query messages built from console words, extended-protocol messages and garbage, mutated
and split. It must never raise, never answer "internal error" (XX000, logged with a
traceback), write only well-framed messages, and close exactly after a FATAL 08P01 or a
Terminate.
"""

from __future__ import annotations

import logging

import pytest
from hypothesis import event, example, given
from hypothesis import strategies as st

from pgproxy.admin import SHOW_ITEMS, AdminSession
from pgproxy.config import load_settings
from pgproxy.metrics import HEAD_LIMIT, HttpError, parse_request, split_head
from pgproxy.proxy import Proxy
from pgproxy.wire import messages

from .conftest import assert_no_internal_errors
from .support import (
    INTERNAL_ERROR,
    chunks,
    fuzz_settings,
    mutated,
    split_backend,
    split_points,
    typed,
)

# SQLSTATEs the console answers with (admin.py), besides 08P01 for broken framing.
CONSOLE_SQLSTATES = frozenset({"42601", "42704", "42501", "22023", "0A000", "3D000", "57014"})


@pytest.fixture(scope="module")
def unstarted_proxy() -> Proxy:
    settings = load_settings(
        {"users": ["app:app-secret", "admin:admin-secret"], "admin_users": "admin"}, environ={}
    )
    proxy = Proxy(settings)
    # SHUTDOWN would stop a running proxy's loop; this one has none.
    proxy.request_shutdown = lambda: None  # type: ignore[method-assign]
    return proxy


WORDS = st.sampled_from(
    [
        *SHOW_ITEMS,  # every SHOW item the console knows, and one in lower case
        "clients",
        "app",
        "pgproxy",
        "12",
        "-1",
        "1_000",
        "\u0661\u0662",
        "9" * 5000,
        '"quoted word"',
        '"unterminated',
        '"a""b"',
        "'single'",
        "ß",
        "\x00",
        "",
    ]
)
VERBS = st.sampled_from(
    [
        "SHOW",
        "show",
        "PAUSE",
        "RESUME",
        "KILL",
        "KILL_CLIENT",
        "RELOAD",
        "SHUTDOWN",
        "SET",
        "SUSPEND",
        "SELECT",
        '"SHOW"',
        "",
    ]
)
WELL_FORMED = st.sampled_from(
    [f"SHOW {item}" for item in ("POOLS", "clients", "SERVERS", "STATS", "DATABASES", "USERS")]
    + [f"show {item}" for item in ("config", "LISTS", "LEAKS", "VERSION", "HELP")]
    + ["SET x = 1", "PAUSE", "RESUME", "PAUSE app", "RESUME app", "KILL app", "KILL_CLIENT 7"]
    + ["RELOAD", "SHUTDOWN", ""]
)
STATEMENT = st.one_of(
    WELL_FORMED,
    WELL_FORMED,
    st.builds(lambda verb, args: " ".join([verb, *args]), VERBS, st.lists(WORDS, max_size=2)),
)
QUERY_TEXT = st.one_of(
    st.lists(STATEMENT, max_size=4).map(";".join),
    st.lists(STATEMENT, max_size=3).map(lambda s: " ;\n ".join(s) + ";"),
    st.text(max_size=40),
)
OTHER_MESSAGES = st.sampled_from(
    [
        typed("S", b""),
        typed("H", b""),
        typed("P", b"\x00SELECT 1\x00\x00\x00"),
        typed("B", b"\x00\x00\x00\x00\x00\x00\x00\x00"),
        typed("D", b"S\x00"),
        typed("E", b"\x00\x00\x00\x00\x00"),
        typed("C", b"S\x00"),
        typed("F", b"\x00\x00\x00\x01"),
        typed("d", b"copy data"),
        typed("c", b""),
        typed("f", b"oops\x00"),
        typed("X", b""),
    ]
)


@st.composite
def console_input(draw) -> list[bytes]:
    out = []
    for _ in range(draw(st.integers(1, 6))):
        if draw(st.integers(0, 2)):
            text = draw(QUERY_TEXT).encode("utf-8", "surrogatepass")
            if draw(st.integers(0, 5)) == 5:
                text += b"\xff\xfe"  # invalid UTF-8
            out.append(typed("Q", text + b"\x00"))
        else:
            out.append(draw(OTHER_MESSAGES))
    if draw(st.integers(0, 2)) == 2:
        out = draw(mutated(out, is_typed=True))
    return out


class Console:
    def __init__(self, proxy: Proxy, *, may_modify: bool) -> None:
        self.written: list[bytes] = []
        self.closed_after = -1  # how many writes there were when close() was called
        self.session = AdminSession(
            proxy, "admin", may_modify=may_modify, write=self.written.append, close=self._close
        )

    def _close(self) -> None:
        assert self.closed_after < 0, "closed twice"
        self.closed_after = len(self.written)


@fuzz_settings(ci=300)
@given(msgs=console_input(), may_modify=st.booleans(), data=st.data())
@example(msgs=[typed("Q", b"KILL_CLIENT " + b"9" * 5000 + b"\x00")], may_modify=True, data=None)
@example(msgs=[typed("Q", b'SHOW "unterminated\x00')], may_modify=True, data=None)
@example(msgs=[typed("Q", b"PAUSE; RESUME; SHOW POOLS\x00")], may_modify=True, data=None)
def test_any_console_input_is_answered_or_refused_with_08p01_and_a_close(
    unstarted_proxy, caplog, msgs, may_modify, data
):
    caplog.set_level(logging.WARNING, logger="pgproxy")
    caplog.clear()
    console = Console(unstarted_proxy, may_modify=may_modify)
    stream = b"".join(msgs)
    cuts = data.draw(split_points(stream)) if data is not None else []
    for piece in chunks(stream, cuts):
        console.session.feed(piece)
    console.session.connection_lost()
    unstarted_proxy.resume()  # what a PAUSE left, for the next example
    out = b"".join(console.written)
    answers = split_backend(out)
    assert all(body is not None for _code, body in answers), answers
    for code, body in answers:
        assert code in "TDCIZEN", (code, answers)
        if code == "E":
            fields = messages.parse_fields(body)
            assert fields["C"] != INTERNAL_ERROR, fields
            if fields["S"] == "FATAL":
                assert fields["C"] == "08P01", fields
                assert (code, body) == answers[-1], "answers after a FATAL error"
                assert console.closed_after == len(console.written), "no close after FATAL"
            else:
                assert fields["C"] in CONSOLE_SQLSTATES, fields
    if console.closed_after >= 0:
        assert console.closed_after == len(console.written), "written after the close"
        assert b"X" in stream or answers[-1][0] == "E"
    assert_no_internal_errors(caplog.records)
    event("closed" if console.closed_after >= 0 else "open")
    event("some SHOW answered" if any(c == "T" for c, _b in answers) else "no SHOW answered")
    codes = sorted({messages.parse_fields(b)["C"] for c, b in answers if c == "E"})
    event(f"errors: {codes}")


# --- /metrics: the HTTP request parser -------------------------------------------------------

TARGETS = st.sampled_from(
    [
        "/metrics",
        "/healthz?x=1",
        "*",
        "http://h/metrics",
        "HTTPS://h:1/",
        "http://[::1]:9127/metrics",
        "http://user@h/",
        "/%zz",
        "//x",
        "http:/",
    ]
)
TARGETS = st.one_of(
    TARGETS,
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=20),
    # Absolute forms with odd authorities: brackets, ports, user info.
    st.builds(
        str.__add__,
        st.sampled_from(["http://", "https://", "HTTP://"]),
        st.text(alphabet="[]:@/?#%.ab19", max_size=14),
    ),
)


@st.composite
def request_heads(draw) -> bytes:
    method = draw(st.sampled_from(["GET", "HEAD", "POST", "G T", "", "get"]))
    version = draw(st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/1", "http/1.1"]))
    lines = [f"{method} {draw(TARGETS)} {version}"]
    lines += draw(
        st.lists(
            st.sampled_from(["Host: x", "Host:", "host: a", " Host: x", "X y: z", "A:\x01", ""])
            | st.text(max_size=20),
            max_size=4,
        )
    )
    head = draw(st.sampled_from(["\r\n", "\n"])).join(lines).encode("utf-8", "surrogatepass")
    return head if draw(st.integers(0, 4)) else head + draw(st.binary(max_size=10))


@fuzz_settings(ci=500)
@given(head=request_heads() | st.binary(max_size=80))
def test_parse_request_returns_a_request_or_raises_http_error(head):
    try:
        request = parse_request(head)
    except HttpError as exc:
        status = exc.status
    else:
        assert request.path.startswith("/") or request.path == ""
        assert request.method
        return
    assert 400 <= status < 600


@fuzz_settings(ci=300)
@given(
    buffer=st.binary(max_size=200)
    | st.lists(st.sampled_from([b"\r\n", b"\n", b"GET / HTTP/1.1", b"Host: x", b"\r"])).map(
        b"".join
    ),
    limit=st.sampled_from([1, 16, 64, HEAD_LIMIT]),
)
def test_split_head_finds_the_blank_line_or_waits_or_refuses_a_long_head(buffer, limit):
    status: int | None
    try:
        head = split_head(bytearray(buffer), limit)
    except HttpError as exc:
        status = exc.status
    else:
        status = None
    if status is not None:
        assert status == 431
    elif head is not None:
        assert len(head) <= limit
        assert head in buffer


@pytest.mark.parametrize("target", ["http://[", "http://[::1/metrics", "http://[foo]/"])
def test_a_bad_bracketed_host_in_an_absolute_target_is_a_bad_request(target):
    # Found by the fuzzer above; fixed in d34a111 (was urlsplit's ValueError: a 500).
    with pytest.raises(HttpError) as info:
        parse_request(f"GET {target} HTTP/1.1\r\nHost: x".encode())
    assert info.value.status == 400
