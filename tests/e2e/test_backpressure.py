"""A slow reader throttles Postgres instead of making the proxy buffer its result."""

from __future__ import annotations

import os
import subprocess

from pgproxy.localpg import LocalPostgres

from .helpers import APP_PASSWORD, wait_for

ROWS = 200_000
ROW = 1000  # bytes per row, plus a newline: ~200 MB in all


def _buffered(proxy) -> int:
    """Bytes the proxy holds in its transports' write buffers, both directions."""
    p = proxy.proxy
    conns = [*p.clients, *p.servers]
    return sum(
        c.transport.get_write_buffer_size()
        for c in conns
        if c.transport is not None and not c.transport.is_closing()
    )


def _server_reading_paused(proxy) -> bool:
    return any(s.gate is not None and not s.gate.is_open for s in proxy.proxy.servers)


def test_slow_reader_of_200_mb_keeps_proxy_buffers_small(pg: LocalPostgres, make_proxy) -> None:
    proxy = make_proxy(default_pool_size="1")
    env = dict(os.environ, PGPASSWORD=APP_PASSWORD)
    sql = f"COPY (SELECT repeat('x', {ROW}) FROM generate_series(1, {ROWS})) TO STDOUT"
    with subprocess.Popen(
        ["psql", "-X", "-h", "127.0.0.1", "-p", str(proxy.port), "-U", "app", "app", "-c", sql],
        env=env,
        stdout=subprocess.PIPE,
        bufsize=0,
    ) as psql:
        assert psql.stdout is not None
        received = len(psql.stdout.read(65536))
        # The reader stalls: psql blocks on its stdout, stops reading its socket, the proxy's
        # write buffer to psql fills, and the proxy must stop reading from Postgres.
        wait_for(
            lambda: proxy.call(lambda: _server_reading_paused(proxy)),
            timeout=30,
            what="the proxy to pause reading from Postgres",
        )
        samples = [proxy.call(lambda: _buffered(proxy))]
        # Read slowly for a while; the proxy keeps pausing and resuming the server.
        for _ in range(200):
            received += len(psql.stdout.read(16384))
            samples.append(proxy.call(lambda: _buffered(proxy)))
        while chunk := psql.stdout.read(1 << 20):
            received += len(chunk)
        assert psql.wait(30) == 0
    assert received == ROWS * (ROW + 1)
    assert max(samples) < 2 * 1024 * 1024, f"proxy buffered up to {max(samples)} bytes"
