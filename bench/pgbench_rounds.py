"""pgbench rounds: every workload and client count against every target, interleaved.

To keep the noise fair, every round runs each workload and client count against every
target, in an order rotated from one measurement block to the next, and the targets stay up
for the whole section so that one measurement is exactly one pgbench run.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import statistics
import subprocess
import threading
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field

from procfs import CpuClock
from report import fmt, median_of, ratio, spread, table
from targets import BENCH, HOST, RELAY, Target

# pgbench connects every client before it starts the clock; 1000 SCRAM logins on two
# cores take a while, and a wedged target must not hang the whole run.
PGBENCH_GRACE = 120.0
# Prometheus scrapes every 15-60 s; once a second makes any cost of /metrics visible.
SCRAPE_INTERVAL = 1.0


@dataclass(frozen=True, slots=True)
class Workload:
    """A pgbench script and query protocol; `pgbench_args` go before the common options."""

    name: str
    pgbench_args: tuple[str, ...]
    description: str


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload("select-simple", ("-S", "-M", "simple"), "select-only, simple protocol"),
        Workload("select-extended", ("-S", "-M", "extended"), "select-only, extended protocol"),
        Workload(
            "select-prepared",
            ("-S", "-M", "prepared"),
            "select-only, extended protocol with named prepared statements",
        ),
        Workload("tpcb-simple", ("-M", "simple"), "TPC-B-like, simple protocol"),
        Workload("tpcb-extended", ("-M", "extended"), "TPC-B-like, extended protocol"),
        Workload(
            "tpcb-prepared",
            ("-M", "prepared"),
            "TPC-B-like, extended protocol with named prepared statements",
        ),
        Workload(
            "storm",
            ("-S", "-C", "-M", "simple"),
            "connection storm: select-only with a new connection, and so a SCRAM login, for "
            "every transaction (direct: a new PostgreSQL backend each time)",
        ),
    )
}


@dataclass
class Measurement:
    target: str
    workload: str
    clients: int
    round: int
    tps: float = 0.0
    latency_ms: float = 0.0
    # pgbench's "initial connection time" (all clients logging in, before the clock runs);
    # with -C its "average connection time" per transaction instead.
    connect_ms: float = 0.0
    transactions: int = 0
    # Pooler CPU seconds spent during the pgbench run; None for direct.
    cpu_seconds: float | None = None
    # /metrics scrapes done during the run, and their mean duration.
    scrapes: int = 0
    scrape_ms: float = 0.0
    error: str | None = None

    @property
    def cpu_per_1000_tx(self) -> float | None:
        if self.cpu_seconds is None or self.transactions == 0:
            return None
        return self.cpu_seconds / self.transactions * 1000


@dataclass
class Rounds:
    """What the pgbench section ran and measured."""

    workloads: list[Workload]
    clients: list[int]
    rounds: int
    duration: int
    scale: int
    measurements: list[Measurement] = field(default_factory=list)


class Scraper(threading.Thread):
    """GETs /metrics every SCRAPE_INTERVAL seconds until stopped, timing each scrape."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.url = f"http://{HOST}:{port}/metrics"
        self.stopped = threading.Event()
        self.durations: list[float] = []

    def run(self) -> None:
        while not self.stopped.wait(SCRAPE_INTERVAL):
            started = time.monotonic()
            with contextlib.suppress(OSError), urllib.request.urlopen(self.url, timeout=5) as r:
                r.read()
                self.durations.append(time.monotonic() - started)


# -- pgbench ---------------------------------------------------------------------------


def pgbench_env() -> dict[str, str]:
    # sslmode=disable: Postgres and both poolers run without TLS here; skipping the
    # SSLRequest round trip keeps connection setup identical for every target.
    return {**os.environ, "PGPASSWORD": BENCH.password, "PGSSLMODE": "disable"}


def pgbench_args(port: int) -> list[str]:
    return ["-h", HOST, "-p", str(port), "-U", BENCH.user]


def parse_pgbench(output: str, measurement: Measurement) -> None:
    tps = re.search(
        # PostgreSQL 14+ says "without initial connection time" (with -C "including
        # reconnection times"), older versions "excluding connections establishing".
        r"^tps = ([\d.]+) \((?:without initial connection time|including reconnection times"
        r"|excluding connections establishing)\)",
        output,
        re.MULTILINE,
    )
    latency = re.search(r"^latency average = ([\d.]+) ms", output, re.MULTILINE)
    processed = re.search(r"^number of transactions actually processed: (\d+)", output, re.M)
    failed = re.search(r"^number of failed transactions: (\d+)", output, re.MULTILINE)
    connect = re.search(r"^(?:initial|average) connection time = ([\d.]+) ms", output, re.M)
    if processed is not None and int(processed.group(1)) == 0:
        # -T counts from before the logins: with many clients they can eat the whole run.
        measurement.error = "no transaction completed; logins may take longer than --duration"
        return
    if tps is None or latency is None or processed is None:
        last_lines = " / ".join(output.strip().splitlines()[-3:])
        measurement.error = f"could not parse pgbench output: {last_lines}"
        return
    if connect is not None:
        measurement.connect_ms = float(connect.group(1))
    measurement.tps = float(tps.group(1))
    measurement.latency_ms = float(latency.group(1))
    measurement.transactions = int(processed.group(1))
    if failed is not None and int(failed.group(1)) > 0:
        measurement.error = f"{failed.group(1)} failed transactions"


def measure(
    pgbench: str,
    target: Target,
    workload: Workload,
    clients: int,
    duration: int,
    *,
    round_no: int = 0,
    scrape: bool = True,
) -> Measurement:
    """One pgbench run against `target`, with the pooler's CPU over the run."""
    measurement = Measurement(target.name, workload.name, clients, round_no)
    command = [
        pgbench, *workload.pgbench_args, "-n",
        "-c", str(clients), "-j", str(min(2, clients)), "-T", str(duration),
        *pgbench_args(target.port), BENCH.database,
    ]  # fmt: skip
    cpu = CpuClock(target.pid)
    scraper = Scraper(target.metrics_port) if target.metrics_port and scrape else None
    if scraper is not None:
        scraper.start()
    try:
        result = subprocess.run(
            command,
            env=pgbench_env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=duration + PGBENCH_GRACE,
            check=False,
        )
    except subprocess.TimeoutExpired:
        measurement.error = f"pgbench did not finish within {duration + PGBENCH_GRACE:.0f} s"
        return measurement
    finally:
        if scraper is not None:
            scraper.stopped.set()
            scraper.join(10)
            measurement.scrapes = len(scraper.durations)
            if scraper.durations:
                measurement.scrape_ms = statistics.mean(scraper.durations) * 1000
    measurement.cpu_seconds = cpu.elapsed()
    parse_pgbench(result.stdout, measurement)
    if result.returncode != 0:
        stderr = "\n".join(result.stderr.strip().splitlines()[-5:])
        measurement.error = f"pgbench exit {result.returncode}: {stderr}"
    return measurement


def warm_up(pgbench: str, target: Target, clients: int, duration: int) -> None:
    """Fill the pooler's server pool so the first measured run does not pay for it."""
    if target.process is None:
        return
    with contextlib.suppress(subprocess.TimeoutExpired):
        subprocess.run(
            [
                pgbench,
                "-S",
                "-n",
                "-c",
                str(clients),
                "-T",
                str(duration),
                *pgbench_args(target.port),
                BENCH.database,
            ],
            env=pgbench_env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=duration + PGBENCH_GRACE,
            check=False,
        )


def rotated(targets: Sequence[Target], by: int) -> list[Target]:
    shift = by % len(targets) if targets else 0
    return [*targets[shift:], *targets[:shift]]


def run_rounds(pgbench: str, targets: Sequence[Target], rounds: Rounds) -> None:
    """Measure every (round, workload, client count, target), appending to `rounds`."""
    block = 0
    for round_no in range(1, rounds.rounds + 1):
        for workload in rounds.workloads:
            for count in rounds.clients:
                for target in rotated(targets, block):
                    m = measure(
                        pgbench, target, workload, count, rounds.duration, round_no=round_no
                    )
                    rounds.measurements.append(m)
                    print_measurement(m, rounds.rounds)
                block += 1


def print_measurement(m: Measurement, rounds: int) -> None:
    cpu = m.cpu_per_1000_tx
    print(
        f"round {m.round}/{rounds} {m.workload:<15} {m.clients:>5} clients {m.target:<17} "
        f"{m.tps:>10,.0f} tps {m.latency_ms:>8.3f} ms"
        + (f" {cpu:.3f} CPU s/1000 tx" if cpu is not None else "")
        + (f"  ERROR: {m.error}" if m.error else ""),
        flush=True,
    )


# -- report ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Summary:
    """The good runs of one (workload, target, client count)."""

    runs: int
    tps: float | None
    tps_values: list[float]
    latency: float | None
    connect: float | None
    cpu: float | None  # CPU s per 1000 transactions


def summary(rounds: Rounds, workload: str, target: str, clients: int) -> Summary:
    good = [
        m
        for m in rounds.measurements
        if m.workload == workload
        and m.target == target
        and m.clients == clients
        and m.error is None
    ]
    tps = [m.tps for m in good]
    return Summary(
        runs=len(good),
        tps=median_of(tps),
        tps_values=tps,
        latency=median_of([m.latency_ms for m in good]),
        connect=median_of([m.connect_ms for m in good]),
        cpu=median_of([c for m in good if (c := m.cpu_per_1000_tx) is not None]),
    )


def render_intro(rounds: Rounds) -> list[str]:
    return [
        "## pgbench",
        "",
        f"Workloads, each `pgbench <flags> -n -c <clients> -j 2 -T {rounds.duration}` "
        f"(`-j 1` for a single client) on a scale-{rounds.scale} database:",
        "",
        *(
            f"- `{w.name}`: `{shlex.join(w.pgbench_args)}`, {w.description}"
            for w in rounds.workloads
        ),
        "",
        f"{rounds.rounds} round(s), each running every workload and client count against every "
        "target in a rotated order, the poolers up for the whole section. tps excludes "
        "pgbench's initial connection time (except `storm`, where connecting is the work); "
        "pooler CPU is utime+stime of the pooler process (and children) over the "
        "whole pgbench run, client logins included. `-T` counts from before the logins, so "
        "with many clients the measured part of each run is shorter by the initial "
        "connection time. Medians over rounds.",
        "",
    ]


def render_workload(rounds: Rounds, workload: Workload, measured: Sequence[str]) -> list[str]:
    """One workload's per-client-count tables and its ratio table."""
    name = workload.name
    lines = [
        f"### {name}",
        "",
        f"`pgbench {shlex.join(workload.pgbench_args)}`: {workload.description}.",
        "",
    ]
    connect_header = (
        "connection ms (average)" if "-C" in workload.pgbench_args else "initial connection ms"
    )
    for clients in rounds.clients:
        rows = []
        for target in measured:
            s = summary(rounds, name, target, clients)
            rows.append(
                [
                    target,
                    fmt(s.tps),
                    spread(s.tps_values),
                    fmt(s.latency, 3),
                    fmt(s.cpu, 3),
                    fmt(s.connect),
                    f"{s.runs}/{rounds.rounds}",
                ]
            )
        lines += [f"#### {name}, {clients} clients", ""]
        lines += table(
            [
                "target",
                "tps (median)",
                "tps min-max",
                "latency avg ms",
                "pooler CPU s / 1000 tx",
                connect_header,
                "runs ok",
            ],
            rows,
            "lrrrrrr",
        )
    relay = RELAY in measured
    rows = []
    for clients in rounds.clients:
        # A target with no good run (not measured, or every run failed) gives None: "—".
        proxy = summary(rounds, name, "pgproxy", clients)
        bouncer = summary(rounds, name, "pgbouncer", clients)
        direct = summary(rounds, name, "direct", clients)
        row = [
            str(clients),
            ratio(proxy.tps, bouncer.tps),
            ratio(proxy.cpu, bouncer.cpu),
            ratio(proxy.tps, direct.tps),
            ratio(bouncer.tps, direct.tps),
        ]
        if relay:
            floor = summary(rounds, name, RELAY, clients)
            row += [ratio(floor.cpu, bouncer.cpu), ratio(proxy.cpu, floor.cpu)]
        rows.append(row)
    lines += [f"#### {name}: ratios of medians", ""]
    headers = [
        "clients",
        "pgproxy / PgBouncer tps",
        "pgproxy / PgBouncer CPU per tx",
        "pgproxy / direct tps",
        "PgBouncer / direct tps",
    ]
    if relay:
        headers += ["uvloop-relay / PgBouncer CPU per tx", "pgproxy / uvloop-relay CPU per tx"]
    lines += table(headers, rows, "r" * len(headers))
    return lines


def render_overview(rounds: Rounds) -> list[str]:
    """The headline: pgproxy against PgBouncer for every workload and client count."""
    # The relay's column only when it ran: the CPU floor uvloop sets, against PgBouncer's.
    relay = any(m.target == RELAY for m in rounds.measurements)
    rows = []
    for workload in rounds.workloads:
        for clients in rounds.clients:
            proxy = summary(rounds, workload.name, "pgproxy", clients)
            bouncer = summary(rounds, workload.name, "pgbouncer", clients)
            row = [
                workload.name,
                str(clients),
                fmt(proxy.tps),
                fmt(bouncer.tps),
                ratio(proxy.tps, bouncer.tps),
                ratio(proxy.cpu, bouncer.cpu),
            ]
            if relay:
                row.append(ratio(summary(rounds, workload.name, RELAY, clients).cpu, bouncer.cpu))
            rows.append(row)
    headers = [
        "workload",
        "clients",
        "pgproxy tps",
        "PgBouncer tps",
        "tps ratio",
        "CPU per tx ratio",
    ]
    if relay:
        headers.append("uvloop-relay / PgBouncer CPU per tx")
    return [
        "### Overview: pgproxy / PgBouncer",
        "",
        *table(headers, rows, "l" + "r" * (len(headers) - 1)),
    ]


def render_prepared_vs_extended(rounds: Rounds) -> list[str]:
    """pgproxy with named prepared statements against unnamed ones, per script."""
    names = {w.name for w in rounds.workloads}
    scripts = [s for s in ("select", "tpcb") if {f"{s}-extended", f"{s}-prepared"} <= names]
    if not scripts:
        return []
    rows = []
    for script in scripts:
        for clients in rounds.clients:
            extended = summary(rounds, f"{script}-extended", "pgproxy", clients)
            prepared = summary(rounds, f"{script}-prepared", "pgproxy", clients)
            rows.append(
                [
                    script,
                    str(clients),
                    fmt(extended.tps),
                    fmt(prepared.tps),
                    ratio(prepared.tps, extended.tps),
                    fmt(extended.cpu, 3),
                    fmt(prepared.cpu, 3),
                ]
            )
    return [
        "### Prepared vs extended (pgproxy)",
        "",
        "PgBouncer 1.18 cannot run `-M prepared` in transaction mode, so pgproxy's named "
        "prepared statements are compared with its own unnamed ones.",
        "",
        *table(
            [
                "script",
                "clients",
                "extended tps",
                "prepared tps",
                "prepared / extended tps",
                "extended CPU s / 1000 tx",
                "prepared CPU s / 1000 tx",
            ],
            rows,
            "lrrrrrr",
        ),
    ]


def render_metrics_cost(rounds: Rounds) -> list[str]:
    """pgproxy with /metrics scraped every second (and its monitor) against pgproxy without."""
    rows = []
    for workload in rounds.workloads:
        for clients in rounds.clients:
            on = summary(rounds, workload.name, "pgproxy", clients)
            off = summary(rounds, workload.name, "pgproxy-nometrics", clients)
            scraped = [
                m
                for m in rounds.measurements
                if m.workload == workload.name
                and m.target == "pgproxy"
                and m.clients == clients
                and m.error is None
            ]
            scrapes = median_of([float(m.scrapes) for m in scraped])
            scrape_ms = median_of([m.scrape_ms for m in scraped if m.scrapes])
            rows.append(
                [
                    workload.name,
                    str(clients),
                    fmt(on.tps),
                    fmt(off.tps),
                    ratio(on.tps, off.tps),
                    ratio(on.cpu, off.cpu),
                    fmt(scrapes),
                    fmt(scrape_ms, 1),
                ]
            )
    return [
        "### Cost of observability (pgproxy)",
        "",
        f"`pgproxy` serves /metrics, scraped every {SCRAPE_INTERVAL:g} s during each run, and "
        "reads pg_stat_activity every 5 s; `pgproxy-nometrics` has both off.",
        "",
        *table(
            [
                "workload",
                "clients",
                "tps with",
                "tps without",
                "with / without tps",
                "CPU per tx with / without",
                "scrapes per run",
                "mean scrape ms",
            ],
            rows,
            "lrrrrrrr",
        ),
    ]


def render_failures(rounds: Rounds) -> list[str]:
    failures = [m for m in rounds.measurements if m.error is not None]
    if not failures:
        return []
    return [
        "### Failed pgbench runs",
        "",
        *(
            f"- round {m.round}, {m.workload}, {m.clients} clients, {m.target}: "
            + (m.error or "").replace("\n", " / ")
            for m in failures
        ),
        "",
    ]


def render(rounds: Rounds, measured: Sequence[str]) -> list[str]:
    lines = render_intro(rounds)
    if "pgproxy" in measured and "pgbouncer" in measured:
        lines += render_overview(rounds)
    for workload in rounds.workloads:
        lines += render_workload(rounds, workload, measured)
    if "pgproxy" in measured:
        lines += render_prepared_vs_extended(rounds)
    if "pgproxy" in measured and "pgproxy-nometrics" in measured:
        lines += render_metrics_cost(rounds)
    return lines + render_failures(rounds)
