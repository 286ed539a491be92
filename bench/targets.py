"""The things a client can point at: PostgreSQL itself, PgBouncer and pgproxy.

`running_targets` starts the named targets, yields them and stops them again, whatever
happens; every section goes through it. A target that fails to start is kept with a
`skipped` reason (shown in the report) so that the others still run.

Both poolers are configured alike: transaction pooling, the same pool size, SCRAM-SHA-256
for clients, and the user's SCRAM secret exactly as pg_authid stores it (PgBouncer's
auth_file copied from pg_shadow), so that neither runs PBKDF2 per client login and both log
in to PostgreSQL by SCRAM pass-through. With a plaintext password PgBouncer derives a fresh
secret with a random salt for every login (about 3 ms of CPU here) and pgproxy once at start.
"""

from __future__ import annotations

import compileall
import contextlib
import dataclasses
import os
import pwd
import re
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from pgproxy.localpg import PG_OS_USER, Credentials, LocalPostgres, free_port

REPO = Path(__file__).resolve().parent.parent
BENCH = Credentials(user="bench", password="bench-secret", database="bench")
HOST = "127.0.0.1"
TARGET_NAMES = (
    "direct",
    "pgbouncer",
    "pgproxy",
    "pgproxy-nometrics",
    "pgproxy-w2",
    "pgproxy-pymalloc",
    "pgproxy-interpreted",
    "uvloop-relay",
)
# Not a pooler: a server connection per client (bench/relay.py), for pgbench and syscalls only.
RELAY = "uvloop-relay"
POOLERS = frozenset(TARGET_NAMES) - {"direct", RELAY}
# How long a pooler may take to accept TCP connections after it was spawned.
START_TIMEOUT = 15.0


@dataclass
class Target:
    """Somewhere a client can connect to; `process` is None for direct PostgreSQL."""

    name: str
    port: int
    process: subprocess.Popen[bytes] | None = None
    # Why the target is not measured (it failed to start), shown in the report.
    skipped: str | None = None
    # Where its /metrics is, if it serves one.
    metrics_port: int | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None


@dataclass(frozen=True, slots=True)
class PoolerConfig:
    pool_size: int
    max_client_conn: int
    # The bench user's secret as pg_authid stores it (SCRAM-SHA-256$…).
    scram_secret: str
    # pgproxy's memory allocator: "jemalloc" as the container image runs it, or "pymalloc".
    allocator: str = "pymalloc"


# -- pgproxy's allocator -----------------------------------------------------------------

ALLOCATORS = ("auto", "jemalloc", "pymalloc")


def jemalloc_library() -> Path | None:
    return next(Path("/usr/lib").glob("*/libjemalloc.so.2"), None)


def resolve_allocator(choice: str) -> str:
    """`auto`: jemalloc when Debian's libjemalloc2 is installed (`make bench` installs it)."""
    if choice == "auto":
        return "jemalloc" if jemalloc_library() is not None else "pymalloc"
    if choice == "jemalloc" and jemalloc_library() is None:
        raise SystemExit("--allocator jemalloc: no libjemalloc.so.2 (apt-get install libjemalloc2)")
    return choice


def image_malloc_env() -> dict[str, str]:
    """PYTHONMALLOC and MALLOC_CONF exactly as the Dockerfile sets them."""
    text = (REPO / "Dockerfile").read_text()
    found = dict(re.findall(r"\b(PYTHONMALLOC|MALLOC_CONF)=(\S+)", text))
    assert set(found) == {"PYTHONMALLOC", "MALLOC_CONF"}, found
    return found


def allocator_env(allocator: str) -> dict[str, str] | None:
    """The environment pgproxy runs in: ours, plus jemalloc preloaded as in the image."""
    if allocator == "pymalloc":
        return None
    library = jemalloc_library()
    assert allocator == "jemalloc" and library is not None, allocator
    return {**os.environ, **image_malloc_env(), "LD_PRELOAD": str(library)}


def allocator_text(allocator: str) -> str:
    if allocator == "jemalloc":
        return (
            "pgproxy ran on jemalloc as the container image runs it (LD_PRELOAD, "
            + ", ".join(f"{k}={v}" for k, v in image_malloc_env().items())
            + ")"
        )
    return "pgproxy ran on Python's own allocator (pymalloc)"


def hotpath_text(cwd: Path = REPO) -> str:
    """What pgproxy's start-up log says of its hot path, for the report."""
    script = "from pgproxy import hotpath; print(hotpath.describe())"
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=cwd, capture_output=True, text=True, check=False
    )
    return done.stdout.strip() or f"hot path: unknown ({done.stderr.strip()[-200:]})"


def interpreted_tree(workdir: Path) -> Path:
    """A copy of the package without its compiled modules. `python -m pgproxy` started there
    imports the copy (the current directory comes first on sys.path): the interpreted hot path,
    to measure beside the compiled one."""
    root = workdir / "interpreted"
    shutil.rmtree(root, ignore_errors=True)
    skip = shutil.ignore_patterns("*.so", "__pycache__")
    shutil.copytree(REPO / "pgproxy", root / "pgproxy", ignore=skip)
    return root


# -- processes -------------------------------------------------------------------------


def raise_fd_limit(needed: int = 0) -> int:
    """Raise RLIMIT_NOFILE (children inherit it) to the hard limit, or to `needed` when
    that is more and we may (root); returns the soft limit now in force."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard
    if needed > hard != resource.RLIM_INFINITY:
        wanted = needed
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, max(wanted, hard)))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


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


def postgres_os_user() -> str | None:
    """Whom to run PgBouncer as: like PostgreSQL, it refuses to run as root."""
    return PG_OS_USER if os.geteuid() == 0 else None


def chown_to_postgres(path: Path) -> None:
    if os.geteuid() == 0:
        entry = pwd.getpwnam(PG_OS_USER)
        os.chown(path, entry.pw_uid, entry.pw_gid)


@contextlib.contextmanager
def workspace() -> Iterator[Path]:
    """A temporary directory the postgres OS user can read (PgBouncer's ini lives here)."""
    path = Path(tempfile.mkdtemp(prefix="pgproxy-bench-"))
    try:
        chown_to_postgres(path)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def spawn(
    command: Sequence[str],
    log: Path,
    *,
    cwd: Path,
    user: str | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start a pooler in its own session (Ctrl-C reaches us only; we stop it in order)."""
    with log.open("wb") as log_file:
        return subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # Popen switches user in the child before exec, so its pid is the pooler itself
            # (runuser would stay in between as the parent): /proc CPU and signals just work.
            user=user,
            group=user,
            extra_groups=[] if user else None,
        )


def started(target: Target, log: Path) -> Target:
    """Wait until `target` listens; if it does not, stop it and say why in `skipped`."""
    assert target.process is not None
    if not wait_for_port(target.port, target.process, START_TIMEOUT):
        stop_process(target.process)
        target.skipped = f"{target.name} failed to start: {tail(log) or '(no output)'}"
    return target


# -- targets ---------------------------------------------------------------------------


def start_pgbouncer(workdir: Path, pg: LocalPostgres, config: PoolerConfig) -> Target:
    if shutil.which("pgbouncer") is None:
        return Target("pgbouncer", 0, skipped="not installed: apt-get install -y pgbouncer")
    port = free_port(HOST)
    (workdir / "userlist.txt").write_text(f'"{BENCH.user}" "{config.scram_secret}"\n')
    (workdir / "pgbouncer.ini").write_text(
        "[databases]\n"
        f"{BENCH.database} = host={pg.host} port={pg.port} dbname={BENCH.database}\n"
        "\n[pgbouncer]\n"
        f"listen_addr = {HOST}\n"
        f"listen_port = {port}\n"
        # No Unix socket: it would land in /var/run/postgresql and every client uses TCP.
        "unix_socket_dir =\n"
        "auth_type = scram-sha-256\n"
        f"auth_file = {workdir / 'userlist.txt'}\n"
        "pool_mode = transaction\n"
        f"default_pool_size = {config.pool_size}\n"
        f"max_client_conn = {config.max_client_conn}\n"
        # 1000 clients connect at once; the default backlog of 128 turns that into SYN retries.
        "listen_backlog = 4096\n"
        # Per-connection log lines cost CPU that pgproxy does not spend either.
        "log_connections = 0\n"
        "log_disconnections = 0\n"
    )
    for name in ("userlist.txt", "pgbouncer.ini"):
        chown_to_postgres(workdir / name)
    log = workdir / "pgbouncer.log"
    process = spawn(
        ["pgbouncer", str(workdir / "pgbouncer.ini")], log, cwd=workdir, user=postgres_os_user()
    )
    return started(Target("pgbouncer", port, process), log)


def start_pgproxy(
    workdir: Path,
    pg: LocalPostgres,
    config: PoolerConfig,
    *,
    metrics: bool = True,
    workers: int = 1,
    name: str | None = None,
    cwd: Path = REPO,
) -> Target:
    """pgproxy with its metrics endpoint and server monitor, or without either
    (`pgproxy-nometrics`): the pair shows what observability costs. `pgproxy-w2`: two
    workers (its CPU is the supervisor's and the workers'). `pgproxy-pymalloc`: on Python's
    own allocator whatever `config.allocator` says, to measure the two side by side.
    `pgproxy-interpreted`: the hot path not compiled (see `interpreted_tree`)."""
    port = free_port(HOST)
    metrics_port = free_port(HOST) if metrics else None
    if name is None:
        name = "pgproxy" if metrics else "pgproxy-nometrics"
        if workers > 1:
            name = f"pgproxy-w{workers}"
    command = [
        sys.executable, "-m", "pgproxy",
        "--listen", f"{HOST}:{port}",
        "--server", f"{pg.host}:{pg.port}",
        "--user", f"{BENCH.user}:{config.scram_secret}",
        "--default-pool-size", str(config.pool_size),
        "--pool-mode", "transaction",
        "--max-client-conn", str(config.max_client_conn),
        "--metrics-listen", f"{HOST}:{metrics_port}" if metrics_port else "",
        *([] if metrics else ["--monitor-interval", "0"]),
        "--workers", str(workers),
    ]  # fmt: skip
    # Bytecode first, as pip writes it when it installs the image: with PYTHONDONTWRITEBYTECODE
    # set (as on some machines) every start would compile pgproxy's sources again, and the
    # compiler's memory stays in the process: about 1 MiB of RSS the image does not have.
    compileall.compile_dir(cwd / "pgproxy", quiet=1)
    log = workdir / f"{name}.log"
    process = spawn(command, log, cwd=cwd, env=allocator_env(config.allocator))
    return started(Target(name, port, process, metrics_port=metrics_port), log)


def start_relay(workdir: Path, pg: LocalPostgres, config: PoolerConfig) -> Target:
    """bench/relay.py, on pgproxy's allocator: the uvloop floor beside the poolers."""
    port = free_port(HOST)
    command = [
        sys.executable, str(REPO / "bench" / "relay.py"),
        "--listen", f"{HOST}:{port}",
        "--server", f"{pg.host}:{pg.port}",
    ]  # fmt: skip
    log = workdir / f"{RELAY}.log"
    # The repository on the path, as `python -m pgproxy` run from it has: the compiled
    # scanner's shared library (pgproxy__mypyc) sits at its top.
    env = {**(allocator_env(config.allocator) or os.environ), "PYTHONPATH": str(REPO)}
    process = spawn(command, log, cwd=REPO, env=env)
    return started(Target(RELAY, port, process), log)


def start_target(name: str, workdir: Path, pg: LocalPostgres, config: PoolerConfig) -> Target:
    if name == "direct":
        return Target("direct", pg.port)
    if name == RELAY:
        return start_relay(workdir, pg, config)
    if name == "pgbouncer":
        return start_pgbouncer(workdir, pg, config)
    if name == "pgproxy-w2":
        return start_pgproxy(workdir, pg, config, workers=2)
    if name == "pgproxy-interpreted":
        return start_pgproxy(workdir, pg, config, name=name, cwd=interpreted_tree(workdir))
    if name == "pgproxy-pymalloc":
        pymalloc = dataclasses.replace(config, allocator="pymalloc")
        return start_pgproxy(workdir, pg, pymalloc, name=name)
    return start_pgproxy(workdir, pg, config, metrics=name == "pgproxy")


@contextlib.contextmanager
def running_targets(
    names: Sequence[str], workdir: Path, pg: LocalPostgres, config: PoolerConfig
) -> Iterator[list[Target]]:
    """Start `names` in order (each pooler's files in `workdir`), stop them all on exit."""
    workdir.mkdir(exist_ok=True)
    chown_to_postgres(workdir)
    targets: list[Target] = []
    try:
        for name in names:
            targets.append(start_target(name, workdir, pg, config))
            target = targets[-1]
            print(f"  {name}: {target.skipped or f'listening on port {target.port}'}", flush=True)
        yield targets
    finally:
        for target in targets:
            stop_process(target.process)


def version_of(command: Sequence[str]) -> str:
    try:
        result = subprocess.run(command, capture_output=True, text=True, check=False)
    except OSError as exc:
        return f"unknown ({exc})"
    output = (result.stdout or result.stderr).strip()
    return output.splitlines()[0] if output else "unknown"
