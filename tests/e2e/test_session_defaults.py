"""Session settings follow the client, not the server connection it happens to get.

Transaction mode with a pool of ONE: every client shares the same server connection, so any
setting left behind by one client would show up in the next one's queries. The expected
defaults are read from a direct connection to Postgres, never hard-coded.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import asyncpg
import psycopg
import pytest
from psycopg import errors as pg_errors

from pgproxy.localpg import Credentials, LocalPostgres
from tests.e2e.conftest import ProxyThread
from tests.e2e.test_drivers import HOST, psycopg_connect, run_clients, wait_until

TOKYO = "Asia/Tokyo"
PARIS = "Europe/Paris"
SQL_DMY = "SQL, DMY"
# A's startup options; the space inside the DateStyle value is backslash-escaped, as libpq's
# `options` requires.
ALPHA_OPTIONS = f"-c TimeZone={TOKYO} -c DateStyle=SQL,\\ DMY"
PROBE = (
    "SELECT current_setting('TimeZone'), current_setting('DateStyle'),"
    " current_setting('application_name'), DATE '2024-03-01'::text, pg_backend_pid()"
)


@pytest.fixture(scope="module")
def defaults(pg: LocalPostgres, app_credentials: Credentials) -> dict[str, str]:
    """What a direct connection (no options) gets: the values B must see."""
    creds = app_credentials
    with psycopg.connect(
        host=pg.host,
        port=pg.port,
        user=creds.user,
        password=creds.password,
        dbname=creds.database,
        autocommit=True,
    ) as conn:
        row = conn.execute(
            "SELECT current_setting('TimeZone'), current_setting('DateStyle'),"
            " current_setting('search_path'), current_setting('work_mem'),"
            " DATE '2024-03-01'::text"
        ).fetchone()
    assert row is not None
    timezone, datestyle, search_path, work_mem, date = row
    # The test means nothing if A's values happen to be the cluster's defaults.
    assert timezone not in (TOKYO, PARIS) and datestyle != SQL_DMY
    return {
        "TimeZone": timezone,
        "DateStyle": datestyle,
        "search_path": search_path,
        "work_mem": work_mem,
        "date": date,
    }


@pytest.fixture
def shared_server(make_proxy: Callable[..., ProxyThread]) -> ProxyThread:
    return make_proxy(default_pool_size="1")


def show(conn: psycopg.Connection, name: str) -> str:
    row = conn.execute(f"SHOW {name}").fetchone()
    assert row is not None
    return str(row[0])


def probe(conn: psycopg.Connection) -> tuple[str, str, str, str, int]:
    row = conn.execute(PROBE).fetchone()
    assert row is not None
    return row  # type: ignore[return-value]


# -- startup settings, psycopg -----------------------------------------------------------------


@pytest.mark.parametrize("use_uvloop", [True, False], ids=["uvloop", "asyncio"])
def test_each_client_keeps_its_startup_settings_on_one_shared_server(
    make_proxy: Callable[..., ProxyThread],
    app_credentials: Credentials,
    defaults: dict[str, str],
    use_uvloop: bool,
) -> None:
    proxy = make_proxy(default_pool_size="1", use_uvloop=use_uvloop)
    creds = app_credentials
    with (
        psycopg_connect(
            proxy, creds, autocommit=True, options=ALPHA_OPTIONS, application_name="alpha"
        ) as a,
        psycopg_connect(proxy, creds, autocommit=True, application_name="beta") as b,
    ):
        expected = {
            a: (TOKYO, SQL_DMY, "alpha", "01/03/2024"),
            b: (defaults["TimeZone"], defaults["DateStyle"], "beta", defaults["date"]),
        }
        pids = set()
        for _round in range(5):
            for conn in (a, b):
                timezone, datestyle, app_name, date, pid = probe(conn)
                pids.add(pid)
                assert (timezone, datestyle, app_name, date) == expected[conn]
                assert show(conn, "TimeZone") == timezone
                assert show(conn, "DateStyle") == datestyle
                assert conn.info.parameter_status("TimeZone") == timezone
                assert conn.info.parameter_status("DateStyle") == datestyle
                assert conn.info.parameter_status("application_name") == app_name
        assert len(pids) == 1, "the clients did not share one server: the test tests nothing"
        assert proxy.server_count() == 1


def test_a_set_outside_a_transaction_follows_its_client_only(
    shared_server: ProxyThread, app_credentials: Credentials, defaults: dict[str, str]
) -> None:
    creds = app_credentials
    with (
        psycopg_connect(
            shared_server, creds, autocommit=True, options=ALPHA_OPTIONS, application_name="alpha"
        ) as a,
        psycopg_connect(shared_server, creds, autocommit=True, application_name="beta") as b,
    ):
        assert show(a, "TimeZone") == TOKYO
        a.execute(f"SET TimeZone = '{PARIS}'")
        b.execute("SET DateStyle = 'German'")
        pids = set()
        for _round in range(4):
            timezone, datestyle, app_name, _date, pid_a = probe(a)
            assert (timezone, datestyle, app_name) == (PARIS, SQL_DMY, "alpha")
            assert a.info.parameter_status("TimeZone") == PARIS
            timezone, datestyle, app_name, _date, pid_b = probe(b)
            assert (timezone, datestyle, app_name) == (defaults["TimeZone"], "German, DMY", "beta")
            assert b.info.parameter_status("TimeZone") == defaults["TimeZone"]
            assert b.info.parameter_status("DateStyle") == "German, DMY"
            pids |= {pid_a, pid_b}
        assert len(pids) == 1


def test_a_set_inside_a_transaction_sticks_on_commit_and_not_on_rollback(
    shared_server: ProxyThread, app_credentials: Credentials, defaults: dict[str, str]
) -> None:
    creds = app_credentials
    with (
        psycopg_connect(shared_server, creds, application_name="alpha") as a,
        psycopg_connect(shared_server, creds, autocommit=True, application_name="beta") as b,
    ):
        a.execute("SET TimeZone = 'America/New_York'")
        a.rollback()
        assert show(b, "TimeZone") == defaults["TimeZone"]
        assert show(a, "TimeZone") == defaults["TimeZone"]
        assert a.info.parameter_status("TimeZone") == defaults["TimeZone"]
        a.commit()
        a.execute("SET LOCAL TimeZone = 'America/Chicago'")
        assert show(a, "TimeZone") == "America/Chicago"
        a.commit()
        assert show(b, "TimeZone") == defaults["TimeZone"]
        assert show(a, "TimeZone") == defaults["TimeZone"]
        a.commit()
        a.execute(f"SET TimeZone = '{PARIS}'")
        a.commit()
        assert show(b, "TimeZone") == defaults["TimeZone"]
        assert show(a, "TimeZone") == PARIS
        assert a.info.parameter_status("TimeZone") == PARIS
        a.commit()


@pytest.mark.parametrize(
    "statement",
    [
        "SET timezone TO 'Europe/Paris'",
        "SET TIME ZONE 'Europe/Paris'",  # the SQL-standard spelling (Django before 4.0)
        "SELECT set_config('TimeZone', 'Europe/Paris', false)",  # what Django runs at connect
    ],
)
def test_changing_the_time_zone_follows_the_client_and_leaves_the_server_shared(
    make_proxy: Callable[..., ProxyThread],
    app_credentials: Credentials,
    defaults: dict[str, str],
    statement: str,
) -> None:
    # A short wait: if A kept the only server, B fails in 3 s instead of 30.
    proxy = make_proxy(default_pool_size="1", query_wait_timeout="3")
    creds = app_credentials
    with (
        psycopg_connect(proxy, creds, autocommit=True, application_name="alpha") as a,
        psycopg_connect(proxy, creds, autocommit=True, application_name="beta") as b,
    ):
        a.execute(statement)
        for _round in range(3):
            assert show(a, "TimeZone") == PARIS
            assert a.info.parameter_status("TimeZone") == PARIS
            assert show(b, "TimeZone") == defaults["TimeZone"]
            assert b.info.parameter_status("TimeZone") == defaults["TimeZone"]


def test_reset_time_zone_returns_to_the_clients_startup_value_like_a_direct_connection(
    make_proxy: Callable[..., ProxyThread],
    app_credentials: Credentials,
    pg: LocalPostgres,
    defaults: dict[str, str],
) -> None:
    proxy = make_proxy(default_pool_size="1", query_wait_timeout="3")
    creds = app_credentials
    with psycopg.connect(
        host=pg.host,
        port=pg.port,
        user=creds.user,
        password=creds.password,
        dbname=creds.database,
        options=ALPHA_OPTIONS,
        autocommit=True,
    ) as direct:
        direct.execute(f"SET TimeZone = '{PARIS}'")
        direct.execute("RESET TimeZone")
        assert show(direct, "TimeZone") == TOKYO  # RESET goes back to the startup value
    with (
        psycopg_connect(proxy, creds, autocommit=True, options=ALPHA_OPTIONS) as a,
        psycopg_connect(proxy, creds, autocommit=True) as b,
    ):
        a.execute(f"SET TimeZone = '{PARIS}'")
        assert show(b, "TimeZone") == defaults["TimeZone"]
        a.execute("RESET TimeZone")
        assert show(a, "TimeZone") == TOKYO
        assert a.info.parameter_status("TimeZone") == TOKYO
        assert show(b, "TimeZone") == defaults["TimeZone"]


def test_after_a_reset_the_driver_learns_its_startup_value_on_a_server_that_needs_no_prelude(
    make_proxy: Callable[..., ProxyThread], app_credentials: Credentials
) -> None:
    """RESET TimeZone shows the client the pool's default in ParameterStatus; its next query
    lands on the other server, which still has the client's settings applied (so no prelude
    and its catch-up run). Seen in the fault isolation test: the driver kept the default."""
    proxy = make_proxy(default_pool_size="2")
    creds = app_credentials
    with (
        psycopg_connect(proxy, creds, autocommit=True, options=ALPHA_OPTIONS) as a,
        psycopg_connect(proxy, creds, autocommit=True, options=ALPHA_OPTIONS) as b,
        psycopg_connect(proxy, creds, autocommit=True) as c,
    ):
        b.execute("BEGIN")
        b_pid = probe(b)[4]  # B holds one server, with A's settings applied (same options)
        a_pid = probe(a)[4]  # so A gets the other one
        assert a_pid != b_pid
        a.execute("RESET TimeZone")  # on a_pid: the server's default is reported now
        c.execute("BEGIN")
        assert probe(c)[4] == a_pid  # C holds that one
        b.execute("COMMIT")
        row = probe(a)
        assert row[4] == b_pid and row[0] == TOKYO  # no prelude needed there
        assert a.info.parameter_status("TimeZone") == TOKYO
        c.execute("COMMIT")


@pytest.fixture
def schema(pg: LocalPostgres, app_credentials: Credentials) -> Iterator[str]:
    """A schema owned by `app` holding `marker(v text)` with one row."""
    name = f"sp_{uuid.uuid4().hex[:10]}"
    pg.execute(
        f"CREATE SCHEMA {name} AUTHORIZATION {app_credentials.user};"
        f"CREATE TABLE {name}.marker (v text);"
        f"INSERT INTO {name}.marker VALUES ('found in {name}');"
        f"ALTER TABLE {name}.marker OWNER TO {app_credentials.user}",
        database=app_credentials.database,
    )
    yield name
    pg.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE", database=app_credentials.database)


def test_search_path_startup_option_is_applied_to_its_client_only(
    shared_server: ProxyThread,
    app_credentials: Credentials,
    pg: LocalPostgres,
    defaults: dict[str, str],
    schema: str,
) -> None:
    creds = app_credentials
    options = f"-c search_path={schema},public"
    with psycopg.connect(
        host=pg.host,
        port=pg.port,
        user=creds.user,
        password=creds.password,
        dbname=creds.database,
        options=options,
        autocommit=True,
    ) as direct:
        direct_path = show(direct, "search_path")
    with (
        psycopg_connect(shared_server, creds, autocommit=True, options=options) as a,
        psycopg_connect(shared_server, creds, autocommit=True) as b,
    ):
        for _round in range(3):
            assert show(a, "search_path") == direct_path
            row = a.execute("SELECT current_schema(), v FROM marker").fetchone()
            assert row == (schema, f"found in {schema}")
            assert show(b, "search_path") == defaults["search_path"]
            assert b.execute("SELECT current_schema()").fetchone() == ("public",)
            with pytest.raises(pg_errors.UndefinedTable):
                b.execute("SELECT v FROM marker")


def test_a_discard_all_by_one_client_does_not_cost_the_next_client_its_search_path(
    shared_server: ProxyThread,
    app_credentials: Credentials,
    pg: LocalPostgres,
    schema: str,
) -> None:
    """search_path is not reported (no ParameterStatus in 15): after a client's DISCARD ALL
    the proxy cannot learn from the server that its applied value is gone."""
    creds = app_credentials
    options = f"-c search_path={schema}"
    with psycopg_connect(shared_server, creds, autocommit=True, options=options) as a:
        assert a.execute("SELECT current_schema()").fetchone() == (schema,)
        a.execute("DISCARD ALL")
    with psycopg_connect(shared_server, creds, autocommit=True, options=options) as c:
        assert c.execute("SELECT current_schema()").fetchone() == (schema,)
        row = c.execute("SELECT v FROM marker").fetchone()
        assert row == (f"found in {schema}",)


# -- startup settings, asyncpg -----------------------------------------------------------------


async def asyncpg_client(
    proxy: ProxyThread, creds: Credentials, settings: dict[str, str]
) -> asyncpg.Connection:
    return await asyncpg.connect(
        host=HOST,
        port=proxy.port,
        user=creds.user,
        password=creds.password,
        database=creds.database,
        statement_cache_size=0,
        server_settings=settings,
        timeout=15,
    )


def test_asyncpg_server_settings_follow_each_client_on_one_shared_server(
    shared_server: ProxyThread, app_credentials: Credentials, defaults: dict[str, str]
) -> None:
    async def main() -> None:
        a = await asyncpg_client(
            shared_server,
            app_credentials,
            {"TimeZone": TOKYO, "DateStyle": SQL_DMY, "application_name": "alpha"},
        )
        b = await asyncpg_client(shared_server, app_credentials, {"application_name": "beta"})
        try:
            expected = {
                a: (TOKYO, SQL_DMY, "alpha", "01/03/2024"),
                b: (defaults["TimeZone"], defaults["DateStyle"], "beta", defaults["date"]),
            }
            pids = set()
            for _round in range(5):
                for conn in (a, b):
                    row = await conn.fetchrow(PROBE)
                    assert row is not None
                    assert tuple(row)[:4] == expected[conn]
                    assert await conn.fetchval("SHOW TimeZone") == expected[conn][0]
                    assert await conn.fetchval("SHOW DateStyle") == expected[conn][1]
                    pids.add(row[4])
            # A SET by one task follows it alone, also when both run at the same time.
            await a.execute(f"SET TimeZone = '{PARIS}'")
            for _round in range(5):
                ta, tb = await asyncio.gather(
                    a.fetchval("SHOW TimeZone"), b.fetchval("SHOW TimeZone")
                )
                assert (ta, tb) == (PARIS, defaults["TimeZone"])
            assert len(pids) == 1
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())


# -- session mode ------------------------------------------------------------------------------


def test_session_mode_discards_a_clients_state_before_the_next_client_gets_the_server(
    make_proxy: Callable[..., ProxyThread], app_credentials: Credentials, defaults: dict[str, str]
) -> None:
    proxy = make_proxy(pool_mode="session", default_pool_size="1")
    creds = app_credentials
    pids = []
    with psycopg_connect(proxy, creds, autocommit=True, options=ALPHA_OPTIONS) as first:
        first.execute("SET work_mem = '7MB'")
        first.execute("PREPARE leftover AS SELECT 1")
        first.execute("CREATE TEMP TABLE leftover_tmp (x int)")
        assert show(first, "work_mem") == "7MB"
        assert show(first, "TimeZone") == TOKYO
        pids.append(probe(first)[4])
    for _ in range(2):
        with psycopg_connect(proxy, creds, autocommit=True) as nxt:
            timezone, datestyle, _app, _date, pid = probe(nxt)
            pids.append(pid)
            assert show(nxt, "work_mem") == defaults["work_mem"]
            assert (timezone, datestyle) == (defaults["TimeZone"], defaults["DateStyle"])
            assert nxt.execute("SELECT count(*) FROM pg_prepared_statements").fetchone() == (0,)
            row = nxt.execute("SELECT to_regclass('pg_temp.leftover_tmp')").fetchone()
            assert row == (None,)
            nxt.execute("SET work_mem = '9MB'")
    assert len(set(pids)) == 1, "the clients did not get the same server: the test tests nothing"


def test_session_mode_second_client_waits_for_the_first_to_leave(
    make_proxy: Callable[..., ProxyThread], app_credentials: Credentials, defaults: dict[str, str]
) -> None:
    proxy = make_proxy(pool_mode="session", default_pool_size="1")
    creds = app_credentials

    def waiting_clients() -> int:
        return int(proxy.call(lambda: sum(len(p.waiters) for p in proxy.proxy.pools.values())))

    def second_client() -> tuple[str, int]:
        with psycopg_connect(proxy, creds, autocommit=True) as conn:
            work_mem = show(conn, "work_mem")
            return work_mem, probe(conn)[4]

    with ThreadPoolExecutor(1) as pool:
        with psycopg_connect(proxy, creds, autocommit=True) as first:
            first.execute("SET work_mem = '7MB'")
            first_pid = probe(first)[4]
            second = pool.submit(second_client)
            assert wait_until(lambda: waiting_clients() == 1), "the second client never waited"
            assert not second.done()
            # The first client still has its session to itself.
            assert show(first, "work_mem") == "7MB"
        work_mem, pid = second.result(timeout=15)
    assert (work_mem, pid) == (defaults["work_mem"], first_pid)


def test_psycopg_session_settings_survive_many_interleaved_threads(
    shared_server: ProxyThread, app_credentials: Credentials, defaults: dict[str, str]
) -> None:
    """Four clients with four time zones hammer one server at once."""
    zones = [TOKYO, PARIS, "America/Lima", None]

    def client(i: int, barrier: threading.Barrier) -> None:
        zone = zones[i]
        options = f"-c TimeZone={zone}" if zone else None
        kwargs = {"options": options} if options else {}
        with psycopg_connect(
            shared_server, app_credentials, autocommit=True, application_name=f"c{i}", **kwargs
        ) as conn:
            barrier.wait()
            for _ in range(15):
                timezone, _datestyle, app_name, _date, _pid = probe(conn)
                assert (timezone, app_name) == (zone or defaults["TimeZone"], f"c{i}")

    run_clients(len(zones), client)
    assert shared_server.server_count() == 1
