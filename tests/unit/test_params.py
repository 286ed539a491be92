"""Startup settings, `options` parsing and the prelude that replays a client's settings."""

import pytest

from pgproxy.core.params import (
    TRACKED_STARTUP_PARAMS,
    build_prelude,
    canonical_name,
    is_valid_setting_name,
    parse_options,
    quote_literal,
    startup_settings,
)
from pgproxy.errors import FeatureNotSupportedError
from pgproxy.wire.codes import SqlState

# --- names ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "canonical"),
    [
        ("datestyle", "DateStyle"),
        ("DATESTYLE", "DateStyle"),
        ("timezone", "TimeZone"),
        ("IntervalStyle", "IntervalStyle"),
        ("Application_Name", "application_name"),
        ("search_path", "search_path"),
    ],
)
def test_canonical_name_is_the_servers_spelling(name: str, canonical: str) -> None:
    assert canonical_name(name) == canonical


@pytest.mark.parametrize("name", ["work_mem", "myext.flag", "a", "_x", "x" * 63, "a.b.c"])
def test_valid_setting_names(name: str) -> None:
    assert is_valid_setting_name(name)


@pytest.mark.parametrize(
    "name",
    ["", "x" * 64, "1abc", "a b", "a;b", "a..b", ".a", "a.", "caf\u00e9", "x'y", "a-b"],
)
def test_invalid_setting_names(name: str) -> None:
    assert not is_valid_setting_name(name)


def test_tracked_params_are_lower_case() -> None:
    assert all(name == name.lower() for name in TRACKED_STARTUP_PARAMS)


# --- parse_options --------------------------------------------------------------------------


def test_parse_options_dash_c_with_separate_argument() -> None:
    assert parse_options("-c work_mem=64MB") == {"work_mem": "64MB"}


def test_parse_options_dash_c_attached() -> None:
    assert parse_options("-cwork_mem=64MB") == {"work_mem": "64MB"}


def test_parse_options_double_dash_turns_dashes_into_underscores() -> None:
    assert parse_options("--statement-timeout=5s") == {"statement_timeout": "5s"}


def test_parse_options_dash_c_turns_dashes_into_underscores_too() -> None:
    assert parse_options("-c lock-timeout=1s") == {"lock_timeout": "1s"}


def test_parse_options_several_settings_and_extra_whitespace() -> None:
    assert parse_options("  -c a=1\t--b=2 \n -cc=3  ") == {"a": "1", "b": "2", "c": "3"}


def test_parse_options_canonical_names() -> None:
    assert parse_options("-c datestyle=ISO,DMY -c TIMEZONE=UTC") == {
        "DateStyle": "ISO,DMY",
        "TimeZone": "UTC",
    }


def test_parse_options_backslash_escapes_a_space() -> None:
    assert parse_options(r"-c search_path=my\ schema,public") == {"search_path": "my schema,public"}


def test_parse_options_backslash_escapes_a_backslash() -> None:
    assert parse_options(r"-c application_name=a\\b") == {"application_name": "a\\b"}


def test_parse_options_backslash_makes_any_character_literal() -> None:
    assert parse_options(r"-c application_name=\x\=") == {"application_name": "x="}


def test_parse_options_trailing_backslash_is_dropped() -> None:
    assert parse_options("-c application_name=x\\") == {"application_name": "x"}


def test_parse_options_escaped_space_alone_is_a_word() -> None:
    assert parse_options(r"-c application_name=\ ") == {"application_name": " "}


def test_parse_options_value_may_contain_equals() -> None:
    assert parse_options("-c application_name=a=b") == {"application_name": "a=b"}


def test_parse_options_empty_value_is_allowed() -> None:
    assert parse_options("-c application_name=") == {"application_name": ""}


def test_parse_options_later_setting_wins() -> None:
    assert parse_options("-c a=1 -c a=2") == {"a": "2"}


def test_parse_options_of_blank_string_is_empty() -> None:
    assert parse_options("   ") == {}


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ("-x", "unsupported startup option '-x'"),
        ("-c", "unsupported startup option '-c'"),
        ("work_mem=1", "unsupported startup option"),
        ("--work_mem", "unsupported startup option '--work_mem'"),
        ("-c work_mem", "has no value"),
        ("-cwork_mem", "has no value"),
        ("-c 1x=2", "invalid setting name '1x'"),
        ("-c a;drop=1", "invalid setting name 'a;drop'"),
        ("--=1", "invalid setting name ''"),
    ],
)
def test_parse_options_refuses_what_it_cannot_replay(options: str, fragment: str) -> None:
    with pytest.raises(FeatureNotSupportedError) as info:
        parse_options(options)
    assert fragment in info.value.message
    assert info.value.sqlstate == SqlState.FEATURE_NOT_SUPPORTED


# --- startup_settings -----------------------------------------------------------------------


def test_startup_settings_skip_keys_that_are_not_settings() -> None:
    params = {
        "user": "app",
        "database": "app",
        "replication": "false",
        "options": "",
        "_pq_.compression": "on",
        "application_name": "cvat",
    }
    assert startup_settings(params) == {"application_name": "cvat"}


def test_startup_settings_use_canonical_names() -> None:
    params = {"user": "u", "datestyle": "ISO", "timezone": "UTC", "intervalstyle": "iso_8601"}
    assert startup_settings(params) == {
        "DateStyle": "ISO",
        "TimeZone": "UTC",
        "IntervalStyle": "iso_8601",
    }


def test_startup_settings_include_options_and_let_keys_override_them() -> None:
    params = {
        "user": "u",
        "options": "-c search_path=a -c work_mem=1MB",
        "search_path": "b",
    }
    assert startup_settings(params) == {"search_path": "b", "work_mem": "1MB"}


def test_startup_settings_refuse_an_invalid_key() -> None:
    with pytest.raises(FeatureNotSupportedError, match="invalid startup parameter name"):
        startup_settings({"user": "u", "bad name": "x"})


def test_startup_settings_propagate_options_errors() -> None:
    with pytest.raises(FeatureNotSupportedError):
        startup_settings({"user": "u", "options": "-d 5"})


# --- SQL ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "literal"),
    [
        ("", "E''"),
        ("plain", "E'plain'"),
        ("it's", "E'it''s'"),
        ("a\\b", "E'a\\\\b'"),
        ("\\'", "E'\\\\'''"),
        ('"$user", public', "E'\"$user\", public'"),
    ],
)
def test_quote_literal(value: str, literal: str) -> None:
    assert quote_literal(value) == literal


def test_build_prelude_is_none_when_settings_are_equal() -> None:
    assert build_prelude({}, {}) is None
    assert build_prelude({"TimeZone": "UTC"}, {"TimeZone": "UTC"}) is None


def test_build_prelude_sets_what_differs_with_set_config() -> None:
    sql = build_prelude(
        {"application_name": "cvat", "TimeZone": "UTC", "DateStyle": "ISO"},
        {"TimeZone": "UTC", "DateStyle": "German"},
    )
    assert sql == (
        "SELECT pg_catalog.set_config(E'application_name', E'cvat', false), "
        "pg_catalog.set_config(E'DateStyle', E'ISO', false)"
    )


def test_build_prelude_resets_what_is_no_longer_wanted() -> None:
    sql = build_prelude({}, {"application_name": "old", "search_path": "x"})
    assert sql == 'RESET "application_name"; RESET "search_path"'


def test_build_prelude_sets_then_resets() -> None:
    sql = build_prelude({"search_path": "a, b"}, {"application_name": "old"})
    assert sql == (
        "SELECT pg_catalog.set_config(E'search_path', E'a, b', false); RESET \"application_name\""
    )


def test_build_prelude_quotes_values() -> None:
    sql = build_prelude({"application_name": "o'brien\\"}, {})
    assert sql == "SELECT pg_catalog.set_config(E'application_name', E'o''brien\\\\', false)"
