"""pgbench through pgproxy, through PgBouncer and straight to PostgreSQL, in one run.

    .venv/bin/python bench/run.py [--clients 50,200,1000] [--rounds 3] [--duration 15]
                                  [--pool-size 20] [--workloads select-simple,tpcb-prepared]
                                  [--out bench/RESULTS.md] [--quick]

The machines we run on are shared and noisy, so absolute numbers mean little: what this
script reports are ratios between targets measured side by side. To keep the noise fair,
every round runs each workload and client count against every target, in an order rotated
from one measurement block to the next, and the poolers stay up for the whole run so that one
measurement is exactly one pgbench run.

Everything started here (a throw-away cluster, PgBouncer, pgproxy) is stopped again on
exit, Ctrl-C or error.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import platform
import pwd
import re
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pgproxy.localpg import PG_OS_USER, Credentials, LocalPostgres, free_port

REPO = Path(__file__).resolve().parent.parent
BENCH = Credentials(user="bench", password="bench-secret", database="bench")
HOST = "127.0.0.1"
# How long a pooler may take to accept TCP connections after it was spawned.
START_TIMEOUT = 15.0
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
    )
}


@dataclass
class Target:
    """Somewhere pgbench can point at; `process` is None for direct PostgreSQL."""

    name: str
    port: int
    process: subprocess.Popen[bytes] | None = None
    # Why the target is not measured (it failed to start), shown in the report.
    skipped: str | None = None
    # Where its /metrics is: scraped every SCRAPE_INTERVAL during each measurement.
    metrics_port: int | None = None


@dataclass
class Measurement:
    target: str
    workload: str
    clients: int
    round: int
    tps: float = 0.0
    latency_ms: float = 0.0
    # pgbench's "initial connection time": all clients logging in, before the clock runs.
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
class Run:
    args: argparse.Namespace
    clients: list[int]
    pg_version: str = ""
    pgbouncer_version: str = "not installed"
    pgbench_version: str = ""
    targets: list[Target] = field(default_factory=list)
    measurements: list[Measurement] = field(default_factory=list)
    started_at: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))


# -- processes -------------------------------------------------------------------------


def raise_fd_limit() -> None:
    """1000 clients need more than the usual 1024 descriptors; children inherit this."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float) -> bool:
    """Poll a TCP connect until it succeeds, the process exits, or the deadline passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.5):
            return True
        time.sleep(0.05)
    return False


def stop_process(process: subprocess.Popen[bytes] | None) -> None:
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


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


def postgres_os_user() -> str | None:
    """Whom to run PgBouncer as: like PostgreSQL, it refuses to run as root."""
    return PG_OS_USER if os.geteuid() == 0 else None


def chown_to_postgres(path: Path) -> None:
    if os.geteuid() == 0:
        entry = pwd.getpwnam(PG_OS_USER)
        os.chown(path, entry.pw_uid, entry.pw_gid)


def version_of(command: Sequence[str]) -> str:
    try:
        result = subprocess.run(command, capture_output=True, text=True, check=False)
    except OSError as exc:
        return f"unknown ({exc})"
    return (result.stdout or result.stderr).strip().splitlines()[0]


# -- targets ---------------------------------------------------------------------------


def start_pgbouncer(
    workdir: Path, pg: LocalPostgres, pool_size: int, max_client_conn: int
) -> Target:
    port = free_port(HOST)
    (workdir / "userlist.txt").write_text(f'"{BENCH.user}" "{BENCH.password}"\n')
    (workdir / "pgbouncer.ini").write_text(
        "[databases]\n"
        f"{BENCH.database} = host={pg.host} port={pg.port} dbname={BENCH.database}\n"
        "\n[pgbouncer]\n"
        f"listen_addr = {HOST}\n"
        f"listen_port = {port}\n"
        # No Unix socket: it would land in /var/run/postgresql and pgbench uses TCP anyway.
        "unix_socket_dir =\n"
        "auth_type = scram-sha-256\n"
        f"auth_file = {workdir / 'userlist.txt'}\n"
        "pool_mode = transaction\n"
        f"default_pool_size = {pool_size}\n"
        f"max_client_conn = {max_client_conn}\n"
        # 1000 clients connect at once; the default backlog of 128 turns that into SYN retries.
        "listen_backlog = 4096\n"
        # Per-connection log lines cost CPU that pgproxy does not spend either.
        "log_connections = 0\n"
        "log_disconnections = 0\n"
    )
    for name in ("userlist.txt", "pgbouncer.ini"):
        chown_to_postgres(workdir / name)
    log = workdir / "pgbouncer.log"
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            ["pgbouncer", str(workdir / "pgbouncer.ini")],
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            # Own session: Ctrl-C reaches us only, and we stop the pooler in order.
            start_new_session=True,
            # Popen switches user in the child before exec, so its pid is PgBouncer itself
            # (runuser would stay in between as the parent): /proc CPU and signals just work.
            user=postgres_os_user(),
            group=postgres_os_user(),
            extra_groups=[] if postgres_os_user() else None,
        )
    target = Target("pgbouncer", port, process)
    if not wait_for_port(port, process, START_TIMEOUT):
        stop_process(process)
        target.skipped = f"pgbouncer failed to start: {tail(log)}"
    return target


def start_pgproxy(
    workdir: Path,
    pg: LocalPostgres,
    pool_size: int,
    max_client_conn: int,
    *,
    metrics: bool = True,
) -> Target:
    """pgproxy with its metrics endpoint and server monitor (scraped while measured), or
    without either (`pgproxy-nometrics`): the pair shows what observability costs."""
    port = free_port(HOST)
    metrics_port = free_port(HOST) if metrics else None
    name = "pgproxy" if metrics else "pgproxy-nometrics"
    command = [
        sys.executable, "-m", "pgproxy",
        "--listen", f"{HOST}:{port}",
        "--server", f"{pg.host}:{pg.port}",
        "--user", f"{BENCH.user}:{BENCH.password}",
        "--default-pool-size", str(pool_size),
        "--pool-mode", "transaction",
        "--max-client-conn", str(max_client_conn),
        "--metrics-listen", f"{HOST}:{metrics_port}" if metrics_port else "",
        *([] if metrics else ["--monitor-interval", "0"]),
    ]  # fmt: skip
    log = workdir / f"{name}.log"
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            command,
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    target = Target(name, port, process, metrics_port=metrics_port)
    if not wait_for_port(port, process, START_TIMEOUT):
        stop_process(process)
        target.skipped = f"{name} failed to start: {tail(log) or '(no output)'}"
    return target


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
        # PostgreSQL 14+ says "without initial connection time", older versions "excluding…".
        r"^tps = ([\d.]+) \((?:without initial connection time|excluding connections"
        r" establishing)\)",
        output,
        re.MULTILINE,
    )
    latency = re.search(r"^latency average = ([\d.]+) ms", output, re.MULTILINE)
    processed = re.search(r"^number of transactions actually processed: (\d+)", output, re.M)
    failed = re.search(r"^number of failed transactions: (\d+)", output, re.MULTILINE)
    connect = re.search(r"^initial connection time = ([\d.]+) ms", output, re.MULTILINE)
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
    pgbench: str, target: Target, workload: Workload, clients: int, round_no: int, duration: int
) -> Measurement:
    measurement = Measurement(target.name, workload.name, clients, round_no)
    command = [
        pgbench, *workload.pgbench_args, "-n",
        "-c", str(clients), "-j", str(min(2, clients)), "-T", str(duration),
        *pgbench_args(target.port), BENCH.database,
    ]  # fmt: skip
    pid = target.process.pid if target.process is not None else None
    cpu_before = cpu_seconds(pid) if pid is not None else 0.0
    scraper = Scraper(target.metrics_port) if target.metrics_port else None
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
    if pid is not None:
        measurement.cpu_seconds = cpu_seconds(pid) - cpu_before
    parse_pgbench(result.stdout, measurement)
    if result.returncode != 0:
        stderr = "\n".join(result.stderr.strip().splitlines()[-5:])
        measurement.error = f"pgbench exit {result.returncode}: {stderr}"
    return measurement


def warm_up(pgbench: str, target: Target, clients: int, duration: int) -> None:
    """Fill the pooler's server pool so the first measured run does not pay for it."""
    command = [
        pgbench, "-S", "-n", "-c", str(clients), "-T", str(duration),
        *pgbench_args(target.port), BENCH.database,
    ]  # fmt: skip
    with contextlib.suppress(subprocess.TimeoutExpired):
        subprocess.run(
            command,
            env=pgbench_env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=duration + PGBENCH_GRACE,
            check=False,
        )


# -- report ----------------------------------------------------------------------------


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def git_revision() -> str:
    def git(*args: str) -> str:
        result = subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, check=False
        )
        return result.stdout.strip()

    revision = git("rev-parse", "--short", "HEAD") or "unknown"
    return revision + (" (uncommitted changes)" if git("status", "--porcelain") else "")


def fmt(value: float | None, digits: int = 0) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def ratio(numerator: float | None, denominator: float | None) -> str:
    if numerator is None or not denominator:
        return "—"
    return f"{numerator / denominator:.2f}"


def median_of(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summary(run: Run, workload: str, target: str, clients: int) -> dict[str, float | None]:
    good = [
        m
        for m in run.measurements
        if m.workload == workload
        and m.target == target
        and m.clients == clients
        and m.error is None
    ]
    tps = [m.tps for m in good]
    cpu = [c for m in good if (c := m.cpu_per_1000_tx) is not None]
    return {
        "runs": len(good),
        "tps": median_of(tps),
        "tps_min": min(tps, default=None),
        "tps_max": max(tps, default=None),
        "latency": median_of([m.latency_ms for m in good]),
        "connect": median_of([m.connect_ms for m in good]),
        "cpu": median_of(cpu),
    }


def render(run: Run) -> str:
    args = run.args
    lines = [
        "# pgproxy benchmark: pgbench through pgproxy, PgBouncer and direct",
        "",
        f"Run at {run.started_at:%Y-%m-%d %H:%M} UTC on git {git_revision()}.",
        "",
        "| machine | |",
        "|---|---|",
        f"| CPUs | {os.cpu_count()} x {cpu_model()} |",
        f"| load average at start | {' '.join(f'{x:.2f}' for x in os.getloadavg())} |",
        f"| kernel | {platform.system()} {platform.release()} |",
        f"| Python | {platform.python_version()} ({platform.python_implementation()}) |",
        f"| PostgreSQL | {run.pg_version} |",
        f"| PgBouncer | {run.pgbouncer_version} |",
        f"| pgbench | {run.pgbench_version} |",
        "",
        "Command:",
        "",
        "```",
        shlex.join([os.path.relpath(sys.executable, Path.cwd()), *sys.argv]),
        "```",
        "",
        f"Workloads, each `pgbench <flags> -n -c <clients> -j 2 -T {args.duration}` "
        f"(`-j 1` for a single client) on a scale-{args.scale} database:",
        "",
        *(f"- `{w.name}`: `{shlex.join(w.pgbench_args)}`, {w.description}" for w in args.workloads),
        "",
        f"{args.rounds} round(s), each running every workload and client count against every "
        "target in a rotated order. Poolers: transaction "
        f"pooling, pool size {args.pool_size}, SCRAM-SHA-256 for clients and server, up for "
        "the whole run. tps excludes pgbench's initial connection time; pooler CPU is "
        "utime+stime of the pooler process (and children) over the whole pgbench run, client "
        "logins included. `-T` counts from before the logins, so with many clients the "
        "measured part of each run is shorter by the initial connection time. Medians over "
        "rounds; compare ratios, not absolute numbers.",
        "",
    ]
    skipped = [t for t in run.targets if t.skipped]
    for target in skipped:
        lines += [f"**{target.name} not measured**:", "", "```", target.skipped or "", "```", ""]
    measured = [t.name for t in run.targets if not t.skipped]
    for workload in args.workloads:
        lines += render_workload(run, workload, measured)
    if "pgproxy" in measured:
        lines += render_prepared_vs_extended(run)
    if "pgproxy" in measured and "pgproxy-nometrics" in measured:
        lines += render_metrics_cost(run)
    failures = [m for m in run.measurements if m.error is not None]
    if failures:
        lines += ["## Failed runs", ""]
        lines += [
            f"- round {m.round}, {m.workload}, {m.clients} clients, {m.target}: "
            + (m.error or "").replace("\n", " / ")
            for m in failures
        ]
    return "\n".join(lines).rstrip("\n") + "\n"


def render_workload(run: Run, workload: Workload, measured: list[str]) -> list[str]:
    """One workload's per-client-count tables and its ratio table."""
    name = workload.name
    lines = [
        f"## {name}",
        "",
        f"`pgbench {shlex.join(workload.pgbench_args)}`: {workload.description}.",
        "",
    ]
    for clients in run.clients:
        lines += [
            f"### {clients} clients",
            "",
            "| target | tps (median) | tps min-max | latency avg ms | pooler CPU s / 1000 tx "
            "| initial connection ms | runs ok |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for target in measured:
            s = summary(run, name, target, clients)
            tps_range = "—" if s["runs"] == 0 else f"{fmt(s['tps_min'])}-{fmt(s['tps_max'])}"
            lines.append(
                f"| {target} | {fmt(s['tps'])} | {tps_range} "
                f"| {fmt(s['latency'], 3)} | {fmt(s['cpu'], 3)} | {fmt(s['connect'])} "
                f"| {fmt(s['runs'])}/{run.args.rounds} |"
            )
        lines.append("")
    lines += [
        "### Ratios (medians)",
        "",
        "| clients | pgproxy / PgBouncer tps | pgproxy / PgBouncer CPU per tx "
        "| pgproxy / direct tps | PgBouncer / direct tps |",
        "|---:|---:|---:|---:|---:|",
    ]
    for clients in run.clients:
        # A target with no good run (not measured, or every run failed) gives None: "—".
        proxy = summary(run, name, "pgproxy", clients)
        bouncer = summary(run, name, "pgbouncer", clients)
        direct = summary(run, name, "direct", clients)
        lines.append(
            f"| {clients} | {ratio(proxy['tps'], bouncer['tps'])} "
            f"| {ratio(proxy['cpu'], bouncer['cpu'])} | {ratio(proxy['tps'], direct['tps'])} "
            f"| {ratio(bouncer['tps'], direct['tps'])} |"
        )
    lines.append("")
    return lines


def render_metrics_cost(run: Run) -> list[str]:
    """pgproxy with /metrics scraped every second (and its monitor) against pgproxy without."""
    lines = [
        "## Cost of observability (pgproxy)",
        "",
        f"`pgproxy` serves /metrics, scraped every {SCRAPE_INTERVAL:g} s during each run, and "
        "reads pg_stat_activity every 5 s; `pgproxy-nometrics` has both off.",
        "",
        "| workload | clients | tps with | tps without | with / without tps "
        "| CPU per tx with / without | scrapes per run | mean scrape ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for workload in run.args.workloads:
        for clients in run.clients:
            on = summary(run, workload.name, "pgproxy", clients)
            off = summary(run, workload.name, "pgproxy-nometrics", clients)
            scraped = [
                m
                for m in run.measurements
                if m.workload == workload.name
                and m.target == "pgproxy"
                and m.clients == clients
                and m.error is None
            ]
            scrapes = median_of([float(m.scrapes) for m in scraped])
            scrape_ms = median_of([m.scrape_ms for m in scraped if m.scrapes])
            lines.append(
                f"| {workload.name} | {clients} | {fmt(on['tps'])} | {fmt(off['tps'])} "
                f"| {ratio(on['tps'], off['tps'])} | {ratio(on['cpu'], off['cpu'])} "
                f"| {fmt(scrapes)} | {fmt(scrape_ms, 1)} |"
            )
    lines.append("")
    return lines


def render_prepared_vs_extended(run: Run) -> list[str]:
    """pgproxy with named prepared statements against unnamed ones, per script."""
    names = {w.name for w in run.args.workloads}
    scripts = [s for s in ("select", "tpcb") if {f"{s}-extended", f"{s}-prepared"} <= names]
    if not scripts:
        return []
    lines = [
        "## Prepared vs extended (pgproxy)",
        "",
        "| script | clients | extended tps | prepared tps | prepared / extended tps "
        "| extended CPU s / 1000 tx | prepared CPU s / 1000 tx |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for script in scripts:
        for clients in run.clients:
            extended = summary(run, f"{script}-extended", "pgproxy", clients)
            prepared = summary(run, f"{script}-prepared", "pgproxy", clients)
            lines.append(
                f"| {script} | {clients} | {fmt(extended['tps'])} | {fmt(prepared['tps'])} "
                f"| {ratio(prepared['tps'], extended['tps'])} | {fmt(extended['cpu'], 3)} "
                f"| {fmt(prepared['cpu'], 3)} |"
            )
    lines.append("")
    return lines


# -- main ------------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--clients", help="comma-separated client counts (default 50,200,1000)")
    parser.add_argument("--rounds", type=int, help="rounds over all client counts (default 3)")
    parser.add_argument("--duration", type=int, help="seconds per pgbench run (default 15)")
    parser.add_argument("--pool-size", type=int, default=20, help="pooler pool size")
    parser.add_argument("--scale", type=int, help="pgbench -i scale (default 10)")
    parser.add_argument(
        "--targets",
        default="direct,pgbouncer,pgproxy",
        help="comma-separated subset of direct,pgbouncer,pgproxy,pgproxy-nometrics (pgproxy "
        "with /metrics off and no server monitor: the cost of observability)",
    )
    parser.add_argument(
        "--workloads",
        default="select-simple",
        help=f"comma-separated subset of {','.join(WORKLOADS)} (default select-simple)",
    )
    parser.add_argument("--out", type=Path, help="markdown report (default bench/RESULTS.md)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: 10,50 clients, 1 round of 3 s, scale 1; report to bench/out/",
    )
    args = parser.parse_args(argv)
    quick = args.quick
    # Explicit flags win over --quick's smaller defaults.
    args.clients = args.clients or ("10,50" if quick else "50,200,1000")
    args.rounds = args.rounds or (1 if quick else 3)
    args.duration = args.duration or (3 if quick else 15)
    args.scale = args.scale or (1 if quick else 10)
    args.out = args.out or REPO / "bench" / ("out/RESULTS-quick.md" if quick else "RESULTS.md")
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = set(args.targets) - {"direct", "pgbouncer", "pgproxy", "pgproxy-nometrics"}
    if unknown:
        parser.error(f"unknown target(s): {', '.join(sorted(unknown))}")
    # dict.fromkeys: drop repeats, keep the order given.
    workloads = list(dict.fromkeys(w.strip() for w in args.workloads.split(",") if w.strip()))
    unknown_workloads = [w for w in workloads if w not in WORKLOADS]
    if unknown_workloads:
        parser.error(
            f"unknown workload(s): {', '.join(unknown_workloads)}; "
            f"choose from {', '.join(WORKLOADS)}"
        )
    if not workloads:
        parser.error("--workloads: no workload given")
    args.workloads = [WORKLOADS[w] for w in workloads]
    return args


@contextlib.contextmanager
def workspace() -> Iterator[Path]:
    """A temporary directory the postgres OS user can read (PgBouncer's ini lives here)."""
    path = Path(tempfile.mkdtemp(prefix="pgproxy-bench-"))
    try:
        chown_to_postgres(path)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def rotated(targets: list[Target], by: int) -> list[Target]:
    shift = by % len(targets) if targets else 0
    return targets[shift:] + targets[:shift]


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    clients = sorted({int(c) for c in args.clients.split(",")})
    run = Run(args=args, clients=clients)
    raise_fd_limit()
    # Turn SIGTERM into SystemExit so the finally blocks below stop everything we started.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

    pg = LocalPostgres(
        # Direct runs need a backend per client; both pools stay connected meanwhile.
        max_connections=max(clients) + 2 * args.pool_size + 20,
        settings={"shared_buffers": "128MB"},
    )
    pgbench = str(pg.bindir / "pgbench") if (pg.bindir / "pgbench").exists() else "pgbench"
    run.pg_version = version_of([str(pg.bindir / "postgres"), "--version"])
    run.pgbench_version = version_of([pgbench, "--version"])
    has_pgbouncer = shutil.which("pgbouncer") is not None
    if has_pgbouncer:
        run.pgbouncer_version = version_of(["pgbouncer", "--version"])

    with workspace() as workdir, pg:
        try:
            print(f"PostgreSQL on port {pg.port}; pgbench -i -s {args.scale} …", flush=True)
            pg.create_user(BENCH.user, BENCH.password)
            pg.create_database(BENCH.database, owner=BENCH.user)
            subprocess.run(
                [
                    pgbench,
                    "-i",
                    "-q",
                    "-s",
                    str(args.scale),
                    *pgbench_args(pg.port),
                    BENCH.database,
                ],
                env=pgbench_env(),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                check=True,
            )
            max_client_conn = max(clients) + 100
            for name in args.targets:
                if name == "direct":
                    run.targets.append(Target("direct", pg.port))
                elif name == "pgbouncer" and has_pgbouncer:
                    run.targets.append(
                        start_pgbouncer(workdir, pg, args.pool_size, max_client_conn)
                    )
                elif name in ("pgproxy", "pgproxy-nometrics"):
                    run.targets.append(
                        start_pgproxy(
                            workdir,
                            pg,
                            args.pool_size,
                            max_client_conn,
                            metrics=name == "pgproxy",
                        )
                    )
            for target in run.targets:
                status = target.skipped or f"listening on port {target.port}"
                print(f"{target.name}: {status}", flush=True)
            active = [t for t in run.targets if not t.skipped]
            for target in active:
                if target.process is not None:
                    warm_up(pgbench, target, args.pool_size, 1 if args.quick else 3)

            block = 0
            for round_no in range(1, args.rounds + 1):
                for workload in args.workloads:
                    for count in clients:
                        for target in rotated(active, block):
                            m = measure(pgbench, target, workload, count, round_no, args.duration)
                            run.measurements.append(m)
                            cpu = m.cpu_per_1000_tx
                            print(
                                f"round {round_no}/{args.rounds} {workload.name:<15} "
                                f"{count:>5} clients {target.name:<17} {m.tps:>10,.0f} tps "
                                f"{m.latency_ms:>8.3f} ms"
                                + (f" {cpu:.3f} CPU s/1000 tx" if cpu is not None else "")
                                + (f"  ERROR: {m.error}" if m.error else ""),
                                flush=True,
                            )
                        block += 1
        except subprocess.CalledProcessError as exc:
            print(f"{shlex.join(exc.cmd)} failed:\n{exc.stderr.decode(errors='replace')}")
            return 1
        finally:
            for target in run.targets:
                stop_process(target.process)

    report = render(run)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print("\n" + report + f"\n(written to {args.out})")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:
        print("interrupted; everything started was stopped", file=sys.stderr)
        sys.exit(130)
