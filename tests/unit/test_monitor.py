"""The monitor's pure parts: whom it logs in as, and how rows become a snapshot."""

from __future__ import annotations

import base64
import dataclasses
import subprocess
import sys

import pytest

from pgproxy.config import Settings, load_settings
from pgproxy.core.server_login import BackendLoginError
from pgproxy.errors import ServerError
from pgproxy.monitor import (
    UNKNOWN_STATE,
    BackendHealth,
    MonitorLogin,
    ServerMonitor,
    activity_from_rows,
    describe_error,
    monitor_login,
    state_label,
)

SCRAM_SECRET = "SCRAM-SHA-256$4096:{}${}:{}".format(
    base64.b64encode(b"salt-salt-salt!!").decode(),
    base64.b64encode(b"s" * 32).decode(),
    base64.b64encode(b"k" * 32).decode(),
)
MD5_SECRET = "md5" + "0123456789abcdef" * 2


def settings(**flags: object) -> Settings:
    return load_settings(flags, environ={})


def test_login_uses_the_forced_server_user_and_its_password():
    login = monitor_login(
        settings(server="postgresql://mon:pw@db.example:5433/prod", users=["app:secret"])
    )
    assert login == MonitorLogin("db.example", 5433, "mon", "pw", "prod")


def test_login_takes_a_forced_users_password_from_its_plaintext_users_entry():
    login = monitor_login(settings(server="postgresql://app@db", users=["app:secret"]))
    assert isinstance(login, MonitorLogin)
    assert (login.user, login.password, login.database) == ("app", "secret", "postgres")


def test_login_tries_a_forced_user_without_a_password_as_the_proxy_does():
    login = monitor_login(settings(server="postgresql://trusted@db"))
    assert isinstance(login, MonitorLogin)
    assert (login.user, login.password) == ("trusted", None)


def test_login_picks_the_first_user_with_a_plaintext_password():
    login = monitor_login(
        settings(server="db:5432", auth_type="md5", users=[f"a:{MD5_SECRET}", "b:pw-b", "c:pw-c"])
    )
    assert login == MonitorLogin("db", 5432, "b", "pw-b", "postgres")


def test_login_tries_application_users_before_console_users():
    # A converted pgbouncer.ini: its admin is often a name only the proxy knows.
    config = settings(server="db:5432", users=["admin:pw-admin", "app:pw-app"], admin_users="admin")
    assert monitor_login(config) == MonitorLogin("db", 5432, "app", "pw-app", "postgres")
    only_console = settings(server="db:5432", users=["admin:pw-admin"], admin_users="admin")
    assert monitor_login(only_console) == MonitorLogin("db", 5432, "admin", "pw-admin", "postgres")


def test_without_usable_credentials_the_monitor_says_why_and_stays_down():
    config = settings(users=[f"a:{SCRAM_SECRET}"], monitor_interval="1")
    assert isinstance(monitor_login(config), str)
    monitor = ServerMonitor(config, None)
    monitor.start()  # no thread: nothing to log in with
    health = monitor.snapshot()
    assert health is not None
    assert not health.up
    assert "no credentials" in health.reason
    monitor.stop()


def test_the_password_is_not_in_the_logins_repr():
    login = MonitorLogin("db", 5432, "mon", "hunter2", "postgres")
    assert "hunter2" not in repr(login)


@pytest.mark.parametrize(
    ("state", "label"),
    [
        ("active", "active"),
        ("idle", "idle"),
        ("idle in transaction", "idle_in_transaction"),
        ("idle in transaction (aborted)", "idle_in_transaction_aborted"),
        ("fastpath function call", "fastpath_function_call"),
        ("disabled", "disabled"),
        (None, UNKNOWN_STATE),
        ("Some New State!", "some_new_state"),
        ("???", "other"),
    ],
)
def test_server_states_become_snake_case_labels(state, label):
    assert state_label(state) == label


def test_rows_become_counts_by_state_and_application():
    rows = [
        ("active", "web", 3),
        ("idle", "web", 2),
        ("idle in transaction", "worker", 1),
        (None, "", 4),
        ("idle", None, 1),
    ]
    activity = activity_from_rows(rows, 12.5, 100)
    assert dict(activity.by_state) == {
        "active": 3,
        "idle": 3,
        "idle_in_transaction": 1,
        "idle_in_transaction_aborted": 0,
        "unknown": 4,
    }
    assert activity.by_application == (("", 5), ("web", 5), ("worker", 1))
    assert activity.oldest_transaction == 12.5
    assert activity.max_connections == 100


def test_a_transaction_younger_than_the_read_counts_as_age_zero():
    assert activity_from_rows([], -0.002, 30).oldest_transaction == 0.0


def test_snapshots_are_frozen():
    health = BackendHealth(up=False, reason="x", last_success_at=None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        health.up = True  # type: ignore[misc]


def test_errors_are_described_in_one_line():
    server_error = ServerError(
        {"S": "FATAL", "C": "28P01", "M": 'password authentication failed for user "x"'}
    )
    assert describe_error(server_error) == (
        'FATAL 28P01: password authentication failed for user "x"'
    )
    assert describe_error(ConnectionRefusedError(111, "Connection refused")) == (
        "ConnectionRefusedError: [Errno 111] Connection refused"
    )
    assert describe_error(TimeoutError()) == "no answer within 5 s"
    assert describe_error(BackendLoginError("server asked for\nGSSAPI")) == (
        "server asked for GSSAPI"
    )
    assert "\n" not in describe_error(OSError("a\nb"))


def test_the_proxy_process_loads_no_client_library():
    """The monitor and auth_query use pgproxy's own login code: pg8000 and its imports would
    add about 4 MiB to every proxy process."""
    code = (
        "import sys, pgproxy.cli, pgproxy.proxy, pgproxy.metrics, pgproxy.workers\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('pg8000', 'asn1crypto')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
