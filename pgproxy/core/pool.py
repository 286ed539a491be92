"""`Pool`: the server connections of one (database, user) and the clients waiting for one.

Idle servers are a LIFO stack (the most recently used is reused first: its caches are warm and
the others can time out), waiting clients a FIFO queue. Pure bookkeeping: the shell opens and
closes connections; times are arguments.
"""

from collections.abc import Hashable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from pgproxy.core.prepared import StatementCounts
from pgproxy.core.stats import PoolStats

S = TypeVar("S", bound=Hashable)
C = TypeVar("C", bound=Hashable)


@dataclass(frozen=True, slots=True)
class PoolKey:
    database: str  # the name clients use
    user: str

    def __str__(self) -> str:
        return f"{self.database}/{self.user}"

    def __hash__(self) -> int:
        # Written out so that it is compiled: the dataclass's own runs interpreted.
        return hash((self.database, self.user))


class Pool(Generic[S, C]):
    # A plain class, not a dataclass: mypyc compiles this one (pgproxy/hotpath.py), and a
    # compiled generic dataclass fails at import.
    def __init__(self, key: PoolKey, size: int, min_size: int = 0) -> None:
        self.key = key
        self.size = size
        self.min_size = min_size
        # Servers in the pool and when each became idle (insertion order = LIFO via popitem).
        self.idle: dict[S, float] = {}
        self.active: set[S] = set()
        # Servers being reset after their client left (rollback, reset query); not available.
        self.resetting: set[S] = set()
        self.connecting = 0
        # When the server the last checkout took had become idle (server_check_delay).
        self.taken_idle_since = 0.0
        # Clients waiting for a server, oldest first, with when they started waiting.
        self.waiters: dict[C, float] = {}
        # ParameterStatus values of a fresh server connection (the "welcome"), once known.
        self.welcome: dict[str, str] | None = None
        # Server-side names of statements some server of this pool prepared successfully, most
        # recent last (bounded): a client's Parse of one can be answered without a server.
        self.known_statements: dict[bytes, None] = {}
        self.statement_counts = StatementCounts()
        self.stats = PoolStats()
        # PAUSE: no server is handed out (clients queue) until RESUME.
        self.paused = False
        # Where its servers connect: the proxy's PoolTarget, replaced by a RELOAD that moves
        # the pool. A server whose own target is not this object is closed at checkin.
        self.target: object = None

    def __repr__(self) -> str:
        idle, active = len(self.idle), len(self.active)
        return f"Pool({self.key}, size={self.size}, idle={idle}, active={active})"

    def note_prepared(self, names: list[bytes], limit: int = 10_000) -> None:
        known = self.known_statements
        for name in names:
            known.pop(name, None)
            known[name] = None
        while len(known) > limit:
            del known[next(iter(known))]

    @property
    def total(self) -> int:
        """Servers that count against `size`."""
        return len(self.idle) + len(self.active) + len(self.resetting) + self.connecting

    def checkout(self, client: C, now: float) -> S | None:
        """The most recently used idle server, or None after queueing the client."""
        if self.idle and not self.waiters and not self.paused:
            return self.take_idle()
        self.waiters.setdefault(client, now)
        return None

    def put_back(self, server: S) -> None:
        """Undo the `checkout` that just took `server`: idle again, the most recent."""
        self.active.discard(server)
        self.idle[server] = self.taken_idle_since

    def take_idle(self) -> S:
        """The most recently used idle server, now active, even with clients waiting (for
        the caller to check it or hand it to the first of them); `taken_idle_since` says
        when it became idle."""
        server, self.taken_idle_since = self.idle.popitem()
        self.active.add(server)
        return server

    def launches_needed(self) -> int:
        """How many server connections to open now for waiters and `min_size`."""
        room = self.size - self.total
        if room <= 0 or self.paused:
            return 0
        want = max(len(self.waiters) - self.connecting - len(self.resetting), 0)
        want = max(want, self.min_size - self.total)
        return min(want, room)

    def checkin(self, server: S, now: float) -> C | None:
        """Return a clean server: it goes to the oldest waiter (returned), or becomes idle."""
        self.active.discard(server)
        if self.resetting:
            self.resetting.discard(server)
        if not self.paused:
            # The oldest waiter, if any. Compiled, the loop beats next(iter()); it stops at
            # the first key, so deleting that key does not disturb it.
            for client in self.waiters:
                del self.waiters[client]
                self.active.add(server)
                return client
        self.idle[server] = now
        return None

    def add_connected(self, server: S, now: float) -> C | None:
        """A new server finished logging in."""
        self.connecting -= 1
        return self.checkin(server, now)

    def start_reset(self, server: S) -> None:
        self.active.discard(server)
        self.resetting.add(server)

    def remove(self, server: S) -> None:
        """Forget a server that is closed or about to be."""
        self.idle.pop(server, None)
        self.active.discard(server)
        self.resetting.discard(server)

    def cancel_wait(self, client: C) -> None:
        self.waiters.pop(client, None)

    def expired_waiters(self, now: float, timeout: float) -> list[C]:
        """Waiters past `query_wait_timeout` (0 = never), removed from the queue."""
        if timeout <= 0 or not self.waiters:
            return []
        expired = []
        for client, since in self.waiters.items():
            if now - since < timeout:
                break  # FIFO: the rest waited less
            expired.append(client)
        for client in expired:
            del self.waiters[client]
        return expired

    def idle_servers(self) -> Iterator[tuple[S, float]]:
        """Idle servers, least recently used first, with when each became idle."""
        return iter(list(self.idle.items()))
