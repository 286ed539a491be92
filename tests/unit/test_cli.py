"""The command line: every setting has a flag, flags win, bad settings are one line and exit 2."""

import logging
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from pgproxy import __version__, cli
from pgproxy.config import DatabaseEntry, PoolMode, Settings, Upstream, UserEntry


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    """The developer's own PGPROXY_* variables must not leak into these tests."""
    for name in list(os.environ):
        if name.upper().startswith("PGPROXY_"):
            monkeypatch.delenv(name)


@pytest.fixture
def served(monkeypatch):
    """A stand-in for `pgproxy.proxy`: records the settings it is asked to serve."""
    calls: list[Settings] = []
    module = types.ModuleType("pgproxy.proxy")

    def serve(settings: Settings, reload: object = None, worker: object = None) -> int:
        calls.append(settings)
        return 0

    module.serve = serve  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pgproxy.proxy", module)
    monkeypatch.setattr(logging, "basicConfig", lambda **kwargs: None)
    return calls


@pytest.fixture
def no_proxy(monkeypatch):
    """Importing `pgproxy.proxy` fails: proves a bad setting stops before the import."""
    monkeypatch.setitem(sys.modules, "pgproxy.proxy", None)


def run(argv: list[str], served: list[Settings]) -> Settings:
    assert cli.main(argv) == 0
    assert len(served) == 1
    return served[0]


def test_short_forms_start_the_proxy_with_those_settings(served):
    settings = run(
        [
            "--listen", "127.0.0.1:6432",
            "--server", "127.0.0.1:5432",
            "--user", "alice:secret",
            "--user", "bob:other",
            "--default-pool-size", "20",
            "--pool-mode", "transaction",
            "--max-client-conn", "10000",
        ],
        served,
    )  # fmt: skip
    assert str(settings.listen) == "127.0.0.1:6432"
    assert settings.server == Upstream(host="127.0.0.1", port=5432)
    assert settings.users == (
        UserEntry(name="alice", password="secret"),
        UserEntry(name="bob", password="other"),
    )
    assert settings.default_pool_size == 20
    assert settings.pool_mode is PoolMode.TRANSACTION
    assert settings.max_client_conn == 10000


def test_server_flag_takes_a_url(served):
    settings = run(["--server", "postgresql://app:p%40ss@db:5433/appdb"], served)
    assert settings.server == Upstream(
        host="db", port=5433, user="app", password="p@ss", dbname="appdb"
    )


def test_database_flag_is_repeatable_and_needs_no_quotes(served):
    settings = run(
        [
            "--database",
            "app=dbname=x",
            "pool_size=5",
            "--database",
            "same",
            "--pool-mode",
            "session",
        ],
        served,
    )
    assert settings.databases == {
        "app": DatabaseEntry(dbname="x", pool_size=5),
        "same": DatabaseEntry(),
    }
    assert settings.pool_mode is PoolMode.SESSION


def test_database_flag_takes_a_quoted_entry(served):
    settings = run(["--database", "app=dbname=x pool_size=5"], served)
    assert settings.databases == {"app": DatabaseEntry(dbname="x", pool_size=5)}


def test_every_setting_has_a_flag_that_sets_it(served):
    settings = run(
        [
            "--auth-type", "md5",
            "--min-pool-size", "2",
            "--server-connect-timeout", "1.5",
            "--query-wait-timeout", "3",
            "--idle-transaction-timeout", "4",
            "--server-idle-timeout", "5",
            "--server-lifetime", "6",
            "--client-login-timeout", "7",
            "--shutdown-timeout", "8",
            "--server-reset-query", "",
            "--log-level", "debug",
        ],
        served,
    )  # fmt: skip
    assert settings.model_dump(
        include={
            "auth_type", "min_pool_size", "server_connect_timeout", "query_wait_timeout",
            "idle_transaction_timeout", "server_idle_timeout", "server_lifetime",
            "client_login_timeout", "shutdown_timeout", "server_reset_query", "log_level",
        }
    ) == {
        "auth_type": "md5", "min_pool_size": 2, "server_connect_timeout": 1.5,
        "query_wait_timeout": 3.0, "idle_transaction_timeout": 4.0, "server_idle_timeout": 5.0,
        "server_lifetime": 6.0, "client_login_timeout": 7.0, "shutdown_timeout": 8.0,
        "server_reset_query": "", "log_level": "debug",
    }  # fmt: skip


def test_config_flag_reads_the_toml_file_and_flags_win(served, tmp_path):
    path = tmp_path / "pgproxy.toml"
    path.write_text('default_pool_size = 5\nmax_client_conn = 50\n[users]\nalice = "a"\n')
    settings = run(["--config", str(path), "--default-pool-size", "9"], served)
    assert settings.default_pool_size == 9
    assert settings.max_client_conn == 50
    assert [user.name for user in settings.users] == ["alice"]


def test_flags_not_given_leave_environment_and_file_alone(served, tmp_path, monkeypatch):
    path = tmp_path / "pgproxy.toml"
    path.write_text("max_client_conn = 50\nquery_wait_timeout = 9\n")
    monkeypatch.setenv("PGPROXY_QUERY_WAIT_TIMEOUT", "11")
    settings = run(["--config", str(path)], served)
    assert settings.max_client_conn == 50
    assert settings.query_wait_timeout == 11.0
    assert settings.default_pool_size == 20


def test_config_file_may_be_named_in_the_environment(served, tmp_path, monkeypatch):
    path = tmp_path / "pgproxy.toml"
    path.write_text("max_client_conn = 50\n")
    monkeypatch.setenv("PGPROXY_CONFIG", str(path))
    assert run([], served).max_client_conn == 50


def test_main_returns_what_the_proxy_returns(monkeypatch):
    module = types.ModuleType("pgproxy.proxy")
    module.serve = lambda settings, reload=None, worker=None: 3  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pgproxy.proxy", module)
    monkeypatch.setattr(logging, "basicConfig", lambda **kwargs: None)
    assert cli.main([]) == 3


def test_logging_is_configured_from_log_level_before_serving(served, monkeypatch):
    configured: list[dict[str, object]] = []
    monkeypatch.setattr(logging, "basicConfig", lambda **kwargs: configured.append(kwargs))
    run(["--log-level", "warning"], served)
    assert configured == [{"level": "WARNING", "format": cli.LOG_FORMAT, "stream": sys.stderr}]


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (["--default-pool-size", "0"], "default_pool_size: must be at least 1, got 0"),
        (["--pool-mode", "statement"], "pool_mode: must be one of 'transaction' or 'session'"),
        (["--listen", "::1"], "listen: write an IPv6 address in brackets"),
        (["--server", "mysql://db"], "server: URL must start with postgresql://"),
        (["--user", "alice"], "users: entry 1 is not NAME:PASSWORD"),
        (["--user", "a:x", "--user", "a:y"], "users: user 'a' is listed twice"),
        (["--database", "app=pool_sise=5"], "databases: app: unknown key 'pool_sise'"),
        (["--max-client-conn", "lots"], "max_client_conn: must be a whole number, got 'lots'"),
        (["--min-pool-size", "30"], "min_pool_size: must be at most default_pool_size (20)"),
        (["--server-connect-timeout", "0"], "server_connect_timeout: must be greater than 0"),
        (["--log-level", "loud"], "log_level: must be one of"),
        (["--config", "/nonexistent/pgproxy.toml"], "config: /nonexistent/pgproxy.toml: no such"),
    ],
)
def test_bad_setting_prints_one_line_and_returns_2_before_importing_the_proxy(
    no_proxy, capsys, argv, line
):
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"pgproxy: invalid setting {line}")
    assert captured.err.count("\n") == 1


def test_bad_value_in_the_environment_is_reported_the_same_way(no_proxy, capsys, monkeypatch):
    monkeypatch.setenv("PGPROXY_DEFAULT_POOL_SIZE", "0")
    assert cli.main([]) == 2
    assert capsys.readouterr().err == (
        "pgproxy: invalid setting default_pool_size: must be at least 1, got 0\n"
    )


def test_unknown_key_in_the_config_file_is_named(no_proxy, capsys, tmp_path):
    path = tmp_path / "pgproxy.toml"
    path.write_text("max_clients = 5\n")
    assert cli.main(["--config", str(path)]) == 2
    assert capsys.readouterr().err == (
        f"pgproxy: invalid setting max_clients: unknown setting in {path}; "
        "did you mean max_client_conn?\n"
    )


def test_usage_errors_exit_2(no_proxy, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--no-such-flag"])
    assert info.value.code == 2
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


def test_help_lists_a_flag_for_every_setting_with_its_description(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    for name, field in Settings.model_fields.items():
        assert f"--{name.replace('_', '-')} " in text, name
        assert " ".join(str(field.description).split()) in text, name
        assert f"Env: PGPROXY_{name.upper()}." in text, name
    for flag in ("--config PATH", "--version", "--user NAME:PASSWORD", "--database ALIAS"):
        assert flag in text


def test_help_shows_defaults():
    text = " ".join(cli.build_parser().format_help().split())
    assert "Default: 20." in text
    assert "Default: transaction." in text
    assert "Default: 0.0.0.0:6432." in text
    assert "Default: DISCARD ALL." in text


def test_version_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"pgproxy {__version__}\n"


def test_python_dash_m_pgproxy_reports_a_bad_setting_without_a_traceback(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(cli.__file__).parents[1])}
    result = subprocess.run(
        [sys.executable, "-m", "pgproxy", "--max-client-conn", "0"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        check=False,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr == "pgproxy: invalid setting max_client_conn: must be at least 1, got 0\n"
