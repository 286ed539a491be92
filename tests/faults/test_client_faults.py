"""Clients that die or misbehave: killed mid-transaction, mid-COPY, mid-result, mid-login;
a client that never reads; slow-loris logins.

A killed client is a socket shut down without a Terminate, as when its process dies. After
each, the server it held must be rolled back and reused, or closed (never handed on dirty),
Postgres must not keep a backend busy for it, and everyone else must go on being served.
"""

from __future__ import annotations

import contextlib
import select
import signal
import socket
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest

from pgproxy.localpg import LocalPostgres
from tests.e2e.conftest import ProxyThread
from tests.e2e.helpers import ProxyProcess, kill_socket, wait_for

from .helpers import (
    buffered,
    client_count,
    closed_by_peer,
    errors_in,
    live_backend_pids,
    pool_counts,
    psycopg_connect,
    read_message,
    scale,
    server_pids,
    startup_packet,
    wait_until_quiet,
)

HUGE_COPY = b"COPY (SELECT repeat('x', 1000) FROM generate_series(1, 1000000)) TO STDOUT"


@pytest.fixture
def table(cluster: LocalPostgres) -> Iterator[str]:
    name = f"c_{uuid.uuid4().hex[:10]}"
    cluster.execute(
        f"CREATE TABLE {name} (n int NOT NULL); ALTER TABLE {name} OWNER TO app", database="app"
    )
    yield name
    cluster.execute(f"DROP TABLE IF EXISTS {name}", database="app")


def _count(cluster: LocalPostgres, table: str) -> int:
    return int(cluster.execute(f"SELECT count(*) FROM {table}", database="app")[0][0])


def _app_activity(cluster: LocalPostgres) -> list[tuple[Any, ...]]:
    return cluster.execute(
        "SELECT pid, state, left(query, 40) FROM pg_stat_activity WHERE usename = 'app'"
    )


def _server_reading_paused(proxy: ProxyThread) -> bool:
    return bool(
        proxy.call(
            lambda: any(s.gate is not None and not s.gate.is_open for s in proxy.proxy.servers)
        )
    )


# -- killed mid-something -----------------------------------------------------------------------


def test_a_client_killed_mid_transaction_is_rolled_back_and_its_server_reused(
    cluster: LocalPostgres, make_proxy: Callable[..., ProxyThread], table: str
) -> None:
    proxy = make_proxy(default_pool_size="1")
    victim = psycopg_connect(proxy.port)
    victim.execute("BEGIN")
    victim.execute(f"INSERT INTO {table} VALUES (1)")
    pid = victim.execute("SELECT pg_backend_pid()").fetchone()[0]
    kill_socket(victim)
    victim.close()
    wait_until_quiet(proxy)
    assert server_pids(proxy) == {pid}  # rolled back and kept, not closed
    with psycopg_connect(proxy.port) as next_client:
        assert next_client.execute("SELECT pg_backend_pid()").fetchone()[0] == pid
        assert next_client.info.transaction_status.name == "IDLE"
    assert _count(cluster, table) == 0
    assert [row[1] for row in _app_activity(cluster)] == ["idle"]


def test_a_client_killed_mid_copy_in_loses_its_rows_and_its_server(
    cluster: LocalPostgres, make_proxy: Callable[..., ProxyThread], table: str
) -> None:
    proxy = make_proxy(default_pool_size="1")
    victim = psycopg_connect(proxy.port)
    pid = victim.execute("SELECT pg_backend_pid()").fetchone()[0]
    with (
        contextlib.suppress(psycopg.Error),
        victim.cursor().copy(f"COPY {table} FROM STDIN") as copy,
    ):
        for n in range(10_000):
            copy.write_row((n,))
        kill_socket(victim)  # the rows are on the wire, the COPY is not finished
    victim.close()
    # Mid-COPY the server cannot be made clean: it is closed, and Postgres ends the backend.
    wait_for(lambda: pid not in live_backend_pids(cluster), timeout=5, what="the backend to go")
    wait_until_quiet(proxy)
    assert pid not in server_pids(proxy)
    assert _count(cluster, table) == 0
    with psycopg_connect(proxy.port) as next_client:
        assert next_client.execute("SELECT 1").fetchone() == (1,)


def test_a_client_killed_mid_result_gets_its_query_cancelled_and_its_server_closed(
    cluster: LocalPostgres, make_proxy: Callable[..., ProxyThread]
) -> None:
    proxy = make_proxy(default_pool_size="1")
    victim = psycopg_connect(proxy.port)
    pid = victim.execute("SELECT pg_backend_pid()").fetchone()[0]
    victim.pgconn.send_query(HUGE_COPY)
    victim.pgconn.flush()
    readable, _, _ = select.select([victim.fileno()], [], [], 5)
    assert readable  # the result is flowing
    kill_socket(victim)
    victim.close()
    # A 1 GB result being written: pgproxy cancels it and closes the server; Postgres' backend
    # must be gone soon, not left writing into a socket nobody reads.
    wait_for(lambda: pid not in live_backend_pids(cluster), timeout=5, what="the backend to go")
    wait_until_quiet(proxy)
    with psycopg_connect(proxy.port) as next_client:
        assert next_client.execute("SELECT 1").fetchone() == (1,)


def _sasl_initial_response() -> bytes:
    mechanism = b"SCRAM-SHA-256\x00"
    first = b"n,,n=,r=" + uuid.uuid4().hex.encode()
    body = mechanism + struct.pack("!i", len(first)) + first
    return b"p" + struct.pack("!i", len(body) + 4) + body


@pytest.mark.parametrize(
    "stage", ["half_startup", "after_startup", "mid_scram", "after_ssl_request"]
)
def test_clients_killed_mid_login_leave_nothing_behind(
    cluster: LocalPostgres, make_proxy: Callable[..., ProxyThread], stage: str
) -> None:
    proxy = make_proxy(default_pool_size="2")
    with psycopg_connect(proxy.port) as regular:  # logged in before, busy all along
        regular.execute("SELECT 1")
        servers_before = server_pids(proxy)
        for _ in range(scale(20, 100)):
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
                packet = startup_packet()
                if stage == "half_startup":
                    sock.sendall(packet[: len(packet) // 2])
                elif stage == "after_ssl_request":
                    sock.sendall(struct.pack("!ii", 8, 80877103))
                    assert sock.recv(1) == b"N"
                else:
                    sock.sendall(packet)
                    kind, _body = read_message(sock)
                    assert kind == b"R"  # AuthenticationSASL
                    if stage == "mid_scram":
                        sock.sendall(_sasl_initial_response())
                        kind, _body = read_message(sock)
                        assert kind == b"R"  # AuthenticationSASLContinue
                # Dies here: a reset, as from a killed process.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            assert regular.execute("SELECT 2").fetchone() == (2,)
        wait_for(lambda: client_count(proxy) == 1, timeout=5, what="dead logins to be forgotten")
        assert server_pids(proxy) == servers_before  # no server opened or lost for them
    with psycopg_connect(proxy.port) as newcomer:
        assert newcomer.execute("SELECT 3").fetchone() == (3,)


# -- clients that do not read -------------------------------------------------------------------


def test_a_client_that_never_reads_its_result_keeps_proxy_memory_bounded(
    cluster: LocalPostgres, make_proxy: Callable[..., ProxyThread]
) -> None:
    """1 GB requested, nothing read: pgproxy stops reading from that server once its write
    buffer toward the client is full, and holds well under 2 MiB; the other server goes on
    serving everyone else. When the reader dies its server is closed."""
    proxy = make_proxy(default_pool_size="2")
    hog = psycopg_connect(proxy.port)
    pid = hog.execute("SELECT pg_backend_pid()").fetchone()[0]
    hog.pgconn.send_query(HUGE_COPY)
    hog.pgconn.flush()
    wait_for(lambda: _server_reading_paused(proxy), timeout=10, what="reading to pause")
    samples = []
    with psycopg_connect(proxy.port) as other:
        for i in range(scale(20, 200)):
            assert other.execute("SELECT %s::int", (i,)).fetchone() == (i,)
            samples.append(buffered(proxy))
    assert _server_reading_paused(proxy)
    assert max(samples) < 2 * 1024 * 1024, f"pgproxy buffered up to {max(samples)} bytes"
    assert cluster.execute("SELECT wait_event FROM pg_stat_activity WHERE pid = $1", pid) == [
        ("ClientWrite",)
    ]  # Postgres is held back too, not pgproxy filling up
    kill_socket(hog)
    hog.close()
    wait_for(lambda: pid not in live_backend_pids(cluster), timeout=5, what="the backend to go")
    wait_until_quiet(proxy)


def test_a_client_that_never_reads_gives_its_server_back_when_pgproxy_disconnects_it(
    cluster: LocalPostgres, make_proxy: Callable[..., ProxyThread]
) -> None:
    """query_timeout ends a non-reading client's query; 5 s after the cancel pgproxy
    disconnects the client and closes the server. Found by these tests: the graceful close
    waited for a write buffer the client never drains, so connection_lost never came, the
    server stayed linked to it, and with a pool of 1 nobody was served again. Now the
    connection is cut CLOSE_FLUSH_TIMEOUT (2 s) after the close."""
    proxy = make_proxy(default_pool_size="1", query_timeout="1", query_wait_timeout="4")
    hog = psycopg_connect(proxy.port)
    try:
        hog.pgconn.send_query(HUGE_COPY)
        hog.pgconn.flush()
        wait_for(lambda: _server_reading_paused(proxy), timeout=10, what="reading to pause")
        wait_for(
            lambda: proxy.call(lambda: any(c.closed for c in proxy.proxy.clients)),
            timeout=10,
            what="pgproxy to disconnect the client (query_timeout + 5 s)",
        )
        started = time.monotonic()
        with psycopg_connect(proxy.port) as other:  # pool of 1: needs the hog's server
            assert other.execute("SELECT 1").fetchone() == (1,)
        assert time.monotonic() - started < 2 + 1.5
        wait_for(lambda: client_count(proxy) == 0, timeout=5, what="the hog to be gone too")
    finally:
        kill_socket(hog)
        hog.close()


def test_slow_loris_logins_are_cut_at_client_login_timeout_and_do_not_starve_others(
    cluster: LocalPostgres, make_proxy: Callable[..., ProxyThread]
) -> None:
    """Connections that send their startup packet one byte at a time hold client slots;
    client_login_timeout ends each of them (with 08006 when the client can still read it),
    the proxy stays responsive meanwhile, and the slots come back."""
    lorises = scale(30, 150)
    proxy = make_proxy(
        default_pool_size="2", client_login_timeout="1", max_client_conn=str(lorises + 5)
    )
    with psycopg_connect(proxy.port) as regular:
        regular.execute("SELECT 1")
        socks = [socket.create_connection(("127.0.0.1", proxy.port)) for _ in range(lorises)]
        stop = threading.Event()

        def trickle() -> None:
            packet = startup_packet()
            for i in range(len(packet) - 1):  # never the last byte
                if stop.wait(0.1):
                    return
                for sock in socks:
                    with contextlib.suppress(OSError):
                        sock.send(packet[i : i + 1])

        trickler = threading.Thread(target=trickle, daemon=True)
        started = time.monotonic()
        trickler.start()
        try:
            wait_for(
                lambda: client_count(proxy) == lorises + 1, timeout=5, what="lorises to connect"
            )
            while time.monotonic() - started < 0.8:  # before the timeout: others are served
                assert regular.execute("SELECT 2").fetchone() == (2,)
                with psycopg_connect(proxy.port) as newcomer:
                    assert newcomer.execute("SELECT 3").fetchone() == (3,)
            outcomes = [closed_by_peer(sock, timeout=3) for sock in socks]
            elapsed = time.monotonic() - started
        finally:
            stop.set()
            trickler.join(5)
            for sock in socks:
                sock.close()
        assert all(closed for closed, _data in outcomes), "a slow login was never cut"
        assert elapsed < 1 + 0.5 + 1.5, elapsed  # client_login_timeout + watchdog + slack
        codes = {e.get("C") for _closed, data in outcomes for e in errors_in(data)}
        assert codes <= {"08006"}, codes
        wait_for(lambda: client_count(proxy) == 1, timeout=5, what="the slots to come back")
        assert regular.execute("SELECT 4").fetchone() == (4,)
    assert pool_counts(proxy)["waiters"] == 0


def test_sigterm_stops_pgproxy_in_time_even_with_a_client_that_never_reads(
    cluster: LocalPostgres, start_cli: Callable[..., ProxyProcess]
) -> None:
    """A client stopped reading in the middle of a big result (a hung application, or a
    host gone without a FIN): SIGTERM still ends the process within shutdown_timeout and
    the 2 s pgproxy waits for closed sockets, with exit code 0."""
    proxy = start_cli("--shutdown-timeout", "1")
    hog = psycopg_connect(proxy.port)
    try:
        hog.pgconn.send_query(HUGE_COPY)
        hog.pgconn.flush()
        time.sleep(1)  # the result fills every buffer on the way; nothing reads it
        sent_at = time.monotonic()
        proxy.process.send_signal(signal.SIGTERM)
        assert proxy.process.wait(timeout=1 + 2 + 3) == 0, proxy.log()
        assert time.monotonic() - sent_at >= 1  # it did wait for the linked client
    finally:
        kill_socket(hog)
        hog.close()
