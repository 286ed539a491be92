"""Per-pool counters and histograms: bumped on the data path, read by /metrics and the admin.

Plain integers and lists, no locks and no labels: everything runs on the event loop thread,
and the readers (the metrics endpoint, the admin console) run there too.
"""

from dataclasses import dataclass, field
from typing import Final

# Upper bounds, in seconds, of the duration histograms (waits, queries, transactions).
DURATION_BUCKETS: Final[tuple[float, ...]] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
)


class Histogram:
    """Counts of observations per bucket (upper bounds inclusive), their sum and number."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...] = DURATION_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        # A scan from the smallest bound, not bisect: most observations on the data path are
        # sub-millisecond and stop at the first or second bound (compiled, native floats).
        index = 0
        for bound in self.bounds:
            if value <= bound:
                break
            index += 1
        self.counts[index] += 1
        self.sum += value
        self.count += 1

    def observe_nothing(self) -> None:
        """observe(0.0), for the hot path (a client that did not wait at all)."""
        self.counts[0] += 1
        self.count += 1

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations at most that), ending with (inf, count): Prometheus'."""
        out = []
        total = 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += count
            out.append((bound, total))
        return out


@dataclass(slots=True)
class PoolStats:
    """What one (database, user) pool has done since the proxy started."""

    # ReadyForQuery messages answering a client's Query or Sync, and those among them that
    # end a transaction (status idle: an autocommit statement, COMMIT or ROLLBACK).
    queries: int = 0
    transactions: int = 0
    received: int = 0  # bytes from this pool's clients
    sent: int = 0  # bytes to this pool's clients
    # Seconds a client waited for a server; a query (first message to ReadyForQuery); a
    # transaction (from its first message to the ReadyForQuery that says idle again).
    wait_time: Histogram = field(default_factory=Histogram)
    query_time: Histogram = field(default_factory=Histogram)
    transaction_time: Histogram = field(default_factory=Histogram)
    # Errors sent to clients, by SQLSTATE: the server's, and the proxy's own.
    errors: dict[str, int] = field(default_factory=dict)
    logins: int = 0
    login_failures: int = 0
    # Clients closed by the proxy, by reason (a DisconnectReason value).
    disconnects: dict[str, int] = field(default_factory=dict)
    pins: int = 0  # server connections pinned to a client (transaction mode)

    def count_error(self, sqlstate: str) -> None:
        self.errors[sqlstate] = self.errors.get(sqlstate, 0) + 1

    def count_disconnect(self, reason: str) -> None:
        self.disconnects[reason] = self.disconnects.get(reason, 0) + 1
