"""Watchdog decisions: which idle servers to close, with a fixed clock."""

from pgproxy.core.server import DisconnectReason
from pgproxy.core.watchdog import idle_servers_to_close

IDLE = DisconnectReason.IDLE_TIMEOUT
LIFETIME = DisconnectReason.LIFETIME


def close(
    idle: list[tuple[str, float, float]],
    *,
    now: float = 1000.0,
    keep: int = 0,
    idle_timeout: float = 600.0,
    lifetime: float = 3600.0,
) -> list[tuple[str, DisconnectReason]]:
    return idle_servers_to_close(
        idle, now=now, keep=keep, idle_timeout=idle_timeout, lifetime=lifetime
    )


def test_nothing_to_close_in_an_empty_pool() -> None:
    assert close([]) == []


def test_idle_timeout_closes_servers_idle_that_long() -> None:
    idle = [("s1", 100.0, 0.0), ("s2", 400.0, 0.0), ("s3", 900.0, 0.0)]
    assert close(idle) == [("s1", IDLE), ("s2", IDLE)]


def test_idle_timeout_is_inclusive() -> None:
    assert close([("s1", 400.0, 0.0)]) == [("s1", IDLE)]
    assert close([("s1", 400.5, 0.0)]) == []


def test_idle_timeout_respects_keep_closing_least_recently_used_first() -> None:
    idle = [("s1", 100.0, 0.0), ("s2", 200.0, 0.0), ("s3", 300.0, 0.0)]
    assert close(idle, keep=2) == [("s1", IDLE)]
    assert close(idle, keep=3) == []
    assert close(idle, keep=5) == []


def test_idle_timeout_of_zero_never_closes() -> None:
    assert close([("s1", 0.0, 900.0)], idle_timeout=0.0) == []


def test_lifetime_closes_regardless_of_keep() -> None:
    idle = [("s1", 999.0, 0.0), ("s2", 999.0, 100.0)]
    assert close(idle, keep=5, lifetime=950.0) == [("s1", LIFETIME)]


def test_lifetime_is_inclusive_and_zero_disables_it() -> None:
    assert close([("s1", 999.0, 0.0)], lifetime=1000.0) == [("s1", LIFETIME)]
    assert close([("s1", 999.0, 0.0)], lifetime=0.0) == []


def test_lifetime_wins_over_idle_timeout_for_the_reason() -> None:
    assert close([("s1", 0.0, 0.0)], lifetime=950.0) == [("s1", LIFETIME)]


def test_lifetime_closures_use_up_the_surplus_before_idle_ones() -> None:
    idle = [("old", 999.0, 0.0), ("s1", 100.0, 900.0), ("s2", 100.0, 900.0)]
    # keep=2 of 3: the over-age server is replaced, so no idle closure is left to make.
    assert close(idle, keep=2, lifetime=950.0) == [("old", LIFETIME)]


def test_idle_timeout_never_drops_the_pool_below_keep_whatever_the_lru_order() -> None:
    # BUG: the surplus is spent in LRU order, so an idle closure is decided before a later
    # lifetime closure is counted: both go and the pool ends at 0 with keep=1. With the
    # over-age server first, the same set of servers keeps one (see the test above).
    idle = [("s1", 100.0, 900.0), ("old", 999.0, 0.0)]
    assert close(idle, keep=1, lifetime=950.0) == [("old", LIFETIME)]


def test_all_servers_past_lifetime_are_closed_even_below_keep() -> None:
    idle = [("s1", 999.0, 0.0), ("s2", 999.0, 1.0)]
    assert close(idle, keep=2, lifetime=950.0) == [("s1", LIFETIME), ("s2", LIFETIME)]


def test_accepts_any_iterable_in_lru_order() -> None:
    idle = (entry for entry in [("s1", 100.0, 900.0), ("s2", 200.0, 900.0)])
    chosen = idle_servers_to_close(idle, now=1000.0, keep=1, idle_timeout=600.0, lifetime=0.0)
    assert chosen == [("s1", IDLE)]
