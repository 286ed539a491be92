"""Passwords kept in Postgres: `auth_user` + `auth_query`, with a cache that expires.

A user who is not in `users` is looked up in Postgres: the proxy logs in as `auth_user` to
`auth_dbname` and runs `auth_query` with the user's name bound as $1 (never spliced into the
SQL). The row's secret (SCRAM-SHA-256 or md5, as pg_authid stores it) checks the client's
password; the client's SCRAM proof then gives the proxy the ClientKey it needs to log in to
Postgres as that user (pass-through), so no password is stored anywhere.

Rules: lookups run on a worker thread with a blocking `QueryConnection` (the loop never
blocks); concurrent logins of one user share one lookup; results, "unknown user" included,
are kept `auth_cache_ttl` seconds, so a changed, dropped or expired password takes effect
after at most that long.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass

from pgproxy.config import Settings
from pgproxy.core.login import UserAuth, user_auth_from_password
from pgproxy.core.server_login import ServerCredentials
from pgproxy.errors import BackendUnavailableError, PgProxyError, ServerError
from pgproxy.net.query_client import QueryConnection

log = logging.getLogger("pgproxy.auth")

# Lookups at once; more wait for a thread (a login storm of unknown users queues here).
LOOKUP_THREADS = 4


@dataclass(frozen=True, slots=True)
class _Entry:
    auth: UserAuth | None  # None: no such user, or no usable secret (NULL, expired)
    expires_at: float


class AuthCache:
    """Users fetched with auth_query, by name; reads and writes on the loop thread only."""

    def __init__(
        self, settings: Callable[[], Settings], server_tls: Callable[[], ssl.SSLContext | None]
    ) -> None:
        self._settings = settings  # the proxy's current settings (RELOAD may change them)
        self._server_tls = server_tls  # and its current TLS context for Postgres
        self._entries: dict[str, _Entry] = {}
        self._pending: dict[str, asyncio.Future[UserAuth | None]] = {}
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.lookups = 0
        self.failures = 0

    def fresh(self, name: str) -> bool:
        entry = self._entries.get(name)
        return entry is not None and entry.expires_at > time.monotonic()

    def get(self, name: str) -> UserAuth | None:
        """The cached user while fresh (None: unknown, or not fetched, or expired)."""
        entry = self._entries.get(name)
        if entry is None or entry.expires_at <= time.monotonic():
            return None
        return entry.auth

    def known(self, name: str) -> UserAuth | None:
        """The last fetched secret, even past its TTL: server logins of a pool still use it."""
        entry = self._entries.get(name)
        return None if entry is None else entry.auth

    def clear(self) -> None:
        self._entries.clear()

    async def fetch(self, name: str) -> UserAuth | None:
        """Look `name` up (or join the lookup in progress); raises BackendUnavailableError
        when Postgres cannot answer."""
        pending = self._pending.get(name)
        if pending is None:
            loop = asyncio.get_running_loop()
            pending = self._pending[name] = loop.create_future()
            task = loop.create_task(self._lookup(name, pending))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await asyncio.shield(pending)

    async def _lookup(self, name: str, done: asyncio.Future[UserAuth | None]) -> None:
        settings = self._settings()
        loop = asyncio.get_running_loop()
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                LOOKUP_THREADS, thread_name_prefix="pgproxy-auth"
            )
        self.lookups += 1
        try:
            tls = self._server_tls()
            secret = await loop.run_in_executor(self._executor, _query, settings, tls, name)
            auth = None if secret is None else user_auth_from_password(name, secret)
            self._entries[name] = _Entry(auth, time.monotonic() + settings.auth_cache_ttl)
            done.set_result(auth)
        except BackendUnavailableError as exc:
            self.failures += 1
            log.warning("auth_query for user %r failed: %s", name, exc.message)
            done.set_exception(exc)
        finally:
            self._pending.pop(name, None)
            if not done.done():  # cancelled, or a bug: never leave the logins waiting
                done.cancel()
            elif not done.cancelled():
                done.exception()  # retrieved: logins that gave up must not make asyncio warn

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None


def _query(settings: Settings, tls: ssl.SSLContext | None, name: str) -> str | None:
    """Run auth_query for `name` on a fresh connection; the secret, or None."""
    server = settings.server
    # Settings allow auth_user only a plaintext password in `users`, or no entry (trust, cert).
    password = next((u.password for u in settings.users if u.name == settings.auth_user), None)
    try:
        with QueryConnection.connect(
            host=server.host,
            port=server.port,
            database=settings.auth_dbname,
            credentials=ServerCredentials(user=settings.auth_user, password=password),
            application_name="pgproxy auth_query",
            timeout=settings.server_connect_timeout,
            tls=tls,
            tls_mode=settings.server_tls_sslmode,
        ) as conn:
            # $1 bound as a parameter: a user name cannot change the query.
            rows = conn.query(settings.auth_query, [name])
    except (PgProxyError, OSError) as exc:
        raise BackendUnavailableError(f"auth_query failed: {_reason(exc)}") from None
    if not rows:
        return None
    row = rows[0]
    if len(row) < 2:
        raise BackendUnavailableError("auth_query must return two columns: name and secret")
    secret = row[1]
    return secret or None


def _reason(exc: Exception) -> str:
    if isinstance(exc, ServerError):
        return f"{exc.message} ({exc.sqlstate})"
    if isinstance(exc, PgProxyError):
        return exc.message
    return str(exc) or type(exc).__name__
