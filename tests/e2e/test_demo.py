"""`make run`'s demonstration, run as the README's first command runs it, then stopped."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import threading

from .helpers import REPO, cli_env, wait_for


def test_the_demo_serves_every_client_through_pgproxy_and_cleans_up_on_sigterm() -> None:
    demo = subprocess.Popen(
        [sys.executable, "-m", "pgproxy.demo"],
        cwd=REPO,
        env={k: v for k, v in cli_env().items() if not k.startswith("PGPROXY_")},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    running = threading.Event()

    def read() -> None:
        assert demo.stdout is not None
        for line in demo.stdout:
            lines.append(line)
            if line.startswith("pgproxy is running"):
                running.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert running.wait(120), "".join(lines)
        out = "".join(lines)
        direct = re.search(r"directly \(port (\d+)\)\s+(\d+)\s+(\d+)\s+(\d+)", out)
        proxied = re.search(r"via pgproxy \(port \d+\)\s+(\d+)\s+(\d+)\s+(\d+)", out)
        assert direct is not None and proxied is not None, out
        # Postgres alone refuses some of the 100 clients; through pgproxy all are served on
        # at most the pool's 5 server connections.
        assert int(direct[3]) > 0, out
        assert proxied.groups() == ("100", "0", proxied[3]) and int(proxied[3]) <= 5, out
        pg_port = direct[1]
        assert _postgres_listening(pg_port)
    finally:
        demo.send_signal(signal.SIGTERM)
        code = demo.wait(timeout=60)
        # Output ends once the demo and pgproxy, which shares its stdout, are both gone.
        reader.join(timeout=30)
    assert not reader.is_alive(), "the demo left its pgproxy running"
    assert demo.stdout is not None
    demo.stdout.close()
    assert code == 0, "".join(lines)
    # The throwaway cluster is gone with it.
    wait_for(lambda: not _postgres_listening(pg_port), what="the demo's cluster to stop")


def _postgres_listening(port: str) -> bool:
    try:
        socket.create_connection(("127.0.0.1", int(port)), timeout=2).close()
    except OSError:
        return False
    return True
