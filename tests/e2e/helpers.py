"""Small helpers for end-to-end tests: connecting through the proxy, polling, killing sockets."""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import psycopg

from pgproxy.localpg import free_port

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


def spawn_cli(
    server: str, user: str, log_dir: Path, extra: Sequence[str], *, nofile: int | None = None
) -> ProxyProcess:
    """`python -m pgproxy` on a free port in front of `server`, once it accepts connections.

    /metrics and the monitor are off: parallel proxies would fight over port 9127, and the
    monitor logs. `nofile` sets RLIMIT_NOFILE in the child before exec."""
    port = free_port()
    log_path = log_dir / f"pgproxy-{port}.log"
    command = [
        sys.executable, "-m", "pgproxy",
        "--listen", f"127.0.0.1:{port}",
        "--server", server,
        "--user", user,
        "--metrics-listen", "",
        "--monitor-interval", "0",
        *extra,
    ]  # fmt: skip

    def limit_descriptors() -> None:
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            command,
            cwd=REPO,
            env=cli_env(),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            # Runs in the child before exec; no threads there.
            preexec_fn=limit_descriptors if nofile is not None else None,
        )
    proxy = ProxyProcess(process, port, log_path)

    def accepting() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"pgproxy exited early:\n{proxy.log()}")
        return not proxy.is_refusing()

    try:
        wait_for(accepting, timeout=15, what="pgproxy to accept connections")
    except BaseException:
        stop_cli(proxy)
        raise
    return proxy


def stop_cli(proxy: ProxyProcess) -> None:
    if proxy.process.poll() is None:
        proxy.process.kill()
        proxy.process.wait(timeout=10)
