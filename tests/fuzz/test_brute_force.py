"""Password guessing: every failed attempt is counted and logged, and none reaches Postgres.

For each authentication method a client can be asked for (scram-sha-256, md5; trust asks
nothing), wrong, empty and over-long passwords are tried through a real driver (psycopg) and
through raw protocol bytes (which can send what drivers refuse to: an empty proof, a 1 MiB
password message, a Query pipelined behind a wrong password). Afterwards:

* `Proxy.login_failures`, the pool's stats (once the pool exists), SHOW STATS and
  `pgproxy_login_failures_total` on /metrics all count every attempt;
* each attempt is logged at WARNING with the user, the database and the client's address;
* Postgres never saw a backend for them: no pool is created by a client that did not
  authenticate, the proxy opened no server connection, and `pg_stat_activity` has no more
  backends of the user than before.
"""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Callable, Iterator

import psycopg
import pytest

from pgproxy.localpg import LocalPostgres
from pgproxy.wire import messages
from pgproxy.wire.scram import ScramClientExchange, md5_response
from tests.e2e.conftest import ProxyThread
from tests.e2e.helpers import connect, conninfo, wait_for

from .conftest import STATS_PASSWORD, STATS_USER, RawClient, client_count, start_proxy
from .support import FULL, auth_code, error_fields

ROUNDS = 10 if FULL else 2
LONG = "x" * 100_000
MIB = 1 << 20


@pytest.fixture(params=["scram-sha-256", "md5"])
def guarded(request, pg: LocalPostgres) -> Iterator[ProxyThread]:
    """A fresh proxy (no pool yet) with /metrics on, for one auth method."""
    proxy = start_proxy(pg, auth_type=request.param, metrics_listen="127.0.0.1:0")
    yield proxy
    proxy.stop()


def driver_attempt(port: int, password: str, user: str = "app", database: str = "app") -> None:
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(
            conninfo(port, user=user, password=password, dbname=database), connect_timeout=10
        )


def raw_attempt(port: int, method: str, how: str) -> dict[str, str]:
    """One refused login in raw bytes; the proxy's FATAL error fields."""
    with RawClient(port) as client:
        client.send(messages.startup_message({"user": "app", "database": "app"}))
        request = client.read_message()
        assert request is not None and request[1] is not None
        if method == "md5":
            assert auth_code(request[1]) == 5
            salt = request[1][4:]
            data = {
                "wrong": messages.password_message(md5_response("wrong", "app", salt)),
                "empty": messages.password_message(b""),
                "over_long": messages.password_message(b"m" * MIB),
            }[how]
        else:
            assert auth_code(request[1]) == 10
            exchange = ScramClientExchange({"wrong": "wrong", "empty": ""}.get(how, "x"))
            client.send(messages.sasl_initial_response("SCRAM-SHA-256", exchange.client_first()))
            cont = client.read_message()
            assert cont is not None and cont[1] is not None
            if how == "over_long":
                data = messages.sasl_response(b"c=biws,r=x,p=" + b"A" * MIB)
            else:
                data = messages.sasl_response(exchange.handle_server_first(cont[1][4:]))
        # A Query pipelined behind the guess: it must never reach a server.
        client.send(data + messages.query("SELECT pg_sleep(0)"))
        received = client.read_until_closed()
    fields = error_fields(received)
    assert len(fields) == 1 and fields[0]["S"] == "FATAL", received
    assert all(code != "R" or auth_code(body) != 0 for code, body in received), received
    return fields[0]


def guesses(port: int, method: str) -> list[Callable[[], object]]:
    """One round of attempts: each is one failed login."""
    return [
        lambda: driver_attempt(port, "wrong"),
        lambda: driver_attempt(port, LONG),
        lambda: driver_attempt(port, "wrong", user="nobody"),
        lambda: raw_attempt(port, method, "wrong"),
        lambda: raw_attempt(port, method, "empty"),
        lambda: raw_attempt(port, method, "over_long"),
    ]


def scrape_failures(proxy: ProxyThread) -> dict[tuple[str, str], float]:
    url = f"http://127.0.0.1:{proxy.proxy.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    pattern = re.compile(
        r'^pgproxy_login_failures_total\{database="([^"]*)",user="([^"]*)"\} (\S+)$', re.M
    )
    return {(db, user): float(value) for db, user, value in pattern.findall(text)}


def failure_logs(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("pgproxy") and r.getMessage().startswith("login failed for user=")
    ]


def pool_state(proxy: ProxyThread) -> tuple[int, list[tuple[str, str]]]:
    return proxy.call(
        lambda: (
            len(proxy.proxy.servers),
            sorted((k.database, k.user) for k in proxy.proxy.pools),
        )
    )


def test_failed_logins_are_counted_logged_and_never_reach_postgres(
    guarded, pg, pgproxy_log, request
):
    method = request.node.callspec.params["guarded"]
    port = guarded.port
    # Backends of earlier tests may still be ending: the count may only go down from here.
    baseline = pg.backends(user="app")

    # 1. No pool exists yet: every attempt counts in the proxy's total.
    attempts = 0
    for _ in range(ROUNDS):
        for guess in guesses(port, method):
            guess()
            attempts += 1
            assert pool_state(guarded) == (0, []), "an unauthenticated client made a pool"
            assert pg.backends(user="app") <= baseline
    wait_for(lambda: client_count(guarded) == 0, what="the guessers to be forgotten")
    assert guarded.call(lambda: guarded.proxy.login_failures) == attempts
    assert scrape_failures(guarded) == {("", ""): attempts}
    logs = failure_logs(pgproxy_log)
    assert len(logs) == attempts, logs
    assert all(
        re.search(r"user=(app|nobody) database=app from 127\.0\.0\.1:\d+: ", m) for m in logs
    )

    # 2. A rightful login makes the pool (one server); further guesses count in it too.
    with connect(port) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    servers = pool_state(guarded)[0]
    assert servers == 1
    assert pg.backends(user="app") <= baseline + 1
    pgproxy_log.clear()
    more = 0
    for guess in guesses(port, method):
        guess()
        more += 1
        assert pool_state(guarded) == (servers, [("app", "app")])
        assert pg.backends(user="app") <= baseline + 1
    # The "nobody" guess has no pool: it counts in the total only.
    in_pool = more - 1
    assert guarded.call(lambda: guarded.proxy.login_failures) == attempts + more
    failures = scrape_failures(guarded)
    assert failures[("app", "app")] == in_pool
    assert failures[("", "")] == attempts + 1
    assert len(failure_logs(pgproxy_log)) == more

    # 3. The admin console's SHOW STATS says the same.
    with psycopg.connect(
        conninfo(port, user=STATS_USER, password=STATS_PASSWORD, dbname="pgproxy"),
        autocommit=True,
    ) as console:
        cursor = console.execute("SHOW STATS")
        assert cursor.description is not None
        columns = [c.name for c in cursor.description]
        rows = [dict(zip(columns, row, strict=True)) for row in cursor.fetchall()]
    assert [int(r["total_login_failures"]) for r in rows if r["database"] == "app"] == [in_pool]


@pytest.mark.parametrize("method", ["scram-sha-256", "md5"])
def test_unauthenticated_clients_of_the_admin_console_and_of_unknown_users_get_nothing(
    pg, pgproxy_log, method
):
    proxy = start_proxy(pg, auth_type=method)
    try:
        baseline = pg.backends(user="app")
        for user, database in (
            ("app", "pgproxy"),
            (STATS_USER, "pgproxy"),
            ("nobody", "app"),
            ("postgres", "postgres"),
        ):
            driver_attempt(proxy.port, "wrong", user=user, database=database)
        assert pool_state(proxy) == (0, [])
        assert pg.backends(user="app") <= baseline
        assert proxy.call(lambda: proxy.proxy.login_failures) == 4
    finally:
        proxy.stop()
