"""`ClientLogin`: a client's startup packets and authentication, as a pure state machine.

Rules of this file:

* bytes from the client go in through `ClientLogin.feed`, decisions come out as events; the
  asyncio shell writes `Send` data, closes on `CancelRequested`/`Closed`, and starts the
  session on `Authenticated`. Errors are raised as `PgProxyError`s: the shell answers them
  with an ErrorResponse and closes;
* the proxy never says whether a user exists: an unknown user goes through the same
  exchange as a known one (a mock SCRAM exchange, an md5 challenge with a random salt) and
  fails with the same message as a wrong password, as Postgres does;
* no PBKDF2 here: SCRAM secrets are derived once, when users are configured;
* AuthenticationOk, ParameterStatus, BackendKeyData and ReadyForQuery are *not* sent here:
  the shell sends them once a server connection for the pool is known to work;
* pure: no I/O, no clock, no logging; randomness is injected.

Message flow: PostgreSQL docs, "Frontend/Backend Protocol" → "Message Flow" → "Start-up".
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum, StrEnum, auto
from typing import Final

from pgproxy.errors import AuthError, PgProxyError, ProtocolError
from pgproxy.wire.codes import MAX_STARTUP_PACKET_LENGTH, FrontendCode, SqlState
from pgproxy.wire.messages import (
    CancelRequest,
    GssEncRequest,
    SslRequest,
    Startup,
    authentication_md5,
    authentication_sasl,
    authentication_sasl_continue,
    authentication_sasl_final,
    negotiate_protocol_version,
    parse_password_message,
    parse_sasl_initial_response,
    parse_startup_packet,
)
from pgproxy.wire.scram import (
    SCRAM_SHA_256,
    ScramSecret,
    ScramServerExchange,
    check_md5_response,
    is_md5_secret,
    make_scram_secret,
    md5_secret,
    parse_scram_secret,
)

# Postgres reads password and SASL messages with a limit of PG_MAX_AUTH_TOKEN_LENGTH (65535).
MAX_AUTH_MESSAGE_LENGTH: Final = 65535

# Startup parameters that are protocol options, not GUCs ("_pq_." prefix, protocol 3.0 docs).
_PROTOCOL_OPTION_PREFIX = "_pq_."


class AuthMethod(StrEnum):
    """How the proxy authenticates clients (names as in pg_hba.conf)."""

    SCRAM_SHA_256 = "scram-sha-256"
    MD5 = "md5"
    TRUST = "trust"


@dataclass(frozen=True, slots=True)
class UserAuth:
    """What the proxy knows about a configured user's password."""

    name: str
    password: str | None = field(repr=False)  # plaintext, if configured
    scram: ScramSecret | None  # derived once at start-up, or parsed from a secret
    md5: str | None = field(repr=False)  # "md5..." secret, derived or configured


def user_auth_from_password(name: str, password_or_secret: str) -> UserAuth:
    """`UserAuth` from a configured password: plaintext, ``SCRAM-SHA-256$...`` or ``md5...``.

    Same classification as Postgres' get_password_type: text that does not parse as a secret
    is a plaintext password. A plaintext password runs PBKDF2 here, once.
    """
    if is_md5_secret(password_or_secret):
        return UserAuth(name, None, None, password_or_secret)
    try:
        return UserAuth(name, None, parse_scram_secret(password_or_secret), None)
    except ValueError:
        pass
    return UserAuth(
        name,
        password_or_secret,
        make_scram_secret(password_or_secret),
        md5_secret(name, password_or_secret),
    )


# --- events -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    """Bytes to write to the client."""

    data: bytes


@dataclass(frozen=True, slots=True)
class LookupUser:
    """The user must be fetched (auth_query) first; then call `user_found`."""

    user: str


@dataclass(frozen=True, slots=True)
class StartTls:
    """Answer the SSLRequest with 'S' and start the TLS handshake; then call `tls_started`."""


@dataclass(frozen=True, slots=True)
class TlsPolicy:
    """What the proxy's client side offers and demands (client_tls_sslmode)."""

    offered: bool  # an SSLRequest is answered 'S'
    required: bool  # a StartupMessage in plaintext is refused
    cert_names_user: bool  # verify-full: the client certificate's CN must be the user


NO_TLS = TlsPolicy(offered=False, required=False, cert_names_user=False)


@dataclass(frozen=True, slots=True)
class CancelRequested:
    """The connection was a CancelRequest: act on it, then close without answering."""

    pid: int
    secret: int


@dataclass(frozen=True, slots=True)
class Authenticated:
    """The client is who it says; start its session (AuthenticationOk is not sent yet)."""

    user: str
    database: str
    params: dict[str, str]  # startup parameters but user, database, replication, _pq_.*
    client_key: bytes | None = field(default=None, repr=False)  # SCRAM, for pass-through
    leftover: bytes = b""  # bytes the client pipelined after its last auth message


@dataclass(frozen=True, slots=True)
class Closed:
    """The client sent Terminate before logging in: close silently."""


LoginEvent = Send | StartTls | LookupUser | CancelRequested | Authenticated | Closed


class _Phase(Enum):
    STARTUP = auto()  # reading SSLRequest / GSSENCRequest / CancelRequest / StartupMessage
    TLS_HANDSHAKE = auto()  # 'S' sent: the connection does the handshake, then tls_started
    LOOKUP = auto()  # LookupUser emitted: waiting for user_found
    SASL_INITIAL = auto()  # AuthenticationSASL sent, SASLInitialResponse expected
    SASL_FIRST = auto()  # empty SASLContinue sent, client-first in a SASLResponse expected
    SASL_FINAL = auto()  # server-first sent, client-final expected
    MD5_PASSWORD = auto()  # AuthenticationMD5Password sent, PasswordMessage expected
    DONE = auto()  # authenticated, cancelled or closed: nothing more to feed


class ClientLogin:
    """Feed it the client's bytes until it emits `Authenticated`, `CancelRequested` or `Closed`."""

    __slots__ = (
        "_auth_method",
        "_buffer",
        "_database",
        "_exchange",
        "_gssenc_refused",
        "_lookup_user",
        "_md5_salt",
        "_md5_secret",
        "_mock_seed",
        "_needs_lookup",
        "_params",
        "_phase",
        "_random_bytes",
        "_ssl_refused",
        "_tls",
        "_tls_name",
        "_user",
        "encrypted",
    )

    def __init__(
        self,
        *,
        auth_method: AuthMethod,
        lookup_user: Callable[[str], UserAuth | None],
        random_bytes: Callable[[int], bytes],
        mock_seed: bytes,
        tls: TlsPolicy = NO_TLS,
        needs_lookup: Callable[[str], bool] | None = None,
    ) -> None:
        self._auth_method = auth_method
        # True for a user `lookup_user` does not know yet (auth_query, not cached).
        self._needs_lookup = needs_lookup
        self._tls = tls
        self.encrypted = False
        self._tls_name: str | None = None
        self._lookup_user = lookup_user
        self._random_bytes = random_bytes
        self._mock_seed = mock_seed  # secret: makes mock salts unpredictable
        self._buffer = bytearray()
        self._phase = _Phase.STARTUP
        self._ssl_refused = False
        self._gssenc_refused = False
        self._user: str | None = None
        self._database: str | None = None
        self._params: dict[str, str] = {}
        self._exchange: ScramServerExchange | None = None
        self._md5_salt = b""
        self._md5_secret: str | None = None

    @property
    def user(self) -> str | None:
        """The user named in the StartupMessage, once received (for logs)."""
        return self._user

    @property
    def database(self) -> str | None:
        return self._database

    def tls_started(self, common_name: str | None) -> None:
        """The handshake that `StartTls` asked for succeeded; `common_name`: the client
        certificate's CN, if it showed one."""
        if self._buffer:
            raise ProtocolError("received unencrypted data after SSL request")
        self.encrypted = True
        self._tls_name = common_name
        self._phase = _Phase.STARTUP

    def feed(self, data: bytes) -> list[LoginEvent]:
        """Consume bytes from the client; return what to do, in order."""
        if self._phase is _Phase.DONE:
            raise ProtocolError("login already finished")
        self._buffer += data
        events: list[LoginEvent] = []
        while self._step(events):
            pass
        return events

    def _step(self, events: list[LoginEvent]) -> bool:
        """Handle one whole packet or message if buffered; False when there is nothing to do."""
        if self._phase in (_Phase.DONE, _Phase.TLS_HANDSHAKE, _Phase.LOOKUP):
            return False
        if self._phase is _Phase.STARTUP:
            packet = self._take_startup_packet()
            if packet is None:
                return False
            self._on_startup_packet(packet, events)
            return True
        message = self._take_message()
        if message is None:
            return False
        self._on_message(message[0], message[1], events)
        return True

    # --- framing --------------------------------------------------------------------------

    def _take_startup_packet(self) -> bytes | None:
        buffer = self._buffer
        if len(buffer) < 4:
            return None
        length = int.from_bytes(buffer[:4], signed=True)
        # Same bounds as Postgres' ProcessStartupPacket: room for the code, at most 10000.
        if length < 8 or length > MAX_STARTUP_PACKET_LENGTH:
            raise ProtocolError(f"invalid length of startup packet: {length}")
        if len(buffer) < length:
            return None
        packet = bytes(buffer[:length])
        del buffer[:length]
        return packet

    def _take_message(self) -> tuple[int, bytes] | None:
        buffer = self._buffer
        if len(buffer) < 5:
            return None
        code = buffer[0]
        length = int.from_bytes(buffer[1:5], signed=True)
        if length < 4 or length - 4 > MAX_AUTH_MESSAGE_LENGTH:
            raise ProtocolError(f"invalid message length {length} during authentication")
        if len(buffer) < length + 1:
            return None
        body = bytes(buffer[5 : length + 1])
        del buffer[: length + 1]
        return code, body

    # --- startup --------------------------------------------------------------------------

    def _on_startup_packet(self, packet: bytes, events: list[LoginEvent]) -> None:
        parsed = parse_startup_packet(packet)
        if isinstance(parsed, SslRequest):
            # The proxy's listener terminates TLS itself when configured; reaching here means
            # plaintext, so refuse and let the client continue in the clear (or give up).
            if self._ssl_refused or self.encrypted:
                raise ProtocolError("duplicate SSLRequest")
            if self._tls.offered:
                if self._buffer:
                    # Bytes sent before the handshake would be trusted as if encrypted
                    # (CVE-2021-23214): Postgres refuses them the same way.
                    raise ProtocolError("received unencrypted data after SSL request")
                self._phase = _Phase.TLS_HANDSHAKE
                events.append(StartTls())
                return
            self._ssl_refused = True
            events.append(Send(b"N"))
        elif isinstance(parsed, GssEncRequest):
            if self._gssenc_refused:
                raise ProtocolError("duplicate GSSENCRequest")
            self._gssenc_refused = True
            events.append(Send(b"N"))
        elif isinstance(parsed, CancelRequest):
            self._phase = _Phase.DONE
            events.append(CancelRequested(parsed.pid, parsed.secret))
        else:
            self._on_startup(parsed, events)

    def _on_startup(self, startup: Startup, events: list[LoginEvent]) -> None:
        params = dict(startup.params)
        options = sorted(key for key in params if key.startswith(_PROTOCOL_OPTION_PREFIX))
        for key in options:
            del params[key]
        # "NegotiateProtocolVersion ... sent if the client requested a newer minor version or
        # sent _pq_. options the server does not recognize" (Message Flow, Start-up).
        if startup.minor_version > 0 or options:
            events.append(Send(negotiate_protocol_version(0, options)))
        user = params.pop("user")
        self._user = user
        self._database = params.pop("database")
        if self._tls.required and not self.encrypted:
            raise PgProxyError(
                "pgproxy accepts TLS connections only (client_tls_sslmode); connect with "
                "sslmode=require or stronger",
                sqlstate=SqlState.INVALID_AUTHORIZATION_SPECIFICATION,
            )
        if self._tls.cert_names_user and self._tls_name != user:
            raise PgProxyError(
                f'the client certificate does not name user "{user}" (its CN is '
                f"{self._tls_name!r}; client_tls_sslmode=verify-full)",
                sqlstate=SqlState.INVALID_AUTHORIZATION_SPECIFICATION,
            )
        params.pop("replication", None)
        self._params = params
        if self._needs_lookup is not None and self._needs_lookup(user):
            self._phase = _Phase.LOOKUP
            events.append(LookupUser(user))
            return
        self._challenge(user, self._lookup_user(user), events)

    def user_found(self, auth: UserAuth | None) -> list[LoginEvent]:
        """The answer to `LookupUser` (None: no such user); the login goes on."""
        if self._phase is not _Phase.LOOKUP or self._user is None:
            raise ProtocolError("no user lookup in progress")
        self._phase = _Phase.STARTUP  # _challenge sets the next phase
        events: list[LoginEvent] = []
        self._challenge(self._user, auth, events)
        while self._step(events):  # anything the client sent meanwhile
            pass
        return events

    def _challenge(self, user: str, auth: UserAuth | None, events: list[LoginEvent]) -> None:
        """Ask for the password (or let a trusted user in)."""
        if self._auth_method is AuthMethod.TRUST:
            self._authenticated(events, None)
        elif self._auth_method is AuthMethod.SCRAM_SHA_256:
            if auth is not None and auth.scram is not None:
                self._exchange = ScramServerExchange(auth.scram, self._random_bytes)
            else:
                # Unknown user, or no SCRAM secret (only md5): Postgres' "mock" exchange.
                self._exchange = ScramServerExchange.mock(
                    self._mock_seed + user.encode(), self._random_bytes
                )
            self._phase = _Phase.SASL_INITIAL
            events.append(Send(authentication_sasl([SCRAM_SHA_256])))
        else:
            self._md5_secret = None
            if auth is not None:
                if auth.md5 is not None:
                    self._md5_secret = auth.md5
                elif auth.password is not None:
                    self._md5_secret = md5_secret(user, auth.password)
            # A random salt also for unknown users: the challenge must look the same.
            self._md5_salt = self._random_bytes(4)
            self._phase = _Phase.MD5_PASSWORD
            events.append(Send(authentication_md5(self._md5_salt)))

    # --- authentication -------------------------------------------------------------------

    def _on_message(self, code: int, body: bytes, events: list[LoginEvent]) -> None:
        if code == FrontendCode.TERMINATE:
            self._phase = _Phase.DONE
            events.append(Closed())
            return
        if code != FrontendCode.PASSWORD:
            raise ProtocolError(f"expected password response, got message type {chr(code)!r}")
        phase = self._phase
        exchange = self._exchange
        if phase is _Phase.MD5_PASSWORD:
            response = parse_password_message(body)
            secret = self._md5_secret
            if secret is None or not check_md5_response(secret, self._md5_salt, response):
                raise self._failed()
            self._authenticated(events, None)
            return
        assert exchange is not None  # set together with the SASL phases
        if phase is _Phase.SASL_INITIAL:
            mechanism, data = parse_sasl_initial_response(body)
            if mechanism != SCRAM_SHA_256:
                raise ProtocolError("client selected an invalid SASL authentication mechanism")
            if data is None:
                # No initial response: send an empty challenge; the client answers with its
                # client-first-message in a SASLResponse (as Postgres' pg_be_scram_exchange).
                self._phase = _Phase.SASL_FIRST
                events.append(Send(authentication_sasl_continue(b"")))
                return
            self._client_first(exchange, data, events)
        elif phase is _Phase.SASL_FIRST:
            self._client_first(exchange, body, events)
        else:
            try:
                server_final = exchange.handle_client_final(body)
            except AuthError:
                raise self._failed() from None
            events.append(Send(authentication_sasl_final(server_final)))
            self._authenticated(events, exchange.client_key)

    def _client_first(
        self, exchange: ScramServerExchange, data: bytes, events: list[LoginEvent]
    ) -> None:
        self._phase = _Phase.SASL_FINAL
        events.append(Send(authentication_sasl_continue(exchange.handle_client_first(data))))

    def _failed(self) -> AuthError:
        # One message for an unknown user and a wrong password (Postgres' wording).
        return AuthError(f'password authentication failed for user "{self._user}"')

    def _authenticated(self, events: list[LoginEvent], client_key: bytes | None) -> None:
        assert self._user is not None
        assert self._database is not None
        self._phase = _Phase.DONE
        self._exchange = None
        leftover = bytes(self._buffer)
        self._buffer.clear()
        events.append(Authenticated(self._user, self._database, self._params, client_key, leftover))
