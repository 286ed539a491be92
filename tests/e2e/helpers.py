"""Small helpers for end-to-end tests: connecting through the proxy, polling, killing sockets."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import psycopg

T = TypeVar("T")

APP_PASSWORD = "app-secret"


def conninfo(
    port: int, *, user: str = "app", password: str = APP_PASSWORD, dbname: str = "app", **extra: str
) -> str:
    parts = [f"host=127.0.0.1 port={port} user={user} password={password} dbname={dbname}"]
    parts.extend(f"{k}={v}" for k, v in extra.items())
    return " ".join(parts)


def connect(port: int, **kwargs: object) -> psycopg.Connection:
    kwargs.setdefault("autocommit", True)
    kwargs.setdefault("prepare_threshold", None)
    return psycopg.connect(conninfo(port), **kwargs)  # type: ignore[arg-type]


def wait_for(
    predicate: Callable[[], T],
    *,
    timeout: float = 10.0,
    interval: float = 0.02,
    what: str = "condition",
) -> T:
    """Poll `predicate` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def kill_socket(conn: psycopg.Connection) -> None:
    """Cut a client's TCP connection without a Terminate message, as a killed process would."""
    sock = socket.socket(fileno=conn.fileno())
    try:
        sock.shutdown(socket.SHUT_RDWR)
    finally:
        sock.detach()


class Background(threading.Thread):
    """Runs `fn` on a thread; after `join`, `outcome` is its result or what it raised."""

    def __init__(self, fn: Callable[[], object]) -> None:
        super().__init__(daemon=True)
        self._fn = fn
        self.outcome: object = None

    def run(self) -> None:
        try:
            self.outcome = self._fn()
        except BaseException as exc:
            self.outcome = exc

    def finish(self, timeout: float = 10.0) -> object:
        self.join(timeout)
        assert not self.is_alive(), "background call did not finish"
        return self.outcome


REPO = Path(__file__).resolve().parents[2]


@dataclass
class ProxyProcess:
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_lines(self, needle: str) -> list[str]:
        return [line for line in self.log().splitlines() if needle in line]

    def is_refusing(self) -> bool:
        """True once nothing listens on the port any more."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return False
        except ConnectionRefusedError:
            return True

    def wait(self, timeout: float) -> int:
        return self.process.wait(timeout=timeout)


def cli_env() -> dict[str, str]:
    # Settings from the developer's environment must not leak into the process under test.
    return {k: v for k, v in os.environ.items() if not k.startswith("PGPROXY_")}
