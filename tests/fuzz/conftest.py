"""Fixtures of the fuzz tests: proxies shared by a module, a raw client with deadlines.

The live fuzz tests run many hostile clients against *one* proxy per module, on purpose: what a
bad client leaves behind (a half-read buffer, a pool entry, a counter, a timer) must not hurt
the next one, and the proxy must still serve a normal client at the end.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pgproxy.localpg import LocalPostgres
from pgproxy.wire import messages
from pgproxy.wire.scram import ScramClientExchange
from tests.e2e.conftest import ProxyThread
from tests.e2e.helpers import APP_PASSWORD, connect, wait_for

from .support import FULL, Message, auth_code, split_backend

# A user only pgproxy knows (no such role in Postgres), allowed the console's SHOW commands.
STATS_USER = "fuzzstats"
STATS_PASSWORD = "fuzzstats-secret"


# The full runs (PGPROXY_FULL_TESTS=1) take minutes per property: past the 120 s per-test
# timeout of pyproject.toml, which stays the CI subset's.
FULL_RUN_TIMEOUT = 3600


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if not FULL:
        return
    here = Path(__file__).parent
    for item in items:
        if here in item.path.parents:
            item.add_marker(pytest.mark.timeout(FULL_RUN_TIMEOUT))


def start_proxy(pg: LocalPostgres, **overrides: object) -> ProxyThread:
    flags: dict[str, object] = {
        "listen": "127.0.0.1:0",
        "server": f"{pg.host}:{pg.port}",
        "users": [f"app:{APP_PASSWORD}", f"{STATS_USER}:{STATS_PASSWORD}"],
        "stats_users": STATS_USER,
        "default_pool_size": "2",
        "query_wait_timeout": "30",
        "metrics_listen": "",
        "monitor_interval": "0",
    }
    flags.update(overrides)
    return ProxyThread(flags).start()


@pytest.fixture(scope="module")
def scram_proxy(pg: LocalPostgres) -> Iterator[ProxyThread]:
    """One SCRAM-SHA-256 proxy (the default) for every test of a module."""
    proxy = start_proxy(pg)
    yield proxy
    proxy.stop()


@pytest.fixture(scope="module")
def md5_proxy(pg: LocalPostgres) -> Iterator[ProxyThread]:
    proxy = start_proxy(pg, auth_type="md5")
    yield proxy
    proxy.stop()


@pytest.fixture
def pgproxy_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """caplog of the `pgproxy` loggers from WARNING; at the end, no error may have been logged.

    pgproxy logs an unhandled exception with its traceback at ERROR ("internal error"): the
    one thing no input may cause.
    """
    caplog.set_level(logging.WARNING, logger="pgproxy")
    yield caplog
    # At teardown caplog.records holds the teardown's records only: read the earlier phases.
    assert_no_internal_errors(caplog.get_records("setup") + caplog.get_records("call"))


def assert_no_internal_errors(records: list[logging.LogRecord]) -> None:
    bad = [
        r
        for r in records
        if r.name.startswith("pgproxy")
        and (r.levelno >= logging.ERROR or r.exc_info or "internal error" in r.getMessage())
    ]
    assert not bad, "pgproxy logged errors:\n" + "\n".join(
        f"{r.levelname} {r.name}: {r.getMessage()}" for r in bad
    )


def client_count(proxy: ProxyThread) -> int:
    return int(proxy.call(lambda: len(proxy.proxy.clients)))


def assert_still_serving(proxy: ProxyThread) -> None:
    """Every hostile client is forgotten, and a well-behaved one logs in and queries."""
    wait_for(lambda: client_count(proxy) == 0, what="the proxy to forget its clients")
    with connect(proxy.port, connect_timeout=10) as conn:
        assert conn.execute("SELECT 41 + 1").fetchone() == (42,)
    wait_for(lambda: client_count(proxy) == 0, what="the good client to be forgotten")


class RawClient:
    """A blocking socket that speaks raw protocol 3.0 bytes, with a deadline on every read.

    Sending may fail once the proxy has closed (a reset): `send` then says False, and what the
    proxy answered before closing is still read.
    """

    def __init__(self, port: int, *, deadline: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=deadline)
        self.deadline = time.monotonic() + deadline
        self.received = bytearray()  # everything read, for the transcript
        self._pos = 0  # start of what read_message has not returned yet
        self.closed = False  # the proxy closed (EOF or reset)

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def send(self, data: bytes) -> bool:
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            return False
        return True

    def shutdown_write(self) -> None:
        with contextlib.suppress(OSError):  # already reset
            self.sock.shutdown(socket.SHUT_WR)

    def _recv(self, timeout: float | None = None) -> bool:
        """Read once; False at EOF, reset, or `timeout` (seconds) without data."""
        left = self.deadline - time.monotonic()
        assert left > 0, f"pgproxy neither answered nor closed in time: {bytes(self.received)!r}"
        self.sock.settimeout(min(left, timeout) if timeout is not None else left)
        try:
            chunk = self.sock.recv(65536)
        except ConnectionResetError:
            self.closed = True
            return False
        except TimeoutError:
            if timeout is not None and time.monotonic() < self.deadline:
                return False
            raise AssertionError(
                f"pgproxy neither answered nor closed in time: {bytes(self.received)!r}"
            ) from None
        if not chunk:
            self.closed = True
            return False
        self.received += chunk
        return True

    def read_until_closed(self, *, idle: float | None = None) -> list[Message]:
        """Everything until the proxy closes; with `idle`, also stop after that many quiet
        seconds (then `closed` is False). Returns all messages received so far."""
        while not self.closed and self._recv(idle):
            pass
        return split_backend(bytes(self.received))

    def read_message(self) -> Message | None:
        """The next whole message, or None when the proxy closed first."""
        while True:
            buf = self.received
            if len(buf) - self._pos >= 5:
                length = struct.unpack_from("!i", buf, self._pos + 1)[0]
                assert 4 <= length <= 1 << 20, f"bad length {length} from pgproxy"
                end = self._pos + 1 + length
                if len(buf) >= end:
                    message = (chr(buf[self._pos]), bytes(buf[self._pos + 5 : end]))
                    self._pos = end
                    return message
            if self.closed or not self._recv():
                assert len(buf) == self._pos, f"closed inside a message: {bytes(buf)!r}"
                return None

    def read_until(self, codes: str) -> list[Message]:
        """Messages up to and including the first of one of `codes`, or until closed."""
        out: list[Message] = []
        while (message := self.read_message()) is not None:
            out.append(message)
            if message[0] in codes:
                break
        return out

    def transcript(self) -> list[Message]:
        return split_backend(bytes(self.received))

    def scram_login(self, user: str, password: str, database: str = "app") -> list[Message]:
        """StartupMessage and a correct SCRAM exchange; the messages after it (to Z or E)."""
        self.send(messages.startup_message({"user": user, "database": database}))
        exchange = ScramClientExchange(password)
        first = self.read_message()
        assert first is not None and first[0] == "R" and auth_code(first[1]) == 10, first
        self.send(messages.sasl_initial_response("SCRAM-SHA-256", exchange.client_first()))
        cont = self.read_message()
        assert cont is not None and cont[0] == "R" and auth_code(cont[1]) == 11, cont
        assert cont[1] is not None
        self.send(messages.sasl_response(exchange.handle_server_first(cont[1][4:])))
        return self.read_until("ZE")


def logged_in(port: int) -> RawClient:
    client = RawClient(port)
    rest = client.scram_login("app", APP_PASSWORD)
    assert rest and rest[-1][0] == "Z", f"login failed: {rest!r}"
    return client
