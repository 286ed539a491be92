"""The open-file limit: clients past what it allows get 53300, the others go on."""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from pgproxy.localpg import LocalPostgres, free_port

from .helpers import REPO, cli_env, connect, wait_for

NOFILE = 300  # FD_RESERVE (256) kept: room for 44 clients


def _low_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))


def test_clients_past_the_open_file_limit_get_53300_and_the_rest_are_served(
    pg: LocalPostgres, tmp_path: Path
) -> None:
    port = free_port()
    log = tmp_path / "pgproxy.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "pgproxy", "--listen", f"127.0.0.1:{port}",
             "--server", f"{pg.host}:{pg.port}", "--user", "app:app-secret",
             "--default-pool-size", "2", "--metrics-listen", "", "--monitor-interval", "0"],
            cwd=REPO, env=cli_env(), stdout=out, stderr=subprocess.STDOUT,
            preexec_fn=_low_limit,
        )  # fmt: skip
    conns: list[psycopg.Connection] = []
    try:

        def up() -> bool:
            assert process.poll() is None, log.read_text()
            return "listening on" in log.read_text()

        wait_for(up, timeout=15, what="pgproxy to start")
        assert "leaves room for 44 clients, fewer than max_client_conn (10000)" in log.read_text()
        conns = [connect(port) for _ in range(44)]
        with pytest.raises(psycopg.OperationalError) as caught:
            connect(port)
        assert "no more connections allowed (the proxy's open-file limit allows 44 clients)" in (
            str(caught.value)
        )
        for conn in conns:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        conns.pop().close()
        wait_for(lambda: _can_connect(port), what="a freed slot to be usable")
    finally:
        for conn in conns:
            conn.close()
        process.terminate()
        assert process.wait(30) == 0


def _can_connect(port: int) -> bool:
    try:
        connect(port).close()
    except psycopg.OperationalError:
        return False
    return True
