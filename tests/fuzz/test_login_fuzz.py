"""Fuzzing the client side of login without sockets: startup packets, SCRAM, md5.

`ClientLogin` is fed what a client would send, mutated (see `support.mutated`) and split at
random points. Whatever the bytes, only a `PgProxyError` with a login SQLSTATE may come out
(never IndexError, ValueError, UnicodeDecodeError, struct.error, ...), what the proxy sends is
well framed, and `Authenticated` comes only for the right password of a configured user.
"""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import event, example, given
from hypothesis import strategies as st

from pgproxy.core.login import (
    MAX_AUTH_MESSAGE_LENGTH,
    Authenticated,
    AuthMethod,
    CancelRequested,
    ClientLogin,
    Closed,
    LookupUser,
    Send,
    StartTls,
    TlsPolicy,
    UserAuth,
)
from pgproxy.errors import AuthError, PgProxyError, ProtocolError
from pgproxy.wire import messages as m
from pgproxy.wire.codes import (
    CANCEL_REQUEST_CODE,
    GSSENC_REQUEST_CODE,
    MAX_STARTUP_PACKET_LENGTH,
    SSL_REQUEST_CODE,
)
from pgproxy.wire.messages import Startup, parse_startup_packet
from pgproxy.wire.scram import (
    ScramClientExchange,
    ScramServerExchange,
    make_scram_secret,
    md5_response,
    md5_secret,
)

from .support import (
    LOGIN_SQLSTATES,
    chunks,
    fuzz_settings,
    mutated,
    packet,
    split_backend,
    split_points,
    startup_packet,
)

# Cheap secrets (16 iterations) so that each example costs microseconds.
PASSWORDS = {"alice": "wonderland", "sam": "pw-sam", "mo": "pw-mo"}
USERS = {
    "alice": UserAuth(
        "alice",
        "wonderland",
        make_scram_secret("wonderland", iterations=16),
        md5_secret("alice", "wonderland"),
    ),
    "sam": UserAuth("sam", None, make_scram_secret("pw-sam", iterations=16), None),  # SCRAM only
    "mo": UserAuth("mo", None, None, md5_secret("mo", "pw-mo")),  # md5 only
}
P = ord("p")  # PasswordMessage, SASLInitialResponse, SASLResponse
X = ord("X")  # Terminate


def counter_bytes():
    counter = itertools.count(1)
    return lambda n: bytes([next(counter) % 256]) * n


class Driver:
    """Plays the asyncio shell around a `ClientLogin`: writes, TLS, user lookups."""

    def __init__(self, method: AuthMethod, *, tls: bool, lookup: bool) -> None:
        self.login = ClientLogin(
            auth_method=method,
            lookup_user=USERS.get,
            random_bytes=counter_bytes(),
            mock_seed=b"mock-seed",
            tls=TlsPolicy(offered=tls, required=False, cert_names_user=False),
            needs_lookup=(lambda _user: True) if lookup else None,
        )
        self.sent = bytearray()
        self.done: Authenticated | CancelRequested | Closed | None = None
        self.error: PgProxyError | None = None
        self.scram: ScramClientExchange | None = None  # the client side, once SASL began

    @property
    def over(self) -> bool:
        return self.done is not None or self.error is not None

    def feed(self, data: bytes, cuts: list[int]) -> None:
        for piece in chunks(data, cuts):
            if self.over:
                return
            self._run(lambda piece=piece: self.login.feed(piece))

    def _run(self, step) -> None:
        try:
            events = step()
        except PgProxyError as exc:
            self.error = exc
            return
        for happened in events:
            if isinstance(happened, Send):
                self.sent += happened.data
            elif isinstance(happened, StartTls):
                self._run(lambda: self.login.tls_started(None) or [])
            elif isinstance(happened, LookupUser):
                self._run(lambda user=happened.user: self.login.user_found(USERS.get(user)))
            else:
                self.done = happened

    def auth_requests(self) -> list[tuple[int, bytes]]:
        """The Authentication requests sent so far: (code, payload)."""
        return [
            m.parse_authentication(body)
            for code, body in split_backend(bytes(self.sent))
            if code == "R" and body is not None
        ]

    def last_auth_request(self) -> tuple[int, bytes]:
        return self.auth_requests()[-1]

    def check(self, user: str, password: str) -> None:
        """What every run must satisfy, whatever happened."""
        msgs = split_backend(bytes(self.sent))  # well framed, or this fails
        for code, body in msgs:
            assert code in "NRv", f"ClientLogin sent {code!r}: {msgs!r}"
            if code == "R":
                assert m.parse_authentication(body)[0] != 0, "AuthenticationOk is the shell's"
        if self.error is not None:
            assert self.error.sqlstate in LOGIN_SQLSTATES, self.error
            assert str(self.error.severity) == "FATAL", self.error
        if isinstance(self.done, Authenticated):
            auth = USERS.get(self.done.user)
            assert auth is not None, f"an unknown user got in: {self.done!r}"
            assert password == PASSWORDS[self.done.user], f"wrong password let in: {self.done}"
            assert self.done.user == user


users = st.sampled_from(["alice", "sam", "mo", "nobody"])
passwords = st.sampled_from(["wonderland", "pw-sam", "pw-mo", "", "wrong", "x" * 70_000])


@st.composite
def startup_stream(draw, user: str) -> list[bytes]:
    """Startup-phase packets a client might send before authenticating, not yet mutated."""
    out = []
    if draw(st.booleans()):
        out.append(m.gssenc_request())
    if draw(st.booleans()):
        out.append(m.ssl_request())
    pairs = [(b"user", user.encode()), (b"database", draw(st.sampled_from([b"app", b"db"])))]
    names = st.sampled_from([b"application_name", b"options", b"_pq_.x", b"client_encoding"])
    extra = st.tuples(
        st.one_of(names, names, names, st.binary(max_size=12)),
        st.one_of(st.text(max_size=24).map(str.encode), st.binary(max_size=24)),
    )
    pairs += draw(st.lists(extra, max_size=3))
    minor = draw(st.sampled_from([0, 0, 0, 1, 2]))
    out.append(startup_packet(pairs, protocol=(3 << 16) | minor))
    if draw(st.integers(0, 9)) == 9:
        out = [m.cancel_request(draw(st.integers(0, 2**32 - 1)), 7)]
    return out


def send(data, driver: Driver, pieces: list[bytes], *, is_typed: bool) -> None:
    """Mutate (one time in three) and feed `pieces` in random chunks."""
    if data.draw(st.integers(0, 2)) == 0:
        pieces = data.draw(mutated(pieces, is_typed=is_typed, types=[P, X, ord("Q"), 0]))
    stream = b"".join(pieces)
    driver.feed(stream, data.draw(split_points(stream)))


@fuzz_settings(ci=400)
@given(
    method=st.sampled_from([AuthMethod.SCRAM_SHA_256, AuthMethod.MD5]),
    user=users,
    tls=st.booleans(),
    lookup=st.booleans(),
    data=st.data(),
)
def test_any_login_conversation_ends_in_a_pgproxy_error_or_a_rightful_login(
    method, user, tls, lookup, data
):
    # The right password half of the time, so that mutations also hit the successful paths.
    password = data.draw(st.just(PASSWORDS.get(user, "wonderland")) | passwords)
    driver = Driver(method, tls=tls, lookup=lookup)
    send(data, driver, data.draw(startup_stream(user)), is_typed=False)
    # At most: SASLInitialResponse (or md5), client-first after an empty challenge, client-final.
    answered = 0
    while not driver.over:
        requests = driver.auth_requests()
        if len(requests) == answered:
            break  # our last answer was cut or broken: the login waits for more bytes
        answered = len(requests)
        answer = client_answer(data, requests[-1], user, password, driver)
        if answer is None:
            break
        send(data, driver, answer, is_typed=True)
    driver.check(user, password)
    outcome = driver.done or driver.error
    name = type(outcome).__name__ if outcome else "waiting"
    event(f"{method.value}: {name} {getattr(outcome, 'message', '')[:50]}")


def client_answer(data, request, user: str, password: str, driver: Driver) -> list[bytes] | None:
    """What a client sends to the latest authentication request, before mutation."""
    code, payload = request
    if code == 5:  # md5, with a 4-byte salt
        return [m.password_message(md5_response(password, user, payload))]
    if code == 10:  # AuthenticationSASL: SCRAM-SHA-256 offered
        exchange = driver.scram = ScramClientExchange(password, nonce_source=lambda n: b"\x07" * n)
        mechanism = data.draw(st.sampled_from(["SCRAM-SHA-256"] * 4 + ["SCRAM-SHA-256-PLUS", ""]))
        if data.draw(st.integers(0, 4)) == 0:
            return [m.sasl_initial_response(mechanism, None)]  # client-first comes next
        return [m.sasl_initial_response(mechanism, exchange.client_first())]
    if code == 11 and driver.scram is not None:
        try:
            if not payload:  # the empty challenge after an initial response without data
                return [m.sasl_response(driver.scram.client_first())]
            return [m.sasl_response(driver.scram.handle_server_first(payload))]
        except PgProxyError:
            # Our messages were mutated into something the client exchange cannot follow.
            return [m.sasl_response(data.draw(st.binary(max_size=120)))]
    return None


# --- startup packets ------------------------------------------------------------------------


@fuzz_settings(ci=500)
@given(
    payload=st.binary(max_size=200)
    | st.lists(
        st.binary(max_size=16) | st.sampled_from([b"user", b"database", b"replication"]),
        max_size=8,
    ).map(lambda parts: struct.pack("!i", 3 << 16) + b"\x00".join(parts) + b"\x00\x00"),
    code=st.sampled_from(
        [
            3 << 16,
            (3 << 16) | 7,
            2 << 16,
            SSL_REQUEST_CODE,
            GSSENC_REQUEST_CODE,
            CANCEL_REQUEST_CODE,
        ]
    )
    | st.integers(0, 2**32 - 1),
    replace_code=st.booleans(),
)
def test_parse_startup_packet_returns_a_request_or_raises_a_pgproxy_error(
    payload, code, replace_code
):
    if replace_code or len(payload) < 4:
        payload = struct.pack("!I", code) + payload[4:]
    sqlstate: str | None
    try:
        parsed = parse_startup_packet(packet(payload))
    except PgProxyError as exc:
        sqlstate = exc.sqlstate
    else:
        sqlstate = None
    if sqlstate is not None:
        assert sqlstate in LOGIN_SQLSTATES
    elif isinstance(parsed, Startup):
        assert parsed.user and isinstance(parsed.user, str)
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in parsed.params.items())


# A well-formed startup packet with invalid UTF-8 in each place the brief names.
_INVALID_UTF8_STARTUPS = {
    "user_name": [(b"user", b"\xc3\x28app")],
    "parameter_name": [(b"user", b"app"), (b"\xff\xfeapplication_name", b"x")],
    "parameter_value": [(b"user", b"app"), (b"application_name", b"\xed\xa0\x80")],
    "database": [(b"user", b"app"), (b"database", b"app\x80")],
}


@pytest.mark.parametrize("place", sorted(_INVALID_UTF8_STARTUPS))
def test_invalid_utf8_in_a_startup_packet_is_a_protocol_violation(place):
    login = Driver(AuthMethod.SCRAM_SHA_256, tls=False, lookup=False)
    login.feed(startup_packet(_INVALID_UTF8_STARTUPS[place]), [])
    assert isinstance(login.error, ProtocolError)
    assert login.error.sqlstate == "08P01"


@pytest.mark.parametrize(
    "length", [0, -1, -8, 3, 7, 0x7FFFFFFF, (1 << 30) + 5, -(2**31), MAX_STARTUP_PACKET_LENGTH + 1]
)
def test_a_hostile_startup_length_is_refused_before_buffering(length):
    login = Driver(AuthMethod.SCRAM_SHA_256, tls=False, lookup=False)
    login.feed(struct.pack("!ii", length, 3 << 16), [])
    assert isinstance(login.error, ProtocolError), login.error
    assert "length" in login.error.message


def test_a_one_mib_startup_packet_is_refused_at_its_first_four_bytes():
    body = struct.pack("!i", 3 << 16) + b"user\x00app\x00" + b"a\x00" * (1 << 19) + b"\x00"
    login = Driver(AuthMethod.SCRAM_SHA_256, tls=False, lookup=False)
    login.feed(packet(body), [4])
    assert isinstance(login.error, ProtocolError)
    assert login.sent == b""


# --- SASL and md5 messages: the explicit cases -------------------------------------------------


def after_startup(method=AuthMethod.SCRAM_SHA_256, user="alice") -> Driver:
    driver = Driver(method, tls=False, lookup=False)
    driver.feed(m.startup_message({"user": user, "database": "app"}), [])
    assert not driver.over
    return driver


def sasl_initial(mechanism: bytes, length: int, data: bytes) -> bytes:
    return m.sasl_response(mechanism + b"\x00" + struct.pack("!i", length) + data)


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (sasl_initial(b"SCRAM-SHA-1", 11, b"n,,n=,r=abc"), "invalid SASL authentication mechanism"),
        (sasl_initial(b"", 11, b"n,,n=,r=abc"), "invalid SASL authentication mechanism"),
        (sasl_initial(b"SCRAM-SHA-256", -2, b""), "wrong data length"),
        (sasl_initial(b"SCRAM-SHA-256", -1, b"n,,n=,r=abc"), "wrong data length"),
        (sasl_initial(b"SCRAM-SHA-256", -(2**31), b"x"), "wrong data length"),
        (sasl_initial(b"SCRAM-SHA-256", 0x7FFFFFFF, b"n,,n=,r=abc"), "wrong data length"),
        (sasl_initial(b"SCRAM-SHA-256", 12, b"n,,n=,r=abc"), "wrong data length"),
        (m.sasl_response(b"SCRAM-SHA-256\x00\x00\x00"), "missing data length"),
        (m.sasl_response(b"SCRAM-SHA-256"), "missing string terminator"),
        (m.sasl_response(b""), "missing string terminator"),
        (sasl_initial(b"SCRAM-SHA-256", 3, b"p,,"), "channel binding"),
        (sasl_initial(b"SCRAM-SHA-256", 2, b"n,"), "incomplete"),
        (sasl_initial(b"SCRAM-SHA-256\xff", 3, b"n,,"), "not valid UTF-8"),
    ],
)
def test_broken_sasl_initial_responses_are_protocol_violations(message, expected):
    driver = after_startup()
    driver.feed(message, [])
    assert isinstance(driver.error, ProtocolError), driver.error
    assert expected in driver.error.message


@pytest.mark.parametrize(
    "length", [0, 3, -1, -8, 0x7FFFFFFF, (1 << 30) + 5, MAX_AUTH_MESSAGE_LENGTH + 5]
)
@pytest.mark.parametrize("method", [AuthMethod.SCRAM_SHA_256, AuthMethod.MD5])
def test_hostile_password_message_lengths_are_refused_before_buffering(method, length):
    driver = after_startup(method)
    driver.feed(b"p" + struct.pack("!i", length), [])
    assert isinstance(driver.error, ProtocolError), driver.error
    assert "invalid message length" in driver.error.message


def scram_to_final(password: str = "wonderland", user: str = "alice"):
    """A driver waiting for client-final, and the client exchange that got it there."""
    driver = after_startup(user=user)
    client = ScramClientExchange(password, nonce_source=lambda n: b"\x05" * n)
    driver.feed(m.sasl_initial_response("SCRAM-SHA-256", client.client_first()), [])
    code, server_first = driver.last_auth_request()
    assert code == 11
    return driver, client, server_first


def test_every_truncation_of_client_first_is_refused_or_only_shortens_the_nonce():
    whole = ScramClientExchange("wonderland").client_first()
    nonce_at = whole.index(b"r=") + 2
    for cut in range(len(whole)):
        driver = after_startup()
        driver.feed(m.sasl_initial_response("SCRAM-SHA-256", whole[:cut]), [])
        if cut <= nonce_at:
            assert isinstance(driver.error, ProtocolError), (cut, driver.error)
            continue
        # "n,,n=,r=B": a shorter client nonce is still a client-first-message; a final that
        # carries the whole nonce is then refused.
        assert driver.error is None
        code, server_first = driver.last_auth_request()
        assert code == 11
        server_nonce = server_first.split(b",")[0][2 + cut - nonce_at :]
        final = b"c=biws,r=" + whole[nonce_at:] + server_nonce + b",p=" + b"A" * 43 + b"="
        driver.feed(m.sasl_response(final), [])
        assert driver.done is None
        assert isinstance(driver.error, ProtocolError), driver.error
        assert "nonce mismatch" in driver.error.message


def test_every_truncation_of_client_final_ends_in_a_pgproxy_error_never_a_login():
    _driver, client, server_first = scram_to_final()
    whole = client.handle_server_first(server_first)
    for cut in range(len(whole)):
        driver, client, server_first = scram_to_final()
        client.handle_server_first(server_first)
        driver.feed(m.sasl_response(whole[:cut]), [])
        assert isinstance(driver.error, ProtocolError | AuthError), (cut, driver.error)
        assert driver.done is None


def _final_with(client_final: bytes, **replace: str) -> bytes:
    parts = dict(part.split("=", 1) for part in client_final.decode().split(","))
    parts.update(replace)
    return ",".join(f"{k}={v}" for k, v in parts.items()).encode()


@pytest.mark.parametrize(
    ("replace", "expected"),
    [
        ({"r": "not-the-nonce"}, "nonce mismatch"),
        ({"c": "eSws"}, "channel binding"),  # base64("y,,"): the client said "n"
        ({"c": "cD10bHMtc2VydmVyLWVuZC1wb2ludCwsAAAA"}, "channel binding"),  # p=tls-server-...
        ({"c": "!!!"}, "invalid base64"),
        ({"p": "AAAA"}, "invalid ClientProof"),
        ({"p": "A" * 43 + "="}, None),  # a proof of the right size that is wrong: 28P01
    ],
)
def test_client_final_with_a_wrong_nonce_binding_or_proof_never_logs_in(replace, expected):
    driver, client, server_first = scram_to_final()
    final = _final_with(client.handle_server_first(server_first), **replace)
    driver.feed(m.sasl_response(final), [])
    assert driver.done is None
    if expected is None:
        assert isinstance(driver.error, AuthError)
        assert driver.error.sqlstate == "28P01"
    else:
        assert isinstance(driver.error, ProtocolError), driver.error
        assert expected in driver.error.message


@pytest.mark.parametrize("user", ["alice", "nobody", "mo"])
@pytest.mark.parametrize(
    ("body", "sqlstate"),
    [
        (b"", "08P01"),  # no terminator at all
        (b"\x00", "28P01"),  # the empty password
        (b"md5" + b"0" * 32 + b"\x00", "28P01"),
        (b"md5\x00junk\x00", "08P01"),
        (b"x" * (MAX_AUTH_MESSAGE_LENGTH - 1) + b"\x00", "28P01"),  # as long as allowed
        (b"x" * MAX_AUTH_MESSAGE_LENGTH + b"\x00", "08P01"),  # one byte over
        (b"x" * (1 << 20) + b"\x00", "08P01"),  # 1 MiB
    ],
)
def test_md5_password_messages_empty_wrong_or_over_long_never_log_in(user, body, sqlstate):
    driver = after_startup(AuthMethod.MD5, user=user)
    driver.feed(b"p" + struct.pack("!i", len(body) + 4) + body, [])
    assert driver.done is None
    assert driver.error is not None
    assert driver.error.sqlstate == sqlstate, driver.error


# --- the SCRAM server exchange on its own ---------------------------------------------------------

_SECRET = USERS["alice"].scram


@fuzz_settings(ci=500)
@given(
    first=st.binary(max_size=100)
    | st.builds(
        lambda flag, authz, attrs: f"{flag},{authz},{attrs}".encode(),
        st.sampled_from(["n", "y", "p=tls-unique", "p", "", "x"]),
        st.sampled_from(["", "a=alice", "z"]),
        st.sampled_from(
            ["n=,r=abc", "n=alice,r=", "r=abc", "m=ext,n=,r=a", "n=,r=a,b", "n=,r=\x7f"]
        )
        | st.text(max_size=40),
    ),
    final=st.binary(max_size=160) | st.text(max_size=160).map(str.encode),
    mock=st.booleans(),
)
@example(first=b"n,,n=,r=abc", final=b"c=biws,r=abc,p=", mock=False)
@example(first=b"n,,n=,r=abc", final=b"c=biws,p=x,r=abc", mock=False)
@example(first=b"y,,n=,r=abc", final=b"c=eSws,r=abcX,p=" + b"A" * 44, mock=True)
def test_scram_server_parsers_raise_only_protocol_or_auth_errors(first, final, mock):
    nonces = counter_bytes()
    exchange = (
        ScramServerExchange.mock(b"seed", nonces) if mock else ScramServerExchange(_SECRET, nonces)
    )
    try:
        exchange.handle_client_first(first)
    except ProtocolError:
        return
    with pytest.raises((ProtocolError, AuthError)):
        exchange.handle_client_final(final)
