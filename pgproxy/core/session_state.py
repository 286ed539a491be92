"""What a statement does to the session: state the pool cannot move, or settings it resets.

Cheap by design (no SQL parser): the first keywords of each statement of a Query or Parse,
and a look at the names given to `set_config()`. A statement that creates unmovable state pins
its client to its server connection until the client leaves (the server is then reset with
server_reset_query before anyone else gets it). A false positive only costs pooling; a false
negative would leak state, so the tests cover the forms drivers and ORMs send.

RESET, RESET ALL and DISCARD ALL return tracked settings to the *session default*, which for
a direct connection is the client's startup value; the proxy re-applies those values itself.
"""

import re
from dataclasses import dataclass
from typing import Final

from pgproxy.core.params import TRACKED_STARTUP_PARAMS, canonical_name, is_valid_setting_name

# Settings the server reports with ParameterStatus: a SET of them follows the client.
_REPORTED: Final = frozenset(p for p in TRACKED_STARTUP_PARAMS if p != "search_path")
# SET forms that name a setting with other words (SQL standard syntax).
_ALIASES: Final = {b"time": "timezone", b"names": "client_encoding"}

_STARTS: Final = frozenset(
    {
        b"SET",
        b"RESET",
        b"PREPARE",
        b"LISTEN",
        b"DECLARE",
        b"CREATE",
        b"LOAD",
        b"DISCARD",
        b"DEALLOCATE",
        b"CLOSE",
    }
)
# Per first byte of a statement: _PLAIN (nothing for the session), _KEYWORD (the first letter
# of a word in _STARTS) or _LEADING (white space or a comment may start here: strip first).
# Indexing bytes beats a set of boxed ints on every statement.
_PLAIN: Final = 0
_KEYWORD: Final = 1
_LEADING: Final = 2
_FIRST_BYTE: Final = bytes(
    [
        _KEYWORD
        if chr(c) in "SsRrPpLlDdCc"
        else _LEADING
        if chr(c) in " \t\n\r\x0b\x0c-/"
        else _PLAIN
        for c in range(256)
    ]
)
_E: Final = ord("e")
_L: Final = ord("l")
_SEMICOLON: Final = ord(";")


@dataclass(frozen=True, slots=True)
class SessionEffect:
    pin: str | None = None  # why the client must keep this server, if it must
    resets: frozenset[str] = frozenset()  # tracked settings returned to the session default
    reset_all: bool = False  # RESET ALL or DISCARD ALL
    deallocate_all: bool = False  # DISCARD ALL or DEALLOCATE ALL: every prepared statement goes
    # WITH HOLD cursors opened and cursors closed (names as Postgres folds them).
    hold_cursors: frozenset[bytes] = frozenset()
    closed_cursors: frozenset[bytes] = frozenset()
    close_all_cursors: bool = False  # CLOSE ALL (and DISCARD ALL)
    # A plain SET whose value is known: followed when it runs outside a transaction block
    # (then `pin` is only the fallback).
    sets: tuple[tuple[str, str], ...] = ()


_RESET_ALL: Final = SessionEffect(reset_all=True)
_DISCARD_ALL: Final = SessionEffect(reset_all=True, deallocate_all=True, close_all_cursors=True)
_DEALLOCATE_ALL: Final = SessionEffect(deallocate_all=True)


def _strip(sql: bytes) -> bytes:
    """Skip leading white space and comments."""
    while True:
        sql = sql.lstrip()
        if sql.startswith(b"--"):
            end = sql.find(b"\n")
            if end < 0:
                return b""
            sql = sql[end + 1 :]
        elif sql.startswith(b"/*"):
            end = sql.find(b"*/")
            if end < 0:
                return b""
            sql = sql[end + 2 :]
        else:
            return sql


_SET_VALUE: Final = re.compile(
    rb"""^\s*SET\s+(?:SESSION\s+)?(?:"[^"]+"|[\w.]+)\s*(?:=|\s[Tt][Oo]\s)\s*(.*?)[\s;\x00]*$""",
    re.IGNORECASE | re.DOTALL,
)
_LITERAL: Final = re.compile(rb"^'((?:[^']|'')*)'$", re.DOTALL)
_BARE_LIST: Final = re.compile(rb'^[\w.$"-]+(?:\s*,\s*[\w.$"-]+)*$')
_NOT_FOLLOWED: Final = frozenset({"role", "session_authorization"})


def _set_value(stmt: bytes) -> bytes | None:
    """The value a `SET name = value` gives, as set_config() takes it; None when unsure."""
    match = _SET_VALUE.match(stmt)
    if match is None:
        return None
    value = match.group(1)
    literal = _LITERAL.match(value)
    if literal is not None:
        return literal.group(1).replace(b"''", b"'")
    if _BARE_LIST.match(value):
        return value  # numbers, identifiers or lists of them: set_config reads them alike
    return None


def _set_or_reset(first: bytes, words: list[bytes], stmt: bytes) -> SessionEffect | None:
    rest = words[1:]
    if rest and rest[0].upper() in (b"LOCAL", b"TRANSACTION", b"CONSTRAINTS"):
        return None  # ends with the transaction
    if rest and rest[0].upper() == b"SESSION":
        rest = rest[1:]
        if rest and rest[0].upper() in (b"AUTHORIZATION", b"CHARACTERISTICS"):
            return SessionEffect(pin=f"SET SESSION {rest[0].upper().decode()}")
    if not rest:
        return SessionEffect(pin=first.decode())
    token = rest[0].split(b"=", 1)[0].strip(b'";').lower()
    if first == b"RESET" and token == b"all":
        return _RESET_ALL
    name = canonical_name(_ALIASES.get(token) or token.decode(errors="replace"))
    if name.lower() in _REPORTED:
        if first == b"RESET":
            return SessionEffect(resets=frozenset({name}))
        return None  # the server reports the new value: it follows the client
    if token == b"schema":
        name = "search_path"  # SET SCHEMA is SET search_path
    if name in _NOT_FOLLOWED or not is_valid_setting_name(name):
        return SessionEffect(pin=f"{first.decode()} {name}")
    if first == b"RESET":
        return SessionEffect(resets=frozenset({name}))
    value = _set_value(stmt)
    if value is None:
        return SessionEffect(pin=f"SET {name}")
    if value.upper() == b"DEFAULT":
        return SessionEffect(resets=frozenset({name}))
    text = value.decode(errors="replace")
    return SessionEffect(pin=f"SET {name}", sets=((name, text),))


def _statement_effect(stmt: bytes) -> SessionEffect | None:
    if not stmt:
        return None
    lead = _FIRST_BYTE[stmt[0]]
    if lead == _LEADING:
        stmt = _strip(stmt)
        if not stmt:
            return None
        lead = _FIRST_BYTE[stmt[0]]
    if lead != _KEYWORD:
        return None
    if len(stmt) >= 3 and (stmt[1] | 0x20) == _E and (stmt[2] | 0x20) == _L:
        return None  # SELECT, DELETE: the common case
    words = stmt[:160].rstrip(b"\x00; \t\r\n").split(None, 5)
    first = words[0].upper()
    if first not in _STARTS:
        return None
    if first in (b"SET", b"RESET"):
        return _set_or_reset(first, words, stmt)
    if first == b"DISCARD":
        return _DISCARD_ALL if len(words) > 1 and words[1].upper() == b"ALL" else None
    if first == b"DEALLOCATE":
        deallocated = [w.upper() for w in words[1:3]]  # DEALLOCATE [PREPARE] ALL
        return _DEALLOCATE_ALL if b"ALL" in deallocated else None
    if first == b"DECLARE":
        if len(words) < 2 or b"HOLD" not in stmt.upper():
            return None  # ends with its transaction
        return SessionEffect(hold_cursors=frozenset({_identifier(words[1])}))
    if first == b"CLOSE":
        if len(words) < 2:
            return None
        if words[1].upper() == b"ALL":
            return SessionEffect(close_all_cursors=True)
        return SessionEffect(closed_cursors=frozenset({_identifier(words[1])}))
    if first == b"CREATE":
        rest = b" ".join(words[1:5]).upper()  # CREATE [OR REPLACE] [GLOBAL|LOCAL] TEMP
        return SessionEffect(pin="CREATE TEMP") if b"TEMP" in rest else None
    return SessionEffect(pin=first.decode())  # PREPARE, LISTEN, LOAD


def _identifier(word: bytes) -> bytes:
    """A name as Postgres keeps it: quoted as written, unquoted folded to lower case."""
    if word.startswith(b'"') and word.endswith(b'"') and len(word) > 1:
        return word[1:-1].replace(b'""', b'"')
    return word.lower()


def _set_config_pins(sql: bytes) -> str | None:
    """set_config(name, ...) pins unless every name is a literal reported setting."""
    pos = sql.find(b"set_config")
    while pos >= 0:
        rest = sql[pos + len(b"set_config") :].lstrip()
        if not rest.startswith(b"("):
            return "set_config()"
        rest = rest[1:].lstrip()
        end = rest.find(b"'", 1)
        if not rest.startswith(b"'") or end < 0:
            return "set_config()"
        name = rest[1:end].decode(errors="replace").lower()
        if name not in _REPORTED:
            return f"set_config({name})"
        pos = sql.find(b"set_config", pos + 1)
    return None


def inspect(sql: bytes) -> SessionEffect | None:
    """What the SQL text of a Query or Parse does to the session; None for nothing."""
    # find(), not `in`: for bytes, `in` first tries the operand as an int and formats a
    # TypeError it then drops, on every statement.
    if sql.find(b"advisory_lock") >= 0:
        return SessionEffect(pin="session advisory lock")
    if sql.find(b"set_config") >= 0:
        reason = _set_config_pins(sql)
        if reason is not None:
            return SessionEffect(pin=reason)
    semicolon = sql.find(b";")
    if (
        semicolon < 0
        # A Query's text ends with ';' and the NUL terminator, most often: no strip().
        or (semicolon >= len(sql) - 2 and sql[-1] in (0, _SEMICOLON))
        or not sql[semicolon:].strip(b"; \t\r\n\x00")
    ):
        return _statement_effect(sql)  # one statement, perhaps with a trailing ';'
    effects = [e for e in map(_statement_effect, sql.split(b";")) if e is not None]
    if not effects:
        return None
    if len(effects) == 1 and not effects[0].sets:
        return effects[0]
    held: frozenset[bytes] = frozenset()
    closed: frozenset[bytes] = frozenset()
    for effect in effects:  # in order: a later CLOSE closes an earlier DECLARE
        if effect.close_all_cursors:
            held = frozenset()
        held = (held - effect.closed_cursors) | effect.hold_cursors
        closed = (closed | effect.closed_cursors) - effect.hold_cursors
    return SessionEffect(  # several statements: a SET among them pins (no `sets`)
        pin=next((e.pin for e in effects if e.pin is not None), None),
        resets=frozenset().union(*[e.resets for e in effects]),
        reset_all=any(e.reset_all for e in effects),
        deallocate_all=any(e.deallocate_all for e in effects),
        hold_cursors=held,
        closed_cursors=closed,
        close_all_cursors=any(e.close_all_cursors for e in effects),
    )


def pins_session(sql: bytes) -> str | None:
    """Why this SQL leaves unmovable state on the server, or None."""
    effect = inspect(sql)
    return effect.pin if effect is not None else None
