"""Fixtures shared by every test directory: one throw-away PostgreSQL cluster per run.

The cluster is session-scoped because initdb + start costs about a second; tests must
therefore leave it as they found it (drop what they create, close their connections).
Proxy fixtures live next to the tests that use them (tests/e2e/conftest.py).
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from types import FrameType

import pytest

from pgproxy import hotpath
from pgproxy.localpg import Credentials, LocalPostgres

# The ordinary application login every e2e test connects as: not a superuser, owns its database.
APP = Credentials(user="app", password="app-secret", database="app")


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config: pytest.Config) -> None:
    # A run ended by SIGTERM (`timeout`, a CI cancel) tears its fixtures down as Ctrl-C does:
    # otherwise every PostgreSQL cluster it started stays up, and slows every later run.
    signal.signal(signal.SIGTERM, _interrupt)
    # A module compiled before its source last changed: the tests would pass or fail on code
    # that the file no longer says.
    stale = hotpath.stale()
    if stale:
        raise pytest.UsageError(
            f"the compiled {', '.join(stale)} is older than its source: run `make compile`"
        )


@pytest.fixture(scope="session")
def pg() -> Iterator[LocalPostgres]:
    """A started cluster (SCRAM-SHA-256, max_connections=30) with the `app` login and database."""
    with LocalPostgres(max_connections=30) as cluster:
        cluster.create_user(APP.user, APP.password)
        cluster.create_database(APP.database, owner=APP.user)
        yield cluster


@pytest.fixture(scope="session")
def app_credentials() -> Credentials:
    return APP


@pytest.fixture
def pg_backends(pg: LocalPostgres) -> Callable[..., int]:
    """`pg_backends(user="app", database=None)`: live client backends of that user on `pg`.

    The superuser connection doing the counting is not included.
    """

    def count(user: str | None = APP.user, database: str | None = None) -> int:
        return pg.backends(user=user, database=database)

    return count
