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


@dataclass(slots=True)
class StatementCounts:
    """Per pool: how named statements were served (exported by the metrics)."""

    hits: int = 0  # a client's Parse answered by the proxy: the server had it already
    prepares: int = 0  # a client's Parse sent to the server
    reprepares: int = 0  # prepared on demand on a server that lacked it (before a Bind)
    evictions: int = 0  # closed on a server to stay within max_prepared_statements


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
    statement: bytes = b""  # for Parse and Close: the server-side statement name
    client_name: bytes = b""  # for a client's Parse: the name the client gave


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
    # Parse refused or skipped by the server: (server name, client name or b"")
    failed: list[tuple[bytes, bytes]] = field(default_factory=list)
    # A Parse the proxy would have answered itself, skipped after an error: the server still
    # has the statement, but the client's name must not stay defined. (client name)
    unanswered: list[bytes] = field(default_factory=list)
    # The proxy's Close of an evicted statement, skipped: the statement is still there.
    not_closed: list[bytes] = field(default_factory=list)


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
                if head.code == FrontendCode.CLOSE and head.action is Action.SWALLOW:
                    events.not_closed.append(head.statement)
                    queue.popleft()  # the proxy's own Close failed; nothing of the client's
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
                    events.unanswered.append(skipped.client_name)
                else:
                    events.failed.append((skipped.statement, skipped.client_name))
            elif skipped.code == FrontendCode.CLOSE and skipped.action is Action.SWALLOW:
                events.not_closed.append(skipped.statement)


def _message(code: int, body: bytes) -> bytes:
    return bytes((code,)) + (len(body) + 4).to_bytes(4, "big") + body


class Rewriter:
    """A client's messages to the server of a transaction-mode link, names mapped.

    Works on whole messages (a partial one waits for the rest), because a rewritten message
    has another length. Started only where the stream is at a message boundary.
    """

    __slots__ = ("_carry",)

    def __init__(self) -> None:
        self._carry = bytearray()

    @property
    def at_boundary(self) -> bool:
        return not self._carry

    def feed(
        self,
        data: bytes,
        *,
        client: ClientStatements,
        server: ServerStatements,
        tracker: ResponseTracker,
        counts: StatementCounts,
    ) -> tuple[bytes, list[tuple[int, bytes, int]]]:
        """Bytes for the server, and the messages they hold (code, body, 0) for `ServerState`.

        Registers in `tracker` what the server will owe for each, and the answers the proxy
        gives itself (ParseComplete when the server already has the statement, CloseComplete).
        """
        if self._carry:
            self._carry += data
            buf: bytes | bytearray = self._carry
        else:
            buf = data
        out = bytearray()
        sent: list[tuple[int, bytes, int]] = []
        n = len(buf)
        pos = 0
        while n - pos >= 5:
            code = buf[pos]
            end = pos + 1 + int.from_bytes(buf[pos + 1 : pos + 5], "big")
            if end > n:
                break
            body = bytes(buf[pos + 5 : end])
            raw = buf[pos:end]
            pos = end
            if code == FrontendCode.PARSE:
                name, definition = split_parse(body)
                if not name:
                    out += raw
                    tracker.expect(Expected(code, Action.FORWARD))
                    sent.append((code, body, 0))
                    continue
                server_name = client.define(name, definition)
                if server.use(server_name):
                    counts.hits += 1
                    tracker.expect(
                        Expected(
                            code,
                            Action.FAKE,
                            fake=PARSE_COMPLETE,
                            statement=server_name,
                            client_name=name,
                        )
                    )
                    continue
                server.add(server_name)
                counts.prepares += 1
                new_body = server_name + b"\x00" + definition
                out += _message(code, new_body)
                tracker.expect(
                    Expected(code, Action.FORWARD, statement=server_name, client_name=name)
                )
                sent.append((code, new_body, 0))
            elif code == FrontendCode.BIND or (
                code == FrontendCode.DESCRIBE and body[:1] == b"S" and body[1:2] != b"\x00"
            ):
                start = body.index(b"\x00") + 1 if code == FrontendCode.BIND else 1
                stop = body.index(b"\x00", start)
                entry = client.lookup(body[start:stop]) if stop > start else None
                if entry is None:
                    out += raw  # unnamed, or unknown: the server says so in its own words
                    tracker.expect(Expected(code, Action.FORWARD))
                    sent.append((code, body, 0))
                    continue
                definition, server_name = entry
                if not server.use(server_name):
                    # Prepared on another server: prepare it here first, quietly.
                    server.add(server_name)
                    counts.reprepares += 1
                    parse_body = server_name + b"\x00" + definition
                    out += _message(FrontendCode.PARSE, parse_body)
                    tracker.expect(
                        Expected(FrontendCode.PARSE, Action.SWALLOW, statement=server_name)
                    )
                    sent.append((FrontendCode.PARSE, parse_body, 0))
                new_body = body[:start] + server_name + body[stop:]
                out += _message(code, new_body)
                tracker.expect(Expected(code, Action.FORWARD))
                sent.append((code, new_body, 0))
            elif code == FrontendCode.CLOSE and body[:1] == b"S" and body[1:2] != b"\x00":
                # Other clients may use the statement: only this client's name goes.
                client.forget(body[1 : body.index(b"\x00", 1)])
                tracker.expect(Expected(code, Action.FAKE, fake=CLOSE_COMPLETE))
            else:
                out += raw
                if code in _ENDS:
                    tracker.expect(Expected(code, Action.FORWARD))
                if code != FrontendCode.COPY_DATA:
                    sent.append((code, body, 0))
        if pos < n:
            self._carry = bytearray(buf[pos:])
        elif self._carry:
            self._carry = bytearray()
        return bytes(out), sent
