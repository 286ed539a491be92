"""The HTTP endpoint of `metrics_listen`: /metrics (Prometheus text), /healthz, /readyz.

Rules of this file:

* Everything runs on the proxy's event loop. A scrape reads the live pools, clients and
  counters at that moment, on the only thread allowed to touch them: no locks anywhere.
* The data path never touches a metric object. It bumps plain ints in `PoolStats`; the
  collector turns them into metric families, in a private registry, when Prometheus asks.
* A tiny HTTP/1.1 server instead of a framework: GET and HEAD, one request per connection
  (`Connection: close`), a request head of at most 8 KiB, 10 s to send it. Parsing the head
  (`split_head`, `parse_request`) and building the families (`families`) are pure functions.
* Labels are `database`, `user` and bounded enums (state, reason, sqlstate), plus the
  monitor's most frequent application names; never client addresses.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING, cast
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from pgproxy import __version__, report
from pgproxy.core.stats import Histogram
from pgproxy.monitor import BackendHealth

if TYPE_CHECKING:
    from pgproxy.proxy import Proxy

log = logging.getLogger("pgproxy.metrics")

# Longest request head (request line and headers) accepted; longer gets 431.
HEAD_LIMIT = 8192
# Seconds a connection gets to send its request head, and then to take the response.
IDLE_TIMEOUT = 10.0
# How often an open connection checks its deadline and whether the endpoint has closed.
TICK = 1.0
# /readyz: how long a TCP probe of the server may take, and how long its result is reused.
PROBE_TIMEOUT = 1.0
PROBE_CACHE = 2.0
# pgproxy_pg_connections_by_application keeps this many names; the rest are summed as "other".
TOP_APPLICATIONS = 50
OTHER_APPLICATIONS = "other"

METHODS = ("GET", "HEAD")
TEXT = "text/plain; charset=utf-8"

# RFC 9110 §5.6.2 token; RFC 9112 §3 request line and §5 field lines.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VERSION = re.compile(r"HTTP/([0-9])\.([0-9])")
_TARGET = re.compile(r"[\x21-\x7e]+")
_FIELD_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")
_BLANK_LINE = re.compile(rb"\r?\n\r?\n")


# -- HTTP, pure ------------------------------------------------------------------------------


class HttpError(Exception):
    """A request the endpoint answers with an error status, then closes."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str  # without the query string
    query: str = ""


def split_head(buffer: bytes | bytearray, limit: int = HEAD_LIMIT) -> bytes | None:
    """The request head once the blank line that ends it has arrived; None: more bytes needed.

    Empty lines before the request line are skipped (RFC 9112 §2.2). Raises `HttpError`
    (431) when the head is, or would be, longer than `limit`.
    """
    start = 0
    while buffer[start : start + 1] in (b"\r", b"\n"):
        start += 1
    match = _BLANK_LINE.search(buffer, start)
    if match is None:
        if len(buffer) - start >= limit:
            raise HttpError(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "request head too large")
        return None
    if match.end() - start > limit:
        raise HttpError(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "request head too large")
    return bytes(buffer[start : match.start()])


def parse_request(head: bytes) -> Request:
    """A request head (without its blank line) → method and path; `HttpError` 400 if bad."""
    text = head.decode("latin-1")
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    parts = lines[0].split(" ")
    if len(parts) != 3:
        raise HttpError(HTTPStatus.BAD_REQUEST, "malformed request line")
    method, target, version = parts
    if not _TOKEN.fullmatch(method) or not _TARGET.fullmatch(target):
        raise HttpError(HTTPStatus.BAD_REQUEST, "malformed request line")
    match = _VERSION.fullmatch(version)
    if match is None:
        raise HttpError(HTTPStatus.BAD_REQUEST, "malformed HTTP version")
    if match.group(1) != "1":
        raise HttpError(HTTPStatus.HTTP_VERSION_NOT_SUPPORTED, "only HTTP/1.x is supported")
    hosts = 0
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        # No whitespace before the colon (§5.1) and no obsolete line folding (§5.2).
        if not colon or not _TOKEN.fullmatch(name) or not _FIELD_VALUE.fullmatch(value):
            raise HttpError(HTTPStatus.BAD_REQUEST, "malformed header field")
        if name.lower() == "host":
            hosts += 1
    # §3.2: an HTTP/1.1 request carries exactly one Host field.
    if match.group(2) != "0" and hosts != 1:
        raise HttpError(HTTPStatus.BAD_REQUEST, "HTTP/1.1 needs exactly one Host header")
    # Origin form, or absolute form (§3.2.2).
    if not target.startswith("/") and not target.lower().startswith(("http://", "https://")):
        raise HttpError(HTTPStatus.BAD_REQUEST, "malformed request target")
    try:
        split = urlsplit(target)
    except ValueError:  # e.g. an unbalanced '[' in the host of an absolute form
        raise HttpError(HTTPStatus.BAD_REQUEST, "malformed request target") from None
    return Request(method=method, path=split.path or "/", query=split.query)


def response(
    status: HTTPStatus,
    body: bytes,
    *,
    content_type: str = TEXT,
    headers: Sequence[tuple[str, str]] = (),
) -> bytes:
    """A whole HTTP/1.1 response; the connection is closed after it."""
    lines = [
        f"HTTP/1.1 {status.value} {status.phrase}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Cache-Control: no-store",
        "Connection: close",
        *(f"{name}: {value}" for name, value in headers),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


# -- metric families, pure -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProxyView:
    """Everything /metrics exports, read from the proxy at one moment."""

    pools: Sequence[report.PoolReport]
    client_connections: int  # every client connection, logging in and admin console included
    clients_logging_in: int
    max_client_conn: int
    # Login failures counted by the proxy, all of them: with a pool or before one was known.
    login_failures: int
    draining: bool
    monitor: BackendHealth | None  # None: monitor off, or no read attempted yet
    # CancelRequests handed to the worker of their client (None: one process, no workers).
    cancels_forwarded: int | None = None


def _le(bound: float) -> str:
    """A bucket bound as Prometheus writes it (as prometheus_client does)."""
    return "+Inf" if bound == float("inf") else repr(float(bound))


def _buckets(histogram: Histogram) -> list[tuple[str, float]]:
    return [(_le(bound), float(count)) for bound, count in histogram.cumulative()]


def families(view: ProxyView) -> list[Metric]:
    """The metric families of one scrape."""
    out: list[Metric] = [
        GaugeMetricFamily("pgproxy_up", "1 while pgproxy serves.", value=1),
    ]
    info = GaugeMetricFamily("pgproxy_info", "pgproxy's version.", labels=["version"])
    info.add_metric([__version__], 1)
    out.append(info)
    out.append(
        GaugeMetricFamily(
            "pgproxy_draining",
            "1 while pgproxy is shutting down (no new clients).",
            value=int(view.draining),
        )
    )
    out.append(
        GaugeMetricFamily(
            "pgproxy_client_connections",
            "Client connections open, logging in and admin console included.",
            value=view.client_connections,
        )
    )
    out.append(
        GaugeMetricFamily(
            "pgproxy_client_connections_max",
            "max_client_conn: more client connections are refused.",
            value=view.max_client_conn,
        )
    )
    out.append(
        GaugeMetricFamily(
            "pgproxy_clients_logging_in",
            "Client connections that have not finished logging in.",
            value=view.clients_logging_in,
        )
    )
    if view.cancels_forwarded is not None:
        out.append(
            CounterMetricFamily(
                "pgproxy_cancel_requests_forwarded",
                "CancelRequests that reached another worker than their client's, handed over.",
                value=view.cancels_forwarded,
            )
        )
    out.extend(pool_families(view))
    if view.monitor is not None:
        out.extend(monitor_families(view.monitor))
    return out


def pool_families(view: ProxyView) -> list[Metric]:
    """The per-pool families, labelled database and user."""
    pool = ["database", "user"]

    def gauge(name: str, doc: str, extra: Sequence[str] = ()) -> GaugeMetricFamily:
        return GaugeMetricFamily(name, doc, labels=[*pool, *extra])

    def counter(name: str, doc: str, extra: Sequence[str] = ()) -> CounterMetricFamily:
        return CounterMetricFamily(name, doc, labels=[*pool, *extra])

    def histogram(name: str, doc: str) -> HistogramMetricFamily:
        return HistogramMetricFamily(name, doc, labels=pool)

    clients = gauge(
        "pgproxy_clients",
        "Logged-in clients of the pool by state: active, waiting (for a server), "
        "idle_in_transaction (holding a server, silent), idle (no server).",
        ["state"],
    )
    servers = gauge(
        "pgproxy_servers",
        "Server connections of the pool by state: active (linked to a client), idle, "
        "resetting (after its client), login (connecting).",
        ["state"],
    )
    size = gauge("pgproxy_pool_size", "Most server connections the pool may open.")
    min_size = gauge("pgproxy_pool_min_size", "Server connections the pool keeps open.")
    paused = gauge("pgproxy_pool_paused", "1 while the pool is paused (PAUSE).")
    longest_wait = gauge(
        "pgproxy_longest_wait_seconds",
        "How long the oldest client waiting for a server has waited (0: none waits).",
    )
    longest_hold = gauge(
        "pgproxy_longest_hold_seconds",
        "How long the client holding a server connection longest has held it (0: none holds "
        "one); in transaction mode, the longest transaction in progress: the first sign of a "
        "leak.",
    )
    idle_tx = gauge(
        "pgproxy_idle_in_transaction_longest_seconds",
        "How long the longest idle-in-transaction client of the pool has been so (0: none).",
    )
    wait_time = histogram("pgproxy_wait_seconds", "Time clients waited for a server connection.")
    query_time = histogram(
        "pgproxy_query_seconds", "Time from a query's first message to its ReadyForQuery."
    )
    transaction_time = histogram(
        "pgproxy_transaction_seconds", "Time from a transaction's first message to its end."
    )
    queries = counter(
        "pgproxy_queries", "Queries answered (ReadyForQuery after a client's Query or Sync)."
    )
    transactions = counter("pgproxy_transactions", "Transactions completed.")
    received = counter("pgproxy_received_bytes", "Bytes received from the pool's clients.")
    sent = counter("pgproxy_sent_bytes", "Bytes sent to the pool's clients.")
    errors = counter(
        "pgproxy_errors", "Errors sent to clients (the server's and pgproxy's).", ["sqlstate"]
    )
    logins = counter("pgproxy_logins", "Successful client logins.")
    login_failures = counter(
        "pgproxy_login_failures",
        'Failed client logins. database="",user="": failures before a pool was known '
        "(unknown user or database, or a pool not created yet); sum() is all failures.",
    )
    disconnects = counter(
        "pgproxy_client_disconnects", "Clients disconnected by pgproxy, by reason.", ["reason"]
    )
    pins = counter(
        "pgproxy_pins", "Server connections pinned to a client until it leaves (session state)."
    )
    hits = counter(
        "pgproxy_prepared_statement_hits",
        "Parse messages answered by pgproxy: the server had the statement already.",
    )
    prepares = counter("pgproxy_prepared_statement_prepares", "Parse messages sent to a server.")
    reprepares = counter(
        "pgproxy_prepared_statement_reprepares",
        "Statements prepared again on a server that lacked them, before a Bind.",
    )
    evictions = counter(
        "pgproxy_prepared_statement_evictions",
        "Statements closed on a server to stay within max_prepared_statements.",
    )

    pool_failures = 0
    for p in view.pools:
        labels = [p.database, p.user]
        st = p.stats
        for state in report.CLIENT_STATES[:-1]:  # login: no pool yet
            clients.add_metric([*labels, state], p.clients.get(state, 0))
        for state in report.SERVER_STATES:
            servers.add_metric([*labels, state], p.servers.get(state, 0))
        size.add_metric(labels, p.size)
        min_size.add_metric(labels, p.min_size)
        paused.add_metric(labels, int(p.paused))
        longest_wait.add_metric(labels, p.longest_wait)
        longest_hold.add_metric(labels, p.longest_hold)
        idle_tx.add_metric(labels, p.longest_idle_in_transaction)
        wait_time.add_metric(labels, _buckets(st.wait_time), st.wait_time.sum)
        query_time.add_metric(labels, _buckets(st.query_time), st.query_time.sum)
        transaction_time.add_metric(labels, _buckets(st.transaction_time), st.transaction_time.sum)
        queries.add_metric(labels, st.queries)
        transactions.add_metric(labels, st.transactions)
        received.add_metric(labels, st.received)
        sent.add_metric(labels, st.sent)
        for sqlstate, count in sorted(st.errors.items()):
            errors.add_metric([*labels, sqlstate], count)
        logins.add_metric(labels, st.logins)
        login_failures.add_metric(labels, st.login_failures)
        pool_failures += st.login_failures
        for reason, count in sorted(st.disconnects.items()):
            disconnects.add_metric([*labels, reason], count)
        pins.add_metric(labels, st.pins)
        hits.add_metric(labels, p.statements.hits)
        prepares.add_metric(labels, p.statements.prepares)
        reprepares.add_metric(labels, p.statements.reprepares)
        evictions.add_metric(labels, p.statements.evictions)
    # Every failure is in view.login_failures, those of a known pool in that pool's too.
    login_failures.add_metric(["", ""], max(view.login_failures - pool_failures, 0))
    return [
        clients,
        servers,
        size,
        min_size,
        paused,
        longest_wait,
        longest_hold,
        idle_tx,
        wait_time,
        query_time,
        transaction_time,
        queries,
        transactions,
        received,
        sent,
        errors,
        logins,
        login_failures,
        disconnects,
        pins,
        hits,
        prepares,
        reprepares,
        evictions,
    ]


def top_applications(
    counts: Sequence[tuple[str, int]], limit: int = TOP_APPLICATIONS
) -> list[tuple[str, int]]:
    """The `limit` most frequent names (ties by name), the rest summed as "other"."""
    ranked = sorted(counts, key=lambda kv: (-kv[1], kv[0]))
    kept: dict[str, int] = {}
    for name, count in ranked[:limit]:
        kept[name] = kept.get(name, 0) + count
    rest = sum(count for _name, count in ranked[limit:])
    if rest:
        kept[OTHER_APPLICATIONS] = kept.get(OTHER_APPLICATIONS, 0) + rest
    return list(kept.items())


def monitor_families(health: BackendHealth) -> list[Metric]:
    """The families of the pg_stat_activity reader (`pgproxy.monitor`)."""
    out: list[Metric] = [
        GaugeMetricFamily(
            "pgproxy_pg_monitor_up",
            "1 when the last read of pg_stat_activity on the server succeeded.",
            value=int(health.up),
        )
    ]
    if health.last_success_at is not None:
        out.append(
            GaugeMetricFamily(
                "pgproxy_pg_monitor_last_success_timestamp_seconds",
                "Unix time of the last successful read of pg_stat_activity.",
                value=health.last_success_at,
            )
        )
    activity = health.activity
    if activity is None:
        return out
    by_state = GaugeMetricFamily(
        "pgproxy_pg_connections",
        "Client backends on the server by state; unknown: another role's backend, whose "
        "state the monitor's role may not see (grant it pg_read_all_stats).",
        labels=["state"],
    )
    for state, count in activity.by_state:
        by_state.add_metric([state], count)
    by_application = GaugeMetricFamily(
        "pgproxy_pg_connections_by_application",
        f"Client backends on the server by application_name (the {TOP_APPLICATIONS} most "
        f'frequent; the rest as "{OTHER_APPLICATIONS}").',
        labels=["application_name"],
    )
    for name, count in top_applications(activity.by_application):
        by_application.add_metric([name], count)
    out += [
        by_state,
        by_application,
        GaugeMetricFamily(
            "pgproxy_pg_oldest_transaction_seconds",
            "Age of the oldest open transaction on the server (0: none).",
            value=activity.oldest_transaction,
        ),
        GaugeMetricFamily(
            "pgproxy_pg_max_connections",
            "The server's max_connections.",
            value=activity.max_connections,
        ),
    ]
    return out


# -- reading the proxy (loop thread) ----------------------------------------------------------


def proxy_view(proxy: Proxy) -> ProxyView:
    """Read what /metrics exports from the live proxy; on the loop thread only."""
    now = proxy.now()
    monitor = proxy.monitor
    return ProxyView(
        pools=report.pools(proxy, now),
        client_connections=len(proxy.clients),
        clients_logging_in=sum(1 for c in proxy.clients if c.state is None),
        max_client_conn=proxy.max_clients,
        login_failures=proxy.login_failures,
        draining=proxy.stopping,
        monitor=None if monitor is None else monitor.snapshot(),
        cancels_forwarded=None if proxy.peers is None else proxy.peers.forwarded_cancels,
    )


class ProxyCollector:
    """The registry's only collector: families built from the proxy when scraped."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy

    def collect(self) -> Iterator[Metric]:
        yield from families(proxy_view(self.proxy))


# -- the endpoint (loop thread) ----------------------------------------------------------------


class HttpEndpoint:
    """State shared by an endpoint's connections; `respond` answers a request."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.server: asyncio.Server | None = None
        self.connections: set[MetricsConnection] = set()
        self._guard: asyncio.Task[None] | None = None
        # The last TCP probe of the server: (ready, reason) and when it finished.
        self._probe_result: tuple[bool, str] | None = None
        self._probe_at = 0.0
        self._probe: asyncio.Task[tuple[bool, str]] | None = None

    def guard_connections(self) -> None:
        """Close the connections still open when the loop shuts down.

        The proxy closes the listening server at the end of its drain, but neither asyncio
        nor uvloop closes the connections it accepted, and the loop ends right after: a
        request in flight would be left to the loop's close, which uvloop refuses with open
        handles. The loop's runner cancels pending tasks before closing: this one then aborts.
        """
        self._guard = self.loop.create_task(self._abort_on_cancel())

    async def _abort_on_cancel(self) -> None:
        try:
            await self.loop.create_future()  # never set: ends when cancelled
        finally:
            for conn in list(self.connections):
                conn.abort()

    def is_serving(self) -> bool:
        return self.server is None or self.server.is_serving()

    async def respond(self, request: Request) -> bytes:
        """The whole HTTP response to a GET or HEAD."""
        raise NotImplementedError


class MetricsEndpoint(HttpEndpoint):
    """The proxy's /metrics, /healthz and /readyz: the registry and the /readyz probe."""

    def __init__(self, proxy: Proxy, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.proxy = proxy
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(ProxyCollector(proxy))

    def scrape(self) -> bytes:
        return generate_latest(self.registry)

    async def respond(self, request: Request) -> bytes:
        if request.path == "/metrics":
            return response(HTTPStatus.OK, self.scrape(), content_type=CONTENT_TYPE_PLAIN_0_0_4)
        if request.path == "/healthz":
            return response(HTTPStatus.OK, b"ok\n")
        if request.path == "/readyz":
            ready, reason = self.readiness() or await self.probe()
            status = HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE
            return response(status, f"{reason}\n".encode())
        return response(HTTPStatus.NOT_FOUND, b"not found\n")

    def readiness(self) -> tuple[bool, str] | None:
        """(ready, reason) when known without a probe; None: `probe()` must be awaited."""
        proxy = self.proxy
        if proxy.stopping:
            return False, "draining: pgproxy is shutting down"
        if any(p.idle or p.active for p in proxy.pools.values()):
            return True, "ok"
        if self._probe_result is not None and self.loop.time() - self._probe_at < PROBE_CACHE:
            return self._probe_result
        return None

    async def probe(self) -> tuple[bool, str]:
        """Whether a TCP connection to the server opens; one probe at a time, shared."""
        if self._probe is None:
            self._probe = self.loop.create_task(self._probe_once())
        ready, reason = await asyncio.shield(self._probe)
        if self.proxy.stopping:
            return False, "draining: pgproxy is shutting down"
        return ready, reason

    async def _probe_once(self) -> tuple[bool, str]:
        server = self.proxy.settings.server
        where = f"server {server.host}:{server.port}"
        try:
            async with asyncio.timeout(PROBE_TIMEOUT):
                _reader, writer = await asyncio.open_connection(server.host, server.port)
        except TimeoutError:
            result = (False, f"{where} did not accept a connection within {PROBE_TIMEOUT:g} s")
        except OSError as exc:
            result = (False, f"{where} is unreachable: {exc.strerror or exc}")
        else:
            writer.close()
            result = (True, "ok")
        finally:
            self._probe = None
        self._probe_result = result
        self._probe_at = self.loop.time()
        return result


class MetricsConnection(asyncio.Protocol):
    """One HTTP connection: read the request head, answer once, close."""

    def __init__(self, endpoint: HttpEndpoint) -> None:
        self.endpoint = endpoint
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.answering = False  # the head is complete: nothing more is read
        self.deadline = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCP transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.endpoint.connections.add(self)
        loop = self.endpoint.loop
        self.deadline = loop.time() + IDLE_TIMEOUT
        self.timer = loop.call_later(TICK, self._tick)

    def data_received(self, data: bytes) -> None:
        if self.answering:
            return
        self.buffer += data
        try:
            head = split_head(self.buffer)
            if head is None:
                return
            self.answering = True
            assert self.transport is not None
            self.transport.pause_reading()
            self._answer(parse_request(head))
        except HttpError as exc:
            self.answering = True
            self._send(response(exc.status, f"{exc.message}\n".encode()))
        except Exception:
            log.exception("metrics endpoint: internal error")
            self.answering = True
            self._send(response(HTTPStatus.INTERNAL_SERVER_ERROR, b"internal error\n"))

    def eof_received(self) -> bool:
        # A client that half-closes before its request is complete gets nothing more; one
        # that half-closes after it still gets its answer.
        return self.answering

    def connection_lost(self, exc: Exception | None) -> None:
        self.endpoint.connections.discard(self)
        self.transport = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.task is not None:
            self.task.cancel()
            self.task = None

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def _tick(self) -> None:
        self.timer = None
        transport = self.transport
        if transport is None:
            return
        loop = self.endpoint.loop
        # Too slow to send its request or to take the answer; or the endpoint was closed and
        # this one has not even asked yet (since Python 3.12 wait_closed() waits for it).
        if loop.time() >= self.deadline or (not self.answering and not self.endpoint.is_serving()):
            transport.abort()
            return
        self.timer = loop.call_later(TICK, self._tick)

    def _answer(self, request: Request) -> None:
        if request.method not in METHODS:
            self._send(
                response(
                    HTTPStatus.METHOD_NOT_ALLOWED,
                    b"method not allowed\n",
                    headers=[("Allow", ", ".join(METHODS))],
                ),
                request,
            )
            return
        self.task = self.endpoint.loop.create_task(self._respond(request))

    async def _respond(self, request: Request) -> None:
        try:
            answer = await self.endpoint.respond(request)
        except Exception:
            log.exception("metrics endpoint: %s failed", request.path)
            answer = response(HTTPStatus.INTERNAL_SERVER_ERROR, b"internal error\n")
        self.task = None
        self._send(answer, request)

    def _send(self, data: bytes, request: Request | None = None) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if request is not None and request.method == "HEAD":
            data = data[: data.index(b"\r\n\r\n") + 4]
        transport.write(data)
        transport.close()  # after the buffer is flushed
        # The client now has IDLE_TIMEOUT to read the response.
        self.deadline = self.endpoint.loop.time() + IDLE_TIMEOUT


async def start_metrics_server(proxy: Proxy, host: str | None, port: int) -> asyncio.Server:
    """Serve /metrics, /healthz and /readyz on the running loop."""
    endpoint = MetricsEndpoint(proxy, asyncio.get_running_loop())
    server = await serve_endpoint(endpoint, host, port)
    shown = "*" if not host else f"[{host}]" if ":" in host else host
    log.info("metrics on http://%s:%d/metrics", shown, server.sockets[0].getsockname()[1])
    return server


async def serve_endpoint(
    endpoint: HttpEndpoint, host: str | None, port: int = 0, *, unix_path: str | None = None
) -> asyncio.Server:
    """Serve `endpoint` on TCP (host, port) or, given `unix_path`, on a Unix socket."""
    loop = endpoint.loop
    if unix_path is not None:
        server = await loop.create_unix_server(lambda: MetricsConnection(endpoint), unix_path)
    else:
        server = await loop.create_server(
            lambda: MetricsConnection(endpoint), host, port, reuse_address=True
        )
    endpoint.server = server
    endpoint.guard_connections()
    return server
