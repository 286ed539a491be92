"""Settings: sources and their precedence, each setting's syntax, and one-line errors."""

import base64
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest
from pydantic import ValidationError

from pgproxy.config import (
    Address,
    AuthType,
    DatabaseEntry,
    LogLevel,
    PasswordKind,
    PoolMode,
    Settings,
    Upstream,
    UserEntry,
    load_settings,
)
from pgproxy.errors import ConfigError

MD5_SECRET = "md5" + "0123456789abcdef" * 2
SCRAM_SECRET = "SCRAM-SHA-256$4096:{}${}:{}".format(
    base64.b64encode(b"salt-salt-salt!!").decode(),
    base64.b64encode(b"s" * 32).decode(),
    base64.b64encode(b"k" * 32).decode(),
)


@pytest.fixture
def toml(tmp_path: Path) -> Callable[[str], Path]:
    """Write a TOML file and return its path."""

    def write(text: str) -> Path:
        path = tmp_path / "pgproxy.toml"
        path.write_text(text)
        return path

    return write


KNOWN_TAIL = (
    "query_timeout, transaction_timeout, idle_transaction_timeout, client_idle_timeout, "
    "query_wait_timeout)"
)


def load(
    flags: Mapping[str, object] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    config_file: Path | None = None,
) -> Settings:
    return load_settings(flags or {}, config_file=config_file, environ=env or {})


def error_of(
    flags: Mapping[str, object] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    config_file: Path | None = None,
) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(flags, env=env, config_file=config_file)
    return info.value


# Defaults and precedence


def test_defaults_apply_when_no_source_sets_anything():
    settings = load()
    assert settings.listen == Address(host="0.0.0.0", port=6432)
    assert settings.server == Upstream(host="127.0.0.1", port=5432)
    assert settings.users == ()
    assert settings.databases == {}
    assert settings.auth_type is AuthType.SCRAM_SHA_256
    assert settings.pool_mode is PoolMode.TRANSACTION
    assert settings.default_pool_size == 20
    assert settings.min_pool_size == 0
    assert settings.max_client_conn == 10000
    assert settings.server_connect_timeout == 15.0
    assert settings.query_wait_timeout == 120.0
    assert settings.idle_transaction_timeout == 0.0
    assert settings.server_idle_timeout == 600.0
    assert settings.server_lifetime == 3600.0
    assert settings.client_login_timeout == 60.0
    assert settings.shutdown_timeout == 30.0
    assert settings.server_reset_query == "DISCARD ALL"
    assert settings.log_level is LogLevel.INFO


def test_flags_override_environment_which_overrides_file_which_overrides_defaults(toml):
    path = toml(
        "default_pool_size = 5\nmax_client_conn = 50\n"
        "query_wait_timeout = 7\npool_mode = 'session'\n"
    )
    env = {"PGPROXY_DEFAULT_POOL_SIZE": "6", "PGPROXY_MAX_CLIENT_CONN": "60"}
    settings = load({"default_pool_size": "7"}, env=env, config_file=path)
    assert settings.default_pool_size == 7  # flag beats environment and file
    assert settings.max_client_conn == 60  # environment beats file
    assert settings.query_wait_timeout == 7.0  # file beats default
    assert settings.pool_mode is PoolMode.SESSION
    assert settings.server_lifetime == 3600.0  # nobody set it: default


def test_a_higher_source_replaces_a_list_setting_as_a_whole(toml):
    path = toml('[users]\nalice = "a"\nbob = "b"\n\n[databases.app]\npool_size = 3\n')
    env = {"PGPROXY_USERS": "carol:c", "PGPROXY_DATABASES": "other=dbname=x"}
    settings = load(env=env, config_file=path)
    assert [user.name for user in settings.users] == ["carol"]
    assert settings.databases == {"other": DatabaseEntry(dbname="x")}


def test_environment_defaults_to_os_environ(monkeypatch):
    monkeypatch.setenv("PGPROXY_MAX_CLIENT_CONN", "123")
    assert load_settings().max_client_conn == 123


def test_environment_names_are_case_insensitive():
    assert load(env={"pgproxy_max_client_conn": "77"}).max_client_conn == 77


def test_settings_are_frozen():
    settings = load()
    with pytest.raises(ValidationError):
        settings.default_pool_size = 3  # type: ignore[misc]


# listen


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("127.0.0.1:6432", "127.0.0.1", 6432),
        ("[::1]:6432", "::1", 6432),
        (":6432", "", 6432),
        ("*:7000", "", 7000),
        ("localhost", "localhost", 6432),
        ("127.0.0.1:0", "127.0.0.1", 0),
    ],
)
def test_listen_accepts_host_port_forms(text, host, port):
    assert load({"listen": text}).listen == Address(host=host, port=port)


def test_listen_reads_as_host_port_again():
    assert str(load({"listen": "[::1]:6432"}).listen) == "[::1]:6432"
    assert str(load({"listen": "10.0.0.1:5"}).listen) == "10.0.0.1:5"


def test_listen_may_be_a_toml_table(toml):
    path = toml('[listen]\nhost = "127.0.0.1"\nport = 7001\n')
    assert load(config_file=path).listen == Address(host="127.0.0.1", port=7001)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("::1", "write an IPv6 address in brackets, e.g. [::1]:6432, got '::1'"),
        ("host:abc", "port must be a number, got 'abc'"),
        ("host:70000", "port must be at most 65535, got 70000"),
        ("[::1:6432", "missing ']' in '[::1:6432'"),
    ],
)
def test_listen_rejects_bad_addresses(text, problem):
    error = error_of({"listen": text})
    assert (error.setting, error.problem) == ("listen", problem)


# server


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("db.internal:5433", Upstream(host="db.internal", port=5433)),
        ("db.internal", Upstream(host="db.internal", port=5432)),
        ("[fd00::1]:5433", Upstream(host="fd00::1", port=5433)),
        ("postgresql://db:5433", Upstream(host="db", port=5433)),
        ("postgres://db", Upstream(host="db", port=5432)),
        ("postgresql://app@db/appdb", Upstream(host="db", user="app", dbname="appdb")),
        (
            "postgresql://app:pw@[::1]:6000/appdb",
            Upstream(host="::1", port=6000, user="app", password="pw", dbname="appdb"),
        ),
    ],
)
def test_server_accepts_host_port_and_urls(text, expected):
    assert load({"server": text}).server == expected


def test_server_url_parts_are_percent_decoded():
    server = load({"server": "postgresql://us%40er:p%3Aw%2Fd%20x@db:5432/my%20db"}).server
    assert (server.user, server.password, server.dbname) == ("us@er", "p:w/d x", "my db")


def test_server_password_is_left_out_of_repr_and_str():
    server = load({"server": "postgresql://app:hunter2@db/appdb"}).server
    assert "hunter2" not in repr(server)
    assert "hunter2" not in str(server)
    assert str(server) == "postgresql://app@db:5432/appdb"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("mysql://db", "URL must start with postgresql:// or postgres://, not mysql://"),
        ("postgresql://db/x?sslmode=require", "URL options (?key=value) are not supported"),
        ("postgresql://db:0", "port must be at least 1, got 0"),
        ("postgresql://db:99999", "port in the URL must be a number from 1 to 65535"),
        ("postgresql://:pw@db", "URL has a password but no user"),
        ("postgresql:///appdb", "needs a host, e.g. 127.0.0.1:5432"),
        ("/var/run/postgresql", "unix-domain sockets are not supported; give a TCP host"),
        ("", "needs a host, e.g. 127.0.0.1:5432"),
    ],
)
def test_server_rejects_bad_values(text, problem):
    error = error_of({"server": text})
    assert error.setting == "server"
    assert error.problem.startswith(problem)


def test_server_error_does_not_echo_the_password():
    error = error_of({"server": "postgresql://app:hunter2@db:99999"})
    assert "hunter2" not in str(error)


# users


def test_users_from_environment_split_on_commas_and_the_first_colon():
    settings = load(env={"PGPROXY_USERS": "alice:pa:ss, bob:b"})
    assert settings.users == (
        UserEntry(name="alice", password="pa:ss"),
        UserEntry(name="bob", password="b"),
    )


def test_users_from_flags_are_name_password_strings():
    settings = load({"users": ["alice:a", "bob:b:c"]})
    assert [(u.name, u.password) for u in settings.users] == [("alice", "a"), ("bob", "b:c")]


def test_users_from_a_toml_table(toml):
    path = toml(f'[users]\nalice = "a"\nbob = "{SCRAM_SECRET}"\n')
    settings = load(config_file=path)
    assert [(u.name, u.password) for u in settings.users] == [("alice", "a"), ("bob", SCRAM_SECRET)]


def test_users_from_a_toml_list(toml):
    path = toml('users = ["alice:a", "bob:b"]\n')
    assert [u.name for u in load(config_file=path).users] == ["alice", "bob"]


def test_password_kind_tells_plaintext_from_postgres_secrets():
    assert UserEntry(name="a", password="secret").password_kind is PasswordKind.PLAINTEXT
    assert UserEntry(name="a", password=MD5_SECRET).password_kind is PasswordKind.MD5
    assert UserEntry(name="a", password="md5short").password_kind is PasswordKind.PLAINTEXT
    assert UserEntry(name="a", password=SCRAM_SECRET).password_kind is PasswordKind.SCRAM_SHA_256


def test_md5_secret_is_accepted_with_md5_auth():
    settings = load({"auth_type": "md5", "users": [f"alice:{MD5_SECRET}"]})
    assert settings.users[0].password == MD5_SECRET


def test_scram_secret_is_accepted_with_md5_auth():
    # Postgres and PgBouncer switch such a login to SCRAM.
    assert load({"auth_type": "md5", "users": [f"alice:{SCRAM_SECRET}"]}).users


def test_user_passwords_are_left_out_of_repr():
    assert "hunter2" not in repr(load({"users": ["alice:hunter2"]}))


@pytest.mark.parametrize(
    ("env", "problem"),
    [
        ("alice:a,alice:b", "user 'alice' is listed twice"),
        (":secret", "entry 1 has an empty name"),
        ("alice:", "user 'alice' has an empty password"),
        ("alice:a,hunter2", "entry 2 is not NAME:PASSWORD"),
        (
            f"alice:{MD5_SECRET}",
            "user 'alice' has an md5 secret, which cannot answer scram-sha-256; "
            "give the plain password or a SCRAM secret, or set auth_type to md5",
        ),
        ("alice:SCRAM-SHA-256$4096:abc", "user 'alice' has a malformed SCRAM-SHA-256 secret"),
    ],
)
def test_users_rejects_bad_entries_without_echoing_passwords(env, problem):
    error = error_of(env={"PGPROXY_USERS": env})
    assert (error.setting, error.problem) == ("users", problem)
    assert "hunter2" not in error.problem


def test_users_from_toml_need_a_string_password(toml):
    error = error_of(config_file=toml("[users]\nalice = 123\n"))
    assert (error.setting, error.problem) == (
        "users",
        "user 'alice': the password must be a string",
    )


def test_users_from_toml_with_an_empty_password_are_rejected(toml):
    error = error_of(config_file=toml('[users]\nalice = ""\n'))
    assert (error.setting, error.problem) == ("users", "user 'alice' has an empty password")


# databases


def test_databases_from_toml_tables(toml):
    path = toml(
        '[databases.app]\ndbname = "appdb"\npool_size = 10\n\n'
        '[databases.reports]\nhost = "replica"\nport = 5433\n\n[databases.same]\n'
    )
    assert load(config_file=path).databases == {
        "app": DatabaseEntry(dbname="appdb", pool_size=10),
        "reports": DatabaseEntry(host="replica", port=5433),
        "same": DatabaseEntry(),
    }


def test_databases_from_toml_strings_use_the_pgbouncer_syntax(toml):
    path = toml('[databases]\napp = "dbname=appdb pool_size=4"\n')
    assert load(config_file=path).databases == {"app": DatabaseEntry(dbname="appdb", pool_size=4)}


def test_databases_from_environment_are_separated_by_semicolons():
    env = {"PGPROXY_DATABASES": "app=dbname=appdb pool_size=5; reports=host=replica port=5433;same"}
    assert load(env=env).databases == {
        "app": DatabaseEntry(dbname="appdb", pool_size=5),
        "reports": DatabaseEntry(host="replica", port=5433),
        "same": DatabaseEntry(),
    }


def test_databases_from_flags_are_one_entry_each():
    settings = load({"databases": ["app=dbname=appdb", "other=dbname='my db' pool_size=2"]})
    assert settings.databases == {
        "app": DatabaseEntry(dbname="appdb"),
        "other": DatabaseEntry(dbname="my db", pool_size=2),
    }


@pytest.mark.parametrize(
    ("env", "problem"),
    [
        (
            "app=dbname=x pool_sise=5",
            "app: unknown key 'pool_sise' (known: dbname, host, port, pool_size, " + KNOWN_TAIL,
        ),
        (
            "app=user=bob",
            "app: unknown key 'user' (known: dbname, host, port, pool_size, " + KNOWN_TAIL,
        ),
        ("app=dbname", "app: 'dbname' is not KEY=VALUE"),
        ("app=dbname=x dbname=y", "app: dbname is given twice"),
        ("app=pool_size=0", "app.pool_size must be at least 1, got 0"),
        ("app=port=abc", "app.port must be a whole number, got 'abc'"),
        ("app=dbname=", "app.dbname must not be empty"),
        ("app;app=dbname=x", "app is listed twice"),
        ("=dbname=x", "entry '=dbname=x' has no name; write ALIAS=dbname=NAME pool_size=N"),
        ("app=dbname='x", "app: No closing quotation"),
    ],
)
def test_databases_rejects_bad_entries_naming_the_key(env, problem):
    error = error_of(env={"PGPROXY_DATABASES": env})
    assert (error.setting, error.problem) == ("databases", problem)


def test_databases_unknown_key_in_toml_is_named(toml):
    error = error_of(config_file=toml("[databases.app]\npool_sise = 3\n"))
    assert (error.setting, error.problem) == ("databases", "app.pool_sise is not a known key")


# choices and numbers


def test_choices_are_case_insensitive():
    env = {"PGPROXY_POOL_MODE": "Session", "PGPROXY_LOG_LEVEL": "DEBUG", "PGPROXY_AUTH_TYPE": "MD5"}
    settings = load(env=env)
    assert settings.pool_mode is PoolMode.SESSION
    assert settings.log_level is LogLevel.DEBUG
    assert settings.auth_type is AuthType.MD5


@pytest.mark.parametrize(
    ("flags", "setting", "problem"),
    [
        ({"default_pool_size": "0"}, "default_pool_size", "must be at least 1, got 0"),
        ({"default_pool_size": "many"}, "default_pool_size", "must be a whole number, got 'many'"),
        ({"min_pool_size": "-1"}, "min_pool_size", "must be at least 0, got -1"),
        (
            {"default_pool_size": "5", "min_pool_size": "6"},
            "min_pool_size",
            "must be at most default_pool_size (5), got 6",
        ),
        ({"max_client_conn": "0"}, "max_client_conn", "must be at least 1, got 0"),
        (
            {"server_connect_timeout": "0"},
            "server_connect_timeout",
            "must be greater than 0, got 0",
        ),
        ({"query_wait_timeout": "-1"}, "query_wait_timeout", "must be at least 0, got -1"),
        ({"server_lifetime": "soon"}, "server_lifetime", "must be a number of seconds, got 'soon'"),
        ({"shutdown_timeout": "inf"}, "shutdown_timeout", "must be a finite number"),
        (
            {"pool_mode": "statement"},
            "pool_mode",
            "must be one of 'transaction' or 'session', got 'statement'",
        ),
        (
            {"log_level": "loud"},
            "log_level",
            "must be one of 'debug', 'info', 'warning' or 'error', got 'loud'",
        ),
        (
            {"auth_type": "password"},
            "auth_type",
            "must be one of 'scram-sha-256', 'md5' or 'trust', got 'password'",
        ),
    ],
)
def test_bad_values_name_the_setting_and_the_reason(flags, setting, problem):
    error = error_of(flags)
    assert (error.setting, error.problem) == (setting, problem)
    assert str(error) == f"{setting}: {problem}"


def test_the_first_failing_setting_is_named():
    error = error_of({"max_client_conn": "0", "default_pool_size": "0"})
    assert error.setting == "default_pool_size"


def test_bad_value_from_environment_is_reported_like_a_flag():
    error = error_of(env={"PGPROXY_DEFAULT_POOL_SIZE": "0"})
    assert str(error) == "default_pool_size: must be at least 1, got 0"


def test_empty_server_reset_query_means_none():
    assert load({"server_reset_query": ""}).server_reset_query == ""


# the TOML file


def test_unknown_key_in_toml_is_named_with_a_suggestion(toml):
    path = toml("default_pool_sise = 5\n")
    error = error_of(config_file=path)
    assert error.setting == "default_pool_sise"
    assert error.problem == f"unknown setting in {path}; did you mean default_pool_size?"


def test_unknown_flag_name_is_rejected():
    assert error_of({"bogus": "1"}).problem == "unknown setting"


def test_missing_config_file_is_an_error(tmp_path):
    error = error_of(config_file=tmp_path / "absent.toml")
    assert (error.setting, error.problem) == ("config", f"{tmp_path / 'absent.toml'}: no such file")


def test_config_path_that_is_a_directory_is_an_error(tmp_path):
    error = error_of(config_file=tmp_path)
    assert (error.setting, error.problem) == ("config", f"{tmp_path}: not a file")


def test_invalid_toml_is_an_error_with_its_position(toml):
    path = toml("default_pool_size = \n")
    error = error_of(config_file=path)
    assert error.setting == "config"
    assert error.problem.startswith(f"{path}: ")
    assert "line 1" in error.problem


def test_toml_that_is_not_utf8_is_an_error(tmp_path):
    path = tmp_path / "pgproxy.toml"
    path.write_bytes(b"\xff\xfe")
    assert error_of(config_file=path).setting == "config"


def test_pool_policy_takes_the_user_then_the_database_then_the_global_value() -> None:
    settings = load_settings(
        {
            "databases": ["app=pool_size=7 query_timeout=30", "other"],
            "user_settings": ["batch=pool_size=2 transaction_timeout=600"],
            "query_timeout": "5",
            "transaction_timeout": "60",
        },
        environ={},
    )
    app_web = settings.policy("app", "web")
    assert (app_web.pool_size, app_web.query_timeout, app_web.transaction_timeout) == (7, 30, 60)
    app_batch = settings.policy("app", "batch")
    assert (app_batch.pool_size, app_batch.query_timeout) == (2, 30)
    assert app_batch.transaction_timeout == 600
    other = settings.policy("other", "web")
    assert (other.pool_size, other.query_timeout) == (20, 5)


def test_user_settings_refuse_keys_only_a_database_has() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({"user_settings": ["batch=host=db2"]}, environ={})
    assert info.value.setting == "user_settings"
    assert "unknown key 'host'" in str(info.value)


def test_admin_users_and_metrics_listen_parse_from_text() -> None:
    settings = load_settings(
        {"admin_users": "root, ops", "stats_users": "grafana", "metrics_listen": "127.0.0.1:9200"},
        environ={},
    )
    assert settings.admin_users == ("root", "ops")
    assert settings.stats_users == ("grafana",)
    assert settings.metrics_listen is not None
    assert (settings.metrics_listen.host, settings.metrics_listen.port) == ("127.0.0.1", 9200)
    assert load_settings({"metrics_listen": ""}, environ={}).metrics_listen is None
    default = load_settings({}, environ={}).metrics_listen
    assert default is not None and default.port == 9127


def test_a_scram_secret_with_keys_of_the_wrong_length_is_refused_not_taken_as_a_password():
    short_keys = "SCRAM-SHA-256$4096:c2FsdHNhbHQ=$AAAA:AAAA"
    with pytest.raises(ConfigError) as caught:
        load_settings({"users": [f"bob:{short_keys}"]}, environ={})
    assert caught.value.setting == "users"
    assert caught.value.problem == "user 'bob': invalid SCRAM secret: keys must be 32 bytes"


# TCP keepalive


def test_tcp_keepalive_on_with_os_timings_by_default():
    settings = load({})
    assert settings.tcp_keepalive is True
    assert (settings.tcp_keepidle, settings.tcp_keepintvl, settings.tcp_keepcnt) == (0, 0, 0)
    assert settings.tcp_user_timeout == 0


@pytest.mark.parametrize(
    ("name", "text", "problem"),
    [
        ("tcp_keepcnt", "200", "must be at most 127, got 200"),
        ("tcp_keepidle", "40000", "must be at most 32767, got 40000"),
        ("tcp_keepintvl", "-1", "must be at least 0, got -1"),
        ("tcp_user_timeout", "2.5", "must be a whole number, got '2.5'"),
    ],
)
def test_tcp_settings_out_of_the_kernels_range_name_the_setting(name, text, problem):
    error = error_of({name: text})
    assert (error.setting, error.problem) == (name, problem)
