"""Message type codes, protocol magic numbers and SQLSTATEs of the PostgreSQL v3 protocol.

Codes are plain ints (the value of the type byte) so that the data path can compare them with
``data[pos]`` directly. The same letter means different messages in each direction, hence two
classes. Reference: PostgreSQL documentation, "Frontend/Backend Protocol" → "Message Formats".
"""

from enum import IntEnum, StrEnum


class FrontendCode(IntEnum):
    """Type byte of a message sent by the client (frontend)."""

    BIND = ord("B")
    CLOSE = ord("C")
    COPY_DATA = ord("d")
    COPY_DONE = ord("c")
    COPY_FAIL = ord("f")
    DESCRIBE = ord("D")
    EXECUTE = ord("E")
    FLUSH = ord("H")
    FUNCTION_CALL = ord("F")
    PARSE = ord("P")
    PASSWORD = ord("p")  # PasswordMessage, SASLInitialResponse and SASLResponse share it
    QUERY = ord("Q")
    SYNC = ord("S")
    TERMINATE = ord("X")


class BackendCode(IntEnum):
    """Type byte of a message sent by the server (backend)."""

    AUTHENTICATION = ord("R")
    BACKEND_KEY_DATA = ord("K")
    BIND_COMPLETE = ord("2")
    CLOSE_COMPLETE = ord("3")
    COMMAND_COMPLETE = ord("C")
    COPY_BOTH_RESPONSE = ord("W")
    COPY_DATA = ord("d")
    COPY_DONE = ord("c")
    COPY_IN_RESPONSE = ord("G")
    COPY_OUT_RESPONSE = ord("H")
    DATA_ROW = ord("D")
    EMPTY_QUERY_RESPONSE = ord("I")
    ERROR_RESPONSE = ord("E")
    FUNCTION_CALL_RESPONSE = ord("V")
    NEGOTIATE_PROTOCOL_VERSION = ord("v")
    NO_DATA = ord("n")
    NOTICE_RESPONSE = ord("N")
    NOTIFICATION_RESPONSE = ord("A")
    PARAMETER_DESCRIPTION = ord("t")
    PARAMETER_STATUS = ord("S")
    PARSE_COMPLETE = ord("1")
    PORTAL_SUSPENDED = ord("s")
    READY_FOR_QUERY = ord("Z")
    ROW_DESCRIPTION = ord("T")


class AuthCode(IntEnum):
    """The int32 that follows an Authentication ('R') message's length."""

    OK = 0
    CLEARTEXT_PASSWORD = 3
    MD5_PASSWORD = 5
    SASL = 10
    SASL_CONTINUE = 11
    SASL_FINAL = 12


class TransactionStatus(IntEnum):
    """The status byte of ReadyForQuery."""

    IDLE = ord("I")
    IN_TRANSACTION = ord("T")
    FAILED = ord("E")


# Startup-phase packets have no type byte; these codes stand where a protocol version would.
PROTOCOL_VERSION_3 = 196608  # 3 << 16
CANCEL_REQUEST_CODE = 80877102
SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104

# Postgres refuses startup packets over 10 000 bytes (MAX_STARTUP_PACKET_LENGTH in pqcomm.h).
MAX_STARTUP_PACKET_LENGTH = 10_000


class SqlState(StrEnum):
    """SQLSTATE codes the proxy itself sends (Appendix A, "PostgreSQL Error Codes")."""

    SUCCESSFUL_COMPLETION = "00000"
    CONNECTION_FAILURE = "08006"
    PROTOCOL_VIOLATION = "08P01"
    FEATURE_NOT_SUPPORTED = "0A000"
    IDLE_IN_TRANSACTION_TIMEOUT = "25P03"
    TRANSACTION_TIMEOUT = "25P04"
    INVALID_AUTHORIZATION_SPECIFICATION = "28000"
    INVALID_PASSWORD = "28P01"  # noqa: S105 (a SQLSTATE, not a password)
    INVALID_CATALOG_NAME = "3D000"  # "database does not exist"
    INSUFFICIENT_RESOURCES = "53000"
    TOO_MANY_CONNECTIONS = "53300"
    QUERY_CANCELED = "57014"
    ADMIN_SHUTDOWN = "57P01"
    IDLE_SESSION_TIMEOUT = "57P05"
    CANNOT_CONNECT_NOW = "57P03"
    INTERNAL_ERROR = "XX000"
