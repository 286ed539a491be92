"""Session settings that follow a client from server connection to server connection.

A client's startup values (client_encoding, DateStyle, ... and `-c` options) are kept as the
client's *wanted* settings; each server connection remembers what the proxy *applied* to it.
Before a client's first message runs on a server, the difference is applied with one query
(`build_prelude`). Pure: no I/O, no clock.
"""

from collections.abc import Mapping
from typing import Final

from pgproxy.errors import FeatureNotSupportedError

# Startup parameters that Postgres itself would apply to the session and a pooler must replay.
# The first six are reported back with ParameterStatus (GUC_REPORT); search_path is not, in 15.
TRACKED_STARTUP_PARAMS: Final = frozenset(
    {
        "client_encoding",
        "datestyle",
        "timezone",
        "intervalstyle",
        "standard_conforming_strings",
        "application_name",
        "search_path",
    }
)

# Canonical spelling, as the server reports it in ParameterStatus.
_CANONICAL: Final = {
    "datestyle": "DateStyle",
    "timezone": "TimeZone",
    "intervalstyle": "IntervalStyle",
}

# Startup keys that are not settings at all.
_NOT_SETTINGS: Final = frozenset({"user", "database", "replication", "options"})


def canonical_name(name: str) -> str:
    lower = name.lower()
    return _CANONICAL.get(lower, lower)


def is_valid_setting_name(name: str) -> bool:
    """GUC names are identifiers, optionally dotted (`myext.flag`); nothing else goes in SQL."""
    if not name or len(name) > 63:
        return False
    return all(part.isidentifier() and part.isascii() for part in name.split("."))


def parse_options(options: str) -> dict[str, str]:
    """Parse the startup `options` value: `-c name=value` and `--name=value`, backslash-escaped.

    Same syntax as the postgres command line (`pg_split_opts`): words split on whitespace,
    a backslash makes the next character literal.
    """
    words: list[str] = []
    current: list[str] = []
    escaped = False
    in_word = False
    for ch in options:
        if escaped:
            current.append(ch)
            escaped = False
            in_word = True
        elif ch == "\\":
            escaped = True
            in_word = True
        elif ch.isspace():
            if in_word:
                words.append("".join(current))
                current.clear()
                in_word = False
        else:
            current.append(ch)
            in_word = True
    if in_word:
        words.append("".join(current))

    settings: dict[str, str] = {}
    i = 0
    while i < len(words):
        word = words[i]
        if word == "-c" and i + 1 < len(words):
            pair = words[i + 1]
            i += 2
        elif (word.startswith("-c") and len(word) > 2) or (word.startswith("--") and "=" in word):
            pair = word[2:]
            i += 1
        else:
            raise FeatureNotSupportedError(
                f"unsupported startup option {word!r}: pgproxy accepts only -c name=value"
            )
        name, sep, value = pair.partition("=")
        if not sep:
            raise FeatureNotSupportedError(f"startup option {pair!r} has no value")
        name = name.replace("-", "_")
        if not is_valid_setting_name(name):
            raise FeatureNotSupportedError(f"invalid setting name {name!r} in startup options")
        settings[canonical_name(name)] = value
    return settings


def startup_settings(params: Mapping[str, str]) -> dict[str, str]:
    """The settings a client asked for in its StartupMessage, canonically named.

    Any other startup key is a setting too for Postgres (`-c` equivalent); it is replayed the
    same way, so that the client gets what a direct connection would give it.
    """
    settings: dict[str, str] = {}
    options = params.get("options")
    if options:
        settings.update(parse_options(options))
    for key, value in params.items():
        if key in _NOT_SETTINGS or key.startswith("_pq_."):
            continue
        if not is_valid_setting_name(key):
            raise FeatureNotSupportedError(f"invalid startup parameter name {key!r}")
        settings[canonical_name(key)] = value
    return settings


def quote_literal(value: str) -> str:
    # An E'' literal means the same whatever standard_conforming_strings is on the server.
    return "E'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def quote_name(name: str) -> str:
    """Quote each part of a (validated) setting name, so that no name reads as a keyword."""
    return ".".join('"' + part + '"' for part in name.split("."))


def build_prelude(wanted: Mapping[str, str], applied: Mapping[str, str]) -> str | None:
    """SQL that turns a server's `applied` settings into the client's `wanted` ones, or None.

    `set_config(name, value, false)` takes the value as the startup packet would (a list like
    search_path is not re-quoted); a setting the client does not want is RESET to the default.
    """
    if wanted == applied:
        return None
    calls = [
        f"pg_catalog.set_config({quote_literal(name)}, {quote_literal(value)}, false)"
        for name, value in wanted.items()
        if applied.get(name) != value
    ]
    resets = [f"RESET {quote_name(name)}" for name in applied if name not in wanted]
    if not calls and not resets:
        return None
    statements = []
    if calls:
        statements.append("SELECT " + ", ".join(calls))
    statements.extend(resets)
    return "; ".join(statements)
