"""Fake BackendKeyData for clients and the map from it back to the client.

Each client gets a key of the proxy's own: a process id (unique among live clients) and a
random secret. A CancelRequest carries it; the shell then cancels on whichever server connection
serves that client at that moment, with the server's real key. Pure: randomness is injected.
"""

from collections.abc import Callable
from typing import Generic, TypeVar

C = TypeVar("C")

_MAX_PID = 0x7FFFFFFF


class CancelKeys(Generic[C]):
    def __init__(self, random_u32: Callable[[], int], *, first: int = 1, step: int = 1) -> None:
        """Pids are first, first + step, first + 2 step, ... (a worker's own residue)."""
        self._random_u32 = random_u32
        self._by_pid: dict[int, tuple[int, C]] = {}
        self._first = first
        self._step = step
        self._next_pid = first

    def __len__(self) -> int:
        return len(self._by_pid)

    def allocate(self, client: C) -> tuple[int, int]:
        """A (pid, secret) pair no live client has."""
        pid = self._next_pid
        while pid in self._by_pid:
            pid = self._after(pid)
        self._next_pid = self._after(pid)
        secret = self._random_u32() & 0xFFFFFFFF
        self._by_pid[pid] = (secret, client)
        return pid, secret

    def _after(self, pid: int) -> int:
        pid += self._step
        return pid if pid <= _MAX_PID else self._first

    def release(self, pid: int) -> None:
        self._by_pid.pop(pid, None)

    def lookup(self, pid: int, secret: int) -> C | None:
        entry = self._by_pid.get(pid)
        if entry is None or entry[0] != secret & 0xFFFFFFFF:
            return None
        return entry[1]
