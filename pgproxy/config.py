"""Settings: every knob the proxy has, where it comes from, and what counts as a valid value.

Rules of this file:

* Validation only. Nothing here opens a socket, starts a task or logs; the only I/O is reading
  the TOML file named by `--config`.
* Precedence is command-line flags > environment (`PGPROXY_…`) > TOML file > defaults. A source
  that sets a setting replaces it as a whole: `--user` does not add to the users of the file.
* Every model is frozen. A bad value never gets past `load_settings`: it raises `ConfigError`
  naming the first bad setting and a short reason, without echoing passwords.
* Names follow PgBouncer's where the meaning is the same, so its users feel at home; defaults
  that come from PgBouncer say so.
* Settings with their own string syntax (`listen`, `server`, `users`, `databases`) are parsed
  here from that syntax, whatever the source, and are marked `NoDecode` so that
  pydantic-settings hands the environment's string over as is instead of trying JSON.
"""

import difflib
import os
import re
import shlex
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import unquote, urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

from pgproxy.errors import ConfigError
from pgproxy.wire.scram import parse_scram_secret

ENV_PREFIX = "PGPROXY_"
# Same as PgBouncer's listen_port and libpq's default port.
DEFAULT_LISTEN_PORT = 6432
DEFAULT_SERVER_PORT = 5432


class AuthType(StrEnum):
    """How clients prove who they are (PgBouncer's `auth_type`)."""

    SCRAM_SHA_256 = "scram-sha-256"
    MD5 = "md5"
    TRUST = "trust"


class PoolMode(StrEnum):
    """When a server connection goes back to the pool (PgBouncer's `pool_mode`)."""

    TRANSACTION = "transaction"
    SESSION = "session"


class TlsMode(StrEnum):
    """How much TLS a side of the proxy asks for (PgBouncer's and libpq's sslmode words)."""

    DISABLE = "disable"
    ALLOW = "allow"
    PREFER = "prefer"
    REQUIRE = "require"
    VERIFY_CA = "verify-ca"
    VERIFY_FULL = "verify-full"

    @property
    def verifies(self) -> bool:
        return self in (TlsMode.VERIFY_CA, TlsMode.VERIFY_FULL)

    @property
    def requires(self) -> bool:
        return self in (TlsMode.REQUIRE, TlsMode.VERIFY_CA, TlsMode.VERIFY_FULL)


class LogLevel(StrEnum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


class PasswordKind(StrEnum):
    """What a configured password is; Postgres tells them apart the same way."""

    PLAINTEXT = "plaintext"
    MD5 = "md5"
    SCRAM_SHA_256 = "scram-sha-256"


# pg_authid's forms: `md5` + 32 lower-case hex digits, and
# `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>` in base64.
_MD5_SECRET = re.compile(r"md5[0-9a-f]{32}")
_SCRAM_PREFIX = "SCRAM-SHA-256$"
_SCRAM_SECRET = re.compile(
    r"SCRAM-SHA-256\$[1-9][0-9]*:[A-Za-z0-9+/]+={0,2}\$[A-Za-z0-9+/]+={0,2}:[A-Za-z0-9+/]+={0,2}"
)
# Per-pool settings a [databases] entry or a user_settings entry may override.
# SO_REUSEPORT workers; a cancel key encodes its worker, and more would not help a pooler.
MAX_WORKERS = 64


def cpu_count() -> int:
    """Cores this process may run on (its affinity), as `workers = auto` counts them."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count() or 1


_POOL_KEYS = (
    "pool_size",
    "query_timeout",
    "transaction_timeout",
    "idle_transaction_timeout",
    "client_idle_timeout",
    "query_wait_timeout",
)
_DATABASE_KEYS = ("dbname", "host", "port", *_POOL_KEYS)


def _parse_port(text: str) -> int:
    if not (text.isascii() and text.isdigit()):
        raise ValueError(f"port must be a number, got {text!r}")
    return int(text)


def _split_host_port(text: str, default_port: int) -> dict[str, object]:
    """`host:port`, `[v6]:port`, `host` or `:port` → host and port (range checked later)."""
    text = text.strip()
    port_text: str | None
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket:
            raise ValueError(f"missing ']' in {text!r}")
        if rest and not rest.startswith(":"):
            raise ValueError(f"expected ':PORT' after ']' in {text!r}")
        port_text = rest[1:] if rest else None
    elif text.count(":") > 1:
        raise ValueError(f"write an IPv6 address in brackets, e.g. [::1]:6432, got {text!r}")
    else:
        host, colon, port_text = text.partition(":")
        if not colon:
            port_text = None
    port = default_port if port_text is None else _parse_port(port_text)
    return {"host": host, "port": port}


class Address(BaseModel):
    """Where the proxy listens: `host:port`, `[::1]:6432`, or `:6432` / `*:6432` for all."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # "" = all interfaces, IPv4 and IPv6: asyncio's create_server reads it that way.
    host: str
    # 0 = let the kernel pick a free port (tests use it).
    port: int = Field(default=DEFAULT_LISTEN_PORT, ge=0, le=65535)

    @model_validator(mode="before")
    @classmethod
    def _parse_text(cls, value: object) -> object:
        if isinstance(value, str):
            parts = _split_host_port(value, DEFAULT_LISTEN_PORT)
            if parts["host"] == "*":  # PgBouncer's listen_addr = *
                parts["host"] = ""
            return parts
        return value

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


class Upstream(BaseModel):
    """The PostgreSQL server behind the proxy, from `host[:port]` or a postgresql:// URL."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = Field(min_length=1)
    port: int = Field(default=DEFAULT_SERVER_PORT, ge=1, le=65535)
    # Forced user: every server connection logs in as this one (PgBouncer's `user=`).
    user: str | None = Field(default=None, min_length=1)
    password: str | None = Field(default=None, repr=False)
    # Upstream database for client databases not listed in `databases`.
    dbname: str | None = Field(default=None, min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _parse_text(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        if "://" in value:
            return _parse_url(value.strip())
        parts = _split_host_port(value, DEFAULT_SERVER_PORT)
        _check_host(str(parts["host"]))
        return parts

    def __str__(self) -> str:
        """A URL without the password, for logs and `SHOW CONFIG`."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        user = f"{self.user}@" if self.user is not None else ""
        dbname = f"/{self.dbname}" if self.dbname is not None else ""
        return f"postgresql://{user}{host}:{self.port}{dbname}"


def _check_host(host: str) -> None:
    if not host:
        raise ValueError("needs a host, e.g. 127.0.0.1:5432")
    if host.startswith("/"):
        raise ValueError("unix-domain sockets are not supported; give a TCP host")
    if "," in host:
        raise ValueError("give a single host; lists of hosts are not supported")


def _parse_url(text: str) -> dict[str, object]:
    """`postgresql://[user[:password]@]host[:port][/dbname]`, parts percent-decoded like libpq."""
    parts = urlsplit(text)
    if parts.scheme not in ("postgresql", "postgres"):
        raise ValueError(f"URL must start with postgresql:// or postgres://, not {parts.scheme}://")
    if parts.query or parts.fragment:
        raise ValueError("URL options (?key=value) are not supported; give settings instead")
    try:
        port = parts.port
    except ValueError:
        raise ValueError("port in the URL must be a number from 1 to 65535") from None
    # .hostname strips IPv6 brackets; the parts are still percent-encoded.
    host = unquote(parts.hostname or "")
    _check_host(host)
    user = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    if password is not None and user is None:
        raise ValueError("URL has a password but no user")
    dbname = unquote(parts.path.removeprefix("/")) or None
    return {
        "host": host,
        "port": DEFAULT_SERVER_PORT if port is None else port,
        "user": user,
        "password": password,
        "dbname": dbname,
    }


class UserEntry(BaseModel):
    """A user allowed to log in to the proxy, with a plaintext password or a Postgres secret."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1)
    password: str = Field(min_length=1, repr=False)

    @property
    def password_kind(self) -> PasswordKind:
        if self.password.startswith(_SCRAM_PREFIX):
            return PasswordKind.SCRAM_SHA_256
        if _MD5_SECRET.fullmatch(self.password):
            return PasswordKind.MD5
        return PasswordKind.PLAINTEXT


class DatabaseEntry(BaseModel):
    """One entry of `databases`, like a line of PgBouncer's [databases]; None = not overridden."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # None = the alias itself is the upstream database name.
    dbname: str | None = Field(default=None, min_length=1)
    # None = `server`'s host and port.
    host: str | None = Field(default=None, min_length=1)
    port: int | None = Field(default=None, ge=1, le=65535)
    # None = not overridden (user_settings, then the global setting, apply).
    pool_size: int | None = Field(default=None, ge=1)
    query_timeout: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    transaction_timeout: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    idle_transaction_timeout: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    client_idle_timeout: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    query_wait_timeout: float | None = Field(default=None, ge=0, allow_inf_nan=False)


class UserSettings(BaseModel):
    """One entry of `user_settings` (PgBouncer's [users]): this user's pools differ."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    pool_size: int | None = Field(default=None, ge=1)
    query_timeout: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    transaction_timeout: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    idle_transaction_timeout: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    client_idle_timeout: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    query_wait_timeout: float | None = Field(default=None, ge=0, allow_inf_nan=False)


@dataclass(frozen=True, slots=True)
class PoolPolicy:
    """The limits of one (database, user) pool: user_settings > databases > global."""

    pool_size: int
    query_timeout: float
    transaction_timeout: float
    idle_transaction_timeout: float
    client_idle_timeout: float
    query_wait_timeout: float


def _user_pairs(value: object) -> list[tuple[object, object]]:
    """Every accepted shape of `users` → (name, password) pairs, in order."""
    if isinstance(value, str):  # environment: name:password,name2:password2
        value = [item.strip() for item in value.split(",") if item.strip()]
    if isinstance(value, Mapping):  # TOML [users] table: name = "password"
        return list(value.items())
    if not isinstance(value, list | tuple):
        raise ValueError("must be NAME:PASSWORD entries or a table of name = password")
    pairs: list[tuple[object, object]] = []
    for number, item in enumerate(value, start=1):
        if isinstance(item, str):
            name, colon, password = item.partition(":")
            if not colon:
                # Do not echo the entry: it may be a password.
                raise ValueError(f"entry {number} is not NAME:PASSWORD")
            pairs.append((name, password))
        elif isinstance(item, UserEntry):
            pairs.append((item.name, item.password))
        elif isinstance(item, Mapping):
            pairs.append((item.get("name"), item.get("password")))
        else:
            raise ValueError(f"entry {number} is not NAME:PASSWORD")
    return pairs


def _parse_database(
    text: str, keys: tuple[str, ...] = _DATABASE_KEYS
) -> tuple[str, dict[str, str]]:
    """`ALIAS=key=value key=value` (PgBouncer's [databases] line) or a bare `ALIAS`."""
    alias, _, spec = text.strip().partition("=")
    alias = alias.strip()
    if not alias:
        raise ValueError(f"entry {text!r} has no name; write ALIAS=dbname=NAME pool_size=N")
    return alias, _parse_database_spec(alias, spec, keys)


def _parse_database_spec(
    alias: str, spec: str, keys: tuple[str, ...] = _DATABASE_KEYS
) -> dict[str, str]:
    try:
        words = shlex.split(spec)  # allows dbname='my db', like PgBouncer's quoting
    except ValueError as exc:
        raise ValueError(f"{alias}: {exc}") from None
    fields: dict[str, str] = {}
    for word in words:
        key, equals, item = word.partition("=")
        if not equals:
            raise ValueError(f"{alias}: {word!r} is not KEY=VALUE")
        if key not in keys:
            known = ", ".join(keys)
            raise ValueError(f"{alias}: unknown key {key!r} (known: {known})")
        if key in fields:
            raise ValueError(f"{alias}: {key} is given twice")
        fields[key] = item
    return fields


def _database_entries(value: object, keys: tuple[str, ...] = _DATABASE_KEYS) -> object:
    """Every accepted shape of `databases` (or `user_settings`) → {name: fields}."""
    if isinstance(value, str):  # environment: entries separated by ';'
        value = [item for item in value.split(";") if item.strip()]
    if isinstance(value, list | tuple):  # repeated --database flags
        entries: dict[str, object] = {}
        for item in value:
            if not isinstance(item, str):
                raise ValueError("entries must be ALIAS=key=value strings")
            alias, fields = _parse_database(item, keys)
            if alias in entries:
                raise ValueError(f"{alias} is listed twice")
            entries[alias] = fields
        return entries
    if isinstance(value, Mapping):  # TOML [databases.ALIAS] tables, or ALIAS = "key=value ..."
        return {
            alias: _parse_database_spec(str(alias), fields, keys)
            if isinstance(fields, str)
            else fields
            for alias, fields in value.items()
        }
    return value


@dataclass(frozen=True, slots=True)
class _SourceInputs:
    config_file: Path | None = None
    environ: Mapping[str, str] | None = None  # None = os.environ


# What `load_settings` was asked to read, for `settings_customise_sources` (a classmethod that
# takes no arguments of ours). Scoped to one `load_settings` call, so concurrent loads
# (tests, RELOAD) never see each other's file.
_source_inputs: ContextVar[_SourceInputs | None] = ContextVar(
    "pgproxy_settings_sources", default=None
)


class _EnvironSource(EnvSettingsSource):
    """The environment source, reading a given mapping instead of `os.environ`."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._environ = environ  # read by _load_env_vars during super().__init__
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        if self.case_sensitive:
            return dict(self._environ)
        return {name.lower(): value for name, value in self._environ.items()}


_Seconds = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class Settings(BaseSettings):
    """All settings of one proxy process; frozen, built by `load_settings`."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        case_sensitive=False,
        extra="forbid",  # an unknown key in the TOML file is a typo, not something to ignore
        frozen=True,
    )

    listen: Annotated[Address, NoDecode] = Field(
        default=Address(host="0.0.0.0", port=DEFAULT_LISTEN_PORT),  # noqa: S104 - a proxy serves the network
        description=(
            "Address to accept clients on, HOST:PORT; [::1]:6432 for IPv6, :6432 for all "
            "interfaces, port 0 picks a free port (PgBouncer: listen_addr and listen_port)."
        ),
    )
    server: Annotated[Upstream, NoDecode] = Field(
        default=Upstream(host="127.0.0.1", port=DEFAULT_SERVER_PORT),
        description=(
            "PostgreSQL server to pool connections to: HOST[:PORT] or "
            "postgresql://[USER[:PASSWORD]@]HOST[:PORT][/DBNAME] (percent-encoded). A user in the "
            "URL makes every server connection log in as that user, with that password (like "
            "PgBouncer's user= in [databases]); a database in the URL is used upstream for any "
            "client database not listed in databases."
        ),
    )
    unix_socket_dir: str = Field(
        default="",
        description=(
            "Directory for a Unix-domain socket named .s.PGSQL.<listen port>, as Postgres and "
            "PgBouncer name it (psql -h DIR); empty = TCP only."
        ),
    )
    unix_socket_mode: str = Field(
        default="0777",  # same as PgBouncer
        pattern=r"^0?[0-7]{3}$",
        description="Permissions of the Unix-domain socket, in octal.",
    )
    metrics_listen: Annotated[Address | None, NoDecode] = Field(
        default=Address(host="0.0.0.0", port=9127),  # noqa: S104 - Prometheus scrapes remotely
        description=(
            "Address of the HTTP endpoint with /metrics (Prometheus), /healthz and /readyz, "
            "HOST:PORT; empty = no endpoint."
        ),
    )
    databases: Annotated[dict[str, DatabaseEntry], NoDecode] = Field(
        default_factory=dict,
        description=(
            "Databases clients may ask for, ALIAS=dbname=NAME host=HOST port=PORT pool_size=N, "
            "every key optional (PgBouncer's [databases]), plus per-database query_timeout, "
            "transaction_timeout, idle_transaction_timeout, client_idle_timeout and "
            "query_wait_timeout; repeat the flag, or separate entries with ';' in the "
            "environment. Empty: a client's database name is used upstream as is."
        ),
    )
    auth_type: AuthType = Field(
        default=AuthType.SCRAM_SHA_256,
        description=(
            "How clients prove who they are: scram-sha-256, md5 or trust (PgBouncer's auth_type)."
        ),
    )
    auth_user: str = Field(
        default="",
        description=(
            "Look up users who are not in users with auth_query, logged in to Postgres as this "
            "user (with its plain password from users, if it has an entry); empty = off."
        ),
    )
    auth_query: str = Field(
        default="SELECT usename, passwd FROM pgproxy.user_lookup($1)",
        min_length=1,
        description=(
            "Query that returns (name, password secret) of the user named by $1; a NULL secret "
            "or no row refuses the login. The default calls the SECURITY DEFINER function "
            "of README 'Passwords in Postgres'."
        ),
    )
    auth_dbname: str = Field(
        default="postgres",
        min_length=1,
        description="Database auth_query runs in (where its function is installed).",
    )
    auth_cache_ttl: _Seconds = Field(
        default=60.0,
        description=(
            "Seconds a user's secret fetched by auth_query is reused; after that a changed or "
            "expired password takes effect. Unknown users are remembered as long."
        ),
    )
    users: Annotated[tuple[UserEntry, ...], NoDecode] = Field(
        default=(),
        description=(
            "Users allowed to log in, NAME:PASSWORD; the password is plain text or a secret as "
            "Postgres stores it (SCRAM-SHA-256$... or md5 and 32 hex digits). Repeat the flag, or "
            "separate entries with ',' in the environment."
        ),
    )
    user_settings: Annotated[dict[str, UserSettings], NoDecode] = Field(
        default_factory=dict,
        description=(
            "Per-user pool limits, NAME=pool_size=N query_timeout=S ... (the keys of a "
            "databases entry but dbname, host and port; PgBouncer's [users]); they win over "
            "the database's and the global ones. Repeat the flag, or separate with ';'."
        ),
    )
    admin_users: Annotated[tuple[str, ...], NoDecode] = Field(
        default=(),
        description=(
            "Users (of users) who may run every command of the admin console, the virtual "
            "database pgproxy (alias pgbouncer); comma-separated."
        ),
    )
    stats_users: Annotated[tuple[str, ...], NoDecode] = Field(
        default=(),
        description="Users (of users) who may run the admin console's SHOW commands only.",
    )
    pool_mode: PoolMode = Field(
        default=PoolMode.TRANSACTION,
        description=(
            "When a server connection goes back to the pool: transaction (at the end of each "
            "transaction) or session (when the client leaves); PgBouncer's pool_mode."
        ),
    )
    default_pool_size: int = Field(
        default=20,  # same as PgBouncer
        ge=1,
        description="Most server connections per (database, user) pool (as in PgBouncer).",
    )
    min_pool_size: int = Field(
        default=0,  # same as PgBouncer
        ge=0,
        description=(
            "Server connections each pool keeps open even when idle, at most default_pool_size "
            "(as in PgBouncer)."
        ),
    )
    max_prepared_statements: int = Field(
        default=200,
        ge=0,
        description=(
            "Protocol-level named prepared statements kept per server connection in transaction "
            "mode, least recently used closed first; 0 = do not map names: a client that "
            "prepares is pinned to its server instead (PgBouncer's max_prepared_statements)."
        ),
    )
    max_pinned_servers: int = Field(
        default=0,
        ge=0,
        description=(
            "Most server connections of a pool that clients may hold pinned until they "
            "disconnect (LISTEN, temporary tables, SET in a transaction, ...); past it the "
            "client that tries to pin gets an error. 0 = the pool size minus one (at least 1), "
            "so that one server stays shared. Open WITH HOLD cursors do not count."
        ),
    )
    max_client_conn: int = Field(
        default=10000,
        ge=1,
        description=(
            "Most client connections at once; more are refused with 53300 too_many_connections "
            "(as in PgBouncer)."
        ),
    )
    workers: Annotated[int, NoDecode] = Field(
        default=1,
        description=(
            "Processes accepting on the same port (SO_REUSEPORT), each with its share of every "
            "pool size and of max_client_conn; auto = the number of CPU cores. A supervisor "
            "restarts a worker that dies; /metrics and the admin console show them all."
        ),
    )
    server_connect_timeout: float = Field(
        default=15.0,  # same as PgBouncer
        gt=0,
        allow_inf_nan=False,
        description="Seconds to open and log in to a server connection before giving up.",
    )
    query_wait_timeout: _Seconds = Field(
        default=120.0,  # same as PgBouncer
        description=(
            "Seconds a client may wait for a server connection before it gets an error; "
            "0 = wait forever."
        ),
    )
    idle_transaction_timeout: _Seconds = Field(
        default=0.0,  # same as PgBouncer: off
        description=(
            "Disconnect a client that stays idle in a transaction this many seconds, freeing its "
            "server connection (25P03); 0 = never."
        ),
    )
    idle_transaction_warn: _Seconds = Field(
        default=10.0,
        description=(
            "Log a warning naming a client idle in a transaction this many seconds (with its "
            "application_name and last statement); 0 = never."
        ),
    )
    transaction_timeout: _Seconds = Field(
        default=0.0,
        description=(
            "Disconnect a client whose transaction has lasted this many seconds (25P04); its "
            "server is rolled back (a running query cancelled first) or closed; 0 = never."
        ),
    )
    query_timeout: _Seconds = Field(
        default=0.0,
        description=(
            "Cancel a query running this many seconds on the server (the client gets 57014 and "
            "keeps its connection); 0 = never."
        ),
    )
    client_idle_timeout: _Seconds = Field(
        default=0.0,
        description=(
            "Disconnect a client that holds no server and has sent nothing for this many "
            "seconds (57P05); 0 = never."
        ),
    )
    query_wait_notify: _Seconds = Field(
        default=5.0,
        description=(
            "Send a NOTICE to a client that has waited this many seconds for a server "
            "connection, saying why; 0 = never."
        ),
    )
    track_statement_text: bool = Field(
        default=True,
        description=(
            "Keep each client's last statement, for the warnings about idle transactions and "
            "the leak reports; false = never record statement text (privacy)."
        ),
    )
    monitor_interval: _Seconds = Field(
        default=5.0,
        description=(
            "Seconds between reads of pg_stat_activity on the server for /metrics; 0 = off."
        ),
    )
    server_check_delay: _Seconds = Field(
        default=30.0,  # same as PgBouncer
        description=(
            "A server idle this long runs server_check_query before a client gets it; a server "
            "that fails it is closed and replaced. 0 = check at every reuse."
        ),
    )
    server_check_query: str = Field(
        default="select 1",  # same as PgBouncer
        description="The health check of server_check_delay; empty = no check.",
    )
    server_idle_timeout: _Seconds = Field(
        default=600.0,  # same as PgBouncer
        description="Close a server connection idle in the pool this many seconds; 0 = never.",
    )
    server_lifetime: _Seconds = Field(
        default=3600.0,  # same as PgBouncer
        description=(
            "Close a server connection this many seconds old when it next returns to the pool; "
            "0 = never."
        ),
    )
    tcp_keepalive: bool = Field(
        default=True,  # same as PgBouncer
        description=(
            "TCP keepalive on client and Postgres connections, so that a peer gone without a "
            "word (host down, NAT or firewall state dropped) is found and its connection "
            "closed; the OS's timing unless tcp_keepidle/tcp_keepintvl/tcp_keepcnt are set."
        ),
    )
    tcp_keepidle: int = Field(
        default=0,
        ge=0,
        le=32767,
        description="Seconds of silence before the first keepalive probe; 0 = the OS default.",
    )
    tcp_keepintvl: int = Field(
        default=0,
        ge=0,
        le=32767,
        description="Seconds between keepalive probes; 0 = the OS default.",
    )
    tcp_keepcnt: int = Field(
        default=0,
        ge=0,
        le=127,
        description="Unanswered keepalive probes before the connection is dropped; 0 = the OS "
        "default.",
    )
    tcp_user_timeout: int = Field(
        default=0,
        ge=0,
        le=2**31 - 1,
        description=(
            "Milliseconds sent data may stay unacknowledged before the connection is dropped "
            "(TCP_USER_TIMEOUT, Linux); 0 = the OS default."
        ),
    )
    client_login_timeout: _Seconds = Field(
        default=60.0,  # same as PgBouncer
        description=(
            "Disconnect a client that has not logged in after this many seconds; 0 = never."
        ),
    )
    shutdown_grace_period: _Seconds = Field(
        default=0.0,
        description=(
            "On SIGTERM, seconds pgproxy still accepts and serves new clients while /readyz "
            "already fails, so that load balancers stop sending them; then the drain starts."
        ),
    )
    shutdown_timeout: _Seconds = Field(
        default=30.0,
        description=(
            "On SIGTERM, seconds clients linked to a server get to finish their transaction "
            "before they are disconnected; 0 = disconnect at once."
        ),
    )
    server_reset_query: str = Field(
        default="DISCARD ALL",  # same as PgBouncer
        description=(
            "SQL run on a server connection before another client gets it, in session mode; "
            "empty = none."
        ),
    )
    client_tls_sslmode: TlsMode = Field(
        default=TlsMode.DISABLE,  # same as PgBouncer
        description=(
            "TLS with clients: disable (refuse SSLRequest), allow/prefer (TLS when the client "
            "asks), require (refuse plaintext clients), verify-ca (and a client certificate "
            "signed by client_tls_ca_file), verify-full (and its CN equal to the user name)."
        ),
    )
    client_tls_cert_file: str = Field(
        default="", description="PEM certificate (chain) the proxy shows to clients."
    )
    client_tls_key_file: str = Field(
        default="", description="PEM private key of client_tls_cert_file."
    )
    client_tls_ca_file: str = Field(
        default="", description="PEM CA certificates that sign client certificates (verify-*)."
    )
    server_tls_sslmode: TlsMode = Field(
        default=TlsMode.PREFER,  # same as PgBouncer
        description=(
            "TLS to Postgres: disable, allow/prefer (TLS when the server offers it), require, "
            "verify-ca (the server's certificate signed by server_tls_ca_file, or the system's "
            "CAs), verify-full (and its name equal to the server host)."
        ),
    )
    server_tls_ca_file: str = Field(
        default="", description="PEM CA certificates that sign Postgres' certificate."
    )
    server_tls_cert_file: str = Field(
        default="", description="PEM client certificate the proxy shows to Postgres, if any."
    )
    server_tls_key_file: str = Field(
        default="", description="PEM private key of server_tls_cert_file."
    )
    log_level: LogLevel = Field(
        default=LogLevel.INFO,
        description="Least severe log messages written: debug, info, warning or error.",
    )

    @field_validator(
        "client_tls_cert_file",
        "client_tls_key_file",
        "client_tls_ca_file",
        "server_tls_ca_file",
        "server_tls_cert_file",
        "server_tls_key_file",
    )
    @classmethod
    def _check_readable(cls, value: str) -> str:
        if value and not os.access(value, os.R_OK):
            problem = "no such file" if not os.path.exists(value) else "not readable"
            raise ValueError(f"{value}: {problem}")
        return value

    @field_validator(
        "auth_type",
        "pool_mode",
        "log_level",
        "client_tls_sslmode",
        "server_tls_sslmode",
        mode="before",
    )
    @classmethod
    def _lower_choices(cls, value: object) -> object:
        """Choices are case-insensitive: `PGPROXY_LOG_LEVEL=DEBUG` is fine."""
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("users", mode="before")
    @classmethod
    def _parse_users(cls, value: object) -> object:
        entries: list[dict[str, object]] = []
        seen: set[object] = set()
        for name, password in _user_pairs(value):
            if not isinstance(name, str) or not name:
                raise ValueError(f"entry {len(entries) + 1} has an empty name")
            if not isinstance(password, str):
                raise ValueError(f"user {name!r}: the password must be a string")
            if not password:
                raise ValueError(f"user {name!r} has an empty password")
            if name in seen:
                raise ValueError(f"user {name!r} is listed twice")
            seen.add(name)
            entries.append({"name": name, "password": password})
        return entries

    @field_validator("users")
    @classmethod
    def _check_secrets(
        cls, users: tuple[UserEntry, ...], info: ValidationInfo
    ) -> tuple[UserEntry, ...]:
        auth_type = info.data.get("auth_type")
        for user in users:
            kind = user.password_kind
            if kind is PasswordKind.SCRAM_SHA_256:
                if not _SCRAM_SECRET.fullmatch(user.password):
                    raise ValueError(f"user {user.name!r} has a malformed SCRAM-SHA-256 secret")
                try:
                    parse_scram_secret(user.password)
                except ValueError as exc:
                    # Never echo the secret; the parser's reason names no part of it.
                    raise ValueError(f"user {user.name!r}: {exc}") from None
            # An md5 hash cannot answer a SCRAM exchange; the reverse works (Postgres and
            # PgBouncer switch an md5 login to SCRAM when the stored secret is SCRAM).
            if kind is PasswordKind.MD5 and auth_type is AuthType.SCRAM_SHA_256:
                raise ValueError(
                    f"user {user.name!r} has an md5 secret, which cannot answer scram-sha-256; "
                    "give the plain password or a SCRAM secret, or set auth_type to md5"
                )
        return users

    @field_validator("databases", mode="before")
    @classmethod
    def _parse_databases(cls, value: object) -> object:
        return _database_entries(value)

    @field_validator("user_settings", mode="before")
    @classmethod
    def _parse_user_settings(cls, value: object) -> object:
        return _database_entries(value, _POOL_KEYS)

    @field_validator("admin_users", "stats_users", mode="before")
    @classmethod
    def _parse_names(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(name.strip() for name in value.split(",") if name.strip())
        return value

    @field_validator("workers", mode="before")
    @classmethod
    def _parse_workers(cls, value: object) -> object:
        if isinstance(value, str) and value.strip().lower() == "auto":
            return cpu_count()
        return value

    @field_validator("workers")
    @classmethod
    def _check_workers(cls, value: int, info: ValidationInfo) -> int:
        if not 1 <= value <= MAX_WORKERS:
            raise ValueError(f"must be from 1 to {MAX_WORKERS} (or auto), got {value}")
        # Every worker needs at least one server connection of each pool and one client slot.
        limits: list[tuple[str, int | None]] = [
            ("default_pool_size", info.data.get("default_pool_size")),
            ("max_client_conn", info.data.get("max_client_conn")),
        ]
        for kind in ("databases", "user_settings"):
            entries = info.data.get(kind) or {}
            limits.extend(
                (f"{kind} {name} pool_size", entry.pool_size) for name, entry in entries.items()
            )
        for what, limit in limits:
            if isinstance(limit, int) and limit < value:
                raise ValueError(
                    f"{value} workers need {what} of at least {value} (each worker gets its "
                    f"share), got {limit}"
                )
        return value

    @field_validator("unix_socket_dir")
    @classmethod
    def _check_socket_dir(cls, value: str) -> str:
        if value and not os.path.isdir(value):
            raise ValueError(f"{value}: not a directory")
        return value

    @field_validator("metrics_listen", mode="before")
    @classmethod
    def _parse_metrics_listen(cls, value: object) -> object:
        if isinstance(value, str) and not value.strip():
            return None
        return value

    def policy(self, database: str, user: str) -> PoolPolicy:
        """This pool's limits: the user's entry, then the database's, then the global ones."""
        db = self.databases.get(database)
        us = self.user_settings.get(user)

        def pick(name: str) -> Any:
            for entry in (us, db):
                value = getattr(entry, name, None) if entry is not None else None
                if value is not None:
                    return value
            return getattr(self, "default_pool_size" if name == "pool_size" else name)

        return PoolPolicy(**{name: pick(name) for name in _POOL_KEYS})

    @field_validator("min_pool_size")
    @classmethod
    def _check_min_pool_size(cls, value: int, info: ValidationInfo) -> int:
        default_pool_size = info.data.get("default_pool_size")
        if isinstance(default_pool_size, int) and value > default_pool_size:
            raise ValueError(
                f"must be at most default_pool_size ({default_pool_size}), got {value}"
            )
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Flags (init kwargs) > environment > TOML file; no .env or secrets directory."""
        inputs = _source_inputs.get() or _SourceInputs()
        sources: list[PydanticBaseSettingsSource] = [init_settings]
        if inputs.environ is None:
            sources.append(env_settings)
        else:
            sources.append(_EnvironSource(settings_cls, inputs.environ))
        if inputs.config_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=inputs.config_file))
        return tuple(sources)


@contextmanager
def _reading(inputs: _SourceInputs) -> Iterator[None]:
    token = _source_inputs.set(inputs)
    try:
        yield
    finally:
        _source_inputs.reset(token)


def load_settings(
    flags: Mapping[str, object] = {},
    *,
    config_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Build the settings from flags, environment (default `os.environ`) and a TOML file.

    `flags` maps setting names to raw values as given on the command line (strings, or lists
    of strings for `users` and `databases`). Raises `ConfigError` on the first problem.
    """
    if config_file is not None and not config_file.is_file():
        problem = "no such file" if not config_file.exists() else "not a file"
        raise ConfigError("config", f"{config_file}: {problem}")
    kwargs: dict[str, Any] = dict(flags)
    try:
        with _reading(_SourceInputs(config_file, environ)):
            settings = Settings(**kwargs)
        _check_together(settings)
        return settings
    except ValidationError as exc:
        raise _config_error(exc, config_file) from None
    except OSError as exc:
        raise ConfigError("config", f"{config_file}: {exc.strerror or exc}") from None
    except ValueError as exc:  # tomllib.TOMLDecodeError, or a file that is not UTF-8
        raise ConfigError("config", f"{config_file}: {exc}") from None
    except SettingsError as exc:
        raise ConfigError("config", str(exc)) from None


def _check_together(settings: Settings) -> None:
    """Settings that are fine alone but not with the others; ConfigError names one of them."""
    client = settings.client_tls_sslmode
    if client is not TlsMode.DISABLE:
        for name in ("client_tls_cert_file", "client_tls_key_file"):
            if not getattr(settings, name):
                raise ConfigError(name, f"is needed with client_tls_sslmode={client}")
    if client.verifies and not settings.client_tls_ca_file:
        raise ConfigError("client_tls_ca_file", f"is needed with client_tls_sslmode={client}")
    if settings.auth_user:
        entry = next((u for u in settings.users if u.name == settings.auth_user), None)
        if entry is not None and entry.password_kind is not PasswordKind.PLAINTEXT:
            raise ConfigError(
                "auth_user",
                f"{settings.auth_user!r} needs its plain password in users (the proxy logs in "
                "to Postgres as it to run auth_query), or no entry there (trust, cert)",
            )
    if bool(settings.server_tls_cert_file) != bool(settings.server_tls_key_file):
        raise ConfigError(
            "server_tls_key_file", "server_tls_cert_file and server_tls_key_file go together"
        )


def _config_error(exc: ValidationError, config_file: Path | None) -> ConfigError:
    """The first error of a ValidationError as one short line naming the setting."""
    error = exc.errors(include_url=False)[0]
    loc = error["loc"]
    if not loc:
        return ConfigError("config", _reason(error))
    setting = str(loc[0])
    if error["type"] == "extra_forbidden" and len(loc) == 1:
        where = f" in {config_file}" if config_file is not None else ""
        guess = difflib.get_close_matches(setting, Settings.model_fields, n=1)
        hint = f"; did you mean {guess[0]}?" if guess else ""
        return ConfigError(setting, f"unknown setting{where}{hint}")
    path = ".".join(str(part) for part in loc[1:])
    reason = _reason(error)
    return ConfigError(setting, f"{path} {reason}" if path else reason)


def _reason(error: ErrorDetails) -> str:
    """A short human reason. Only numbers and choices echo the input: others may be secrets."""
    ctx = error.get("ctx", {})
    got = error["input"]
    match error["type"]:
        case "greater_than_equal":
            return f"must be at least {_number(ctx['ge'])}, got {got}"
        case "greater_than":
            return f"must be greater than {_number(ctx['gt'])}, got {got}"
        case "less_than_equal":
            return f"must be at most {_number(ctx['le'])}, got {got}"
        case "int_parsing" | "int_type" | "int_from_float":
            return f"must be a whole number, got {got!r}"
        case "float_parsing" | "float_type":
            return f"must be a number of seconds, got {got!r}"
        case "finite_number":
            return "must be a finite number"
        case "enum":
            return f"must be one of {ctx['expected']}, got {got!r}"
        case "string_too_short":
            return "must not be empty"
        case "string_type":
            return "must be a string"
        case "extra_forbidden":
            return "is not a known key"
        case "value_error":
            return str(ctx["error"])
        case _:
            message = error["msg"]
            return message[:1].lower() + message[1:]


def _number(bound: object) -> str:
    """`0` rather than `0.0` for a float field's whole-number bound."""
    return f"{bound:g}" if isinstance(bound, float) else str(bound)
