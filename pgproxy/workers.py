"""`workers > 1`: a supervisor, N worker processes on one port, and what they tell each other.

Rules of this file:

* The process the operator starts becomes the supervisor. It reserves the port (bound with
  SO_REUSEPORT, never listening), starts each worker as `python -m pgproxy` with the same
  arguments and environment plus `_PGPROXY_WORKER`, restarts a worker that dies, forwards
  SIGHUP, and on SIGTERM/SIGINT forwards the signal and waits for every worker to drain. It
  serves `metrics_listen` itself: /metrics is the workers' scrapes merged.
* Each worker listens on the port with SO_REUSEPORT (the kernel spreads new connections) and
  gets `share` of every pool size and of max_client_conn, so the sums are what was configured.
  Client ids, server ids and cancel-key pids are numbered with a stride of N from the worker's
  index + 1: the worker of any of them is `(n - 1) % N`.
* Workers talk over HTTP/1.1 on Unix sockets in a private directory (`worker-<i>.sock`): the
  supervisor scrapes there, a CancelRequest for another worker's client is forwarded there, and
  the admin console asks every worker and merges. Only control traffic: never the data path.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.parser import text_string_to_metric_families

from pgproxy.config import Settings
from pgproxy.metrics import HttpEndpoint, MetricsEndpoint, Request, response, serve_endpoint

log = logging.getLogger("pgproxy")

# Makes `python -m pgproxy` a worker: INDEX/COUNT/PORT/SUPERVISOR_PID/DIR.
WORKER_ENV = "_PGPROXY_WORKER"
# How long a request to another worker may take (a PAUSE has no limit: Ctrl-C stops it).
PEER_TIMEOUT = 5.0
# A worker that dies sooner than this after its start is restarted after a growing delay.
RESTART_DELAY = 0.5
RESTART_DELAY_MAX = 30.0
STABLE_AFTER = 10.0
# How often a signal for a starting worker checks whether it can be delivered.
SIGNAL_POLL = 0.02
# A worker's exit code for a bad setting (pgproxy.cli.EXIT_BAD_CONFIG): not restarted.
EXIT_BAD_CONFIG = 2
# Past the workers' shutdown_timeout, the supervisor kills the ones still running.
KILL_GRACE = 10.0
# Gauges merged by maximum across workers (the rest are summed): states and "longest" times,
# and the Postgres-side monitor's, which only worker 0 runs.
_MAX_FAMILIES = frozenset(
    {
        "pgproxy_up",
        "pgproxy_info",
        "pgproxy_draining",
        "pgproxy_pool_paused",
        "pgproxy_longest_wait_seconds",
        "pgproxy_longest_hold_seconds",
        "pgproxy_idle_in_transaction_longest_seconds",
    }
)
_PR_SET_PDEATHSIG = 1
# Signals the processes handle; blocked while they start, so that none is lost or fatal.
CONTROL_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """Who this worker is among its siblings, and where they all meet."""

    index: int
    count: int
    port: int
    supervisor_pid: int
    rundir: Path

    def encode(self) -> str:
        return f"{self.index}/{self.count}/{self.port}/{self.supervisor_pid}/{self.rundir}"

    @classmethod
    def decode(cls, text: str) -> WorkerSpec:
        index, count, port, pid, rundir = text.split("/", 4)
        return cls(int(index), int(count), int(port), int(pid), Path(rundir))

    def socket_path(self, index: int) -> Path:
        return worker_socket(self.rundir, index)

    def owner(self, number: int) -> int:
        """The worker that numbered a client id, server id or cancel pid."""
        return (number - 1) % self.count

    def share(self, total: int) -> int:
        """This worker's part of `total`; the parts of all workers add up to it."""
        return share(total, self.count, self.index)


def share(total: int, count: int, index: int) -> int:
    return total // count + (1 if index < total % count else 0)


def worker_socket(rundir: Path, index: int) -> Path:
    return rundir / f"worker-{index}.sock"


# -- talking to another worker -------------------------------------------------------------


class PeerError(Exception):
    """Another worker did not answer, or answered with an error."""


async def ask(path: Path, target: str, timeout: float | None = PEER_TIMEOUT) -> bytes:  # noqa: ASYNC109
    """GET `target` from the endpoint on Unix socket `path`; the body of a 200 answer."""
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_unix_connection(str(path))
            try:
                writer.write(
                    f"GET {target} HTTP/1.1\r\nHost: pgproxy\r\nConnection: close\r\n\r\n".encode()
                )
                data = await reader.read()  # the endpoint closes after its answer
            finally:
                writer.close()
    except TimeoutError:
        raise PeerError(f"no answer within {timeout:g} s") from None
    except (FileNotFoundError, ConnectionRefusedError):
        raise PeerError("not up (starting or restarting)") from None
    except OSError as exc:
        raise PeerError(exc.strerror or str(exc)) from None
    head, _, body = data.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].split(b" ", 2)
    if len(status_line) < 2 or not status_line[1].isdigit():
        raise PeerError("malformed answer")
    if int(status_line[1]) != HTTPStatus.OK:
        raise PeerError(body.decode("utf-8", "replace").strip() or f"status {status_line[1]!r}")
    return body


class Peers:
    """A worker's view of its siblings."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.forwarded_cancels = 0

    @property
    def others(self) -> list[int]:
        return [i for i in range(self.spec.count) if i != self.spec.index]

    async def ask(
        self,
        index: int,
        op: str,
        timeout: float | None = PEER_TIMEOUT,  # noqa: ASYNC109
        **args: Any,
    ) -> Any:
        query = "&".join(f"{k}={quote(str(v))}" for k, v in args.items() if v is not None)
        body = await ask(self.spec.socket_path(index), f"/peer/{op}?{query}", timeout)
        return json.loads(body)

    async def ask_others(
        self,
        op: str,
        timeout: float | None = PEER_TIMEOUT,  # noqa: ASYNC109
        **args: Any,
    ) -> list[tuple[int, Any]]:
        """Every other worker's answer; a PeerError instead of the answer of one that failed."""
        indexes = self.others
        answers = await asyncio.gather(
            *(self.ask(i, op, timeout, **args) for i in indexes), return_exceptions=True
        )
        out: list[tuple[int, Any]] = []
        for index, answer in zip(indexes, answers, strict=True):
            if isinstance(answer, BaseException) and not isinstance(answer, Exception):
                raise answer  # CancelledError: the asker was cancelled
            if isinstance(answer, Exception) and not isinstance(answer, PeerError):
                answer = PeerError(str(answer))
            out.append((index, answer))
        return out

    async def forward_cancel(self, pid: int, secret: int) -> None:
        """A CancelRequest for a client of another worker: hand it to that worker."""
        index = self.spec.owner(pid)
        self.forwarded_cancels += 1
        try:
            await self.ask(index, "cancel", pid=pid, secret=secret)
        except PeerError as exc:
            log.warning("cancel for worker %d not delivered: %s", index, exc)


class PeerEndpoint(MetricsEndpoint):
    """A worker's private endpoint: /metrics, /healthz, /readyz, and /peer/* for its siblings."""

    async def respond(self, request: Request) -> bytes:
        if not request.path.startswith("/peer/"):
            return await super().respond(request)
        args = {k: v[-1] for k, v in parse_qs(request.query).items()}
        try:
            answer = await self.peer_call(request.path.removeprefix("/peer/"), args)
        except (KeyError, ValueError) as exc:
            return response(HTTPStatus.BAD_REQUEST, f"bad request: {exc}\n".encode())
        return response(HTTPStatus.OK, json.dumps(answer).encode(), content_type="application/json")

    async def peer_call(self, op: str, args: dict[str, str]) -> Any:
        # Imported here: pgproxy.admin imports the proxy's modules, which import this one.
        from pgproxy import admin

        proxy = self.proxy
        database = args.get("database")
        match op:
            case "cancel":
                proxy.cancel(int(args["pid"]), int(args["secret"]), forwarded=True)
                return True
            case "show":
                return admin.local_table(proxy, args["item"])
            case "pause":
                return await admin.pause_until_quiet(proxy, database)
            case "resume":
                proxy.resume(database)
                return True
            case "kill":
                return proxy.kill_database(args["database"])
            case "kill_client":
                return proxy.kill_client(int(args["id"]))
            case "reload":
                return admin.reload_lines(proxy)
        raise KeyError(op)


# -- merging the workers' /metrics ---------------------------------------------------------


def merge_metrics(texts: Iterable[str]) -> list[Metric]:
    """The workers' scrapes as one: samples with the same name and labels summed (states and
    longest times: the maximum); families in the order first seen."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(
                    family.name, family.documentation, family.type, family.unit
                )
                values[family.name] = {}
            taking_max = family.name in _MAX_FAMILIES or family.name.startswith("pgproxy_pg_")
            samples = values[family.name]
            for sample in family.samples:
                key = (sample.name, tuple(sample.labels.items()))
                old = samples.get(key)
                if old is None:
                    samples[key] = sample.value
                elif taking_max:
                    samples[key] = max(old, sample.value)
                else:
                    samples[key] = old + sample.value
    for name, merged in families.items():
        for (sample_name, labels), value in values[name].items():
            merged.add_sample(sample_name, dict(labels), value)
    return list(families.values())


class _Families:
    def __init__(self, families: Sequence[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return self.families


def render(families: Sequence[Metric]) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families))
    return generate_latest(registry)


# -- the supervisor --------------------------------------------------------------------------


@dataclass(slots=True)
class _Worker:
    index: int
    process: asyncio.subprocess.Process | None = None
    started_at: float = 0.0
    restarts: int = 0
    delay: float = RESTART_DELAY


class SupervisorEndpoint(HttpEndpoint):
    """The supervisor's metrics_listen: the workers' answers, merged."""

    def __init__(self, supervisor: Supervisor, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.supervisor = supervisor

    async def respond(self, request: Request) -> bytes:
        sup = self.supervisor
        if request.path not in ("/metrics", "/healthz", "/readyz"):
            return response(HTTPStatus.NOT_FOUND, b"not found\n")
        answers = await asyncio.gather(
            *(ask(worker_socket(sup.rundir, w.index), request.path) for w in sup.workers),
            return_exceptions=True,
        )
        if request.path == "/metrics":
            texts = [a.decode() for a in answers if isinstance(a, bytes)]
            families = merge_metrics(texts)
            families.extend(sup.families(up=len(texts)))
            return response(HTTPStatus.OK, render(families), content_type=CONTENT_TYPE_PLAIN_0_0_4)
        failed = [
            f"worker {w.index}: {a}"
            for w, a in zip(sup.workers, answers, strict=True)
            if not isinstance(a, bytes)
        ]
        if request.path == "/healthz":
            # Alive while any worker serves; the supervisor restarts the others.
            if len(failed) == len(sup.workers):
                return response(HTTPStatus.SERVICE_UNAVAILABLE, ("\n".join(failed) + "\n").encode())
            return response(HTTPStatus.OK, b"ok\n")
        if sup.stopping:
            failed.insert(0, "draining: pgproxy is shutting down")
        if failed:
            return response(HTTPStatus.SERVICE_UNAVAILABLE, ("\n".join(failed) + "\n").encode())
        return response(HTTPStatus.OK, b"ok\n")


class Supervisor:
    """Starts, watches and stops the workers; serves the merged metrics."""

    def __init__(self, settings: Settings, argv: Sequence[str]) -> None:
        self.settings = settings
        self.argv = list(argv)
        self.workers = [_Worker(i) for i in range(settings.workers)]
        self.rundir = Path(tempfile.mkdtemp(prefix="pgproxy-"))
        self.stopping = False
        self.port = 0
        self._reservation: socket.socket | None = None
        self._changed = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._metrics_server: asyncio.Server | None = None

    def families(self, *, up: int) -> list[Metric]:
        restarts = CounterMetricFamily(
            "pgproxy_worker_restarts", "Workers restarted after they died."
        )
        restarts.add_metric([], sum(w.restarts for w in self.workers))
        return [
            GaugeMetricFamily("pgproxy_workers", "Worker processes configured.", len(self.workers)),
            GaugeMetricFamily("pgproxy_workers_up", "Workers that answered this scrape.", up),
            restarts,
        ]

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        try:
            self.port = self._reserve_port()
            metrics_listen = self.settings.metrics_listen
            if metrics_listen is not None:
                endpoint = SupervisorEndpoint(self, loop)
                self._metrics_server = await serve_endpoint(
                    endpoint, metrics_listen.host or None, metrics_listen.port
                )
                log.info(
                    "supervisor: metrics of all workers on port %d",
                    self._metrics_server.sockets[0].getsockname()[1],
                )
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._stop)
            loop.add_signal_handler(signal.SIGHUP, self._forward, signal.SIGHUP)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, CONTROL_SIGNALS)
            log.info(
                "supervisor (pid %d): %d workers on port %d",
                os.getpid(),
                len(self.workers),
                self.port,
            )
            watchers = [loop.create_task(self._keep(w)) for w in self.workers]
            codes = await asyncio.gather(*watchers)
            if EXIT_BAD_CONFIG in codes:
                return EXIT_BAD_CONFIG
            return 1 if any(codes) else 0
        finally:
            if self._metrics_server is not None:
                self._metrics_server.close()
            if self._reservation is not None:
                self._reservation.close()
            shutil.rmtree(self.rundir, ignore_errors=True)
            log.info("supervisor: stopped")

    def _reserve_port(self) -> int:
        """Bind (not listen) the port with SO_REUSEPORT: it is ours, even with port 0."""
        listen = self.settings.listen
        host = listen.host or "0.0.0.0"  # noqa: S104 - as the workers bind it
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, listen.port))
        self._reservation = sock
        return int(sock.getsockname()[1])

    def _stop(self) -> None:
        if self.stopping:
            log.warning("supervisor: second stop signal: workers close all connections now")
        else:
            log.info("supervisor: stop requested: workers drain")
        self.stopping = True
        self._forward(signal.SIGTERM)
        self._changed.set()

    def _forward(self, sig: int) -> None:
        for worker in self.workers:
            self._signal(worker, sig)

    def _signal(self, worker: _Worker, sig: int) -> None:
        process = worker.process
        if process is not None and process.returncode is None:
            if worker_socket(self.rundir, worker.index).exists():
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(sig)
            else:
                # Still starting: before it blocks the signal, a SIGTERM would kill it
                # (uvloop's spawn gives children an empty signal mask). Send it once it can
                # take it.
                task = asyncio.get_running_loop().create_task(self._when_up(worker, process, sig))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _when_up(
        self, worker: _Worker, process: asyncio.subprocess.Process, sig: int
    ) -> None:
        path = worker_socket(self.rundir, worker.index)
        # A file appearing has no event to wait on (short of inotify): poll.
        while process.returncode is None and not path.exists():  # noqa: ASYNC110
            await asyncio.sleep(SIGNAL_POLL)
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(sig)

    async def _keep(self, worker: _Worker) -> int:
        """Run one worker until the supervisor stops; 1 if it ended badly."""
        while True:
            if self.stopping:
                return 0
            spec = WorkerSpec(worker.index, len(self.workers), self.port, os.getpid(), self.rundir)
            env = dict(os.environ, **{WORKER_ENV: spec.encode()})
            worker.started_at = time.monotonic()
            # Its socket appears once it blocks the control signals (see _forward).
            worker_socket(self.rundir, worker.index).unlink(missing_ok=True)
            worker.process = await self._spawn(env)
            if self._stopped():  # the stop came while it was being spawned
                self._signal(worker, signal.SIGTERM)
            code = await self._wait(worker.process)
            if self._stopped():
                if code != 0:
                    log.error(
                        "supervisor: worker %d exited with %s while draining", worker.index, code
                    )
                return 0 if code == 0 else 1
            lived = time.monotonic() - worker.started_at
            if code == EXIT_BAD_CONFIG and lived < STABLE_AFTER:
                # The worker refused its settings (it said why): restarting cannot help.
                log.error("supervisor: worker %d cannot start; stopping", worker.index)
                self._stop()
                return EXIT_BAD_CONFIG
            worker.delay = (
                RESTART_DELAY if lived > STABLE_AFTER else min(worker.delay * 2, RESTART_DELAY_MAX)
            )
            log.error(
                "supervisor: worker %d (pid %d) died (%s) after %.1f s; restarting in %.1f s",
                worker.index,
                worker.process.pid,
                _exit_text(code),
                lived,
                worker.delay,
            )
            worker.restarts += 1
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(worker.delay):
                    await self._until_stopping()

    async def _spawn(self, env: dict[str, str]) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "pgproxy",
            *self.argv,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            # Its own session: a terminal's Ctrl-C reaches the supervisor only, which
            # forwards one SIGTERM (two would mean "close everything now").
            start_new_session=True,
        )

    def _stopped(self) -> bool:
        # A call, not the attribute: mypy would take it as still False after an await.
        return self.stopping

    async def _until_stopping(self) -> None:
        while not self.stopping:
            self._changed.clear()
            await self._changed.wait()

    async def _wait(self, process: asyncio.subprocess.Process) -> int:
        """The worker's exit code; killed when it outlives a drain by far."""
        waiting = asyncio.ensure_future(process.wait())
        while True:
            if self.stopping:
                limit = self.settings.shutdown_timeout + KILL_GRACE
                try:
                    async with asyncio.timeout(limit):
                        return await asyncio.shield(waiting)
                except TimeoutError:
                    log.error(
                        "supervisor: worker pid %d still running after %g s: killed",
                        process.pid,
                        limit,
                    )
                    with contextlib.suppress(ProcessLookupError):
                        process.kill()
                    return await waiting
            stop = asyncio.ensure_future(self._until_stopping())
            await asyncio.wait([waiting, stop], return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            if waiting.done():
                return waiting.result()


def _exit_text(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
        return f"signal {-code}"
    return f"exit code {code}"


def die_with_supervisor() -> None:
    """Ask Linux to SIGTERM this worker when the supervisor dies (even by SIGKILL)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def serve_workers(settings: Settings, argv: Sequence[str]) -> int:
    """Run the supervisor of `settings.workers` workers until it is stopped."""
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency, but optional at run time
        loop_factory = None
    signal.pthread_sigmask(signal.SIG_BLOCK, CONTROL_SIGNALS)  # until run() handles them
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(Supervisor(settings, argv).run())
