"""The pure parts of `workers > 1`: shares, numbering, and merging what the workers report."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pgproxy.admin import merge_tables
from pgproxy.config import load_settings
from pgproxy.core.cancel import CancelKeys
from pgproxy.errors import ConfigError
from pgproxy.workers import WorkerSpec, merge_metrics, render, share


def test_the_shares_add_up_to_the_total_and_differ_by_at_most_one() -> None:
    for count in (1, 2, 3, 8):
        for total in (count, count + 1, 7 * count + 3, 10000):
            parts = [share(total, count, i) for i in range(count)]
            assert sum(parts) == total
            assert max(parts) - min(parts) <= 1
            assert min(parts) >= 1


def test_the_spec_travels_in_the_environment_and_knows_who_numbered_what() -> None:
    spec = WorkerSpec(1, 3, 6432, 4242, Path("/tmp/pgproxy-x/y"))
    assert WorkerSpec.decode(spec.encode()) == spec
    assert [spec.owner(n) for n in (1, 2, 3, 4, 5, 6)] == [0, 1, 2, 0, 1, 2]
    assert spec.socket_path(2) == Path("/tmp/pgproxy-x/y/worker-2.sock")


def test_cancel_pids_of_a_worker_are_its_own_residue_and_wrap_within_it() -> None:
    keys: CancelKeys[str] = CancelKeys(lambda: 7, first=2, step=3)
    pids = [keys.allocate(f"c{i}")[0] for i in range(4)]
    assert pids == [2, 5, 8, 11]
    assert all((pid - 1) % 3 == 1 for pid in pids)
    assert keys.lookup(5, 7) == "c1"
    top = 2 + (0x7FFFFFFF - 2) // 3 * 3  # the worker's highest pid
    keys._next_pid = top
    keys.release(2)
    wrapped = [keys.allocate("late")[0] for _ in range(2)]
    assert wrapped == [top, 2]  # then back to its first, which was released


def test_workers_need_a_share_of_every_pool_and_say_which_setting_is_too_small() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({"workers": "3", "default_pool_size": "2"}, environ={})
    assert caught.value.setting == "workers"
    assert "default_pool_size of at least 3" in caught.value.problem
    with pytest.raises(ConfigError) as caught:
        load_settings({"workers": "2", "databases": ["app=dbname=app pool_size=1"]}, environ={})
    assert "databases app pool_size" in caught.value.problem
    with pytest.raises(ConfigError):
        load_settings({"workers": "0"}, environ={})
    assert load_settings({"workers": "auto"}, environ={}).workers >= 1


WORKER_0 = """\
# HELP pgproxy_up 1 while pgproxy serves.
# TYPE pgproxy_up gauge
pgproxy_up 1.0
# HELP pgproxy_clients Clients by state.
# TYPE pgproxy_clients gauge
pgproxy_clients{database="app",state="idle",user="app"} 3.0
pgproxy_clients{database="app",state="waiting",user="app"} 1.0
# HELP pgproxy_queries_total Queries.
# TYPE pgproxy_queries_total counter
pgproxy_queries_total{database="app",user="app"} 100.0
# HELP pgproxy_longest_wait_seconds Longest wait.
# TYPE pgproxy_longest_wait_seconds gauge
pgproxy_longest_wait_seconds{database="app",user="app"} 0.5
# HELP pgproxy_wait_seconds Wait.
# TYPE pgproxy_wait_seconds histogram
pgproxy_wait_seconds_bucket{database="app",le="0.1",user="app"} 4.0
pgproxy_wait_seconds_bucket{database="app",le="+Inf",user="app"} 5.0
pgproxy_wait_seconds_count{database="app",user="app"} 5.0
pgproxy_wait_seconds_sum{database="app",user="app"} 0.7
# HELP pgproxy_pg_max_connections max_connections.
# TYPE pgproxy_pg_max_connections gauge
pgproxy_pg_max_connections 30.0
"""
WORKER_1 = """\
# HELP pgproxy_up 1 while pgproxy serves.
# TYPE pgproxy_up gauge
pgproxy_up 1.0
# HELP pgproxy_clients Clients by state.
# TYPE pgproxy_clients gauge
pgproxy_clients{database="app",state="idle",user="app"} 2.0
pgproxy_clients{database="other",state="idle",user="app"} 1.0
# HELP pgproxy_queries_total Queries.
# TYPE pgproxy_queries_total counter
pgproxy_queries_total{database="app",user="app"} 50.0
# HELP pgproxy_longest_wait_seconds Longest wait.
# TYPE pgproxy_longest_wait_seconds gauge
pgproxy_longest_wait_seconds{database="app",user="app"} 2.5
# HELP pgproxy_wait_seconds Wait.
# TYPE pgproxy_wait_seconds histogram
pgproxy_wait_seconds_bucket{database="app",le="0.1",user="app"} 1.0
pgproxy_wait_seconds_bucket{database="app",le="+Inf",user="app"} 2.0
pgproxy_wait_seconds_count{database="app",user="app"} 2.0
pgproxy_wait_seconds_sum{database="app",user="app"} 3.0
"""


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_merged_metrics_sum_counts_and_take_the_longest_wait() -> None:
    merged = _samples(render(merge_metrics([WORKER_0, WORKER_1])).decode())
    app = (("database", "app"), ("user", "app"))
    assert merged[("pgproxy_up", ())] == 1
    assert (
        merged[("pgproxy_clients", (("database", "app"), ("state", "idle"), ("user", "app")))] == 5
    )
    assert (
        merged[("pgproxy_clients", (("database", "other"), ("state", "idle"), ("user", "app")))]
        == 1
    )
    assert merged[("pgproxy_queries_total", app)] == 150
    assert merged[("pgproxy_longest_wait_seconds", app)] == 2.5
    assert (
        merged[
            ("pgproxy_wait_seconds_bucket", (("database", "app"), ("le", "0.1"), ("user", "app")))
        ]
        == 5
    )
    assert merged[("pgproxy_wait_seconds_count", app)] == 7
    assert merged[("pgproxy_wait_seconds_sum", app)] == pytest.approx(3.7)
    assert merged[("pgproxy_pg_max_connections", ())] == 30  # only worker 0 monitors


def test_pool_rows_of_two_workers_add_up_and_keep_the_longest_wait() -> None:
    a = ("app", "app", 1, 2, 1, 1, 0, 0, 0, 0, 300, "transaction", 0, 5, 10, 0)
    b = ("app", "app", 2, 0, 2, 0, 1, 0, 0, 3, 5, "transaction", 1, 4, 10, 1)
    other = ("x", "app", 0, 0, 0, 1, 0, 0, 0, 0, 0, "transaction", 0, 1, 10, 0)
    rows = merge_tables("POOLS", [[a, other], [b]])
    assert rows == [
        ("app", "app", 3, 2, 3, 1, 1, 0, 0, 3, 5, "transaction", 1, 9, 20, 1),
        other,
    ]


def test_stats_means_are_recomputed_from_every_workers_totals() -> None:
    # totals: 10 transactions of 100 µs on one worker, 30 of 300 µs on the other.
    a = ("app", 10, 10, 1, 1, 1000, 1000, 0, 1, 1, 1, 1, 100, 100, 0, 0, 1, 0, 0, 0, 0, 0)
    b = ("app", 30, 30, 2, 2, 9000, 9000, 50, 2, 2, 2, 2, 300, 300, 25, 1, 2, 0, 1, 0, 0, 0)
    (row,) = merge_tables("STATS", [[a], [b]])
    assert row[1:5] == (40, 40, 3, 3)
    assert row[5:8] == (10000, 10000, 50)
    assert row[12:15] == (250, 250, 25)  # 10000 µs over 40, and 50 µs over 2 waits
    assert row[15:19] == (1, 3, 0, 1)


def test_lists_count_configuration_once_and_connections_everywhere() -> None:
    a = [("databases", 2), ("pools", 1), ("used_clients", 4)]
    b = [("databases", 2), ("pools", 1), ("used_clients", 6)]
    assert merge_tables("LISTS", [a, b]) == [("databases", 2), ("pools", 1), ("used_clients", 10)]


def test_clients_are_listed_from_every_worker_and_leaks_longest_first() -> None:
    assert merge_tables("CLIENTS", [[("C", 1)], [("C", 2)]]) == [("C", 1), ("C", 2)]
    short = (1, "app", "app", "", "h", 1, "active", 1.0, 1.0, "", 3)
    long = (2, "app", "app", "", "h", 1, "active", 9.0, 1.0, "", 4)
    assert merge_tables("LEAKS", [[short], [long]]) == [long, short]
