"""`--workers 2`: the real command line, a supervisor and two workers on one port.

The kernel (SO_REUSEPORT) picks the worker of each new connection, so the tests never rely on
one: they tell a client's worker from the key the proxy handed it (pids and ids are numbered
with a stride of 2 from the worker's index + 1) and repeat until both workers were involved.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pgproxy.localpg import LocalPostgres, free_port

from .helpers import REPO, ProxyProcess, cli_env, connect, wait_for

POOL = 4
ADMIN = ("admin", "admin-secret")

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class Workers:
    def __init__(self, cli: ProxyProcess, metrics_port: int) -> None:
        self.cli = cli
        self.metrics_port = metrics_port

    def get(self, path: str) -> tuple[int, str]:
        url = f"http://127.0.0.1:{self.metrics_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=10) as reply:
                return reply.status, reply.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def metrics(self) -> Samples:
        status, text = self.get("/metrics")
        assert status == 200, text
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics().get((name, tuple(sorted(labels.items()))), 0.0)

    def admin(self) -> psycopg.Connection:
        return psycopg.connect(
            host="127.0.0.1",
            port=self.cli.port,
            user=ADMIN[0],
            password=ADMIN[1],
            dbname="pgproxy",
            autocommit=True,
        )

    def show(self, what: str) -> list[dict[str, object]]:
        with self.admin() as conn:
            cur = conn.execute(f"SHOW {what}")
            assert cur.description is not None
            names = [d.name for d in cur.description]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    def worker_pids(self) -> list[int]:
        """The supervisor's children: the workers."""
        pid = self.cli.process.pid
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
        return [int(p) for p in text.split()]


def local_port(conn: psycopg.Connection) -> int:
    sock = socket.socket(fileno=conn.fileno())
    try:
        return int(sock.getsockname()[1])
    finally:
        sock.detach()


def worker_of(conn: psycopg.Connection) -> int:
    return (conn.info.backend_pid - 1) % 2


@pytest.fixture
def workers(start_cli: Callable[..., ProxyProcess]) -> Workers:
    metrics_port = free_port()
    cli = start_cli(
        "--workers",
        "2",
        "--default-pool-size",
        str(POOL),
        "--metrics-listen",
        f"127.0.0.1:{metrics_port}",
        "--user",
        ":".join(ADMIN),
        "--admin-users",
        ADMIN[0],
    )
    w = Workers(cli, metrics_port)
    wait_for(lambda: w.metric("pgproxy_workers_up") == 2, timeout=15, what="both workers up")
    return w


# Connections opened by the last clients_on_both_workers, the ones it closed included.
opened = 0


def clients_on_both_workers(port: int, each: int) -> dict[int, list[psycopg.Connection]]:
    """Open clients until each worker has `each` of them (the others are closed)."""
    global opened
    by_worker: dict[int, list[psycopg.Connection]] = {0: [], 1: []}
    for opened in range(1, 201):  # noqa: B007 - read by the tests
        conn = connect(port)
        mine = by_worker[worker_of(conn)]
        if len(mine) < each:
            mine.append(conn)
        else:
            conn.close()
        if all(len(c) == each for c in by_worker.values()):
            return by_worker
    raise AssertionError("200 connections all landed on one worker")


def test_the_pool_budget_is_shared_and_the_total_never_exceeded(
    workers: Workers, pg: LocalPostgres
) -> None:
    by_worker = clients_on_both_workers(workers.cli.port, 6)
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, pg.backends(user="app"))

    sampler = threading.Thread(target=sample)
    sampler.start()
    errors: list[BaseException] = []

    def run(conn: psycopg.Connection) -> None:
        try:
            for _ in range(3):
                conn.execute("SELECT pg_sleep(0.05)")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(c,)) for cs in by_worker.values() for c in cs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    stop.set()
    sampler.join(10)
    assert not errors
    # 12 clients busy at once through two workers: each opened its 2, never more.
    assert peak == POOL
    pools = workers.show("POOLS")
    assert [(p["database"], p["pool_size"]) for p in pools] == [("app", POOL)]
    assert workers.metric("pgproxy_pool_size", database="app", user="app") == POOL
    assert workers.metric("pgproxy_servers", database="app", user="app", state="idle") == POOL
    for conns in by_worker.values():
        for c in conns:
            c.close()


def test_a_cancel_request_reaches_the_worker_of_its_client(workers: Workers) -> None:
    by_worker = clients_on_both_workers(workers.cli.port, 1)
    cancelled = 0
    # Each cancel arrives on a new connection that either worker may accept: repeat until
    # one had to be handed over (each try has an even chance).
    for attempt in range(40):
        conn = by_worker[attempt % 2][0]
        timer = threading.Timer(0.2, conn.cancel_safe)
        timer.start()
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("SELECT pg_sleep(30)")
        timer.join()
        cancelled += 1
        assert conn.execute("SELECT 1").fetchone() == (1,)
        if attempt >= 3 and workers.metric("pgproxy_cancel_requests_forwarded_total") >= 1:
            break
    assert workers.metric("pgproxy_cancel_requests_forwarded_total") >= 1
    assert cancelled >= 4
    for conns in by_worker.values():
        for c in conns:
            c.close()


def test_admin_console_and_metrics_show_and_act_on_every_worker(workers: Workers) -> None:
    by_worker = clients_on_both_workers(workers.cli.port, 3)
    for conns in by_worker.values():
        for c in conns:
            c.execute("SELECT 1")
    clients = [c for c in workers.show("CLIENTS") if c["user"] == "app"]
    assert len(clients) == 6
    assert {(int(c["id"]) - 1) % 2 for c in clients} == {0, 1}  # type: ignore[call-overload]
    (pool,) = workers.show("POOLS")
    assert pool["cl_idle"] == 6
    (stats,) = workers.show("STATS")
    assert stats["total_xact_count"] == 6  # type: ignore[operator]
    lists = {row["list"]: row["items"] for row in workers.show("LISTS")}
    assert lists["pools"] == 1 and lists["used_clients"] == 7  # the console itself too
    assert workers.metric("pgproxy_clients", database="app", user="app", state="idle") == 6
    assert workers.metric("pgproxy_logins_total", database="app", user="app") == opened
    assert workers.metric("pgproxy_client_connections_max") == 10000
    # One client of each worker killed from one console: one of them is the other worker's.
    victims = [by_worker[0].pop(), by_worker[1].pop()]
    id_by_port = {c["port"]: c["id"] for c in clients}
    with workers.admin() as admin:
        for victim in victims:
            admin.execute(f"KILL_CLIENT {id_by_port[local_port(victim)]}")
    for victim in victims:
        with pytest.raises(psycopg.OperationalError):
            victim.execute("SELECT 1")
    # PAUSE holds both workers' clients; RESUME lets them go.
    with workers.admin() as admin:
        admin.execute("PAUSE app")
        (pool,) = workers.show("POOLS")
        assert pool["paused"] == 1
        admin.execute("RESUME app")
    for conns in by_worker.values():
        for c in conns:
            assert c.execute("SELECT 2").fetchone() == (2,)
            c.close()


def test_a_worker_that_dies_is_restarted_and_the_other_keeps_serving(workers: Workers) -> None:
    by_worker = clients_on_both_workers(workers.cli.port, 1)
    pids = workers.worker_pids()
    assert len(pids) == 2
    # Which pid is worker 1: its log line says so.
    line = workers.cli.log_lines("worker 1 (pid ")[0]
    victim = int(line.split("worker 1 (pid ")[1].split(")")[0])
    assert victim in pids
    os.kill(victim, signal.SIGKILL)
    survivor = by_worker[0][0]
    assert survivor.execute("SELECT 1").fetchone() == (1,)
    wait_for(
        lambda: (
            workers.metric("pgproxy_worker_restarts_total") == 1
            and workers.metric("pgproxy_workers_up") == 2
        ),
        timeout=20,
        what="the dead worker to be restarted",
    )
    assert victim not in workers.worker_pids()
    assert "worker 1 (pid" in workers.cli.log() and "died (signal SIGKILL)" in workers.cli.log()
    fresh = clients_on_both_workers(workers.cli.port, 1)
    for conns in (*fresh.values(), *by_worker.values()):
        for c in conns:
            if c is not by_worker[1][0]:
                assert c.execute("SELECT 3").fetchone() == (3,)
            c.close()


def test_sigterm_drains_every_worker_and_the_supervisor_exits_0(
    workers: Workers, pg: LocalPostgres
) -> None:
    by_worker = clients_on_both_workers(workers.cli.port, 1)
    pg.execute(
        "CREATE TABLE drain_w (worker int); ALTER TABLE drain_w OWNER TO app", database="app"
    )
    try:
        for index, (conn,) in by_worker.items():
            conn.execute("BEGIN")
            conn.execute("INSERT INTO drain_w VALUES (%s)", (index,))
        workers.cli.process.send_signal(signal.SIGTERM)
        wait_for(lambda: workers.get("/readyz")[0] == 503, what="/readyz to fail")
        for (conn,) in by_worker.values():
            conn.execute("COMMIT")  # linked clients finish their transaction
        assert workers.cli.wait(timeout=30) == 0
        rows = pg.execute("SELECT worker FROM drain_w ORDER BY worker", database="app")
        assert [r[0] for r in rows] == [0, 1]
        for (conn,) in by_worker.values():
            conn.close()
    finally:
        pg.execute("DROP TABLE drain_w", database="app")


def test_sigterm_while_the_workers_start_still_drains_and_exits_0(
    pg: LocalPostgres, tmp_path: Path
) -> None:
    """A pod stopped right after it started: the signal reaches workers that have not yet
    installed their handlers; it must wait for them, not kill them."""
    for attempt in range(2):
        log = tmp_path / f"early-{attempt}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "pgproxy", "--workers", "2",
                 "--listen", f"127.0.0.1:{free_port()}", "--server", f"{pg.host}:{pg.port}",
                 "--user", "app:app-secret", "--metrics-listen", "", "--monitor-interval", "0"],
                cwd=REPO, env=cli_env(), stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        try:
            wait_for(
                lambda log=log: "supervisor (pid" in log.read_text(),  # type: ignore[misc]
                timeout=15,
                what="the start",
            )
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=30) == 0, log.read_text()
        finally:
            if process.poll() is None:
                process.kill()
        text = log.read_text()
        assert "while draining" not in text and "Traceback" not in text, text
