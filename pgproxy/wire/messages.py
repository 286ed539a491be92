"""Builders and parsers for the few protocol messages the proxy writes or reads itself.

Rules of this file:

* builders return complete messages as `bytes` (type byte, int32 length, body); parsers take a
  message *body* (what `MessageScanner` returns), except `parse_startup_packet`, which takes
  the whole length-prefixed packet because startup packets have no type byte;
* parsers of client input are strict and raise `ProtocolError` (08P01) on anything malformed;
  parsers of what a server sends in an error path (`parse_fields`) are lenient instead;
* pure: no I/O, no logging. Everything forwarded byte for byte never comes through here.

Layouts: PostgreSQL docs, "Frontend/Backend Protocol" → "Message Formats" and
"Error and Notice Message Fields".
"""

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pgproxy.errors import (
    FeatureNotSupportedError,
    PgProxyError,
    ProtocolError,
    ServerError,
)
from pgproxy.wire.codes import (
    CANCEL_REQUEST_CODE,
    GSSENC_REQUEST_CODE,
    PROTOCOL_VERSION_3,
    SSL_REQUEST_CODE,
    AuthCode,
    BackendCode,
    FrontendCode,
    SqlState,
)

_INT32 = struct.Struct("!i")
_UINT32 = struct.Struct("!I")
_TWO_UINT32 = struct.Struct("!II")

# Values of `replication` that mean a normal connection (Postgres parses it as a boolean).
_REPLICATION_OFF = frozenset({"false", "0", "off", "no"})


def _message(code: int, body: bytes) -> bytes:
    return bytes((code,)) + _INT32.pack(len(body) + 4) + body


def _cstring(value: str) -> bytes:
    """A NUL-terminated UTF-8 string; a NUL inside would silently cut it, so refuse it."""
    if "\x00" in value:
        raise ValueError(f"string contains a NUL byte: {value!r}")
    return value.encode() + b"\x00"


def _uint32(value: int) -> bytes:
    # Keys and secrets are opaque 32-bit values; accept them signed or unsigned.
    return _UINT32.pack(value & 0xFFFFFFFF)


# --- backend messages (the proxy speaking to a client) ------------------------------------


def _fields_message(
    code: int,
    severity: str,
    sqlstate: str,
    message: str,
    detail: str | None,
    hint: str | None,
) -> bytes:
    fields = {"S": severity, "V": severity, "C": sqlstate, "M": message}
    if detail is not None:
        fields["D"] = detail
    if hint is not None:
        fields["H"] = hint
    return _fields(code, fields)


def _fields(code: int, fields: Mapping[str, str]) -> bytes:
    parts = []
    for key, value in fields.items():
        if len(key) != 1 or key == "\x00":
            raise ValueError(f"invalid error field code {key!r}")
        # The text may quote client input; a NUL would end the field early, so replace it.
        parts.append(key.encode() + value.replace("\x00", "\ufffd").encode() + b"\x00")
    parts.append(b"\x00")
    return _message(code, b"".join(parts))


def error_response(
    severity: str,
    sqlstate: str,
    message: str,
    *,
    detail: str | None = None,
    hint: str | None = None,
) -> bytes:
    """ErrorResponse ('E') with fields S, V, C, M and optionally D, H."""
    return _fields_message(BackendCode.ERROR_RESPONSE, severity, sqlstate, message, detail, hint)


def notice_response(
    severity: str,
    sqlstate: str,
    message: str,
    *,
    detail: str | None = None,
    hint: str | None = None,
) -> bytes:
    """NoticeResponse ('N'), same fields as an ErrorResponse."""
    return _fields_message(BackendCode.NOTICE_RESPONSE, severity, sqlstate, message, detail, hint)


def raw_error_response(fields: Mapping[str, str]) -> bytes:
    """ErrorResponse re-emitting a server's fields as they came (see `parse_fields`)."""
    return _fields(BackendCode.ERROR_RESPONSE, fields)


def error_from_exception(exc: PgProxyError) -> bytes:
    """The ErrorResponse for an error; a `ServerError` keeps all of the server's fields."""
    if isinstance(exc, ServerError):
        return raw_error_response(exc.fields)
    return error_response(
        str(exc.severity), exc.sqlstate, exc.message, detail=exc.detail, hint=exc.hint
    )


def ready_for_query(status: int) -> bytes:
    """ReadyForQuery ('Z') with a `TransactionStatus` byte."""
    return _message(BackendCode.READY_FOR_QUERY, bytes((status,)))


def parameter_status(name: str, value: str) -> bytes:
    return _message(BackendCode.PARAMETER_STATUS, _cstring(name) + _cstring(value))


def backend_key_data(pid: int, secret: int) -> bytes:
    return _message(BackendCode.BACKEND_KEY_DATA, _uint32(pid) + _uint32(secret))


def _authentication(code: AuthCode, payload: bytes = b"") -> bytes:
    return _message(BackendCode.AUTHENTICATION, _INT32.pack(code) + payload)


def authentication_ok() -> bytes:
    return _authentication(AuthCode.OK)


def authentication_cleartext() -> bytes:
    return _authentication(AuthCode.CLEARTEXT_PASSWORD)


def authentication_md5(salt: bytes) -> bytes:
    if len(salt) != 4:
        raise ValueError("an md5 salt is 4 bytes")
    return _authentication(AuthCode.MD5_PASSWORD, salt)


def authentication_sasl(mechanisms: list[str]) -> bytes:
    """AuthenticationSASL: the mechanisms offered, as a NUL-terminated list of strings."""
    return _authentication(AuthCode.SASL, b"".join(_cstring(m) for m in mechanisms) + b"\x00")


def authentication_sasl_continue(data: bytes) -> bytes:
    return _authentication(AuthCode.SASL_CONTINUE, data)


def authentication_sasl_final(data: bytes) -> bytes:
    return _authentication(AuthCode.SASL_FINAL, data)


def negotiate_protocol_version(newest_minor: int, unrecognized: list[str]) -> bytes:
    """NegotiateProtocolVersion ('v'): newest minor version supported, unknown `_pq_.` options."""
    body = _INT32.pack(newest_minor) + _INT32.pack(len(unrecognized))
    return _message(
        BackendCode.NEGOTIATE_PROTOCOL_VERSION,
        body + b"".join(_cstring(option) for option in unrecognized),
    )


# --- frontend messages (the proxy speaking to a server) -----------------------------------


def _packet(payload: bytes) -> bytes:
    """A startup-phase packet: no type byte, only the length."""
    return _INT32.pack(len(payload) + 4) + payload


def startup_message(params: Mapping[str, str]) -> bytes:
    """StartupMessage for protocol 3.0."""
    body = b"".join(_cstring(key) + _cstring(value) for key, value in params.items())
    return _packet(_INT32.pack(PROTOCOL_VERSION_3) + body + b"\x00")


def cancel_request(pid: int, secret: int) -> bytes:
    return _packet(_INT32.pack(CANCEL_REQUEST_CODE) + _uint32(pid) + _uint32(secret))


def ssl_request() -> bytes:
    return _packet(_INT32.pack(SSL_REQUEST_CODE))


def gssenc_request() -> bytes:
    return _packet(_INT32.pack(GSSENC_REQUEST_CODE))


def query(sql: str) -> bytes:
    return _message(FrontendCode.QUERY, _cstring(sql))


def unnamed_query(sql: str, params: Sequence[str]) -> bytes:
    """Parse, Bind, Execute and Sync of the unnamed statement: text parameters as $1, $2...,
    text results, all rows."""
    bind = bytearray(b"\x00\x00\x00\x00")  # unnamed portal and statement, all params text
    bind += len(params).to_bytes(2)
    for value in params:
        encoded = value.encode()
        bind += _INT32.pack(len(encoded)) + encoded
    bind += b"\x00\x00"  # all results text
    return b"".join(
        (
            _message(FrontendCode.PARSE, b"\x00" + _cstring(sql) + b"\x00\x00"),
            _message(FrontendCode.BIND, bytes(bind)),
            _message(FrontendCode.EXECUTE, b"\x00\x00\x00\x00\x00"),
            sync(),
        )
    )


def terminate() -> bytes:
    return _message(FrontendCode.TERMINATE, b"")


def sync() -> bytes:
    return _message(FrontendCode.SYNC, b"")


def copy_fail(message: str) -> bytes:
    return _message(FrontendCode.COPY_FAIL, _cstring(message))


def password_message(password: bytes) -> bytes:
    """PasswordMessage: cleartext or ``md5...`` response, NUL-terminated here."""
    if b"\x00" in password:
        raise ValueError("a password cannot contain a NUL byte")
    return _message(FrontendCode.PASSWORD, password + b"\x00")


def sasl_initial_response(mechanism: str, data: bytes | None) -> bytes:
    """SASLInitialResponse: mechanism, then int32 length of the data (-1 for none)."""
    if data is None:
        return _message(FrontendCode.PASSWORD, _cstring(mechanism) + _INT32.pack(-1))
    return _message(FrontendCode.PASSWORD, _cstring(mechanism) + _INT32.pack(len(data)) + data)


def sasl_response(data: bytes) -> bytes:
    return _message(FrontendCode.PASSWORD, data)


# --- parsers ------------------------------------------------------------------------------


def parse_fields(body: bytes) -> dict[str, str]:
    """Fields of an ErrorResponse/NoticeResponse body, keyed by their one-letter code.

    Lenient on purpose (the body may have been truncated by the scanner's ``keep``): a last
    field without its NUL is kept as is, invalid UTF-8 is replaced.
    """
    fields: dict[str, str] = {}
    pos = 0
    n = len(body)
    while pos < n and body[pos] != 0:
        key = chr(body[pos])
        nul = body.find(b"\x00", pos + 1)
        if nul < 0:
            nul = n
        fields[key] = body[pos + 1 : nul].decode("utf-8", "replace")
        pos = nul + 1
    return fields


def split_cstring(body: bytes, pos: int = 0) -> tuple[str, int]:
    """Read one NUL-terminated UTF-8 string at ``pos``; return it and the position after it."""
    nul = body.find(b"\x00", pos)
    if nul < 0:
        raise ProtocolError("invalid message format: missing string terminator")
    try:
        return body[pos:nul].decode(), nul + 1
    except UnicodeDecodeError:
        raise ProtocolError("invalid message format: string is not valid UTF-8") from None


def parse_cstrings(body: bytes) -> list[str]:
    """A body made only of NUL-terminated strings (no list terminator)."""
    out = []
    pos = 0
    while pos < len(body):
        value, pos = split_cstring(body, pos)
        out.append(value)
    return out


def parse_parameter_status(body: bytes) -> tuple[str, str]:
    name, pos = split_cstring(body)
    value, pos = split_cstring(body, pos)
    if pos != len(body):
        raise ProtocolError("invalid ParameterStatus message: trailing bytes")
    return name, value


def parse_backend_key_data(body: bytes) -> tuple[int, int]:
    """BackendKeyData as ``(pid, secret)``, both read as unsigned 32-bit integers."""
    if len(body) != 8:
        raise ProtocolError(f"invalid BackendKeyData message: {len(body)} bytes, expected 8")
    pid, secret = _TWO_UINT32.unpack(body)
    return pid, secret


def parse_authentication(body: bytes) -> tuple[int, bytes]:
    """An Authentication ('R') body as ``(AuthCode value, payload)``."""
    if len(body) < 4:
        raise ProtocolError("invalid Authentication message: too short")
    return _INT32.unpack_from(body)[0], body[4:]


def parse_sasl_mechanisms(payload: bytes) -> list[str]:
    """The mechanism list of AuthenticationSASL (after the auth code)."""
    mechanisms: list[str] = []
    pos = 0
    while True:
        if pos >= len(payload):
            raise ProtocolError("invalid AuthenticationSASL message: missing list terminator")
        if payload[pos] == 0:
            return mechanisms
        name, pos = split_cstring(payload, pos)
        mechanisms.append(name)


def parse_sasl_initial_response(body: bytes) -> tuple[str, bytes | None]:
    """SASLInitialResponse as ``(mechanism, data)``; data is None when the length is -1."""
    mechanism, pos = split_cstring(body)
    if len(body) - pos < 4:
        raise ProtocolError("invalid SASLInitialResponse message: missing data length")
    length = _INT32.unpack_from(body, pos)[0]
    pos += 4
    if length == -1 and pos == len(body):
        return mechanism, None
    if length != len(body) - pos:
        raise ProtocolError("invalid SASLInitialResponse message: wrong data length")
    return mechanism, body[pos:]


def parse_password_message(body: bytes) -> bytes:
    """A PasswordMessage's password, without its terminator (kept as bytes, not decoded)."""
    if not body or body.find(b"\x00") != len(body) - 1:
        raise ProtocolError("invalid password packet: expected one NUL-terminated string")
    return body[:-1]


def parse_negotiate_protocol_version(body: bytes) -> tuple[int, list[str]]:
    """NegotiateProtocolVersion as ``(newest minor supported, unrecognized options)``."""
    if len(body) < 8:
        raise ProtocolError("invalid NegotiateProtocolVersion message: too short")
    newest_minor, count = struct.unpack_from("!ii", body)
    options = parse_cstrings(body[8:])
    if len(options) != count:
        raise ProtocolError("invalid NegotiateProtocolVersion message: wrong option count")
    return newest_minor, options


# --- startup packets ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Startup:
    """A StartupMessage: protocol version and parameters (``database`` defaults to ``user``)."""

    protocol: int
    params: dict[str, str]

    @property
    def user(self) -> str:
        return self.params["user"]

    @property
    def database(self) -> str:
        return self.params["database"]

    @property
    def minor_version(self) -> int:
        return self.protocol & 0xFFFF


@dataclass(frozen=True, slots=True)
class CancelRequest:
    pid: int
    secret: int


@dataclass(frozen=True, slots=True)
class SslRequest:
    pass


@dataclass(frozen=True, slots=True)
class GssEncRequest:
    pass


StartupPacket = Startup | CancelRequest | SslRequest | GssEncRequest


def parse_startup_packet(packet: bytes) -> StartupPacket:
    """Parse one whole startup-phase packet, including its int32 length.

    Raises `ProtocolError` for malformed packets and `FeatureNotSupportedError` for requests
    the proxy does not serve (protocol other than 3.x, replication).
    """
    if len(packet) < 8:
        raise ProtocolError("invalid startup packet length")
    length, code = struct.unpack_from("!iI", packet)
    if length != len(packet):
        raise ProtocolError(
            f"invalid startup packet length: header says {length}, packet has {len(packet)}"
        )
    if code in (SSL_REQUEST_CODE, GSSENC_REQUEST_CODE):
        if length != 8:
            raise ProtocolError("invalid length of SSLRequest/GSSENCRequest packet")
        return SslRequest() if code == SSL_REQUEST_CODE else GssEncRequest()
    if code == CANCEL_REQUEST_CODE:
        # Protocol 3.2 allows longer secrets; the proxy only ever hands out 4-byte keys.
        if length != 16:
            raise ProtocolError("invalid length of CancelRequest packet")
        pid, secret = _TWO_UINT32.unpack_from(packet, 8)
        return CancelRequest(pid, secret)
    major, minor = code >> 16, code & 0xFFFF
    if major != 3:
        raise FeatureNotSupportedError(
            f"unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.0"
        )
    params = _parse_startup_params(packet)
    if not params.get("user"):
        raise ProtocolError(
            "no PostgreSQL user name specified in startup packet",
            sqlstate=SqlState.INVALID_AUTHORIZATION_SPECIFICATION,
        )
    params.setdefault("database", params["user"])
    replication = params.get("replication")
    if replication is not None and replication.lower() not in _REPLICATION_OFF:
        raise FeatureNotSupportedError("replication connections are not supported by pgproxy")
    return Startup(code, params)


def _parse_startup_params(packet: bytes) -> dict[str, str]:
    # "The parameter list is terminated by a zero byte" (StartupMessage): a packet whose last
    # byte is not that terminator is invalid, same check as Postgres' ProcessStartupPacket.
    if len(packet) == 8 or packet[-1] != 0:
        raise ProtocolError("invalid startup packet layout: expected terminator as last byte")
    params: dict[str, str] = {}
    pos = 8
    end = len(packet) - 1
    while pos < end:
        key, pos = split_cstring(packet, pos)
        if not key:
            raise ProtocolError("invalid startup packet layout: data after the terminator")
        if pos >= end:
            raise ProtocolError(f"invalid startup packet layout: no value for parameter {key!r}")
        value, pos = split_cstring(packet, pos)
        if key in params:
            raise ProtocolError(f"invalid startup packet: duplicate parameter {key!r}")
        params[key] = value
    if pos != end:
        raise ProtocolError("invalid startup packet layout: missing terminator")
    return params
