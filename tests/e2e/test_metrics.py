"""/metrics, /healthz and /readyz of a real proxy in front of the session cluster.

Scrapes go over HTTP like Prometheus' and are parsed with prometheus_client's own parser.
Counters are checked for presence and sanity; exact values only where the proxy's state
decides them (clients and servers by state, pool sizes). Everything that changes
asynchronously is polled with a deadline.
"""

from __future__ import annotations

import http.client
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

import psycopg
import pytest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.parser import text_string_to_metric_families

from pgproxy import __version__, metrics
from pgproxy.config import load_settings
from pgproxy.localpg import LocalPostgres, free_port
from pgproxy.monitor import APPLICATION_NAME, STOP_JOIN, ServerMonitor

from .conftest import ProxyThread
from .helpers import Background, connect, wait_for

APP = {"database": "app", "user": "app"}

POOL_GAUGES = (
    "pgproxy_pool_size",
    "pgproxy_pool_min_size",
    "pgproxy_pool_paused",
    "pgproxy_longest_wait_seconds",
    "pgproxy_longest_hold_seconds",
    "pgproxy_idle_in_transaction_longest_seconds",
)
POOL_COUNTERS = (
    "pgproxy_queries",
    "pgproxy_transactions",
    "pgproxy_received_bytes",
    "pgproxy_sent_bytes",
    "pgproxy_logins",
    "pgproxy_login_failures",
    "pgproxy_pins",
    "pgproxy_prepared_statement_hits",
    "pgproxy_prepared_statement_prepares",
    "pgproxy_prepared_statement_reprepares",
    "pgproxy_prepared_statement_evictions",
)
HISTOGRAMS = ("pgproxy_wait_seconds", "pgproxy_query_seconds", "pgproxy_transaction_seconds")


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


@dataclass
class Scrape:
    types: dict[str, str]  # family name → type
    samples: list[tuple[str, dict[str, str], float]]

    def value(self, name: str, **labels: str) -> float | None:
        """The one sample named `name` whose labels include `labels` (None: none)."""
        found = [v for n, ls, v in self.samples if n == name and labels.items() <= ls.items()]
        assert len(found) <= 1, f"{name}{labels} matches {len(found)} samples"
        return found[0] if found else None

    def labelsets(self, name: str) -> list[dict[str, str]]:
        return [ls for n, ls, _v in self.samples if n == name]


def get(port: int, path: str, method: str = "GET") -> Reply:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()


def raw(port: int, data: bytes) -> bytes:
    """Send bytes as they are; everything the endpoint answers until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def scrape(proxy: ProxyThread) -> Scrape:
    reply = get(proxy.proxy.metrics_port, "/metrics")
    assert reply.status == 200, reply
    assert reply.headers["content-type"] == CONTENT_TYPE_PLAIN_0_0_4  # the format written
    out = Scrape({}, [])
    for family in text_string_to_metric_families(reply.body.decode()):
        assert family.name not in out.types, f"{family.name} exported twice"
        out.types[family.name] = family.type
        out.samples.extend((s.name, s.labels, s.value) for s in family.samples)
    return out


def scrape_until(proxy: ProxyThread, ok: Callable[[Scrape], bool], what: str) -> Scrape:
    def attempt() -> Scrape | None:
        result = scrape(proxy)
        return result if ok(result) else None

    found = wait_for(attempt, what=what)
    assert found is not None
    return found


@pytest.fixture
def metered(make_proxy: Callable[..., ProxyThread]) -> ProxyThread:
    return make_proxy(metrics_listen="127.0.0.1:0")


def test_a_scrape_exports_every_family_with_sane_values(metered: ProxyThread) -> None:
    with connect(metered.port) as conn:
        conn.execute("SELECT 1").fetchall()
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("SELECT 1/0")
        # The server went back to the pool at ReadyForQuery; the scrape sees it idle.
        s = scrape_until(
            metered,
            lambda s: s.value("pgproxy_servers", **APP, state="idle") == 1,
            "the server to be idle",
        )
        assert s.value("pgproxy_up") == 1
        assert s.value("pgproxy_info", version=__version__) == 1
        assert s.value("pgproxy_draining") == 0
        assert s.value("pgproxy_client_connections") == 1
        assert s.value("pgproxy_client_connections_max") == 10000
        assert s.value("pgproxy_clients_logging_in") == 0
        expected = {"active": 0, "waiting": 0, "idle_in_transaction": 0, "idle": 1}
        for state, count in expected.items():
            assert s.value("pgproxy_clients", **APP, state=state) == count, state
        for state in ("active", "resetting", "login"):
            assert s.value("pgproxy_servers", **APP, state=state) == 0, state
        assert s.value("pgproxy_pool_size", **APP) == 2
        assert s.value("pgproxy_pool_min_size", **APP) == 0
        assert s.value("pgproxy_pool_paused", **APP) == 0
        assert s.value("pgproxy_longest_wait_seconds", **APP) == 0
        assert s.value("pgproxy_idle_in_transaction_longest_seconds", **APP) == 0
        for name in POOL_GAUGES:
            assert s.types[name] == "gauge", name
        for name in POOL_COUNTERS:
            assert s.types[name] == "counter", name
            value = s.value(f"{name}_total", **APP)
            assert value is not None and value >= 0, name
        assert (s.value("pgproxy_logins_total", **APP) or 0) <= 1
        for name in HISTOGRAMS:
            assert s.types[name] == "histogram", name
            buckets = [
                (ls["le"], v)
                for n, ls, v in s.samples
                if n == f"{name}_bucket" and ls["database"] == "app"
            ]
            assert buckets[-1][0] == "+Inf"
            counts = [v for _le, v in buckets]
            assert counts == sorted(counts), f"{name} buckets are not cumulative"
            assert s.value(f"{name}_count", **APP) == counts[-1]
            total = s.value(f"{name}_sum", **APP)
            assert total is not None and total >= 0
        assert s.types["pgproxy_errors"] == "counter"
        assert s.types["pgproxy_client_disconnects"] == "counter"
        for labels in s.labelsets("pgproxy_errors_total"):
            assert len(labels["sqlstate"]) == 5, labels
        # Failures before a pool is known have their own series, so sum() counts them all.
        assert s.value("pgproxy_login_failures_total", database="", user="") is not None
        # No monitor unless monitor_interval is set.
        assert not any(name.startswith("pgproxy_pg_") for name in s.types)
        # Never a client address in a label.
        for _name, labels, _value in s.samples:
            assert not any("127.0.0.1" in value for value in labels.values()), labels


def test_an_open_transaction_shows_an_idle_in_transaction_client_and_an_active_server(
    metered: ProxyThread,
) -> None:
    with connect(metered.port) as conn:
        conn.execute("BEGIN")
        conn.execute("SELECT 1").fetchall()
        s = scrape_until(
            metered,
            lambda s: (s.value("pgproxy_idle_in_transaction_longest_seconds", **APP) or 0) > 0,
            "the idle transaction's age to show",
        )
        assert s.value("pgproxy_clients", **APP, state="idle_in_transaction") == 1
        assert s.value("pgproxy_clients", **APP, state="idle") == 0
        assert s.value("pgproxy_servers", **APP, state="active") == 1
        assert s.value("pgproxy_servers", **APP, state="idle") == 0
        conn.execute("COMMIT")
        s = scrape(metered)
        assert s.value("pgproxy_clients", **APP, state="idle_in_transaction") == 0
        assert s.value("pgproxy_idle_in_transaction_longest_seconds", **APP) == 0


def test_a_client_waiting_for_a_full_pool_is_counted_until_it_gets_a_server(
    make_proxy: Callable[..., ProxyThread],
) -> None:
    proxy = make_proxy(metrics_listen="127.0.0.1:0", default_pool_size="1")
    with connect(proxy.port) as holder, connect(proxy.port) as waiter:
        holder.execute("BEGIN")
        holder.execute("SELECT 1").fetchall()
        query = Background(lambda: waiter.execute("SELECT 2").fetchone())
        query.start()
        s = scrape_until(
            proxy,
            lambda s: (s.value("pgproxy_longest_wait_seconds", **APP) or 0) > 0,
            "the second client to wait",
        )
        assert (s.value("pgproxy_clients", **APP, state="waiting") or 0) >= 1
        assert s.value("pgproxy_pool_size", **APP) == 1
        holder.execute("COMMIT")
        assert query.finish() == (2,)
        s = scrape(proxy)
        assert s.value("pgproxy_clients", **APP, state="waiting") == 0
        assert s.value("pgproxy_longest_wait_seconds", **APP) == 0


def test_the_monitor_families_show_the_servers_backends(
    make_proxy: Callable[..., ProxyThread], pg: LocalPostgres, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pgproxy.monitor")
    proxy = make_proxy(metrics_listen="127.0.0.1:0", monitor_interval="0.2")
    ((max_connections,),) = pg.execute("SHOW max_connections")
    s = scrape_until(
        proxy, lambda s: s.value("pgproxy_pg_monitor_up") == 1, "the monitor's first read"
    )
    assert s.value("pgproxy_pg_max_connections") == int(max_connections)
    assert (s.value("pgproxy_pg_monitor_last_success_timestamp_seconds") or 0) > 1e9
    for state in ("active", "idle", "idle_in_transaction", "unknown"):
        assert s.value("pgproxy_pg_connections", state=state) is not None, state
    # The monitor's own query is running.
    assert (s.value("pgproxy_pg_connections", state="active") or 0) >= 1
    assert (
        s.value("pgproxy_pg_connections_by_application", application_name=APPLICATION_NAME) or 0
    ) >= 1
    with connect(proxy.port) as conn:
        conn.execute("BEGIN")
        conn.execute("SELECT 1").fetchall()
        # The monitor logs in as app (the first plaintext user): it sees app's backends.
        s = scrape_until(
            proxy,
            lambda s: (
                (s.value("pgproxy_pg_oldest_transaction_seconds") or 0) > 0
                and (s.value("pgproxy_pg_connections", state="idle_in_transaction") or 0) >= 1
            ),
            "the open transaction on the server",
        )
        conn.execute("COMMIT")
    # One line when reads start to work, not one per read; app is no pg_read_all_stats member.
    lines = [r.getMessage() for r in caplog.records if r.name == "pgproxy.monitor"]
    assert len(lines) == 1, lines
    assert "reading pg_stat_activity" in lines[0]
    assert "lacks pg_read_all_stats" in lines[0]


def test_the_monitor_reports_down_while_the_server_is_unreachable(
    make_proxy: Callable[..., ProxyThread], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pgproxy.monitor")
    proxy = make_proxy(
        metrics_listen="127.0.0.1:0", monitor_interval="0.05", server=f"127.0.0.1:{free_port()}"
    )
    s = scrape_until(
        proxy, lambda s: s.value("pgproxy_pg_monitor_up") is not None, "the monitor's first try"
    )
    assert s.value("pgproxy_pg_monitor_up") == 0
    assert s.value("pgproxy_pg_monitor_last_success_timestamp_seconds") is None
    assert s.value("pgproxy_pg_max_connections") is None
    # Each attempt publishes a new snapshot; after several, still one warning.
    monitor = proxy.proxy.monitor
    assert monitor is not None
    seen: list[object] = []  # kept alive, so that identity means a new snapshot

    def attempts() -> bool:
        snapshot = monitor.snapshot()
        if not any(snapshot is old for old in seen):
            seen.append(snapshot)
        return len(seen) >= 3

    wait_for(attempts, interval=0.005, what="three attempts")
    lines = [r.getMessage() for r in caplog.records if r.name == "pgproxy.monitor"]
    assert len(lines) == 1, lines
    assert "cannot read pg_stat_activity" in lines[0]


def test_the_endpoint_serves_on_the_plain_asyncio_loop_too(
    make_proxy: Callable[..., ProxyThread],
) -> None:
    proxy = make_proxy(metrics_listen="127.0.0.1:0", use_uvloop=False)
    with connect(proxy.port) as conn:
        conn.execute("SELECT 1")
        assert scrape(proxy).value("pgproxy_clients", **APP, state="idle") == 1
    assert get(proxy.proxy.metrics_port, "/healthz").status == 200
    assert get(proxy.proxy.metrics_port, "/readyz").status == 200


def test_healthz_answers_ok(metered: ProxyThread) -> None:
    reply = get(metered.proxy.metrics_port, "/healthz")
    assert (reply.status, reply.body) == (200, b"ok\n")
    reply = get(metered.proxy.metrics_port, "/healthz", method="HEAD")
    assert reply.status == 200
    assert reply.body == b""
    assert reply.headers["content-length"] == "3"


def test_readyz_is_ready_with_a_reachable_server_and_not_while_draining(
    metered: ProxyThread,
) -> None:
    port = metered.proxy.metrics_port
    assert get(port, "/readyz").status == 200  # no pool yet: a TCP probe of the server
    with connect(metered.port) as conn:
        conn.execute("SELECT 1")
        assert get(port, "/readyz").status == 200  # a logged-in server connection
    metered.call(lambda: setattr(metered.proxy, "stopping", True))
    try:
        reply = get(port, "/readyz")
        assert reply.status == 503
        assert reply.body.startswith(b"draining")
    finally:
        metered.call(lambda: setattr(metered.proxy, "stopping", False))
    assert get(port, "/readyz").status == 200


def test_readyz_is_not_ready_when_the_server_is_down(
    make_proxy: Callable[..., ProxyThread],
) -> None:
    closed = free_port()
    proxy = make_proxy(metrics_listen="127.0.0.1:0", server=f"127.0.0.1:{closed}")
    reply = get(proxy.proxy.metrics_port, "/readyz")
    assert reply.status == 503
    assert f"127.0.0.1:{closed}".encode() in reply.body
    assert reply.body.count(b"\n") == 1
    # Cached: the next answer does not probe again, and says the same.
    assert get(proxy.proxy.metrics_port, "/readyz").body == reply.body
    assert get(proxy.proxy.metrics_port, "/healthz").status == 200


def test_unknown_paths_methods_and_malformed_requests_get_http_errors(
    metered: ProxyThread,
) -> None:
    port = metered.proxy.metrics_port
    assert get(port, "/nope").status == 404
    assert get(port, "/metrics/").status == 404
    reply = get(port, "/metrics", method="POST")
    assert reply.status == 405
    assert reply.headers["allow"] == "GET, HEAD"
    assert get(port, "/metrics?name=x").status == 200
    assert raw(port, b"GARBAGE\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    assert raw(port, b"GET /healthz HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 400 ")  # no Host
    assert raw(port, b"GET /healthz HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.1 200 ")
    assert raw(port, b"GET /healthz HTTP/2.0\r\n\r\n").startswith(b"HTTP/1.1 505 ")
    huge = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * metrics.HEAD_LIMIT + b"\r\n\r\n"
    assert raw(port, huge).startswith(b"HTTP/1.1 431 ")
    # The endpoint still serves after all that.
    assert get(port, "/healthz").status == 200


def test_a_silent_connection_is_closed_after_the_idle_timeout(
    metered: ProxyThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The proxy runs in this process: its connections read these module globals.
    monkeypatch.setattr(metrics, "IDLE_TIMEOUT", 0.3)
    monkeypatch.setattr(metrics, "TICK", 0.05)
    with socket.create_connection(("127.0.0.1", metered.proxy.metrics_port), timeout=5) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\n")  # and never the rest
        assert sock.recv(1024) == b""  # closed without an answer, well before the 5 s timeout


@pytest.mark.parametrize("use_uvloop", [True, False], ids=["uvloop", "asyncio"])
def test_a_silent_connection_does_not_hold_up_shutdown(
    make_proxy: Callable[..., ProxyThread], use_uvloop: bool
) -> None:
    proxy = make_proxy(metrics_listen="127.0.0.1:0", use_uvloop=use_uvloop)
    with socket.create_connection(("127.0.0.1", proxy.proxy.metrics_port), timeout=10) as sock:
        sock.sendall(b"GET /metr")
        # Accepted in order: once this one is answered, the silent one is open on the proxy.
        assert get(proxy.proxy.metrics_port, "/healthz").status == 200
        started = time.monotonic()
        proxy.stop()
        # Well under the 10 s a connection gets to send its request.
        assert time.monotonic() - started < metrics.IDLE_TIMEOUT / 2
        assert sock.recv(1024) == b""


def test_a_scrape_completes_while_200_clients_are_connected(
    make_proxy: Callable[..., ProxyThread],
) -> None:
    proxy = make_proxy(metrics_listen="127.0.0.1:0", auth_type="trust")
    conns: list[psycopg.Connection] = []
    try:
        conns.extend(connect(proxy.port) for _ in range(200))
        s = scrape(proxy)
        assert s.value("pgproxy_client_connections") == 200
        assert s.value("pgproxy_clients", **APP, state="idle") == 200
        assert s.value("pgproxy_logins_total", **APP) == 200
    finally:
        for conn in conns:
            conn.close()


def test_stopping_the_monitor_does_not_wait_for_a_hung_server() -> None:
    # A "server" that accepts the connection and then never says a word.
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        config = load_settings(
            {"server": f"127.0.0.1:{port}", "users": ["app:pw"], "monitor_interval": "0.2"},
            environ={},
        )
        monitor = ServerMonitor(config, None)  # the fake server speaks no TLS
        monitor.start()
        listener.settimeout(10)
        accepted, _peer = listener.accept()
        with accepted:
            # The monitor now waits for an answer to its startup packet.
            assert accepted.recv(1024)
            started = time.monotonic()
            monitor.stop()
            assert time.monotonic() - started < STOP_JOIN + 0.5
        # Its socket is closed: the thread notices and ends.
        thread = monitor._thread
        assert thread is not None
        thread.join(10)
        assert not thread.is_alive()
        health = monitor.snapshot()
        assert health is not None and not health.up
