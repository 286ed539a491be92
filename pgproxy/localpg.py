"""A throw-away local PostgreSQL cluster for tests, benchmarks and the demo.

`LocalPostgres` runs `initdb` into a fresh temporary directory, starts the server on
127.0.0.1 with SCRAM-SHA-256 authentication, and removes everything again on `stop()`.
The cluster is tuned for speed, not durability (fsync, full-page writes and synchronous
commit are off): never point it at data you want to keep.

Rules of this file: it is part of the shell layer, so it may spawn processes and open
sockets, but the proxy itself never imports it. PostgreSQL refuses to run as root, so
when we are root every server-side command runs as the `postgres` OS user and the
temporary directory is handed to that user.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

import pg8000.native

__all__ = ["Credentials", "LocalPostgres", "LocalPostgresError", "find_pg_bindir", "free_port"]

# The OS account that owns the cluster when we run as root (Debian's packages create it).
PG_OS_USER = "postgres"
_APT_HINT = "apt-get install -y postgresql"
# How many lines of the server log an error message carries.
_LOG_TAIL_LINES = 30
# `pg_ctl -w` waits up to this long for start/stop (its own default is 60 s).
_PG_CTL_TIMEOUT = 60
_BIND_FAILED = re.compile(r"could not (bind|create listen socket)|Address already in use")


@dataclass(frozen=True, slots=True)
class Credentials:
    """A login and the database it uses, as tests and the benchmark pass them around."""

    user: str
    password: str
    database: str


class LocalPostgresError(RuntimeError):
    """A cluster command failed; the message ends with the tail of the server log."""


def find_pg_bindir() -> Path:
    """Return the directory holding `initdb`, `pg_ctl` and `postgres`.

    Order: `$PG_BINDIR`; the newest `/usr/lib/postgresql/<version>/bin` (Debian/Ubuntu
    layout, versions compared numerically so 10 beats 9.6); the directory `pg_ctl` on
    PATH really lives in.
    """
    env_dir = os.environ.get("PG_BINDIR")
    if env_dir:
        bindir = Path(env_dir)
        if not (bindir / "postgres").is_file():
            raise RuntimeError(f"PG_BINDIR={env_dir} has no `postgres` binary")
        return bindir
    candidates: list[tuple[tuple[int, ...], Path]] = []
    for postgres in Path("/usr/lib/postgresql").glob("*/bin/postgres"):
        version = postgres.parent.parent.name
        if re.fullmatch(r"\d+(\.\d+)*", version):
            candidates.append((tuple(int(part) for part in version.split(".")), postgres.parent))
    if candidates:
        return max(candidates)[1]
    pg_ctl = shutil.which("pg_ctl")
    if pg_ctl is not None:
        # Resolve symlinks: initdb and postgres sit next to the real pg_ctl, not the link.
        return Path(pg_ctl).resolve().parent
    raise RuntimeError(
        "no PostgreSQL server binaries found (looked at $PG_BINDIR, "
        f"/usr/lib/postgresql/*/bin and pg_ctl on PATH); install them with: {_APT_HINT}"
    )


def free_port(host: str = "127.0.0.1") -> int:
    """Ask the kernel for a TCP port that is free right now (it may be taken later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _conf_value(value: str) -> str:
    # postgresql.conf accepts a quoted string for every setting type, so always quote.
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def _hba_name(name: str) -> str:
    # pg_hba.conf treats keywords (all, sameuser, …) and +/@ prefixes specially unless quoted.
    return '"' + name.replace('"', '""') + '"'


def _tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _as_pg_user(run_as: Sequence[str], command: Sequence[str]) -> list[str]:
    """Prefix `command` so that it runs as the cluster's OS user (`run_as` may be empty)."""
    if run_as and Path(run_as[0]).name == "su":
        # `su -c` takes a single shell string.
        return [*run_as, shlex.join(command)]
    return [*run_as, *command]


def _teardown(run_as: tuple[str, ...], pg_ctl: Path, data_dir: Path, base: Path) -> None:
    """Stop the server if it runs and remove `base`; safe to call in any state.

    A module-level function (not a method) so that `weakref.finalize` can call it at
    interpreter exit without keeping the `LocalPostgres` object alive.
    """
    pid_file = data_dir / "postmaster.pid"
    if pid_file.exists():
        for mode in ("fast", "immediate"):
            command = [str(pg_ctl), "stop", "-D", str(data_dir), "-m", mode, "-w"]
            command += ["-t", str(_PG_CTL_TIMEOUT)]
            result = subprocess.run(
                _as_pg_user(run_as, command),
                cwd=base,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                check=False,
            )
            if result.returncode == 0:
                break
        else:
            # pg_ctl could not stop it: SIGQUIT is PostgreSQL's immediate shutdown. Deleting
            # the directory under a live server would leave it running with no way to stop it.
            with contextlib.suppress(OSError, ValueError, IndexError):
                os.kill(int(pid_file.read_text().split()[0]), signal.SIGQUIT)
    shutil.rmtree(base, ignore_errors=True)


class LocalPostgres:
    """One throw-away PostgreSQL cluster on 127.0.0.1; use as a context manager."""

    host: str
    port: int
    data_dir: Path

    def __init__(
        self,
        *,
        max_connections: int = 30,
        port: int | None = None,
        base_dir: Path | None = None,
        superuser: str = "postgres",
        superuser_password: str = "postgres-secret",
        settings: Mapping[str, str] = {},  # read-only Mapping, copied
    ) -> None:
        self.max_connections = max_connections
        self.superuser = superuser
        self.superuser_password = superuser_password
        self.settings = dict(settings)
        self.host = "127.0.0.1"
        # A port we picked ourselves may be taken between picking and binding; only then
        # may start() retry with another one.
        self._port_is_ours = port is None
        self.port = port if port is not None else 0
        self._base_dir = base_dir
        self.bindir = find_pg_bindir()
        # Set by start(): the temporary directory that holds data, socket and log.
        self.base: Path | None = None
        self.data_dir = Path()
        self.log_path = Path()
        self._run_as = self._run_as_prefix()
        self._finalizer: weakref.finalize[..., LocalPostgres] | None = None

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        """Create and start the cluster; on failure everything is cleaned up again."""
        if self._finalizer is not None and self._finalizer.alive:
            raise LocalPostgresError("LocalPostgres is already started")
        self._create_base()
        try:
            self._initdb()
            for attempt in range(3):
                if self._port_is_ours:
                    self.port = free_port(self.host)
                self._write_config()
                log_size = len(self.log_text())
                try:
                    self._pg_ctl("start", "-l", str(self.log_path))
                    break
                except LocalPostgresError:
                    this_attempt = self.log_text()[log_size:]
                    if not (
                        self._port_is_ours and attempt < 2 and _BIND_FAILED.search(this_attempt)
                    ):
                        raise
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop the server (fast shutdown) and delete its directory; idempotent."""
        if self._finalizer is not None:
            self._finalizer()

    def restart(self) -> None:
        """Restart the server on the same port with the same data (`pg_ctl restart`)."""
        self._require_started()
        self._pg_ctl("restart", "-m", "fast", "-l", str(self.log_path))

    def __enter__(self) -> LocalPostgres:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def is_running(self) -> bool:
        return self.base is not None and (self.data_dir / "postmaster.pid").exists()

    # -- SQL helpers -----------------------------------------------------------------

    def execute(
        self, sql: str, *params: object, database: str = "postgres"
    ) -> list[tuple[Any, ...]]:
        """Run one statement as the superuser in autocommit mode; returns its rows.

        Parameters use PostgreSQL's own `$1, $2, …` placeholders. Without parameters the
        simple query protocol is used, so `sql` may hold several statements.
        """
        self._require_started()
        with pg8000.native.Connection(
            self.superuser,
            host=self.host,
            port=self.port,
            database=database,
            password=self.superuser_password,
            timeout=30,
            application_name="localpg",
        ) as conn:
            # execute_unnamed is what pg8000's own run() calls once it has turned :name
            # placeholders into $n; calling it directly keeps PostgreSQL's $n placeholders.
            rows = conn.execute_unnamed(sql, vals=params).rows if params else conn.run(sql)
        return [tuple(row) for row in rows or ()]

    def create_user(
        self, name: str, password: str, *, superuser: bool = False, createdb: bool = False
    ) -> None:
        """Create a login role; the password is stored as a SCRAM-SHA-256 verifier."""
        options = " LOGIN"
        options += " SUPERUSER" if superuser else " NOSUPERUSER"
        options += " CREATEDB" if createdb else " NOCREATEDB"
        # Utility statements take no bind parameters: let the server quote via format().
        (statement,) = self.execute(
            f"SELECT format('CREATE ROLE %I{options} PASSWORD %L', $1::text, $2::text)",
            name,
            password,
        )[0]
        self.execute(statement)

    def create_database(self, name: str, owner: str) -> None:
        (statement,) = self.execute(
            "SELECT format('CREATE DATABASE %I OWNER %I', $1::text, $2::text)", name, owner
        )[0]
        self.execute(statement)

    def backends(self, *, user: str | None = None, database: str | None = None) -> int:
        """Count client backends (optionally of one user/database), not counting ours."""
        rows = self.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
            " AND ($1::text IS NULL OR usename = $1::text)"
            " AND ($2::text IS NULL OR datname = $2::text)",
            user,
            database,
        )
        count: int = rows[0][0]
        return count

    def wait_for_backends(
        self,
        expected: int,
        *,
        user: str | None = None,
        database: str | None = None,
        timeout: float = 10.0,
    ) -> bool:
        """Poll `backends()` until it equals `expected`; False if the deadline passes first.

        Backends end asynchronously after their client disconnects, hence the poll.
        """
        deadline = time.monotonic() + timeout
        while True:
            if self.backends(user=user, database=database) == expected:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)

    def dsn(self, user: str, password: str, database: str) -> str:
        """A `postgresql://` URL for the TCP listener, with every part percent-encoded."""
        return (
            f"postgresql://{quote(user, safe='')}:{quote(password, safe='')}"
            f"@{self.host}:{self.port}/{quote(database, safe='')}"
        )

    def log_text(self) -> str:
        """Everything the server wrote to its log so far ("" before start)."""
        if self.base is None:
            return ""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    # -- internals -------------------------------------------------------------------

    def _run_as_prefix(self) -> tuple[str, ...]:
        if os.geteuid() != 0:
            return ()
        try:
            pwd.getpwnam(PG_OS_USER)
        except KeyError:
            raise LocalPostgresError(
                f"running as root, but there is no `{PG_OS_USER}` OS user to run PostgreSQL "
                f"as (PostgreSQL refuses to run as root); create it or run: {_APT_HINT}"
            ) from None
        runuser = shutil.which("runuser")
        if runuser is not None:
            return (runuser, "-u", PG_OS_USER, "--")
        return ("su", PG_OS_USER, "-s", "/bin/sh", "-c")

    def _create_base(self) -> None:
        base = Path(tempfile.mkdtemp(prefix="pgproxy-pg-", dir=self._base_dir))
        self.base = base
        self.data_dir = base / "data"
        self.log_path = base / "postgres.log"
        self._finalizer = weakref.finalize(
            self, _teardown, self._run_as, self.bindir / "pg_ctl", self.data_dir, base
        )
        if self._run_as:
            entry = pwd.getpwnam(PG_OS_USER)
            os.chown(base, entry.pw_uid, entry.pw_gid)
            self._check_reachable(base, entry.pw_uid)
        # Created by us so that root can read it even while the server appends to it.
        self.log_path.touch()
        self._chown(self.log_path)

    def _check_reachable(self, base: Path, uid: int) -> None:
        # initdb's own error for an unreachable parent is cryptic; name the directory.
        for parent in base.parents:
            info = parent.stat()
            if info.st_uid != uid and not info.st_mode & 0o001:
                raise LocalPostgresError(
                    f"{base} is not reachable by the `{PG_OS_USER}` OS user: {parent} has no "
                    "search (x) permission for others; pass a base_dir under /tmp"
                )

    def _chown(self, path: Path) -> None:
        if self._run_as:
            entry = pwd.getpwnam(PG_OS_USER)
            os.chown(path, entry.pw_uid, entry.pw_gid)

    def _initdb(self) -> None:
        assert self.base is not None
        pwfile = self.base / "pwfile"
        pwfile.write_text(self.superuser_password + "\n")
        pwfile.chmod(0o600)
        self._chown(pwfile)
        try:
            self._run(
                [
                    str(self.bindir / "initdb"),
                    "-D",
                    str(self.data_dir),
                    "-U",
                    self.superuser,
                    f"--pwfile={pwfile}",
                    "--auth=scram-sha-256",
                    "-E",
                    "UTF8",
                    # C sorts by bytes: always available, fast, and the same on every machine.
                    "--locale=C",
                    # Durability of a throw-away cluster is pointless; skipping fsync saves seconds.
                    "--no-sync",
                    "--no-instructions",
                ],
                "initdb",
            )
        finally:
            pwfile.unlink(missing_ok=True)

    def _write_config(self) -> None:
        assert self.base is not None
        settings: dict[str, str] = {
            "listen_addresses": self.host,
            "port": str(self.port),
            "max_connections": str(self.max_connections),
            "unix_socket_directories": str(self.base),
            "password_encryption": "scram-sha-256",
            # Speed over durability: the cluster is deleted at the end anyway.
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            # Lets COPY into a table created in the same transaction (pgbench -i) skip WAL.
            "wal_level": "minimal",
            "max_wal_senders": "0",
            "shared_buffers": "32MB",
            # pg_ctl -l sends stderr to our log file; no collector process needed.
            "logging_collector": "off",
            "log_line_prefix": "%m [%p] %q%u@%d ",
            **self.settings,
        }
        lines = ["", "# --- written by pgproxy.localpg ---"]
        lines += [f"{name} = {_conf_value(value)}" for name, value in settings.items()]
        conf = self.data_dir / "postgresql.conf"
        original = conf.read_text().split("\n# --- written by pgproxy.localpg ---")[0]
        conf.write_text(original.rstrip("\n") + "\n" + "\n".join(lines) + "\n")
        (self.data_dir / "pg_hba.conf").write_text(
            "# TYPE DATABASE USER ADDRESS METHOD  (written by pgproxy.localpg)\n"
            f"local all {_hba_name(self.superuser)} scram-sha-256\n"
            "host all all 127.0.0.1/32 scram-sha-256\n"
        )

    def _pg_ctl(self, action: str, *args: str) -> None:
        self._run(
            [
                str(self.bindir / "pg_ctl"),
                action,
                "-D",
                str(self.data_dir),
                "-w",
                "-t",
                str(_PG_CTL_TIMEOUT),
                *args,
            ],
            f"pg_ctl {action}",
        )

    def _run(self, command: Sequence[str], what: str) -> None:
        assert self.base is not None
        full = _as_pg_user(self._run_as, command)
        started_at = time.monotonic()
        # cwd = our directory: the postgres user may not be allowed into ours, and initdb
        # and pg_ctl complain when they cannot return to the working directory.
        result = subprocess.run(
            full,
            cwd=self.base,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            output = (result.stdout + result.stderr).strip()
            raise LocalPostgresError(
                f"{what} failed (exit {result.returncode}, "
                f"{time.monotonic() - started_at:.1f} s): {shlex.join(full)}\n"
                f"{output}\n--- server log ({self.log_path}) ---\n{_tail(self.log_path)}"
            )

    def _require_started(self) -> None:
        if self._finalizer is None or not self._finalizer.alive:
            raise LocalPostgresError("LocalPostgres is not started")
