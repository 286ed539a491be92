"""A server connection cut, stalled, half-closed or slowed by the relay; an upstream that is
down or hung when pgproxy starts.

Every test names the client whose server is broken (the relay knows each link's backend pid)
and checks three things: that client gets an error saying what happened within a bound, the
other clients do not notice, and the pool is whole again afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import asyncpg
import pg8000.native
import psycopg
import pytest

from pgproxy.localpg import LocalPostgres, free_port
from tests.e2e.conftest import ProxyThread
from tests.e2e.helpers import Background, kill_socket, wait_for

from .helpers import (
    APP,
    assert_pool_whole,
    asyncpg_connect,
    login_error,
    note_pg8000_messages,
    pg_start,
    pg_stop,
    psycopg_connect,
    scale,
    server_pids,
    sqlstate,
    wait_until_quiet,
)
from .relay import Relay

BIG_SELECT = "SELECT repeat('x', 1000) FROM generate_series(1, 300000)"
# Rows of COPY_ROWS: 1000 x and a newline, so that every CopyData message is 1006 bytes.
COPY_ROWS = "COPY (SELECT repeat('x', 1000) FROM generate_series(1, 100000)) TO STDOUT"
ROW = b"x" * 1000 + b"\n"
# The same rows for long enough that query_timeout (1 s) ends the COPY while it streams.
LONG_COPY = "COPY (SELECT repeat('x', 1000) FROM generate_series(1, 5000000)) TO STDOUT"


def _fault_mid_result(
    relay: Relay, conn: psycopg.Connection[Any], pid: int, fault: Callable[[], object]
) -> BaseException:
    """Run a ~300 MB SELECT on `conn`; once its server has sent ~1 MB, run `fault`. Returns
    what the query raised."""
    before = _bytes_down(relay, pid)
    call = Background(lambda: conn.execute(BIG_SELECT))
    call.start()
    wait_for(lambda: _bytes_down(relay, pid) > before + 1_000_000, what="the result to flow")
    fault()
    outcome = call.finish(timeout=15)
    assert isinstance(outcome, psycopg.DatabaseError), outcome
    return outcome


def _bytes_down(relay: Relay, pid: int) -> int:
    return sum(info.bytes_down for info in relay.links() if info.backend_pid == pid)


def _is_cut_off(error: BaseException, sqlstate: str) -> bool:
    """pgproxy's error (`sqlstate`) when the fault fell between two messages. A fault while
    a result streams falls inside a message nearly always: then libpq can only see the
    connection close ("server closed the connection unexpectedly"), as from a Postgres that
    died. (Today pgproxy still writes its error after the half message, which libpq may
    also read as "lost synchronization with server": the bug of the corrupted-row tests.)"""
    text = str(error)
    return (
        getattr(error, "sqlstate", None) == sqlstate
        or "closed the connection" in text
        or "lost synchronization with server" in text
    )


@pytest.mark.parametrize("reset", [True, False], ids=["rst", "fin"])
def test_a_server_cut_mid_result_fails_its_client_and_no_one_else(
    cluster: LocalPostgres, relay: Relay, make_proxy: Callable[..., ProxyThread], reset: bool
) -> None:
    proxy = make_proxy(default_pool_size="2")
    with psycopg_connect(proxy.port) as victim, psycopg_connect(proxy.port) as bystander:
        bystander.execute("BEGIN")
        other = bystander.execute("SELECT pg_backend_pid()").fetchone()[0]
        pid = victim.execute("SELECT pg_backend_pid()").fetchone()[0]
        assert pid != other
        started = time.monotonic()
        error = _fault_mid_result(relay, victim, pid, lambda: relay.cut([pid], reset=reset))
        assert time.monotonic() - started < 10
        assert _is_cut_off(error, "08006"), error
        assert victim.closed or victim.broken
        # The bystander's transaction, on the other server, goes on.
        assert bystander.execute("SELECT pg_backend_pid()").fetchone()[0] == other
        bystander.execute("COMMIT")
    wait_for(lambda: pid not in server_pids(proxy), timeout=5, what="the cut server to go")
    assert cluster.wait_for_backends(len(server_pids(proxy)), user="app")  # Postgres' side too
    assert_pool_whole(proxy, cluster, 2)


def test_a_server_cut_mid_message_never_hands_the_client_a_corrupted_row(
    cluster: LocalPostgres, relay: Relay, make_proxy: Callable[..., ProxyThread]
) -> None:
    """The server's stream toward pgproxy ends 5 bytes before the end of a CopyData (a cut
    at any byte is as likely as this one). pgproxy forwards the 1001 bytes it got, then
    writes its own FATAL 08006: 'E' and the 4 bytes of its length complete the CopyData,
    and the application gets a row ending in b"E\\x00\\x00\\x00..." instead of "xxx\\n".
    Nothing pgproxy can write then is a well-formed message: the client must only see the
    connection close (as when Postgres itself dies mid-message)."""
    proxy = make_proxy(default_pool_size="1")
    with psycopg_connect(proxy.port) as conn:
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        # CopyOutResponse (10 bytes), 3 whole CopyData (1006 each), 1001 bytes of the 4th.
        relay.close_after(pid, 10 + 3 * 1006 + 1001)
        rows = []
        with pytest.raises(psycopg.OperationalError), conn.cursor().copy(COPY_ROWS) as copy:
            rows.extend(bytes(block) for block in copy)
    assert len(rows) >= 3
    bad = [row[-12:] for row in rows if row != ROW]
    assert not bad, f"{len(bad)} corrupted rows delivered, ending in {bad}"


def test_a_transaction_timeout_kill_mid_message_never_hands_the_client_a_corrupted_row(
    cluster: LocalPostgres, relay: Relay, make_proxy: Callable[..., ProxyThread]
) -> None:
    """The same corruption through another path: the server stalls 5 bytes before the end of
    a CopyData; transaction_timeout disconnects the client with 25P04, written right after
    the half message. Every path that writes pgproxy's own message to a linked client (server
    lost or closed, query_timeout's notice and kill, transaction_timeout, shutdown, admin
    KILL) has to know whether that client's stream stops mid-message."""
    proxy = make_proxy(default_pool_size="1", transaction_timeout="1")
    with psycopg_connect(proxy.port) as conn:
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        relay.stall_after(pid, 10 + 3 * 1006 + 1001)
        rows = []
        with pytest.raises(psycopg.OperationalError), conn.cursor().copy(COPY_ROWS) as copy:
            rows.extend(bytes(block) for block in copy)
    relay.cut([pid])
    assert len(rows) >= 3
    bad = [row[-12:] for row in rows if row != ROW]
    assert not bad, f"{len(bad)} corrupted rows delivered, ending in {bad}"


def test_query_timeout_notice_never_lands_inside_a_streaming_row(
    cluster: LocalPostgres, make_proxy: Callable[..., ProxyThread]
) -> None:
    """No fault at all: a result still streaming when query_timeout fires. Server chunks end
    anywhere, so the WARNING "pgproxy: query_timeout (1 s) reached; cancelling the query"
    almost always lands inside a CopyData (or DataRow): the application gets that row with
    the notice in it, and from there libpq reads the stream misframed. Postgres honours the
    cancel and goes idle; the proxy sees its answer and is content; the client waits for
    ever for the rest of a "message" the notice made up."""
    proxy = make_proxy(default_pool_size="1", query_timeout="1", direct=True)
    # A chunk ending exactly between two messages (~1 in 1006) would hide the bug: 3 tries.
    for _ in range(3):
        _copy_until_query_timeout(proxy.port)


def _copy_until_query_timeout(port: int) -> None:
    conn = psycopg_connect(port)
    bad: list[bytes] = []

    def read() -> None:
        with conn.cursor().copy(LONG_COPY) as copy:
            bad.extend(bytes(b).replace(b"x", b"") for b in copy if bytes(b) != ROW)

    call = Background(read)
    call.start()
    try:
        wait_for(lambda: bad or not call.is_alive(), timeout=15, what="the copy to end")
        assert not bad, f"rows with something else inside: {bad}"
        call.join(5)
        assert not call.is_alive(), "the client hangs"
        assert isinstance(call.outcome, psycopg.errors.QueryCanceled), call.outcome
    finally:
        kill_socket(conn)
        call.join(5)
        conn.close()


def test_servers_stalled_mid_query_and_mid_result_are_ended_by_query_timeout(
    cluster: LocalPostgres, relay: Relay, make_proxy: Callable[..., ProxyThread]
) -> None:
    """A partition (nothing arrives, nothing closes) under two clients: one whose query is
    running, one whose result is halfway through. query_timeout cancels; the answer cannot
    get through, and CANCEL_TIMEOUT (5 s) later each client is disconnected and its server
    closed. Without a timeout they would wait for ever: pgproxy sets no TCP keepalive on its
    server connections.

    The client stalled between messages gets 57014 naming query_timeout; the one stalled in
    the middle of a message can only be cut off (libpq: "server closed the connection")."""
    proxy = make_proxy(default_pool_size="3", query_timeout="1")
    with psycopg_connect(proxy.port) as sleeper, psycopg_connect(proxy.port) as reader:
        sleeper.execute("BEGIN")  # each holds its own server
        sleeper_pid = sleeper.execute("SELECT pg_backend_pid()").fetchone()[0]
        reader.execute("BEGIN")
        reader_pid = reader.execute("SELECT pg_backend_pid()").fetchone()[0]
        started = time.monotonic()
        relay.stall([sleeper_pid])
        sleep = Background(lambda: sleeper.execute("SELECT pg_sleep(3)"))
        sleep.start()
        error = _fault_mid_result(relay, reader, reader_pid, lambda: relay.stall([reader_pid]))
        assert _is_cut_off(error, "57014"), error
        canceled = sleep.finish(timeout=10)
        elapsed = time.monotonic() - started
        assert isinstance(canceled, psycopg.errors.QueryCanceled), canceled
        assert "query_timeout" in str(canceled)
        assert 1 + 5 <= elapsed < 1 + 5 + 3, elapsed  # query_timeout + the cancel's 5 s
    for pid in (sleeper_pid, reader_pid):
        wait_for(lambda p=pid: p not in server_pids(proxy), timeout=5, what="stalled servers to go")
    relay.cut([sleeper_pid, reader_pid])  # the partition heals the hard way
    assert_pool_whole(proxy, cluster, 3)


@pytest.mark.parametrize("toward", ["proxy", "server"])
def test_a_half_closed_server_connection_fails_its_client_in_transaction(
    cluster: LocalPostgres,
    relay: Relay,
    make_proxy: Callable[..., ProxyThread],
    toward: str,
) -> None:
    """shutdown(SHUT_WR) toward pgproxy (it reads EOF from its server), or toward Postgres
    (the backend reads EOF, ends, and its close comes back): either way the client's
    transaction fails with 08006 and the server is not reused."""
    proxy = make_proxy(default_pool_size="2")
    with psycopg_connect(proxy.port) as victim:
        victim.execute("BEGIN")
        pid = victim.execute("SELECT pg_backend_pid()").fetchone()[0]
        relay.half_close(pid, toward)  # type: ignore[arg-type]
        wait_for(lambda: pid not in server_pids(proxy), timeout=5, what="the server to go")
        with pytest.raises(psycopg.OperationalError) as caught:
            victim.execute("SELECT 1")
        assert caught.value.sqlstate == "08006", caught.value
    assert cluster.wait_for_backends(len(server_pids(proxy)), user="app")
    assert_pool_whole(proxy, cluster, 2)


def test_latency_on_every_server_byte_slows_clients_but_breaks_nothing(
    cluster: LocalPostgres, relay: Relay, make_proxy: Callable[..., ProxyThread]
) -> None:
    relay.delay(0.02)
    proxy = make_proxy(default_pool_size="3")

    async def work(cid: int) -> list[int]:
        conn = await asyncpg_connect(proxy.port)
        try:
            out = []
            for n in range(3):
                async with conn.transaction():
                    out.append(await conn.fetchval("SELECT $1::int", cid * 100 + n))
            return out
        finally:
            await conn.close()

    async def run() -> list[list[int]]:
        return await asyncio.gather(*(work(cid) for cid in range(6)))

    results = asyncio.run(run())
    assert results == [[cid * 100 + n for n in range(3)] for cid in range(6)]


def test_a_login_slower_than_server_connect_timeout_fails_with_08006_naming_it(
    cluster: LocalPostgres, relay: Relay, make_proxy: Callable[..., ProxyThread]
) -> None:
    relay.delay(0.4)  # a SCRAM login is ~4 round trips: over 2 s through this relay
    proxy = make_proxy(default_pool_size="2", server_connect_timeout="1")
    started = time.monotonic()
    error = login_error(proxy.port)
    assert 1 <= time.monotonic() - started < 3
    assert error.sqlstate == "08006"
    assert "server_connect_timeout" in str(error)
    relay.delay(0)
    with psycopg_connect(proxy.port) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def _readyz(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as reply:
            return int(reply.status), reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.mark.parametrize("how", ["refused", "hung"])
def test_an_upstream_unreachable_at_start_fails_clients_with_08006_until_it_is_back(
    cluster: LocalPostgres, relay: Relay, make_proxy: Callable[..., ProxyThread], how: str
) -> None:
    """Postgres down (connections refused) or hung (accepted, never answered) when pgproxy
    starts: /readyz says so (refused), each client gets 08006 within server_connect_timeout
    (and at once when refused), and once Postgres is back both recover by themselves.

    A hung Postgres is not seen by /readyz: its probe is a TCP connect, which the kernel
    completes (documented: "a TCP connect to server succeeded within the last 2 s")."""
    if how == "refused":
        relay.refuse()
    else:
        relay.hang_new()
    metrics = free_port()
    proxy = make_proxy(server_connect_timeout="1", metrics_listen=f"127.0.0.1:{metrics}")
    if how == "refused":
        status, reason = _readyz(metrics)
        assert status == 503
        assert "unreachable" in reason
    for _ in range(2):
        started = time.monotonic()
        error = login_error(proxy.port)
        elapsed = time.monotonic() - started
        assert error.sqlstate == "08006", error
        assert elapsed < (0.5 if how == "refused" else 2.0), elapsed
        if how == "hung":
            assert elapsed >= 0.9
            assert "server_connect_timeout" in str(error)
        else:
            assert "refused" in str(error)
    if how == "refused":
        relay.accept()
    else:
        relay.hang_new(False)
    wait_for(lambda: _readyz(metrics)[0] == 200, timeout=5, what="/readyz to pass")
    with psycopg_connect(proxy.port) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    if how == "hung":
        relay.cut()  # the hung logins' links, which pgproxy gave up on


def test_postgres_stopped_then_started_clients_fail_fast_then_recover(
    cluster: LocalPostgres, make_proxy: Callable[..., ProxyThread]
) -> None:
    proxy = make_proxy(default_pool_size="2", server_connect_timeout="2", direct=True)
    with psycopg_connect(proxy.port) as idle:
        idle.execute("SELECT 1")
        pg_stop(cluster)
        try:
            wait_for(lambda: not server_pids(proxy), timeout=5, what="the servers to go")
            for conn in (idle, None):
                started = time.monotonic()
                with pytest.raises(psycopg.OperationalError) as caught:
                    (conn or psycopg_connect(proxy.port)).execute("SELECT 1")
                assert caught.value.sqlstate == "08006", caught.value
                assert time.monotonic() - started < 1
        finally:
            pg_start(cluster)
    with psycopg_connect(proxy.port) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert_pool_whole(proxy, cluster, 2)


def test_an_idle_server_partitioned_away_is_caught_by_the_check_before_reuse(
    cluster: LocalPostgres,
    relay: Relay,
    make_proxy: Callable[..., ProxyThread],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A pooled server whose network vanished (no FIN, no RST: pgproxy cannot know) is
    checked with server_check_query before reuse; the check gets no answer, the server is
    replaced, and the client is served without an error.

    The check has no timeout of its own: the watchdog gives up on it after RESET_TIMEOUT
    (10 s, not configurable), and the client waits that long.
    """
    caplog.set_level(logging.INFO, logger="pgproxy")
    proxy = make_proxy(default_pool_size="1", server_check_delay="0.2", query_wait_timeout="30")
    with psycopg_connect(proxy.port) as conn:
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        relay.stall([pid])
        time.sleep(0.3)  # the idleness server_check_delay looks for
        started = time.monotonic()
        new_pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        waited = time.monotonic() - started
    assert new_pid != pid
    assert waited < 10 + 3, waited
    # Logged as the check it was, not as a reset.
    assert any("closed (server_check_failed)" in r.getMessage() for r in caplog.records)
    relay.cut([pid])


def test_a_fatal_right_behind_the_last_ready_for_query_does_not_reach_the_client(
    cluster: LocalPostgres, relay: Relay, make_proxy: Callable[..., ProxyThread]
) -> None:
    """COMMIT's answer and a FATAL arrive in one read (the backend was terminated right after
    it committed). Found by these tests: pgproxy relayed the FATAL and kept the client
    connected, so libpq showed it as a notice and asyncpg took it as the start of an error:
    every later query on that connection raised InternalClientError ("another operation is
    in progress"). The client must now either be served on another server or be told its
    connection is gone, and a new connection must work."""
    proxy = make_proxy(default_pool_size="2")

    async def scenario() -> str:
        conn = await asyncpg_connect(proxy.port)
        try:
            tr = conn.transaction()
            await tr.start()
            pid = await conn.fetchval("SELECT pg_backend_pid()")
            relay.stall([pid], "down")  # what Postgres sends now piles up in one read
            commit = asyncio.ensure_future(tr.commit())
            await asyncio.sleep(0.2)
            cluster.execute("SELECT pg_terminate_backend($1)", pid)
            await asyncio.sleep(0.2)
            relay.resume([pid])
            await commit
            await asyncio.sleep(0.2)
            try:
                return str(await conn.fetchval("SELECT 1"))
            except (
                asyncpg.PostgresError,
                asyncpg.InterfaceError,
                asyncpg.InternalClientError,
            ) as exc:
                return f"{type(exc).__name__}: {exc}"
        finally:
            conn.terminate()

    # Either answer is right: served on another server, or told the connection is gone
    # (asyncpg: ConnectionDoesNotExistError, or InterfaceError "connection is closed"). An
    # internal error of the driver is not.
    outcome = asyncio.run(scenario())
    assert (
        outcome == "1"
        or outcome.startswith("ConnectionDoesNotExistError")
        or (outcome.startswith("InterfaceError") and "closed" in outcome)
    ), outcome
    with psycopg_connect(proxy.port) as conn:
        assert conn.execute("SELECT 2").fetchone() == (2,)


@pytest.mark.parametrize("driver", ["pg8000 (names mapped)", "psycopg"])
def test_a_session_prelude_cut_by_a_fatal_reaches_the_client_as_that_fatal_only(
    cluster: LocalPostgres, relay: Relay, make_proxy: Callable[..., ProxyThread], driver: str
) -> None:
    """The server is terminated while it answers the proxy's own SET of the client's settings
    (the prelude): RowDescription, a DataRow, then FATAL 57P01. Found by the fault isolation
    test: with named statements mapped, the DataRow went to the client along with the FATAL
    and pg8000 failed inside its row handling instead of reporting 57P01."""
    proxy = make_proxy(default_pool_size="1")
    received: list[tuple[bytes, bytes]] = []  # what pg8000 handles, in order
    other = psycopg_connect(proxy.port, options="-c TimeZone=UTC")
    try:
        pid = other.execute("SELECT pg_backend_pid()").fetchone()[0]
        if driver == "psycopg":
            conn: Any = psycopg_connect(proxy.port, options="-c TimeZone=Asia/Tokyo")
            conn.execute("SELECT 1")  # its settings are applied: the other one's next
            other.execute("SELECT 1")  # use of the server puts the other settings back

            def request() -> object:
                return conn.execute("SELECT 2").fetchone()

        else:
            conn = pg8000.native.Connection(
                APP.user,
                host="127.0.0.1",
                port=proxy.port,
                password=APP.password,
                database=APP.database,
                startup_params={"TimeZone": "Asia/Tokyo"},
                timeout=10,
            )
            statement = conn.prepare("SELECT CAST(:n AS int) + 1")  # maps names from now on
            other.execute("SELECT 1")
            note_pg8000_messages(conn, lambda code, body: received.append((code, bytes(body))))

            def request() -> object:
                return statement.run(n=1)

        relay.cut_answer(pid, through=b"D")  # the prelude's RowDescription and DataRow
        call = Background(request)
        call.start()
        wait_for(
            lambda: any(i.bytes_dropped for i in relay.links() if i.backend_pid == pid),
            what="the server to answer the prelude",
        )
        cluster.execute("SELECT pg_terminate_backend($1)", pid)
        outcome = call.finish(timeout=15)
        if driver == "psycopg":
            assert isinstance(outcome, Exception) and sqlstate(outcome) == "57P01", repr(outcome)
        else:
            # pg8000 reads on to a ReadyForQuery after an error, so a FATAL shows as the
            # network error of the close that follows it (directly as well).
            assert isinstance(outcome, pg8000.native.InterfaceError), repr(outcome)
            assert [code for code, _ in received] == [b"E"], received
            assert b"C57P01\x00" in received[0][1]
        with contextlib.suppress(Exception):
            conn.close()
    finally:
        other.close()
    with psycopg_connect(proxy.port) as conn:
        assert conn.execute("SELECT 3").fetchone() == (3,)


def test_background_fault_storm_leaves_the_pool_whole(
    cluster: LocalPostgres, relay: Relay, make_proxy: Callable[..., ProxyThread]
) -> None:
    """Cuts, stalls and half-closes at random under 16 clients for 3 s (15 s in the full
    run): every client operation ends (success or an error) within its deadline, and
    afterwards the pool is whole."""
    proxy = make_proxy(default_pool_size="4", query_timeout="1", query_wait_timeout="5")
    stop = time.monotonic() + scale(3, 15)
    errors: list[str] = []

    async def client(cid: int) -> int:
        done = 0
        conn = None
        while time.monotonic() < stop:
            try:
                async with asyncio.timeout(12):
                    if conn is None:
                        conn = await asyncpg_connect(proxy.port)
                    async with conn.transaction():
                        assert await conn.fetchval("SELECT $1::int", cid) == cid
                        await conn.execute("SELECT pg_sleep(0.01)")
                done += 1
            except TimeoutError:
                errors.append(f"client {cid}: hung")
                if conn is not None:
                    conn.terminate()
                conn = None
            except (
                asyncpg.PostgresError,
                asyncpg.InterfaceError,
                # asyncpg's answer to a FATAL that arrives while it is idle (a cut right after
                # a ReadyForQuery), before it sees the connection close.
                asyncpg.InternalClientError,
                OSError,
            ):
                if conn is not None:
                    conn.terminate()
                conn = None
        if conn is not None:
            await conn.close()
        return done

    def faults() -> None:
        rng = random.Random(7)
        while time.monotonic() < stop:
            pids = sorted(relay.pids())
            if pids:
                pid = rng.choice(pids)
                kind = rng.randrange(3)
                if kind == 0:
                    relay.cut([pid], reset=rng.random() < 0.5)
                elif kind == 1:
                    relay.stall([pid])
                else:
                    relay.half_close(pid, rng.choice(["proxy", "server"]))
            time.sleep(0.3)

    injector = Background(faults)
    injector.start()

    async def run() -> list[int]:
        return await asyncio.gather(*(client(cid) for cid in range(16)))

    done = asyncio.run(run())
    injector.finish(timeout=10)
    assert not errors, errors
    assert sum(done) > 50
    relay.cut()  # stalled links: their servers were closed by query_timeout, Postgres' side
    wait_until_quiet(proxy)
    assert_pool_whole(proxy, cluster, 4)
