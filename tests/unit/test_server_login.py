"""ServerLogin: the proxy logging in to Postgres, against a fake server made of our builders."""

import contextlib
import itertools
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgproxy.core.server_login import (
    BackendLoginError,
    ServerCredentials,
    ServerLogin,
    ServerLoginStep,
)
from pgproxy.errors import (
    AuthError,
    BackendUnavailableError,
    PgProxyError,
    ProtocolError,
    ServerError,
)
from pgproxy.wire import messages as m
from pgproxy.wire.codes import TransactionStatus
from pgproxy.wire.scram import (
    ScramClientExchange,
    ScramServerExchange,
    check_md5_response,
    make_scram_secret,
    md5_secret,
)

SECRET = make_scram_secret("hunter2", iterations=16)

WELCOME = (
    m.authentication_ok()
    + m.parameter_status("server_version", "17.2")
    + m.parameter_status("TimeZone", "UTC")
    + m.backend_key_data(4242, 0x12345678)
    + m.ready_for_query(TransactionStatus.IDLE)
)
AFTER_AUTH = WELCOME[len(m.authentication_ok()) :]


def new_login(**credentials):
    credentials.setdefault("user", "app")
    return ServerLogin(
        database="appdb", credentials=ServerCredentials(**credentials), params={"x": "y"}
    )


def frontend_messages(data):
    out = []
    pos = 0
    while pos < len(data):
        length = struct.unpack_from("!i", data, pos + 1)[0]
        out.append((chr(data[pos]), data[pos + 5 : pos + 1 + length]))
        pos += 1 + length
    return out


def feed_split(login, data, chunk):
    steps = [login.feed(data[i : i + chunk]) for i in range(0, len(data), chunk)]
    return steps, b"".join(step.send for step in steps)


def nonces():
    counter = itertools.count()
    return lambda n: bytes([next(counter) % 256]) * n


def scram_server_round(login, secret=SECRET):
    """Play the server side of SCRAM; return the login's final step."""
    server = ScramServerExchange(secret, nonces())
    step = login.feed(m.authentication_sasl(["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]))
    [(code, body)] = frontend_messages(step.send)
    mechanism, client_first = m.parse_sasl_initial_response(body)
    assert (code, mechanism) == ("p", "SCRAM-SHA-256")
    assert client_first is not None
    assert client_first.startswith(b"n,,")
    step = login.feed(m.authentication_sasl_continue(server.handle_client_first(client_first)))
    [(code, client_final)] = frontend_messages(step.send)
    server_final = server.handle_client_final(client_final)
    return login.feed(m.authentication_sasl_final(server_final) + WELCOME), server


# --- the happy paths ----------------------------------------------------------------------


def test_start_sends_user_database_and_extra_parameters():
    login = ServerLogin(
        database="appdb",
        credentials=ServerCredentials("app"),
        params={"application_name": "pgproxy", "user": "evil"},
    )
    parsed = m.parse_startup_packet(login.start())
    assert parsed == m.Startup(
        196608, {"user": "app", "database": "appdb", "application_name": "pgproxy"}
    )


def test_a_trusted_login_finishes_at_ready_for_query_with_parameters_and_key():
    step = new_login().feed(WELCOME)
    assert step == ServerLoginStep(
        send=b"",
        done=True,
        parameters={"server_version": "17.2", "TimeZone": "UTC"},
        backend_key=(4242, 0x12345678),
        leftover=b"",
    )


@pytest.mark.parametrize("chunk", [1, 3, 8])
def test_a_login_split_into_any_chunks_gives_the_same_result(chunk):
    steps, _ = feed_split(new_login(), WELCOME, chunk)
    assert [step.done for step in steps].count(True) == 1
    assert steps[-1].done
    assert steps[-1].parameters == {"server_version": "17.2", "TimeZone": "UTC"}
    assert steps[-1].backend_key == (4242, 0x12345678)


def test_parameters_are_reported_as_they_arrive():
    login = new_login()
    step = login.feed(m.authentication_ok() + m.parameter_status("a", "1"))
    assert (step.done, step.parameters) == (False, {"a": "1"})
    step = login.feed(m.ready_for_query(TransactionStatus.IDLE))
    assert (step.done, step.parameters) == (True, {"a": "1"})


def test_bytes_after_ready_for_query_are_leftover():
    step = new_login().feed(WELCOME + m.notice_response("NOTICE", "00000", "hi"))
    assert step.done
    assert step.leftover == m.notice_response("NOTICE", "00000", "hi")


def test_cleartext_password_is_sent_when_asked():
    login = new_login(password="hunter2")
    step = login.feed(m.authentication_cleartext())
    assert step.send == m.password_message(b"hunter2")
    assert login.feed(WELCOME).done


@pytest.mark.parametrize(
    "credentials",
    [{"password": "hunter2"}, {"md5": md5_secret("app", "hunter2")}],
)
def test_md5_is_answered_from_the_password_or_the_md5_secret(credentials):
    login = new_login(**credentials)
    step = login.feed(m.authentication_md5(b"salt"))
    [(code, body)] = frontend_messages(step.send)
    assert code == "p"
    assert check_md5_response(md5_secret("app", "hunter2"), b"salt", body[:-1])
    assert login.feed(WELCOME).done


def test_scram_with_a_password_completes_and_verifies_the_server():
    step, server = scram_server_round(new_login(password="hunter2"))
    assert step.done
    assert server.client_key is not None


@pytest.mark.parametrize("chunk", [1, 5])
def test_scram_messages_split_into_chunks_still_log_in(chunk):
    login = new_login(password="hunter2")
    server = ScramServerExchange(SECRET, nonces())
    _, send = feed_split(login, m.authentication_sasl(["SCRAM-SHA-256"]), chunk)
    client_first = m.parse_sasl_initial_response(frontend_messages(send)[0][1])[1]
    assert client_first is not None
    data = m.authentication_sasl_continue(server.handle_client_first(client_first))
    _, send = feed_split(login, data, chunk)
    final = server.handle_client_final(frontend_messages(send)[0][1])
    steps, _ = feed_split(login, m.authentication_sasl_final(final) + WELCOME, chunk)
    assert steps[-1].done


def test_scram_pass_through_logs_in_with_a_client_key_from_the_client_login():
    front = ScramServerExchange(SECRET, nonces())
    client = ScramClientExchange("hunter2")
    final = front.handle_client_final(
        client.handle_server_first(front.handle_client_first(client.client_first()))
    )
    client.handle_server_final(final)
    step, _ = scram_server_round(new_login(scram=SECRET, client_key=front.client_key))
    assert step.done


def test_scram_pass_through_against_a_different_server_secret_fails_clearly():
    front = ScramServerExchange(SECRET, nonces())
    client = ScramClientExchange("hunter2")
    front.handle_client_final(
        client.handle_server_first(front.handle_client_first(client.client_first()))
    )
    other = make_scram_secret("hunter2", iterations=16)
    with pytest.raises(AuthError, match="pass-through"):
        scram_server_round(new_login(scram=SECRET, client_key=front.client_key), other)


def test_scram_pass_through_with_a_key_of_another_secret_is_a_login_error():
    login = new_login(scram=SECRET, client_key=b"\x00" * 32)
    with pytest.raises(BackendLoginError, match="pass-through"):
        login.feed(m.authentication_sasl(["SCRAM-SHA-256"]))


def test_scram_refuses_authentication_ok_before_the_server_proved_its_signature():
    login = new_login(password="hunter2")
    login.feed(m.authentication_sasl(["SCRAM-SHA-256"]))
    with pytest.raises(BackendLoginError, match="before completing SCRAM"):
        login.feed(m.authentication_ok())


def test_scram_refuses_a_server_that_does_not_know_the_secret():
    login = new_login(password="hunter2")
    impostor = make_scram_secret("hunter2", iterations=16)
    impostor = type(impostor)(16, impostor.salt, impostor.stored_key, b"\x01" * 32)
    with pytest.raises(AuthError, match="server signature"):
        scram_server_round(login, impostor)


# --- errors and refusals ------------------------------------------------------------------


@pytest.mark.parametrize("sqlstate", ["28P01", "3D000", "53300"])
def test_an_error_response_from_the_server_is_raised_with_its_fields(sqlstate):
    error = m.error_response("FATAL", sqlstate, "no", detail="because")
    with pytest.raises(ServerError) as info:
        new_login(password="x").feed(m.authentication_cleartext() + error)
    assert info.value.sqlstate == sqlstate
    assert info.value.fields["D"] == "because"


@pytest.mark.parametrize(
    ("code", "name"), [(7, "GSSAPI"), (9, "SSPI"), (2, "Kerberos"), (42, "42")]
)
def test_unsupported_authentication_methods_are_login_errors(code, name):
    data = b"R" + struct.pack("!ii", 8, code)
    with pytest.raises(BackendLoginError, match=name) as info:
        new_login(password="x").feed(data)
    assert isinstance(info.value, BackendUnavailableError)


@pytest.mark.parametrize(
    ("request_", "method"),
    [
        (m.authentication_cleartext(), "a cleartext"),
        (m.authentication_md5(b"salt"), "an md5"),
        (m.authentication_sasl(["SCRAM-SHA-256"]), "a SCRAM-SHA-256"),
    ],
)
def test_missing_credentials_are_reported_with_the_method_and_user(request_, method):
    with pytest.raises(BackendLoginError) as info:
        new_login().feed(request_)
    assert str(info.value) == (
        f"server asked for {method} password but no password is configured for user 'app'"
    )


def test_a_sasl_request_without_scram_sha_256_is_a_login_error():
    with pytest.raises(BackendLoginError, match="SCRAM-SHA-256-PLUS"):
        new_login(password="x").feed(m.authentication_sasl(["SCRAM-SHA-256-PLUS"]))


def test_notices_and_negotiate_protocol_version_are_tolerated():
    data = (
        m.negotiate_protocol_version(0, [])
        + m.notice_response("WARNING", "01000", "careful")
        + WELCOME
    )
    assert new_login().feed(data).done


@pytest.mark.parametrize(
    "data",
    [
        m.ready_for_query(TransactionStatus.IDLE),
        m.parameter_status("a", "b"),
        m.authentication_ok() + b"D\x00\x00\x00\x06\x00\x00",
        m.authentication_ok() + m.authentication_ok(),
        m.authentication_ok() + b"Z\x00\x00\x00\x04",
        m.authentication_sasl_continue(b"r=x"),
        m.authentication_sasl_final(b"v=x"),
        b"R" + struct.pack("!ii", 11, 5) + b"sal",  # md5 salt of 3 bytes
        b"R\x00\x00\x00\x03",
        b"R\x00\x00\x00\x06\x00\x00",
    ],
)
def test_messages_out_of_place_or_malformed_are_protocol_violations(data):
    with pytest.raises(ProtocolError):
        new_login(password="x", md5=md5_secret("app", "x")).feed(data)


def test_a_second_sasl_request_is_a_protocol_violation():
    login = new_login(password="x")
    login.feed(m.authentication_sasl(["SCRAM-SHA-256"]))
    with pytest.raises(ProtocolError, match="second"):
        login.feed(m.authentication_sasl(["SCRAM-SHA-256"]))


def test_feeding_after_the_login_finished_is_a_protocol_violation():
    login = new_login()
    login.feed(WELCOME)
    with pytest.raises(ProtocolError, match="already finished"):
        login.feed(b"")


@given(st.lists(st.binary(max_size=30), max_size=5))
def test_garbage_from_a_server_raises_only_pgproxy_errors(chunks):
    login = new_login(password="x")
    try:
        for chunk in chunks:
            login.feed(chunk)
    except PgProxyError:
        pass


@given(st.binary(max_size=30))
def test_garbage_after_authentication_raises_only_pgproxy_errors(data):
    login = new_login()
    login.feed(m.authentication_ok())
    with contextlib.suppress(PgProxyError):
        login.feed(data)


def test_after_auth_only_the_welcome_messages_remain():
    login = new_login()
    login.feed(m.authentication_ok())
    assert login.feed(AFTER_AUTH).done
