"""Which SQL pins a client to its server connection (state the pool cannot move)."""

import pytest

from pgproxy.core.session_state import SessionEffect, inspect, pins_session


@pytest.mark.parametrize(
    "sql",
    [
        b"SET work_mem = '64MB'",
        b"set statement_timeout to 5000\x00",
        b"SET SESSION search_path = app, public",
        b"SET SESSION AUTHORIZATION other",
        b"SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
        b"BEGIN; SET lock_timeout = 1; COMMIT",
        b"SELECT pg_advisory_lock(42)",
        b"SELECT pg_try_advisory_lock_shared(1, 2)",
        b"SELECT set_config('myapp.tenant', '7', false)",
        b"SELECT set_config($1, $2, false)",
        b"SELECT set_config('TimeZone', 'UTC', false), set_config('work_mem', '1MB', false)",
        b"SET ROLE reporting",
        b"RESET search_path; SET search_path = x",
        b"LISTEN jobs",
        b"PREPARE q AS SELECT 1",
        b"CREATE TEMP TABLE t (a int)",
        b"CREATE TEMPORARY TABLE t (a int)",
        b"CREATE GLOBAL TEMPORARY TABLE t (a int)",
        b"CREATE OR REPLACE TEMP VIEW v AS SELECT 1",
        b"LOAD 'auto_explain'",
        b"  -- comment\n  /* block */ SET work_mem = 1",
    ],
)
def test_statements_that_leave_session_state_pin_the_client(sql: bytes) -> None:
    assert pins_session(sql) is not None


@pytest.mark.parametrize(
    "sql",
    [
        b"SELECT 1",
        b"select * from settings where name = 'x'",
        b"INSERT INTO t VALUES (1)",
        b"SET LOCAL work_mem = '64MB'",
        b"SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
        b"SET CONSTRAINTS ALL DEFERRED",
        b"SET TimeZone = 'UTC'",
        b"SET application_name = 'web'",
        b"SET datestyle TO ISO",
        b"SET NAMES 'UTF8'",
        b"SET TIME ZONE 'Europe/Paris'",
        b"SET SESSION TIME ZONE LOCAL",
        # Django >= 4 at connect time, and older Django:
        b"SELECT set_config('TimeZone', $1, false)",
        b"SELECT set_config('TimeZone', 'UTC', false)",
        b"RESET TimeZone\x00",
        b"RESET application_name;",
        b"RESET ALL",
        b"SELECT pg_advisory_xact_lock(1)",
        b"SELECT pg_advisory_unlock(1)",
        b"DECLARE c CURSOR FOR SELECT 1",
        b"CREATE TABLE t (a int)",
        b"DISCARD ALL",
        b"UNLISTEN *",
        b"DEALLOCATE ALL",
        b"",
        b"   ",
        b"-- only a comment",
        b"/* unterminated",
    ],
)
def test_statements_without_session_state_do_not_pin(sql: bytes) -> None:
    assert pins_session(sql) is None


@pytest.mark.parametrize(
    ("sql", "effect"),
    [
        (b"RESET TimeZone\x00", SessionEffect(resets=frozenset({"TimeZone"}))),
        (b"RESET TIME ZONE", SessionEffect(resets=frozenset({"TimeZone"}))),
        (b"reset datestyle;", SessionEffect(resets=frozenset({"DateStyle"}))),
        (b"RESET search_path", SessionEffect(resets=frozenset({"search_path"}))),
        (b"RESET ALL", SessionEffect(reset_all=True)),
        (
            b"DISCARD ALL\x00",
            SessionEffect(reset_all=True, deallocate_all=True, close_all_cursors=True),
        ),
        (b"DEALLOCATE ALL", SessionEffect(deallocate_all=True)),
        (b"DEALLOCATE PREPARE ALL;", SessionEffect(deallocate_all=True)),
        (b"DEALLOCATE q", None),
        (b"BEGIN; RESET TimeZone; COMMIT", SessionEffect(resets=frozenset({"TimeZone"}))),
        (b"DISCARD PLANS", None),
        (b"SET TimeZone = 'UTC'", None),
    ],
)
def test_resets_of_tracked_settings_are_recognised(
    sql: bytes, effect: SessionEffect | None
) -> None:
    assert inspect(sql) == effect


@pytest.mark.parametrize(
    ("sql", "effect"),
    [
        (b"DECLARE c CURSOR WITH HOLD FOR SELECT 1", SessionEffect(hold_cursors=frozenset({b"c"}))),
        (
            b'declare "Curs_1" no scroll cursor with hold for select 1',
            SessionEffect(hold_cursors=frozenset({b"Curs_1"})),
        ),
        (b"DECLARE c CURSOR FOR SELECT 1", None),
        (b'CLOSE "Curs_1"', SessionEffect(closed_cursors=frozenset({b"Curs_1"}))),
        (b"close C", SessionEffect(closed_cursors=frozenset({b"c"}))),
        (b"CLOSE ALL", SessionEffect(close_all_cursors=True)),
        (
            b"DECLARE a CURSOR WITH HOLD FOR SELECT 1; CLOSE a",
            SessionEffect(closed_cursors=frozenset({b"a"})),
        ),
    ],
)
def test_with_hold_cursors_are_followed_by_name(sql: bytes, effect: SessionEffect | None) -> None:
    assert inspect(sql) == effect


@pytest.mark.parametrize(
    ("sql", "name", "value"),
    [
        (b"SET work_mem = '64MB'", "work_mem", "64MB"),
        (b"set statement_timeout to 5000\x00", "statement_timeout", "5000"),
        (b"SET search_path TO app, public;", "search_path", "app, public"),
        (b'SET search_path = "$user", public', "search_path", '"$user", public'),
        (b"SET myapp.tenant = 'it''s'", "myapp.tenant", "it's"),
    ],
)
def test_plain_sets_carry_their_value_to_be_followed(sql: bytes, name: str, value: str) -> None:
    effect = inspect(sql)
    assert effect is not None
    assert effect.sets == ((name, value),)
    assert effect.pin is not None  # the fallback, inside a transaction block


@pytest.mark.parametrize(
    "sql",
    [
        b"SET x.y = E'a'",
        b"SET work_mem = (SELECT 1)",
        b"BEGIN; SET work_mem = 1; COMMIT",
        b"SET SCHEMA 'app'",
        b"SET ROLE other",
    ],
)
def test_sets_that_cannot_be_replayed_exactly_only_pin(sql: bytes) -> None:
    effect = inspect(sql)
    assert effect is not None
    assert effect.sets == ()
    assert effect.pin is not None


def test_set_to_default_and_reset_of_any_parameter_are_resets() -> None:
    assert inspect(b"SET work_mem TO DEFAULT") == SessionEffect(resets=frozenset({"work_mem"}))
    assert inspect(b"RESET work_mem") == SessionEffect(resets=frozenset({"work_mem"}))


@pytest.mark.parametrize(
    ("sql", "pins"),
    [
        # Around the shortcuts: a statement's first byte, "EL" as its 2nd and 3rd letters,
        # and a text that ends with ';' and NUL.
        (b"SET work_mem = 1;\x00", True),
        (b"set work_mem = 1;;", True),
        (b"\x0bSET work_mem = 1", True),  # vertical tab: white space to Postgres too
        (b"\x0c/* x */LISTEN jobs;", True),
        (b"SELECT 1; SET work_mem = 1;\x00", True),
        (b"SELECT 1;\x00", False),
        (b"sElEcT 1;", False),
        (b"DELETE FROM t;\x00", False),
        (b"SE", False),
        (b"S", False),
        (b"-1", False),
        (b"/", False),
        (b";\x00", False),
        (b"LISTEN jobs;\x00", True),
        (b"SELECT 1;\x00SET work_mem = 1", False),  # Postgres reads up to the first NUL
    ],
)
def test_the_fast_paths_agree_with_the_full_reading(sql: bytes, pins: bool) -> None:
    assert (pins_session(sql) is not None) is pins
