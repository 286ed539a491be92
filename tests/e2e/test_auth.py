"""Client authentication methods, and logging in to Postgres with a stored secret."""

from __future__ import annotations

import psycopg
import pytest

from pgproxy.localpg import LocalPostgres
from pgproxy.wire.scram import md5_secret

from .helpers import conninfo


def _login(port: int, password: str = "app-secret", user: str = "app") -> int:
    with psycopg.connect(conninfo(port, user=user, password=password), autocommit=True) as conn:
        return int(conn.execute("SELECT 41 + 1").fetchone()[0])


def test_scram_secret_from_pg_authid_logs_in_to_postgres_by_pass_through(
    pg: LocalPostgres, make_proxy
) -> None:
    secret = pg.execute("SELECT rolpassword FROM pg_authid WHERE rolname = 'app'")[0][0]
    assert secret.startswith("SCRAM-SHA-256$")
    proxy = make_proxy(users=[f"app:{secret}"])
    # No plain-text password anywhere in pgproxy: the client's SCRAM proof carries the key.
    assert _login(proxy.port) == 42
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        _login(proxy.port, password="wrong")


def test_md5_client_authentication(pg: LocalPostgres, make_proxy) -> None:
    proxy = make_proxy(auth_type="md5")
    assert _login(proxy.port) == 42
    with pytest.raises(
        psycopg.OperationalError, match='password authentication failed for user "app"'
    ):
        _login(proxy.port, password="wrong")


def test_md5_secret_cannot_answer_a_scram_server_and_says_so(pg: LocalPostgres, make_proxy) -> None:
    proxy = make_proxy(auth_type="md5", users=[f"app:{md5_secret('app', 'app-secret')}"])
    with pytest.raises(psycopg.OperationalError) as info:
        _login(proxy.port)
    message = str(info.value)
    assert "SCRAM" in message or "scram" in message


def test_trust_lets_any_password_in_and_logs_in_upstream_with_the_configured_one(
    pg: LocalPostgres, make_proxy
) -> None:
    proxy = make_proxy(auth_type="trust")
    assert _login(proxy.port, password="anything") == 42


def test_unknown_user_and_wrong_password_look_the_same(pg: LocalPostgres, make_proxy) -> None:
    proxy = make_proxy()
    errors = []
    for user, password in (("app", "wrong"), ("nobody", "wrong")):
        with pytest.raises(psycopg.OperationalError) as info:
            _login(proxy.port, user=user, password=password)
        errors.append(str(info.value).replace(f'"{user}"', '"USER"'))
    assert errors[0] == errors[1]
    assert 'password authentication failed for user "USER"' in errors[0]
