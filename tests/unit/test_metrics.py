"""The endpoint's pure parts: HTTP request heads, responses, and state → metric families."""

from __future__ import annotations

from collections.abc import Iterable
from http import HTTPStatus

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

from pgproxy.core.prepared import StatementCounts
from pgproxy.core.stats import PoolStats
from pgproxy.metrics import (
    HEAD_LIMIT,
    OTHER_APPLICATIONS,
    TOP_APPLICATIONS,
    HttpError,
    ProxyView,
    Request,
    families,
    monitor_families,
    parse_request,
    response,
    split_head,
    top_applications,
)
from pgproxy.monitor import Activity, BackendHealth
from pgproxy.report import PoolReport

# -- request heads ---------------------------------------------------------------------------


def test_a_head_is_incomplete_until_its_blank_line():
    assert split_head(b"GET /metrics HTTP/1.1\r\nHost: x\r\n") is None
    assert split_head(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n") == (
        b"GET /metrics HTTP/1.1\r\nHost: x"
    )


def test_bare_newlines_and_leading_empty_lines_are_accepted():
    assert split_head(b"\r\n\nGET / HTTP/1.0\n\n") == b"GET / HTTP/1.0"
    assert split_head(b"\r\n\r\n") is None


def test_bytes_after_the_head_are_not_part_of_it():
    assert split_head(b"GET / HTTP/1.0\r\n\r\nbody") == b"GET / HTTP/1.0"


def test_a_head_over_the_limit_is_431_whether_complete_or_not():
    head = b"GET / HTTP/1.1\r\nX: " + b"a" * HEAD_LIMIT
    with pytest.raises(HttpError) as exc:
        split_head(head)
    assert exc.value.status is HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE
    with pytest.raises(HttpError):
        split_head(head + b"\r\n\r\n")
    just_fits = b"GET / HTTP/1.0\r\nX: "
    just_fits += b"a" * (HEAD_LIMIT - len(just_fits) - 4) + b"\r\n\r\n"
    assert len(just_fits) == HEAD_LIMIT
    assert split_head(just_fits) is not None


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b"GET /metrics HTTP/1.1\r\nHost: x", Request("GET", "/metrics")),
        (b"HEAD /healthz HTTP/1.0", Request("HEAD", "/healthz")),
        (b"GET /metrics?x=1&y=2 HTTP/1.0", Request("GET", "/metrics", "x=1&y=2")),
        (b"GET /readyz#frag HTTP/1.0", Request("GET", "/readyz")),
        (b"GET http://h:9127/metrics?q HTTP/1.1\r\nHost: h", Request("GET", "/metrics", "q")),
        (b"GET http://h HTTP/1.0", Request("GET", "/")),
        (b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0", Request("POST", "/metrics")),
        (b"GET / HTTP/1.1\r\nhOsT:x\r\nAccept:\t*/*", Request("GET", "/")),
    ],
)
def test_requests_parse_to_method_and_path(head, expected):
    assert parse_request(head) == expected


@pytest.mark.parametrize(
    "head",
    [
        b"GARBAGE",
        b"GET /metrics",
        b"GET  /metrics HTTP/1.1",
        b"GET /metrics HTTP/1.1 extra",
        b"G(T / HTTP/1.0",
        b"GET metrics HTTP/1.0",
        b"GET * HTTP/1.0",
        b"GET / HTTP/1.x",
        b"GET / http/1.0",
        b"GET / HTTP/1.1",  # no Host
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b",
        b"GET / HTTP/1.0\r\nno colon",
        b"GET / HTTP/1.0\r\nBad Name: x",
        b"GET / HTTP/1.0\r\nName : x",
        b"GET / HTTP/1.0\r\nX: a\r\n folded",
        b"GET / HTTP/1.0\r\nX: a\x00b",
        b"GET /\xff HTTP/1.0",
    ],
)
def test_malformed_requests_are_400(head):
    with pytest.raises(HttpError) as exc:
        parse_request(head)
    assert exc.value.status is HTTPStatus.BAD_REQUEST


def test_other_http_versions_are_505():
    with pytest.raises(HttpError) as exc:
        parse_request(b"GET / HTTP/2.0")
    assert exc.value.status is HTTPStatus.HTTP_VERSION_NOT_SUPPORTED


def test_a_response_has_its_length_and_closes_the_connection():
    data = response(HTTPStatus.METHOD_NOT_ALLOWED, b"no\n", headers=[("Allow", "GET, HEAD")])
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 405 Method Not Allowed"
    assert b"Content-Length: 3" in lines
    assert b"Connection: close" in lines
    assert b"Allow: GET, HEAD" in lines
    assert body == b"no\n"


# -- families ----------------------------------------------------------------------------------


def parse(metrics: Iterable[Metric]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Render the families like a scrape does and parse them back: sample → value."""

    class Fixed:
        def collect(self) -> Iterable[Metric]:
            return list(metrics)

    registry = CollectorRegistry()
    registry.register(Fixed())
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def labels(**kv: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(kv.items()))


def pool_report(database: str = "app", user: str = "app", **overrides: object) -> PoolReport:
    fields: dict[str, object] = {
        "database": database,
        "user": user,
        "pool_mode": "transaction",
        "size": 5,
        "min_size": 1,
        "clients": {"active": 1, "waiting": 2, "idle_in_transaction": 1, "idle": 7},
        "servers": {"active": 2, "idle": 1, "resetting": 0, "login": 1},
        "longest_wait": 1.5,
        "longest_hold": 4.0,
        "longest_idle_in_transaction": 0.0,
        "paused": False,
        "stats": PoolStats(),
        "statements": StatementCounts(),
    }
    fields.update(overrides)
    return PoolReport(**fields)  # type: ignore[arg-type]


def view(**overrides: object) -> ProxyView:
    fields: dict[str, object] = {
        "pools": [],
        "client_connections": 0,
        "clients_logging_in": 0,
        "max_client_conn": 100,
        "login_failures": 0,
        "draining": False,
        "monitor": None,
    }
    fields.update(overrides)
    return ProxyView(**fields)  # type: ignore[arg-type]


def test_a_proxy_without_pools_exports_the_global_families():
    samples = parse(families(view(client_connections=3, clients_logging_in=2, draining=True)))
    assert samples[("pgproxy_up", ())] == 1
    assert samples[("pgproxy_draining", ())] == 1
    assert samples[("pgproxy_client_connections", ())] == 3
    assert samples[("pgproxy_clients_logging_in", ())] == 2
    assert samples[("pgproxy_client_connections_max", ())] == 100
    assert samples[("pgproxy_login_failures_total", labels(database="", user=""))] == 0
    assert not any(name.startswith("pgproxy_pg_") for name, _ in samples)


def test_pool_state_becomes_labelled_gauges():
    pool = labels(database="app", user="app")
    samples = parse(
        families(view(pools=[pool_report(paused=True, longest_idle_in_transaction=4.25)]))
    )
    for state, count in {"active": 1, "waiting": 2, "idle_in_transaction": 1, "idle": 7}.items():
        assert samples[("pgproxy_clients", labels(database="app", user="app", state=state))] == (
            count
        )
    assert ("pgproxy_clients", labels(database="app", user="app", state="login")) not in samples
    for state, count in {"active": 2, "idle": 1, "resetting": 0, "login": 1}.items():
        assert samples[("pgproxy_servers", labels(database="app", user="app", state=state))] == (
            count
        )
    assert samples[("pgproxy_pool_size", pool)] == 5
    assert samples[("pgproxy_pool_min_size", pool)] == 1
    assert samples[("pgproxy_pool_paused", pool)] == 1
    assert samples[("pgproxy_longest_wait_seconds", pool)] == 1.5
    assert samples[("pgproxy_longest_hold_seconds", pool)] == 4.0
    assert samples[("pgproxy_idle_in_transaction_longest_seconds", pool)] == 4.25


def test_pool_counters_and_histograms_come_from_its_stats():
    stats = PoolStats(queries=10, transactions=4, received=100, sent=2000, logins=3, pins=1)
    stats.login_failures = 2
    stats.count_error("22012")
    stats.count_error("22012")
    stats.count_disconnect("client_idle_timeout")
    for seconds in (0.0001, 0.003, 0.003, 7.0, 1000.0):
        stats.query_time.observe(seconds)
    statements = StatementCounts(hits=5, prepares=6, reprepares=7, evictions=8)
    pool = labels(database="app", user="app")
    samples = parse(
        families(view(pools=[pool_report(stats=stats, statements=statements)], login_failures=5))
    )
    expected = {
        "pgproxy_queries_total": 10,
        "pgproxy_transactions_total": 4,
        "pgproxy_received_bytes_total": 100,
        "pgproxy_sent_bytes_total": 2000,
        "pgproxy_logins_total": 3,
        "pgproxy_login_failures_total": 2,
        "pgproxy_pins_total": 1,
        "pgproxy_prepared_statement_hits_total": 5,
        "pgproxy_prepared_statement_prepares_total": 6,
        "pgproxy_prepared_statement_reprepares_total": 7,
        "pgproxy_prepared_statement_evictions_total": 8,
    }
    for name, value in expected.items():
        assert samples[(name, pool)] == value, name
    sqlstate = labels(database="app", user="app", sqlstate="22012")
    assert samples[("pgproxy_errors_total", sqlstate)] == 2
    reason = labels(database="app", user="app", reason="client_idle_timeout")
    assert samples[("pgproxy_client_disconnects_total", reason)] == 1
    # 5 failures in all, 2 of them in the pool: 3 before any pool was known.
    assert samples[("pgproxy_login_failures_total", labels(database="", user=""))] == 3

    def bucket(le: str) -> float:
        return samples[("pgproxy_query_seconds_bucket", labels(database="app", user="app", le=le))]

    assert bucket("0.0005") == 1
    assert bucket("0.005") == 3
    assert bucket("10.0") == 4
    assert bucket("300.0") == 4
    assert bucket("+Inf") == 5
    assert samples[("pgproxy_query_seconds_count", pool)] == 5
    assert samples[("pgproxy_query_seconds_sum", pool)] == pytest.approx(1007.0061)
    assert samples[("pgproxy_wait_seconds_count", pool)] == 0
    assert samples[("pgproxy_transaction_seconds_count", pool)] == 0


def test_failures_without_a_pool_never_go_negative():
    stats = PoolStats(login_failures=4)
    samples = parse(families(view(pools=[pool_report(stats=stats)], login_failures=1)))
    assert samples[("pgproxy_login_failures_total", labels(database="", user=""))] == 0


def test_pools_get_series_of_their_own():
    samples = parse(families(view(pools=[pool_report("a", "u1"), pool_report("b", "u2", size=9)])))
    assert samples[("pgproxy_pool_size", labels(database="a", user="u1"))] == 5
    assert samples[("pgproxy_pool_size", labels(database="b", user="u2"))] == 9
    assert (
        samples[("pgproxy_idle_in_transaction_longest_seconds", labels(database="b", user="u2"))]
        == 0
    )


# -- monitor families ----------------------------------------------------------------------------


def test_a_healthy_monitor_exports_the_servers_backends():
    activity = Activity(
        by_state=(("active", 2), ("idle", 5), ("unknown", 1)),
        by_application=(("web", 6), ("", 2)),
        oldest_transaction=3.5,
        max_connections=100,
    )
    health = BackendHealth(up=True, reason="", last_success_at=1700000000.5, activity=activity)
    samples = parse(monitor_families(health))
    assert samples[("pgproxy_pg_monitor_up", ())] == 1
    assert samples[("pgproxy_pg_monitor_last_success_timestamp_seconds", ())] == 1700000000.5
    assert samples[("pgproxy_pg_connections", labels(state="active"))] == 2
    assert samples[("pgproxy_pg_connections", labels(state="unknown"))] == 1
    by_app = "pgproxy_pg_connections_by_application"
    assert samples[(by_app, labels(application_name="web"))] == 6
    assert samples[(by_app, labels(application_name=""))] == 2
    assert samples[("pgproxy_pg_oldest_transaction_seconds", ())] == 3.5
    assert samples[("pgproxy_pg_max_connections", ())] == 100


def test_a_failing_monitor_exports_only_that_it_is_down():
    samples = parse(monitor_families(BackendHealth(up=False, reason="x", last_success_at=None)))
    assert samples == {("pgproxy_pg_monitor_up", ()): 0}
    samples = parse(monitor_families(BackendHealth(up=False, reason="x", last_success_at=5.0)))
    assert samples == {
        ("pgproxy_pg_monitor_up", ()): 0,
        ("pgproxy_pg_monitor_last_success_timestamp_seconds", ()): 5.0,
    }


def test_the_monitor_families_are_part_of_a_scrape_when_there_is_a_snapshot():
    health = BackendHealth(up=False, reason="x", last_success_at=None)
    assert ("pgproxy_pg_monitor_up", ()) in parse(families(view(monitor=health)))


def test_application_names_are_bounded_with_the_rest_as_other():
    counts = [(f"app{i:03}", 1000 - i) for i in range(TOP_APPLICATIONS + 20)]
    top = top_applications(counts)
    assert len(top) == TOP_APPLICATIONS + 1
    assert top[0] == ("app000", 1000)
    assert top[-1] == (
        OTHER_APPLICATIONS,
        sum(1000 - i for i in range(TOP_APPLICATIONS, TOP_APPLICATIONS + 20)),
    )
    assert sum(count for _name, count in top) == sum(count for _name, count in counts)


def test_an_application_called_other_is_merged_with_the_rest():
    counts = [("other", 100), *((f"a{i:03}", 10) for i in range(TOP_APPLICATIONS)), ("z", 1)]
    top = dict(top_applications(counts))
    # "other" and 49 of the a's are the top 50; the last a (10) and z (1) join "other".
    assert top[OTHER_APPLICATIONS] == 111
    assert len(top) == TOP_APPLICATIONS


def test_few_application_names_are_kept_as_they_are():
    assert top_applications([("b", 1), ("a", 1), ("c", 3)]) == [("c", 3), ("a", 1), ("b", 1)]
