"""pgproxy against PgBouncer and straight PostgreSQL, in one run, written up as markdown.

    .venv/bin/python bench/run.py --all                  # the issue's whole matrix (make bench)
    .venv/bin/python bench/run.py [--clients 50,200,1000] [--rounds 3] [--duration 15]
                                  [--workloads select-simple,storm|all|none] [--targets …]
                                  [--large] [--idle [--idle-clients 10000]] [--syscalls]
                                  [--login-storm [--login-storm-clients 2000]]
                                  [--capacity [--capacity-clients 10000 --capacity-active 500]]
                                  [--soak [--soak-minutes 10]]
                                  [--out bench/RESULTS.md] [--plot PATH | --no-plot] [--quick]

Sections, in the order they run: pgbench rounds (workloads x client counts x targets,
interleaved and rotated; `pgbench_rounds.py`), system calls per transaction
(`syscall_count.py`, on the same poolers), a large result to a fast and a slow client
(`large_result.py`), thousands of idle clients (`idle_clients.py`) and a storm of new
logins beside a linked client (`login_storm.py`) and ten thousand clients, a few hundred
busy (`capacity.py`), each of the last four on freshly started targets; last, the soak
(`soak.py`): minutes of mixed load through pgproxy on a cluster of its own, with a
PostgreSQL restart and a burst of clients, then checks of the books, leaks and memory.
The machines we run on are shared and noisy, so absolute numbers mean little: the report
leads with ratios between targets measured side by side.

Everything started here (a throw-away cluster, PgBouncer, pgproxy) is stopped again on
exit, Ctrl-C or error.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import os
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import capacity
import idle_clients
import large_result
import login_storm
import pgbench_rounds
import plot_results
import report
import soak
import syscall_count
from large_result import LargeRead
from pgbench_rounds import WORKLOADS, Rounds
from targets import (
    ALLOCATORS,
    BENCH,
    POOLERS,
    RELAY,
    REPO,
    TARGET_NAMES,
    PoolerConfig,
    Target,
    allocator_text,
    chown_to_postgres,
    hotpath_text,
    raise_fd_limit,
    resolve_allocator,
    running_targets,
    start_pgbouncer,
    stop_process,
    version_of,
    workspace,
)

from pgproxy.localpg import LocalPostgres

# Rough costs for the up-front estimate, measured on the 2-core bench machine (seconds).
SETUP_SECONDS = 10.0  # initdb, start, users
PGBENCH_INIT_SECONDS_PER_SCALE = 1.0
TARGET_START_SECONDS = 2.0
# pgbench start and exit around -T; 1000 clients take a while to say goodbye.
PGBENCH_RUN_OVERHEAD = 1.5
LARGE_TABLE_SECONDS_PER_MILLION = 4.0
FAST_READ_SECONDS = 1.5
IDLE_LOGINS_PER_SECOND = 5000.0
# The storm's process start, the linked client's baseline, and serving the storm.
LOGIN_STORM_OVERHEAD_SECONDS = 3.0
STORM_LOGINS_PER_SECOND = 1000.0
# The soak's own cluster and pgbench -i -s 10, its warm-up, and the checks afterwards.
SOAK_OVERHEAD_SECONDS = 40.0
# Capacity: logins per second with the other clients connected, and the final check.
CAPACITY_LOGINS_PER_SECOND = 2000.0
CAPACITY_OVERHEAD_SECONDS = 15.0


@dataclass
class Run:
    """Everything measured, for the report."""

    args: argparse.Namespace
    rounds: Rounds
    machine: report.Machine
    # Per section, the targets that ran in it (not skipped).
    measured: dict[str, list[str]] = field(default_factory=dict)
    # Target name → why it could not be measured (in any section).
    skipped: dict[str, str] = field(default_factory=dict)
    syscalls: list[syscall_count.SyscallCount] = field(default_factory=list)
    syscall_tool_note: str = ""
    large: list[LargeRead] = field(default_factory=list)
    idle: list[idle_clients.IdleResult] = field(default_factory=list)
    login_storm: list[login_storm.StormResult] = field(default_factory=list)
    capacity: list[capacity.CapacityResult] = field(default_factory=list)
    soak: soak.SoakResult | None = None
    plot_note: str = ""


# -- options ---------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--all",
        action="store_true",
        help="the issue's whole matrix: every workload (storm included) at 50,200,1000 "
        "clients, 3 rounds, plus --large, --idle, --login-storm and --syscalls, report to "
        "bench/RESULTS.md",
    )
    parser.add_argument(
        "--allocator",
        choices=ALLOCATORS,
        default="auto",
        help="pgproxy's memory allocator: jemalloc as the container image runs it, or "
        "Python's pymalloc (default auto: jemalloc when libjemalloc2 is installed)",
    )
    parser.add_argument("--clients", help="comma-separated client counts (default 50,200,1000)")
    parser.add_argument("--rounds", type=int, help="rounds over all client counts (default 3)")
    parser.add_argument("--duration", type=int, help="seconds per pgbench run (default 15)")
    parser.add_argument("--pool-size", type=int, default=20, help="pooler pool size (default 20)")
    parser.add_argument("--scale", type=int, help="pgbench -i scale (default 10)")
    parser.add_argument(
        "--targets",
        default="direct,pgbouncer,pgproxy",
        help="comma-separated subset of direct,pgbouncer,pgproxy,pgproxy-nometrics (pgproxy "
        "with /metrics off and no server monitor: the cost of observability),pgproxy-w2 "
        "(--workers 2),pgproxy-pymalloc (on Python's own allocator, whatever --allocator),"
        "pgproxy-interpreted (the hot path not compiled: a copy of the package without its "
        "compiled modules),uvloop-relay (bench/relay.py: a bare uvloop relay with a server "
        "connection per client, the floor a pooler on uvloop pays; pgbench, --syscalls and "
        "--large only)",
    )
    parser.add_argument(
        "--workloads",
        help=f"comma-separated subset of {','.join(WORKLOADS)}; 'all'; or 'none' to run only "
        "the other sections (default select-simple, all with --all)",
    )
    parser.add_argument("--out", type=Path, help="markdown report (default bench/RESULTS.md)")
    parser.add_argument(
        "--plot",
        type=Path,
        help="PNG of tps and CPU per transaction vs clients (default: beside --out, named "
        "after it: RESULTS.md → results.png)",
    )
    parser.add_argument("--no-plot", action="store_true", help="do not draw the plot")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: 10,50 clients, 1 round of 3 s, scale 1, one large-result "
        "repetition; report to bench/out/",
    )
    large = parser.add_argument_group("large result")
    large.add_argument("--large", action="store_true", help="run the large-result section")
    large.add_argument(
        "--large-rows", type=int, default=1_000_000, help="rows, ~100 B each (default 1,000,000)"
    )
    large.add_argument("--large-reps", type=int, help="repetitions (default 3, 1 with --quick)")
    large.add_argument(
        "--slow-rate", type=float, default=10.0, help="MB/s the slow client reads at (default 10)"
    )
    idle = parser.add_argument_group("idle clients")
    idle.add_argument("--idle", action="store_true", help="run the idle-clients section")
    idle.add_argument(
        "--idle-clients", type=int, default=10_000, help="idle clients per pooler (default 10,000)"
    )
    storm = parser.add_argument_group("login storm")
    storm.add_argument(
        "--login-storm",
        action="store_true",
        help="run the login-storm section: new clients arrive while a linked client queries",
    )
    storm.add_argument(
        "--login-storm-clients",
        type=int,
        default=2000,
        help="new clients per pooler (default 2,000)",
    )
    storm.add_argument(
        "--login-storm-seconds",
        type=float,
        default=1.0,
        help="seconds over which they arrive (default 1)",
    )
    crowd = parser.add_argument_group("capacity")
    crowd.add_argument(
        "--capacity",
        action="store_true",
        help="run the capacity section: --capacity-clients connections on one worker, "
        "--capacity-active of them busy, through the pool (pgproxy and PgBouncer)",
    )
    crowd.add_argument(
        "--capacity-clients", type=int, default=10_000, help="clients in all (default 10,000)"
    )
    crowd.add_argument(
        "--capacity-active", type=int, default=500, help="of them busy (default 500)"
    )
    crowd.add_argument(
        "--capacity-seconds",
        type=float,
        default=60.0,
        help="how long the busy clients run queries (default 60)",
    )
    long_run = parser.add_argument_group("soak")
    long_run.add_argument(
        "--soak",
        action="store_true",
        help="run the soak: mixed load through pgproxy on a cluster of its own, a PostgreSQL "
        "restart and a burst of new clients in the middle, then the books, leaks and RSS "
        "are checked",
    )
    long_run.add_argument(
        "--soak-minutes", type=float, default=10.0, help="minutes of load (default 10)"
    )
    long_run.add_argument(
        "--soak-burst",
        type=int,
        default=5000,
        help="new clients arriving at once in the middle (default 5,000)",
    )
    syscalls = parser.add_argument_group("system calls")
    syscalls.add_argument(
        "--syscalls", action="store_true", help="count each pooler's system calls per tx"
    )
    syscalls.add_argument(
        "--syscall-tool",
        choices=("auto", "perf", "strace"),
        default="auto",
        help="auto: perf stat where it works, else strace -c -f",
    )
    syscalls.add_argument(
        "--syscall-clients", type=int, default=50, help="pgbench clients (default 50)"
    )
    syscalls.add_argument(
        "--syscall-duration", type=int, default=5, help="seconds traced (default 5)"
    )
    args = parser.parse_args(argv)
    resolve_defaults(parser, args)
    return args


def resolve_defaults(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Fill what --all and --quick imply; explicit flags win over both."""
    quick = args.quick
    args.allocator = resolve_allocator(args.allocator)
    if args.all:
        args.large = args.idle = args.login_storm = args.syscalls = True
    args.clients = args.clients or ("10,50" if quick else "50,200,1000")
    args.rounds = args.rounds or (1 if quick else 3)
    args.duration = args.duration or (3 if quick else 15)
    args.scale = args.scale or (1 if quick else 10)
    args.large_reps = args.large_reps or (1 if quick else 3)
    args.out = args.out or REPO / "bench" / ("out/RESULTS-quick.md" if quick else "RESULTS.md")
    args.plot = (
        None if args.no_plot else args.plot or args.out.with_name(args.out.stem.lower() + ".png")
    )
    try:
        args.clients = sorted({int(c) for c in args.clients.split(",") if c.strip()})
    except ValueError:
        parser.error(f"--clients: not a comma-separated list of numbers: {args.clients}")
    args.targets = list(dict.fromkeys(t.strip() for t in args.targets.split(",") if t.strip()))
    unknown = set(args.targets) - set(TARGET_NAMES)
    if unknown:
        parser.error(f"unknown target(s): {', '.join(sorted(unknown))}")
    args.workloads = [WORKLOADS[w] for w in parse_workloads(parser, args)]
    sections = (args.large, args.idle, args.login_storm, args.syscalls, args.capacity, args.soak)
    if not (args.workloads or any(sections)):
        parser.error(
            "nothing to run: --workloads none and no --large, --idle, --login-storm, "
            "--syscalls, --capacity or --soak"
        )
    if args.capacity and not 0 < args.capacity_active < args.capacity_clients:
        parser.error("--capacity-active must be more than 0 and less than --capacity-clients")


def parse_workloads(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    # The soak and capacity sections are runs of their own: no pgbench rounds unless asked.
    alone = (args.soak or args.capacity) and not args.all
    text = args.workloads or ("all" if args.all else "none" if alone else "select-simple")
    if text.strip() == "all":
        return list(WORKLOADS)
    if text.strip() == "none":
        return []
    # dict.fromkeys: drop repeats, keep the order given.
    names = list(dict.fromkeys(w.strip() for w in text.split(",") if w.strip()))
    unknown = [w for w in names if w not in WORKLOADS]
    if unknown:
        parser.error(
            f"unknown workload(s): {', '.join(unknown)}; choose from {', '.join(WORKLOADS)}, "
            "all or none"
        )
    if not names:
        parser.error("--workloads: no workload given (use 'none' to skip pgbench)")
    return names


def pooler_names(args: argparse.Namespace) -> list[str]:
    return [t for t in args.targets if t in POOLERS]


def warm_up_seconds(args: argparse.Namespace) -> int:
    return 1 if args.quick else 3


def estimate_seconds(args: argparse.Namespace) -> float:
    """What the run should take on the 2-core bench machine; printed before it starts."""
    targets = len(args.targets)
    poolers = len(pooler_names(args))
    total: float = SETUP_SECONDS + args.scale * PGBENCH_INIT_SECONDS_PER_SCALE
    if args.workloads or args.syscalls:
        total += targets * (TARGET_START_SECONDS + warm_up_seconds(args))
    runs = args.rounds * len(args.workloads) * len(args.clients) * targets
    total += runs * (args.duration + PGBENCH_RUN_OVERHEAD)
    if args.syscalls:
        total += poolers * (args.syscall_duration + syscall_count.ATTACH_SECONDS + 2)
    if args.large:
        slow_read = args.large_rows * large_result.BYTES_PER_ROW / (args.slow_rate * 1e6)
        total += targets * TARGET_START_SECONDS
        total += args.large_rows / 1e6 * LARGE_TABLE_SECONDS_PER_MILLION
        total += args.large_reps * (targets * FAST_READ_SECONDS + poolers * (slow_read + 1))
    if args.idle:
        per_pooler = args.idle_clients / IDLE_LOGINS_PER_SECOND + 4 * idle_clients.SETTLE_SECONDS
        total += poolers * (TARGET_START_SECONDS + per_pooler)
    if args.login_storm:
        per_pooler = max(
            args.login_storm_seconds, args.login_storm_clients / STORM_LOGINS_PER_SECOND
        )
        total += poolers * (TARGET_START_SECONDS + LOGIN_STORM_OVERHEAD_SECONDS + per_pooler)
    if args.capacity:
        per_pooler = (
            args.capacity_clients / CAPACITY_LOGINS_PER_SECOND
            + args.capacity_seconds
            + CAPACITY_OVERHEAD_SECONDS
        )
        total += len(capacity_names(args)) * (TARGET_START_SECONDS + per_pooler)
    if args.soak:
        total += args.soak_minutes * 60 + SOAK_OVERHEAD_SECONDS
    return total


# -- sections --------------------------------------------------------------------------


def prepare_database(pg: LocalPostgres, pgbench: str, args: argparse.Namespace) -> str:
    """The bench user and database, pgbench's tables, the large table; returns the user's
    SCRAM secret as pg_authid stores it (what both poolers authenticate clients with)."""
    pg.create_user(BENCH.user, BENCH.password)
    pg.create_database(BENCH.database, owner=BENCH.user)
    if args.workloads or args.syscalls:
        print(f"pgbench -i -s {args.scale} …", flush=True)
        subprocess.run(
            [pgbench, "-i", "-q", "-s", str(args.scale),
             *pgbench_rounds.pgbench_args(pg.port), BENCH.database],
            env=pgbench_rounds.pgbench_env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            check=True,
        )  # fmt: skip
    if args.large:
        print(f"creating {large_result.TABLE} ({args.large_rows:,} rows) …", flush=True)
        large_result.create_table(pg, args.large_rows)
    rows = pg.execute("SELECT rolpassword FROM pg_authid WHERE rolname = $1", BENCH.user)
    secret: str = rows[0][0]
    return secret


def note_targets(run: Run, section: str, targets: Sequence[Target]) -> list[Target]:
    """Record which targets ran in `section` and why others did not; return those that run."""
    for target in targets:
        if target.skipped:
            run.skipped.setdefault(target.name, target.skipped)
    active = [t for t in targets if not t.skipped]
    run.measured[section] = [t.name for t in active]
    return active


def pgbench_section(
    run: Run, pgbench: str, pg: LocalPostgres, workdir: Path, config: PoolerConfig
) -> None:
    """pgbench rounds, then the system-call counts on the same (warm) poolers."""
    args = run.args
    names = args.targets if args.workloads else pooler_names(args)
    print("pgbench section:", flush=True)
    with running_targets(names, workdir / "pgbench", pg, config) as targets:
        active = note_targets(run, "pgbench", targets)
        for target in active:
            pgbench_rounds.warm_up(pgbench, target, args.pool_size, warm_up_seconds(args))
        pgbench_rounds.run_rounds(pgbench, active, run.rounds)
        if args.syscalls:
            syscalls_section(run, pgbench, [t for t in active if t.pid is not None], workdir)


def syscalls_section(run: Run, pgbench: str, poolers: Sequence[Target], workdir: Path) -> None:
    args = run.args
    tool, run.syscall_tool_note = syscall_count.pick_tool(args.syscall_tool)
    if tool is None:
        print(run.syscall_tool_note, flush=True)
        return
    for target in poolers:
        result = syscall_count.count_syscalls(
            pgbench, target, tool, args.syscall_clients, args.syscall_duration, workdir
        )
        run.syscalls.append(result)
        print(
            f"syscalls {target.name:<17} {report.fmt(result.per_transaction, 2)} per tx "
            f"({tool}, {result.tps:,.0f} tps while traced)"
            + (f"  ERROR: {result.error}" if result.error else ""),
            flush=True,
        )


def large_section(run: Run, pg: LocalPostgres, workdir: Path, config: PoolerConfig) -> None:
    args = run.args
    print("large-result section (fresh targets):", flush=True)
    with running_targets(args.targets, workdir / "large", pg, config) as targets:
        active = note_targets(run, "large", targets)
        run.large = large_result.run_large(active, args.large_rows, args.large_reps, args.slow_rate)


def idle_section(run: Run, pg: LocalPostgres, workdir: Path, config: PoolerConfig) -> None:
    args = run.args
    names = pooler_names(args)
    print(f"idle section (fresh poolers, {args.idle_clients:,} clients each):", flush=True)
    # Room for the crowd, the first query and a margin.
    crowd = dataclasses.replace(config, max_client_conn=args.idle_clients + 100)
    with running_targets(names, workdir / "idle", pg, crowd) as targets:
        active = note_targets(run, "idle", targets)
        run.idle = idle_clients.run_idle(active, args.idle_clients)


def login_storm_section(run: Run, pg: LocalPostgres, workdir: Path, config: PoolerConfig) -> None:
    args = run.args
    names = pooler_names(args)
    print(
        f"login-storm section (fresh poolers, {args.login_storm_clients:,} new clients in "
        f"{args.login_storm_seconds:g} s each):",
        flush=True,
    )
    # Room for the storm, the linked client, the storm's warm-up login and a margin.
    crowd = dataclasses.replace(config, max_client_conn=args.login_storm_clients + 100)
    with running_targets(names, workdir / "login-storm", pg, crowd) as targets:
        active = note_targets(run, "login-storm", targets)
        run.login_storm = login_storm.run_login_storm(
            active, args.login_storm_clients, args.login_storm_seconds
        )


def capacity_names(args: argparse.Namespace) -> list[str]:
    """The capacity section measures one worker: pgproxy and PgBouncer of the targets."""
    return [t for t in pooler_names(args) if t in ("pgproxy", "pgbouncer")]


def capacity_section(run: Run, pg: LocalPostgres, workdir: Path, config: PoolerConfig) -> None:
    """Each pooler started fresh for its turn (pgproxy with an admin user, whose console
    counts the clients), measured, and stopped."""
    args = run.args
    print(
        f"capacity section (fresh poolers, {args.capacity_clients:,} clients, "
        f"{args.capacity_active:,} busy for {args.capacity_seconds:g} s):",
        flush=True,
    )
    crowd = dataclasses.replace(config, max_client_conn=args.capacity_clients + 100)
    directory = workdir / "capacity"
    directory.mkdir(exist_ok=True)
    chown_to_postgres(directory)
    soak.ensure_admin_role(pg)
    targets: list[Target] = []
    for name in capacity_names(args):
        if name == "pgproxy":
            target = soak.start_pgproxy_with_console(directory, pg, crowd)
        else:
            target = start_pgbouncer(directory, pg, crowd)
        targets.append(target)
        print(f"  {name}: {target.skipped or f'listening on port {target.port}'}", flush=True)
        try:
            if not target.skipped:
                run.capacity += capacity.run_capacity(
                    [target],
                    pg,
                    args.capacity_clients,
                    args.capacity_active,
                    args.capacity_seconds,
                )
        finally:
            stop_process(target.process)
    note_targets(run, "capacity", targets)


def soak_section(run: Run, pgbench: str, workdir: Path) -> None:
    args = run.args
    plan = soak.SoakPlan(
        seconds=args.soak_minutes * 60,
        pool_size=args.pool_size,
        burst_clients=args.soak_burst,
        allocator=args.allocator,
    )
    print(f"soak section ({args.soak_minutes:g} min, its own cluster and pgproxy):", flush=True)
    run.soak = soak.run_soak(plan, pgbench, workdir / "soak")
    soak.print_summary(run.soak)


# -- report ----------------------------------------------------------------------------


def render(run: Run) -> str:
    args = run.args
    title = "pgproxy benchmark: pgproxy, PgBouncer and direct"
    if not (args.workloads or args.large or args.idle or args.login_storm or args.syscalls):
        title = "pgproxy under load for a long time and with ten thousand clients"
    lines = report.header(run.machine, title)
    lines += [
        f"Targets: {', '.join(args.targets)}. Poolers: transaction pooling, pool size "
        f"{args.pool_size}, SCRAM-SHA-256 for clients with the user's secret as pg_authid "
        "stores it (PgBouncer's auth_file; pgproxy's --user), and SCRAM pass-through to "
        f"PostgreSQL: no pooler runs PBKDF2 per client login. {allocator_text(args.allocator)}. "
        f"pgproxy's start-up log said: `{hotpath_text()}`.",
        "",
    ]
    for name, reason in run.skipped.items():
        lines += [f"**{name} not measured**:", "", "```", reason, "```", ""]
    if args.workloads:
        lines += pgbench_rounds.render(run.rounds, run.measured.get("pgbench", []))
        lines += [run.plot_note, ""] if run.plot_note else []
    if args.syscalls:
        if run.syscalls:
            lines += syscall_count.render(
                run.syscalls, args.syscall_duration, run.syscall_tool_note
            )
        else:
            lines += ["## System calls per transaction", "", run.syscall_tool_note, ""]
    if args.large:
        lines += large_result.render(
            run.large, run.measured.get("large", []), args.large_rows, args.slow_rate
        )
    if args.idle:
        lines += idle_clients.render(run.idle, args.idle_clients)
    if args.login_storm:
        lines += login_storm.render(
            run.login_storm, args.login_storm_clients, args.login_storm_seconds
        )
    if args.capacity:
        lines += capacity.render(
            run.capacity, args.capacity_clients, args.capacity_active, args.capacity_seconds
        )
    if run.soak is not None:
        lines += soak.render(run.soak)
    return "\n".join(lines).rstrip("\n") + "\n"


def draw_plot(run: Run) -> None:
    path = run.args.plot
    if path is None or not run.args.workloads:
        return
    problem = plot_results.plot(run.rounds, run.measured.get("pgbench", []), path)
    if problem is not None:
        run.plot_note = f"({problem}.)"
    else:
        relative = os.path.relpath(path, run.args.out.parent)
        run.plot_note = f"![tps and pooler CPU per transaction vs clients]({relative})"
    print(problem or f"plot written to {path}", flush=True)


# -- main ------------------------------------------------------------------------------


def tool_versions(pg: LocalPostgres, pgbench: str, args: argparse.Namespace) -> dict[str, str]:
    versions = {
        "PostgreSQL": version_of([str(pg.bindir / "postgres"), "--version"]),
        "PgBouncer": version_of(["pgbouncer", "--version"])
        if shutil.which("pgbouncer")
        else "not installed",
        "pgbench": version_of([pgbench, "--version"]),
    }
    if args.syscalls:
        for tool in ("perf", "strace"):
            if shutil.which(tool):
                versions[tool] = version_of([tool, "--version"])
    return versions


def print_plan(args: argparse.Namespace) -> None:
    sections = [
        f"pgbench {','.join(w.name for w in args.workloads)} at "
        f"{','.join(map(str, args.clients))} clients x {args.rounds} round(s) x "
        f"{args.duration} s"
        if args.workloads
        else "",
        "syscalls" if args.syscalls else "",
        f"large result ({args.large_rows:,} rows x {args.large_reps})" if args.large else "",
        f"{args.idle_clients:,} idle clients" if args.idle else "",
        f"login storm ({args.login_storm_clients:,} clients in {args.login_storm_seconds:g} s)"
        if args.login_storm
        else "",
        f"capacity ({args.capacity_clients:,} clients, {args.capacity_active:,} busy for "
        f"{args.capacity_seconds:g} s)"
        if args.capacity
        else "",
        f"soak ({args.soak_minutes:g} min, burst of {args.soak_burst:,})" if args.soak else "",
    ]
    print(
        f"plan: {'; '.join(s for s in sections if s)}; targets {','.join(args.targets)}\n"
        f"expected duration: about {estimate_seconds(args) / 60:.0f} min; "
        f"report: {args.out}",
        flush=True,
    )


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    print_plan(args)
    # Our idle clients or storm and the poolers serving them each need a descriptor per
    # connection.
    raise_fd_limit(
        max(
            args.idle_clients + 1000 if args.idle else 0,
            args.login_storm_clients + 1000 if args.login_storm else 0,
            args.capacity_clients + 1000 if args.capacity else 0,
            args.soak_burst + 1000 if args.soak else 0,
        )
    )
    # Turn SIGTERM into SystemExit so the finally blocks stop everything we started.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    most = max(args.clients, default=0) if args.workloads else 0
    storm = any("-C" in w.pgbench_args for w in args.workloads)
    poolers = len(pooler_names(args))
    # Direct runs need a backend per client, and under -C the backends of closed
    # connections linger a moment while new ones arrive; the pools stay connected. The
    # relay's backends may still be leaving when direct's arrive: room for both.
    per_client = (2 if storm else 1) * (2 if RELAY in args.targets else 1)
    pg = LocalPostgres(
        max_connections=most * per_client + poolers * args.pool_size + 50,
        settings={"shared_buffers": "128MB"},
    )
    pgbench = str(pg.bindir / "pgbench") if (pg.bindir / "pgbench").exists() else "pgbench"
    started_at = dt.datetime.now(dt.UTC)
    machine = report.Machine(started_at, report.load_average(), tool_versions(pg, pgbench, args))
    run = Run(
        args=args,
        machine=machine,
        rounds=Rounds(args.workloads, args.clients, args.rounds, args.duration, args.scale),
    )
    with workspace() as workdir, pg:
        try:
            print(f"PostgreSQL on port {pg.port}", flush=True)
            secret = prepare_database(pg, pgbench, args)
            config = PoolerConfig(
                args.pool_size, max(args.clients, default=0) + 100, secret, args.allocator
            )
            if args.workloads or args.syscalls:
                pgbench_section(run, pgbench, pg, workdir, config)
            if args.large:
                large_section(run, pg, workdir, config)
            if args.idle:
                idle_section(run, pg, workdir, config)
            if args.login_storm:
                login_storm_section(run, pg, workdir, config)
            if args.capacity:
                capacity_section(run, pg, workdir, config)
            if args.soak:
                soak_section(run, pgbench, workdir)
        except subprocess.CalledProcessError as exc:
            print(f"{shlex.join(exc.cmd)} failed:\n{exc.stderr.decode(errors='replace')}")
            return 1
    draw_plot(run)
    text = render(run)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print("\n" + text + f"\n(written to {args.out})")
    if run.soak is not None and run.soak.failures():
        print(f"soak: {len(run.soak.failures())} check(s) failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:
        print("interrupted; everything started was stopped", file=sys.stderr)
        sys.exit(130)
