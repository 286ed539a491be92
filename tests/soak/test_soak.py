"""Soak, CI-sized: about 30 s of mixed load through a pgproxy subprocess, a PostgreSQL restart
and a burst of 500 new clients in the middle; then every check of the bench soak.

The checks (bench/soak.py, `SoakResult.checks`): every write that reported success is in the
table and none that failed or was abandoned; pgbench_history agrees with pgbench's count; the
burst was served; no client saw an error outside the restart window; nobody hung; the admin
console, /metrics and pg_stat_activity are back to rest (the console's session only, idle
servers = PostgreSQL's backends <= pool size); RSS grew at most 10 %; no traceback logged.

The ten-minute soak with a burst of 5,000 runs with PGPROXY_FULL_TESTS=1, or as a bench
section: `bench/run.py --soak` (bench/RESULTS-reliability.md).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import pytest
import soak
from targets import raise_fd_limit, resolve_allocator

from pgproxy.localpg import find_pg_bindir

# A descriptor per burst client in pgproxy, and pgproxy's other connections.
FDS_NEEDED = 2000
# pgproxy as the container image runs it: on jemalloc, which `make test` installs.
ALLOCATOR = resolve_allocator("auto")


@pytest.fixture
def pgbench() -> str:
    try:
        bundled = find_pg_bindir() / "pgbench"
    except RuntimeError as exc:
        pytest.skip(str(exc))
    found = str(bundled) if bundled.exists() else shutil.which("pgbench")
    if found is None:
        pytest.skip("no pgbench (apt-get install -y postgresql)")
    return found


def checks_text(result: soak.SoakResult) -> str:
    return "\n".join(
        f"{'pass' if c.passed else 'FAIL'}  {c.name}: {c.detail}" for c in result.checks
    )


def run(plan: soak.SoakPlan, pgbench: str, workdir: Path) -> soak.SoakResult:
    raise_fd_limit(plan.burst_clients + FDS_NEEDED)
    result = soak.run_soak(plan, pgbench, workdir)
    # The soak reports rather than raises; a check that never ran would pass silently.
    assert len(result.checks) == 10, checks_text(result)
    return result


@pytest.mark.timeout(240)
def test_a_short_soak_with_a_restart_and_a_burst_keeps_every_commit_and_leaks_nothing(
    pgbench: str, tmp_path: Path
) -> None:
    result = run(dataclasses.replace(soak.SoakPlan.ci(), allocator=ALLOCATOR), pgbench, tmp_path)
    assert not result.failures(), checks_text(result)
    # The restart happened in the middle of the load: clients saw it and went on.
    assert result.restart_seconds is not None
    assert any(ledger.errors for ledger in result.ledgers)
    assert all(ledger.ok for ledger in result.ledgers)
    # pgproxy ran on the allocator the soak was asked for, as the image's environment sets it.
    log = (tmp_path / "pgproxy.log").read_text()
    assert f"memory allocator: {ALLOCATOR}" in log, log[-2000:]


@pytest.mark.skipif(
    os.environ.get("PGPROXY_FULL_TESTS") != "1", reason="ten minutes: PGPROXY_FULL_TESTS=1"
)
@pytest.mark.timeout(1200)
def test_the_full_ten_minute_soak_with_a_burst_of_5000_passes_every_check(
    pgbench: str, tmp_path: Path
) -> None:
    result = run(soak.SoakPlan(allocator=ALLOCATOR), pgbench, tmp_path)
    assert not result.failures(), checks_text(result)
