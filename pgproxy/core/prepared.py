"""Named prepared statements in transaction mode: names, per-server sets, and response plans.

A client's statement names are its own; on the server each distinct statement (the Parse body
after the name: query text and parameter types) gets one name of the proxy's, derived from its
content, so identical statements of different clients share it. Each server connection keeps an
LRU set of what is prepared there. When the proxy prepares on demand or answers a client's
Parse itself, the server's answers no longer match the client's messages one to one: the
`ResponseTracker` knows, message by message, what the server owes and whether the client gets
it (FORWARD), does not (SWALLOW), gets only its error (PREPARE), or gets an answer the server
never sends (FAKE).

Pure: bytes and decisions, no I/O. Message flow: PostgreSQL docs, "Extended Query": after an
error the server skips every message until Sync, so do the plans.
"""

import hashlib
import struct
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Final

from pgproxy.errors import ProtocolError
from pgproxy.wire.codes import BackendCode, FrontendCode
from pgproxy.wire.scanner import Frame

# Final: compiled, C statics or constants instead of a module lookup per use.
_unpack_length: Final = struct.Struct("!i").unpack_from
_ERROR: Final[int] = BackendCode.ERROR_RESPONSE
_SYNC: Final[int] = FrontendCode.SYNC
_F_PARSE: Final[int] = FrontendCode.PARSE
_F_CLOSE: Final[int] = FrontendCode.CLOSE
_F_FUNCTION_CALL: Final[int] = FrontendCode.FUNCTION_CALL

# Same as PgBouncer's max_prepared_statements default... of the issue: 200 per server.
DEFAULT_MAX_PREPARED_STATEMENTS: Final = 200

_PREFIX: Final = b"pgproxy_"


def statement_name(definition: bytes) -> bytes:
    """The server-side name of a statement: a digest of its Parse body after the name.

    128 bits: a collision would need about 2**64 distinct statements.
    """
    return _PREFIX + hashlib.blake2b(definition, digest_size=16).hexdigest().encode()


def split_parse(body: bytes) -> tuple[bytes, bytes]:
    """(statement name, definition) of a Parse body; the definition is what follows the name.

    Raises ProtocolError (08P01) when the name is not NUL-terminated, as Postgres does."""
    end = body.find(b"\x00")
    if end < 0:
        raise ProtocolError("invalid string in message")
    return body[:end], body[end + 1 :]


def close_target(body: bytes) -> bytes:
    """The name in a Close body (after its 'S'/'P' byte); ProtocolError if unterminated."""
    end = body.find(b"\x00", 1)
    if end < 0:
        raise ProtocolError("invalid string in message")
    return body[1:end]


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
    # The proxy's own message ahead of the client's (session prelude, unnamed statement replay,
    # eviction): nothing of the answer reaches the client, not even an error; ServerState
    # reports that error (`proxy_error`) and the client is failed.
    SWALLOW = 1
    FAKE = 2  # the proxy answers the client itself; nothing was sent to the server
    # A Parse the proxy slips in before the client's Bind or Describe: ParseComplete is
    # withheld, an error reaches the client (the server skips its next messages: it must know
    # why).
    PREPARE = 3


@dataclass(frozen=True, slots=True)
class Expected:
    """What the server owes for one message sent to it (or what the proxy owes, for FAKE).

    Immutable: the plain entries (`plain_entry`) are shared, not allocated per message.
    """

    code: int  # the frontend message code
    action: Action
    fake: bytes = b""  # for FAKE: the bytes the client gets
    statement: bytes = b""  # for Parse and Close: the server-side statement name
    client_name: bytes = b""  # for a client's Parse: the name the client gave
    # Forwarded, with nothing to account for: the answer goes to the client, nothing else.
    plain: bool = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "plain", self.action is Action.FORWARD and not self.statement)


# Backend messages that end the answer to each kind of frontend message (an ErrorResponse
# ends any of the extended ones too).
_ENDS: Final[dict[int, frozenset[int]]] = {
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
_EXTENDED: Final = frozenset(
    {
        _F_PARSE,
        FrontendCode.BIND,
        FrontendCode.DESCRIBE,
        FrontendCode.EXECUTE,
        _F_CLOSE,
    }
)

_SHARED: Final = {
    (code, action): Expected(code, action)
    for code in _ENDS
    for action in (Action.FORWARD, Action.SWALLOW)
}


def plain_entry(code: int, action: Action = Action.FORWARD) -> Expected:
    """The shared entry for a message whose answer carries no statement bookkeeping."""
    return _SHARED[code, action]


_NOTHING: Final[frozenset[int]] = frozenset()

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

    def clear(self) -> None:
        self.prepared.clear()
        self.failed.clear()
        self.unanswered.clear()
        self.not_closed.clear()


class ResponseTracker:
    """Matches the server's answers to what was sent, and decides what the client sees."""

    __slots__ = ("_queue", "_special")

    def __init__(self) -> None:
        self._queue: deque[Expected] = deque()
        self._special = 0  # entries in the queue that are not plain

    def __len__(self) -> int:
        return len(self._queue)

    def expect(self, entry: Expected) -> None:
        self._queue.append(entry)
        if not entry.plain:
            self._special += 1

    def expect_held(self, held: list[Expected]) -> None:
        """The plain entries held back so far, in order (`held` is emptied)."""
        self._queue.extend(held)
        held.clear()

    def expect_after(self, held: list[Expected], entry: Expected) -> None:
        """`entry`, after the plain entries held back so far (`held` is emptied)."""
        if held:
            self.expect_held(held)
        self.expect(entry)

    def _pop(self) -> Expected:
        entry = self._queue.popleft()
        if not entry.plain:
            self._special -= 1
        return entry

    def take_fakes(self) -> bytes:
        """Answers the proxy owes the client before anything more comes from the server."""
        queue = self._queue
        if not queue or queue[0].action is not Action.FAKE:
            return b""
        out = bytearray()
        while queue and queue[0].action is Action.FAKE:
            out += self._pop().fake
        return bytes(out)

    def feed(self, data: bytes, frames: list[Frame], events: TrackerEvents) -> bytes:
        """What of `data` (with its tracked `frames`) the client gets, fakes included.

        Bytes between tracked messages (DataRows, notices...) go with the answer in progress.
        When everything is the client's, `data` itself is returned (no copy).
        """
        queue = self._queue
        if not self._special:
            # Only plain entries: every byte is the client's; just keep count of the answers.
            for code, _body, _end in frames:
                if not queue:
                    break
                first = queue[0].code
                if code == _ERROR:
                    if first in _EXTENDED:
                        while queue and queue[0].code != _SYNC:
                            queue.popleft()
                elif code in _ENDS.get(first, _NOTHING):
                    queue.popleft()
            return data
        parts: list[bytes] = []
        fakes = self.take_fakes()
        if fakes:
            parts.append(fakes)
        run = -1  # start of the current run of bytes the client gets, -1 when none
        pos = 0
        for code, body, end in frames:
            head = queue[0] if queue else None
            if head is None or head.action is Action.FORWARD:
                if run < 0:
                    run = pos
            else:
                if run >= 0:
                    parts.append(data[run:pos])
                    run = -1
                if code == _ERROR and head.action is Action.PREPARE:
                    # Rebuilt from its body: the bytes before it in the chunk are the withheld
                    # answer's, and it may have begun in an earlier chunk.
                    parts.append(b"E" + (len(body) + 4).to_bytes(4, "big") + body)
            pos = end
            if head is None:
                continue
            if code == _ERROR and head.code in _EXTENDED:
                if head.code == _F_CLOSE and head.action is Action.SWALLOW:
                    events.not_closed.append(head.statement)
                    self._pop()  # the proxy's own Close failed; nothing of the client's
                self._fail(events)
            elif code in _ENDS.get(head.code, _NOTHING):
                self._pop()
                if head.code == _F_PARSE:
                    events.prepared.append(head.statement)
            if queue and queue[0].action is Action.FAKE:
                if run >= 0:
                    parts.append(data[run:pos])
                    run = -1
                parts.append(self.take_fakes())
        n = len(data)
        if pos < n:
            head = queue[0] if queue else None
            if head is None or head.action is Action.FORWARD:
                if run < 0:
                    run = pos
                pos = n
        if run >= 0:
            if run == 0 and pos == n and not parts:
                return data
            parts.append(data[run:pos])
        return b"".join(parts)

    def _fail(self, events: TrackerEvents) -> None:
        """An extended message failed: the server skips everything up to the next Sync."""
        queue = self._queue
        while queue and queue[0].code != _SYNC:
            skipped = self._pop()
            if skipped.code == _F_PARSE:
                if skipped.action is Action.FAKE:
                    events.unanswered.append(skipped.client_name)
                else:
                    events.failed.append((skipped.statement, skipped.client_name))
            elif skipped.code == _F_CLOSE and skipped.action is Action.SWALLOW:
                events.not_closed.append(skipped.statement)


_HEADER: Final = struct.Struct("!Bi")  # a message's type byte and length


# How the rewriter handles each frontend message: pass it on without looking at it (CopyData),
# pass it on and report it without its body (ServerState reads no more of it), report it with
# its body (Query), or look at the statement name it carries (Parse, Bind, Describe, Close).
_SKIP: Final = 0
_NOTE: Final = 1
_QUERY: Final = 2
_MAP: Final = 3
_KIND: Final = bytearray(256)
for _code in (
    FrontendCode.EXECUTE,
    FrontendCode.SYNC,
    FrontendCode.FLUSH,
    FrontendCode.FUNCTION_CALL,
    FrontendCode.TERMINATE,
    FrontendCode.COPY_DONE,
    FrontendCode.COPY_FAIL,
):
    _KIND[_code] = _NOTE
_KIND[FrontendCode.QUERY] = _QUERY
for _code in (FrontendCode.PARSE, FrontendCode.BIND, FrontendCode.DESCRIBE, FrontendCode.CLOSE):
    _KIND[_code] = _MAP
_BARE: Final[dict[int, Frame]] = {code: (code, b"", 0) for code in range(256)}
_BIND: Final[int] = FrontendCode.BIND
_BIND_ENTRY: Final = plain_entry(_BIND)
_EXECUTE: Final[int] = FrontendCode.EXECUTE
_SYNC_ENTRY: Final = plain_entry(_SYNC)
_EXECUTE_ENTRY: Final = plain_entry(_EXECUTE)


class Rewriter:
    """A client's messages to the server of one transaction-mode link, names mapped.

    Works on whole messages (a partial one waits for the rest), because a rewritten message
    has another length. Started only where the stream is at a message boundary. Messages it
    leaves alone are passed on as they are: a chunk with nothing to map is not copied.
    """

    __slots__ = ("_carry", "_client", "_counts", "_names", "_server", "_tracker")

    def __init__(
        self,
        client: ClientStatements,
        server: ServerStatements,
        tracker: ResponseTracker,
        counts: StatementCounts,
    ) -> None:
        self._carry = b""
        self._client = client
        self._names = client.by_name
        self._server = server
        self._tracker = tracker
        self._counts = counts

    @property
    def at_boundary(self) -> bool:
        return not self._carry

    def feed(self, data: bytes) -> tuple[bytes, list[Frame]]:
        """Bytes for the server, and the messages they hold for `ServerState.note_frontend`.

        Registers in the tracker what the server will owe for each, and the answers the proxy
        gives itself (ParseComplete when the server already has the statement, CloseComplete).
        The reported frames carry a body only as far as `note_frontend` reads it: all of a
        Query or Parse, the names of a Bind, nothing of the others.
        """
        if self._carry:
            buf = self._carry + data
            self._carry = b""
        else:
            buf = data
        tracker = self._tracker
        parts: list[bytes] = []
        sent: list[Frame] = []
        # Plain entries (forwarded, nothing to account for) are held back: if a Sync follows
        # with nothing else in between, that Sync's entry alone stands for them all (its
        # ReadyForQuery ends their answers, errors included), which keeps the tracker's work
        # per answer small. Anything else is queued after them.
        held: list[Expected] = []
        n = len(buf)
        pos = 0
        run = 0  # start of the bytes not yet in `parts` (when something was replaced)
        while n - pos >= 5:
            code = buf[pos]
            end = pos + 1 + _unpack_length(buf, pos + 1)[0]
            if end > n:
                break
            kind = _KIND[code]
            if kind == _NOTE:
                sent.append(_BARE[code])
                if code == _SYNC:
                    held.clear()
                    tracker.expect(_SYNC_ENTRY)
                elif code == _EXECUTE:
                    held.append(_EXECUTE_ENTRY)
                elif code == _F_FUNCTION_CALL:
                    tracker.expect_after(held, _SHARED[code, Action.FORWARD])
            elif kind == _QUERY:
                sent.append((code, buf[pos + 5 : end], 0))
                tracker.expect_after(held, _SHARED[code, Action.FORWARD])
            elif kind == _MAP:
                if code == _BIND:
                    replacement = self._bind(buf, pos, end, sent, held)
                else:
                    replacement = self._map(code, buf, pos, end, sent, held)
                if replacement is not None:
                    if pos > run:
                        parts.append(buf[run:pos])
                    if replacement:
                        parts.append(replacement)
                    run = end
            pos = end
        if held:
            tracker.expect_held(held)
        if pos < n:
            self._carry = buf[pos:]
        if run == 0:  # nothing replaced (a replacement moves `run` past its message)
            return (buf if pos == n else buf[:pos]), sent
        if pos > run:
            parts.append(buf[run:pos])
        return b"".join(parts), sent

    def _bind(
        self, buf: bytes, pos: int, end: int, sent: list[Frame], held: list[Expected]
    ) -> bytes | None:
        """A Bind: its statement name mapped (prepared here first if need be). The hot one."""
        start = pos + 5
        name_start = buf.find(0, start, end) + 1
        name_end = buf.find(0, name_start, end) if name_start else -1
        found = self._names.get(buf[name_start:name_end]) if name_end > name_start else None
        if found is None:
            # Unnamed, unknown, or malformed: the server says so in its own words.
            held.append(_BIND_ENTRY)
            sent.append((_BIND, buf[start : name_end + 1], 0))
            return None
        definition, server_name = found
        names = self._server.names
        if server_name in names:
            names.move_to_end(server_name)
            prepare = b""
        else:
            prepare = self._prepare(definition, server_name, sent, held)
        head = buf[start:name_start] + server_name
        held.append(_BIND_ENTRY)
        sent.append((_BIND, head + b"\x00", 0))
        length = len(head) + end - name_end + 4
        return prepare + _HEADER.pack(_BIND, length) + head + buf[name_end:end]

    def _prepare(
        self, definition: bytes, server_name: bytes, sent: list[Frame], held: list[Expected]
    ) -> bytes:
        """Prepared on another server: prepare it here first, quietly."""
        self._server.add(server_name)
        self._counts.reprepares += 1
        body = server_name + b"\x00" + definition
        self._tracker.expect_after(held, Expected(_F_PARSE, Action.PREPARE, statement=server_name))
        sent.append((_F_PARSE, body, 0))
        return _HEADER.pack(_F_PARSE, len(body) + 4) + body

    def _map(
        self, code: int, buf: bytes, pos: int, end: int, sent: list[Frame], held: list[Expected]
    ) -> bytes | None:
        """A Parse, Describe or Close; its replacement (b"": dropped; None: goes as it is)."""
        start = pos + 5
        tracker = self._tracker
        if code == _F_PARSE:
            body = buf[start:end]
            if body[:1] == b"\x00" or b"\x00" not in body:
                # The unnamed statement, or a malformed Parse the server will refuse.
                held.append(_SHARED[code, Action.FORWARD])
                sent.append((code, body, 0))
                return None
            name, definition = split_parse(body)
            server_name = self._client.define(name, definition)
            if self._server.use(server_name):
                self._counts.hits += 1
                fake = Expected(
                    code, Action.FAKE, fake=PARSE_COMPLETE, statement=server_name, client_name=name
                )
                tracker.expect_after(held, fake)
                return b""
            self._server.add(server_name)
            self._counts.prepares += 1
            new_body = server_name + b"\x00" + definition
            tracker.expect_after(
                held, Expected(code, Action.FORWARD, statement=server_name, client_name=name)
            )
            sent.append((code, new_body, 0))
            return _HEADER.pack(code, len(new_body) + 4) + new_body
        if code == _F_CLOSE:
            name_end = buf.find(0, start + 1, end)
            if buf[start:end][:1] != b"S" or name_end <= start + 1:
                # A portal, the unnamed statement, or malformed: the server's business.
                held.append(_SHARED[code, Action.FORWARD])
                sent.append(_BARE[code])
                return None
            # Other clients may use the statement: only this client's name goes.
            self._client.forget(buf[start + 1 : name_end])
            tracker.expect_after(held, Expected(code, Action.FAKE, fake=CLOSE_COMPLETE))
            return b""
        # Describe: of a statement, or of a portal.
        name_end = buf.find(0, start + 1, end) if buf[start:end][:1] == b"S" else -1
        found = self._names.get(buf[start + 1 : name_end]) if name_end > start + 1 else None
        if found is None:
            # A portal, the unnamed statement, unknown or malformed: the server's business.
            held.append(_SHARED[code, Action.FORWARD])
            sent.append(_BARE[code])
            return None
        definition, server_name = found
        if self._server.use(server_name):
            prepare = b""
        else:
            prepare = self._prepare(definition, server_name, sent, held)
        held.append(_SHARED[code, Action.FORWARD])
        sent.append(_BARE[code])
        length = len(server_name) + 6
        return prepare + _HEADER.pack(code, length) + b"S" + server_name + b"\x00"
