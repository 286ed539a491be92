"""Pool: LIFO idle servers, FIFO waiters, how many servers to open; times are arguments."""

from pgproxy.core.pool import Pool, PoolKey

KEY = PoolKey(database="app", user="app")


def new_pool(size: int = 3, min_size: int = 0) -> Pool[str, str]:
    return Pool(key=KEY, size=size, min_size=min_size)


def test_pool_key_reads_database_slash_user() -> None:
    assert str(KEY) == "app/app"


# --- checkout / checkin -------------------------------------------------------------------


def test_checkout_from_an_empty_pool_queues_the_client() -> None:
    pool = new_pool()
    assert pool.checkout("c1", now=5.0) is None
    assert pool.waiters == {"c1": 5.0}


def test_checkout_reuses_the_most_recently_used_idle_server() -> None:
    pool = new_pool()
    pool.checkin("s1", now=1.0)
    pool.checkin("s2", now=2.0)
    assert pool.checkout("c1", now=3.0) == "s2"
    assert pool.checkout("c2", now=3.0) == "s1"
    assert pool.active == {"s1", "s2"}
    assert pool.idle == {}


def test_checkout_queues_behind_existing_waiters_even_with_an_idle_server() -> None:
    pool = new_pool()
    pool.waiters["c1"] = 1.0
    pool.idle["s1"] = 1.0
    assert pool.checkout("c2", now=2.0) is None
    assert list(pool.waiters) == ["c1", "c2"]
    assert pool.idle == {"s1": 1.0}


def test_checkout_again_keeps_the_original_wait_start() -> None:
    pool = new_pool()
    pool.checkout("c1", now=1.0)
    pool.checkout("c1", now=9.0)
    assert pool.waiters == {"c1": 1.0}


def test_checkin_hands_server_to_oldest_waiter() -> None:
    pool = new_pool()
    for n, client in enumerate(["c1", "c2", "c3"]):
        pool.checkout(client, now=float(n))
    assert pool.checkin("s1", now=10.0) == "c1"
    assert pool.checkin("s2", now=10.0) == "c2"
    assert list(pool.waiters) == ["c3"]
    assert pool.active == {"s1", "s2"}
    assert pool.idle == {}


def test_put_back_undoes_a_checkout_and_keeps_when_the_server_became_idle() -> None:
    pool = new_pool()
    pool.checkin("s1", now=1.0)
    pool.checkin("s2", now=2.0)
    assert pool.checkout("c1", now=9.0) == "s2"
    pool.put_back("s2")
    assert pool.active == set()
    assert list(pool.idle.items()) == [("s1", 1.0), ("s2", 2.0)]  # still the most recent
    assert pool.checkout("c1", now=9.0) == "s2"
    assert pool.taken_idle_since == 2.0


def test_checkin_of_a_server_that_was_being_reset_goes_to_the_oldest_waiter() -> None:
    pool = new_pool()
    pool.active.add("s1")
    pool.start_reset("s1")
    pool.checkout("c1", now=1.0)
    pool.checkout("c2", now=2.0)
    assert pool.checkin("s1", now=3.0) == "c1"
    assert pool.resetting == set()
    assert pool.active == {"s1"}
    assert list(pool.waiters) == ["c2"]


def test_a_paused_pool_keeps_its_waiters_and_idles_the_server() -> None:
    pool = new_pool()
    pool.checkout("c1", now=1.0)
    pool.paused = True
    assert pool.checkin("s1", now=2.0) is None
    assert pool.idle == {"s1": 2.0}
    assert list(pool.waiters) == ["c1"]


def test_checkin_without_waiters_makes_the_server_idle_since_now() -> None:
    pool = new_pool()
    pool.active.add("s1")
    assert pool.checkin("s1", now=4.5) is None
    assert pool.idle == {"s1": 4.5}
    assert pool.active == set()


def test_add_connected_counts_the_launch_done_and_serves_a_waiter() -> None:
    pool = new_pool()
    pool.checkout("c1", now=0.0)
    pool.connecting = 1
    assert pool.add_connected("s1", now=1.0) == "c1"
    assert pool.connecting == 0
    assert pool.active == {"s1"}
    assert pool.waiters == {}


def test_add_connected_without_waiters_makes_the_server_idle() -> None:
    pool = new_pool()
    pool.connecting = 2
    assert pool.add_connected("s1", now=1.0) is None
    assert pool.connecting == 1
    assert pool.idle == {"s1": 1.0}


def test_reset_server_is_neither_active_nor_available_until_checked_in() -> None:
    pool = new_pool()
    pool.checkin("s1", now=0.0)
    assert pool.checkout("c1", now=0.0) == "s1"
    pool.start_reset("s1")
    assert pool.active == set()
    assert pool.resetting == {"s1"}
    assert pool.total == 1
    assert pool.checkout("c2", now=1.0) is None
    assert pool.checkin("s1", now=2.0) == "c2"
    assert pool.resetting == set()
    assert pool.active == {"s1"}


def test_total_counts_idle_active_resetting_and_connecting() -> None:
    pool = new_pool(size=10)
    pool.idle["a"] = 0.0
    pool.active.update({"b", "c"})
    pool.resetting.add("d")
    pool.connecting = 2
    assert pool.total == 6


# --- launches_needed ----------------------------------------------------------------------


def test_launches_needed_is_zero_for_a_quiet_pool() -> None:
    assert new_pool().launches_needed() == 0


def test_launches_needed_opens_one_per_waiter() -> None:
    pool = new_pool(size=5)
    pool.checkout("c1", now=0.0)
    pool.checkout("c2", now=0.0)
    assert pool.launches_needed() == 2


def test_launches_needed_counts_connecting_and_resetting_servers_as_on_their_way() -> None:
    pool = new_pool(size=10)
    for client in ("c1", "c2", "c3", "c4"):
        pool.checkout(client, now=0.0)
    pool.connecting = 1
    pool.resetting.add("s1")
    assert pool.launches_needed() == 2


def test_launches_needed_never_goes_negative_when_enough_are_on_their_way() -> None:
    pool = new_pool(size=10)
    pool.checkout("c1", now=0.0)
    pool.connecting = 3
    assert pool.launches_needed() == 0


def test_launches_needed_is_capped_by_the_pool_size() -> None:
    pool = new_pool(size=2)
    for n in range(5):
        pool.checkout(f"c{n}", now=0.0)
    assert pool.launches_needed() == 2
    pool.connecting = 2
    assert pool.launches_needed() == 0


def test_launches_needed_is_zero_when_the_pool_is_full() -> None:
    pool = new_pool(size=2)
    pool.active.update({"s1", "s2"})
    pool.checkout("c1", now=0.0)
    assert pool.launches_needed() == 0


def test_launches_needed_tops_the_pool_up_to_min_size() -> None:
    pool = new_pool(size=5, min_size=3)
    assert pool.launches_needed() == 3
    pool.idle["s1"] = 0.0
    pool.connecting = 1
    assert pool.launches_needed() == 1
    pool.connecting = 2
    assert pool.launches_needed() == 0


def test_launches_needed_takes_the_larger_of_waiters_and_min_size() -> None:
    pool = new_pool(size=10, min_size=2)
    for n in range(4):
        pool.checkout(f"c{n}", now=0.0)
    assert pool.launches_needed() == 4


def test_launches_needed_min_size_is_capped_by_size() -> None:
    pool = new_pool(size=2, min_size=5)
    assert pool.launches_needed() == 2


# --- waiting --------------------------------------------------------------------------------


def test_expired_waiters_are_those_past_the_timeout_oldest_first_and_are_removed() -> None:
    pool = new_pool()
    pool.checkout("c1", now=0.0)
    pool.checkout("c2", now=4.0)
    pool.checkout("c3", now=8.0)
    assert pool.expired_waiters(now=10.0, timeout=6.0) == ["c1", "c2"]
    assert list(pool.waiters) == ["c3"]
    assert pool.expired_waiters(now=10.0, timeout=6.0) == []
    assert pool.expired_waiters(now=14.0, timeout=6.0) == ["c3"]
    assert pool.waiters == {}


def test_expired_waiters_with_zero_timeout_never_expire() -> None:
    pool = new_pool()
    pool.checkout("c1", now=0.0)
    assert pool.expired_waiters(now=1e9, timeout=0.0) == []
    assert pool.waiters == {"c1": 0.0}


def test_expired_waiters_of_an_empty_queue_is_empty() -> None:
    assert new_pool().expired_waiters(now=100.0, timeout=1.0) == []


def test_cancel_wait_removes_the_client_and_keeps_order() -> None:
    pool = new_pool()
    for client in ("c1", "c2", "c3"):
        pool.checkout(client, now=0.0)
    pool.cancel_wait("c2")
    pool.cancel_wait("not-waiting")
    assert list(pool.waiters) == ["c1", "c3"]
    assert pool.checkin("s1", now=1.0) == "c1"


# --- removal and listing --------------------------------------------------------------------


def test_remove_forgets_a_server_wherever_it_is() -> None:
    pool = new_pool()
    pool.idle["s1"] = 0.0
    pool.active.add("s2")
    pool.resetting.add("s3")
    for server in ("s1", "s2", "s3", "unknown"):
        pool.remove(server)
    assert pool.total == 0


def test_idle_servers_lists_least_recently_used_first() -> None:
    pool = new_pool()
    pool.checkin("s1", now=1.0)
    pool.checkin("s2", now=2.0)
    pool.checkin("s3", now=3.0)
    assert pool.checkout("c1", now=4.0) == "s3"
    pool.checkin("s3", now=5.0)
    assert list(pool.idle_servers()) == [("s1", 1.0), ("s2", 2.0), ("s3", 5.0)]


def test_idle_servers_is_a_snapshot_safe_to_close_while_iterating() -> None:
    pool = new_pool()
    pool.checkin("s1", now=1.0)
    pool.checkin("s2", now=2.0)
    for server, _since in pool.idle_servers():
        pool.remove(server)
    assert pool.idle == {}
