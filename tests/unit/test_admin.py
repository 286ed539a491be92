"""The admin console without sockets: parsing, encoding, and sessions fed bytes.

Sessions run against a small stand-in for `Proxy` (settings, pools, the admin methods) and
record what they write; PAUSE's polling runs on a real event loop.
"""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass, field
from typing import Any, cast

import pytest

from pgproxy import __version__
from pgproxy.admin import (
    INT8_OID,
    NUMERIC_OID,
    TEXT_OID,
    AdminSession,
    Column,
    Command,
    columns,
    config_text,
    data_row,
    encode_result,
    parse_command,
    row_description,
    split_address,
    split_statements,
    text_value,
    whole_and_micro,
)
from pgproxy.config import Settings, load_settings
from pgproxy.core.pool import Pool, PoolKey
from pgproxy.errors import ConfigError, PgProxyError
from pgproxy.wire import messages
from pgproxy.wire.scanner import MessageScanner

# --- reading what the session writes ----------------------------------------------------------


def frames(data: bytes) -> list[tuple[str, bytes]]:
    """Backend messages as (type letter, body)."""
    scanner = MessageScanner(range(256))
    out = [(chr(code), body) for code, body, _end in scanner.feed(data)]
    assert scanner.at_boundary
    return out


def decode_row_description(body: bytes) -> list[tuple[str, int, int]]:
    """(name, type OID, format) per field."""
    (count,) = struct.unpack_from("!h", body)
    pos = 2
    fields = []
    for _ in range(count):
        nul = body.index(b"\x00", pos)
        name = body[pos:nul].decode()
        _table, _attr, oid, _size, _typmod, fmt = struct.unpack_from("!ihihih", body, nul + 1)
        fields.append((name, oid, fmt))
        pos = nul + 1 + 18
    assert pos == len(body)
    return fields


def decode_data_row(body: bytes) -> list[str | None]:
    (count,) = struct.unpack_from("!h", body)
    pos = 2
    values: list[str | None] = []
    for _ in range(count):
        (length,) = struct.unpack_from("!i", body, pos)
        pos += 4
        if length < 0:
            values.append(None)
        else:
            values.append(body[pos : pos + length].decode())
            pos += length
    assert pos == len(body)
    return values


def summary(data: bytes) -> list[str]:
    """Each message as a short line: `T version`, `D pgproxy 0.1.0`, `C SHOW`, `E 42601`, `Z I`."""
    out = []
    for code, body in frames(data):
        if code == "T":
            out.append("T " + ",".join(name for name, _oid, _fmt in decode_row_description(body)))
        elif code == "D":
            out.append("D " + "|".join("NULL" if v is None else v for v in decode_data_row(body)))
        elif code in "EN":
            out.append(f"{code} {messages.parse_fields(body)['C']}")
        elif code in "CZ":
            text = body.rstrip(b"\x00").decode()
            out.append(f"{code} {text}")
        else:
            out.append(code)
    return out


def error_message(data: bytes) -> str:
    errors = [messages.parse_fields(body) for code, body in frames(data) if code == "E"]
    assert len(errors) == 1, summary(data)
    return errors[0]["M"]


def query(sql: str) -> bytes:
    return messages.query(sql)


def message(code: str, body: bytes = b"") -> bytes:
    return code.encode() + struct.pack("!i", len(body) + 4) + body


VERSION_ANSWER = ["T version", f"D pgproxy {__version__}", "C SHOW"]


# --- a stand-in proxy ---------------------------------------------------------------------


@dataclass
class FakeProxy:
    settings: Settings
    pools: dict[PoolKey, Pool[Any, Any]] = field(default_factory=dict)
    clients: set[Any] = field(default_factory=set)
    servers: set[Any] = field(default_factory=set)
    paused_all: bool = False
    paused_databases: set[str] = field(default_factory=set)
    calls: list[tuple[str, object]] = field(default_factory=list)
    quiet_after: int = 0  # paused_and_quiet answers True from this call on
    quiet_calls: int = 0
    killable: set[int] = field(default_factory=set)
    started_at: float = 40.0  # 60 s before now()
    peers: None = None  # one worker

    def now(self) -> float:
        return 100.0

    def is_paused(self, database: str) -> bool:
        return self.paused_all or database in self.paused_databases

    def pause(self, database: str | None = None) -> None:
        self.calls.append(("pause", database))
        if database is None:
            self.paused_all = True
        else:
            self.paused_databases.add(database)

    def resume(self, database: str | None = None) -> None:
        self.calls.append(("resume", database))
        if database is None:
            self.paused_all = False
            self.paused_databases.clear()
        else:
            self.paused_databases.discard(database)

    def paused_and_quiet(self, database: str | None = None) -> bool:
        self.quiet_calls += 1
        return self.quiet_calls > self.quiet_after

    def kill_database(self, database: str) -> int:
        self.calls.append(("kill", database))
        return 3

    def kill_client(self, client_id: int) -> bool:
        self.calls.append(("kill_client", client_id))
        return client_id in self.killable

    def request_shutdown(self) -> None:
        self.calls.append(("stop", None))

    def reload(self) -> list[str]:
        # What Proxy.reload says when it was not given a way to read the settings again.
        raise ConfigError("config", "this proxy was not started from a configuration")


class ReloadingProxy(FakeProxy):
    def __init__(self, settings: Settings, outcome: list[str] | ConfigError) -> None:
        super().__init__(settings)
        self.outcome = outcome

    def reload(self) -> list[str]:
        if isinstance(self.outcome, ConfigError):
            raise self.outcome
        return self.outcome


def make_settings(**flags: object) -> Settings:
    base: dict[str, object] = {"users": ["app:app-secret", "admin:adminpw"]}
    base.update(flags)
    return load_settings(base, environ={})


@dataclass
class Console:
    """An AdminSession with what it wrote and whether it closed."""

    proxy: FakeProxy
    session: AdminSession
    written: list[bytes]
    closed: list[bool]
    # Set on every write while a test waits on a loop (see `wait_ready`).
    wrote: asyncio.Event | None = None

    def feed(self, *chunks: bytes) -> bytes:
        start = len(self.written)
        for chunk in chunks:
            self.session.feed(chunk)
        return b"".join(self.written[start:])

    async def wait_ready(self, count: int) -> bytes:
        """Everything written once `count` ReadyForQuery messages are out (timers firing)."""
        ready = messages.ready_for_query(ord("I"))
        async with asyncio.timeout(5):
            while (out := b"".join(self.written)).count(ready) < count:
                self.wrote = asyncio.Event()
                await self.wrote.wait()
        return out


def console(proxy: FakeProxy | None = None, *, may_modify: bool = True) -> Console:
    proxy = proxy or FakeProxy(make_settings())
    written: list[bytes] = []
    closed: list[bool] = []

    def write(data: bytes) -> None:
        written.append(data)
        if c.wrote is not None:
            c.wrote.set()

    session = AdminSession(
        cast(Any, proxy),
        "admin",
        may_modify=may_modify,
        write=write,
        close=lambda: closed.append(True),
    )
    c = Console(proxy, session, written, closed)
    return c


def with_app_pool(proxy: FakeProxy, *, active: int = 0) -> FakeProxy:
    pool: Pool[Any, Any] = Pool(key=PoolKey("app", "app"), size=2)
    pool.active.update(f"server-{n}" for n in range(active))
    proxy.pools[pool.key] = pool
    return proxy


# --- statements and commands --------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "statements"),
    [
        ("SHOW POOLS", ["SHOW POOLS"]),
        ("SHOW POOLS;", ["SHOW POOLS"]),
        ("  show pools ; ; RESUME;;", ["show pools", "RESUME"]),
        ("", []),
        (" ; ;", []),
        (
            "SET application_name = 'a;b'; SHOW LISTS",
            ["SET application_name = 'a;b'", "SHOW LISTS"],
        ),
        ('PAUSE "odd;name"; RESUME', ['PAUSE "odd;name"', "RESUME"]),
        ("SET x = 'it''s'; SHOW HELP", ["SET x = 'it''s'", "SHOW HELP"]),
    ],
)
def test_split_statements_splits_on_semicolons_outside_quotes(
    text: str, statements: list[str]
) -> None:
    assert split_statements(text) == statements


@pytest.mark.parametrize(
    ("statement", "command"),
    [
        ("show pools", Command("SHOW", "POOLS")),
        ("SHOW\n  Clients", Command("SHOW", "CLIENTS")),
        ("pause", Command("PAUSE")),
        ("Pause app", Command("PAUSE", "app")),
        ('PAUSE "My ""DB"""', Command("PAUSE", 'My "DB"')),
        ("resume App", Command("RESUME", "App")),
        ("kill app", Command("KILL", "app")),
        ("kill_client 17", Command("KILL_CLIENT", "17")),
        ("reload", Command("RELOAD")),
        ("SHUTDOWN", Command("SHUTDOWN")),
        ("set extra_float_digits to 3", Command("SET")),
        ("SET", Command("SET")),
    ],
)
def test_parse_command_is_case_insensitive_and_keeps_names_as_written(
    statement: str, command: Command
) -> None:
    assert parse_command(statement) == command


@pytest.mark.parametrize(
    ("statement", "sqlstate", "words"),
    [
        ("SELECT 1", "42601", "unknown admin console command"),
        ("SHOW", "42601", "SHOW needs an item"),
        ("SHOW POOLS now", "42601", "too many arguments"),
        ("KILL", "42601", "KILL needs a database"),
        ("KILL_CLIENT", "42601", "KILL_CLIENT needs a client id"),
        ("RELOAD everything", "42601", "too many arguments"),
        ("PAUSE a b", "42601", "too many arguments"),
        ('PAUSE "app', "42601", "unterminated quoted identifier"),
        ("SUSPEND", "0A000", "not supported by pgproxy"),
    ],
)
def test_parse_command_refuses_what_is_not_a_command(
    statement: str, sqlstate: str, words: str
) -> None:
    with pytest.raises(PgProxyError, match=words) as caught:
        parse_command(statement)
    assert caught.value.sqlstate == sqlstate
    assert caught.value.severity == "ERROR"


# --- encoding -----------------------------------------------------------------------------


def test_columns_spec_gives_text_int8_and_numeric_types() -> None:
    assert columns("database cl_active:i wait_seconds:n") == (
        Column("database", TEXT_OID),
        Column("cl_active", INT8_OID),
        Column("wait_seconds", NUMERIC_OID),
    )


def test_row_description_lists_names_and_types_in_text_format() -> None:
    raw = row_description(columns("name items:i seconds:n"))
    [(code, body)] = frames(raw)
    assert code == "T"
    assert decode_row_description(body) == [
        ("name", TEXT_OID, 0),
        ("items", INT8_OID, 0),
        ("seconds", NUMERIC_OID, 0),
    ]


def test_data_row_sends_text_and_null() -> None:
    [(code, body)] = frames(data_row(("app", 3, 1.23456, None, True, "é")))
    assert code == "D"
    assert decode_data_row(body) == ["app", "3", "1.235", None, "1", "é"]


def test_text_value_formats_seconds_to_milliseconds() -> None:
    assert text_value(None) is None
    assert text_value(0.0) == "0.000"
    assert text_value(False) == "0"
    assert text_value(12) == "12"


def test_encode_result_is_description_rows_and_tag() -> None:
    raw = encode_result(columns("list items:i"), [("pools", 2), ("users", 5)], "SHOW")
    assert summary(raw) == ["T list,items", "D pools|2", "D users|5", "C SHOW"]


def test_encode_result_refuses_a_row_of_the_wrong_width() -> None:
    with pytest.raises(ValueError, match="2 values for 1 columns"):
        encode_result(columns("version"), [("a", "b")], "SHOW")


@pytest.mark.parametrize(
    ("address", "parts"),
    [
        ("127.0.0.1:5432", ("127.0.0.1", 5432)),
        ("::1:6000", ("::1", 6000)),
        ("unix-socket", ("unix-socket", None)),
    ],
)
def test_split_address(address: str, parts: tuple[str, int | None]) -> None:
    assert split_address(address) == parts


def test_whole_and_micro_splits_seconds_like_pgbouncers_wait_columns() -> None:
    assert whole_and_micro(1.5) == (1, 500_000)
    assert whole_and_micro(0.0000014) == (0, 1)
    assert whole_and_micro(-1.0) == (0, 0)


def test_config_text_never_shows_passwords() -> None:
    settings = make_settings(
        server="postgresql://pooler:serverpw@db.example:5433/main",
        databases=["app=dbname=application pool_size=5", "other"],
        admin_users="admin",
    )
    assert config_text(settings.users) == "app,admin"
    assert config_text(settings.server) == "postgresql://pooler@db.example:5433/main"
    assert config_text(settings.databases) == "app=dbname=application pool_size=5; other"
    assert config_text(settings.pool_mode) == "transaction"
    assert config_text(settings.track_statement_text) == "true"
    assert config_text(settings.metrics_listen) == "0.0.0.0:9127"
    assert config_text(None) == ""
    assert config_text(2.5) == "2.5"


# --- sessions: framing ----------------------------------------------------------------------


def test_a_query_split_byte_by_byte_gets_one_answer() -> None:
    c = console()
    raw = query("SHOW VERSION")
    out = c.feed(*(raw[i : i + 1] for i in range(len(raw))))
    assert summary(out) == [*VERSION_ANSWER, "Z I"]


def test_pipelined_queries_in_one_chunk_are_answered_in_order() -> None:
    c = console()
    out = c.feed(query("show version") + query("SHOW HELP; SHOW VERSION;"))
    lines = summary(out)
    assert lines[:4] == [*VERSION_ANSWER, "Z I"]
    assert lines[4] == "T command,description"
    assert lines[-4:] == [*VERSION_ANSWER, "Z I"]


def test_an_empty_query_gets_empty_query_response() -> None:
    assert summary(console().feed(query(" ; "))) == ["I", "Z I"]


def test_an_error_ends_the_query_and_the_session_goes_on() -> None:
    c = console()
    out = c.feed(query("SHOW VERSION; SHOW NOPE; SHOW VERSION"))
    assert summary(out) == [*VERSION_ANSWER, "E 42704", "Z I"]
    assert "unknown SHOW item 'NOPE'" in error_message(out)
    assert summary(c.feed(query("SET application_name = 'x'"))) == ["C SET", "Z I"]


def test_extended_protocol_gets_one_error_and_ready_for_query_at_sync() -> None:
    c = console()
    parse = message("P", b"\x00SHOW POOLS\x00\x00\x00")
    bind = message("B", b"\x00\x00\x00\x00\x00\x00\x00\x00")
    execute = message("E", b"\x00\x00\x00\x00\x00")
    out = c.feed(parse + bind + execute, message("S"))
    assert summary(out) == ["E 0A000", "Z I"]
    assert error_message(out) == "the admin console speaks the simple query protocol only"
    assert summary(c.feed(query("SHOW VERSION"))) == [*VERSION_ANSWER, "Z I"]
    assert not c.closed


def test_function_call_gets_an_error_and_ready_for_query() -> None:
    out = console().feed(message("F", b"\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00"))
    assert summary(out) == ["E 0A000", "Z I"]


def test_copy_messages_outside_copy_are_ignored() -> None:
    out = console().feed(message("d", b"x") + message("c") + query("SHOW VERSION"))
    assert summary(out) == [*VERSION_ANSWER, "Z I"]


def test_an_unknown_message_type_is_a_protocol_violation_and_closes() -> None:
    c = console()
    out = c.feed(message("p", b"secret\x00"))
    assert summary(out) == ["E 08P01"]
    assert c.closed == [True]
    assert c.feed(query("SHOW VERSION")) == b""


def test_a_message_over_1_mib_is_a_protocol_violation_and_closes() -> None:
    c = console()
    out = c.feed(b"Q" + struct.pack("!i", (1 << 20) + 5))
    assert summary(out) == ["E 08P01"]
    assert "over the limit" in error_message(out)
    assert c.closed == [True]


def test_terminate_closes_and_later_bytes_are_ignored() -> None:
    c = console()
    out = c.feed(query("SHOW VERSION") + message("X") + query("SHOW VERSION"))
    assert summary(out) == [*VERSION_ANSWER, "Z I"]
    assert c.closed == [True]


# --- sessions: commands ---------------------------------------------------------------------


def test_stats_user_may_show_and_set_but_nothing_else() -> None:
    c = console(may_modify=False)
    assert summary(c.feed(query("SHOW VERSION; SET x = 1"))) == [*VERSION_ANSWER, "C SET", "Z I"]
    for command in ("PAUSE", "RESUME app", "KILL app", "KILL_CLIENT 3", "RELOAD", "SHUTDOWN"):
        out = c.feed(query(command))
        assert summary(out) == ["E 42501", "Z I"], command
        assert "admin_users only" in error_message(out)
    assert c.proxy.calls == []


def test_pause_of_quiet_pools_answers_at_once() -> None:
    c = console(with_app_pool(FakeProxy(make_settings())))
    assert summary(c.feed(query("PAUSE app; RESUME app; PAUSE"))) == [
        "C PAUSE",
        "C RESUME",
        "C PAUSE",
        "Z I",
    ]
    assert c.proxy.calls == [("pause", "app"), ("resume", "app"), ("pause", None)]


def test_unknown_databases_get_3d000_but_configured_ones_without_a_pool_do_not() -> None:
    c = console(FakeProxy(make_settings(databases=["configured"])))
    for command in ("PAUSE nosuch", "RESUME nosuch", "KILL nosuch", "KILL pgproxy"):
        assert summary(c.feed(query(command))) == ["E 3D000", "Z I"], command
    assert summary(c.feed(query("PAUSE configured"))) == ["C PAUSE", "Z I"]
    assert c.proxy.calls == [("pause", "configured")]


def test_kill_reports_how_many_clients_went() -> None:
    c = console(with_app_pool(FakeProxy(make_settings())))
    out = c.feed(query("KILL app"))
    assert summary(out) == ["N 00000", "C KILL", "Z I"]
    notice = messages.parse_fields(frames(out)[0][1])["M"]
    assert notice.startswith('KILL: 3 client(s) of database "app" disconnected')


def test_kill_client_by_id() -> None:
    proxy = FakeProxy(make_settings(), killable={7})
    c = console(proxy)
    assert summary(c.feed(query("KILL_CLIENT 7"))) == ["C KILL_CLIENT", "Z I"]
    out = c.feed(query("KILL_CLIENT 8"))
    assert summary(out) == ["E 42704", "Z I"]
    assert error_message(out) == "no client with id 8"
    assert summary(c.feed(query("KILL_CLIENT seven"))) == ["E 42601", "Z I"]


def test_shutdown_asks_the_proxy_to_stop() -> None:
    c = console()
    assert summary(c.feed(query("SHUTDOWN"))) == ["C SHUTDOWN", "Z I"]
    assert c.proxy.calls == [("stop", None)]


def test_reload_sends_a_notice_per_change() -> None:
    c = console(ReloadingProxy(make_settings(), ["default_pool_size: 20 -> 30", "users: +bob"]))
    out = c.feed(query("RELOAD"))
    assert summary(out) == ["N 00000", "N 00000", "C RELOAD", "Z I"]
    notices = [messages.parse_fields(body)["M"] for code, body in frames(out) if code == "N"]
    assert notices == ["default_pool_size: 20 -> 30", "users: +bob"]
    quiet = console(ReloadingProxy(make_settings(), []))
    assert summary(quiet.feed(query("RELOAD"))) == ["N 00000", "C RELOAD", "Z I"]


def test_reload_of_a_bad_configuration_answers_22023_with_the_reason() -> None:
    c = console(
        ReloadingProxy(make_settings(), ConfigError("default_pool_size", "must be at least 1"))
    )
    out = c.feed(query("RELOAD"))
    assert summary(out) == ["E 22023", "Z I"]
    assert "default_pool_size: must be at least 1" in error_message(out)


def test_reload_of_a_proxy_without_configuration_says_so() -> None:
    out = console().feed(query("RELOAD"))
    assert summary(out) == ["E 22023", "Z I"]
    assert "not started from a configuration" in error_message(out)


# --- sessions: SHOW with no traffic ---------------------------------------------------------


def test_show_commands_answer_with_an_empty_proxy() -> None:
    c = console(FakeProxy(make_settings(admin_users="admin")))
    for item, header in [
        ("POOLS", "T database,user,cl_active,cl_waiting,sv_active,sv_idle,sv_used,sv_tested,"),
        ("CLIENTS", "T type,user,database,state,addr,port,connect_time,request_time,wait,"),
        ("SERVERS", "T type,user,database,state,addr,port,connect_time,request_time,wait,"),
        ("STATS", "T database,total_xact_count,total_query_count,total_received,total_sent,"),
        ("LEAKS", "T id,user,database,application_name,addr,port,state,holding_seconds,"),
    ]:
        lines = summary(c.feed(query(f"SHOW {item}")))
        assert lines[0].startswith(header), item
        assert lines[1:] == ["C SHOW", "Z I"], item
    lines = summary(c.feed(query("SHOW USERS")))
    assert lines[1:3] == ["D app|transaction|NULL|", "D admin|transaction|NULL|admin"]
    lines = summary(c.feed(query("SHOW DATABASES")))
    assert lines[1] == "D *|127.0.0.1|5432|NULL|NULL|20|0|transaction|0|0|0"


def test_show_pools_counts_a_pools_servers() -> None:
    proxy = with_app_pool(FakeProxy(make_settings()), active=2)
    proxy.paused_databases.add("app")
    lines = summary(console(proxy).feed(query("SHOW POOLS")))
    assert lines[1] == "D app|app|0|0|2|0|0|0|0|0|0|transaction|0|0|2|1"


def test_show_config_lists_every_setting_without_passwords() -> None:
    settings = make_settings(server="postgresql://pooler:serverpw@db.example/main")
    out = console(FakeProxy(settings)).feed(query("SHOW CONFIG"))
    rows = [decode_data_row(body) for code, body in frames(out) if code == "D"]
    assert [r[0] for r in rows] == list(Settings.model_fields)
    by_key = {r[0]: r for r in rows}
    assert by_key["users"][1:] == ["app,admin", "", "yes"]
    assert by_key["listen"][1:] == ["0.0.0.0:6432", "0.0.0.0:6432", "no"]
    for secret in (b"serverpw", b"app-secret", b"adminpw"):
        assert secret not in out


# --- sessions: PAUSE that waits -------------------------------------------------------------


def test_pause_waits_until_quiet_and_queues_what_comes_meanwhile(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("pgproxy.admin.PAUSE_POLL_INTERVAL", 0.001)
    proxy = with_app_pool(FakeProxy(make_settings(), quiet_after=3), active=1)
    c = console(proxy)

    async def main() -> bytes:
        first = c.feed(query("PAUSE; SHOW VERSION"), query("RESUME"))
        assert summary(first) == ["N 00000"]  # nothing else until the pool is quiet
        return await c.wait_ready(2)

    out = asyncio.run(main())
    assert summary(out) == ["N 00000", "C PAUSE", *VERSION_ANSWER, "Z I", "C RESUME", "Z I"]
    assert "waiting for 1 server connection(s)" in messages.parse_fields(frames(out)[0][1])["M"]
    assert proxy.quiet_calls == 4


def test_a_waiting_pauses_notice_follows_the_answers_before_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("pgproxy.admin.PAUSE_POLL_INTERVAL", 0.001)
    c = console(with_app_pool(FakeProxy(make_settings(), quiet_after=1), active=1))

    async def main() -> bytes:
        c.feed(query("SHOW VERSION; PAUSE"))
        return await c.wait_ready(1)

    out = asyncio.run(main())
    assert summary(out) == [*VERSION_ANSWER, "N 00000", "C PAUSE", "Z I"]


def test_an_internal_error_answers_xx000_and_the_session_goes_on() -> None:
    proxy = FakeProxy(make_settings())
    proxy.kill_client = None  # type: ignore[assignment,method-assign]  # calling it fails
    c = console(proxy)
    out = c.feed(query("KILL_CLIENT 1; SHOW VERSION"))
    assert summary(out) == ["E XX000", "Z I"]
    assert summary(c.feed(query("SHOW VERSION"))) == [*VERSION_ANSWER, "Z I"]


def test_a_resume_from_elsewhere_interrupts_a_waiting_pause(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("pgproxy.admin.PAUSE_POLL_INTERVAL", 0.001)
    proxy = with_app_pool(FakeProxy(make_settings(), quiet_after=10**9), active=1)
    c = console(proxy)

    async def main() -> bytes:
        c.feed(query("PAUSE app; SHOW VERSION"))
        proxy.resume("app")  # another admin session
        return await c.wait_ready(1)

    out = asyncio.run(main())
    assert summary(out) == ["N 00000", "E 57014", "Z I"]
    assert "PAUSE interrupted" in error_message(out)


def test_cancel_stops_a_waiting_pause_and_the_pools_stay_paused() -> None:
    proxy = with_app_pool(FakeProxy(make_settings(), quiet_after=10**9), active=1)
    c = console(proxy)

    async def main() -> bytes:
        c.feed(query("PAUSE"))
        c.session.cancel()
        return b"".join(c.written)

    out = asyncio.run(main())
    assert summary(out) == ["N 00000", "E 57014", "Z I"]
    assert proxy.paused_all


def test_connection_lost_cancels_the_pause_poll() -> None:
    proxy = with_app_pool(FakeProxy(make_settings(), quiet_after=10**9), active=1)
    c = console(proxy)

    async def main() -> None:
        c.feed(query("PAUSE"))
        wait = c.session._pause
        assert wait is not None and wait.timer is not None
        timer = wait.timer
        c.session.connection_lost()
        assert timer.cancelled()
        assert c.feed(query("SHOW VERSION")) == b""

    asyncio.run(main())
