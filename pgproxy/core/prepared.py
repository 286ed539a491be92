"""Named prepared statements in transaction mode: names, per-server sets, and response plans.

A client's statement names are its own; on the server each distinct statement (the Parse body
after the name: query text and parameter types) gets one name of the proxy's, derived from its
content, so identical statements of different clients share it. Each server connection keeps an
LRU set of what is prepared there. When the proxy prepares on demand or answers a client's
Parse itself, the server's answers no longer match the client's messages one to one: the
`ResponseTracker` knows, message by message, what the server owes and whether the client gets
it (FORWARD), does not (SWALLOW), or gets an answer the server never sends (FAKE).

Pure: bytes and decisions, no I/O. Message flow: PostgreSQL docs, "Extended Query": after an
error the server skips every message until Sync, so do the plans.
"""

import hashlib
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from enum import IntEnum

from pgproxy.wire.codes import BackendCode, FrontendCode

# Same as PgBouncer's max_prepared_statements default... of the issue: 200 per server.
DEFAULT_MAX_PREPARED_STATEMENTS = 200

_PREFIX = b"pgproxy_"


def statement_name(definition: bytes) -> bytes:
    """The server-side name of a statement: a digest of its Parse body after the name.

    128 bits: a collision would need about 2**64 distinct statements.
    """
    return _PREFIX + hashlib.blake2b(definition, digest_size=16).hexdigest().encode()


def split_parse(body: bytes) -> tuple[bytes, bytes]:
    """(statement name, definition) of a Parse body; the definition is what follows the name."""
    end = body.index(b"\x00")
    return body[:end], body[end + 1 :]


def parse_message(name: bytes, definition: bytes) -> bytes:
    body = name + b"\x00" + definition
    return b"P" + (len(body) + 4).to_bytes(4, "big") + body


def close_statement_message(name: bytes) -> bytes:
    body = b"S" + name + b"\x00"
    return b"C" + (len(body) + 4).to_bytes(4, "big") + body


PARSE_COMPLETE = b"1\x00\x00\x00\x04"
CLOSE_COMPLETE = b"3\x00\x00\x00\x04"


@dataclass(slots=True)
class ClientStatements:
    """A client's named statements: its name → (definition, server-side name)."""

    by_name: dict[bytes, tuple[bytes, bytes]] = field(default_factory=dict)

    def define(self, name: bytes, definition: bytes) -> bytes:
        server_name = statement_name(definition)
        self.by_name[name] = (definition, server_name)
        return server_name

    def lookup(self, name: bytes) -> tuple[bytes, bytes] | None:
        return self.by_name.get(name)

    def forget(self, name: bytes) -> None:
        self.by_name.pop(name, None)

    def forget_server_name(self, server_name: bytes) -> None:
        """A Parse failed: no name of this client may point at that statement any more."""
        for name in [n for n, (_d, s) in self.by_name.items() if s == server_name]:
            del self.by_name[name]

    def clear(self) -> None:
        self.by_name.clear()


@dataclass(slots=True)
class ServerStatements:
    """The statements prepared on one server connection, least recently used first."""

    capacity: int = DEFAULT_MAX_PREPARED_STATEMENTS
    names: OrderedDict[bytes, None] = field(default_factory=OrderedDict)

    def __contains__(self, name: bytes) -> bool:
        return name in self.names

    def __len__(self) -> int:
        return len(self.names)

    def use(self, name: bytes) -> bool:
        """Mark `name` used; True when it was already prepared here."""
        if name in self.names:
            self.names.move_to_end(name)
            return True
        return False

    def add(self, name: bytes) -> None:
        self.names[name] = None
        self.names.move_to_end(name)

    def discard(self, name: bytes) -> None:
        self.names.pop(name, None)

    def overflow(self, keep: frozenset[bytes] = frozenset()) -> list[bytes]:
        """Least recently used names to close so that at most `capacity` remain (not `keep`)."""
        excess = len(self.names) - self.capacity
        if excess <= 0:
            return []
        victims: list[bytes] = []
        for name in self.names:
            if len(victims) == excess:
                break
            if name not in keep:
                victims.append(name)
        for name in victims:
            del self.names[name]
        return victims

    def clear(self) -> None:
        self.names.clear()


class Action(IntEnum):
    FORWARD = 0  # the client sent it and gets the answer
    SWALLOW = 1  # the proxy sent it; the answer is withheld (an error still reaches the client)
    FAKE = 2  # the proxy answers the client itself; nothing was sent to the server


@dataclass(slots=True)
class Expected:
    """What the server owes for one message sent to it (or what the proxy owes, for FAKE)."""

    code: int  # the frontend message code
    action: Action
    fake: bytes = b""  # for FAKE: the bytes the client gets
    statement: bytes = b""  # for Parse: the server-side name it prepares


# Backend messages that end the answer to each kind of frontend message (an ErrorResponse
# ends any of the extended ones too).
_ENDS: dict[int, frozenset[int]] = {
    FrontendCode.PARSE: frozenset({BackendCode.PARSE_COMPLETE}),
    FrontendCode.BIND: frozenset({BackendCode.BIND_COMPLETE}),
    FrontendCode.DESCRIBE: frozenset({BackendCode.ROW_DESCRIPTION, BackendCode.NO_DATA}),
    FrontendCode.EXECUTE: frozenset(
        {
            BackendCode.COMMAND_COMPLETE,
            BackendCode.EMPTY_QUERY_RESPONSE,
            BackendCode.PORTAL_SUSPENDED,
        }
    ),
    FrontendCode.CLOSE: frozenset({BackendCode.CLOSE_COMPLETE}),
    FrontendCode.SYNC: frozenset({BackendCode.READY_FOR_QUERY}),
    FrontendCode.QUERY: frozenset({BackendCode.READY_FOR_QUERY}),
    FrontendCode.FUNCTION_CALL: frozenset({BackendCode.READY_FOR_QUERY}),
}
_EXTENDED = frozenset(
    {
        FrontendCode.PARSE,
        FrontendCode.BIND,
        FrontendCode.DESCRIBE,
        FrontendCode.EXECUTE,
        FrontendCode.CLOSE,
    }
)

# Backend messages whose arrival the tracker must see (everything else rides along).
TRACKED_BACKEND = frozenset(
    {
        BackendCode.PARSE_COMPLETE,
        BackendCode.BIND_COMPLETE,
        BackendCode.CLOSE_COMPLETE,
        BackendCode.ROW_DESCRIPTION,
        BackendCode.NO_DATA,
        BackendCode.COMMAND_COMPLETE,
        BackendCode.EMPTY_QUERY_RESPONSE,
        BackendCode.PORTAL_SUSPENDED,
        BackendCode.ERROR_RESPONSE,
        BackendCode.READY_FOR_QUERY,
    }
)


@dataclass(slots=True)
class TrackerEvents:
    """Bookkeeping results of one `feed`, as server-side statement names."""

    prepared: list[bytes] = field(default_factory=list)  # Parse confirmed by the server
    failed: list[bytes] = field(default_factory=list)  # Parse refused or skipped by the server
    # A Parse the proxy would have answered itself, skipped after an error: the server still
    # has the statement, but the client must not think it defined its name.
    unanswered: list[bytes] = field(default_factory=list)


class ResponseTracker:
    """Matches the server's answers to what was sent, and decides what the client sees."""

    __slots__ = ("_queue",)

    def __init__(self) -> None:
        self._queue: deque[Expected] = deque()

    def __len__(self) -> int:
        return len(self._queue)

    def expect(self, entry: Expected) -> None:
        self._queue.append(entry)

    @property
    def is_plain(self) -> bool:
        """Nothing is swallowed or faked among what is pending: chunks may pass whole."""
        return all(e.action is Action.FORWARD for e in self._queue)

    def take_fakes(self) -> bytes:
        """Answers the proxy owes the client before anything more comes from the server."""
        out = bytearray()
        queue = self._queue
        while queue and queue[0].action is Action.FAKE:
            out += queue.popleft().fake
        return bytes(out)

    def feed(
        self, data: bytes, frames: list[tuple[int, bytes, int]], events: TrackerEvents
    ) -> bytes:
        """What of `data` (with its tracked `frames`) the client gets, fakes included.

        Bytes between tracked messages (DataRows, notices...) go with the answer in progress.
        """
        out = bytearray(self.take_fakes())
        queue = self._queue
        pos = 0
        for code, _body, end in frames:
            head = queue[0] if queue else None
            if head is None or head.action is Action.FORWARD or code == BackendCode.ERROR_RESPONSE:
                # An error to a message of the proxy's still reaches the client: the client's
                # own next messages are skipped by the server, the client must know why.
                out += data[pos:end]
            pos = end
            if head is None:
                continue
            if code == BackendCode.ERROR_RESPONSE and head.code in _EXTENDED:
                self._fail(events)
            elif code in _ENDS.get(head.code, ()):
                queue.popleft()
                if head.code == FrontendCode.PARSE:
                    events.prepared.append(head.statement)
            out += self.take_fakes()
        if pos < len(data):
            head = queue[0] if queue else None
            if head is None or head.action is Action.FORWARD:
                out += data[pos:]
        return bytes(out)

    def _fail(self, events: TrackerEvents) -> None:
        """An extended message failed: the server skips everything up to the next Sync."""
        queue = self._queue
        while queue and queue[0].code != FrontendCode.SYNC:
            skipped = queue.popleft()
            if skipped.code == FrontendCode.PARSE:
                if skipped.action is Action.FAKE:
                    events.unanswered.append(skipped.statement)
                else:
                    events.failed.append(skipped.statement)
