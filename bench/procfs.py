"""What /proc says about a pooler: CPU seconds used and resident memory, sampled.

Every section measures the pooler's cost the same way through these helpers: `CpuClock` for
CPU seconds over a stretch of work, `rss_kib` for one reading of resident memory and
`RssSampler` for its peak while something runs. Linux only.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from types import TracebackType

# How often RssSampler reads VmRSS: fast enough to catch a buffer that lives for 100 ms.
RSS_INTERVAL = 0.05


def cpu_seconds(pid: int) -> float:
    """utime + stime of `pid` and all its live descendants (a pooler may fork workers)."""
    parents: dict[int, int] = {}
    ticks: dict[int, int] = {}
    for stat_path in Path("/proc").glob("[0-9]*/stat"):
        try:
            stat = stat_path.read_text()
        except OSError:
            continue  # exited while we looked
        # The command name in (…) may hold spaces; the numeric fields follow the last ")".
        fields = stat[stat.rindex(")") + 2 :].split()
        child = int(stat_path.parent.name)
        parents[child] = int(fields[1])
        ticks[child] = int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        for child, ppid in parents.items():
            if ppid == parent and child not in tree:
                tree.add(child)
                frontier.append(child)
    return sum(ticks.get(p, 0) for p in tree) / os.sysconf("SC_CLK_TCK")


class CpuClock:
    """CPU seconds a process (tree) spends from construction on; `pid` None reads as None."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self.started = cpu_seconds(pid) if pid is not None else 0.0

    def elapsed(self) -> float | None:
        return cpu_seconds(self.pid) - self.started if self.pid is not None else None


def rss_kib(pid: int) -> int | None:
    """VmRSS of `pid` in KiB (the process itself, not its children); None once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return None  # a zombie has no VmRSS


class RssSampler(threading.Thread):
    """Reads VmRSS every RSS_INTERVAL while in its `with` block; keeps the first and peak."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.first_kib = rss_kib(pid) or 0
        self.peak_kib = self.first_kib
        self.samples = 1
        self._stopped = threading.Event()

    def run(self) -> None:
        while not self._stopped.wait(RSS_INTERVAL):
            self._sample()

    def _sample(self) -> None:
        value = rss_kib(self.pid)
        if value is not None:
            self.peak_kib = max(self.peak_kib, value)
            self.samples += 1

    def __enter__(self) -> RssSampler:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stopped.set()
        self.join()
        self._sample()  # the last moment counts too
