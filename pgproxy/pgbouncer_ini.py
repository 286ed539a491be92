"""PgBouncer's pgbouncer.ini and auth_file, read and turned into pgproxy's settings.

Rules of this file:

* Reading only: the ini file, the files it `%include`s and its `auth_file` are the only I/O.
  Nothing here logs, prints or starts anything. `convert` returns raw setting values for
  `pgproxy.config.load_settings(flags=...)`, which validates them as it validates any source.
* Nothing is dropped silently. Every key is mapped, or named in one warning with the
  `file:line` it came from (values are never echoed: they may be passwords).
* A [pgbouncer] key named like a pgproxy setting maps as is, looked up in
  `Settings.model_fields` at run time, so a setting added to pgproxy later maps with no change
  here. The same goes for the keys of a [databases] line (`DatabaseEntry`) and of a [users]
  line (`UserSettings`). Everything else is a rename, a derivation or a warning, below.
* A file that relies on PgBouncer's defaults behaves the same: where PgBouncer's default
  differs from pgproxy's (pool_mode, max_client_conn, auth_type), it is written out.
* Relative paths (`%include`, `auth_file`, the `*_file` settings) are read from the directory
  of the file that names them, so the result does not depend on the working directory.
* Bad input (a missing file, a syntax error, an include cycle, an unknown auth_type) raises
  `ConfigError` naming the setting and the `file:line`.
"""

import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from pgproxy.config import (
    AuthType,
    DatabaseEntry,
    PasswordKind,
    PoolMode,
    Settings,
    UserEntry,
    UserSettings,
)
from pgproxy.errors import ConfigError

# The name under which problems with the file itself are reported (its command-line flag).
SETTING = "pgbouncer_config"
# Deep enough for any real layout; a deeper chain is a mistake, not a configuration.
MAX_INCLUDE_DEPTH = 10
# PgBouncer's defaults where they differ from pgproxy's (pgproxy: transaction, 10000, TCP only,
# its own lookup function). Written out, for the settings pgproxy has, so that a file relying
# on them keeps its behaviour; auth_query's only when auth_user is set.
PGBOUNCER_DEFAULTS = {
    "pool_mode": "session",
    "max_client_conn": "100",
    "unix_socket_dir": "/tmp",  # noqa: S108 - PgBouncer's socket directory, not a temporary file
}
PGBOUNCER_AUTH_QUERY = (
    "SELECT rolname, CASE WHEN rolvaliduntil < now() THEN NULL ELSE rolpassword END "
    "FROM pg_authid WHERE rolname=$1 AND rolcanlogin"
)
DEFAULT_AUTH_TYPE = "md5"  # PgBouncer's; pgproxy's is scram-sha-256
DEFAULT_LISTEN_PORT = "6432"
DEFAULT_SERVER_PORT = "5432"
# Where a database without a TCP host (PgBouncer: the Unix socket) is reached instead.
LOCAL_HOST = "127.0.0.1"

# pgproxy settings that the converter builds from the file's structure, never from a key.
_DERIVED = frozenset({"listen", "server", "users", "databases", "user_settings"})
# [pgbouncer] keys with a rule of their own in `_Converter`.
_SPECIAL = frozenset({"listen_addr", "listen_port", "auth_type", "auth_file", "pool_mode"})
# Every auth_type PgBouncer knows; pgproxy's own ones (AuthType) map as they are.
_PGBOUNCER_AUTH_TYPES = frozenset(
    {"cert", "md5", "scram-sha-256", "plain", "trust", "any", "hba", "ldap", "pam"}
)

_NO_UNIX = "pgproxy accepts TCP connections only"
_NO_LOGFILE = "pgproxy logs to stderr, for the process manager to keep"
_NO_AUTH_QUERY = "users not in auth_file cannot log in"
_NO_RESERVE = "no reserve pool; raise pool_size instead"
_NO_DNS = "host names are resolved by the system resolver at each connection"
_NO_TCP = "the system's TCP defaults apply"
_NO_CIPHERS = "pgproxy has no such TLS option"

# Why a PgBouncer key has no pgproxy equivalent, and what to use instead, when known.
_GENERAL_HINTS = {
    "logfile": _NO_LOGFILE,
    "syslog": _NO_LOGFILE,
    "syslog_ident": _NO_LOGFILE,
    "syslog_facility": _NO_LOGFILE,
    "pidfile": "pgproxy runs in the foreground; the process manager knows its pid",
    "unix_socket_dir": _NO_UNIX,
    "unix_socket_mode": _NO_UNIX,
    "unix_socket_group": _NO_UNIX,
    "user": "start pgproxy as that user from the process manager (systemd: User=)",
    "reserve_pool_size": _NO_RESERVE,
    "reserve_pool_timeout": _NO_RESERVE,
    "max_db_connections": "no per-database limit; pool_size bounds each (database, user) pool",
    "max_db_client_connections": "no per-database limit; max_client_conn bounds all clients",
    "max_user_connections": "no per-user limit; pool_size bounds each (database, user) pool",
    "max_user_client_connections": "no per-user limit; max_client_conn bounds all clients",
    "server_round_robin": "idle servers are reused most recently used first",
    "track_extra_parameters": "not needed: startup parameters and plain SETs follow the client",
    "ignore_startup_parameters": (
        "not needed: pgproxy applies every startup parameter on the server, as a direct "
        "connection would"
    ),
    "peer_id": "no peering; --workers forwards cancel requests among its own processes",
    "so_reuseport": "workers = N (--workers N) runs N processes on one port",
    "auth_hba_file": "no HBA file; auth_type applies to every client",
    "auth_ident_file": "no ident maps",
    "auth_user": _NO_AUTH_QUERY,
    "auth_query": _NO_AUTH_QUERY,
    "auth_dbname": _NO_AUTH_QUERY,
    "auth_ldap_options": "no LDAP",
    "scram_iterations": "plain passwords become SCRAM secrets with 4096 iterations",
    "stats_period": "statistics are live: SHOW STATS and /metrics",
    "log_stats": "read statistics from SHOW STATS or /metrics",
    "server_reset_query_always": "server_reset_query runs in session mode only",
    "server_check_query": "no liveness query before a server connection is reused",
    "server_check_delay": "no liveness query before a server connection is reused",
    "dns_max_ttl": _NO_DNS,
    "dns_nxdomain_ttl": _NO_DNS,
    "dns_zone_check_period": _NO_DNS,
    "resolv_conf": _NO_DNS,
    "tcp_defer_accept": _NO_TCP,
    "tcp_socket_buffer": _NO_TCP,
    "listen_backlog": "pgproxy's backlog is 4096",
    "client_tls_protocols": _NO_CIPHERS,
    "client_tls_ciphers": _NO_CIPHERS,
    "client_tls13_ciphers": _NO_CIPHERS,
    "client_tls_ecdhcurve": _NO_CIPHERS,
    "client_tls_dheparams": _NO_CIPHERS,
    "server_tls_protocols": _NO_CIPHERS,
    "server_tls_ciphers": _NO_CIPHERS,
    "server_tls13_ciphers": _NO_CIPHERS,
}
_PER_DATABASE_HINTS = {
    "min_pool_size": "min_pool_size is global in pgproxy",
    "server_lifetime": "server_lifetime is global in pgproxy",
    "reserve_pool_size": _NO_RESERVE,
    "reserve_pool": _NO_RESERVE,
    "max_db_connections": "no per-database limit; pool_size bounds each (database, user) pool",
    "max_db_client_connections": "no per-database limit; max_client_conn bounds all clients",
    "connect_query": "no query is run on new server connections",
    "client_encoding": "each client's own setting applies",
    "datestyle": "each client's own setting applies",
    "timezone": "each client's own setting applies",
    "auth_user": "the global auth_user, auth_query and auth_dbname apply",
    "auth_query": "the global auth_user, auth_query and auth_dbname apply",
    "auth_dbname": "the global auth_user, auth_query and auth_dbname apply",
    "load_balance_hosts": "one host per database",
    "target_session_attrs": "any server is accepted",
}
_PER_USER_HINTS = {
    "reserve_pool_size": _NO_RESERVE,
    "max_user_connections": "no per-user limit; pool_size bounds each (database, user) pool",
    "max_user_client_connections": "no per-user limit; max_client_conn bounds all clients",
}

# A connection-string key (PgBouncer's [databases] and [users] values), then `=`.
_CONNSTRING_KEY = re.compile(r"([A-Za-z0-9_.-]+)[ \t]*=[ \t]*")
_BARE_VALUE = re.compile(r"[^\s]*")
_INI_KEY = re.compile(r"[^\s=]*")


@dataclass(frozen=True, slots=True)
class Location:
    """A line of a file, as warnings and errors name it."""

    path: Path
    line: int

    def __str__(self) -> str:
        return f"{self.path}:{self.line}"


@dataclass(frozen=True, slots=True)
class IniEntry:
    """One `key = value` line, in the section it belongs to."""

    section: str
    key: str
    value: str
    where: Location


@dataclass(frozen=True, slots=True)
class AuthEntry:
    """One line of an auth_file: a user and the password or secret stored for it."""

    name: str
    secret: str = field(repr=False)
    where: Location


@dataclass(frozen=True, slots=True)
class Conversion:
    """What a pgbouncer.ini becomes."""

    # Raw values for `load_settings(flags=...)`, keyed by pgproxy setting name.
    settings: dict[str, object]
    # One line per key pgproxy does not support (or maps with a difference), with file:line.
    warnings: tuple[str, ...]
    # Where each setting came from (`file:line`), to point a validation error at the file.
    origins: dict[str, str]


# --- the ini syntax ---------------------------------------------------------------------------


def parse_ini(path: Path) -> list[IniEntry]:
    """Every `key = value` line of `path` and of the files it includes, in reading order.

    `;` and `#` start a comment only at the beginning of a line (as in PgBouncer), so a value
    may contain them. A section opened in an included file continues after the include.
    """
    entries: list[IniEntry] = []
    _read_ini(path, entries, None, (), None)
    return entries


def _read_ini(
    path: Path,
    entries: list[IniEntry],
    section: str | None,
    stack: tuple[Path, ...],
    included_at: Location | None,
) -> str | None:
    """Read one file into `entries`; returns the section open at its end."""
    text = _read_text(path, SETTING, included_at)
    here_resolved = path.resolve()
    for number, raw in enumerate(text.splitlines(), start=1):
        where = Location(path, number)
        line = raw.strip()
        if not line or line[0] in ";#":
            continue
        if line.startswith("%"):
            section = _include(line, where, entries, section, (*stack, here_resolved))
        elif line.startswith("["):
            close = line.find("]")
            if close < 0 or line[close + 1 :].strip() or not line[1:close].strip():
                raise ConfigError(SETTING, f"{where}: expected a section name as [name]")
            section = line[1:close].strip()
        else:
            key, value = _split_key_value(line, where)
            if section is None:
                raise ConfigError(SETTING, f"{where}: {key} comes before any [section]")
            entries.append(IniEntry(section, key, value, where))
    return section


def _include(
    line: str,
    where: Location,
    entries: list[IniEntry],
    section: str | None,
    stack: tuple[Path, ...],
) -> str | None:
    directive, _, argument = line.replace("\t", " ").partition(" ")
    argument = argument.strip()
    if directive != "%include":
        raise ConfigError(SETTING, f"{where}: unknown directive {directive} (only %include)")
    if not argument:
        raise ConfigError(SETTING, f"{where}: %include needs a file name")
    target = Path(argument)
    if not target.is_absolute():
        target = where.path.parent / target
    if target.resolve() in stack:
        raise ConfigError(SETTING, f"{where}: %include {argument} includes itself (a cycle)")
    if len(stack) > MAX_INCLUDE_DEPTH:  # the including files, the main one too
        raise ConfigError(
            SETTING, f"{where}: %include {argument}: more than {MAX_INCLUDE_DEPTH} levels deep"
        )
    return _read_ini(target, entries, section, stack, where)


def _split_key_value(line: str, where: Location) -> tuple[str, str]:
    """`key = value`; a key may be written in double quotes (`"my db" = ...`, `""` = `"`)."""
    if line.startswith('"'):
        quoted = _read_quoted(line, 0, '"')
        if quoted is None:
            raise ConfigError(SETTING, f"{where}: missing closing double quote")
        key, end = quoted
    else:
        match = _INI_KEY.match(line)
        assert match is not None  # matches the empty string at worst
        key, end = match.group(), match.end()
    rest = line[end:].lstrip()
    if not rest.startswith("=") or not key:
        raise ConfigError(SETTING, f"{where}: expected key = value")
    return key, rest[1:].strip()


def _read_quoted(text: str, start: int, quote_char: str) -> tuple[str, int] | None:
    """The quoted string opening at `start`, with a doubled quote read as one; None when it
    is not closed. Also returns where it ends (just after the closing quote)."""
    out: list[str] = []
    pos = start + 1
    while pos < len(text):
        char = text[pos]
        if char == quote_char:
            if text.startswith(quote_char, pos + 1):
                out.append(quote_char)
                pos += 2
                continue
            return "".join(out), pos + 1
        out.append(char)
        pos += 1
    return None


def parse_connstring(text: str, where: Location, setting: str) -> dict[str, str]:
    """A [databases] or [users] value: `key=value ...`; a value may be in single quotes
    (`''` or `\\'` for a quote). Keys are case-insensitive; a later one wins."""
    fields: dict[str, str] = {}
    pos = 0
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos >= len(text):
            return fields
        match = _CONNSTRING_KEY.match(text, pos)
        if match is None:
            # Not echoed: the rest of the line may hold a password.
            raise ConfigError(setting, f"{where}: expected key=value at character {pos + 1}")
        key = match.group(1).lower()
        pos = match.end()
        if text.startswith("'", pos):
            value, pos = _single_quoted(text, pos, where, setting)
        else:
            bare = _BARE_VALUE.match(text, pos)
            assert bare is not None  # matches the empty string at worst
            value, pos = bare.group(), bare.end()
        if pos < len(text) and not text[pos].isspace():
            raise ConfigError(setting, f"{where}: {key}: junk after the closing quote")
        fields[key] = value


def _single_quoted(text: str, start: int, where: Location, setting: str) -> tuple[str, int]:
    out: list[str] = []
    pos = start + 1
    while pos < len(text):
        char = text[pos]
        if char == "\\" and pos + 1 < len(text):
            out.append(text[pos + 1])
            pos += 2
        elif char == "'" and text.startswith("'", pos + 1):
            out.append("'")
            pos += 2
        elif char == "'":
            return "".join(out), pos + 1
        else:
            out.append(char)
            pos += 1
    raise ConfigError(setting, f"{where}: missing closing single quote")


def parse_auth_file(path: Path, named_at: Location | None = None) -> list[AuthEntry]:
    """PgBouncer's auth_file: `"user" "password-or-secret"` per line, `""` for a quote
    inside a field; further fields are ignored, `;` and `#` lines are comments."""
    text = _read_text(path, "auth_file", named_at)
    entries: list[AuthEntry] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        where = Location(path, number)
        line = raw.strip()
        if not line or line[0] in ";#":
            continue
        fields: list[str] = []
        pos = 0
        while len(fields) < 2:
            quoted = _read_quoted(line, pos, '"') if line.startswith('"', pos) else None
            if quoted is None:
                raise ConfigError(
                    "auth_file", f'{where}: expected "user" "password" (each in double quotes)'
                )
            fields.append(quoted[0])
            pos = quoted[1]
            while pos < len(line) and line[pos] in " \t":
                pos += 1
        entries.append(AuthEntry(fields[0], fields[1], where))
    return entries


def _read_text(path: Path, setting: str, named_at: Location | None) -> str:
    prefix = f"{named_at}: " if named_at is not None else ""
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        problem = "no such file"
    except IsADirectoryError:
        problem = "not a file"
    except UnicodeDecodeError:
        problem = "not UTF-8 text"
    except OSError as exc:
        problem = exc.strerror or str(exc)
    raise ConfigError(setting, f"{prefix}{path}: {problem}")


# --- the mapping ------------------------------------------------------------------------------


def convert(path: Path) -> Conversion:
    """Read a pgbouncer.ini (and its includes and auth_file) as pgproxy settings."""
    return _Converter(path, parse_ini(path)).run()


def _format_address(host: str, port: str) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(slots=True)
class _Database:
    """A [databases] line on its way to a `databases` entry."""

    alias: str
    where: Location
    host: str
    port: str
    fields: dict[str, str]
    user: str | None = None
    password: str | None = field(default=None, repr=False)


class _Converter:
    """One conversion: the [pgbouncer] keys, auth_file, [databases], [users], in that order."""

    def __init__(self, path: Path, entries: list[IniEntry]) -> None:
        self.path = path
        self.settings: dict[str, object] = {}
        self.origins: dict[str, str] = {}
        self.warnings: list[str] = []
        # Later lines win, as in PgBouncer (an include may override what came before).
        self.general: dict[str, IniEntry] = {}
        self.databases: dict[str, IniEntry] = {}
        self.users: dict[str, IniEntry] = {}
        self.other: list[IniEntry] = []
        for entry in entries:
            section = entry.section.lower()
            if section == "pgbouncer":
                self.general[entry.key.lower()] = entry
            elif section == "databases":
                self.databases[entry.key] = entry
            elif section == "users":
                self.users[entry.key] = entry
            else:
                self.other.append(entry)
        self.auth_secrets: dict[str, str] = {}

    def run(self) -> Conversion:
        pool_mode = self._pool_mode()
        self._listen()
        auth_type, auth_entry = self._auth_type()
        self._general()
        self._auth_file(auth_type, auth_entry)
        self._databases(pool_mode)
        self._users(pool_mode)
        for entry in self.other:
            self._warn(
                entry.where,
                f"[{entry.section}] {entry.key}: pgproxy has no [{entry.section}] section; ignored",
            )
        return Conversion(dict(self.settings), tuple(self.warnings), dict(self.origins))

    # --- helpers

    def _warn(self, where: Location | Path, message: str) -> None:
        self.warnings.append(f"{where}: {message}")

    def _set(self, name: str, value: object, where: Location | Path) -> None:
        self.settings[name] = value
        self.origins[name] = str(where)

    def _unsupported(self, entry: IniEntry, what: str, hint: str | None) -> None:
        why = f"; {hint}" if hint else ""
        self._warn(entry.where, f"{what}: not supported by pgproxy, ignored{why}")

    # --- [pgbouncer]

    def _pool_mode(self) -> str:
        entry = self.general.get("pool_mode")
        if entry is None:
            self._set("pool_mode", PGBOUNCER_DEFAULTS["pool_mode"], self.path)
            return PGBOUNCER_DEFAULTS["pool_mode"]
        value = entry.value.strip().lower()
        if value == "statement" and value not in {mode.value for mode in PoolMode}:
            value = PoolMode.TRANSACTION.value
            self._warn(
                entry.where,
                "pool_mode = statement: not supported by pgproxy; using transaction, which "
                "also allows the multi-statement transactions that statement mode refuses",
            )
        self._set("pool_mode", value, entry.where)
        return value

    def _listen(self) -> None:
        """listen_addr + listen_port → listen (one address: pgproxy listens on one)."""
        addr_entry = self.general.get("listen_addr")
        port_entry = self.general.get("listen_port")
        port = port_entry.value.strip() if port_entry is not None else DEFAULT_LISTEN_PORT
        where: Location | Path = self.path
        hosts: list[str] = []
        if addr_entry is not None:
            where = addr_entry.where
            hosts = [host.strip() for host in addr_entry.value.split(",") if host.strip()]
        elif port_entry is not None:
            where = port_entry.where
        if not hosts:
            host = LOCAL_HOST
            self._warn(
                where,
                "listen_addr is not set: PgBouncer then accepts Unix-socket connections only, "
                f"pgproxy always listens on TCP too; listening on {LOCAL_HOST}",
            )
        elif "*" in hosts:
            host = "*"
        else:
            host = hosts[0]
            if len(hosts) > 1:
                self._warn(
                    where,
                    f"listen_addr: pgproxy listens on one address, {host}; "
                    f"{', '.join(hosts[1:])} ignored",
                )
        self._set("listen", _format_address(host, port), where)

    def _auth_type(self) -> tuple[str, IniEntry | None]:
        entry = self.general.get("auth_type")
        if entry is None:
            self._set("auth_type", DEFAULT_AUTH_TYPE, self.path)
            return DEFAULT_AUTH_TYPE, None
        value = entry.value.strip().lower()
        ours = {kind.value for kind in AuthType}
        if value in ours:
            chosen = value
        elif value not in _PGBOUNCER_AUTH_TYPES:
            known = ", ".join(sorted(_PGBOUNCER_AUTH_TYPES))
            raise ConfigError("auth_type", f"{entry.where}: unknown value {value!r} ({known})")
        elif value == "plain":
            chosen = AuthType.MD5.value
            self._warn(
                entry.where,
                "auth_type = plain (passwords sent in clear text) is not supported by pgproxy; "
                "using md5, which checks the same passwords",
            )
        elif value == "cert" and self._verifies_client_names():
            chosen = AuthType.TRUST.value
            self._warn(
                entry.where,
                "auth_type = cert: using trust with client_tls_sslmode = verify-full, which "
                "refuses a client without a certificate naming its user, as cert does",
            )
        elif value == "any":
            chosen = AuthType.TRUST.value
            self._warn(
                entry.where,
                "auth_type = any is not supported by pgproxy; using trust (no password, but "
                "the user name is kept)",
            )
        else:
            chosen = AuthType.SCRAM_SHA_256.value
            self._warn(
                entry.where,
                f"auth_type = {value} is not supported by pgproxy; using scram-sha-256: users "
                "log in with their auth_file password, and users without one cannot log in",
            )
        self._set("auth_type", chosen, entry.where)
        return chosen, entry

    def _verifies_client_names(self) -> bool:
        """Whether clients must show a certificate whose CN is their user name (pgproxy's
        client_tls_sslmode = verify-full): then trust is PgBouncer's cert."""
        entry = self.general.get("client_tls_sslmode")
        return (
            "client_tls_sslmode" in Settings.model_fields
            and entry is not None
            and entry.value.strip().lower() == "verify-full"
        )

    def _general(self) -> None:
        """Keys named like a pgproxy setting map as they are; the others are warned about."""
        ours = Settings.model_fields
        for name, default in PGBOUNCER_DEFAULTS.items():
            if name in ours and name not in self.settings and name not in self.general:
                self._set(name, default, self.path)
        auth_user = self.general.get("auth_user")
        if auth_user is not None and auth_user.value.strip() and "auth_query" in ours:
            if "auth_query" not in self.general:
                self._set("auth_query", PGBOUNCER_AUTH_QUERY, self.path)
            if "auth_dbname" not in self.general:
                self._warn(
                    auth_user.where,
                    "auth_user without auth_dbname: PgBouncer runs auth_query in the database "
                    "the client asks for, pgproxy in auth_dbname (default postgres); set "
                    "auth_dbname to the database that has what auth_query reads",
                )
        for key, entry in self.general.items():
            if key in _SPECIAL:
                continue
            if key in _DERIVED:
                self._warn(
                    entry.where,
                    f"{key}: pgproxy builds this setting from the file itself; give it as a "
                    "flag or a PGPROXY_ variable instead; ignored",
                )
            elif key == "server_lifetime" and _is_zero(entry.value):
                self._warn(
                    entry.where,
                    "server_lifetime = 0 (use each server connection once) is not supported by "
                    "pgproxy, where 0 means never; pgproxy's default applies",
                )
            elif key in ours:
                value = entry.value
                if key.endswith("_file") and value and not Path(value).is_absolute():
                    value = str(entry.where.path.parent / value)
                self._set(key, value, entry.where)
            elif key == "verbose":
                self._verbose(entry)
            else:
                self._unsupported(entry, key, _GENERAL_HINTS.get(key))

    def _verbose(self, entry: IniEntry) -> None:
        try:
            level = int(entry.value.strip() or "0")
        except ValueError:
            raise ConfigError("verbose", f"{entry.where}: must be a whole number") from None
        if level > 0 and "log_level" not in self.general:
            self._set("log_level", "debug", entry.where)

    # --- auth_file → users

    def _auth_file(self, auth_type: str, auth_entry: IniEntry | None) -> None:
        entry = self.general.get("auth_file")
        if entry is None or not entry.value.strip():
            if auth_type != AuthType.TRUST.value and not self.settings.get("auth_user"):
                self._warn(
                    entry.where if entry else self.path, "auth_file is not set: no user can log in"
                )
            return
        path = Path(entry.value.strip())
        if not path.is_absolute():
            path = entry.where.path.parent / path
        secrets: dict[str, tuple[str, Location]] = {}
        for user in parse_auth_file(path, entry.where):
            if user.name in secrets:
                self._warn(user.where, f"user {user.name!r} is listed again; this line wins")
            if not user.secret:
                self._warn(
                    user.where,
                    f"user {user.name!r} has an empty password, which pgproxy does not accept; "
                    "left out",
                )
                secrets.pop(user.name, None)
                continue
            secrets[user.name] = (user.secret, user.where)
        kinds = {
            name: UserEntry.model_construct(name=name, password=secret).password_kind
            for name, (secret, _) in secrets.items()
        }
        has_md5 = PasswordKind.MD5 in kinds.values()
        if auth_type == AuthType.MD5.value and PasswordKind.SCRAM_SHA_256 in kinds.values():
            if not has_md5:
                # PgBouncer answers an md5 login with SCRAM for a user with a SCRAM secret;
                # pgproxy asks every user the same way, and SCRAM serves all these users.
                auth_type = AuthType.SCRAM_SHA_256.value
                self._set("auth_type", auth_type, auth_entry.where if auth_entry else path)
                self._warn(
                    auth_entry.where if auth_entry else path,
                    "auth_type = md5 with SCRAM secrets in auth_file: PgBouncer switches those "
                    "users to SCRAM, pgproxy asks every user the same way; using scram-sha-256 "
                    "(every auth_file user has a plain password or a SCRAM secret)",
                )
            else:
                for name, kind in kinds.items():
                    if kind is PasswordKind.SCRAM_SHA_256:
                        self._warn(
                            secrets[name][1],
                            f"user {name!r} has a SCRAM secret, which cannot answer "
                            "auth_type = md5 in pgproxy (PgBouncer switches the user to SCRAM); "
                            "this user cannot log in",
                        )
        users: dict[str, str] = {}
        for name, (secret, where) in secrets.items():
            if kinds[name] is PasswordKind.MD5 and auth_type == AuthType.SCRAM_SHA_256.value:
                self._warn(
                    where,
                    f"user {name!r} has an md5 secret, which cannot answer scram-sha-256 "
                    "(PgBouncer cannot log it in either); left out",
                )
                continue
            users[name] = secret
        self.auth_secrets = users
        self._set("users", users, path)

    # --- [databases] → databases, server

    def _databases(self, pool_mode: str) -> None:
        if not self.databases:
            self._warn(
                self.path,
                "[databases] is empty: pgproxy passes every database name through to server "
                "(127.0.0.1:5432) as it is",
            )
            return
        parsed = [
            self._database(alias, entry, pool_mode) for alias, entry in self.databases.items()
        ]
        fallback = next((db for db in parsed if db.alias == "*"), None)
        listed = [db for db in parsed if db.alias != "*"]
        addresses = [(db.host, db.port) for db in parsed]
        if fallback is not None:
            server = (fallback.host, fallback.port)
            server_where = fallback.where
        else:
            # Several servers: the first one is `server` (the monitor and /readyz use it).
            server = addresses[0]
            server_where = parsed[0].where
        user, password = self._forced_user(parsed)
        dbname = fallback.fields.pop("dbname", None) if fallback is not None else None
        if fallback is not None:
            for key in fallback.fields:
                self._warn(
                    fallback.where,
                    f"* {key}: pgproxy has no per-database settings for databases that are not "
                    "listed (the global setting applies); ignored",
                )
            if dbname is None and listed:
                self._warn(
                    fallback.where,
                    "* without dbname: pgproxy passes unlisted database names through only "
                    "when no databases are listed; with these, other names get 3D000 "
                    "(database does not exist)",
                )
        self._set("server", _server_text(*server, user, password, dbname), server_where)
        entries: dict[str, dict[str, str]] = {}
        for db in listed:
            fields = dict(db.fields)
            if (db.host, db.port) != server:
                fields["host"] = db.host
                fields["port"] = db.port
            entries[db.alias] = fields
        if entries:
            self._set("databases", entries, listed[0].where)

    def _database(self, alias: str, entry: IniEntry, pool_mode: str) -> _Database:
        where = entry.where
        fields = parse_connstring(entry.value, where, "databases")
        host = fields.pop("host", "").strip()
        port = fields.pop("port", DEFAULT_SERVER_PORT).strip() or DEFAULT_SERVER_PORT
        if not host:
            self._warn(
                where,
                f"{alias}: no host: PgBouncer connects over its Unix socket, pgproxy connects to "
                f"{LOCAL_HOST} over TCP",
            )
            host = LOCAL_HOST
        elif host.startswith(("/", "@")):
            self._warn(
                where,
                f"{alias}: host={host} is a Unix socket, which pgproxy does not support; "
                f"connecting to {LOCAL_HOST} over TCP instead",
            )
            host = LOCAL_HOST
        elif "," in host:
            hosts = [part.strip() for part in host.split(",") if part.strip()]
            host = hosts[0]
            self._warn(
                where,
                f"{alias}: host lists several servers; pgproxy connects to the first one, "
                f"{host}, only (PgBouncer takes them in turn)",
            )
        db = _Database(alias, where, host, port, {})
        ours = DatabaseEntry.model_fields
        for key, value in fields.items():
            if key in ours:
                if key == "query_wait_timeout" and value.strip() == "-1":
                    continue  # PgBouncer's "not set"
                db.fields[key] = value
            elif key == "user":
                db.user = value
            elif key == "password":
                db.password = value
            elif key == "pool_mode":
                self._per_pool_mode(where, alias, value, pool_mode)
            else:
                hint = _PER_DATABASE_HINTS.get(key)
                self._unsupported(entry, f"{alias}: {key}", hint)
        if db.password is not None and db.user is None:
            self._warn(where, f"{alias}: password without user; ignored")
            db.password = None
        return db

    def _per_pool_mode(self, where: Location, owner: str, value: str, pool_mode: str) -> None:
        value = value.strip().lower()
        if value != pool_mode:
            self._warn(
                where,
                f"{owner}: pool_mode={value}: pgproxy has one pool_mode for every pool; "
                f"{pool_mode} applies",
            )

    def _forced_user(self, parsed: list[_Database]) -> tuple[str | None, str | None]:
        """`user=` on every database, the same: pgproxy's server URL user. Else a warning each."""
        forced = [db for db in parsed if db.user is not None]
        if not forced:
            return None, None
        logins = {(db.user, db.password) for db in parsed}
        if len(forced) < len(parsed) or len(logins) > 1:
            for db in forced:
                self._warn(
                    db.where,
                    f"{db.alias}: user= (one server login for this database) is supported only "
                    "when every database has the same one; its clients log in to the server as "
                    "themselves",
                )
            return None, None
        db = forced[0]
        user = db.user
        assert user is not None
        password = db.password
        self._warn(
            db.where,
            f"user={user} on every database: pgproxy logs in to the server as {user}, but keeps "
            "a pool per client user (PgBouncer: one per database), so pool_size applies to each",
        )
        if password is None:
            secret = self.auth_secrets.get(user)
            kind = (
                UserEntry.model_construct(name=user, password=secret).password_kind
                if secret is not None
                else None
            )
            if kind is PasswordKind.PLAINTEXT:
                password = secret
            else:
                self._warn(
                    db.where,
                    f"user={user}: pgproxy needs this user's plain-text password to log in as it "
                    "and auth_file has none; server logins may fail",
                )
        return user, password

    # --- [users] → user_settings

    def _users(self, pool_mode: str) -> None:
        ours = UserSettings.model_fields
        entries: dict[str, dict[str, str]] = {}
        for name, entry in self.users.items():
            fields: dict[str, str] = {}
            for key, value in parse_connstring(entry.value, entry.where, "user_settings").items():
                if key in ours:
                    if key == "query_wait_timeout" and value.strip() == "-1":
                        continue  # PgBouncer's "not set"
                    fields[key] = value
                elif key == "pool_mode":
                    self._per_pool_mode(entry.where, name, value, pool_mode)
                else:
                    self._unsupported(entry, f"{name}: {key}", _PER_USER_HINTS.get(key))
            if fields:
                entries[name] = fields
        if entries:
            first = next(iter(self.users.values()))
            self._set("user_settings", entries, first.where)


def _is_zero(text: str) -> bool:
    try:
        return float(text) == 0
    except ValueError:
        return False


def _server_text(
    host: str, port: str, user: str | None, password: str | None, dbname: str | None
) -> str:
    """`server` as `host:port`, or a postgresql:// URL when there is a user or a database."""
    if user is None and dbname is None:
        return _format_address(host, port)
    login = ""
    if user is not None:
        login = quote(user, safe="")
        if password is not None:
            login += ":" + quote(password, safe="")
        login += "@"
    path = "/" + quote(dbname, safe="") if dbname is not None else ""
    return f"postgresql://{login}{_format_address(host, port)}{path}"
