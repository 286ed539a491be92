"""SCRAM-SHA-256 both ways, SASLprep and md5, checked against an independent implementation.

`Reference` below is written straight from RFC 5802 section 3 with hashlib/hmac, and is itself
checked against the RFC 7677 example exchange, so the production code is never its own oracle.
"""

import base64
import contextlib
import hashlib
import hmac
import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgproxy.errors import AuthError, ProtocolError
from pgproxy.wire.scram import (
    ScramClientExchange,
    ScramSecret,
    ScramServerExchange,
    check_md5_response,
    format_scram_secret,
    is_md5_secret,
    make_scram_secret,
    md5_response,
    md5_secret,
    parse_scram_secret,
    saslprep,
)

# RFC 7677 section 3: user "user", password "pencil".
RFC_SALT = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
RFC_CLIENT_FIRST_BARE = "n=user,r=rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_FIRST = (
    "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
)
RFC_CLIENT_FINAL_WITHOUT_PROOF = "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
RFC_PROOF = "dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
RFC_SERVER_SIGNATURE = "6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="


class Reference:
    """Independent SCRAM-SHA-256 arithmetic (RFC 5802 section 3)."""

    def __init__(self, password: bytes, salt: bytes, iterations: int) -> None:
        salted = hashlib.pbkdf2_hmac("sha256", password, salt, iterations)
        self.client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
        self.stored_key = hashlib.sha256(self.client_key).digest()
        self.server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()

    def proof(self, auth_message: str) -> str:
        signature = hmac.new(self.stored_key, auth_message.encode(), hashlib.sha256).digest()
        return base64.b64encode(
            bytes(a ^ b for a, b in zip(self.client_key, signature, strict=True))
        ).decode()

    def server_signature(self, auth_message: str) -> str:
        mac = hmac.new(self.server_key, auth_message.encode(), hashlib.sha256).digest()
        return base64.b64encode(mac).decode()


def counter_nonces():
    """A deterministic nonce source."""
    counter = itertools.count()
    return lambda n: bytes([next(counter) % 256]) * n


def test_the_reference_reproduces_the_rfc_7677_example():
    ref = Reference(b"pencil", RFC_SALT, 4096)
    auth = f"{RFC_CLIENT_FIRST_BARE},{RFC_SERVER_FIRST},{RFC_CLIENT_FINAL_WITHOUT_PROOF}"
    assert ref.proof(auth) == RFC_PROOF
    assert ref.server_signature(auth) == RFC_SERVER_SIGNATURE


# --- secrets ------------------------------------------------------------------------------


def test_make_scram_secret_derives_the_rfc_keys():
    secret = make_scram_secret("pencil", salt=RFC_SALT)
    ref = Reference(b"pencil", RFC_SALT, 4096)
    assert secret == ScramSecret(4096, RFC_SALT, ref.stored_key, ref.server_key)


def test_make_scram_secret_uses_a_fresh_16_byte_salt_and_4096_iterations_by_default():
    one, two = make_scram_secret("x"), make_scram_secret("x")
    assert len(one.salt) == 16
    assert one.salt != two.salt
    assert one.iterations == 4096


def test_a_secret_formats_and_parses_in_postgres_stored_format():
    secret = make_scram_secret("pencil", salt=RFC_SALT, iterations=10)
    text = format_scram_secret(secret)
    assert text.startswith("SCRAM-SHA-256$10:W22ZaJ0SNY7soEsUEjb6gQ==$")
    assert parse_scram_secret(text) == secret


def test_secret_repr_does_not_show_the_keys():
    secret = make_scram_secret("pencil", salt=RFC_SALT)
    assert base64.b64encode(secret.stored_key).decode() not in repr(secret)
    assert "stored_key" not in repr(secret)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "md5abc",
        "SCRAM-SHA-1$4096:c2FsdA==$" + "A" * 44 + ":" + "A" * 44,
        "SCRAM-SHA-256$x:c2FsdA==$" + "A" * 43 + "=:" + "A" * 43 + "=",
        "SCRAM-SHA-256$0:c2FsdA==$" + "A" * 43 + "=:" + "A" * 43 + "=",
        "SCRAM-SHA-256$4096:c2Fsd!==$" + "A" * 43 + "=:" + "A" * 43 + "=",
        "SCRAM-SHA-256$4096:$" + "A" * 43 + "=:" + "A" * 43 + "=",
        "SCRAM-SHA-256$4096:c2FsdA==$QUFB:QUFB",
        "SCRAM-SHA-256$4096:c2FsdA==$" + "A" * 43 + "=",
    ],
)
def test_parse_scram_secret_refuses_bad_text_with_value_error(text):
    with pytest.raises(ValueError, match="secret"):
        parse_scram_secret(text)


# --- SASLprep -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("password", "prepared"),
    [
        ("pencil", "pencil"),
        ("a\tb\x07", "a\tb\x07"),  # ASCII passes unchanged, as in pg_saslprep
        ("I\u00adX", "IX"),  # RFC 4013 examples: soft hyphen mapped to nothing
        ("\u00aa", "a"),  # NFKC
        ("\u2168", "IX"),  # NFKC
        ("I\u00a0X", "I X"),  # non-ASCII space mapped to space
        ("\u0627\u0031\u0628", "\u0627\u0031\u0628"),  # RandALCat at both ends
        ("caf\u0065\u0301", "caf\u00e9"),  # combining sequence composed
    ],
)
def test_saslprep_prepares_passwords_like_rfc_4013(password, prepared):
    assert saslprep(password) == prepared


@pytest.mark.parametrize(
    "password",
    [
        "\u00ad",  # empty after mapping
        "\u00e9\u0007",  # control character
        "\u0627\u0031",  # RandALCat not at both ends
        "\u0627a\u0628",  # RandALCat mixed with LCat
        "a\u0221b",  # unassigned in Unicode 3.2
        "\u00e9\ue000",  # private use
        "\udcff",  # not valid UTF-8
    ],
)
def test_saslprep_returns_the_raw_password_when_postgres_would(password):
    assert saslprep(password) == password


def test_a_saslprep_password_logs_in_with_its_prepared_form():
    secret = make_scram_secret("I\u00adX", salt=b"salt")
    assert secret == make_scram_secret("IX", salt=b"salt")


# --- server side --------------------------------------------------------------------------


def server_exchange(password="pencil", nonce_source=None):
    secret = make_scram_secret(password, salt=RFC_SALT)
    return ScramServerExchange(secret, nonce_source or counter_nonces())


def client_final_for(ref, client_first_bare, server_first, gs2=b"n,,"):
    nonce = server_first.split(",")[0][2:]
    without_proof = f"c={base64.b64encode(gs2).decode()},r={nonce}"
    auth = f"{client_first_bare},{server_first},{without_proof}"
    return f"{without_proof},p={ref.proof(auth)}".encode(), auth


def test_server_accepts_a_correct_proof_and_answers_with_its_signature():
    exchange = server_exchange(nonce_source=lambda n: b"\x01" * n)
    server_first = exchange.handle_client_first(b"n,," + RFC_CLIENT_FIRST_BARE.encode()).decode()
    nonce = "rOprNGfwEbeRWgbNEkqO" + base64.b64encode(b"\x01" * 18).decode()
    assert server_first == f"r={nonce},s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
    ref = Reference(b"pencil", RFC_SALT, 4096)
    final, auth = client_final_for(ref, RFC_CLIENT_FIRST_BARE, server_first)
    assert exchange.handle_client_final(final) == f"v={ref.server_signature(auth)}".encode()
    assert exchange.client_key == ref.client_key


def test_server_rejects_a_wrong_password_with_auth_error():
    exchange = server_exchange()
    server_first = exchange.handle_client_first(b"n,,n=,r=abc").decode()
    final, _ = client_final_for(Reference(b"wrong", RFC_SALT, 4096), "n=,r=abc", server_first)
    with pytest.raises(AuthError):
        exchange.handle_client_final(final)
    assert exchange.client_key is None


def test_server_accepts_the_y_flag_with_matching_channel_binding_data():
    exchange = server_exchange()
    server_first = exchange.handle_client_first(b"y,,n=,r=abc").decode()
    ref = Reference(b"pencil", RFC_SALT, 4096)
    final, _ = client_final_for(ref, "n=,r=abc", server_first, gs2=b"y,,")
    assert final.startswith(b"c=eSws,")
    assert exchange.handle_client_final(final).startswith(b"v=")


def test_server_refuses_channel_binding_data_that_does_not_match_the_flag():
    exchange = server_exchange()
    server_first = exchange.handle_client_first(b"y,,n=,r=abc").decode()
    final, _ = client_final_for(Reference(b"pencil", RFC_SALT, 4096), "n=,r=abc", server_first)
    with pytest.raises(ProtocolError, match="channel binding"):
        exchange.handle_client_final(final)


def test_server_refuses_a_nonce_that_is_not_its_own():
    exchange = server_exchange()
    exchange.handle_client_first(b"n,,n=,r=abc")
    with pytest.raises(ProtocolError, match="nonce"):
        exchange.handle_client_final(b"c=biws,r=abcXYZ,p=" + b"A" * 43 + b"=")


def test_server_refuses_a_proof_of_the_wrong_length():
    exchange = server_exchange(nonce_source=lambda n: b"\x00" * n)
    server_first = exchange.handle_client_first(b"n,,n=,r=abc").decode()
    nonce = server_first.split(",")[0][2:]
    with pytest.raises(ProtocolError, match="ClientProof"):
        exchange.handle_client_final(f"c=biws,r={nonce},p=QUJD".encode())


def test_server_ignores_extensions_before_the_proof():
    exchange = server_exchange()
    server_first = exchange.handle_client_first(b"n,,n=,r=abc,x=ext").decode()
    ref = Reference(b"pencil", RFC_SALT, 4096)
    nonce = server_first.split(",")[0][2:]
    without_proof = f"c=biws,r={nonce},x=more"
    auth = f"n=,r=abc,x=ext,{server_first},{without_proof}"
    final = f"{without_proof},p={ref.proof(auth)}".encode()
    assert exchange.handle_client_final(final) == f"v={ref.server_signature(auth)}".encode()


@pytest.mark.parametrize(
    ("client_first", "match"),
    [
        (b"p=tls-server-end-point,,n=,r=abc", "channel binding"),
        (b"n,a=admin,n=,r=abc", "authorization identity"),
        (b"n,x,n=,r=abc", "authorization identity"),
        (b"q,,n=,r=abc", "channel-binding flag"),
        (b"n,,m=ext,n=,r=abc", "extension"),
        (b"n,,r=abc", "'n'"),
        (b"n,,n=", "'r'"),
        (b"n,,n=,r=", "nonce"),
        (b"n,,n=,r=a b", "nonce"),
        (b"n,,", "attribute"),
        (b"n,", "incomplete"),
        (b"n,,n=,r=\xff", "UTF-8"),
    ],
)
def test_server_refuses_malformed_client_first_messages(client_first, match):
    with pytest.raises(ProtocolError, match=match):
        server_exchange().handle_client_first(client_first)


def test_server_refuses_messages_out_of_order():
    exchange = server_exchange()
    with pytest.raises(ProtocolError):
        exchange.handle_client_final(b"c=biws,r=x,p=x")
    exchange.handle_client_first(b"n,,n=,r=abc")
    with pytest.raises(ProtocolError):
        exchange.handle_client_first(b"n,,n=,r=abc")


def test_mock_exchange_looks_like_a_real_one_and_always_fails():
    mock = ScramServerExchange.mock(b"seed" + b"ghost", counter_nonces())
    server_first = mock.handle_client_first(b"n,,n=,r=abc").decode()
    assert server_first.startswith("r=abc")
    assert ",i=4096" in server_first
    salt = base64.b64decode(server_first.split(",")[1][2:])
    assert len(salt) == 16
    for password in (b"", b"pencil", b"ghost"):
        again = ScramServerExchange.mock(b"seed" + b"ghost", counter_nonces())
        first = again.handle_client_first(b"n,,n=,r=abc").decode()
        final, _ = client_final_for(Reference(password, salt, 4096), "n=,r=abc", first)
        with pytest.raises(AuthError):
            again.handle_client_final(final)


def test_mock_salt_is_stable_per_user_and_differs_between_users():
    def salt_of(seed):
        first = ScramServerExchange.mock(seed, counter_nonces()).handle_client_first(b"n,,n=,r=a")
        return first.split(b",")[1]

    assert salt_of(b"seed:alice") == salt_of(b"seed:alice")
    assert salt_of(b"seed:alice") != salt_of(b"seed:bob")


# --- client side --------------------------------------------------------------------------


def test_client_sends_the_rfc_proof_and_verifies_the_server_signature():
    client = ScramClientExchange("pencil", nonce_source=lambda n: b"\x02" * n)
    client_nonce = base64.b64encode(b"\x02" * 18).decode()
    assert client.client_first() == f"n,,n=,r={client_nonce}".encode()
    server_first = f"r={client_nonce}SERVER,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
    final = client.handle_server_first(server_first.encode()).decode()
    ref = Reference(b"pencil", RFC_SALT, 4096)
    without_proof = f"c=biws,r={client_nonce}SERVER"
    auth = f"n=,r={client_nonce},{server_first},{without_proof}"
    assert final == f"{without_proof},p={ref.proof(auth)}"
    assert not client.is_finished
    client.handle_server_final(f"v={ref.server_signature(auth)}".encode())
    assert client.is_finished


def test_client_refuses_a_server_signature_from_a_server_without_the_secret():
    client = ScramClientExchange("pencil", nonce_source=lambda n: b"\x02" * n)
    nonce = client.client_first().decode().split("r=")[1]
    client.handle_server_first(f"r={nonce}S,s=c2FsdA==,i=4096".encode())
    with pytest.raises(AuthError, match="server signature"):
        client.handle_server_final(b"v=" + base64.b64encode(b"\x00" * 32))


def test_client_reports_a_server_side_scram_error():
    client = ScramClientExchange("pencil")
    nonce = client.client_first().decode().split("r=")[1]
    client.handle_server_first(f"r={nonce}S,s=c2FsdA==,i=4096".encode())
    with pytest.raises(AuthError, match="invalid-proof"):
        client.handle_server_final(b"e=invalid-proof")


@pytest.mark.parametrize("server_final", [b"x=1", b"v=!!", b"", b"v"])
def test_client_refuses_a_malformed_server_final_message(server_final):
    client = ScramClientExchange("pencil")
    nonce = client.client_first().decode().split("r=")[1]
    client.handle_server_first(f"r={nonce}S,s=c2FsdA==,i=4096".encode())
    with pytest.raises(ProtocolError):
        client.handle_server_final(server_final)


@pytest.mark.parametrize(
    ("server_first", "match"),
    [
        ("r=OTHER,s=c2FsdA==,i=4096", "nonce"),
        ("r={n},s=c2FsdA==,i=4096", "nonce"),
        ("r={n}X,s=,i=4096", "salt"),
        ("r={n}X,s=c2FsdA==,i=-1", "iteration"),
        ("r={n}X,s=c2FsdA==,i=0", "iteration"),
        ("r={n}X,s=c2FsdA==,i=", "iteration"),
        ("r={n}X,s=c2F$dA==,i=1", "base64"),
        ("r={n}X,s=c2FsdA==", "'i'"),
        ("m=x,r={n}X,s=c2FsdA==,i=1", "extension"),
        ("r={n}X,,s=c2FsdA==,i=1", "attribute"),
    ],
)
def test_client_refuses_malformed_server_first_messages(server_first, match):
    client = ScramClientExchange("pencil")
    nonce = client.client_first().decode().split("r=")[1]
    with pytest.raises(ProtocolError, match=match):
        client.handle_server_first(server_first.replace("{n}", nonce).encode())


def test_client_refuses_messages_out_of_order():
    client = ScramClientExchange("pencil")
    with pytest.raises(ProtocolError):
        client.handle_server_first(b"r=x,s=c2FsdA==,i=1")
    client.client_first()
    with pytest.raises(ProtocolError):
        client.client_first()
    with pytest.raises(ProtocolError):
        client.handle_server_final(b"v=x")


def test_client_caches_derived_keys_so_repeated_logins_skip_pbkdf2(monkeypatch):
    calls = []
    real = hashlib.pbkdf2_hmac

    def counting(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(hashlib, "pbkdf2_hmac", counting)
    salt = b"cache-test-salt"
    for _ in range(3):
        client = ScramClientExchange("cached password")
        nonce = client.client_first().decode().split("r=")[1]
        client.handle_server_first(
            f"r={nonce}S,s={base64.b64encode(salt).decode()},i=4096".encode()
        )
    assert len(calls) == 1


# --- both sides ---------------------------------------------------------------------------


def run_exchange(client: ScramClientExchange, server: ScramServerExchange) -> None:
    server_first = server.handle_client_first(client.client_first())
    server_final = server.handle_client_final(client.handle_server_first(server_first))
    client.handle_server_final(server_final)


def test_client_and_server_complete_an_exchange_and_agree_on_the_client_key():
    secret = make_scram_secret("s3cret", iterations=16)
    client = ScramClientExchange("s3cret")
    server = ScramServerExchange(secret, counter_nonces())
    run_exchange(client, server)
    assert client.is_finished
    assert server.client_key is not None
    assert hashlib.sha256(server.client_key).digest() == secret.stored_key


def test_client_with_a_wrong_password_is_refused_by_the_server():
    secret = make_scram_secret("s3cret", iterations=16)
    with pytest.raises(AuthError):
        run_exchange(ScramClientExchange("wrong"), ScramServerExchange(secret, counter_nonces()))


def test_pass_through_logs_in_with_the_client_key_recovered_from_a_client_login():
    secret = make_scram_secret("s3cret", iterations=16)
    front = ScramServerExchange(secret, counter_nonces())
    run_exchange(ScramClientExchange("s3cret"), front)
    assert front.client_key is not None
    # The proxy now logs in to a server that stores the same secret, without the password.
    client = ScramClientExchange(secret=secret, client_key=front.client_key)
    run_exchange(client, ScramServerExchange(secret, counter_nonces()))
    assert client.is_finished


def test_pass_through_fails_clearly_when_the_server_secret_differs():
    ours = make_scram_secret("s3cret", iterations=16)
    theirs = make_scram_secret("s3cret", iterations=16)  # another salt
    front = ScramServerExchange(ours, counter_nonces())
    run_exchange(ScramClientExchange("s3cret"), front)
    assert front.client_key is not None
    client = ScramClientExchange(secret=ours, client_key=front.client_key)
    with pytest.raises(AuthError, match="pass-through"):
        run_exchange(client, ScramServerExchange(theirs, counter_nonces()))


def test_pass_through_needs_a_client_key_that_matches_the_secret():
    secret = make_scram_secret("s3cret", iterations=16)
    with pytest.raises(ValueError, match="does not belong"):
        ScramClientExchange(secret=secret, client_key=b"\x00" * 32)
    with pytest.raises(ValueError, match="needs a password"):
        ScramClientExchange(secret=secret)


# --- garbage ------------------------------------------------------------------------------


@given(st.binary(max_size=80))
def test_garbage_client_first_raises_only_protocol_error(data):
    with contextlib.suppress(ProtocolError):
        server_exchange().handle_client_first(data)


SERVER_SECRET = make_scram_secret("pencil", salt=RFC_SALT, iterations=16)


@given(st.binary(max_size=120) | st.text(max_size=120).map(str.encode))
def test_garbage_client_final_raises_only_protocol_error(data):
    exchange = ScramServerExchange(SERVER_SECRET, counter_nonces())
    exchange.handle_client_first(b"n,,n=,r=abc")
    with pytest.raises(ProtocolError):
        exchange.handle_client_final(data)


def test_every_truncation_of_a_valid_client_final_raises_only_protocol_error():
    exchange = ScramServerExchange(SERVER_SECRET, counter_nonces())
    server_first = exchange.handle_client_first(b"n,,n=,r=abc").decode()
    final, _ = client_final_for(Reference(b"pencil", RFC_SALT, 16), "n=,r=abc", server_first)
    for cut in range(len(final)):
        again = ScramServerExchange(SERVER_SECRET, counter_nonces())
        again.handle_client_first(b"n,,n=,r=abc")
        with pytest.raises(ProtocolError):
            again.handle_client_final(final[:cut])


@given(st.binary(max_size=80) | st.text(max_size=80).map(str.encode))
def test_garbage_server_first_raises_only_protocol_error(data):
    client = ScramClientExchange("pencil")
    client.client_first()
    with pytest.raises(ProtocolError):
        client.handle_server_first(data)


@given(st.binary(max_size=80))
def test_garbage_server_final_raises_only_protocol_or_auth_errors(data):
    client = ScramClientExchange("pencil", nonce_source=lambda n: b"\x03" * n)
    nonce = client.client_first().decode().split("r=")[1]
    client.handle_server_first(f"r={nonce}S,s=c2FsdA==,i=16".encode())
    with contextlib.suppress(ProtocolError, AuthError):
        client.handle_server_final(data)


# --- md5 ----------------------------------------------------------------------------------


def test_md5_secret_is_md5_of_password_then_user():
    assert md5_secret("postgres", "postgres") == "md53175bce1d3201d16594cebf9d7eb3f9d"
    assert is_md5_secret("md53175bce1d3201d16594cebf9d7eb3f9d")
    assert not is_md5_secret("md53175BCE1D3201D16594CEBF9D7EB3F9D")
    assert not is_md5_secret("md5abc")


def test_md5_response_is_the_same_from_the_password_or_the_secret():
    salt = b"\x01\x02\x03\x04"
    inner = hashlib.md5(b"pwuser").hexdigest().encode()
    expected = b"md5" + hashlib.md5(inner + salt).hexdigest().encode()
    assert md5_response("pw", "user", salt) == expected
    assert md5_response(md5_secret("user", "pw"), "user", salt) == expected


def test_check_md5_response_accepts_only_the_right_answer():
    secret = md5_secret("user", "pw")
    salt = b"abcd"
    assert check_md5_response(secret, salt, md5_response("pw", "user", salt))
    assert not check_md5_response(secret, salt, md5_response("nope", "user", salt))
    assert not check_md5_response(secret, b"abce", md5_response("pw", "user", salt))
    assert not check_md5_response(secret, salt, b"")
