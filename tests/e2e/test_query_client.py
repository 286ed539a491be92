"""`QueryConnection`, the blocking client the monitor and auth_query run on worker threads.

Against the session's real cluster (SCRAM-SHA-256): text values and NULL, parameters bound
and never spliced, a server error that leaves the connection usable, refused logins, a
server that never answers, and TLS demanded of a server without it.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from pgproxy.config import TlsMode, load_settings
from pgproxy.core.server_login import ServerCredentials
from pgproxy.errors import BackendUnavailableError, ProtocolError, ServerError
from pgproxy.localpg import LocalPostgres
from pgproxy.net.query_client import QueryConnection
from pgproxy.net.tls import server_context

from .helpers import APP_PASSWORD


def _connect(pg: LocalPostgres, password: str = APP_PASSWORD, **kw: object) -> QueryConnection:
    args: dict[str, object] = {
        "host": pg.host,
        "port": pg.port,
        "database": "app",
        "credentials": ServerCredentials(user="app", password=password),
        "application_name": "query-client-test",
        "timeout": 5.0,
        "tls": None,
        "tls_mode": TlsMode.DISABLE,
    }
    args.update(kw)
    return QueryConnection.connect(**args)  # type: ignore[arg-type]


@pytest.fixture
def conn(pg: LocalPostgres) -> Iterator[QueryConnection]:
    with _connect(pg) as c:
        yield c


def test_rows_come_back_as_text_with_null_as_none(conn: QueryConnection) -> None:
    rows = conn.query("SELECT 1::int, NULL::text, 'zoë' UNION ALL SELECT 2, 'b', ''")
    assert rows == [("1", None, "zoë"), ("2", "b", "")]
    assert conn.query("SET application_name = 'x'") == []


def test_the_login_reaches_postgres_as_the_named_user_and_application(
    conn: QueryConnection,
) -> None:
    rows = conn.query("SELECT current_user, application_name FROM pg_stat_activity"
                      " WHERE pid = pg_backend_pid()")  # fmt: skip
    assert rows == [("app", "query-client-test")]


def test_parameters_are_bound_not_spliced(conn: QueryConnection) -> None:
    hostile = "x'; DROP TABLE nothing; --"
    assert conn.query("SELECT $1::text, length($2)", [hostile, "héllo"]) == [(hostile, "5")]
    assert conn.query("SELECT $1::int + 1", ["41"]) == [("42",)]


def test_a_server_error_is_raised_and_the_connection_stays_usable(conn: QueryConnection) -> None:
    with pytest.raises(ServerError) as caught:
        conn.query("SELECT * FROM no_such_table_here")
    assert caught.value.sqlstate == "42P01"
    with pytest.raises(ServerError) as caught:
        conn.query("SELECT $1::int", ["not a number"])
    assert caught.value.sqlstate == "22P02"
    assert conn.query("SELECT 'still here'") == [("still here",)]


def test_a_copy_is_refused(conn: QueryConnection) -> None:
    with pytest.raises(ProtocolError, match="COPY"):
        conn.query("COPY (SELECT 1) TO STDOUT")


def test_a_wrong_password_is_the_servers_own_error(pg: LocalPostgres) -> None:
    with pytest.raises(ServerError) as caught:
        _connect(pg, password="wrong")
    assert caught.value.sqlstate == "28P01"


def test_tls_required_of_a_server_without_it_is_refused(pg: LocalPostgres) -> None:
    settings = load_settings({"server_tls_sslmode": "require"}, environ={})
    tls = server_context(settings)
    assert tls is not None
    with pytest.raises(BackendUnavailableError, match="does not accept TLS"):
        _connect(pg, tls=tls, tls_mode=TlsMode.REQUIRE)
    # prefer: the same server is used without TLS.
    with _connect(pg, tls=tls, tls_mode=TlsMode.PREFER) as plain:
        assert plain.query("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()") == [("f",)]


def test_a_server_that_never_answers_times_out() -> None:
    with socket.create_server(("127.0.0.1", 0)) as silent:
        port = silent.getsockname()[1]
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            QueryConnection.connect(
                host="127.0.0.1",
                port=port,
                database="app",
                credentials=ServerCredentials(user="app", password=APP_PASSWORD),
                application_name="t",
                timeout=0.3,
                tls=None,
                tls_mode=TlsMode.DISABLE,
            )
        assert time.monotonic() - started < 5
