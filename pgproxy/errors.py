"""The error tree: every error the proxy raises knows the SQLSTATE and severity to send.

`wire`/`core` raise these; the asyncio shell turns a `PgProxyError` into an ErrorResponse to
the client followed by a close. `ConfigError` is separate: it stops start-up, it never reaches
the wire.
"""

from enum import StrEnum

from pgproxy.wire.codes import SqlState


class Severity(StrEnum):
    ERROR = "ERROR"
    FATAL = "FATAL"


class PgProxyError(Exception):
    """An error that becomes an ErrorResponse to the client (and, when FATAL, a close)."""

    sqlstate: str = SqlState.INTERNAL_ERROR
    severity: Severity = Severity.FATAL

    def __init__(
        self,
        message: str,
        *,
        sqlstate: str | None = None,
        severity: Severity | None = None,
        detail: str | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if sqlstate is not None:
            self.sqlstate = sqlstate
        if severity is not None:
            self.severity = severity
        self.detail = detail
        self.hint = hint


class ProtocolError(PgProxyError):
    """Bytes that break the protocol: bad lengths, unknown packets, messages out of place."""

    sqlstate = SqlState.PROTOCOL_VIOLATION


class FeatureNotSupportedError(PgProxyError):
    """A valid request the proxy does not serve (replication, protocol 2, GSSAPI...)."""

    sqlstate = SqlState.FEATURE_NOT_SUPPORTED


class AuthError(PgProxyError):
    """Failed authentication; the message never says whether the user exists."""

    sqlstate = SqlState.INVALID_PASSWORD


class UnknownDatabaseError(PgProxyError):
    sqlstate = SqlState.INVALID_CATALOG_NAME


class TooManyClientsError(PgProxyError):
    sqlstate = SqlState.TOO_MANY_CONNECTIONS


class PoolTimeoutError(PgProxyError):
    """A client waited longer than `query_wait_timeout` for a server connection."""

    sqlstate = SqlState.QUERY_CANCELED


class BackendUnavailableError(PgProxyError):
    """The proxy could not open or log in to a server connection."""

    sqlstate = SqlState.CONNECTION_FAILURE


class ShutdownError(PgProxyError):
    sqlstate = SqlState.ADMIN_SHUTDOWN


class ServerError(PgProxyError):
    """An ErrorResponse from Postgres itself, relayed with its own fields."""

    def __init__(self, fields: dict[str, str]) -> None:
        severity = (
            Severity.FATAL
            if fields.get("V", fields.get("S")) in ("FATAL", "PANIC")
            else Severity.ERROR
        )
        super().__init__(
            fields.get("M", "server error"),
            sqlstate=fields.get("C", SqlState.INTERNAL_ERROR),
            severity=severity,
            detail=fields.get("D"),
            hint=fields.get("H"),
        )
        self.fields = fields


class ConfigError(Exception):
    """A bad setting: stops start-up with one line naming the setting, exit code 2."""

    def __init__(self, setting: str, problem: str) -> None:
        super().__init__(f"{setting}: {problem}")
        self.setting = setting
        self.problem = problem
