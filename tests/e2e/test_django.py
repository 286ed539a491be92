"""Django's ORM through a transaction-mode pgproxy with a pool of 2, with both of its drivers.

The application is tests/e2e/django_app at Django's default database settings; the only change
from a direct connection is HOST and PORT pointing at pgproxy. Django can be configured once per
process and chooses psycopg 3 or psycopg2 at import time, so each scenario runs in a fresh
interpreter (`python -m tests.e2e.django_app DRIVER SCENARIO ARGS`) against a proxy on a thread
of this process; the scenario returns JSON and the assertions live here. A side benefit: the
proxy does not share a GIL with twenty Django threads.

Per driver (a module-scoped fixture): a fresh database owned by `app`, its own proxy, and
`migrate` into it; the database is dropped at the end.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from pgproxy.localpg import Credentials, LocalPostgres
from tests.e2e.conftest import ProxyThread

ROOT = Path(__file__).resolve().parents[2]
POOL = 2
ROWS = 50_000
ITERATOR_THREADS = 20


@dataclass(frozen=True)
class DjangoSite:
    """One driver's database behind its own proxy, migrated."""

    driver: str
    database: str
    proxy: ProxyThread
    credentials: Credentials
    migration: dict[str, Any]

    def run(self, scenario: str, **extra: object) -> Any:
        """Run `scenarios.<scenario>` in a fresh interpreter; return what it returned."""
        args = {
            "port": self.proxy.port,
            "name": self.database,
            "user": self.credentials.user,
            "password": self.credentials.password,
            **extra,
        }
        command = [sys.executable, "-W", "error", "-m", "tests.e2e.django_app"]
        done = subprocess.run(
            [*command, self.driver, scenario, json.dumps(args)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if done.returncode != 0:
            pytest.fail(f"scenario {scenario} with {self.driver} failed:\n{done.stderr[-6000:]}")
        out = json.loads(done.stdout.splitlines()[-1])
        assert out["driver"] == self.driver
        return out["result"]


class ServerSampler(threading.Thread):
    """Counts the `app` backends of one database in pg_stat_activity until stopped."""

    def __init__(self, pg: LocalPostgres, database: str) -> None:
        super().__init__(daemon=True)
        self.pg = pg
        self.database = database
        self.stop_event = threading.Event()
        self.samples: list[int] = []

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.samples.append(self.pg.backends(user="app", database=self.database))
            self.stop_event.wait(0.005)

    def __enter__(self) -> ServerSampler:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        self.join(10)


# In session mode each connected Django thread keeps a server: room for the 20 iterator threads.
SESSION_POOL = 22


@pytest.fixture(
    scope="module",
    params=[
        ("psycopg", "transaction"),
        ("psycopg2", "transaction"),
        ("psycopg", "session"),
        ("psycopg2", "session"),
    ],
    ids=lambda p: f"{p[0]}-{p[1]}",
)
def site(
    request: pytest.FixtureRequest, pg: LocalPostgres, app_credentials: Credentials
) -> Iterator[DjangoSite]:
    driver, mode = request.param
    database = f"django_{driver}_{mode}"
    pg.create_database(database, owner=app_credentials.user)
    try:
        proxy = ProxyThread(
            {
                "listen": "127.0.0.1:0",
                "server": f"{pg.host}:{pg.port}",
                "users": [f"{app_credentials.user}:{app_credentials.password}"],
                "default_pool_size": str(POOL if mode == "transaction" else SESSION_POOL),
                "pool_mode": mode,
                "query_wait_timeout": "15",
            }
        ).start()
        try:
            site = DjangoSite(driver, database, proxy, app_credentials, migration={})
            yield replace(site, migration=site.run("migrate"))
        finally:
            proxy.stop()
    finally:
        pg.execute(f'DROP DATABASE "{database}" WITH (FORCE)')


def assert_shared(site: DjangoSite, pids: set[int]) -> None:
    """The threads ran on at most POOL server connections: they really were shared."""
    assert 1 <= len(pids) <= site.proxy.settings.default_pool_size, pids
    assert site.proxy.server_count() <= site.proxy.settings.default_pool_size


def test_migrate_applies_every_migration_of_the_project_through_the_proxy(
    site: DjangoSite, pg: LocalPostgres
) -> None:
    applied = site.migration["applied"]
    for migration in (
        "contenttypes.0002_remove_content_type_name",
        "auth.0012_alter_user_first_name_max_length",
        "sessions.0001_initial",
        "django_app.0001_initial",
    ):
        assert migration in applied
    tables = set(site.migration["tables"])
    assert {
        "django_migrations",
        "django_content_type",
        "auth_permission",
        "auth_user",
        "django_session",
        "django_app_account",
        "django_app_reading",
    } <= tables
    # Committed for real: a direct connection sees the same migrations and tables, owned by app.
    rows = pg.execute("SELECT app || '.' || name FROM django_migrations", database=site.database)
    assert sorted(row[0] for row in rows) == applied
    owners = pg.execute(
        "SELECT DISTINCT tableowner FROM pg_tables WHERE schemaname = 'public'",
        database=site.database,
    )
    assert owners == [("app",)]
    (permissions,) = pg.execute("SELECT count(*) FROM auth_permission", database=site.database)
    assert permissions[0] > 0  # post_migrate ran too


def test_sessions_are_created_and_read_by_six_threads_over_two_server_connections(
    site: DjangoSite, pg: LocalPostgres
) -> None:
    with ServerSampler(pg, site.database) as sampler:
        out = site.run("sessions")
    pids: set[int] = set()
    for i, client in enumerate(out["clients"]):
        assert client["loaded"] == [[i, k] for k in range(10)]
        assert client["seen"] == [True] * 10
        assert client["exists"] == [True] * 10
        assert client["expired_loads_empty"] is True
        pids.update(client["pids"])
    assert out["stored"] == 6 * 11
    assert out["after_clear"] == 6 * 10  # clear_expired removed the six expired sessions
    assert_shared(site, pids)
    assert sampler.samples
    assert max(sampler.samples) <= site.proxy.settings.default_pool_size


def test_atomic_blocks_keep_released_savepoints_and_roll_back_the_rest(
    site: DjangoSite,
) -> None:
    out = site.run("atomic")
    pids = set()
    for client in out:
        assert client["rows"] == [["kept savepoint", 2], ["outer", 10]]
        assert client["same_server_in_transaction"] is True
        assert client["in_atomic_block"] is False
        pids.add(client["pid"])
    assert_shared(site, pids)


def test_select_for_update_in_a_second_thread_waits_for_the_first_to_commit(
    site: DjangoSite, pg: LocalPostgres
) -> None:
    observer = pg.dsn(pg.superuser, pg.superuser_password, "postgres")
    out = site.run("select_for_update", observer=observer)
    assert out["b_was_seen_waiting"] is True
    assert out["a_wrote"] == 101
    assert out["b_read"] == 101  # B got the row only after A's commit
    assert out["final"] == 102
    assert out["a_pid"] != out["b_pid"]  # both transactions were open at once


def test_iterator_over_50000_rows_from_20_threads_uses_at_most_two_server_connections(
    site: DjangoSite, pg: LocalPostgres
) -> None:
    pg.execute(
        "INSERT INTO django_app_reading (n, label)"
        f" SELECT n, n::text FROM generate_series(1, {ROWS}) n",
        database=site.database,
    )
    try:
        with ServerSampler(pg, site.database) as sampler:
            out = site.run("iterate", threads=ITERATOR_THREADS, chunk_size=2000)
    finally:
        pg.execute("TRUNCATE django_app_reading", database=site.database)
    # Even threads iterate in autocommit mode, odd ones inside transaction.atomic().
    assert [c["in_atomic_block"] for c in out] == [i % 2 == 1 for i in range(ITERATOR_THREADS)]
    for client in out:
        assert client["count"] == ROWS
        assert client["total"] == ROWS * (ROWS + 1) // 2
        assert client["labels_match"] is True
        # Django's defaults: server-side cursors on.
        assert client["disable_server_side_cursors"] is None  # not set
        # Outside a transaction Django declares the cursor WITH HOLD, inside atomic() not.
        holdable = not client["in_atomic_block"]
        assert [hold for _, hold in client["open_cursors"]] == [holdable]
        assert client["open_cursors"][0][0].startswith("_django_curs_")
    assert sampler.samples
    assert max(sampler.samples) <= site.proxy.settings.default_pool_size
    assert site.proxy.server_count() <= site.proxy.settings.default_pool_size
