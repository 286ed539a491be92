"""Recognise SQL that leaves state on a server connection that the pool cannot move.

Cheap by design (no SQL parser): the first keywords of each statement of a Query or Parse,
and a substring test for the functions that create session state. A statement that matches
pins its client to its server connection until the client leaves; the server is then reset
(server_reset_query) before anyone else gets it. A false positive only costs pooling; a false
negative would leak state, so the tests cover the forms drivers and ORMs send.
"""

from pgproxy.core.params import TRACKED_STARTUP_PARAMS

# Reported parameters: the server tells us their new value, so they follow the client.
_FOLLOWED = frozenset(
    p.encode() for p in TRACKED_STARTUP_PARAMS if p not in ("search_path",)
) | frozenset({b"names"})  # SET NAMES is client_encoding

_STARTS = (b"SET", b"RESET", b"PREPARE", b"LISTEN", b"DECLARE", b"CREATE", b"LOAD", b"DISCARD")
_FIRST_LETTERS = frozenset(b"SsRrPpLlDdCc")


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


def _statement_pins(stmt: bytes) -> str | None:
    if stmt[:1].isspace() or stmt[:2] in (b"--", b"/*"):
        stmt = _strip(stmt)
    if not stmt or stmt[0] not in _FIRST_LETTERS:
        return None
    if stmt[1:3] in (b"EL", b"el", b"El", b"eL"):
        return None  # SELECT, the common case
    words = stmt[:160].split(None, 5)
    first = words[0].upper()
    if first not in _STARTS:
        return None
    second = words[1].upper() if len(words) > 1 else b""
    if first == b"SET" or first == b"RESET":
        if second in (b"LOCAL", b"TRANSACTION", b"CONSTRAINTS"):
            return None  # ends with the transaction
        name = words[2] if second == b"SESSION" and len(words) > 2 else words[1]
        name = name.split(b"=", 1)[0].strip(b'"').lower()
        if second == b"SESSION" and name.upper() == b"CHARACTERISTICS":
            return "SET SESSION CHARACTERISTICS"
        if name in _FOLLOWED:
            return None
        return f"{first.decode()} {name.decode(errors='replace')}"
    if first == b"DECLARE":
        return "DECLARE ... WITH HOLD" if b"HOLD" in stmt.upper() else None
    if first == b"CREATE":
        rest = b" ".join(words[1:5]).upper()  # CREATE [OR REPLACE] [GLOBAL|LOCAL] TEMP
        return "CREATE TEMP" if b"TEMP" in rest else None
    if first == b"DISCARD":
        return None
    return first.decode()  # PREPARE, LISTEN, LOAD


def pins_session(sql: bytes) -> str | None:
    """Why this SQL text leaves unmovable state on the server, or None."""
    if b"advisory_lock" in sql:
        return "session advisory lock"
    if b"set_config" in sql:
        return "set_config()"
    semicolon = sql.find(b";")
    if semicolon < 0 or not sql[semicolon:].strip(b"; \t\r\n\x00"):
        return _statement_pins(sql)  # one statement, perhaps with a trailing ';'
    for stmt in sql.split(b";"):
        reason = _statement_pins(stmt)
        if reason is not None:
            return reason
    return None
