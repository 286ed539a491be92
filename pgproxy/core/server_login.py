"""`ServerLogin`: the proxy logging in to Postgres, as a pure state machine.

Rules of this file:

* `start` gives the StartupMessage; every chunk the server sends goes to `feed`, which says
  what to write back and, at the first ReadyForQuery, that the connection is ready, with the
  ParameterStatus values and BackendKeyData seen on the way;
* an ErrorResponse from the server raises `ServerError` with the server's own fields, so its
  SQLSTATE (28P01, 3D000, 53300, ...) can reach the client unchanged; a method the proxy
  cannot answer raises `BackendLoginError`; bad bytes raise `ProtocolError`;
* SCRAM is mutual: AuthenticationOk is refused until the server has proved its signature,
  so a server that does not know the secret cannot pretend to have accepted us;
* pure: no I/O, no clock, no logging.

Message flow: PostgreSQL docs, "Frontend/Backend Protocol" → "Message Flow" → "Start-up".
"""

from collections.abc import Mapping
from dataclasses import dataclass, field

from pgproxy.errors import BackendUnavailableError, ProtocolError, ServerError
from pgproxy.wire.codes import AuthCode, BackendCode
from pgproxy.wire.messages import (
    parse_authentication,
    parse_backend_key_data,
    parse_fields,
    parse_negotiate_protocol_version,
    parse_parameter_status,
    parse_sasl_mechanisms,
    password_message,
    sasl_initial_response,
    sasl_response,
    startup_message,
)
from pgproxy.wire.scram import (
    SCRAM_SHA_256,
    ScramClientExchange,
    ScramSecret,
    md5_response,
    md5_secret,
)

# Login messages are small; anything bigger than this is not a Postgres server talking.
MAX_LOGIN_MESSAGE_LENGTH = 1 << 20

_AUTH_METHOD_NAMES = {
    2: "Kerberos V5",
    6: "SCM credentials",
    7: "GSSAPI",
    8: "GSSAPI",
    9: "SSPI",
}


class BackendLoginError(BackendUnavailableError):
    """The proxy cannot log in to a server: unsupported method or missing credentials."""


@dataclass(frozen=True, slots=True)
class ServerCredentials:
    """How the proxy proves who it is to Postgres for one pool's user."""

    user: str
    password: str | None = field(default=None, repr=False)  # plaintext
    md5: str | None = field(default=None, repr=False)  # md5 secret: enough for md5 auth
    scram: ScramSecret | None = None  # with client_key: SCRAM pass-through
    client_key: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class ServerLoginStep:
    """What one `ServerLogin.feed` decided."""

    send: bytes  # bytes to write to the server now (may be b"")
    done: bool  # ReadyForQuery received
    parameters: dict[str, str]  # all ParameterStatus seen so far (complete when done)
    backend_key: tuple[int, int] | None  # (pid, secret) from BackendKeyData
    leftover: bytes  # bytes after the ReadyForQuery (normally empty)


class ServerLogin:
    """Log in to one server connection as ``credentials.user`` on ``database``."""

    __slots__ = (
        "_authenticated",
        "_backend_key",
        "_buffer",
        "_credentials",
        "_database",
        "_done",
        "_parameters",
        "_params",
        "_scram",
    )

    def __init__(
        self, *, database: str, credentials: ServerCredentials, params: Mapping[str, str]
    ) -> None:
        self._database = database
        self._credentials = credentials
        self._params = dict(params)  # extra startup parameters (application_name, GUCs...)
        self._buffer = bytearray()
        self._authenticated = False  # AuthenticationOk received
        self._done = False
        self._scram: ScramClientExchange | None = None
        self._parameters: dict[str, str] = {}
        self._backend_key: tuple[int, int] | None = None

    def start(self) -> bytes:
        """The StartupMessage (protocol 3.0) to send first."""
        params = {"user": self._credentials.user, "database": self._database}
        for key, value in self._params.items():
            params.setdefault(key, value)
        return startup_message(params)

    def feed(self, data: bytes) -> ServerLoginStep:
        """Consume bytes from the server."""
        if self._done:
            raise ProtocolError("server login already finished")
        self._buffer += data
        send: list[bytes] = []
        done = False
        while not done and (message := self._take_message()) is not None:
            done = self._on_message(message[0], message[1], send)
        leftover = b""
        if done:
            self._done = True
            leftover = bytes(self._buffer)
            self._buffer.clear()
        return ServerLoginStep(
            send=b"".join(send),
            done=done,
            parameters=dict(self._parameters),
            backend_key=self._backend_key,
            leftover=leftover,
        )

    def _take_message(self) -> tuple[int, bytes] | None:
        buffer = self._buffer
        if len(buffer) < 5:
            return None
        code = buffer[0]
        length = int.from_bytes(buffer[1:5], signed=True)
        if length < 4 or length > MAX_LOGIN_MESSAGE_LENGTH:
            raise ProtocolError(f"invalid message length {length} from server during login")
        if len(buffer) < length + 1:
            return None
        body = bytes(buffer[5 : length + 1])
        del buffer[: length + 1]
        return code, body

    def _on_message(self, code: int, body: bytes, send: list[bytes]) -> bool:
        """Handle one message; True at the ReadyForQuery that ends the login."""
        if code == BackendCode.ERROR_RESPONSE:
            raise ServerError(parse_fields(body))
        if code == BackendCode.NOTICE_RESPONSE:
            return False
        if code == BackendCode.NEGOTIATE_PROTOCOL_VERSION:
            # We ask for 3.0 without options, so there is nothing to downgrade; only check it.
            parse_negotiate_protocol_version(body)
            return False
        if not self._authenticated:
            if code != BackendCode.AUTHENTICATION:
                raise ProtocolError(
                    f"unexpected message type {chr(code)!r} from server before authentication"
                )
            self._on_authentication(body, send)
        elif code == BackendCode.PARAMETER_STATUS:
            name, value = parse_parameter_status(body)
            self._parameters[name] = value
        elif code == BackendCode.BACKEND_KEY_DATA:
            self._backend_key = parse_backend_key_data(body)
        elif code == BackendCode.READY_FOR_QUERY:
            if len(body) != 1:
                raise ProtocolError("invalid ReadyForQuery message from server")
            return True
        else:
            raise ProtocolError(f"unexpected message type {chr(code)!r} from server during login")
        return False

    def _on_authentication(self, body: bytes, send: list[bytes]) -> None:
        auth_code, payload = parse_authentication(body)
        credentials = self._credentials
        user = credentials.user
        if auth_code == AuthCode.OK:
            if self._scram is not None and not self._scram.is_finished:
                raise BackendLoginError(
                    "server accepted the login before completing SCRAM authentication"
                )
            self._authenticated = True
        elif auth_code == AuthCode.CLEARTEXT_PASSWORD:
            if credentials.password is None:
                raise _missing_password("a cleartext", user)
            send.append(password_message(credentials.password.encode()))
        elif auth_code == AuthCode.MD5_PASSWORD:
            if len(payload) != 4:
                raise ProtocolError("invalid AuthenticationMD5Password message from server")
            if credentials.password is not None:
                secret = md5_secret(user, credentials.password)
            elif credentials.md5 is not None:
                secret = credentials.md5
            else:
                raise _missing_password("an md5", user)
            send.append(password_message(md5_response(secret, user, payload)))
        elif auth_code == AuthCode.SASL:
            self._start_scram(parse_sasl_mechanisms(payload), send)
        elif auth_code == AuthCode.SASL_CONTINUE:
            if self._scram is None:
                raise ProtocolError("unexpected AuthenticationSASLContinue from server")
            send.append(sasl_response(self._scram.handle_server_first(payload)))
        elif auth_code == AuthCode.SASL_FINAL:
            if self._scram is None:
                raise ProtocolError("unexpected AuthenticationSASLFinal from server")
            self._scram.handle_server_final(payload)
        else:
            method = _AUTH_METHOD_NAMES.get(auth_code, f"unknown method {auth_code}")
            raise BackendLoginError(
                f"server asked for {method} authentication, which pgproxy does not support"
            )

    def _start_scram(self, mechanisms: list[str], send: list[bytes]) -> None:
        if self._scram is not None:
            raise ProtocolError("unexpected second AuthenticationSASL from server")
        if SCRAM_SHA_256 not in mechanisms:
            raise BackendLoginError(
                f"server offered SASL mechanisms {', '.join(mechanisms) or '(none)'}; "
                f"pgproxy supports only {SCRAM_SHA_256}"
            )
        credentials = self._credentials
        if credentials.password is not None:
            self._scram = ScramClientExchange(credentials.password)
        elif credentials.scram is not None and credentials.client_key is not None:
            try:
                self._scram = ScramClientExchange(
                    secret=credentials.scram, client_key=credentials.client_key
                )
            except ValueError as exc:
                raise BackendLoginError(f"SCRAM pass-through impossible: {exc}") from None
        else:
            raise _missing_password("a SCRAM-SHA-256", credentials.user)
        # Channel binding is not used, so plain SCRAM-SHA-256 even if -PLUS is offered too.
        send.append(sasl_initial_response(SCRAM_SHA_256, self._scram.client_first()))


def _missing_password(method: str, user: str) -> BackendLoginError:
    return BackendLoginError(
        f"server asked for {method} password but no password is configured for user {user!r}"
    )
