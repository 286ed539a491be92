"""CancelKeys: the proxy's own BackendKeyData per client and the way back to the client."""

from collections.abc import Callable, Iterator

from pgproxy.core.cancel import CancelKeys

MAX_PID = 0x7FFFFFFF


def secrets(*values: int) -> Callable[[], int]:
    it: Iterator[int] = iter(values)
    return lambda: next(it)


def counter(start: int = 1000) -> Callable[[], int]:
    state = [start]

    def next_secret() -> int:
        state[0] += 1
        return state[0]

    return next_secret


def test_allocate_gives_sequential_unique_pids_and_the_injected_secret() -> None:
    keys: CancelKeys[str] = CancelKeys(secrets(11, 22, 33))
    assert keys.allocate("a") == (1, 11)
    assert keys.allocate("b") == (2, 22)
    assert keys.allocate("c") == (3, 33)
    assert len(keys) == 3


def test_allocate_masks_the_secret_to_32_bits() -> None:
    keys: CancelKeys[str] = CancelKeys(secrets(-1, 1 << 33 | 5))
    assert keys.allocate("a") == (1, 0xFFFFFFFF)
    assert keys.allocate("b") == (2, 5)


def test_lookup_finds_the_client_with_the_right_secret() -> None:
    keys: CancelKeys[str] = CancelKeys(secrets(0xDEADBEEF))
    pid, secret = keys.allocate("a")
    assert keys.lookup(pid, secret) == "a"


def test_lookup_accepts_the_secret_read_as_a_signed_int32() -> None:
    keys: CancelKeys[str] = CancelKeys(secrets(0xDEADBEEF))
    pid, _secret = keys.allocate("a")
    assert keys.lookup(pid, 0xDEADBEEF - (1 << 32)) == "a"


def test_lookup_with_the_wrong_secret_is_none() -> None:
    keys: CancelKeys[str] = CancelKeys(secrets(42))
    pid, _secret = keys.allocate("a")
    assert keys.lookup(pid, 43) is None


def test_lookup_of_an_unknown_pid_is_none() -> None:
    keys: CancelKeys[str] = CancelKeys(secrets(42))
    keys.allocate("a")
    assert keys.lookup(999, 42) is None


def test_release_forgets_the_key() -> None:
    keys: CancelKeys[str] = CancelKeys(secrets(42))
    pid, secret = keys.allocate("a")
    keys.release(pid)
    assert keys.lookup(pid, secret) is None
    assert len(keys) == 0
    keys.release(pid)  # twice is harmless
    keys.release(12345)


def test_released_pid_is_not_reused_before_wrap_around() -> None:
    keys: CancelKeys[str] = CancelKeys(counter())
    first, _ = keys.allocate("a")
    keys.release(first)
    second, _ = keys.allocate("b")
    assert second != first


def test_pids_wrap_around_to_one_after_the_largest_positive_int32() -> None:
    keys: CancelKeys[str] = CancelKeys(counter())
    keys._next_pid = MAX_PID - 1
    pids = [keys.allocate(name)[0] for name in ("a", "b", "c")]
    assert pids == [MAX_PID - 1, MAX_PID, 1]
    assert all(0 < pid <= MAX_PID for pid in pids)


def test_pids_still_in_use_are_skipped_after_wrap_around() -> None:
    keys: CancelKeys[str] = CancelKeys(counter())
    low = [keys.allocate(f"low{n}")[0] for n in range(3)]
    assert low == [1, 2, 3]
    keys.release(2)
    keys._next_pid = MAX_PID
    pids = [keys.allocate(name)[0] for name in ("x", "y", "z")]
    assert pids == [MAX_PID, 2, 4]
    assert len(keys) == 5
    assert keys.lookup(2, 1005) == "y"  # the released pid now belongs to its new client
    assert keys.lookup(1, 1001) == "low0"


def test_allocate_skips_a_pid_in_use_at_the_cursor() -> None:
    keys: CancelKeys[str] = CancelKeys(counter())
    keys.allocate("a")
    keys.allocate("b")
    keys._next_pid = 1
    assert keys.allocate("c")[0] == 3


def test_many_live_clients_have_distinct_pids() -> None:
    keys: CancelKeys[int] = CancelKeys(counter())
    pids = {keys.allocate(n)[0] for n in range(500)}
    assert len(pids) == 500
