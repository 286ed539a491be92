"""ClientLogin: startup packets and the three auth methods, fed as raw client bytes."""

import base64
import itertools
import struct

import pytest
from hypothesis import given, settings
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
    user_auth_from_password,
)
from pgproxy.errors import AuthError, FeatureNotSupportedError, PgProxyError, ProtocolError
from pgproxy.wire import messages as m
from pgproxy.wire.scram import (
    ScramClientExchange,
    format_scram_secret,
    make_scram_secret,
    md5_response,
    md5_secret,
)

ALICE = UserAuth(
    "alice",
    "wonderland",
    make_scram_secret("wonderland", iterations=16),
    md5_secret("alice", "wonderland"),
)
SCRAM_ONLY = UserAuth("sam", None, make_scram_secret("pw", iterations=16), None)
MD5_ONLY = UserAuth("mo", None, None, md5_secret("mo", "pw"))
USERS = {user.name: user for user in (ALICE, SCRAM_ONLY, MD5_ONLY)}


def counter_bytes():
    counter = itertools.count(1)
    return lambda n: bytes([next(counter) % 256]) * n


def new_login(method=AuthMethod.SCRAM_SHA_256, users=None, random_bytes=None):
    table = USERS if users is None else users
    return ClientLogin(
        auth_method=method,
        lookup_user=table.get,
        random_bytes=random_bytes or counter_bytes(),
        mock_seed=b"mock-seed",
    )


def startup(user="alice", **params):
    return m.startup_message({"user": user, **params})


def sent(events):
    return b"".join(e.data for e in events if isinstance(e, Send))


def backend_messages(data):
    """Split backend bytes into (code, body) pairs."""
    out = []
    pos = 0
    while pos < len(data):
        length = struct.unpack_from("!i", data, pos + 1)[0]
        out.append((chr(data[pos]), data[pos + 5 : pos + 1 + length]))
        pos += 1 + length
    return out


def scram_login(login, password, user="alice", chunk=None):
    """Drive a SCRAM login as a client; return the final events."""
    client = ScramClientExchange(password)
    events = feed(login, startup(user), chunk)
    [(code, body)] = backend_messages(sent(events))
    assert code == "R"
    assert m.parse_sasl_mechanisms(m.parse_authentication(body)[1]) == ["SCRAM-SHA-256"]
    events = feed(login, m.sasl_initial_response("SCRAM-SHA-256", client.client_first()), chunk)
    [(code, body)] = backend_messages(sent(events))
    auth_code, server_first = m.parse_authentication(body)
    assert auth_code == 11
    events = feed(login, m.sasl_response(client.handle_server_first(server_first)), chunk)
    final = [e for e in events if isinstance(e, Send)]
    [(code, body)] = backend_messages(final[0].data)
    auth_code, server_final = m.parse_authentication(body)
    assert auth_code == 12
    client.handle_server_final(server_final)
    return events


def feed(login, data, chunk=None):
    if chunk is None:
        return login.feed(data)
    events = []
    for i in range(0, len(data), chunk):
        events += login.feed(data[i : i + chunk])
    return events


# --- SCRAM --------------------------------------------------------------------------------


def test_scram_login_authenticates_with_the_client_key_and_no_authentication_ok():
    events = scram_login(new_login(), "wonderland")
    assert isinstance(events[0], Send)
    assert events[1] == Authenticated("alice", "alice", {}, events[1].client_key, b"")
    assert events[1].client_key is not None
    assert len(events) == 2


@pytest.mark.parametrize("chunk", [1, 2, 7])
def test_scram_login_works_with_packets_split_into_any_chunks(chunk):
    events = scram_login(new_login(), "wonderland", chunk=chunk)
    assert isinstance(events[-1], Authenticated)


def test_scram_login_with_a_wrong_password_fails_with_the_postgres_message():
    with pytest.raises(AuthError, match='password authentication failed for user "alice"'):
        scram_login(new_login(), "wrong")


def test_scram_login_for_an_unknown_user_fails_after_a_full_exchange_with_the_same_message():
    with pytest.raises(AuthError) as info:
        scram_login(new_login(), "anything", user="nobody")
    assert str(info.value) == 'password authentication failed for user "nobody"'
    assert info.value.sqlstate == "28P01"


def test_scram_login_for_a_user_with_only_an_md5_secret_fails_like_a_wrong_password():
    with pytest.raises(AuthError, match='for user "mo"'):
        scram_login(new_login(), "pw", user="mo")


def test_unknown_and_known_users_get_the_same_shape_of_challenge():
    users = {"alice": user_auth_from_password("alice", "wonderland")}  # default iterations

    def server_first(user):
        login = new_login(users=users)
        login.feed(startup(user))
        client = ScramClientExchange("x", nonce_source=lambda n: b"\x00" * n)
        data = sent(login.feed(m.sasl_initial_response("SCRAM-SHA-256", client.client_first())))
        return m.parse_authentication(backend_messages(data)[0][1])[1].decode().split(",")

    known, unknown = server_first("alice"), server_first("nobody")
    assert [part[:2] for part in known] == [part[:2] for part in unknown]
    assert len(known[1]) == len(unknown[1])  # salts of the same size
    assert known[2] == unknown[2]  # same iteration count


def test_scram_initial_response_without_data_gets_an_empty_challenge_first():
    login = new_login()
    login.feed(startup())
    client = ScramClientExchange("wonderland")
    events = login.feed(m.sasl_initial_response("SCRAM-SHA-256", None))
    assert sent(events) == m.authentication_sasl_continue(b"")
    events = login.feed(m.sasl_response(client.client_first()))
    server_first = m.parse_authentication(backend_messages(sent(events))[0][1])[1]
    events = login.feed(m.sasl_response(client.handle_server_first(server_first)))
    assert isinstance(events[-1], Authenticated)


def test_an_unknown_sasl_mechanism_is_a_protocol_violation():
    login = new_login()
    login.feed(startup())
    with pytest.raises(ProtocolError, match="invalid SASL authentication mechanism"):
        login.feed(m.sasl_initial_response("SCRAM-SHA-256-PLUS", b"p=x,,n=,r=a"))


def test_bytes_pipelined_after_the_last_auth_message_are_leftover():
    login = new_login()
    client = ScramClientExchange("wonderland")
    login.feed(startup())
    events = login.feed(m.sasl_initial_response("SCRAM-SHA-256", client.client_first()))
    server_first = m.parse_authentication(backend_messages(sent(events))[0][1])[1]
    tail = m.query("SELECT 1")
    events = login.feed(m.sasl_response(client.handle_server_first(server_first)) + tail)
    assert events[-1].leftover == tail


# --- md5 ----------------------------------------------------------------------------------


def md5_login(login, password, user="alice"):
    [(code, body)] = backend_messages(sent(login.feed(startup(user))))
    auth_code, salt = m.parse_authentication(body)
    assert (code, auth_code, len(salt)) == ("R", 5, 4)
    return login.feed(m.password_message(md5_response(password, user, salt)))


def test_md5_login_authenticates_without_a_client_key():
    events = md5_login(new_login(AuthMethod.MD5), "wonderland")
    assert events == [Authenticated("alice", "alice", {}, None, b"")]


def test_md5_login_with_a_wrong_password_fails():
    with pytest.raises(AuthError, match='password authentication failed for user "alice"'):
        md5_login(new_login(AuthMethod.MD5), "nope")


def test_md5_login_for_an_unknown_user_fails_with_the_same_message():
    with pytest.raises(AuthError, match='password authentication failed for user "ghost"'):
        md5_login(new_login(AuthMethod.MD5), "x", user="ghost")


def test_md5_login_for_a_user_with_only_a_scram_secret_fails_with_the_same_message():
    with pytest.raises(AuthError, match='password authentication failed for user "sam"'):
        md5_login(new_login(AuthMethod.MD5), "pw", user="sam")


def test_md5_login_works_for_a_user_with_only_an_md5_secret():
    assert isinstance(md5_login(new_login(AuthMethod.MD5), "pw", user="mo")[-1], Authenticated)


def test_md5_login_derives_the_secret_from_a_plaintext_only_user():
    users = {"pat": UserAuth("pat", "pw", None, None)}
    events = md5_login(new_login(AuthMethod.MD5, users), "pw", user="pat")
    assert isinstance(events[-1], Authenticated)


def test_the_md5_salt_comes_from_the_random_source():
    login = new_login(AuthMethod.MD5, random_bytes=lambda n: bytes(range(n)))
    assert login.feed(startup()) == [Send(m.authentication_md5(b"\x00\x01\x02\x03"))]


# --- trust and startup --------------------------------------------------------------------


def test_trust_authenticates_at_the_startup_message_with_its_parameters():
    login = new_login(AuthMethod.TRUST, users={})
    events = login.feed(startup(database="db", application_name="psql", replication="off"))
    assert events == [Authenticated("alice", "db", {"application_name": "psql"}, None, b"")]
    assert login.user == "alice"
    assert login.database == "db"


def test_trust_keeps_bytes_pipelined_after_the_startup_as_leftover():
    login = new_login(AuthMethod.TRUST)
    events = login.feed(startup() + m.query("SELECT 1"))
    assert events[-1].leftover == m.query("SELECT 1")


def test_ssl_and_gssenc_requests_are_refused_with_n_then_startup_continues():
    login = new_login(AuthMethod.TRUST)
    assert login.feed(m.gssenc_request()) == [Send(b"N")]
    assert login.feed(m.ssl_request()) == [Send(b"N")]
    assert isinstance(login.feed(startup())[-1], Authenticated)


@pytest.mark.parametrize("request_", [m.ssl_request(), m.gssenc_request()])
def test_a_second_ssl_or_gssenc_request_is_a_protocol_violation(request_):
    login = new_login()
    login.feed(request_)
    with pytest.raises(ProtocolError, match="duplicate"):
        login.feed(request_)


def test_cancel_request_is_reported_and_ends_the_login():
    login = new_login()
    assert login.feed(m.cancel_request(11, 22)) == [CancelRequested(11, 22)]
    with pytest.raises(ProtocolError, match="already finished"):
        login.feed(b"x")


def test_a_newer_minor_protocol_gets_negotiate_protocol_version_and_continues_as_3_0():
    login = new_login(AuthMethod.TRUST)
    packet = startup(database="db")
    packet = packet[:4] + struct.pack("!i", (3 << 16) | 2) + packet[8:]
    events = login.feed(packet)
    assert events == [
        Send(m.negotiate_protocol_version(0, [])),
        Authenticated("alice", "db", {}, None, b""),
    ]


def test_unknown_protocol_options_are_listed_in_negotiate_protocol_version():
    login = new_login(AuthMethod.TRUST)
    events = login.feed(m.startup_message({"user": "alice", "_pq_.b": "1", "_pq_.a": "2"}))
    assert events[0] == Send(m.negotiate_protocol_version(0, ["_pq_.a", "_pq_.b"]))
    assert events[1] == Authenticated("alice", "alice", {}, None, b"")


def test_negotiate_protocol_version_comes_before_the_authentication_request():
    login = new_login()
    packet = startup()
    packet = packet[:4] + struct.pack("!i", (3 << 16) | 1) + packet[8:]
    codes = [code for code, _ in backend_messages(sent(login.feed(packet)))]
    assert codes == ["v", "R"]


@pytest.mark.parametrize("length", [0, 4, 7, 10_001, -5])
def test_a_startup_packet_length_out_of_bounds_is_a_protocol_violation(length):
    with pytest.raises(ProtocolError, match="invalid length of startup packet"):
        new_login().feed(struct.pack("!i", length) + b"\x00" * 8)


def test_a_startup_packet_of_the_maximum_length_is_accepted():
    filler = "x" * (10_000 - len(startup(application_name="")))
    events = new_login(AuthMethod.TRUST).feed(startup(application_name=filler))
    assert isinstance(events[-1], Authenticated)


def test_replication_and_old_protocols_are_refused_at_startup():
    with pytest.raises(FeatureNotSupportedError, match="replication"):
        new_login().feed(startup(replication="database"))
    packet = startup()
    with pytest.raises(FeatureNotSupportedError, match="protocol"):
        new_login().feed(packet[:4] + struct.pack("!i", 2 << 16) + packet[8:])


def test_an_http_request_is_a_protocol_violation():
    with pytest.raises(ProtocolError):
        new_login().feed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")


# --- messages during auth -----------------------------------------------------------------


def test_terminate_during_auth_closes_silently():
    login = new_login()
    login.feed(startup())
    assert login.feed(m.terminate()) == [Closed()]


def test_a_message_other_than_a_password_during_auth_is_a_protocol_violation():
    login = new_login(AuthMethod.MD5)
    login.feed(startup())
    with pytest.raises(ProtocolError, match="expected password response, got message type 'Q'"):
        login.feed(m.query("SELECT 1"))


def test_an_oversized_auth_message_is_a_protocol_violation():
    login = new_login(AuthMethod.MD5)
    login.feed(startup())
    with pytest.raises(ProtocolError, match="invalid message length"):
        login.feed(b"p" + struct.pack("!i", MAX_AUTH_MESSAGE_LENGTH + 5))


def test_a_malformed_password_message_is_a_protocol_violation():
    login = new_login(AuthMethod.MD5)
    login.feed(startup())
    with pytest.raises(ProtocolError):
        login.feed(b"p\x00\x00\x00\x07abc")


@settings(max_examples=200)
@given(
    method=st.sampled_from(list(AuthMethod)),
    chunks=st.lists(st.binary(max_size=40), max_size=6),
    prefix=st.sampled_from([b"", startup(), m.ssl_request() + startup()]),
)
def test_garbage_from_a_client_raises_only_pgproxy_errors(method, chunks, prefix):
    login = new_login(method)
    try:
        for chunk in [prefix, *chunks]:
            login.feed(chunk)
    except PgProxyError:
        pass


# --- configured users ---------------------------------------------------------------------


def test_user_auth_from_a_plaintext_password_derives_both_secrets():
    auth = user_auth_from_password("alice", "wonderland")
    assert auth.password == "wonderland"
    assert auth.md5 == md5_secret("alice", "wonderland")
    assert auth.scram is not None
    assert auth.scram.iterations == 4096
    assert "wonderland" not in repr(auth)


def test_user_auth_from_a_scram_secret_keeps_only_the_secret():
    secret = make_scram_secret("pw", iterations=16)
    assert user_auth_from_password("sam", format_scram_secret(secret)) == UserAuth(
        "sam", None, secret, None
    )


def test_user_auth_from_an_md5_secret_keeps_only_the_secret():
    secret = md5_secret("mo", "pw")
    assert user_auth_from_password("mo", secret) == UserAuth("mo", None, None, secret)


def test_text_that_only_looks_like_a_secret_is_a_plaintext_password_as_in_postgres():
    auth = user_auth_from_password("x", "SCRAM-SHA-256$not-a-secret")
    assert auth.password == "SCRAM-SHA-256$not-a-secret"


def test_a_user_configured_with_a_scram_secret_logs_in_with_scram():
    secret = make_scram_secret("pw", iterations=16)
    users = {"sam": user_auth_from_password("sam", format_scram_secret(secret))}
    events = scram_login(new_login(users=users), "pw", user="sam")
    assert isinstance(events[-1], Authenticated)
    assert base64.b64encode(events[-1].client_key) not in repr(events[-1]).encode()


# --- TLS ----------------------------------------------------------------------------------

TLS_REQUIRED = TlsPolicy(offered=True, required=True, cert_names_user=False)
TLS_CERT_USER = TlsPolicy(offered=True, required=True, cert_names_user=True)


def tls_login(tls: TlsPolicy) -> ClientLogin:
    return ClientLogin(
        auth_method=AuthMethod.TRUST,
        lookup_user=USERS.get,
        random_bytes=counter_bytes(),
        mock_seed=b"mock-seed",
        tls=tls,
    )


def test_an_ssl_request_starts_tls_when_offered_and_the_startup_follows_encrypted():
    login = tls_login(TLS_REQUIRED)
    assert login.feed(m.ssl_request()) == [StartTls()]
    assert login.feed(b"") == []  # nothing is read until the handshake is done
    login.tls_started(None)
    events = login.feed(startup(database="db"))
    assert isinstance(events[-1], Authenticated)
    again = tls_login(TLS_REQUIRED)
    again.feed(m.ssl_request())
    again.tls_started(None)
    with pytest.raises(ProtocolError, match="duplicate SSLRequest"):
        again.feed(m.ssl_request())


def test_plaintext_after_an_ssl_request_is_refused():
    with pytest.raises(ProtocolError, match="unencrypted data after SSL request"):
        tls_login(TLS_REQUIRED).feed(m.ssl_request() + startup(database="db"))


def test_a_plaintext_startup_is_refused_when_tls_is_required():
    with pytest.raises(PgProxyError) as caught:
        tls_login(TLS_REQUIRED).feed(startup(database="db"))
    assert caught.value.sqlstate == "28000"
    refused = tls_login(TlsPolicy(offered=False, required=False, cert_names_user=False))
    assert sent(refused.feed(m.ssl_request())) == b"N"


def test_verify_full_wants_the_certificate_to_name_the_user():
    login = tls_login(TLS_CERT_USER)
    login.feed(m.ssl_request())
    login.tls_started("mallory")
    with pytest.raises(PgProxyError, match='does not name user "alice"') as caught:
        login.feed(startup(database="db"))
    assert caught.value.sqlstate == "28000"
    ok = tls_login(TLS_CERT_USER)
    ok.feed(m.ssl_request())
    ok.tls_started("alice")
    assert isinstance(ok.feed(startup(database="db"))[-1], Authenticated)


# --- users fetched first (auth_query) ------------------------------------------------------


def test_an_unknown_user_is_looked_up_before_the_challenge_and_then_logs_in():
    known: dict[str, UserAuth] = {}
    login = ClientLogin(
        auth_method=AuthMethod.SCRAM_SHA_256,
        lookup_user=known.get,
        random_bytes=counter_bytes(),
        mock_seed=b"mock-seed",
        needs_lookup=lambda name: name not in known,
    )
    assert login.feed(startup(database="db")) == [LookupUser("alice")]
    assert login.feed(b"") == []  # waits for the answer
    events = login.user_found(ALICE)
    assert sent(events)[:1] == b"R"  # AuthenticationSASL: the challenge goes out now
    with pytest.raises(ProtocolError):
        login.user_found(ALICE)  # only one answer per lookup
