"""A large result (1M rows, ~100 MB) read by a fast client and by a slow one.

The fast client reads as fast as it can: its rate is what each target can stream. The slow
client reads at a fixed rate (10 MB/s by default) while the pooler's RSS is sampled: a
pooler that honours back-pressure stops reading from PostgreSQL when the client falls
behind, so its memory stays flat instead of growing by the size of the result. Direct runs
only the fast client (it has no pooler memory to watch). Fresh targets, so that RSS growth
is this section's alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import pgclient
from pgbench_rounds import rotated
from procfs import CpuClock, RssSampler
from report import fmt, median_of, ratio, spread, table
from targets import BENCH, Target

from pgproxy.localpg import LocalPostgres

TABLE = "bench_large"
# Text width of the payload column: with the int column and DataRow framing (~22 bytes)
# a row is about 100 bytes on the wire, so 1M rows are ~100 MB.
PAYLOAD_WIDTH = 78
BYTES_PER_ROW = 100


@dataclass
class LargeRead:
    target: str
    kind: str  # "fast" or "slow"
    repetition: int
    received: int = 0
    seconds: float = 0.0
    cpu_seconds: float | None = None
    rss_before_kib: int | None = None
    rss_peak_kib: int | None = None
    error: str | None = None

    @property
    def mb_per_s(self) -> float:
        return self.received / self.seconds / 1e6 if self.seconds else 0.0

    @property
    def growth_kib(self) -> int | None:
        if self.rss_peak_kib is None or self.rss_before_kib is None:
            return None
        return self.rss_peak_kib - self.rss_before_kib


def create_table(pg: LocalPostgres, rows: int) -> None:
    for statement in (
        f"CREATE TABLE {TABLE} AS SELECT i, repeat('x', {PAYLOAD_WIDTH}) AS payload"
        f" FROM generate_series(1, {rows}) AS i",
        f"ALTER TABLE {TABLE} OWNER TO {BENCH.user}",
        # VACUUM cannot share a transaction with the rest, hence one statement at a time.
        f"VACUUM ANALYZE {TABLE}",
    ):
        pg.execute(statement, database=BENCH.database)


def read_once(
    target: Target, kind: str, repetition: int, rows: int, rate: float | None
) -> LargeRead:
    """One client reading the whole table through `target`, with the pooler watched."""
    read = LargeRead(target.name, kind, repetition)
    try:
        sock = pgclient.connect(target.port, BENCH)
    except (OSError, pgclient.LoginError) as exc:
        read.error = f"login failed: {exc}"
        return read
    sampler = RssSampler(target.pid) if target.pid is not None else None
    cpu = CpuClock(target.pid)
    try:
        with sampler or contextlib.nullcontext():
            transfer = pgclient.read_result(
                sock, f"SELECT i, payload FROM {TABLE}", f"SELECT {rows}", rate
            )
        read.received, read.seconds = transfer.received, transfer.seconds
    except OSError as exc:
        read.error = str(exc)
    finally:
        pgclient.close(sock)
    read.cpu_seconds = cpu.elapsed()
    if sampler is not None:
        read.rss_before_kib, read.rss_peak_kib = sampler.first_kib, sampler.peak_kib
    return read


def run_large(
    targets: Sequence[Target], rows: int, repetitions: int, slow_rate_mb: float
) -> list[LargeRead]:
    """Per repetition: a fast read through every target, then a slow one through each pooler."""
    reads: list[LargeRead] = []
    for repetition in range(1, repetitions + 1):
        order = rotated(targets, repetition - 1)
        plan: list[tuple[Target, str, float | None]] = [(t, "fast", None) for t in order]
        plan += [(t, "slow", slow_rate_mb * 1e6) for t in order if t.pid is not None]
        for target, kind, rate in plan:
            read = read_once(target, kind, repetition, rows, rate)
            reads.append(read)
            print(
                f"large {repetition}/{repetitions} {kind} {target.name:<17} "
                f"{read.received / 1e6:>7.1f} MB {read.mb_per_s:>7.1f} MB/s"
                + (f" peak RSS {read.rss_peak_kib / 1024:.1f} MiB" if read.rss_peak_kib else "")
                + (f"  ERROR: {read.error}" if read.error else ""),
                flush=True,
            )
    return reads


def _good(reads: Sequence[LargeRead], target: str, kind: str) -> list[LargeRead]:
    return [r for r in reads if r.target == target and r.kind == kind and r.error is None]


def _fast_medians(reads: Sequence[LargeRead], target: str) -> tuple[float | None, float | None]:
    """Median MB/s and pooler CPU s per 100 MB of `target`'s good fast reads."""
    fast = _good(reads, target, "fast")
    cpu = [r.cpu_seconds / r.received * 1e8 for r in fast if r.cpu_seconds is not None]
    return median_of([r.mb_per_s for r in fast]), median_of(cpu)


def _mib(kib: float | None) -> str:
    return fmt(kib / 1024 if kib is not None else None, 1)


def render(
    reads: Sequence[LargeRead], measured: Sequence[str], rows: int, slow_rate_mb: float
) -> list[str]:
    size = median_of([float(r.received) for r in reads if r.error is None])
    fast_rows, slow_rows = [], []
    for name in measured:
        fast = _good(reads, name, "fast")
        rate, cpu = _fast_medians(reads, name)
        fast_rows.append(
            [
                name,
                fmt(rate, 1),
                spread([r.mb_per_s for r in fast], 1),
                fmt(cpu, 2),
                _mib(median_of([float(r.rss_peak_kib) for r in fast if r.rss_peak_kib])),
                f"{len(fast)}/{len([r for r in reads if r.target == name and r.kind == 'fast'])}",
            ]
        )
        slow = _good(reads, name, "slow")
        if slow:
            slow_rows.append(
                [
                    name,
                    _mib(min(float(r.rss_before_kib or 0) for r in slow)),
                    _mib(max(float(r.rss_peak_kib or 0) for r in slow)),
                    _mib(max(float(r.growth_kib or 0) for r in slow)),
                    fmt(median_of([r.seconds for r in slow]), 1),
                ]
            )
    proxy_rate, proxy_cpu = _fast_medians(reads, "pgproxy")
    bouncer_rate, bouncer_cpu = _fast_medians(reads, "pgbouncer")
    direct_rate, _ = _fast_medians(reads, "direct")
    failures = [r for r in reads if r.error is not None]
    return [
        "## Large result",
        "",
        f"`SELECT i, payload FROM {TABLE}`: {rows:,} rows, "
        f"{fmt(size / 1e6 if size else None, 1)} MB on the wire, read through each target by a "
        "minimal client of our own (`bench/pgclient.py`, simple protocol, SCRAM login). The "
        "fast client reads as fast as it can; the slow one reads at "
        f"{slow_rate_mb:g} MB/s while the pooler's VmRSS is sampled every 50 ms. Medians over "
        "repetitions.",
        "",
        "### Fast client",
        "",
        *table(
            [
                "target",
                "MB/s (median)",
                "MB/s min-max",
                "pooler CPU s / 100 MB",
                "pooler peak RSS MiB",
                "reads ok",
            ],
            fast_rows,
            "lrrrrr",
        ),
        f"pgproxy / PgBouncer rate: **{ratio(proxy_rate, bouncer_rate)}**, CPU per MB: "
        f"**{ratio(proxy_cpu, bouncer_cpu)}**; rate pgproxy / direct: "
        f"{ratio(proxy_rate, direct_rate)}, PgBouncer / direct: "
        f"{ratio(bouncer_rate, direct_rate)}. PostgreSQL, the pooler and the client share "
        "the machine's cores, so the rate is capped by the machine as much as by the "
        "pooler; CPU per MB is the pooler's own cost.",
        "",
        f"### Slow client ({slow_rate_mb:g} MB/s)",
        "",
        *table(
            [
                "pooler",
                "RSS before MiB",
                "peak RSS MiB (max)",
                "RSS growth MiB (max)",
                "read took s",
            ],
            slow_rows,
            "lrrrr",
        ),
        *(f"- {r.kind} read {r.repetition} through {r.target} failed: {r.error}" for r in failures),
        *([""] if failures else []),
    ]
