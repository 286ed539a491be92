"""Maintenance decisions, made once per tick: which idle servers to close and why.

Pure: the shell passes `now` and the pool's idle servers; it does the closing. Only idle
servers are ever chosen (`server_idle_timeout` and `server_lifetime` never interrupt a client,
same as PgBouncer).
"""

from collections.abc import Iterable
from typing import TypeVar

from pgproxy.core.server import DisconnectReason

S = TypeVar("S")


def idle_servers_to_close(
    idle: Iterable[tuple[S, float, float]],
    *,
    now: float,
    keep: int,
    idle_timeout: float,
    lifetime: float,
) -> list[tuple[S, DisconnectReason]]:
    """`idle` = (server, idle since, created at), least recently used first.

    Past `lifetime` a server is replaced whatever `keep` says (the warm-up tops the pool up
    again); past `idle_timeout` it is closed only while the pool stays above `keep`.
    """
    entries = list(idle)
    chosen: list[tuple[S, DisconnectReason]] = [
        (server, DisconnectReason.LIFETIME)
        for server, _idle_since, created_at in entries
        if lifetime > 0 and now - created_at >= lifetime
    ]
    # Count the lifetime closes first, so that the idle ones never take the pool below keep.
    surplus = len(entries) - len(chosen) - keep
    old = {id(server) for server, _ in chosen}
    for server, idle_since, _created_at in entries:
        if surplus <= 0:
            break
        if id(server) not in old and idle_timeout > 0 and now - idle_since >= idle_timeout:
            chosen.append((server, DisconnectReason.IDLE_TIMEOUT))
            surplus -= 1
    return chosen
