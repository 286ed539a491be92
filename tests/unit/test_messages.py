"""Message builders and parsers: exact bytes out, strict parsing of client input."""

import contextlib
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgproxy.errors import (
    AuthError,
    FeatureNotSupportedError,
    PgProxyError,
    ProtocolError,
    ServerError,
    Severity,
)
from pgproxy.wire import messages as m
from pgproxy.wire.codes import TransactionStatus


def packet(code: int, payload: bytes = b"") -> bytes:
    return struct.pack("!ii", len(payload) + 8, code) + payload


def startup(params: bytes, version: int = 196608) -> bytes:
    return struct.pack("!iI", len(params) + 8, version) + params


# --- backend builders ---------------------------------------------------------------------


def test_error_response_carries_severity_sqlstate_message_detail_and_hint():
    data = m.error_response("FATAL", "53300", "too many", detail="d", hint="h")
    body = b"SFATAL\x00VFATAL\x00C53300\x00Mtoo many\x00Dd\x00Hh\x00\x00"
    assert data == b"E" + struct.pack("!i", len(body) + 4) + body


def test_notice_response_has_the_notice_type_byte_and_the_same_fields():
    data = m.notice_response("WARNING", "01000", "careful")
    assert data[:1] == b"N"
    assert m.parse_fields(data[5:]) == {
        "S": "WARNING",
        "V": "WARNING",
        "C": "01000",
        "M": "careful",
    }


def test_error_fields_with_a_nul_byte_are_replaced_not_cut():
    data = m.error_response("ERROR", "XX000", "a\x00b")
    assert m.parse_fields(data[5:])["M"] == "a\ufffdb"


def test_error_from_exception_uses_the_error_sqlstate_and_severity():
    exc = AuthError('password authentication failed for user "bob"', hint="check it")
    fields = m.parse_fields(m.error_from_exception(exc)[5:])
    assert fields == {
        "S": "FATAL",
        "V": "FATAL",
        "C": "28P01",
        "M": 'password authentication failed for user "bob"',
        "H": "check it",
    }


def test_error_from_exception_keeps_every_field_of_a_server_error():
    fields = {"S": "FATAL", "V": "FATAL", "C": "3D000", "M": "no db", "R": "InitPostgres"}
    assert m.error_from_exception(ServerError(fields)) == m.raw_error_response(fields)
    assert m.parse_fields(m.raw_error_response(fields)[5:]) == fields


def test_raw_error_response_refuses_a_field_code_that_is_not_one_character():
    with pytest.raises(ValueError, match="field code"):
        m.raw_error_response({"SS": "x"})


def test_error_with_error_severity_is_sent_as_error():
    exc = PgProxyError("x", severity=Severity.ERROR, sqlstate="57014")
    assert m.parse_fields(m.error_from_exception(exc)[5:])["S"] == "ERROR"


def test_ready_for_query_carries_the_status_byte():
    assert m.ready_for_query(TransactionStatus.IDLE) == b"Z\x00\x00\x00\x05I"


def test_parameter_status_and_backend_key_data_round_trip():
    ps = m.parameter_status("TimeZone", "UTC")
    assert ps == b"S\x00\x00\x00\x11TimeZone\x00UTC\x00"
    assert m.parse_parameter_status(ps[5:]) == ("TimeZone", "UTC")
    key = m.backend_key_data(1234, -1)
    assert key == b"K\x00\x00\x00\x0c\x00\x00\x04\xd2\xff\xff\xff\xff"
    assert m.parse_backend_key_data(key[5:]) == (1234, 0xFFFFFFFF)


def test_authentication_messages_have_their_codes_and_payloads():
    assert m.authentication_ok() == b"R\x00\x00\x00\x08\x00\x00\x00\x00"
    assert m.authentication_cleartext() == b"R\x00\x00\x00\x08\x00\x00\x00\x03"
    assert m.authentication_md5(b"salt") == b"R\x00\x00\x00\x0c\x00\x00\x00\x05salt"
    assert m.authentication_sasl(["SCRAM-SHA-256"]) == (
        b"R\x00\x00\x00\x17\x00\x00\x00\x0aSCRAM-SHA-256\x00\x00"
    )
    assert m.authentication_sasl_continue(b"r=x") == b"R\x00\x00\x00\x0b\x00\x00\x00\x0br=x"
    assert m.authentication_sasl_final(b"v=x") == b"R\x00\x00\x00\x0b\x00\x00\x00\x0cv=x"


def test_authentication_md5_needs_a_four_byte_salt():
    with pytest.raises(ValueError, match="4 bytes"):
        m.authentication_md5(b"abc")


def test_authentication_parsers_read_the_code_and_mechanisms():
    code, payload = m.parse_authentication(m.authentication_sasl(["A", "B"])[5:])
    assert code == 10
    assert m.parse_sasl_mechanisms(payload) == ["A", "B"]
    with pytest.raises(ProtocolError):
        m.parse_authentication(b"\x00\x00")
    with pytest.raises(ProtocolError, match="terminator"):
        m.parse_sasl_mechanisms(b"A\x00")


def test_negotiate_protocol_version_round_trips():
    data = m.negotiate_protocol_version(0, ["_pq_.a", "_pq_.b"])
    assert data[:1] == b"v"
    assert m.parse_negotiate_protocol_version(data[5:]) == (0, ["_pq_.a", "_pq_.b"])
    with pytest.raises(ProtocolError):
        m.parse_negotiate_protocol_version(b"\x00")
    with pytest.raises(ProtocolError, match="option count"):
        m.parse_negotiate_protocol_version(struct.pack("!ii", 0, 2) + b"x\x00")


# --- frontend builders --------------------------------------------------------------------


def test_startup_message_is_protocol_3_0_with_terminated_parameters():
    data = m.startup_message({"user": "u", "database": "d"})
    assert data == struct.pack("!ii", 27, 196608) + b"user\x00u\x00database\x00d\x00\x00"
    parsed = m.parse_startup_packet(data)
    assert parsed == m.Startup(196608, {"user": "u", "database": "d"})


def test_startup_message_refuses_a_nul_inside_a_value():
    with pytest.raises(ValueError, match="NUL"):
        m.startup_message({"user": "a\x00b"})


def test_cancel_ssl_and_gssenc_requests_have_their_magic_codes():
    assert m.cancel_request(7, 9) == packet(80877102, struct.pack("!II", 7, 9))
    assert m.ssl_request() == packet(80877103)
    assert m.gssenc_request() == packet(80877104)


def test_simple_frontend_messages_have_exact_bytes():
    assert m.query("SELECT 1") == b"Q\x00\x00\x00\x0dSELECT 1\x00"
    assert m.terminate() == b"X\x00\x00\x00\x04"
    assert m.sync() == b"S\x00\x00\x00\x04"
    assert m.copy_fail("stop") == b"f\x00\x00\x00\x09stop\x00"
    assert m.password_message(b"secret") == b"p\x00\x00\x00\x0bsecret\x00"
    assert m.sasl_response(b"abc") == b"p\x00\x00\x00\x07abc"


def test_password_message_refuses_a_nul_byte():
    with pytest.raises(ValueError, match="NUL"):
        m.password_message(b"a\x00")


def test_sasl_initial_response_round_trips_with_and_without_data():
    data = m.sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=abc")
    assert m.parse_sasl_initial_response(data[5:]) == ("SCRAM-SHA-256", b"n,,n=,r=abc")
    none = m.sasl_initial_response("SCRAM-SHA-256", None)
    assert m.parse_sasl_initial_response(none[5:]) == ("SCRAM-SHA-256", None)


@pytest.mark.parametrize(
    "body",
    [b"SCRAM-SHA-256", b"SCRAM-SHA-256\x00\x00\x00", b"SCRAM\x00\x00\x00\x00\x05abc"],
)
def test_malformed_sasl_initial_responses_are_protocol_violations(body):
    with pytest.raises(ProtocolError):
        m.parse_sasl_initial_response(body)


def test_password_message_parser_wants_exactly_one_terminated_string():
    assert m.parse_password_message(b"md5abc\x00") == b"md5abc"
    for body in (b"", b"abc", b"a\x00b\x00"):
        with pytest.raises(ProtocolError):
            m.parse_password_message(body)


# --- parsers ------------------------------------------------------------------------------


def test_parse_fields_tolerates_a_truncated_body_and_invalid_utf8():
    assert m.parse_fields(b"SERROR\x00Mbad \xff byte\x00Dcut") == {
        "S": "ERROR",
        "M": "bad \ufffd byte",
        "D": "cut",
    }
    assert m.parse_fields(b"") == {}


def test_parse_cstrings_splits_terminated_strings():
    assert m.parse_cstrings(b"a\x00bc\x00") == ["a", "bc"]
    with pytest.raises(ProtocolError, match="terminator"):
        m.parse_cstrings(b"a\x00b")
    with pytest.raises(ProtocolError, match="UTF-8"):
        m.parse_cstrings(b"\xff\x00")


def test_parse_parameter_status_refuses_trailing_bytes():
    with pytest.raises(ProtocolError, match="trailing"):
        m.parse_parameter_status(b"a\x00b\x00c")


def test_parse_backend_key_data_wants_eight_bytes():
    with pytest.raises(ProtocolError, match="expected 8"):
        m.parse_backend_key_data(b"\x00" * 7)


# --- startup packets ----------------------------------------------------------------------


def test_startup_database_defaults_to_the_user():
    parsed = m.parse_startup_packet(startup(b"user\x00alice\x00\x00"))
    assert isinstance(parsed, m.Startup)
    assert parsed.user == "alice"
    assert parsed.database == "alice"
    assert parsed.minor_version == 0


def test_startup_keeps_other_parameters():
    parsed = m.parse_startup_packet(
        startup(b"user\x00a\x00database\x00db\x00application_name\x00psql\x00\x00")
    )
    assert parsed == m.Startup(196608, {"user": "a", "database": "db", "application_name": "psql"})


def test_startup_with_a_newer_minor_version_is_accepted():
    parsed = m.parse_startup_packet(startup(b"user\x00a\x00\x00", version=(3 << 16) | 2))
    assert isinstance(parsed, m.Startup)
    assert parsed.minor_version == 2


def test_ssl_gssenc_and_cancel_requests_are_recognized():
    assert m.parse_startup_packet(packet(80877103)) == m.SslRequest()
    assert m.parse_startup_packet(packet(80877104)) == m.GssEncRequest()
    cancel = packet(80877102, struct.pack("!II", 42, 0xDEADBEEF))
    assert m.parse_startup_packet(cancel) == m.CancelRequest(42, 0xDEADBEEF)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"\x00\x00\x00", "length"),
        (packet(80877103, b"x"), "SSLRequest"),
        (packet(80877102, b"\x00" * 4), "CancelRequest"),
        (struct.pack("!iI", 99, 196608) + b"user\x00a\x00\x00", "header says 99"),
        (startup(b""), "terminator"),
        (startup(b"user\x00a\x00"), "missing terminator"),
        (startup(b"user\x00a"), "terminator"),
        (startup(b"user\x00a\x00database\x00"), "no value"),
        (startup(b"user\x00a\x00\x00x\x00y\x00\x00"), "after the terminator"),
        (startup(b"user\x00a\x00user\x00b\x00\x00"), "duplicate"),
        (startup(b"user\x00\xff\x00\x00"), "UTF-8"),
    ],
)
def test_malformed_startup_packets_are_protocol_violations(data, match):
    with pytest.raises(ProtocolError, match=match) as info:
        m.parse_startup_packet(data)
    assert info.value.sqlstate == "08P01"


def test_a_startup_without_a_user_is_refused_like_postgres_does():
    with pytest.raises(ProtocolError, match="no PostgreSQL user name") as info:
        m.parse_startup_packet(startup(b"database\x00d\x00\x00"))
    assert info.value.sqlstate == "28000"


def test_protocol_2_is_not_supported():
    with pytest.raises(FeatureNotSupportedError, match=r"unsupported frontend protocol 2\.0"):
        m.parse_startup_packet(startup(b"user\x00a\x00\x00", version=2 << 16))


@pytest.mark.parametrize("value", ["true", "database", "1", "on"])
def test_replication_connections_are_not_supported(value):
    data = startup(b"user\x00a\x00replication\x00" + value.encode() + b"\x00\x00")
    with pytest.raises(FeatureNotSupportedError, match="replication connections") as info:
        m.parse_startup_packet(data)
    assert info.value.sqlstate == "0A000"


@pytest.mark.parametrize("value", ["false", "0", "OFF", "no"])
def test_replication_set_to_false_is_a_normal_connection(value):
    data = startup(b"user\x00a\x00replication\x00" + value.encode() + b"\x00\x00")
    assert isinstance(m.parse_startup_packet(data), m.Startup)


@given(st.binary(max_size=80))
def test_garbage_startup_packets_raise_only_protocol_errors(payload):
    for data in (payload, struct.pack("!i", len(payload) + 4) + payload):
        with contextlib.suppress(ProtocolError, FeatureNotSupportedError):
            m.parse_startup_packet(data)


@given(
    st.dictionaries(
        st.text(min_size=1).filter(lambda s: "\x00" not in s),
        st.text().filter(lambda s: "\x00" not in s),
    )
)
def test_any_startup_message_built_here_parses_back(params):
    # user, database, replication and _pq_. options have meanings of their own.
    params = {
        k: v
        for k, v in params.items()
        if k not in ("user", "database", "replication") and not k.startswith("_pq_.")
    }
    params["user"] = "u"
    parsed = m.parse_startup_packet(m.startup_message(params))
    assert isinstance(parsed, m.Startup)
    assert parsed.params == {"database": "u", **params}
