"""File-descriptor exhaustion: a real `pgproxy` process under RLIMIT_NOFILE 300.

pgproxy keeps 256 descriptors for server connections and the rest, and takes at most 44
clients under this limit (past that: 53300, see tests/e2e/test_limits.py). Connections
refused over that cap still hold a descriptor until they send a startup packet or
client_login_timeout passes, so a flood of connections that say nothing runs the process out
of descriptors all the same. Then new connections must be refused at once (not left hanging
in the listen backlog), the clients already served must go on, and once descriptors are free
again the proxy must accept as before (the listener must survive EMFILE).
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Callable

import psycopg
import pytest

from pgproxy.localpg import LocalPostgres
from tests.e2e.helpers import ProxyProcess, wait_for

from .helpers import psycopg_connect

FD_LIMIT = 300


@pytest.fixture
def small_proxy(start_cli: Callable[..., ProxyProcess]) -> ProxyProcess:
    return start_cli(
        "--default-pool-size", "3",
        "--server-connect-timeout", "2",
        "--query-wait-timeout", "3",
        nofile=FD_LIMIT,
    )  # fmt: skip


def _open_descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _closed_at_once(sock: socket.socket) -> bool:
    """The proxy closed this fresh connection without waiting for its startup packet."""
    sock.settimeout(0.5)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def _connect_nowait(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    sock.connect_ex(("127.0.0.1", port))  # EINPROGRESS: the handshake ends in the kernel
    return sock


def _exhaust(port: int, pid: int) -> list[socket.socket]:
    """Connections that say nothing, until the proxy has no descriptor left.

    They go out in batches without waiting for each handshake: the ones past the client cap
    are cut after OVER_LIMIT_WAIT (1 s), so the flood must outrun that however slow a
    single connect is on the machine at hand."""
    fillers: list[socket.socket] = []
    started = time.monotonic()
    try:
        while _open_descriptors(pid) < FD_LIMIT - 1:
            if len(fillers) >= 4 * FD_LIMIT or time.monotonic() - started > 20:
                raise AssertionError(
                    f"the proxy holds {_open_descriptors(pid)} descriptors after "
                    f"{len(fillers)} connections in {time.monotonic() - started:.1f} s; "
                    f"its limits: {_nofile_limit(pid)}"
                )
            fillers.extend(_connect_nowait(port) for _ in range(FD_LIMIT // 4))
            with contextlib.suppress(AssertionError):
                wait_for(
                    lambda: _open_descriptors(pid) >= FD_LIMIT - 1,
                    timeout=0.25,
                    interval=0.005,
                )
    except BaseException:
        for sock in fillers:
            sock.close()
        raise
    for sock in fillers:
        sock.setblocking(True)
    return fillers


def _nofile_limit(pid: int) -> str:
    with open(f"/proc/{pid}/limits") as limits:
        return next((line.strip() for line in limits if "open files" in line), "?")


def test_out_of_file_descriptors_new_clients_are_refused_and_the_others_go_on(
    cluster: LocalPostgres, small_proxy: ProxyProcess
) -> None:
    port = small_proxy.port
    pid = small_proxy.process.pid
    linked = psycopg_connect(port)
    idle = psycopg_connect(port)
    fillers: list[socket.socket] = []
    try:
        linked.execute("BEGIN")
        linked.execute("SELECT 1")  # holds server 1 from now on
        idle.execute("BEGIN")
        idle.execute("SELECT 1")
        idle.execute("COMMIT")  # server 2 is idle in the pool

        fillers = _exhaust(port, pid)
        extra = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(5)]
        fillers.extend(extra)
        refused = [sock for sock in extra if _closed_at_once(sock)]
        assert refused == extra, "a connection over the limit was left hanging"
        started = time.monotonic()
        with pytest.raises(psycopg.OperationalError):
            psycopg_connect(port, connect_timeout=10).close()
        assert time.monotonic() - started < 2  # refused, not queued

        # The clients already in go on: the linked one in its transaction, the idle one on
        # the pooled server.
        assert idle.execute("SELECT 2").fetchone() == (2,)
        assert linked.execute("SELECT 3").fetchone() == (3,)
        linked.execute("COMMIT")
    finally:
        for sock in fillers:
            sock.close()
        for conn in (linked, idle):
            conn.close()
    # Descriptors free again: the listener survived EMFILE and new clients are served.
    wait_for(lambda: _open_descriptors(pid) < FD_LIMIT - 10, timeout=5, what="fds to be freed")
    newcomers = [psycopg_connect(port) for _ in range(3)]
    try:
        for conn in newcomers:  # three transactions at once: a third server is opened
            conn.execute("BEGIN")
        pids = {conn.execute("SELECT pg_backend_pid()").fetchone()[0] for conn in newcomers}
        assert len(pids) == 3
    finally:
        for conn in newcomers:
            conn.close()
    assert small_proxy.process.poll() is None
    assert "Traceback" not in small_proxy.log(), small_proxy.log()


def test_silent_connections_past_the_client_cap_leave_descriptors_for_servers(
    cluster: LocalPostgres, small_proxy: ProxyProcess
) -> None:
    """A logged-in client whose query needs a new server connection while the process is
    flooded with connections that never send a startup packet. The flood takes the 256
    descriptors kept for servers, so the first connect may fail with EMFILE; but the silent
    connections past the client cap are cut after a second, and the client, one of the 44
    the limit is meant to serve, gets its server within query_wait_timeout (3 s)."""
    port = small_proxy.port
    pid = small_proxy.process.pid
    needy = psycopg_connect(port)
    fillers: list[socket.socket] = []
    try:
        assert needy.execute("SELECT 1").fetchone() == (1,)  # logged in, server 1 idle
        holder = psycopg_connect(port)
        try:
            holder.execute("BEGIN")
            holder.execute("SELECT 1")  # holds server 1: needy needs a second one
            fillers = _exhaust(port, pid)
            assert needy.execute("SELECT 2").fetchone() == (2,)
        finally:
            holder.close()
    finally:
        for sock in fillers:
            sock.close()
        needy.close()
