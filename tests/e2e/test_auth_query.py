"""Passwords kept in Postgres: auth_user + auth_query, SCRAM pass-through, the cache's TTL.

The SECURITY DEFINER function is installed from deploy/auth_query.sql, as an operator would.
No password of the looked-up users is given to the proxy; the auth user's comes from the
environment of a real `python -m pgproxy` in the file-based test.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import asyncpg
import psycopg
import pytest

from pgproxy.localpg import LocalPostgres, free_port

from .conftest import ProxyThread
from .helpers import REPO, cli_env, wait_for

AUTH_USER, AUTH_PASSWORD = "pgproxy_auth", "auth-secret"
ALICE, ALICE_PASSWORD = "alice_aq", "alice-pw"
SQL = REPO / "deploy" / "auth_query.sql"


@pytest.fixture(scope="module")
def auth_roles(pg: LocalPostgres) -> Iterator[None]:
    """The auth user and its lookup function (from deploy/), and a user only Postgres knows."""
    pg.execute(SQL.read_text().replace(':"auth_user"', f'"{AUTH_USER}"'))
    pg.execute(f"ALTER ROLE {AUTH_USER} PASSWORD '{AUTH_PASSWORD}'")
    pg.execute(f"CREATE ROLE {ALICE} LOGIN PASSWORD '{ALICE_PASSWORD}'")
    pg.execute(f"GRANT CONNECT ON DATABASE app TO {ALICE}")
    pg.execute("CREATE TABLE IF NOT EXISTS aq_canary (x int)", database="app")
    yield
    pg.execute("DROP TABLE IF EXISTS aq_canary", database="app")
    pg.execute(
        f"DROP SCHEMA pgproxy CASCADE; DROP OWNED BY {ALICE}, {AUTH_USER}; "
        f"DROP ROLE {ALICE}; DROP ROLE {AUTH_USER}"
    )


@pytest.fixture
def aq_proxy(make_proxy: Callable[..., ProxyThread], auth_roles: None) -> ProxyThread:
    return make_proxy(
        users=[f"{AUTH_USER}:{AUTH_PASSWORD}"],
        auth_user=AUTH_USER,
        auth_cache_ttl="0.5",
        default_pool_size="2",
    )


def login(port: int, user: str = ALICE, password: str = ALICE_PASSWORD) -> psycopg.Connection:
    return psycopg.connect(
        host="127.0.0.1", port=port, user=user, password=password, dbname="app", autocommit=True
    )


def refused(port: int, user: str = ALICE, password: str = ALICE_PASSWORD) -> str:
    with pytest.raises(psycopg.OperationalError) as caught:
        login(port, user, password).close()
    return str(caught.value)


def test_a_user_only_postgres_knows_logs_in_and_the_server_login_passes_scram_through(
    aq_proxy: ProxyThread, pg: LocalPostgres
) -> None:
    with login(aq_proxy.port) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (ALICE,)
    # The server connection is alice's own (SCRAM with the key from her proof): Postgres
    # shows a backend of hers, which the proxy could not open with any stored password.
    assert pg.backends(user=ALICE) >= 1
    assert f'password authentication failed for user "{ALICE}"' in refused(
        aq_proxy.port, password="wrong"
    )
    # An unknown user gets the same answer as a wrong password.
    assert 'password authentication failed for user "nobody_aq"' in refused(
        aq_proxy.port, user="nobody_aq"
    )


def test_a_changed_or_expired_password_takes_effect_after_the_ttl(
    aq_proxy: ProxyThread, pg: LocalPostgres
) -> None:
    login(aq_proxy.port).close()
    try:
        pg.execute(f"ALTER ROLE {ALICE} PASSWORD 'changed-pw'")

        def new_password_works() -> bool:
            try:
                login(aq_proxy.port, password="changed-pw").close()
            except psycopg.OperationalError:
                return False
            return True

        wait_for(new_password_works, timeout=10, what="the new password to be accepted")
        assert "password authentication failed" in refused(aq_proxy.port)  # the old one
        pg.execute(f"ALTER ROLE {ALICE} VALID UNTIL '2000-01-01'")

        def expired() -> bool:
            try:
                login(aq_proxy.port, password="changed-pw").close()
            except psycopg.OperationalError:
                return True
            return False

        wait_for(expired, timeout=10, what="the expired password to be refused")
    finally:
        pg.execute(f"ALTER ROLE {ALICE} PASSWORD '{ALICE_PASSWORD}' VALID UNTIL 'infinity'")


def test_a_user_name_cannot_change_the_query(aq_proxy: ProxyThread, pg: LocalPostgres) -> None:
    for name in ("x' OR '1'='1", "alice_aq'--", "a'); DROP TABLE aq_canary; --"):
        assert "password authentication failed" in refused(aq_proxy.port, user=name)
    assert pg.execute("SELECT count(*) FROM aq_canary", database="app") == [(0,)]


def test_concurrent_logins_of_one_user_share_one_lookup(aq_proxy: ProxyThread) -> None:
    async def storm() -> None:
        conns = await asyncio.gather(
            *(
                asyncpg.connect(
                    host="127.0.0.1",
                    port=aq_proxy.port,
                    user=ALICE,
                    password=ALICE_PASSWORD,
                    database="app",
                )
                for _ in range(20)
            )
        )
        for conn in conns:
            assert await conn.fetchval("SELECT 1") == 1
            await conn.close()

    before = aq_proxy.call(lambda: aq_proxy.proxy.auth_cache.lookups)
    asyncio.run(storm())
    assert aq_proxy.call(lambda: aq_proxy.proxy.auth_cache.lookups) - before <= 1


def test_a_broken_auth_query_refuses_with_08006_and_the_proxy_goes_on(
    make_proxy: Callable[..., ProxyThread], auth_roles: None
) -> None:
    proxy = make_proxy(
        users=[f"{AUTH_USER}:{AUTH_PASSWORD}", "app:app-secret"],
        auth_user=AUTH_USER,
        auth_query="SELECT usename, passwd FROM pgproxy.no_such_function($1)",
    )
    message = refused(proxy.port)
    assert "could not look up the password of this user (auth_query)" in message
    # Users configured in the proxy do not need the lookup.
    with login(proxy.port, "app", "app-secret") as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_the_command_line_with_a_config_file_holding_no_password(
    auth_roles: None, pg: LocalPostgres, tmp_path: Path
) -> None:
    port = free_port()
    config = tmp_path / "pgproxy.toml"
    config.write_text(
        f'listen = "127.0.0.1:{port}"\n'
        f'server = "{pg.host}:{pg.port}"\n'
        f'auth_user = "{AUTH_USER}"\n'
        'metrics_listen = ""\n'
        "monitor_interval = 0\n"
    )
    env = {**cli_env(), "PGPROXY_USERS": f"{AUTH_USER}:{AUTH_PASSWORD}"}
    log = tmp_path / "pgproxy.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "pgproxy", "--config", str(config)],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:

        def serves() -> bool:
            assert process.poll() is None, log.read_text()
            try:
                login(port).close()
            except psycopg.OperationalError:
                return False
            return True

        wait_for(serves, timeout=15, what="a login through the configured proxy")
    finally:
        process.terminate()
        assert process.wait(30) == 0
    for path in tmp_path.iterdir():
        text = path.read_text(errors="replace")
        assert ALICE_PASSWORD not in text and AUTH_PASSWORD not in text, path
