"""pgbouncer.ini → pgproxy settings: the ini syntax, includes, auth_file, every mapping rule,
one warning per unsupported key with its file:line, and the `--pgbouncer-config` flag."""

import logging
import os
import sys
import textwrap
import types
from pathlib import Path

import pytest

from pgproxy import cli
from pgproxy.config import DatabaseEntry, PoolMode, Settings, Upstream, UserEntry, load_settings
from pgproxy.errors import ConfigError
from pgproxy.pgbouncer_ini import (
    MAX_INCLUDE_DEPTH,
    Conversion,
    convert,
    parse_auth_file,
    parse_connstring,
    parse_ini,
)
from pgproxy.wire.scram import format_scram_secret, make_scram_secret, md5_secret

# Few iterations: these tests never log in, they only need the secret's shape.
SCRAM = format_scram_secret(make_scram_secret("app-secret", salt=b"0123456789abcdef", iterations=2))
MD5 = md5_secret("legacy", "legacy-secret")


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def ini(tmp_path: Path, text: str, userlist: str | None = None) -> Conversion:
    """Convert `text` as tmp_path/pgbouncer.ini (with tmp_path/userlist.txt if given).

    Without a [databases] section, one is added at the end (`* = host=127.0.0.1`), as real
    files have one: else each conversion would warn that it is empty.
    """
    if userlist is not None:
        write(tmp_path, "userlist.txt", userlist)
    text = textwrap.dedent(text).lstrip("\n")
    if "[databases]" not in text:
        text += "[databases]\n* = host=127.0.0.1\n"
    return convert(write(tmp_path, "pgbouncer.ini", text))


def warnings_about(conversion: Conversion, needle: str) -> list[str]:
    return [warning for warning in conversion.warnings if needle in warning]


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    """The developer's own PGPROXY_* variables must not leak into these tests."""
    for name in list(os.environ):
        if name.upper().startswith("PGPROXY_"):
            monkeypatch.delenv(name)


# --- the ini syntax ---------------------------------------------------------------------------


def test_sections_keys_and_comments_are_read_in_order(tmp_path):
    path = write(
        tmp_path,
        "pgbouncer.ini",
        """
        ; a comment
        # another
        [databases]
          app = host=db dbname=app   ; not a comment here
        "my ""big"" db" = dbname=big

        [pgbouncer]
        listen_port=6543
        server_reset_query = DISCARD ALL # kept too
        """,
    )
    entries = parse_ini(path)
    assert [(e.section, e.key, e.value, e.where.line) for e in entries] == [
        ("databases", "app", "host=db dbname=app   ; not a comment here", 4),
        ("databases", 'my "big" db', "dbname=big", 5),
        ("pgbouncer", "listen_port", "6543", 8),
        ("pgbouncer", "server_reset_query", "DISCARD ALL # kept too", 9),
    ]
    assert str(entries[0].where) == f"{path}:4"


def test_include_is_read_relative_to_the_including_file_and_continues_its_section(tmp_path):
    write(tmp_path, "conf.d/pools.ini", "default_pool_size = 7\n%include more/last.ini\n")
    write(tmp_path, "conf.d/more/last.ini", "max_client_conn = 9\n")
    main = write(
        tmp_path,
        "etc/pgbouncer.ini",
        """
        [pgbouncer]
        default_pool_size = 5
        %include ../conf.d/pools.ini
        pool_mode = transaction
        """,
    )
    entries = parse_ini(main)
    assert [(e.section, e.key, e.value) for e in entries] == [
        ("pgbouncer", "default_pool_size", "5"),
        ("pgbouncer", "default_pool_size", "7"),
        ("pgbouncer", "max_client_conn", "9"),
        ("pgbouncer", "pool_mode", "transaction"),
    ]
    assert entries[2].where.path == tmp_path / "etc/../conf.d/more/last.ini"
    # A later line wins, as in PgBouncer: the include overrides what came before it.
    assert convert(main).settings["default_pool_size"] == "7"


def test_include_may_open_a_section_that_goes_on_after_it(tmp_path):
    write(tmp_path, "dbs.ini", "[databases]\napp = dbname=app\n")
    main = write(tmp_path, "pgbouncer.ini", "%include dbs.ini\nother = dbname=other\n")
    assert [(e.section, e.key) for e in parse_ini(main)] == [
        ("databases", "app"),
        ("databases", "other"),
    ]


def test_an_absolute_include_path_is_used_as_is(tmp_path):
    extra = write(tmp_path, "elsewhere/extra.ini", "max_client_conn = 3\n")
    main = write(tmp_path, "etc/pgbouncer.ini", f"[pgbouncer]\n%include {extra}\n")
    assert [e.where.path for e in parse_ini(main)] == [extra]


def test_an_include_cycle_is_an_error_naming_the_line(tmp_path):
    write(tmp_path, "a.ini", "[pgbouncer]\n%include b.ini\n")
    write(tmp_path, "b.ini", "max_client_conn = 3\n%include a.ini\n")
    with pytest.raises(ConfigError) as info:
        parse_ini(tmp_path / "a.ini")
    assert info.value.setting == "pgbouncer_config"
    assert info.value.problem == f"{tmp_path / 'b.ini'}:2: %include a.ini includes itself (a cycle)"


def test_a_file_including_itself_is_a_cycle(tmp_path):
    write(tmp_path, "a.ini", "%include ./a.ini\n")
    with pytest.raises(ConfigError, match="a cycle"):
        parse_ini(tmp_path / "a.ini")


def test_the_same_file_may_be_included_twice_without_a_cycle(tmp_path):
    write(tmp_path, "common.ini", "max_client_conn = 3\n")
    main = write(tmp_path, "main.ini", "[pgbouncer]\n%include common.ini\n%include common.ini\n")
    assert len(parse_ini(main)) == 2


def test_includes_deeper_than_the_limit_are_an_error(tmp_path):
    for level in range(MAX_INCLUDE_DEPTH + 1):
        write(tmp_path, f"{level}.ini", f"%include {level + 1}.ini\n")
    write(tmp_path, f"{MAX_INCLUDE_DEPTH + 1}.ini", "[pgbouncer]\n")
    with pytest.raises(ConfigError, match=f"more than {MAX_INCLUDE_DEPTH} levels deep"):
        parse_ini(tmp_path / "0.ini")
    # One level less is fine.
    assert parse_ini(tmp_path / "1.ini") == []


def test_a_missing_include_names_the_including_line(tmp_path):
    main = write(tmp_path, "pgbouncer.ini", "[pgbouncer]\n%include nope.ini\n")
    with pytest.raises(ConfigError) as info:
        parse_ini(main)
    assert info.value.setting == "pgbouncer_config"
    assert info.value.problem == f"{main}:2: {tmp_path / 'nope.ini'}: no such file"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[pgbouncer]\nlisten_port 6432\n", "2: expected key = value"),
        ("listen_port = 6432\n", "1: listen_port comes before any [section]"),
        ("[pgbouncer\n", "1: expected a section name as [name]"),
        ("[]\n", "1: expected a section name as [name]"),
        ("[pgbouncer] junk\n", "1: expected a section name as [name]"),
        ('[databases]\n"app = dbname=x\n', "2: missing closing double quote"),
        ("[databases]\n= dbname=x\n", "2: expected key = value"),
        ("%exclude x.ini\n", "1: unknown directive %exclude (only %include)"),
        ("%include\n", "1: %include needs a file name"),
    ],
)
def test_syntax_errors_name_the_file_and_line(tmp_path, text, problem):
    path = write(tmp_path, "pgbouncer.ini", text)
    with pytest.raises(ConfigError) as info:
        parse_ini(path)
    assert info.value.setting == "pgbouncer_config"
    assert info.value.problem == f"{path}:{problem}"


def test_a_missing_or_unreadable_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        convert(tmp_path / "missing.ini")
    with pytest.raises(ConfigError, match="not a file"):
        convert(tmp_path)
    (tmp_path / "latin1.ini").write_bytes(b"[pgbouncer]\nlogfile = /var/log/caf\xe9\n")
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        convert(tmp_path / "latin1.ini")


# --- connection strings and the auth_file -----------------------------------------------------


def test_connection_strings_take_quoted_values(tmp_path):
    where = parse_ini(write(tmp_path, "x.ini", "[databases]\nx = y\n"))[0].where
    text = r"host = db  dbname='my ''big'' db' PASSWORD='it\'s' port=5433 empty='' user=u"
    assert parse_connstring(text, where, "databases") == {
        "host": "db",
        "dbname": "my 'big' db",
        "password": "it's",
        "port": "5433",
        "empty": "",
        "user": "u",
    }
    assert parse_connstring("", where, "databases") == {}


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("dbname='open", "missing closing single quote"),
        ("dbname='a'b", "dbname: junk after the closing quote"),
        ("host=db secret-password", "expected key=value at character 9"),
    ],
)
def test_bad_connection_strings_name_the_line_but_not_the_value(tmp_path, text, problem):
    where = parse_ini(write(tmp_path, "x.ini", "[databases]\nx = y\n"))[0].where
    with pytest.raises(ConfigError) as info:
        parse_connstring(text, where, "databases")
    assert info.value.setting == "databases"
    assert info.value.problem == f"{where}: {problem}"
    assert "secret-password" not in str(info.value)


def test_auth_file_lines_hold_plain_md5_and_scram_secrets_with_doubled_quotes(tmp_path):
    path = write(
        tmp_path,
        "userlist.txt",
        f"""
        ; comment
        "app" "{SCRAM}"
        "legacy" "{MD5}" "extra fields are ignored"

        "we""ird" "pass""word"  # so is anything after the second field
        # a comment
        "a b"	"c d"
        """,
    )
    assert [(e.name, e.secret, e.where.line) for e in parse_auth_file(path)] == [
        ("app", SCRAM, 2),
        ("legacy", MD5, 3),
        ('we"ird', 'pass"word', 5),
        ("a b", "c d", 7),
    ]


@pytest.mark.parametrize(
    "line",
    ["app password", '"app"', '"app" password', '"app" "unterminated', "'app' 'pw'", '"":"" "x"'],
)
def test_a_broken_auth_file_line_is_an_error_naming_it(tmp_path, line):
    path = write(tmp_path, "userlist.txt", f'"ok" "pw"\n{line}\n')
    with pytest.raises(ConfigError) as info:
        parse_auth_file(path)
    assert info.value.setting == "auth_file"
    assert info.value.problem.startswith(f'{path}:2: expected "user" "password"')


def test_auth_file_becomes_users_relative_to_the_ini(tmp_path):
    conversion = ini(
        tmp_path,
        """
        [pgbouncer]
        auth_type = scram-sha-256
        auth_file = userlist.txt
        """,
        f'"app" "{SCRAM}"\n"admin" "admin-pw"\n',
    )
    assert conversion.settings["users"] == {"app": SCRAM, "admin": "admin-pw"}
    assert conversion.origins["users"] == str(tmp_path / "userlist.txt")


def test_a_missing_auth_file_is_an_error_naming_the_setting_line(tmp_path):
    path = write(tmp_path, "pgbouncer.ini", "[pgbouncer]\nauth_file = /nonexistent/users.txt\n")
    with pytest.raises(ConfigError) as info:
        convert(path)
    assert info.value.setting == "auth_file"
    assert info.value.problem == f"{path}:2: /nonexistent/users.txt: no such file"


def test_auth_file_duplicates_and_empty_passwords_are_warned_about(tmp_path):
    conversion = ini(
        tmp_path,
        "[pgbouncer]\nlisten_addr = *\nauth_type = trust\nauth_file = userlist.txt\n",
        '"a" "one"\n"b" ""\n"a" "two"\n',
    )
    userlist = tmp_path / "userlist.txt"
    assert conversion.settings["users"] == {"a": "two"}
    assert conversion.warnings == (
        f"{userlist}:2: user 'b' has an empty password, which pgproxy does not accept; left out",
        f"{userlist}:3: user 'a' is listed again; this line wins",
    )


def test_no_auth_file_means_no_users_and_a_warning_unless_trust(tmp_path):
    conversion = ini(tmp_path, "[pgbouncer]\nlisten_addr = *\nauth_type = md5\n")
    assert "users" not in conversion.settings
    assert conversion.warnings == (
        f"{tmp_path / 'pgbouncer.ini'}: auth_file is not set: no user can log in",
    )
    assert ini(tmp_path, "[pgbouncer]\nlisten_addr = *\nauth_type = trust\n").warnings == ()


# --- [pgbouncer] ------------------------------------------------------------------------------

# Settings built from the file's structure, or mapped by a rule of their own.
_NOT_DIRECT = {"listen", "server", "users", "databases", "user_settings", "pool_mode", "auth_type"}
# listen_addr and auth_type set, so that the only warnings are the ones a test is about.
_QUIET = "[pgbouncer]\nlisten_addr = *\nauth_type = trust\n"


@pytest.mark.parametrize("name", sorted(set(Settings.model_fields) - _NOT_DIRECT))
def test_every_key_named_like_a_pgproxy_setting_maps_as_is(tmp_path, name):
    """Read from Settings.model_fields: a setting added to pgproxy later maps by itself."""
    value = "/abs/value" if name.endswith("_file") else f"value-of-{name}"
    conversion = ini(tmp_path, f"{_QUIET}{name} = {value}\n")
    assert conversion.settings[name] == value
    assert conversion.origins[name] == f"{tmp_path / 'pgbouncer.ini'}:4"
    assert not warnings_about(conversion, "not supported")


def test_keys_are_case_insensitive_and_relative_file_settings_follow_the_ini(tmp_path):
    file_settings = [name for name in Settings.model_fields if name.endswith("_file")]
    if not file_settings:
        pytest.skip("pgproxy has no *_file setting")
    name = file_settings[0]
    conversion = ini(tmp_path, f"[PgBouncer]\n{name.upper()} = certs/x.pem\n")
    assert conversion.settings[name] == str(tmp_path / "certs/x.pem")


def test_auth_user_gets_pgbouncers_auth_query_and_a_warning_about_auth_dbname(tmp_path):
    if "auth_user" not in Settings.model_fields:
        pytest.skip("pgproxy has no auth_user")
    conversion = ini(tmp_path, _QUIET.replace("trust", "md5") + "auth_user = pgbouncer\n")
    assert conversion.settings["auth_user"] == "pgbouncer"
    assert "FROM pg_authid WHERE rolname=$1" in str(conversion.settings["auth_query"])
    # No "auth_file is not set" warning: auth_query finds the users.
    assert conversion.warnings == (
        f"{tmp_path / 'pgbouncer.ini'}:4: auth_user without auth_dbname: PgBouncer runs "
        "auth_query in the database the client asks for, pgproxy in auth_dbname (default "
        "postgres); set auth_dbname to the database that has what auth_query reads",
    )
    conversion = ini(
        tmp_path,
        _QUIET + "auth_user = pgbouncer\nauth_query = SELECT * FROM f($1)\nauth_dbname = app\n",
    )
    assert conversion.settings["auth_query"] == "SELECT * FROM f($1)"
    assert conversion.settings["auth_dbname"] == "app"
    assert conversion.warnings == ()


def test_pgbouncer_defaults_that_differ_from_pgproxys_are_written_out(tmp_path):
    conversion = ini(tmp_path, "[pgbouncer]\nlisten_addr = *\n")
    expected = {
        "pool_mode": "session",
        "max_client_conn": "100",
        "auth_type": "md5",
        "listen": "*:6432",
        "server": "127.0.0.1:5432",
    }
    if "unix_socket_dir" in Settings.model_fields:  # PgBouncer's socket, where pgproxy has one
        expected["unix_socket_dir"] = "/tmp"
    assert conversion.settings == expected
    assert conversion.warnings == (
        f"{tmp_path / 'pgbouncer.ini'}: auth_file is not set: no user can log in",
    )


@pytest.mark.parametrize(
    ("lines", "listen", "warning"),
    [
        ("listen_addr = 10.0.0.5\nlisten_port = 6543", "10.0.0.5:6543", None),
        ("listen_addr = *", "*:6432", None),
        ("listen_addr = 127.0.0.1, *", "*:6432", None),
        ("listen_addr = ::1\nlisten_port = 7000", "[::1]:7000", None),
        ("listen_addr = 10.0.0.5, 10.0.0.6", "10.0.0.5:6432", "10.0.0.6 ignored"),
        ("listen_port = 7000", "127.0.0.1:7000", "listen_addr is not set"),
        ("", "127.0.0.1:6432", "listen_addr is not set"),
    ],
)
def test_listen_addr_and_listen_port_become_listen(tmp_path, lines, listen, warning):
    conversion = ini(tmp_path, f"[pgbouncer]\nauth_type = trust\n{lines}\n")
    assert conversion.settings["listen"] == listen
    found = warnings_about(conversion, "listen")
    assert len(found) == (warning is not None)
    if warning is not None:
        assert warning in found[0]
    load_settings({"listen": listen}, environ={})  # pgproxy reads it


@pytest.mark.parametrize(
    ("auth_type", "mapped", "warning"),
    [
        ("scram-sha-256", "scram-sha-256", None),
        ("MD5", "md5", None),
        ("trust", "trust", None),
        ("plain", "md5", "auth_type = plain (passwords sent in clear text) is not supported"),
        ("any", "trust", "auth_type = any is not supported by pgproxy; using trust"),
        ("hba", "scram-sha-256", "auth_type = hba is not supported by pgproxy; using scram"),
        ("cert", "scram-sha-256", "auth_type = cert is not supported by pgproxy; using scram"),
        ("pam", "scram-sha-256", "auth_type = pam is not supported by pgproxy; using scram"),
        ("ldap", "scram-sha-256", "auth_type = ldap is not supported by pgproxy; using scram"),
    ],
)
def test_auth_type_maps_to_the_same_or_the_safest_method(tmp_path, auth_type, mapped, warning):
    conversion = ini(
        tmp_path,
        f"[pgbouncer]\nlisten_addr = *\nauth_type = {auth_type}\nauth_file = userlist.txt\n",
        '"x" "pw"\n',
    )
    assert conversion.settings["auth_type"] == mapped
    if warning is None:
        assert conversion.warnings == ()
    else:
        (found,) = conversion.warnings
        assert found.startswith(f"{tmp_path / 'pgbouncer.ini'}:3: {warning}")


def test_cert_with_verify_full_client_tls_becomes_trust(tmp_path):
    if "client_tls_sslmode" not in Settings.model_fields:
        pytest.skip("pgproxy has no client TLS")
    conversion = ini(
        tmp_path,
        "[pgbouncer]\nlisten_addr = *\nauth_type = cert\nclient_tls_sslmode = verify-full\n",
    )
    assert conversion.settings["auth_type"] == "trust"
    assert conversion.settings["client_tls_sslmode"] == "verify-full"
    (warning,) = conversion.warnings
    assert "auth_type = cert: using trust with client_tls_sslmode = verify-full" in warning
    # verify-ca checks no name: cert falls back to passwords.
    conversion = ini(
        tmp_path,
        "[pgbouncer]\nlisten_addr = *\nauth_type = cert\nclient_tls_sslmode = verify-ca\n",
    )
    assert conversion.settings["auth_type"] == "scram-sha-256"


def test_an_unknown_auth_type_is_an_error(tmp_path):
    path = write(tmp_path, "pgbouncer.ini", "[pgbouncer]\nauth_type = kerberos\n")
    with pytest.raises(ConfigError) as info:
        convert(path)
    assert info.value.setting == "auth_type"
    assert info.value.problem.startswith(f"{path}:2: unknown value 'kerberos'")


def test_md5_with_only_scram_and_plain_secrets_switches_to_scram(tmp_path):
    conversion = ini(
        tmp_path,
        "[pgbouncer]\nlisten_addr = *\nauth_file = userlist.txt\n",  # auth_type: md5 (default)
        f'"app" "{SCRAM}"\n"admin" "pw"\n',
    )
    assert conversion.settings["auth_type"] == "scram-sha-256"
    assert conversion.settings["users"] == {"app": SCRAM, "admin": "pw"}
    (warning,) = conversion.warnings
    assert "auth_type = md5 with SCRAM secrets in auth_file" in warning


def test_md5_with_md5_and_scram_secrets_stays_md5_and_names_the_scram_users(tmp_path):
    conversion = ini(
        tmp_path,
        "[pgbouncer]\nlisten_addr = *\nauth_type = md5\nauth_file = userlist.txt\n",
        f'"app" "{SCRAM}"\n"legacy" "{MD5}"\n',
    )
    assert conversion.settings["auth_type"] == "md5"
    assert conversion.settings["users"] == {"app": SCRAM, "legacy": MD5}
    assert conversion.warnings == (
        f"{tmp_path / 'userlist.txt'}:1: user 'app' has a SCRAM secret, which cannot answer "
        "auth_type = md5 in pgproxy (PgBouncer switches the user to SCRAM); this user cannot "
        "log in",
    )


def test_scram_leaves_out_users_with_md5_secrets_and_says_so(tmp_path):
    conversion = ini(
        tmp_path,
        "[pgbouncer]\nlisten_addr = *\nauth_type = scram-sha-256\nauth_file = userlist.txt\n",
        f'"app" "{SCRAM}"\n"legacy" "{MD5}"\n"admin" "pw"\n',
    )
    assert conversion.settings["users"] == {"app": SCRAM, "admin": "pw"}
    (warning,) = conversion.warnings
    assert warning.startswith(f"{tmp_path / 'userlist.txt'}:2: user 'legacy' has an md5 secret")
    # pgproxy itself would refuse the md5 secret: the converted users load.
    load_settings(conversion.settings, environ={})


def test_pool_mode_statement_becomes_transaction_with_a_warning(tmp_path):
    conversion = ini(tmp_path, "[pgbouncer]\nlisten_addr = *\nauth_type = trust\n"
                     "pool_mode = statement\n")  # fmt: skip
    assert conversion.settings["pool_mode"] == "transaction"
    (warning,) = conversion.warnings
    assert warning.startswith(f"{tmp_path / 'pgbouncer.ini'}:4: pool_mode = statement")


def test_server_lifetime_zero_is_warned_about_and_other_values_map(tmp_path):
    conversion = ini(tmp_path, "[pgbouncer]\nlisten_addr=*\nauth_type=trust\nserver_lifetime=0\n")
    assert "server_lifetime" not in conversion.settings
    assert warnings_about(conversion, ":4: server_lifetime = 0")
    conversion = ini(tmp_path, "[pgbouncer]\nlisten_addr=*\nauth_type=trust\nserver_lifetime=60\n")
    assert conversion.settings["server_lifetime"] == "60"
    assert conversion.warnings == ()


def test_verbose_turns_on_debug_logging(tmp_path):
    assert ini(tmp_path, "[pgbouncer]\nverbose = 2\n").settings["log_level"] == "debug"
    assert "log_level" not in ini(tmp_path, "[pgbouncer]\nverbose = 0\n").settings
    with pytest.raises(ConfigError) as info:
        ini(tmp_path, "[pgbouncer]\nverbose = lots\n")
    assert info.value.setting == "verbose"


def test_unsupported_keys_get_one_warning_each_with_file_and_line(tmp_path):
    write(tmp_path, "tuning.ini", "so_reuseport = 1\nsome_future_knob = 3\n")
    conversion = ini(
        tmp_path,
        """
        [pgbouncer]
        listen_addr = *
        auth_type = trust
        logfile = /var/log/pgbouncer/pgbouncer.log
        pidfile = /run/pgbouncer/pgbouncer.pid
        tcp_defer_accept = 1
        ignore_startup_parameters = extra_float_digits
        %include tuning.ini
        users = a:b
        """,
    )
    main, tuning = tmp_path / "pgbouncer.ini", tmp_path / "tuning.ini"
    assert conversion.warnings == (
        f"{main}:4: logfile: not supported by pgproxy, ignored; pgproxy logs to stderr, for the "
        "process manager to keep",
        f"{main}:5: pidfile: not supported by pgproxy, ignored; pgproxy runs in the foreground; "
        "the process manager knows its pid",
        f"{main}:6: tcp_defer_accept: not supported by pgproxy, ignored; the system's TCP defaults "
        "apply",
        f"{main}:7: ignore_startup_parameters: not supported by pgproxy, ignored; not needed: "
        "pgproxy applies every startup parameter on the server, as a direct connection would",
        f"{tuning}:1: so_reuseport: not supported by pgproxy, ignored; workers = N (--workers N) "
        "runs N processes on one port",
        f"{tuning}:2: some_future_knob: not supported by pgproxy, ignored",
        f"{main}:9: users: pgproxy builds this setting from the file itself; give it as a flag "
        "or a PGPROXY_ variable instead; ignored",
    )
    # Values are never echoed: they may be secrets.
    assert not warnings_about(conversion, "/var/log/pgbouncer")


def test_an_unknown_section_is_warned_about_per_key(tmp_path):
    conversion = ini(tmp_path, "[pgbouncer]\nlisten_addr=*\nauth_type=trust\n[peers]\n1 = host=a\n")
    assert conversion.warnings == (
        f"{tmp_path / 'pgbouncer.ini'}:5: [peers] 1: pgproxy has no [peers] section; ignored",
    )


# --- [databases] ------------------------------------------------------------------------------


def test_databases_on_one_server_set_server_and_keep_their_pool_sizes(tmp_path):
    conversion = ini(
        tmp_path,
        _QUIET
        + """
        [databases]
        app = host=10.0.0.9 port=5433 dbname=app pool_size=3
        app_ro = host=10.0.0.9 port=5433 dbname=app pool_size=5 query_wait_timeout=-1
        reports = host=10.0.0.9 port=5433 query_wait_timeout=7
        """.replace("        ", ""),
    )
    assert conversion.warnings == ()
    assert conversion.settings["server"] == "10.0.0.9:5433"
    assert conversion.settings["databases"] == {
        "app": {"dbname": "app", "pool_size": "3"},
        "app_ro": {"dbname": "app", "pool_size": "5"},
        "reports": {"query_wait_timeout": "7"},
    }
    settings = load_settings(conversion.settings, environ={})
    assert settings.server == Upstream(host="10.0.0.9", port=5433)
    assert settings.databases["app_ro"] == DatabaseEntry(dbname="app", pool_size=5)
    assert settings.policy("reports", "anyone").query_wait_timeout == 7


def test_databases_on_several_servers_keep_their_addresses(tmp_path):
    conversion = ini(
        tmp_path,
        _QUIET + "[databases]\na = host=db1 dbname=a\nb = host=db2 port=6000\nc = host=db1\n",
    )
    assert conversion.settings["server"] == "db1:5432"
    assert conversion.settings["databases"] == {
        "a": {"dbname": "a"},
        "b": {"host": "db2", "port": "6000"},
        "c": {},
    }


def test_the_fallback_database_gives_server_and_its_dbname(tmp_path):
    conversion = ini(
        tmp_path, _QUIET + "[databases]\napp = host=db1 pool_size=4\n* = host=db2 dbname=main\n"
    )
    assert conversion.warnings == ()
    assert conversion.settings["server"] == "postgresql://db2:5432/main"
    assert conversion.settings["databases"] == {
        "app": {"host": "db1", "port": "5432", "pool_size": "4"}
    }
    settings = load_settings(conversion.settings, environ={})
    assert settings.server.dbname == "main"


def test_a_lone_fallback_database_passes_every_name_through(tmp_path):
    conversion = ini(tmp_path, _QUIET + "[databases]\n* = host=db2 port=5433\n")
    assert conversion.warnings == ()
    assert conversion.settings["server"] == "db2:5433"
    assert "databases" not in conversion.settings


def test_a_fallback_without_dbname_beside_listed_databases_is_warned_about(tmp_path):
    conversion = ini(tmp_path, _QUIET + "[databases]\napp = host=db\n* = host=db pool_size=3\n")
    assert conversion.settings["databases"] == {"app": {}}
    assert [w.split(": ", 1)[1] for w in conversion.warnings] == [
        "* pool_size: pgproxy has no per-database settings for databases that are not listed "
        "(the global setting applies); ignored",
        "* without dbname: pgproxy passes unlisted database names through only when no "
        "databases are listed; with these, other names get 3D000 (database does not exist)",
    ]


@pytest.mark.parametrize(
    ("value", "server", "warning"),
    [
        ("dbname=app", "127.0.0.1:5432", "app: no host: PgBouncer connects over its Unix socket"),
        (
            "host=/var/run/postgresql port=5433",
            "127.0.0.1:5433",
            "app: host=/var/run/postgresql is a Unix socket",
        ),
        ("host=@abstract", "127.0.0.1:5432", "app: host=@abstract is a Unix socket"),
        ("host=db1,db2", "db1:5432", "app: host lists several servers; pgproxy connects to the"),
    ],
)
def test_hosts_pgproxy_cannot_reach_as_given_are_warned_about(tmp_path, value, server, warning):
    conversion = ini(tmp_path, _QUIET + f"[databases]\napp = {value}\n")
    (found,) = conversion.warnings
    assert found.startswith(f"{tmp_path / 'pgbouncer.ini'}:5: {warning}")
    assert conversion.settings["server"] == server


def test_unsupported_database_keys_are_warned_about_per_entry(tmp_path):
    conversion = ini(
        tmp_path,
        _QUIET + "[databases]\n"
        "app = host=db pool_size=3 reserve_pool_size=2 connect_query='SELECT 1' pool_mode=session\n"
        "other = host=db pool_mode=transaction client_encoding=UTF8 future_key=1\n",
    )
    path = tmp_path / "pgbouncer.ini"
    assert conversion.settings["databases"] == {"app": {"pool_size": "3"}, "other": {}}
    assert conversion.warnings == (
        f"{path}:5: app: reserve_pool_size: not supported by pgproxy, ignored; no reserve pool; "
        "raise pool_size instead",
        f"{path}:5: app: connect_query: not supported by pgproxy, ignored; no query is run on "
        "new server connections",
        # pool_mode=session is the global mode (PgBouncer's default): nothing differs for app.
        f"{path}:6: other: pool_mode=transaction: pgproxy has one pool_mode for every pool; "
        "session applies",
        f"{path}:6: other: client_encoding: not supported by pgproxy, ignored; each client's own "
        "setting applies",
        f"{path}:6: other: future_key: not supported by pgproxy, ignored",
    )


def test_one_forced_user_on_every_database_becomes_the_server_login(tmp_path):
    conversion = ini(
        tmp_path,
        "[pgbouncer]\nlisten_addr=*\nauth_type=md5\nauth_file=userlist.txt\n[databases]\n"
        "a = host=db user=pool password='p@ss word'\nb = host=db user=pool password='p@ss word'\n",
        '"app" "pw"\n',
    )
    assert conversion.settings["server"] == "postgresql://pool:p%40ss%20word@db:5432"
    (warning,) = conversion.warnings
    assert "user=pool on every database: pgproxy logs in to the server as pool" in warning
    settings = load_settings(conversion.settings, environ={})
    assert settings.server == Upstream(host="db", user="pool", password="p@ss word")


def test_a_forced_users_password_comes_from_the_auth_file_when_plain(tmp_path):
    conversion = ini(
        tmp_path,
        "[pgbouncer]\nlisten_addr=*\nauth_type=md5\nauth_file=userlist.txt\n"
        "[databases]\na = host=db user=pool\n",
        '"pool" "pool-pw"\n',
    )
    assert conversion.settings["server"] == "postgresql://pool:pool-pw@db:5432"
    conversion = ini(
        tmp_path,
        "[pgbouncer]\nlisten_addr=*\nauth_type=md5\nauth_file=userlist.txt\n"
        "[databases]\na = host=db user=pool\n",
        f'"pool" "{md5_secret("pool", "pw")}"\n',
    )
    assert conversion.settings["server"] == "postgresql://pool@db:5432"
    assert warnings_about(conversion, "needs this user's plain-text password")


def test_forced_users_that_differ_per_database_are_warned_about(tmp_path):
    conversion = ini(
        tmp_path,
        _QUIET
        + "[databases]\na = host=db user=one password=x\nb = host=db\nc = host=db password=y\n",
    )
    path = tmp_path / "pgbouncer.ini"
    assert conversion.settings["server"] == "db:5432"
    assert conversion.warnings == (
        f"{path}:7: c: password without user; ignored",
        f"{path}:5: a: user= (one server login for this database) is supported only when every "
        "database has the same one; its clients log in to the server as themselves",
    )


def test_an_empty_databases_section_is_warned_about(tmp_path):
    conversion = ini(tmp_path, _QUIET + "[databases]\n")
    assert "server" not in conversion.settings
    assert warnings_about(conversion, "[databases] is empty: pgproxy passes every database name")


# --- [users] ----------------------------------------------------------------------------------


def test_users_section_becomes_user_settings(tmp_path):
    conversion = ini(
        tmp_path,
        _QUIET + "[users]\n"
        "report = pool_size=2 query_timeout=30 pool_mode=session max_user_connections=4\n"
        "etl = pool_mode=transaction query_wait_timeout=-1\n",
    )
    path = tmp_path / "pgbouncer.ini"
    assert conversion.settings["user_settings"] == {
        "report": {"pool_size": "2", "query_timeout": "30"}
    }
    assert conversion.warnings == (
        f"{path}:5: report: max_user_connections: not supported by pgproxy, ignored; no per-user "
        "limit; pool_size bounds each (database, user) pool",
        f"{path}:6: etl: pool_mode=transaction: pgproxy has one pool_mode for every pool; "
        "session applies",
    )
    settings = load_settings(conversion.settings, environ={})
    assert settings.policy("app", "report").pool_size == 2


# --- a whole file -----------------------------------------------------------------------------


def test_a_realistic_file_loads_as_pgproxy_settings(tmp_path):
    write(tmp_path, "pgbouncer.d/timeouts.ini", "server_idle_timeout = 300\nquery_timeout = 0\n")
    conversion = ini(
        tmp_path,
        """
        [databases]
        app = host=10.1.2.3 port=5432 dbname=app pool_size=30
        app_batch = host=10.1.2.3 port=5432 dbname=app pool_size=5

        [pgbouncer]
        listen_addr = 0.0.0.0
        listen_port = 6432
        auth_type = scram-sha-256
        auth_file = userlist.txt
        admin_users = admin
        stats_users = stats, admin
        pool_mode = transaction
        default_pool_size = 20
        max_client_conn = 2000
        max_prepared_statements = 100
        %include pgbouncer.d/timeouts.ini
        logfile = /var/log/pgbouncer/pgbouncer.log
        pidfile = /var/run/pgbouncer/pgbouncer.pid

        [users]
        admin = pool_size=2
        """,
        f'"app" "{SCRAM}"\n"admin" "admin-pw"\n"stats" "stats-pw"\n',
    )
    assert len(conversion.warnings) == 2
    settings = load_settings(conversion.settings, environ={})
    assert str(settings.listen) == "0.0.0.0:6432"
    assert settings.server == Upstream(host="10.1.2.3", port=5432)
    assert settings.auth_type.value == "scram-sha-256"
    assert settings.users == (
        UserEntry(name="app", password=SCRAM),
        UserEntry(name="admin", password="admin-pw"),
        UserEntry(name="stats", password="stats-pw"),
    )
    assert settings.admin_users == ("admin",)
    assert settings.stats_users == ("stats", "admin")
    assert settings.pool_mode is PoolMode.TRANSACTION
    assert (settings.default_pool_size, settings.max_client_conn) == (20, 2000)
    assert settings.max_prepared_statements == 100
    assert settings.server_idle_timeout == 300
    assert settings.databases == {
        "app": DatabaseEntry(dbname="app", pool_size=30),
        "app_batch": DatabaseEntry(dbname="app", pool_size=5),
    }
    assert settings.policy("app", "admin").pool_size == 2


# --- the command line -------------------------------------------------------------------------


@pytest.fixture
def served(monkeypatch):
    """A stand-in for `pgproxy.proxy`: records the settings and the reload function."""
    calls: list[tuple[Settings, object]] = []
    module = types.ModuleType("pgproxy.proxy")

    def serve(settings: Settings, reload: object = None, worker: object = None) -> int:
        calls.append((settings, reload))
        return 0

    module.serve = serve  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pgproxy.proxy", module)
    monkeypatch.setattr(logging, "basicConfig", lambda **kwargs: None)
    return calls


@pytest.fixture
def cli_ini(tmp_path):
    write(tmp_path, "userlist.txt", '"app" "app-pw"\n')
    return write(
        tmp_path,
        "pgbouncer.ini",
        """
        [databases]
        app = host=db dbname=app pool_size=3
        [pgbouncer]
        listen_addr = 127.0.0.1
        listen_port = 7432
        auth_type = scram-sha-256
        auth_file = userlist.txt
        default_pool_size = 4
        max_client_conn = 50
        query_wait_timeout = 9
        so_reuseport = 1
        """,
    )


def test_cli_serves_the_converted_settings_and_prints_each_warning(served, cli_ini, capsys):
    assert cli.main(["--pgbouncer-config", str(cli_ini), "--metrics-listen", ""]) == 0
    ((settings, _reload),) = served
    assert str(settings.listen) == "127.0.0.1:7432"
    assert settings.databases == {"app": DatabaseEntry(dbname="app", pool_size=3)}
    assert settings.default_pool_size == 4
    assert capsys.readouterr().err == (
        f"pgproxy: pgbouncer.ini: {cli_ini}:11: so_reuseport: not supported by pgproxy, ignored; "
        "workers = N (--workers N) runs N processes on one port\n"
    )


@pytest.mark.parametrize("flag", ["-q", "--quiet"])
def test_cli_quiet_prints_no_warnings(served, cli_ini, capsys, flag):
    assert cli.main([flag, "--pgbouncer-config", str(cli_ini)]) == 0
    assert capsys.readouterr().err == ""


def test_cli_flags_beat_the_environment_which_beats_the_ini(served, cli_ini, monkeypatch):
    monkeypatch.setenv("PGPROXY_MAX_CLIENT_CONN", "70")
    monkeypatch.setenv("pgproxy_query_wait_timeout", "11")  # any case, as pydantic reads it
    assert cli.main(["-q", "--pgbouncer-config", str(cli_ini), "--default-pool-size", "6"]) == 0
    ((settings, _reload),) = served
    assert settings.default_pool_size == 6  # flag over ini
    assert settings.max_client_conn == 70  # environment over ini
    assert settings.query_wait_timeout == 11
    assert settings.pool_mode is PoolMode.SESSION  # ini (PgBouncer's default) over pgproxy's


def test_cli_reload_reads_the_ini_again(served, cli_ini):
    assert cli.main(["-q", "--pgbouncer-config", str(cli_ini), "--max-client-conn", "40"]) == 0
    ((settings, reload),) = served
    assert settings.default_pool_size == 4
    cli_ini.write_text(
        cli_ini.read_text().replace("default_pool_size = 4", "default_pool_size = 8")
    )
    (tmp := cli_ini.parent / "userlist.txt").write_text('"app" "app-pw"\n"new" "new-pw"\n')
    assert callable(reload)
    again = reload()
    assert again.default_pool_size == 8
    assert again.max_client_conn == 40  # the flag still wins
    assert [user.name for user in again.users] == ["app", "new"]
    tmp.unlink()
    with pytest.raises(ConfigError, match="auth_file"):
        reload()


def test_cli_logs_warnings_that_appear_on_reload(served, cli_ini, caplog):
    assert cli.main(["--pgbouncer-config", str(cli_ini)]) == 0
    ((_settings, reload),) = served
    cli_ini.write_text(cli_ini.read_text() + "pidfile = /run/pgbouncer.pid\n")
    assert callable(reload)
    with caplog.at_level(logging.WARNING, logger="pgproxy"):
        reload()
    assert [record.getMessage() for record in caplog.records] == [
        f"pgbouncer.ini: {cli_ini}:12: pidfile: not supported by pgproxy, ignored; pgproxy runs "
        "in the foreground; the process manager knows its pid"
    ]


def test_cli_bad_value_in_the_ini_names_its_line(no_proxy, tmp_path, capsys):
    path = write(tmp_path, "pgbouncer.ini", "[pgbouncer]\nauth_type = trust\nmax_client_conn = x\n")
    assert cli.main(["--pgbouncer-config", str(path), "-q"]) == 2
    assert capsys.readouterr().err == (
        "pgproxy: invalid setting max_client_conn: must be a whole number, got 'x' "
        f"(from {path}:3)\n"
    )


@pytest.fixture
def no_proxy(monkeypatch):
    """Importing `pgproxy.proxy` fails: proves a bad setting stops before the import."""
    monkeypatch.setitem(sys.modules, "pgproxy.proxy", None)


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (
            ["--pgbouncer-config", "/nonexistent/pgbouncer.ini"],
            "pgproxy: invalid setting pgbouncer_config: /nonexistent/pgbouncer.ini: no such file",
        ),
        (
            ["--pgbouncer-config", "x.ini", "--config", "x.toml"],
            "pgproxy: give --config (PGPROXY_CONFIG) or --pgbouncer-config, not both",
        ),
        (["-d"], "pgproxy: --daemon is not supported: pgproxy runs in the foreground"),
        (["--daemon"], "pgproxy: --daemon is not supported: pgproxy runs in the foreground"),
    ],
)
def test_cli_refusals_are_one_line_and_exit_2(no_proxy, capsys, argv, line):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(line)
    assert err.count("\n") == 1


@pytest.mark.parametrize("flag", ["-V", "--version"])
def test_cli_version_has_pgbouncers_short_flag(capsys, flag):
    with pytest.raises(SystemExit) as info:
        cli.main([flag])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith("pgproxy ")


def test_cli_help_lists_the_new_flags(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--pgbouncer-config PATH", "-q, --quiet", "-d, --daemon", "-V, --version"):
        assert flag in out
