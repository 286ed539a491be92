"""`Proxy`: owns settings, pools, listeners and tasks; starts, drains and stops.

Every path that gives a server connection back goes through `checkin` (net/handoff.py: clean
→ pool or next waiter, otherwise close) or `_release_orphan` (its client left: roll back,
reset, or close). Coroutines here are control work only (server login, cancel, watchdog,
shutdown); the data path is the protocols' callbacks.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import resource
import secrets
import signal
import socket
import ssl
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from pgproxy import hotpath, memory
from pgproxy.admin import ADMIN_DATABASES, AdminSession, admin_welcome
from pgproxy.auth_query import AuthCache
from pgproxy.config import PoolMode, PoolPolicy, Settings, TlsMode
from pgproxy.core.cancel import CancelKeys
from pgproxy.core.client import ClientState
from pgproxy.core.login import (
    NO_TLS,
    Authenticated,
    AuthMethod,
    ClientLogin,
    TlsPolicy,
    UserAuth,
    user_auth_from_password,
)
from pgproxy.core.params import startup_settings
from pgproxy.core.pool import Pool, PoolKey
from pgproxy.core.server import ClientView, DisconnectReason
from pgproxy.core.server_login import ServerCredentials, ServerLogin
from pgproxy.core.watchdog import idle_servers_to_close
from pgproxy.errors import ConfigError, PgProxyError, ShutdownError, UnknownDatabaseError
from pgproxy.metrics import serve_endpoint, start_metrics_server
from pgproxy.monitor import ServerMonitor
from pgproxy.net.client_connection import ClientConnection
from pgproxy.net.connector import open_server, send_cancel
from pgproxy.net.flow import GateReason
from pgproxy.net.handoff import checkin
from pgproxy.net.server_connection import ServerConnection
from pgproxy.net.tls import client_context, server_context
from pgproxy.report import client_report
from pgproxy.wire import messages
from pgproxy.wire.codes import SqlState, TransactionStatus
from pgproxy.workers import (
    CONTROL_SIGNALS,
    PeerEndpoint,
    Peers,
    WorkerSpec,
    die_with_supervisor,
)

log = logging.getLogger("pgproxy")

# Open files kept for server connections, listeners and the rest when the open-file limit
# bounds the number of clients.
FD_RESERVE = 256
# The command line's exit code for a bad setting (pgproxy.cli.EXIT_BAD_CONFIG).
EXIT_BAD_CONFIG = 2
# A rollback or reset query after a client left should take milliseconds; past this the
# server is closed rather than waited for.
RESET_TIMEOUT = 10.0
CANCEL_TIMEOUT = 5.0
# Timeouts (query_wait_timeout, idle_transaction_timeout, ...) fire within this of their due.
WATCHDOG_INTERVAL = 0.5
# How long a stopping proxy waits for the sockets it closed to be gone.
CLOSE_WAIT = 2.0

ServerPool = Pool[ServerConnection, ClientConnection]

# Settings a RELOAD cannot change: they shape sockets, threads or every server's state.
RESTART_ONLY = frozenset(
    {
        "listen",
        "metrics_listen",
        "pool_mode",
        "max_prepared_statements",
        "monitor_interval",
        "workers",
        "unix_socket_dir",
        "unix_socket_mode",
    }
)


@dataclass(frozen=True, slots=True)
class PoolTarget:
    """Where the servers of a pool connect to."""

    dbname: str
    address: tuple[str, int]


class Proxy:
    def __init__(
        self,
        settings: Settings,
        reload: Callable[[], Settings] | None = None,
        worker: WorkerSpec | None = None,
    ) -> None:
        self.settings = settings
        # One of several processes on the port (workers > 1): pool sizes and max_client_conn
        # are shared out, ids are numbered with a stride, siblings are reached over `peers`.
        self.worker = worker
        self.peers = Peers(worker) if worker is not None else None
        # Reads the settings again from where they came from (flags, environment, file).
        self._reload_settings = reload
        self.releases_after_transaction = settings.pool_mode == PoolMode.TRANSACTION
        # Named prepared statements get the proxy's names, so that any server can run them.
        self.maps_statements = (
            self.releases_after_transaction and settings.max_prepared_statements > 0
        )
        self.users: dict[str, UserAuth] = {
            u.name: user_auth_from_password(u.name, u.password) for u in settings.users
        }
        self.pools: dict[PoolKey, ServerPool] = {}
        self.clients: set[ClientConnection] = set()
        self.servers: set[ServerConnection] = set()
        first, step = (worker.index + 1, worker.count) if worker is not None else (1, 1)
        self.cancel_keys: CancelKeys[ClientConnection] = CancelKeys(
            lambda: secrets.randbits(32), first=first, step=step
        )
        # SIGTERM seen: /readyz fails; new clients are still served for shutdown_grace_period.
        self.stopping = False
        # The drain itself: no new clients, linked ones finish, then everything closes.
        self.draining = False
        self.login_failures = 0
        self.pins_total = 0
        self._ids = itertools.count(first, step)
        self._welcome_waiters: dict[PoolKey, list[tuple[ClientConnection, bytes]]] = {}
        # SCRAM ClientKey per user, recovered from a client login, for pass-through to Postgres.
        self._client_keys: dict[str, bytes] = {}
        self._close_reasons: dict[ClientConnection, tuple[DisconnectReason, str]] = {}
        # Clients holding a server in an open transaction with nothing running, and since when.
        self.idle_in_transaction: dict[ClientConnection, float] = {}
        self._mock_seed = secrets.token_bytes(32)
        self._tasks: set[asyncio.Task[None]] = set()
        self._listener: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._force: asyncio.Event | None = None
        self._no_clients: asyncio.Event | None = None
        self.listen_port = 0
        # Server connections closed by us whose connection_lost has not come yet.
        self._closing: set[ServerConnection] = set()
        # PAUSE: every pool (paused_all) or those of some databases hand out no server.
        self.paused_all = False
        self.paused_databases: set[str] = set()
        self.policies: dict[PoolKey, PoolPolicy] = {}
        self.started_at = 0.0  # loop time of start()
        # /metrics, /healthz, /readyz (metrics_listen) and the pg_stat_activity reader.
        self._metrics_server: asyncio.Server | None = None
        self.metrics_port = 0
        self.monitor: ServerMonitor | None = None
        self._peer_server: asyncio.Server | None = None
        # Clients the open-file limit leaves room for (set at start): past it new clients get
        # 53300 rather than an accept() that fails with EMFILE and a bare close.
        self.fd_client_cap = 1 << 62
        self._unix_listener: asyncio.Server | None = None
        self.unix_socket_path: str | None = None
        self.client_tls: ssl.SSLContext | None = None
        self.server_tls: ssl.SSLContext | None = None
        self.tls_policy = NO_TLS
        self._load_tls(settings)
        self.check_delay = _check_delay(settings)
        # Read at every checkin: an attribute of its own, kept in step by reload.
        self.server_lifetime = settings.server_lifetime
        # Users looked up in Postgres (auth_user + auth_query).
        self.auth_cache = AuthCache(lambda: self.settings, lambda: self.server_tls)

    def _load_tls(self, settings: Settings) -> None:
        """The TLS contexts of `settings`; raises ConfigError (and changes nothing) if a
        certificate or key does not load."""
        client = client_context(settings)
        server = server_context(settings)
        mode = settings.client_tls_sslmode
        self.client_tls = client
        self.server_tls = server
        self.tls_policy = TlsPolicy(
            offered=client is not None,
            required=mode.requires,
            cert_names_user=mode is TlsMode.VERIFY_FULL,
        )

    def share(self, total: int) -> int:
        """This process's part of a pool size or client limit (all of it with one worker)."""
        return total if self.worker is None else self.worker.share(total)

    @property
    def max_clients(self) -> int:
        return self.share(self.settings.max_client_conn)

    def client_limit_text(self) -> str:
        """Why a client over the limit is refused, for its 53300 error."""
        if len(self.clients) >= self.fd_client_cap:
            return f"the proxy's open-file limit allows {self.fd_client_cap} clients"
        return f"max_client_conn {self.settings.max_client_conn}"

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.fd_client_cap = _file_budget(self.max_clients)
        self._loop = loop
        self.started_at = self.now()
        self._stop = asyncio.Event()
        self._force = asyncio.Event()
        self._no_clients = asyncio.Event()
        listen = self.settings.listen
        host: str | None = listen.host or None
        worker = self.worker
        port = listen.port if worker is None else worker.port
        try:
            self._listener = await loop.create_server(
                lambda: ClientConnection(self),
                host,
                port,
                reuse_address=True,
                reuse_port=worker is not None,
                backlog=4096,
            )
        except OSError as exc:
            raise ConfigError(
                "listen", f"{listen.host or '*'}:{port}: {exc.strerror or exc}"
            ) from None
        sock = self._listener.sockets[0]
        self.listen_port = int(sock.getsockname()[1])
        if self.settings.unix_socket_dir and (worker is None or worker.index == 0):
            # One path, one listener: with workers, worker 0 serves the socket.
            self._unix_listener = await self._listen_unix(self.settings.unix_socket_dir)
        metrics_listen = self.settings.metrics_listen
        if worker is not None:
            # The supervisor serves metrics_listen; siblings and it meet here.
            path = worker.socket_path(worker.index)
            path.unlink(missing_ok=True)  # left by a worker that died
            self._peer_server = await serve_endpoint(
                PeerEndpoint(self, loop), None, unix_path=str(path)
            )
        elif metrics_listen is not None:
            self._metrics_server = await start_metrics_server(
                self, metrics_listen.host or None, metrics_listen.port
            )
            self.metrics_port = int(self._metrics_server.sockets[0].getsockname()[1])
        if self.settings.monitor_interval > 0 and (worker is None or worker.index == 0):
            self.monitor = ServerMonitor(self.settings, self.server_tls)
            self.monitor.start()
        self._spawn(self._watchdog())
        if (
            not self.users
            and not self.settings.auth_user
            and self.settings.auth_type.value != "trust"
        ):
            log.warning("no users configured: every login will fail (see --user)")
        log.info(
            "%slistening on %s:%d, server %s:%d, pool_mode=%s, default_pool_size=%d",
            "" if worker is None else f"worker {worker.index} (pid {os.getpid()}): ",
            listen.host or "*",
            self.listen_port,
            self.settings.server.host,
            self.settings.server.port,
            self.settings.pool_mode.value,
            self.settings.default_pool_size,
        )
        if worker is None or worker.index == 0:
            log.info("%s", memory.describe(memory.allocator()))
            log.info("%s", hotpath.describe())
            for name in hotpath.stale():
                log.warning("%s is compiled from an older %s.py: run `make compile`", name, name)

    async def _listen_unix(self, directory: str) -> asyncio.Server:
        """Listen on DIR/.s.PGSQL.<port>; a stale socket file is replaced, a live one is not."""
        path = os.path.join(directory, f".s.PGSQL.{self.listen_port}")
        _remove_stale_socket(path)
        assert self._loop is not None
        try:
            server = await self._loop.create_unix_server(lambda: ClientConnection(self), path)
        except OSError as exc:
            raise ConfigError("unix_socket_dir", f"{path}: {exc.strerror or exc}") from None
        os.chmod(path, int(self.settings.unix_socket_mode, 8))
        self.unix_socket_path = path
        log.info("listening on Unix socket %s", path)
        return server

    async def run(self) -> int:
        """Serve until SIGTERM/SIGINT, then drain; a second signal stops at once."""
        await self.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self._reload_on_signal)
        # Blocked by serve() (or, in a worker, from its birth): one that came while starting
        # is handled now instead of killing the process.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, CONTROL_SIGNALS)
        assert self._stop is not None and self._force is not None
        await self._stop.wait()
        grace = self.settings.shutdown_grace_period
        if grace > 0 and not self._force.is_set():
            log.info(
                "stop requested: /readyz fails; still serving new clients for %g s "
                "(shutdown_grace_period)",
                grace,
            )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    await self._force.wait()  # a second signal ends the grace at once
        log.info("stop requested: no new clients; waiting for linked clients to finish")
        await self.drain()
        return 0

    def request_stop(self) -> None:
        assert self._stop is not None and self._force is not None
        if self._stop.is_set():
            log.warning("second stop signal: closing all connections now")
            self._force.set()
            return
        self.stopping = True
        self._stop.set()

    def request_shutdown(self) -> None:
        """SHUTDOWN from the console: this process, or with workers the supervisor (which
        drains them all)."""
        if self.worker is not None:
            log.info("asking the supervisor (pid %d) to stop", self.worker.supervisor_pid)
            os.kill(self.worker.supervisor_pid, signal.SIGTERM)
        else:
            self.request_stop()

    async def drain(self) -> None:
        """Stop accepting, let linked clients finish their transaction, then close all."""
        assert self._force is not None and self._no_clients is not None
        self.stopping = True
        self.draining = True
        if self._listener is not None:
            self._listener.close()
        if self._unix_listener is not None:
            self._unix_listener.close()
            if self.unix_socket_path is not None:
                with contextlib.suppress(OSError):
                    os.unlink(self.unix_socket_path)
        for pool in self.pools.values():
            pool.waiters.clear()
        for client in list(self.clients):
            if client.server is None:
                client.fail(self.shutdown_error(), reason=DisconnectReason.SHUTDOWN)
        if self.clients:
            self._no_clients.clear()
            waits = [
                asyncio.ensure_future(self._no_clients.wait()),
                asyncio.ensure_future(self._force.wait()),
            ]
            _done, pending = await asyncio.wait(
                waits,
                timeout=self.settings.shutdown_timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
            for fut in pending:
                fut.cancel()
        for client in list(self.clients):
            client.fail(self.shutdown_error(), reason=DisconnectReason.SHUTDOWN)
        for server in list(self.servers):
            self.close_server(server, DisconnectReason.SHUTDOWN)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLOSE_WAIT):
                await self._until_all_gone()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._listener is not None:
            await self._listener.wait_closed()
        self.auth_cache.close()
        if self.monitor is not None:
            self.monitor.stop()
        for endpoint in (self._metrics_server, self._peer_server):
            if endpoint is not None:
                endpoint.close()
                await endpoint.wait_closed()
        log.info("stopped")

    async def _until_all_gone(self) -> None:
        """Wait for closed connections to report connection_lost before the loop ends."""
        assert self._no_clients is not None
        while self.clients or self._closing:
            self._no_clients.clear()
            if self.clients or self._closing:
                await self._no_clients.wait()

    def shutdown_error(self) -> PgProxyError:
        return ShutdownError("pgproxy is shutting down")

    # -- small services the connections use --------------------------------------------------

    def now(self) -> float:
        """Monotonic seconds. Not loop.time(): uvloop's ticks in milliseconds, once per loop
        iteration, which would time every sub-millisecond query as 0."""
        return time.monotonic()

    def next_id(self) -> int:
        return next(self._ids)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a control coroutine (a TLS handshake, ...); cancelled when the proxy stops."""
        self._spawn(coro)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        assert self._loop is not None
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def new_client_login(self) -> ClientLogin:
        method = AuthMethod(self.settings.auth_type.value)
        users = self.users
        cache = self.auth_cache if self.settings.auth_user else None

        def lookup(name: str) -> UserAuth | None:
            auth = users.get(name)
            if auth is None and cache is not None:
                auth = cache.get(name)
            if auth is None and method is AuthMethod.TRUST:
                return UserAuth(name=name, password=None, scram=None, md5=None)
            return auth

        def needs_lookup(name: str) -> bool:
            return cache is not None and name not in users and not cache.fresh(name)

        return ClientLogin(
            auth_method=method,
            lookup_user=lookup,
            random_bytes=secrets.token_bytes,
            mock_seed=self._mock_seed,
            tls=self.tls_policy,
            needs_lookup=needs_lookup if cache is not None else None,
        )

    def count_login_failure(self, database: str | None = None, user: str | None = None) -> None:
        """Every failed login counts here; also in its pool's stats when that pool exists."""
        self.login_failures += 1
        if database and user:
            pool = self.pools.get(PoolKey(database, user))
            if pool is not None:
                pool.stats.login_failures += 1

    # -- clients -----------------------------------------------------------------------------

    def client_connected(self, client: ClientConnection) -> bool:
        """Register a new client; False when it is over `max_client_conn`."""
        count = len(self.clients)
        if self.draining or count >= self.max_clients or count >= self.fd_client_cap:
            self._close_reasons[client] = (DisconnectReason.TOO_MANY_CLIENTS, "")
            return False
        self.clients.add(client)
        return True

    def client_authenticated(self, client: ClientConnection, event: Authenticated) -> None:
        if event.database in ADMIN_DATABASES and event.database not in self.settings.databases:
            self._admin_login(client, event)
            return
        target = self._resolve(event.database)
        if target is None:
            raise UnknownDatabaseError(f'database "{event.database}" does not exist')
        wanted = startup_settings(event.params)
        if event.client_key is not None:
            self._client_keys[event.user] = event.client_key
        key = PoolKey(event.database, event.user)
        pool = self.pools.get(key)
        if pool is None:
            policy = self.settings.policy(event.database, event.user)
            size = self.share(policy.pool_size)
            pool = Pool(
                key=key, size=size, min_size=min(self.share(self.settings.min_pool_size), size)
            )
            pool.paused = self.is_paused(event.database)
            self.pools[key] = pool
            self.policies[key] = policy
            pool.target = target
        state = ClientState(
            id=client.id,
            user=event.user,
            database=event.database,
            connected_at=self.now(),
            view=ClientView(wanted, {}),
            track_statements=self.settings.track_statement_text,
        )
        client.pool = pool
        client.stats = pool.stats
        pool.stats.logins += 1
        client.start_session(state, self.cancel_keys.allocate(client))
        log.info(
            "%r login: user=%s database=%s application_name=%s from %s",
            client,
            event.user,
            event.database,
            client.application_name or "-",
            client.address,
        )
        if pool.welcome is not None:
            client.finish_login(pool.welcome, event.leftover)
            return
        # The first client of a pool waits for a server: its parameters are what we tell
        # clients at login (server_version, server_encoding, ...).
        assert client.gate is not None
        client.gate.add(GateReason.WAITING_FOR_SERVER)
        self._welcome_waiters.setdefault(key, []).append((client, event.leftover))
        if pool.connecting == 0:
            self._launch(pool, 1)

    def _admin_login(self, client: ClientConnection, event: Authenticated) -> None:
        """A client of the virtual database: the admin console, for admin and stats users."""
        settings = self.settings
        may_modify = event.user in settings.admin_users
        if not may_modify and event.user not in settings.stats_users:
            raise PgProxyError(
                f'user "{event.user}" may not use the admin console '
                "(it is in neither admin_users nor stats_users)",
                sqlstate=SqlState.INVALID_AUTHORIZATION_SPECIFICATION,
            )
        state = ClientState(
            id=client.id,
            user=event.user,
            database=event.database,
            connected_at=self.now(),
            view=ClientView(startup_settings(event.params), {}),
        )
        client.start_session(state, self.cancel_keys.allocate(client))
        client.admin = AdminSession(
            self,
            event.user,
            may_modify=may_modify,
            write=client.write,
            close=client.close_admin_session,
        )
        log.info(
            "%r admin console login: user=%s (%s) from %s",
            client,
            event.user,
            "admin" if may_modify else "stats only",
            client.address,
        )
        client.finish_login(admin_welcome(), event.leftover)

    def _resolve(self, database: str) -> PoolTarget | None:
        settings = self.settings
        upstream = settings.server
        entry = settings.databases.get(database)
        if entry is not None:
            return PoolTarget(
                dbname=entry.dbname or database,
                address=(entry.host or upstream.host, entry.port or upstream.port),
            )
        if settings.databases and not upstream.dbname:
            return None
        return PoolTarget(
            dbname=upstream.dbname or database, address=(upstream.host, upstream.port)
        )

    def check_server(self, server: ServerConnection, now: float) -> None:
        """Run server_check_query on a server idle for server_check_delay; finish_reset
        hands it on (to the waiting client) if it answers, else closes it."""
        st = server.state
        assert st is not None
        server.pool.start_reset(server)
        server.reset_started_at = now
        server.resets_session = False
        server.checking = True
        server.write(st.send_proxy_query(self.settings.server_check_query))

    def note_client_close_reason(
        self, client: ClientConnection, reason: DisconnectReason, detail: str
    ) -> None:
        self._close_reasons.setdefault(client, (reason, detail))

    def client_lost(self, client: ClientConnection) -> None:
        reason, detail = self._close_reasons.pop(client, (DisconnectReason.CLIENT_CLOSE, ""))
        if client not in self.clients:
            return  # refused over max_client_conn: never registered
        self.clients.discard(client)
        self.idle_in_transaction.pop(client, None)
        if client.admin is not None:
            client.admin.connection_lost()
        if client.cancel_key is not None:
            self.cancel_keys.release(client.cancel_key[0])
        pool = client.pool
        state = client.state
        if pool is not None:
            pool.cancel_wait(client)
            waiters = self._welcome_waiters.get(pool.key)
            if waiters:
                waiters[:] = [w for w in waiters if w[0] is not client]
        if pool is not None:
            pool.stats.count_disconnect(reason.value)
        server = client.unlink()
        if server is not None and state is not None:
            self._release_orphan(server, client_at_boundary=state.at_boundary)
        if state is not None or reason is not DisconnectReason.CLIENT_CLOSE:
            log.info(
                "%r disconnected (%s%s) user=%s database=%s from %s after %.1f s",
                client,
                reason.value,
                f": {detail}" if detail else "",
                state.user if state else "-",
                state.database if state else "-",
                client.address,
                self.now() - state.connected_at if state else 0.0,
            )
        if self.draining and not self.clients and self._no_clients is not None:
            self._no_clients.set()

    def cancel(self, pid: int, secret: int, *, forwarded: bool = False) -> None:
        """A CancelRequest with a key we handed out: cancel on the client's current server.

        A key of another worker's client goes to that worker (once: a forwarded one that is
        not ours is stale)."""
        worker = self.worker
        if worker is not None and worker.owner(pid) != worker.index:
            if not forwarded and self.peers is not None:
                self._spawn(self.peers.forward_cancel(pid, secret))
            return
        client = self.cancel_keys.lookup(pid, secret)
        if client is None:
            return
        if client.admin is not None:
            client.admin.cancel()  # Ctrl-C on a PAUSE that waits
            return
        server = client.server
        if server is None or server.state is None or server.state.backend_key is None:
            return  # nothing runs for this client now
        server.cancels_in_flight += 1
        self._spawn(self._cancel(server, server.state.backend_key))

    async def _cancel(self, server: ServerConnection, key: tuple[int, int]) -> None:
        # Postgres signals the backend twice (process and process group) before it closes the
        # cancel connection; a query started in between would be cancelled too. So the server
        # goes to nobody else until the cancel connection is closed (PgBouncer issue #717).
        try:
            await send_cancel(server.address, key, CANCEL_TIMEOUT)
        finally:
            server.cancels_in_flight -= 1
            if not server.cancels_in_flight and server.checkin_deferred:
                server.checkin_deferred = False
                checkin(self, server)

    # -- servers -----------------------------------------------------------------------------

    def replenish(self, pool: ServerPool) -> None:
        need = pool.launches_needed()
        if need and not self.draining:
            self._launch(pool, need)

    def _launch(self, pool: ServerPool, count: int) -> None:
        for _ in range(count):
            pool.connecting += 1
            self._spawn(self._open_server(pool))

    async def _open_server(self, pool: ServerPool) -> None:
        target = pool.target
        assert isinstance(target, PoolTarget)  # a Pool in core/ does not know the type
        login = ServerLogin(
            database=target.dbname, credentials=self._credentials(pool.key.user), params={}
        )
        try:
            conn = await open_server(
                self,
                pool,
                login,
                self.next_id(),
                target.address,
                self.settings.server_connect_timeout,
            )
        except PgProxyError as exc:
            pool.connecting -= 1
            self._connect_failed(pool, exc)
            return
        except BaseException:
            pool.connecting -= 1
            raise
        assert conn.state is not None
        conn.target = target
        self.servers.add(conn)
        log.info(
            "%r connected to %s:%d for pool %s (backend pid %s)",
            conn,
            target.address[0],
            target.address[1],
            pool.key,
            conn.state.backend_key[0] if conn.state.backend_key else "?",
        )
        if pool.welcome is None:
            pool.welcome = dict(conn.state.params)
            for client, leftover in self._welcome_waiters.pop(pool.key, []):
                if not client.closed:
                    client.finish_login(pool.welcome, leftover)
        if self.draining:
            pool.connecting -= 1
            self.close_server(conn, DisconnectReason.SHUTDOWN)
            return
        waiter = pool.add_connected(conn, self.now())
        if waiter is not None:
            waiter.link(conn)
        self.replenish(pool)  # min_pool_size, now that the pool is known to work

    def _credentials(self, user: str) -> ServerCredentials:
        upstream = self.settings.server
        if upstream.user:
            return ServerCredentials(user=upstream.user, password=upstream.password)
        auth = self.users.get(user) or self.auth_cache.known(user)
        if auth is None:
            return ServerCredentials(user=user)
        return ServerCredentials(
            user=user,
            password=auth.password,
            md5=auth.md5,
            scram=auth.scram if auth.password is None else None,
            client_key=self._client_keys.get(user),
        )

    def _connect_failed(self, pool: ServerPool, exc: PgProxyError) -> None:
        log.warning("pool %s: %s", pool.key, exc.message)
        if pool.total > 0:
            return  # the servers it has will serve the waiters (or query_wait_timeout will)
        waiting = list(pool.waiters)
        pool.waiters.clear()
        waiting.extend(c for c, _ in self._welcome_waiters.pop(pool.key, []))
        for client in waiting:
            client.fail(exc, reason=DisconnectReason.CONNECT_FAILED)

    def _release_orphan(self, server: ServerConnection, *, client_at_boundary: bool) -> None:
        """The client of `server` left. Roll back and reset it, or close it."""
        st = server.state
        assert st is not None
        if (
            not client_at_boundary
            or st.queue
            or st.copy_in
            or not st.scanner.at_boundary
            or st.segment != 0
            or st.unpredictable
            or st.fatal
        ):
            # Mid-query, mid-COPY or mid-message: the only certain way out is to close. A
            # cancel first, because a backend busy in a query notices a closed socket late.
            if st.queue and not st.copy_in and st.backend_key is not None:
                self._spawn(send_cancel(server.address, st.backend_key, CANCEL_TIMEOUT))
            self.close_server(server, DisconnectReason.CLIENT_GONE_MID_QUERY)
            return
        queries = []
        if st.transaction_status != TransactionStatus.IDLE:
            queries.append("ROLLBACK")
        reset = self.settings.server_reset_query
        server.resets_session = False
        if not self.releases_after_transaction or st.pinned is not None:
            if not reset:
                self.close_server(server, DisconnectReason.DIRTY)
                return
            queries.append(reset)
            server.resets_session = True
        if not queries:
            checkin(self, server)
            return
        server.pool.start_reset(server)
        server.reset_started_at = self.now()
        server.write(b"".join(st.send_proxy_query(q) for q in queries))

    def finish_reset(self, server: ServerConnection) -> None:
        st = server.state
        assert st is not None
        server.reset_started_at = None
        if st.proxy_error is not None or not st.is_idle:
            reason = (
                DisconnectReason.CHECK_FAILED if server.checking else DisconnectReason.RESET_FAILED
            )
            self.close_server(server, reason)
            return
        server.checking = False
        if server.resets_session:
            st.pinned = None
            reset = self.settings.server_reset_query.upper()
            if "DISCARD ALL" in reset or "RESET ALL" in reset:
                st.applied.clear()
            if "DISCARD ALL" in reset or "DEALLOCATE ALL" in reset:
                st.statements.clear()
        checkin(self, server)

    def close_server(self, server: ServerConnection, reason: DisconnectReason) -> None:
        if server.closed:
            return
        pool = server.pool
        pool.remove(server)
        self.servers.discard(server)
        log.info("%r closed (%s)", server, reason.value)
        client = server.client
        if server.transport is not None and not server.transport.is_closing():
            self._closing.add(server)
        server.close()
        if client is not None:
            mid_message = client.mid_message
            client.unlink()
            if not client.closed:
                client.fail(
                    PgProxyError(f"server connection closed ({reason.value})", sqlstate="08006"),
                    reason=DisconnectReason.SERVER_CLOSE,
                    mid_message=mid_message,
                )
        self.replenish(pool)

    def server_lost(self, server: ServerConnection) -> None:
        if server in self._closing:
            self._closing.discard(server)
            if self.draining and self._no_clients is not None:
                self._no_clients.set()
        if server not in self.servers:
            return  # never logged in, or already closed by us
        self.servers.discard(server)
        server.closed = True
        pool = server.pool
        pool.remove(server)
        st = server.state
        reason = DisconnectReason.SERVER_FATAL if st and st.fatal else DisconnectReason.SERVER_CLOSE
        log.info("%r lost (%s)", server, reason.value)
        client = server.client
        if client is not None:
            mid_message = client.mid_message
            client.unlink()
            if (
                reason is DisconnectReason.SERVER_FATAL
                and st is not None
                and st.proxy_error is None
            ):
                # The server's own FATAL already reached the client (it was not one the proxy
                # kept from it): it says why, once.
                client.close(DisconnectReason.SERVER_FATAL)
            else:
                client.fail(
                    PgProxyError("server connection lost", sqlstate="08006"),
                    reason=DisconnectReason.SERVER_CLOSE,
                    mid_message=mid_message,
                )
        self.replenish(pool)

    # -- admin commands ----------------------------------------------------------------------

    def is_paused(self, database: str) -> bool:
        return self.paused_all or database in self.paused_databases

    def pause(self, database: str | None = None) -> None:
        """PAUSE: pools (of `database`, or all) hand out no server until `resume`."""
        if database is None:
            self.paused_all = True
        else:
            self.paused_databases.add(database)
        for key, pool in self.pools.items():
            if database is None or key.database == database:
                pool.paused = True

    def resume(self, database: str | None = None) -> None:
        """RESUME: waiting clients get servers again."""
        if database is None:
            self.paused_all = False
            self.paused_databases.clear()
        else:
            self.paused_databases.discard(database)
        now = self.now()
        for key, pool in self.pools.items():
            if not pool.paused or self.is_paused(key.database):
                continue
            pool.paused = False
            while pool.waiters and pool.idle:
                server, _since = pool.idle.popitem()
                waiter = pool.checkin(server, now)
                if waiter is not None:
                    waiter.link(server)
            self.replenish(pool)

    def paused_and_quiet(self, database: str | None = None) -> bool:
        """Paused, and no server of those pools is in use any more (PAUSE is complete)."""
        return all(
            pool.paused and not pool.active and not pool.resetting and not pool.connecting
            for key, pool in self.pools.items()
            if database is None or key.database == database
        )

    def kill_database(self, database: str) -> int:
        """KILL: pause the database, close its clients and servers; the number of clients."""
        self.pause(database)
        killed = [c for c in self.clients if c.pool is not None and c.pool.key.database == database]
        error = PgProxyError(
            f'database "{database}" was killed from the admin console', sqlstate="57P01"
        )
        for client in killed:
            client.fail(error, reason=DisconnectReason.ADMIN_KILL)
        for key, pool in self.pools.items():
            if key.database == database:
                for server, _since in pool.idle_servers():
                    self.close_server(server, DisconnectReason.ADMIN_KILL)
        return len(killed)

    def kill_client(self, client_id: int) -> bool:
        """KILL_CLIENT: close one client (its server is rolled back or closed as usual)."""
        for client in self.clients:
            if client.id == client_id and client.admin is None:
                client.fail(
                    PgProxyError(
                        "terminating connection: killed from the admin console", sqlstate="57P01"
                    ),
                    reason=DisconnectReason.ADMIN_KILL,
                )
                return True
        return False

    def _reload_on_signal(self) -> None:
        try:
            self.reload()
        except ConfigError as exc:
            log.error("reload failed, settings unchanged: %s: %s", exc.setting, exc.problem)

    def reload(self) -> list[str]:
        """RELOAD / SIGHUP: read the settings again and apply what can change while running.

        Returns one line per changed setting. Settings that need a restart keep their old
        value (and say so). Raises ConfigError, changing nothing, on a bad configuration.
        """
        if self._reload_settings is None:
            raise ConfigError("config", "this proxy was not started from a configuration")
        new = self._reload_settings()
        old = self.settings
        # Certificates are read again even when their paths did not change (renewed in
        # place); one that does not load fails the RELOAD before anything is applied.
        self._load_tls(new)
        lines = []
        kept: dict[str, object] = {}
        for name in Settings.model_fields:
            before, after = getattr(old, name), getattr(new, name)
            if before == after:
                continue
            if name in RESTART_ONLY:
                kept[name] = before
                lines.append(f"{name}: changed in the configuration, needs a restart")
            elif name == "users":
                lines.append(f"{name}: {', '.join(u.name for u in after) or '(none)'}")
            else:
                lines.append(f"{name}: {before} -> {after}")
        if not lines:
            # Said anyway: after a certificate renewal the operator looks for this line.
            files = (new.client_tls_cert_file, new.client_tls_ca_file, new.server_tls_cert_file,
                     new.server_tls_ca_file)  # fmt: skip
            certs = "; TLS certificates read again" if any(files) else ""
            log.info("reload: no setting changed%s", certs)
            return []
        self.settings = new.model_copy(update=kept) if kept else new
        self.check_delay = _check_delay(self.settings)
        self.server_lifetime = self.settings.server_lifetime
        self.users = {
            u.name: user_auth_from_password(u.name, u.password) for u in self.settings.users
        }
        logging.getLogger("pgproxy").setLevel(self.settings.log_level.upper())
        self.policies.clear()
        for key, pool in self.pools.items():
            policy = self.policy(pool)
            pool.size = self.share(policy.pool_size)
            pool.min_size = min(self.share(self.settings.min_pool_size), pool.size)
            # Smaller: idle servers over the size go now, busy ones at checkin.
            excess = pool.total - pool.size
            for server, _since in list(pool.idle_servers())[: max(excess, 0)]:
                self.close_server(server, DisconnectReason.CONFIG_CHANGED)
            target = self._resolve(key.database)
            if target is not None and target != pool.target:
                # Servers of the old target go: the idle ones now, the others at checkin.
                pool.target = target
                for server, _since in pool.idle_servers():
                    self.close_server(server, DisconnectReason.CONFIG_CHANGED)
            self.replenish(pool)
        for line in lines:
            log.info("reload: %s", line)
        return lines

    # -- maintenance -------------------------------------------------------------------------

    async def _watchdog(self) -> None:
        while True:
            await asyncio.sleep(WATCHDOG_INTERVAL)
            try:
                self.tick(self.now())
            except Exception:
                log.exception("watchdog tick failed")

    def tick(self, now: float) -> None:
        self._watch_idle_in_transaction(now)
        self._watch_linked(now)
        self._watch_idle_clients(now)
        settings = self.settings
        notify = settings.query_wait_notify
        for pool in list(self.pools.values()):
            policy = self.policy(pool)
            for client in pool.expired_waiters(now, policy.query_wait_timeout):
                client.fail(
                    PgProxyError(
                        f"query_wait_timeout: no server connection for pool {pool.key} "
                        f"within {policy.query_wait_timeout:g} s",
                        sqlstate=SqlState.QUERY_CANCELED,
                    ),
                    reason=DisconnectReason.WAIT_TIMEOUT,
                )
            if notify > 0:
                for client, since in pool.waiters.items():
                    if now - since < notify:
                        break  # FIFO: the rest waited less
                    if client.notices.get("wait") != since:
                        client.notices["wait"] = since
                        client.write(
                            messages.notice_response(
                                "NOTICE",
                                SqlState.SUCCESSFUL_COMPLETION,
                                f"pgproxy: waiting for a server connection of pool {pool.key}: "
                                f"all {pool.size} are in use"
                                + (" (the pool is paused)" if pool.paused else ""),
                            )
                        )
            idle = [
                (server, since, server.state.created_at)
                for server, since in pool.idle_servers()
                if server.state is not None
            ]
            for server, reason in idle_servers_to_close(
                idle,
                now=now,
                keep=pool.min_size,
                idle_timeout=settings.server_idle_timeout,
                lifetime=settings.server_lifetime,
            ):
                self.close_server(server, reason)
            for server in list(pool.resetting):
                started = server.reset_started_at
                if started is not None and now - started > RESET_TIMEOUT:
                    self.close_server(
                        server,
                        DisconnectReason.CHECK_FAILED
                        if server.checking
                        else DisconnectReason.RESET_FAILED,
                    )
            if pool.welcome is not None:
                self.replenish(pool)

    def policy(self, pool: ServerPool) -> PoolPolicy:
        policy = self.policies.get(pool.key)
        if policy is None:
            policy = self.policies[pool.key] = self.settings.policy(
                pool.key.database, pool.key.user
            )
        return policy

    def _watch_idle_in_transaction(self, now: float) -> None:
        """Warn once about a client idle in a transaction; past the timeout, disconnect it."""
        warn = self.settings.idle_transaction_warn
        for client, since in list(self.idle_in_transaction.items()):
            pool = client.pool
            if pool is None:
                continue
            idle = now - since
            limit = self.policy(pool).idle_transaction_timeout
            if limit > 0 and idle >= limit:
                # Its server is rolled back and pooled again by client_lost.
                client.fail(
                    PgProxyError(
                        "terminating connection due to idle-in-transaction timeout "
                        f"(idle_transaction_timeout {limit:g} s)",
                        sqlstate=SqlState.IDLE_IN_TRANSACTION_TIMEOUT,
                    ),
                    reason=DisconnectReason.IDLE_TRANSACTION_TIMEOUT,
                )
            elif warn > 0 and idle >= warn and client.notices.get("idle") != since:
                client.notices["idle"] = since
                self._log_offender(client, now, f"idle in transaction for {idle:.0f} s")

    def _log_offender(self, client: ClientConnection, now: float, what: str) -> None:
        """One line naming a client that holds a server: who, from where, doing what."""
        report = client_report(client, now)
        log.warning(
            "%r %s: user=%s database=%s application_name=%s from %s, holding server %s "
            "for %.0f s; last statement: %s",
            client,
            what,
            report.user,
            report.database,
            report.application_name or "-",
            report.address,
            f"S-{report.server_id}" if report.server_id is not None else "-",
            report.holding_for or 0.0,
            report.last_statement
            if report.last_statement is not None
            else ("(not tracked)" if not self.settings.track_statement_text else "-"),
        )

    def _watch_linked(self, now: float) -> None:
        """transaction_timeout and query_timeout, for clients that hold a server."""
        for pool in list(self.pools.values()):
            policy = self.policy(pool)
            if policy.transaction_timeout <= 0 and policy.query_timeout <= 0:
                continue
            for server in list(pool.active):
                client = server.client
                st = server.state
                if client is None or st is None:
                    continue
                busy = bool(st.queue) or st.segment != 0
                in_transaction = st.transaction_status != TransactionStatus.IDLE
                limit = policy.transaction_timeout
                if (
                    limit > 0
                    and (busy or in_transaction)
                    and now - st.transaction_started_at >= limit
                ):
                    self._log_offender(client, now, f"past transaction_timeout ({limit:g} s)")
                    client.fail(
                        PgProxyError(
                            "terminating connection due to transaction timeout "
                            f"(transaction_timeout {limit:g} s)",
                            sqlstate=SqlState.TRANSACTION_TIMEOUT,
                        ),
                        reason=DisconnectReason.TRANSACTION_TIMEOUT,
                    )
                    continue
                limit = policy.query_timeout
                if limit <= 0 or not st.queue or st.copy_in:
                    continue
                started = st.query_started_at
                cancelled = server.query_cancelled
                if cancelled is not None and cancelled[0] == started:
                    if now - cancelled[1] >= CANCEL_TIMEOUT:
                        # The query ignored the cancel: the client goes, the server is closed.
                        client.fail(
                            PgProxyError(
                                f"query_timeout ({limit:g} s): the query did not stop when "
                                "cancelled",
                                sqlstate=SqlState.QUERY_CANCELED,
                            ),
                            reason=DisconnectReason.QUERY_TIMEOUT,
                        )
                elif now - started >= limit and st.backend_key is not None:
                    server.query_cancelled = (started, now)
                    if not client.mid_message:  # inside a streaming row it would corrupt it
                        client.write(
                            messages.notice_response(
                                "WARNING",
                                SqlState.QUERY_CANCELED,
                                f"pgproxy: query_timeout ({limit:g} s) reached; cancelling the "
                                "query",
                            )
                        )
                    log.info("%r: query_timeout (%g s): cancelling on %r", client, limit, server)
                    server.cancels_in_flight += 1
                    self._spawn(self._cancel(server, st.backend_key))

    def _watch_idle_clients(self, now: float) -> None:
        """client_idle_timeout: clients with no server and nothing sent for that long."""
        if not any(p.client_idle_timeout > 0 for p in self.policies.values()):
            return
        for client in list(self.clients):
            pool = client.pool
            st = client.state
            if pool is None or st is None or client.server is not None or st.pending:
                continue
            limit = self.policy(pool).client_idle_timeout
            if limit > 0 and now - client.released_at >= limit:
                client.fail(
                    PgProxyError(
                        "terminating connection due to idle timeout "
                        f"(client_idle_timeout {limit:g} s)",
                        sqlstate=SqlState.IDLE_SESSION_TIMEOUT,
                    ),
                    reason=DisconnectReason.CLIENT_IDLE_TIMEOUT,
                )


def _file_budget(clients: int) -> int:
    """Raise the soft open-file limit toward what `clients` need; how many clients fit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = clients + FD_RESERVE
    if soft < wanted:
        new_soft = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (new_soft, hard))
            soft = new_soft
    room = max(soft - FD_RESERVE, 1)
    if room < clients:
        log.warning(
            "the open-file limit (%d, ulimit -n) leaves room for %d clients, fewer than "
            "max_client_conn (%d): more get 53300; raise the limit (LimitNOFILE=, --ulimit)",
            soft,
            room,
            clients,
        )
    return room


def _check_delay(settings: Settings) -> float | None:
    """Seconds of idleness after which a server is checked before reuse; None: never."""
    return settings.server_check_delay if settings.server_check_query else None


def _remove_stale_socket(path: str) -> None:
    """Unlink a socket file nobody listens on (its process died); refuse a live one."""
    if not os.path.exists(path):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)
    else:
        raise ConfigError("unix_socket_dir", f"{path} is in use by another process")
    finally:
        probe.close()


def serve(
    settings: Settings,
    reload: Callable[[], Settings] | None = None,
    worker: WorkerSpec | None = None,
) -> int:
    """Run a proxy until it is stopped; uvloop when installed. `reload` re-reads settings."""
    signal.pthread_sigmask(signal.SIG_BLOCK, CONTROL_SIGNALS)  # until run() handles them
    if worker is not None:
        die_with_supervisor()
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency, but optional at run time
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        try:
            return runner.run(Proxy(settings, reload, worker).run())
        except ConfigError as exc:  # found while starting: the port is taken, ...
            sys.stderr.write(f"pgproxy: invalid setting {exc.setting}: {exc.problem}\n")
            return EXIT_BAD_CONFIG
