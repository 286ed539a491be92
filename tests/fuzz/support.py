"""Shared by the fuzz tests: run sizes, mutations of valid messages, reading what came back.

Run sizes: the CI subset runs a few hundred examples per pure property and a few dozen per
live one, derandomized so that `make test` is reproducible; `PGPROXY_FULL_TESTS=1` runs
about fifty times as many, with fresh random seeds each run (and hypothesis' example
database), to look for what the CI subset does not reach.

Mutations start from messages a correct peer would send and break them the way a buggy or
hostile one would: lengths of 0, negative, just short, 0x7fffffff, over 1 GiB; cut messages,
flipped bytes, bodies replaced, messages dropped, repeated, swapped or invented.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from pgproxy.wire import messages

FULL = os.environ.get("PGPROXY_FULL_TESTS") == "1"


def fuzz_settings(ci: int, full: int | None = None) -> settings:
    """`ci` examples in the CI subset, `full` (default 50 x `ci`) with PGPROXY_FULL_TESTS=1."""
    return settings(
        max_examples=(full if full is not None else 50 * ci) if FULL else ci,
        deadline=None,  # shared 2-core machines: timing is noise, hangs have their own deadline
        derandomize=not FULL,
        database=None if not FULL else settings.default.database,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
            # The live tests share one proxy (module scope) and one caplog across examples on
            # purpose: what a bad client leaves behind must not hurt the next one.
            HealthCheck.function_scoped_fixture,
        ],
    )


# --- SQLSTATEs ----------------------------------------------------------------------------

# What pgproxy may answer during login (Postgres' own codes for the same situations).
LOGIN_SQLSTATES = frozenset(
    {
        "08P01",  # protocol_violation
        "28P01",  # invalid_password
        "28000",  # invalid_authorization_specification
        "0A000",  # feature_not_supported (protocol 2, replication, options)
        "3D000",  # invalid_catalog_name
        "53300",  # too_many_connections
        "08006",  # connection_failure (server unreachable)
    }
)
# FATAL errors a logged-in client may get: pgproxy's own, and Postgres' for a broken session.
SESSION_FATAL_SQLSTATES = LOGIN_SQLSTATES | {
    "53000",  # too many pinned servers
    "57014",  # query_wait_timeout
    "57P01",  # admin shutdown / killed
    "25P03",  # idle_in_transaction_timeout
    "25P04",  # transaction_timeout
    "57P05",  # client_idle_timeout
}
# Never acceptable, whatever the input: pgproxy's "internal error" (an unhandled exception).
INTERNAL_ERROR = "XX000"


def is_pgproxy_internal_error(fields: dict[str, str]) -> bool:
    """pgproxy's XX000, as opposed to one Postgres relays through it.

    Postgres has its own internal errors for hostile input (a Parse declaring parameter type
    4294967295 gets "cache lookup failed for type"); they carry the source file, line and
    routine (F, L, R), which pgproxy's own ErrorResponses never do.
    """
    return fields.get("C") == INTERNAL_ERROR and not {"F", "L", "R"} & fields.keys()


# --- building messages --------------------------------------------------------------------


def typed(code: str | int, body: bytes) -> bytes:
    code_byte = ord(code) if isinstance(code, str) else code
    return bytes((code_byte,)) + struct.pack("!i", len(body) + 4) + body


def packet(payload: bytes) -> bytes:
    """A startup-phase packet: length, then the payload (no type byte)."""
    return struct.pack("!i", len(payload) + 4) + payload


def startup_packet(pairs: Sequence[tuple[bytes, bytes]], protocol: int = 196608) -> bytes:
    """A StartupMessage from raw name/value bytes (which may be anything, even invalid UTF-8)."""
    body = b"".join(name + b"\x00" + value + b"\x00" for name, value in pairs)
    return packet(struct.pack("!i", protocol) + body + b"\x00")


# --- mutations ----------------------------------------------------------------------------

# Length fields a hostile peer sends: empty, negative, just below the header, Postgres' and
# pgproxy's limits and just past them, int32 max, over 1 GiB.
SPECIAL_LENGTHS = (
    0,
    1,
    3,
    4,
    5,
    7,
    8,
    -1,
    -4,
    -8,
    -(2**31),
    10_000,
    10_001,
    65_539,
    65_540,
    1 << 20,
    (1 << 20) + 5,
    1 << 30,
    (1 << 30) + 5,
    0x7FFFFFFF,
)

_OPERATIONS = (
    "length",
    "truncate",
    "flip",
    "insert",
    "body",
    "drop",
    "duplicate",
    "swap",
    "invent",
    "type",
)
# The operations that keep every message well framed (its length true to its bytes).
FRAMING_SAFE = ("flip_body", "body", "drop", "duplicate", "swap", "invent")


def _length_at(is_typed: bool) -> int:
    return 1 if is_typed else 0


@st.composite
def mutated(
    draw: st.DrawFn,
    msgs: Sequence[bytes],
    *,
    is_typed: bool,
    max_mutations: int = 3,
    operations: Sequence[str] = _OPERATIONS,
    types: Sequence[int] | None = None,
) -> list[bytes]:
    """`msgs` (whole, length-prefixed messages) with up to `max_mutations` mutations.

    With `operations=FRAMING_SAFE` every message keeps a length that matches its bytes.
    `types`: the type bytes `invent` and `type` choose from (typed messages only).
    """
    out = [bytearray(m) for m in msgs]
    at = _length_at(is_typed)
    head = at + 4
    type_bytes = st.sampled_from(types) if types else st.integers(0, 255)
    for _ in range(draw(st.integers(0, max_mutations))):
        op = draw(st.sampled_from(operations))
        if op == "invent" or not out:
            body = draw(st.binary(max_size=64))
            new = typed(draw(type_bytes), body) if is_typed else packet(body)
            out.insert(draw(st.integers(0, len(out))), bytearray(new))
            continue
        i = draw(st.integers(0, len(out) - 1))
        m = out[i]
        if op == "length" and len(m) >= head:
            value = draw(
                st.sampled_from(SPECIAL_LENGTHS) | st.integers(len(m) - at - 8, len(m) - at + 8)
            )
            m[at:head] = struct.pack("!i", max(min(value, 2**31 - 1), -(2**31)))
        elif op == "truncate" and m:
            del m[draw(st.integers(0, len(m) - 1)) :]
        elif op == "flip" and m:
            m[draw(st.integers(0, len(m) - 1))] = draw(st.integers(0, 255))
        elif op == "flip_body" and len(m) > head:
            m[draw(st.integers(head, len(m) - 1))] = draw(st.integers(0, 255))
        elif op == "insert":
            where = draw(st.integers(0, len(m)))
            m[where:where] = draw(st.binary(min_size=1, max_size=16))
        elif op == "body" and len(m) >= head:
            body = draw(st.binary(max_size=64))
            m[head:] = body
            m[at:head] = struct.pack("!i", len(body) + 4)
        elif op == "drop":
            del out[i]
        elif op == "duplicate":
            out.insert(i, bytearray(m))
        elif op == "swap" and len(out) > 1:
            j = draw(st.integers(0, len(out) - 1))
            out[i], out[j] = out[j], out[i]
        elif op == "type" and is_typed and m:
            m[0] = draw(type_bytes)
    return [bytes(m) for m in out]


def chunks(data: bytes, cuts: Sequence[int]) -> list[bytes]:
    """`data` split at the offsets `cuts` (any order, duplicates allowed)."""
    out = []
    start = 0
    for stop in [*sorted(set(cuts)), len(data)]:
        out.append(data[start:stop])
        start = stop
    return out


def split_points(data: bytes) -> st.SearchStrategy[list[int]]:
    return st.lists(st.integers(0, len(data)), max_size=8)


# --- reading backend bytes ----------------------------------------------------------------

Message = tuple[str, bytes | None]  # (type letter, body); body None: a one-byte answer

# Longest message pgproxy or Postgres should ever send a client in these tests.
MAX_BACKEND_MESSAGE = 1 << 20


def split_backend(data: bytes) -> list[Message]:
    """Backend bytes as messages; fails on anything that is not well framed.

    A lone 'N' is the one-byte answer to SSLRequest/GSSENCRequest: taken as such when the
    next four bytes are not a plausible length of a NoticeResponse that fits in `data`.
    """
    out: list[Message] = []
    pos = 0
    n = len(data)
    while pos < n:
        code = data[pos]
        length = struct.unpack_from("!i", data, pos + 1)[0] if pos + 5 <= n else -1
        whole = 4 <= length <= MAX_BACKEND_MESSAGE and pos + 1 + length <= n
        if code == ord("N") and not whole:
            out.append(("N", None))
            pos += 1
            continue
        assert pos + 5 <= n, f"a cut message header at the end: {data[pos:]!r}"
        assert 4 <= length <= MAX_BACKEND_MESSAGE, f"bad length {length} for {chr(code)!r}"
        assert pos + 1 + length <= n, f"a cut {chr(code)!r} message at the end"
        out.append((chr(code), bytes(data[pos + 5 : pos + 1 + length])))
        pos += 1 + length
    return out


def error_fields(msgs: Sequence[Message]) -> list[dict[str, str]]:
    return [messages.parse_fields(body) for code, body in msgs if code == "E" and body]


def auth_code(body: bytes | None) -> int:
    assert body is not None and len(body) >= 4, body
    code: int = struct.unpack_from("!i", body)[0]
    return code


def check_login_transcript(msgs: Sequence[Message], *, may_log_in: bool) -> bool:
    """What pgproxy may say to a client that is logging in; True when it logged in.

    One-byte 'N' answers, Authentication requests, NegotiateProtocolVersion; then either
    AuthenticationOk and the welcome (only when `may_log_in`), or one FATAL ErrorResponse
    with a login SQLSTATE, last.
    """
    logged_in = False
    for i, (code, body) in enumerate(msgs):
        if code == "N" and body is None:
            assert (not logged_in and i == 0) or msgs[i - 1] == ("N", None), msgs
        elif code == "R":
            if auth_code(body) == 0:
                assert may_log_in, f"AuthenticationOk without the password: {msgs!r}"
                logged_in = True
        elif code == "v" or (logged_in and code in "SKZN"):
            pass
        elif code == "E":
            fields = error_fields([(code, body)])[0]
            assert fields.get("C") in LOGIN_SQLSTATES, fields
            assert fields.get("S") == "FATAL", fields
            assert i == len(msgs) - 1, f"messages after a FATAL error: {msgs!r}"
        else:
            raise AssertionError(f"unexpected {code!r} during login: {msgs!r}")
    return logged_in
