"""`Relay`: a fault-injecting TCP relay of the tests' own, between pgproxy and Postgres.

pgproxy's `server` points at the relay; every connection it opens (server logins and cancel
requests alike) is accepted here and forwarded to Postgres over a connection of the relay's
own. The test then breaks things the way networks and hosts break them:

* `cut`: both sockets closed at once, with a reset (SO_LINGER 0) or a FIN;
* `stall`: stop forwarding one direction or both (the relay stops reading, so the sender's
  kernel buffers fill and nothing, not even a close, gets through: a network partition);
* `half_close`: shutdown(SHUT_WR) toward pgproxy or toward Postgres, the other way open;
* `close_after`, `stall_after`: forward exactly N more bytes toward pgproxy, then cut or
  stall (faults in the middle of a message, at a byte of the test's choosing);
* `cut_answer`: keep messages toward pgproxy up to the first of a type, drop whole messages
  after it until Postgres sends an ErrorResponse, then forward the kept ones and the error in
  one write (an answer ended by that error at a message of the test's choosing, as a backend
  terminated in the middle of a statement ends it);
* `delay`: latency added to every chunk, in both directions, order kept;
* `refuse`: the listening socket closed (connections are refused: Postgres is down);
  `hang_new`: new connections accepted and never answered (a hung host).

Links are named by the backend pid Postgres sends in BackendKeyData, read from the first bytes
of each server connection, so that a test can break "the server that serves client X" (ask X
for `pg_backend_pid()`). The relay runs plain asyncio on a thread of its own; every control
method is thread-safe and returns once the fault is in place. Back-pressure is honoured, so
the relay never buffers more than a transport's high-water mark per direction.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import random
import socket
import struct
import threading
from collections import deque
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, cast

T = TypeVar("T")

SSL_REQUEST = 80877103
CANCEL_REQUEST = 80877102
# Bytes of a server's login looked at for BackendKeyData before the relay gives up.
LOGIN_PEEK_LIMIT = 65536
# The relay listens on a port below the kernel's ephemeral range (32768-60999 by default), so
# that no outgoing connection can take it while it is closed for `refuse` and open it again.
LISTEN_PORTS = range(20000, 32000)

Direction = Literal["up", "down", "both"]  # up: pgproxy → Postgres; down: Postgres → pgproxy


@dataclass(frozen=True, slots=True)
class LinkInfo:
    """A snapshot of one relayed connection, safe to read on any thread."""

    id: int
    kind: str  # "session", "cancel" or "?" (nothing sent yet)
    backend_pid: int | None
    bytes_up: int
    bytes_down: int
    stalled: frozenset[str]
    bytes_dropped: int  # by `cut_answer`


class _Side(asyncio.Protocol):
    """One socket of a link: `down` (accepted from pgproxy) or `up` (to Postgres)."""

    def __init__(self, link: Link, name: str) -> None:
        self.link = link
        self.name = name
        self.transport: asyncio.Transport | None = None
        self.reasons: set[str] = set()  # why reading is paused: "stall", "backlog", "connect"
        self.eof = False
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.link.relay.open_sides.add(self)
        self._apply_gate()

    def data_received(self, data: bytes) -> None:
        self.link.forward(self, data)

    def eof_received(self) -> bool:
        self.eof = True
        self.link.forward_eof(self)
        return True  # keep the other direction open until the peer closes too

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.link.relay.open_sides.discard(self)
        self.link.side_lost(self)

    def pause_writing(self) -> None:
        self.link.peer(self).hold("backlog")

    def resume_writing(self) -> None:
        self.link.peer(self).release("backlog")

    def hold(self, reason: str) -> None:
        self.reasons.add(reason)
        self._apply_gate()

    def release(self, reason: str) -> None:
        self.reasons.discard(reason)
        self._apply_gate()

    def _apply_gate(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self.reasons and transport.is_reading():
            transport.pause_reading()
        elif not self.reasons and not transport.is_reading():
            transport.resume_reading()

    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    def close(self, *, reset: bool) -> None:
        transport = self.transport
        if transport is None or (transport.is_closing() and not reset):
            return
        if reset:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()
        else:
            transport.close()


class _AnswerCutter:
    """Keeps whole messages up to and including the first of type `through`, then drops whole
    messages until an ErrorResponse begins; then passes what it kept and everything after."""

    def __init__(self, through: bytes) -> None:
        self.through = through
        self.dropping = False
        self.done = False
        self.dropped = 0
        self._buffer = bytearray()
        self._kept = bytearray()

    def feed(self, data: bytes) -> bytes:
        if self.done:
            return data
        buffer = self._buffer
        buffer += data
        out = self._kept
        while len(buffer) >= 5:
            code = bytes(buffer[:1])
            if self.dropping and code == b"E":
                self.done = True
                break
            end = 1 + struct.unpack("!i", buffer[1:5])[0]
            if len(buffer) < end:
                break
            if self.dropping:
                self.dropped += end
            else:
                out += buffer[:end]
                self.dropping = code == self.through
            del buffer[:end]
        if not self.done:
            return b""
        out += buffer
        buffer.clear()
        return bytes(out)


class Link:
    """One connection from pgproxy and the relay's connection to Postgres for it."""

    def __init__(self, relay: Relay, link_id: int) -> None:
        self.relay = relay
        self.id = link_id
        self.down = _Side(self, "down")
        self.up = _Side(self, "up")
        self.kind = "?"
        self.backend_pid: int | None = None
        self.bytes_up = 0
        self.bytes_down = 0
        self.stalled: set[str] = set()
        # Chunks held back by `delay`: (due time, side to write to, data or None for EOF).
        self._delayed: deque[tuple[float, _Side, bytes | None]] = deque()
        self._flush_handle: asyncio.TimerHandle | None = None
        # The start of each stream, parsed until the backend pid is known.
        self._up_head = bytearray()
        self._down_head = bytearray()
        self._ssl_asked = False
        self._peeking = True
        self.closed = False
        # `close_after`/`stall_after`: bytes still to forward toward pgproxy before the link
        # is cut (or stalled), and the bytes a stall_after held back.
        self.down_budget: int | None = None
        self.budget_action = "cut"
        self._held = b""
        self.cutter: _AnswerCutter | None = None

    def peer(self, side: _Side) -> _Side:
        return self.up if side is self.down else self.down

    def info(self) -> LinkInfo:
        return LinkInfo(
            self.id,
            self.kind,
            self.backend_pid,
            self.bytes_up,
            self.bytes_down,
            frozenset(self.stalled),
            self.cutter.dropped if self.cutter is not None else 0,
        )

    # -- data --

    def forward(self, source: _Side, data: bytes) -> None:
        target = self.peer(source)
        if source is self.down:
            self.bytes_up += len(data)
            if self.kind == "?":
                self._peek_startup(data)
        else:
            self.bytes_down += len(data)
            if self._peeking:
                self._peek_login(data)
            if self.cutter is not None:
                data = self.cutter.feed(data)
                if not data:
                    return
            if self.down_budget is not None:
                budget = self.down_budget
                self.down_budget = budget - len(data) if budget > len(data) else None
                if self.down_budget is None:
                    self._send(target, data[:budget])
                    if self.budget_action == "cut":
                        self._cut_after_flush()
                    else:
                        self._held = data[budget:]
                        self.stall("down")
                    return
        self._send(target, data)

    def forward_eof(self, source: _Side) -> None:
        self._send(self.peer(source), None)
        if self.up.eof and self.down.eof:
            self.close(reset=False)

    def _send(self, target: _Side, data: bytes | None) -> None:
        delay = self.relay.delay_seconds
        if delay <= 0 and not self._delayed:
            self._write(target, data)
            return
        loop = asyncio.get_running_loop()
        self._delayed.append((loop.time() + delay, target, data))
        if self._flush_handle is None:
            self._flush_handle = loop.call_at(self._delayed[0][0], self._flush)

    def _flush(self) -> None:
        self._flush_handle = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        while self._delayed and self._delayed[0][0] <= now:
            _due, target, data = self._delayed.popleft()
            self._write(target, data)
        if self._delayed:
            self._flush_handle = loop.call_at(self._delayed[0][0], self._flush)

    def _write(self, target: _Side, data: bytes | None) -> None:
        if data is not None:
            target.write(data)
            return
        transport = target.transport
        if transport is not None and not transport.is_closing() and transport.can_write_eof():
            with contextlib.suppress(OSError):
                transport.write_eof()

    def _peek_startup(self, data: bytes) -> None:
        head = self._down_head
        head += data
        while len(head) >= 8:
            _length, code = struct.unpack("!ii", head[:8])
            if code == SSL_REQUEST and not self._ssl_asked:
                self._ssl_asked = True
                del head[:8]
                continue
            self.kind = "cancel" if code == CANCEL_REQUEST else "session"
            if self.kind == "cancel":
                self._peeking = False
            head.clear()
            return

    def _peek_login(self, data: bytes) -> None:
        head = self._up_head
        head += data
        pos = 0
        if self._ssl_asked:
            if head[:1] != b"N":
                self._peeking = False  # TLS: nothing more to read in the clear
                return
            pos = 1
        while len(head) - pos >= 5:
            code = head[pos : pos + 1]
            (length,) = struct.unpack("!i", head[pos + 1 : pos + 5])
            if len(head) - pos < 1 + length:
                break
            if code == b"K":
                (self.backend_pid,) = struct.unpack("!i", head[pos + 5 : pos + 9])
                self._peeking = False
                break
            if code in (b"Z", b"E"):
                self._peeking = False
                break
            pos += 1 + length
        if not self._peeking or len(head) > LOGIN_PEEK_LIMIT:
            self._peeking = False
            head.clear()

    # -- faults --

    def stall(self, direction: Direction) -> None:
        # Not reading a side stalls the direction that side sends in.
        if direction in ("up", "both"):
            self.stalled.add("up")
            self.down.hold("stall")
        if direction in ("down", "both"):
            self.stalled.add("down")
            self.up.hold("stall")

    def resume(self) -> None:
        if self._held:
            held, self._held = self._held, b""
            self._send(self.down, held)
        self.stalled.clear()
        self.down.release("stall")
        self.up.release("stall")

    def _cut_after_flush(self) -> None:
        # What was forwarded reaches pgproxy (a FIN after it); Postgres' side is reset.
        if self.closed:
            return
        self.closed = True
        self.down.close(reset=False)
        self.up.close(reset=True)
        self.relay.forget(self)

    def half_close(self, toward: Literal["proxy", "server"]) -> None:
        self._write(self.down if toward == "proxy" else self.up, None)

    def close(self, *, reset: bool) -> None:
        if self.closed:
            return
        self.closed = True
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        self._delayed.clear()
        self.down.close(reset=reset)
        self.up.close(reset=reset)
        self.relay.forget(self)

    def side_lost(self, side: _Side) -> None:
        # One socket gone: a relay has nothing to say on the other one either. (A stalled link
        # does not read, so it does not learn of a close: that is the point of stalling.)
        self.close(reset=False)


class Relay:
    """Listens on 127.0.0.1 and forwards every connection to `target`."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = 0
        self.delay_seconds = 0.0
        self._links: dict[int, Link] = {}
        # Sockets not closed yet, links closed gracefully included: stop() aborts them all.
        self.open_sides: set[_Side] = set()
        self._next_id = 0
        self._hang_new = False
        self._listener: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._stopped: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, name="fault-relay", daemon=True)
        self._error: BaseException | None = None

    # -- lifecycle --

    def start(self) -> Relay:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("relay did not start within 10 s")
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stopped is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stopped.set)
        self._thread.join(10)

    def __enter__(self) -> Relay:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _main(self) -> None:
        with asyncio.Runner() as runner:
            runner.run(self._serve())

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        try:
            await self._listen(None)
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        await self._stopped.wait()
        if self._listener is not None:
            self._listener.close()
        for link in list(self._links.values()):
            link.close(reset=True)
        for side in list(self.open_sides):
            side.close(reset=True)
        for _ in range(3):
            await asyncio.sleep(0)  # let the transports finish closing on this loop

    async def _listen(self, port: int | None) -> None:
        loop = asyncio.get_running_loop()
        ports = [port] if port is not None else random.sample(LISTEN_PORTS, 50)
        last: OSError | None = None
        for candidate in ports:
            try:
                self._listener = await loop.create_server(
                    self._accept, "127.0.0.1", candidate, reuse_address=True, backlog=1024
                )
            except OSError as exc:
                last = exc
                continue
            self.port = candidate
            return
        raise RuntimeError(f"relay could not listen: {last}")

    def _accept(self) -> asyncio.Protocol:
        self._next_id += 1
        link = Link(self, self._next_id)
        self._links[link.id] = link
        if self._hang_new:
            link.down.hold("stall")  # accepted, never read, never answered
            link.stalled.update(("up", "down"))
            return link.down
        link.down.hold("connect")  # nothing is read before Postgres is connected
        assert self._loop is not None
        self._loop.create_task(self._connect_up(link))
        return link.down

    async def _connect_up(self, link: Link) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.create_connection(lambda: link.up, *self.target)
        except OSError:
            link.close(reset=True)  # Postgres is not there: pgproxy sees a reset
            return
        if link.closed:
            link.up.close(reset=True)
            return
        link.down.release("connect")

    def forget(self, link: Link) -> None:
        self._links.pop(link.id, None)

    # -- controls (any thread) --

    def _call(self, fn: Callable[[], T]) -> T:
        assert self._loop is not None
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                fut.set_result(fn())
            except BaseException as exc:
                fut.set_exception(exc)

        self._loop.call_soon_threadsafe(run)
        return fut.result(timeout=10)

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    def links(self, kind: str | None = "session") -> list[LinkInfo]:
        """Open links (server connections by default), oldest first."""
        return self._call(
            lambda: [
                link.info()
                for link in self._links.values()
                if not link.closed and (kind is None or link.kind == kind)
            ]
        )

    def pids(self) -> set[int]:
        return {info.backend_pid for info in self.links() if info.backend_pid is not None}

    def _select(self, pids: Iterable[int] | None) -> list[Link]:
        wanted = None if pids is None else set(pids)
        return [
            link
            for link in self._links.values()
            if not link.closed
            and (wanted is None or link.backend_pid in wanted)
            and (wanted is not None or link.kind != "cancel")
        ]

    def cut(self, pids: Iterable[int] | None = None, *, reset: bool = True) -> int:
        """Close the links of these backends (all server links: None) on both sides."""

        def do() -> int:
            links = self._select(pids)
            for link in links:
                link.close(reset=reset)
            return len(links)

        return self._call(do)

    def stall(self, pids: Iterable[int] | None = None, direction: Direction = "both") -> int:
        def do() -> int:
            links = self._select(pids)
            for link in links:
                link.stall(direction)
            return len(links)

        return self._call(do)

    def resume(self, pids: Iterable[int] | None = None) -> None:
        self._call(lambda: [link.resume() for link in self._select(pids)])

    def half_close(self, pid: int, toward: Literal["proxy", "server"]) -> None:
        def do() -> None:
            (link,) = self._select([pid])
            link.half_close(toward)

        self._call(do)

    def stall_after(self, pid: int, nbytes: int) -> None:
        """Forward `nbytes` more from Postgres to pgproxy on this link, then stall it toward
        pgproxy (what came after is held for `resume`): a stall in the middle of a message."""

        def do() -> None:
            (link,) = self._select([pid])
            link.down_budget = nbytes
            link.budget_action = "stall"

        self._call(do)

    def close_after(self, pid: int, nbytes: int) -> None:
        """Forward `nbytes` more from Postgres to pgproxy on this link, then cut it there:
        the stream toward pgproxy may end in the middle of a message. (Not with `delay`:
        the cut would overtake the delayed bytes.)"""

        def do() -> None:
            (link,) = self._select([pid])
            link.down_budget = nbytes
            link.budget_action = "cut"

        self._call(do)

    def cut_answer(self, pid: int, through: bytes) -> None:
        """From now on, on this link, keep messages toward pgproxy up to and including the
        first of type `through`, drop whole messages after it until Postgres sends an
        ErrorResponse, then forward the kept ones with the error in one write, and everything
        after. (Only while the server owes nothing: the stream is at a message boundary.)"""

        def do() -> None:
            (link,) = self._select([pid])
            link.cutter = _AnswerCutter(through)

        self._call(do)

    def delay(self, seconds: float) -> None:
        self.delay_seconds = seconds

    def hang_new(self, on: bool = True) -> None:
        """New connections are accepted and never answered (existing links go on)."""

        def do() -> None:
            self._hang_new = on

        self._call(do)

    def refuse(self) -> None:
        """Close the listening socket: new connections are refused, existing ones go on."""

        async def do() -> None:
            if self._listener is not None:
                # close() closes the listening socket at once; wait_closed() would wait for
                # every accepted connection on newer Pythons.
                self._listener.close()
                self._listener = None

        self._run(do())

    def accept(self) -> None:
        """Listen again, on the same port, after `refuse`."""

        async def do() -> None:
            if self._listener is None:
                await self._listen(self.port)

        self._run(do())
