"""The relay itself: it forwards, names each link's backend, and breaks links on request."""

from __future__ import annotations

import time

import psycopg
import pytest

from pgproxy.localpg import LocalPostgres

from .helpers import psycopg_connect
from .relay import Relay


def test_relay_forwards_and_knows_the_backend_pid_of_each_link(
    cluster: LocalPostgres, relay: Relay
) -> None:
    with psycopg_connect(relay.port) as a, psycopg_connect(relay.port) as b:
        pids = {a.info.backend_pid, b.info.backend_pid}
        assert relay.pids() == pids
        assert a.execute("SELECT 1").fetchone() == (1,)


def test_relay_cut_resets_both_sides_and_refuse_accept_toggle_the_listener(
    cluster: LocalPostgres, relay: Relay
) -> None:
    with psycopg_connect(relay.port) as conn:
        pid = conn.info.backend_pid
        assert relay.cut([pid]) == 1
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
    assert cluster.wait_for_backends(0, user="app")  # Postgres saw its side go too
    relay.refuse()
    with pytest.raises(psycopg.OperationalError, match="refused"):
        psycopg_connect(relay.port, connect_timeout=2).close()
    relay.accept()
    with psycopg_connect(relay.port) as conn:
        assert conn.execute("SELECT 2").fetchone() == (2,)


def test_relay_stall_holds_a_result_until_resumed_and_delay_adds_latency(
    cluster: LocalPostgres, relay: Relay
) -> None:
    with psycopg_connect(relay.port) as conn:
        relay.stall([conn.info.backend_pid], "down")
        conn.pgconn.send_query(b"SELECT 42")
        time.sleep(0.3)  # the stall under test: nothing may arrive meanwhile
        conn.pgconn.consume_input()
        assert conn.pgconn.is_busy()
        relay.resume()
        while conn.pgconn.is_busy():
            conn.pgconn.consume_input()
        result = conn.pgconn.get_result()
        assert result is not None and result.get_value(0, 0) == b"42"
        while conn.pgconn.get_result() is not None:
            pass
        relay.delay(0.1)
        started = time.monotonic()
        conn.execute("SELECT 1")
        assert time.monotonic() - started >= 0.2  # 0.1 s each way
