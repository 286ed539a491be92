"""`ClientState`: a client session after login: idle → waiting → active, and what it sent.

The shell feeds client bytes here; this decides whether a server is needed and keeps what must
go to the server once one is linked. No I/O, no clock (times are arguments).
"""

from dataclasses import dataclass, field
from enum import Enum
from typing import Final

from pgproxy.core.prepared import ClientStatements, Rewriter
from pgproxy.core.server import FRONTEND_VALID, FRONTEND_WATCHED, ClientView
from pgproxy.errors import ProtocolError
from pgproxy.wire.codes import FrontendCode
from pgproxy.wire.scanner import MessageScanner

# Final: compiled, C constants instead of a module lookup and an enum compare per use.
_PARSE: Final[int] = FrontendCode.PARSE
_QUERY: Final[int] = FrontendCode.QUERY
_BIND: Final[int] = FrontendCode.BIND
_DESCRIBE: Final[int] = FrontendCode.DESCRIBE
_TERMINATE: Final[int] = FrontendCode.TERMINATE

# Unnamed Parse bodies up to this size are kept for replay (the scanner keeps 1 MiB).
REPLAY_LIMIT: Final = 1 << 20
# Bytes of the last statement kept for reports (they show much less).
STATEMENT_KEEP: Final = 1024


def uses_unnamed_statement_first(msgs: list[tuple[int, bytes, int]]) -> bool:
    """Do these messages Bind or Describe the unnamed statement before parsing their own?"""
    for code, body, _end in msgs:
        if code == _PARSE:
            if body[:1] == b"\x00":
                return False
        elif code == _QUERY:
            return False
        elif code == _BIND:
            portal_end = body.find(b"\x00")
            if body[portal_end + 1 : portal_end + 2] == b"\x00":
                return True
        elif code == _DESCRIBE and body[:2] == b"S\x00":
            return True
    return False


class ClientPhase(Enum):
    IDLE = "idle"  # logged in, no server
    WAITING = "waiting"  # has sent something, waits for a server
    ACTIVE = "active"  # linked to a server


@dataclass(slots=True)
class ClientState:
    id: int
    user: str
    database: str
    connected_at: float
    view: ClientView
    phase: ClientPhase = ClientPhase.IDLE
    # When the current wait for a server began.
    waiting_since: float = 0.0
    # Bytes received while no server was linked, in order, and their watched messages.
    pending: list[bytes] = field(default_factory=list)
    pending_msgs: list[tuple[int, bytes, int]] = field(default_factory=list)
    # Terminate received: nothing after it is read.
    terminated: bool = False
    # Part of a Terminate already went to the server (it was split across reads).
    torn: bool = False
    # Body of the client's latest Parse of the unnamed statement (None: none, or destroyed by
    # a simple Query). Drivers parse in one round trip and bind in the next (pg8000, asyncpg),
    # and a transaction-mode client may get another server in between.
    last_unnamed_parse: bytes | None = None
    # The client has defined a named prepared statement (protocol level).
    uses_named: bool = False
    # While a link maps statement names, the rewriter of its messages.
    rewriter: Rewriter | None = None
    # The body of the client's latest Query, Parse or Bind and its code, for leak reports
    # (kept only with `track_statements`: the text may be private).
    track_statements: bool = True
    last_statement: bytes | None = None
    last_statement_code: int = 0
    scanner: MessageScanner = field(
        default_factory=lambda: MessageScanner(FRONTEND_WATCHED, valid=FRONTEND_VALID)
    )

    def feed(self, data: bytes) -> tuple[bytes, list[tuple[int, bytes, int]]]:
        """Scan client bytes; return what may go to a server and its watched messages.

        A Terminate ends the session: it and anything after it are dropped (the server
        connection is the pool's, not the client's, so the proxy never forwards Terminate).
        """
        msgs = self.scanner.feed(data)
        if msgs:
            track = self.track_statements
            for i, (code, body, end) in enumerate(msgs):
                if code == _PARSE:
                    if body[:1] == b"\x00":
                        # A body cut at the scanner's keep limit cannot be replayed.
                        self.last_unnamed_parse = body if len(body) < REPLAY_LIMIT else None
                    else:
                        self.uses_named = True
                    if track:
                        self._note_statement(code, body)
                elif code == _QUERY:
                    self.last_unnamed_parse = None
                    if track:
                        self._note_statement(code, body)
                elif code == _BIND and track:
                    name_at = body.find(b"\x00") + 1
                    if body[name_at : name_at + 1] not in (b"\x00", b""):
                        # A named statement (for the unnamed one, its Parse says more).
                        self._note_statement(code, body)
                elif code == _TERMINATE:
                    if body:
                        raise ProtocolError("invalid Terminate message: it has a body")
                    self.terminated = True
                    if end < 5:
                        # The start of it went out with the previous read: that server now
                        # holds half a message and must not serve anyone else.
                        self.torn = True
                        return b"", msgs[:i]
                    return data[: end - 5], msgs[:i]
        return data, msgs

    def _note_statement(self, code: int, body: bytes) -> None:
        self.last_statement = body if len(body) <= STATEMENT_KEEP else body[:STATEMENT_KEEP]
        self.last_statement_code = code

    def hold(self, data: bytes, msgs: list[tuple[int, bytes, int]], now: float) -> bool:
        """Keep bytes until a server is linked. Returns True when a server must be requested."""
        if data:
            self.pending.append(data)
            self.pending_msgs.extend(msgs)
        if self.phase is ClientPhase.IDLE and self.pending:
            self.phase = ClientPhase.WAITING
            self.waiting_since = now
            return True
        return False

    def take_pending(self) -> tuple[bytes, list[tuple[int, bytes, int]]]:
        data = b"".join(self.pending)
        msgs = self.pending_msgs
        self.pending = []
        self.pending_msgs = []
        return data, msgs

    @property
    def statements(self) -> ClientStatements:
        """The client's named prepared statements (its names → the proxy's)."""
        return self.view.statements

    @property
    def at_boundary(self) -> bool:
        """No half-received message: the server has not been given part of one."""
        rewriter = self.rewriter
        return (
            self.scanner.at_boundary
            and not self.torn
            and (rewriter is None or rewriter.at_boundary)
        )
