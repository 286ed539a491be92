"""`make run`: pgproxy in front of a throwaway local Postgres, with a one-screen demonstration.

With PGPROXY_SERVER set, pgproxy runs in front of that server instead (configure users with
PGPROXY_USERS as usual) and the demonstration is skipped. Uses only runtime dependencies.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator

import pg8000.native

from pgproxy.localpg import LocalPostgres, free_port

USER, PASSWORD, DATABASE = "demo", "demo-secret", "demo"
ADMIN, ADMIN_PASSWORD = "admin", "admin-secret"  # the admin console's user (pgproxy only)
MAX_CONNECTIONS = 20
POOL_SIZE = 5
CLIENTS = 100


def _port(preferred: int) -> int:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", preferred))
        except OSError:
            return free_port()
    return preferred


def _wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"pgproxy exited with code {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit("pgproxy did not start listening")


@contextlib.contextmanager
def _proxy(args: list[str]) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([sys.executable, "-m", "pgproxy", *args])
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()


def _clients(port: int, count: int, queries: int) -> tuple[int, int, list[str]]:
    """`count` clients connect at once, run `queries` queries each, then all disconnect."""
    ok = 0
    errors: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(count, timeout=60)

    def one() -> None:
        nonlocal ok
        conn = None
        try:
            conn = pg8000.native.Connection(
                USER, host="127.0.0.1", port=port, password=PASSWORD, database=DATABASE, timeout=60
            )
            for _ in range(queries):
                conn.run("SELECT pg_sleep(0.02)")
            with lock:
                ok += 1
        except Exception as exc:  # noqa: BLE001 - reported, that is the point of the demo
            fields = exc.args[0] if exc.args and isinstance(exc.args[0], dict) else {}
            text = f"{fields['C']} {fields['M']}" if "C" in fields else str(exc)
            with lock:
                errors.append(text)
        finally:
            with contextlib.suppress(threading.BrokenBarrierError):
                barrier.wait()  # everybody stays connected until all are done
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()

    threads = [threading.Thread(target=one) for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return ok, len(errors), errors[:1]


def _max_backends(pg: LocalPostgres, stop: threading.Event, out: list[int]) -> None:
    conn = pg8000.native.Connection(
        pg.superuser, host=pg.host, port=pg.port, password=pg.superuser_password
    )
    try:
        while not stop.is_set():
            # Not pgproxy's monitor: its one connection reads pg_stat_activity for /metrics.
            rows = conn.run(
                "SELECT count(*) FROM pg_stat_activity WHERE usename = :u "
                "AND application_name <> 'pgproxy_monitor'",
                u=USER,
            )
            out.append(int(rows[0][0]))
            stop.wait(0.02)
    finally:
        conn.close()


def _measure(pg: LocalPostgres, port: int) -> tuple[int, int, list[str], int]:
    stop = threading.Event()
    samples: list[int] = []
    sampler = threading.Thread(target=_max_backends, args=(pg, stop, samples))
    sampler.start()
    try:
        ok, failed, first = _clients(port, CLIENTS, 5)
    finally:
        stop.set()
        sampler.join()
    return ok, failed, first, max(samples, default=0)


def _show_observability(pg: LocalPostgres, port: int, metrics_port: int) -> None:
    """What the operator sees now: the admin console's SHOW POOLS and a few metrics."""
    psql = pg.bindir / "psql"
    if psql.exists():
        print("\n  admin console, SHOW POOLS:\n")
        shown = subprocess.run(
            [str(psql), "-h", "127.0.0.1", "-p", str(port), "-U", ADMIN, "-X", "-c",
             "SHOW POOLS", "pgproxy"],
            env={**os.environ, "PGPASSWORD": ADMIN_PASSWORD},
            capture_output=True,
            text=True,
            check=False,
        )  # fmt: skip
        for line in (shown.stdout or shown.stderr).splitlines():
            print(f"    {line}")
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    wanted = ("pgproxy_clients{", "pgproxy_servers{", "pgproxy_queries_total{")
    print(f"\n  /metrics (http://127.0.0.1:{metrics_port}/metrics), a few lines:\n")
    for line in text.splitlines():
        if line.startswith(wanted):
            print(f"    {line}")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    # SIGTERM (make's children get it when make is stopped; so do `timeout` and systemd) ends
    # the demo as Ctrl-C does: pgproxy stopped, the throwaway cluster removed.
    signal.signal(signal.SIGTERM, _interrupt)
    if os.environ.get("PGPROXY_SERVER"):
        port = _port(6432)
        print(f"pgproxy in front of {os.environ['PGPROXY_SERVER']} on 127.0.0.1:{port}")
        with (
            _proxy(["--listen", f"127.0.0.1:{port}"]) as proc,
            contextlib.suppress(KeyboardInterrupt),
        ):
            proc.wait()
        return 0

    print(f"starting a throwaway PostgreSQL (max_connections={MAX_CONNECTIONS}) ...")
    with LocalPostgres(max_connections=MAX_CONNECTIONS) as pg:
        pg.create_user(USER, PASSWORD)
        pg.create_database(DATABASE, owner=USER)
        port = _port(6432)
        metrics_port = _port(9127)
        args = [
            "--listen", f"127.0.0.1:{port}",
            "--server", f"{pg.host}:{pg.port}",
            "--user", f"{USER}:{PASSWORD}",
            "--user", f"{ADMIN}:{ADMIN_PASSWORD}",
            "--admin-users", ADMIN,
            "--metrics-listen", f"127.0.0.1:{metrics_port}",
            "--default-pool-size", str(POOL_SIZE),
            # One line per login would scroll the demonstration away.
            "--log-level", "warning",
        ]  # fmt: skip
        with _proxy(args) as proc:
            _wait_listening(port, proc)
            print(f"\n{CLIENTS} clients at once, 5 queries each, all staying connected:\n")
            direct = _measure(pg, pg.port)
            proxied = _measure(pg, port)
            print(f"  {'':24}{'succeeded':>10}{'failed':>8}{'server connections':>20}")
            for name, (ok, failed, _first, peak) in (
                (f"directly (port {pg.port})", direct),
                (f"via pgproxy (port {port})", proxied),
            ):
                print(f"  {name:24}{ok:>10}{failed:>8}{peak:>20}")
            if direct[2]:
                print(f"\n  directly, Postgres said: {direct[2][0][:100]}")
            print(
                f"\n  pgproxy served {CLIENTS} clients with at most {proxied[3]} server "
                f"connections (default_pool_size={POOL_SIZE}, max_connections={MAX_CONNECTIONS})."
            )
            _show_observability(pg, port, metrics_port)
            print(
                "\npgproxy is running. Connect with:\n\n"
                f"  PGPASSWORD={PASSWORD} psql -h 127.0.0.1 -p {port} -U {USER} {DATABASE}\n"
                f"  PGPASSWORD={ADMIN_PASSWORD} psql -h 127.0.0.1 -p {port} -U {ADMIN} pgproxy"
                "      (admin console: SHOW POOLS, SHOW CLIENTS, SHOW LEAKS, ...)\n"
                f"  curl http://127.0.0.1:{metrics_port}/metrics\n\n"
                "Press Ctrl-C to stop (the throwaway PostgreSQL is removed).\n",
                flush=True,
            )
            with contextlib.suppress(KeyboardInterrupt):
                proc.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
