"""ServerState: byte transcripts in, link-boundary decisions out.

Frontend bytes go through `ClientState.feed` → `ServerState.note_frontend` and backend bytes
through `ServerState.feed`, the way the shell drives them (`ClientConnection._feed_session`,
`ClientConnection.link`, `ServerConnection.data_received`). No loop, no sockets.
"""

import struct
from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgproxy.core.client import ClientState
from pgproxy.core.params import build_prelude
from pgproxy.core.server import ClientView, DisconnectReason, ServerState
from pgproxy.wire import messages
from pgproxy.wire.codes import TransactionStatus

# --- message builders ---------------------------------------------------------------------


def msg(code: str, body: bytes = b"") -> bytes:
    return code.encode() + struct.pack("!i", len(body) + 4) + body


def cstr(value: str) -> bytes:
    return value.encode() + b"\x00"


# frontend


def query(sql: str) -> bytes:
    return msg("Q", cstr(sql))


def parse(sql: str, name: str = "") -> bytes:
    return msg("P", cstr(name) + cstr(sql) + struct.pack("!h", 0))


def bind(portal: str = "", statement: str = "") -> bytes:
    return msg("B", cstr(portal) + cstr(statement) + struct.pack("!hhh", 0, 0, 0))


def describe(kind: str = "P", name: str = "") -> bytes:
    return msg("D", kind.encode() + cstr(name))


def execute(portal: str = "", max_rows: int = 0) -> bytes:
    return msg("E", cstr(portal) + struct.pack("!i", max_rows))


def close_statement(name: str) -> bytes:
    return msg("C", b"S" + cstr(name))


def function_call(oid: int) -> bytes:
    return msg("F", struct.pack("!ihhh", oid, 0, 0, 0))


def copy_data(data: bytes) -> bytes:
    return msg("d", data)


SYNC = msg("S")
FLUSH = msg("H")
COPY_DONE = msg("c")
TERMINATE = msg("X")


def copy_fail(reason: str = "client gave up") -> bytes:
    return messages.copy_fail(reason)


def extended(sql: str, *, name: str = "") -> bytes:
    """The libpq PQexecParams batch without its Sync: Parse, Bind, Describe, Execute."""
    return parse(sql, name) + bind(statement=name) + describe() + execute()


# backend

PARSE_COMPLETE = msg("1")
BIND_COMPLETE = msg("2")
CLOSE_COMPLETE = msg("3")
NO_DATA = msg("n")
COPY_DONE_B = msg("c")
EMPTY_QUERY = msg("I")


def row_description(*names: str) -> bytes:
    body = struct.pack("!h", len(names))
    for name in names:
        body += cstr(name) + struct.pack("!ihihih", 0, 0, 25, -1, -1, 0)
    return msg("T", body)


def data_row(*values: bytes) -> bytes:
    body = struct.pack("!h", len(values))
    for value in values:
        body += struct.pack("!i", len(value)) + value
    return msg("D", body)


def command_complete(tag: str) -> bytes:
    return msg("C", cstr(tag))


def ready(status: str = "I") -> bytes:
    return messages.ready_for_query(ord(status))


def error(message: str = "boom", severity: str = "ERROR", sqlstate: str = "42000") -> bytes:
    return messages.error_response(severity, sqlstate, message)


def notice(message: str) -> bytes:
    return messages.notice_response("NOTICE", "00000", message)


def copy_in_response(columns: int = 1) -> bytes:
    return msg("G", b"\x00" + struct.pack("!h", columns) + b"\x00\x00" * columns)


def copy_out_response(columns: int = 1) -> bytes:
    return msg("H", b"\x00" + struct.pack("!h", columns) + b"\x00\x00" * columns)


def copy_both_response() -> bytes:
    return msg("W", b"\x00" + struct.pack("!h", 0))


def parameter_status(name: str, value: str) -> bytes:
    return messages.parameter_status(name, value)


def select_one_reply(status: str = "I") -> bytes:
    return (
        row_description("?column?") + data_row(b"1") + command_complete("SELECT 1") + ready(status)
    )


def extended_reply(tag: str = "SELECT 1", status: str = "I") -> bytes:
    return (
        PARSE_COMPLETE
        + BIND_COMPLETE
        + row_description("x")
        + data_row(b"1")
        + command_complete(tag)
        + ready(status)
    )


WELCOME = {
    "application_name": "",
    "client_encoding": "UTF8",
    "DateStyle": "ISO, MDY",
    "IntervalStyle": "postgres",
    "is_superuser": "off",
    "server_encoding": "UTF8",
    "server_version": "16.4",
    "session_authorization": "app",
    "standard_conforming_strings": "on",
    "TimeZone": "UTC",
}


# --- a client linked to a server, driven like the shell drives them -------------------------


class Link:
    """One ClientState linked to one ServerState, fed like `ClientConnection`/`ServerConnection`."""

    def __init__(
        self,
        *,
        wanted: dict[str, str] | None = None,
        reported: dict[str, str] | None = None,
        params: dict[str, str] | None = None,
        applied: dict[str, str] | None = None,
    ) -> None:
        self.view = ClientView(dict(wanted or {}), dict(WELCOME if reported is None else reported))
        self.client = ClientState(
            id=1, user="app", database="app", connected_at=0.0, view=self.view
        )
        self.server = ServerState(
            id=1,
            created_at=0.0,
            backend_key=(4242, 99),
            params=dict(WELCOME if params is None else params),
            applied=dict(applied or {}),
        )
        # What the server was sent and what the client was sent, in order.
        self.to_server = bytearray()
        self.to_client = bytearray()

    def link(self, first: bytes) -> None:
        """The client's first bytes arrive unlinked; then `ClientConnection.link` runs."""
        out, msgs = self.client.feed(first)
        assert self.client.hold(out, msgs, now=1.0)
        self.server.client = self.view
        data, held = self.client.take_pending()
        prelude = build_prelude(self.view.wanted, self.server.applied)
        if prelude is not None:
            self.server.applied = dict(self.view.wanted)
            data = self.server.send_proxy_query(prelude) + data
        self.to_server += data
        if held:
            self.server.note_frontend(held)

    def send(self, data: bytes) -> None:
        """Client bytes while linked (`_feed_session`)."""
        out, msgs = self.client.feed(data)
        self.to_server += out
        if msgs:
            self.server.note_frontend(msgs)

    def receive(self, data: bytes) -> bytes:
        """Server bytes (`ServerConnection.data_received`); returns what reaches the client."""
        st = self.server
        if st.swallowing:
            start = st.feed(data)
            out = b"".join(st.outbox) + data[start:]
            st.outbox.clear()
        else:
            out = data
            assert st.feed(data) == 0
        self.to_client += out
        return out

    def take_drained(self) -> bool:
        drained = self.server.drained
        self.server.drained = False
        return drained

    @property
    def releasable(self) -> bool:
        """What `ClientConnection.server_drained` checks before checking the server in."""
        st = self.server
        return (
            st.is_idle
            and self.client.at_boundary
            and st.pinned is None
            and not st.unpredictable
            and st.is_clean(WELCOME)
        )


def linked(**kwargs: dict[str, str]) -> Link:
    """A Link already attached (no pending bytes), for tests that start mid-session."""
    link = Link(**kwargs)
    link.server.client = link.view
    return link


# --- simple query -------------------------------------------------------------------------


def test_simple_query_drains_and_leaves_server_idle() -> None:
    link = Link()
    link.link(query("SELECT 1"))
    assert list(link.server.queue) == [ord("Q")]
    assert not link.server.expect_nothing()

    assert link.receive(select_one_reply()) == select_one_reply()

    assert link.take_drained()
    assert link.server.is_idle
    assert link.server.transaction_status == TransactionStatus.IDLE
    assert link.releasable


def test_begin_keeps_server_in_transaction_until_commit() -> None:
    link = Link()
    link.link(query("BEGIN"))
    link.receive(command_complete("BEGIN") + ready("T"))
    assert link.take_drained()
    assert link.server.transaction_status == TransactionStatus.IN_TRANSACTION
    in_transaction = link.server.is_idle, link.releasable
    assert in_transaction == (False, False)

    link.send(query("INSERT INTO t VALUES (1)"))
    link.receive(command_complete("INSERT 0 1") + ready("T"))
    assert link.server.transaction_status == TransactionStatus.IN_TRANSACTION

    link.send(query("COMMIT"))
    link.receive(command_complete("COMMIT") + ready("I"))
    assert link.take_drained()
    assert link.server.is_idle
    assert link.releasable


def test_error_in_transaction_reports_failed_status_and_keeps_server() -> None:
    link = linked()
    link.send(query("BEGIN"))
    link.receive(command_complete("BEGIN") + ready("T"))
    link.send(query("SELECT nope"))
    link.receive(error('column "nope" does not exist', sqlstate="42703") + ready("E"))

    assert link.server.transaction_status == TransactionStatus.FAILED
    assert not link.server.is_idle
    assert not link.server.fatal
    assert link.server.proxy_error is None
    assert not link.releasable

    link.send(query("ROLLBACK"))
    link.receive(command_complete("ROLLBACK") + ready("I"))
    assert link.releasable


def test_pipelined_simple_queries_drain_only_after_the_last_ready_for_query() -> None:
    link = Link()
    link.link(query("SELECT 1") + query("SELECT 1"))
    link.receive(select_one_reply())
    assert not link.take_drained()
    assert len(link.server.queue) == 1
    link.receive(select_one_reply())
    assert link.take_drained()
    assert link.server.is_idle


def test_ready_for_query_without_status_byte_counts_as_idle() -> None:
    link = linked()
    link.send(query("BEGIN"))
    link.receive(ready("T"))
    link.send(query("COMMIT"))
    link.receive(msg("Z"))
    assert link.server.transaction_status == TransactionStatus.IDLE


def test_function_call_owes_a_ready_for_query() -> None:
    link = linked()
    link.send(function_call(1598))
    assert list(link.server.queue) == [ord("F")]
    link.receive(msg("V", struct.pack("!i", -1)) + ready("I"))
    assert link.take_drained()
    assert link.server.is_idle


def test_server_half_message_keeps_server_busy() -> None:
    link = linked()
    link.send(query("SELECT 1"))
    reply = select_one_reply()
    link.receive(reply[:-3])
    assert not link.take_drained()
    link.receive(reply[-3:])
    assert link.take_drained()
    assert link.server.is_idle


def test_server_idle_but_partial_trailing_message_is_not_idle() -> None:
    link = linked()
    link.send(query("SELECT 1"))
    link.receive(select_one_reply() + notice("hello")[:3])
    assert link.take_drained()
    assert not link.server.is_idle  # half a NoticeResponse is still to come
    assert not link.server.is_clean(WELCOME)


# --- extended protocol --------------------------------------------------------------------


def test_pipelined_extended_batches_drain_only_after_the_last_ready_for_query() -> None:
    link = Link()
    batch = extended("SELECT $1") + SYNC
    link.link(batch + batch + batch)
    assert len(link.server.queue) == 3

    link.receive(extended_reply())
    assert not link.take_drained()
    link.receive(extended_reply() + extended_reply()[:7])
    assert not link.take_drained()
    assert len(link.server.queue) == 1
    link.receive(extended_reply()[7:])
    assert link.take_drained()
    assert link.server.is_idle
    assert link.releasable


def test_extended_batch_without_sync_is_not_idle() -> None:
    link = linked()
    link.send(parse("SELECT 1") + bind() + FLUSH)
    assert not link.server.queue
    assert not link.server.is_idle
    link.receive(PARSE_COMPLETE + BIND_COMPLETE)
    assert not link.server.is_idle
    link.send(execute() + SYNC)
    link.receive(data_row(b"1") + command_complete("SELECT 1") + ready("I"))
    assert link.take_drained()
    assert link.server.is_idle


def test_error_in_extended_batch_is_answered_by_the_sync() -> None:
    link = linked()
    link.send(extended("SELECT nope") + SYNC)
    link.receive(error("syntax error", sqlstate="42601") + ready("I"))
    assert link.take_drained()
    assert link.server.is_idle


def test_named_parse_pins_the_server() -> None:
    link = linked()
    link.send(parse("SELECT 1", name="stmt1") + SYNC)
    link.receive(PARSE_COMPLETE + ready("I"))
    assert link.server.pinned == "named prepared statement"
    assert link.server.is_idle
    assert not link.server.is_clean(WELCOME)
    assert not link.releasable


def test_unnamed_parse_does_not_pin_the_server() -> None:
    link = linked()
    link.send(extended("SELECT 1") + SYNC)
    link.receive(extended_reply())
    assert link.server.pinned is None
    assert link.releasable


def test_second_named_parse_keeps_the_first_pin_reason() -> None:
    link = linked()
    link.server.pinned = "something earlier"
    link.send(parse("SELECT 1", name="s"))
    assert link.server.pinned == "something earlier"


def test_close_and_describe_are_counted_in_the_batch() -> None:
    link = linked()
    link.send(close_statement("s") + SYNC)
    link.receive(CLOSE_COMPLETE + ready("I"))
    assert link.take_drained()
    assert link.server.is_idle


def test_terminate_is_not_forwarded_and_does_not_change_accounting() -> None:
    link = linked()
    link.send(query("SELECT 1") + TERMINATE)
    assert bytes(link.to_server) == query("SELECT 1")
    assert link.client.terminated
    assert list(link.server.queue) == [ord("Q")]


def test_note_frontend_ignores_terminate_it_is_given() -> None:
    # The shell never forwards Terminate, but the accounting must not trip on it.
    server = ServerState(id=1, created_at=0.0, backend_key=None, params={})
    server.note_frontend([(ord("X"), b"", 5)])
    assert server.is_idle
    assert not server.unpredictable


# --- COPY ---------------------------------------------------------------------------------


def test_libpq_extended_copy_from_ends_idle_with_the_sync_skipped() -> None:
    link = Link()
    # PQexecParams("COPY t FROM STDIN"): Parse, Bind, Describe, Execute, Sync.
    link.link(extended("COPY t FROM STDIN") + SYNC)
    assert len(link.server.queue) == 1

    link.receive(PARSE_COMPLETE + BIND_COMPLETE + NO_DATA + copy_in_response())
    # The server ignores the Sync it reads in copy-in mode: nothing is owed any more.
    assert link.server.copy_in
    assert not link.server.queue
    assert not link.server.unpredictable
    assert not link.server.expect_nothing()

    # PQputCopyData twice, then PQputCopyEnd: CopyData, CopyData, CopyDone, Sync.
    link.send(copy_data(b"1\n"))
    link.send(copy_data(b"2\n") + COPY_DONE + SYNC)
    assert list(link.server.queue) == [ord("S")]
    assert link.server.expect_nothing() is False  # owes the Sync's ReadyForQuery, not COPY

    link.receive(command_complete("COPY 2") + ready("I"))
    assert link.take_drained()
    assert link.server.is_idle
    assert not link.server.unpredictable
    assert link.releasable


def test_extended_copy_from_with_flush_instead_of_sync_ends_idle() -> None:
    link = linked()
    link.send(parse("COPY t FROM STDIN") + bind() + execute() + FLUSH)
    assert not link.server.queue
    link.receive(PARSE_COMPLETE + BIND_COMPLETE + copy_in_response())
    assert link.server.copy_in
    assert not link.server.unpredictable
    link.send(copy_data(b"1\n") + COPY_DONE + SYNC)
    link.receive(command_complete("COPY 1") + ready("I"))
    assert link.take_drained()
    assert link.releasable


def test_syncs_queued_right_after_the_copy_execute_are_all_skipped() -> None:
    link = linked()
    link.send(extended("COPY t FROM STDIN") + SYNC + FLUSH + SYNC)
    assert len(link.server.queue) == 2
    link.receive(PARSE_COMPLETE + BIND_COMPLETE + NO_DATA + copy_in_response())
    assert not link.server.queue
    assert not link.server.unpredictable
    link.send(COPY_DONE + SYNC)
    link.receive(command_complete("COPY 0") + ready("I"))
    assert link.releasable


def test_sync_and_flush_sent_in_copy_mode_are_not_queued() -> None:
    link = linked()
    link.send(extended("COPY t FROM STDIN") + SYNC)
    link.receive(PARSE_COMPLETE + BIND_COMPLETE + NO_DATA + copy_in_response())
    link.send(copy_data(b"1\n") + FLUSH + SYNC + copy_data(b"2\n"))
    assert link.server.copy_in
    assert not link.server.queue
    assert not link.server.unpredictable
    link.send(COPY_DONE + SYNC)
    link.receive(command_complete("COPY 2") + ready("I"))
    assert link.releasable


def test_simple_copy_from_ends_idle() -> None:
    link = Link()
    link.link(query("COPY t FROM STDIN"))
    link.receive(copy_in_response())
    assert list(link.server.queue) == [ord("Q")]
    assert not link.server.expect_nothing()

    link.send(copy_data(b"1\n") + copy_data(b"2\n"))
    copying = [link.server.copy_in]
    link.send(COPY_DONE)
    copying.append(link.server.copy_in)
    assert copying == [True, False]
    link.receive(command_complete("COPY 2") + ready("I"))
    assert link.take_drained()
    assert link.server.is_idle
    assert link.releasable


def test_copy_to_stdout_needs_no_special_accounting() -> None:
    link = Link()
    link.link(query("COPY t TO STDOUT"))
    link.receive(copy_out_response() + copy_data(b"1\n") + copy_data(b"2\n"))
    assert not link.server.copy_in
    assert not link.take_drained()
    link.receive(COPY_DONE_B + command_complete("COPY 2") + ready("I"))
    assert link.take_drained()
    assert link.server.is_idle
    assert link.releasable


def test_extended_copy_to_stdout_ends_idle() -> None:
    link = linked()
    link.send(extended("COPY t TO STDOUT") + SYNC)
    link.receive(
        PARSE_COMPLETE
        + BIND_COMPLETE
        + NO_DATA
        + copy_out_response()
        + copy_data(b"1\n")
        + COPY_DONE_B
        + command_complete("COPY 1")
        + ready("I")
    )
    assert link.take_drained()
    assert link.releasable


def test_copy_fail_mid_simple_copy_ends_idle_after_the_error() -> None:
    link = linked()
    link.send(query("COPY t FROM STDIN"))
    link.receive(copy_in_response())
    link.send(copy_data(b"1\n") + copy_fail("client gave up"))
    assert not link.server.copy_in
    link.receive(error("COPY from stdin failed: client gave up", sqlstate="57014") + ready("I"))
    assert link.take_drained()
    assert link.server.is_idle
    assert link.releasable


def test_copy_fail_mid_extended_copy_ends_idle_after_the_sync() -> None:
    link = linked()
    link.send(extended("COPY t FROM STDIN") + SYNC)
    link.receive(PARSE_COMPLETE + BIND_COMPLETE + NO_DATA + copy_in_response())
    link.send(copy_data(b"1\n") + copy_fail() + SYNC)
    assert len(link.server.queue) == 1
    link.receive(error("COPY from stdin failed", sqlstate="57014") + ready("I"))
    assert link.take_drained()
    assert link.releasable


def test_server_error_during_copy_in_leaves_copy_mode() -> None:
    link = linked()
    link.send(extended("COPY t FROM STDIN") + SYNC)
    link.receive(PARSE_COMPLETE + BIND_COMPLETE + NO_DATA + copy_in_response())
    link.send(copy_data(b"not a number\n"))
    # The server fails the COPY and now discards messages until a Sync.
    link.receive(error('invalid input syntax for type integer: "not a number"', sqlstate="22P02"))
    assert not link.server.copy_in
    link.send(COPY_DONE + SYNC)
    assert not link.server.unpredictable
    link.receive(ready("I"))
    assert link.take_drained()
    assert link.releasable


def test_message_sent_during_copy_in_makes_the_server_unpredictable() -> None:
    link = linked()
    link.send(query("COPY t FROM STDIN"))
    link.receive(copy_in_response())
    link.send(query("SELECT 1"))  # the server fails the COPY on it
    assert not link.server.copy_in
    assert link.server.unpredictable
    assert not link.releasable


def test_pipelined_query_after_simple_copy_is_unpredictable() -> None:
    link = Link()
    link.link(query("COPY t FROM STDIN") + query("SELECT 1"))
    link.receive(copy_in_response())
    assert link.server.copy_in
    assert link.server.unpredictable


def test_partial_batch_after_simple_copy_is_unpredictable() -> None:
    link = Link()
    link.link(query("COPY t FROM STDIN") + parse("SELECT 1"))
    link.receive(copy_in_response())
    assert link.server.unpredictable


def test_client_pipelining_after_copy_execute_is_unpredictable() -> None:
    link = Link()
    link.link(extended("COPY t FROM STDIN") + SYNC + extended("SELECT 1") + SYNC)
    link.receive(PARSE_COMPLETE + BIND_COMPLETE + NO_DATA + copy_in_response())
    assert link.server.copy_in
    assert link.server.unpredictable
    assert not link.releasable


def test_messages_after_the_copy_sync_are_unpredictable() -> None:
    link = Link()
    link.link(extended("COPY t FROM STDIN") + SYNC + parse("SELECT 1"))
    link.receive(PARSE_COMPLETE + BIND_COMPLETE + NO_DATA + copy_in_response())
    assert link.server.unpredictable


def test_copy_in_response_after_a_batch_with_several_executes_is_unpredictable() -> None:
    link = linked()
    link.send(extended("SELECT 1") + extended("COPY t FROM STDIN") + SYNC)
    link.receive(extended_reply()[:-6] + PARSE_COMPLETE + BIND_COMPLETE + copy_in_response())
    assert link.server.unpredictable
    assert link.server.copy_in


def test_copy_in_response_after_describe_following_execute_is_unpredictable() -> None:
    link = linked()
    link.send(parse("COPY t FROM STDIN") + bind() + execute() + describe() + SYNC)
    link.receive(PARSE_COMPLETE + BIND_COMPLETE + copy_in_response())
    assert link.server.unpredictable


def test_copy_in_response_without_a_sent_execute_is_unpredictable() -> None:
    link = linked()
    link.send(parse("COPY t FROM STDIN") + bind() + FLUSH)
    link.receive(PARSE_COMPLETE + BIND_COMPLETE + copy_in_response())
    assert link.server.unpredictable
    assert link.server.copy_in


def test_copy_in_response_to_a_function_call_is_unpredictable() -> None:
    link = linked()
    link.send(function_call(1598))
    link.receive(copy_in_response())
    assert link.server.unpredictable


def test_copy_in_response_to_the_proxys_own_query_is_unpredictable() -> None:
    server = ServerState(id=1, created_at=0.0, backend_key=None, params={})
    server.send_proxy_query("DISCARD ALL")
    server.feed(copy_in_response())
    assert server.unpredictable


def test_copy_done_outside_copy_with_a_query_pending_is_unpredictable() -> None:
    link = Link()
    link.link(query("COPY t FROM STDIN") + copy_data(b"1\n") + COPY_DONE)
    assert link.server.unpredictable


def test_copy_done_outside_copy_with_a_partial_batch_is_unpredictable() -> None:
    link = linked()
    link.send(parse("COPY t FROM STDIN") + bind() + execute() + COPY_DONE)
    assert link.server.unpredictable


def test_stray_copy_done_with_nothing_pending_is_harmless() -> None:
    link = linked()
    link.send(COPY_DONE + copy_fail())
    assert not link.server.unpredictable
    assert link.server.is_idle


def test_copy_both_response_is_unpredictable() -> None:
    link = linked()
    link.send(query("START_REPLICATION 0/0"))
    link.receive(copy_both_response())
    assert link.server.unpredictable


# --- surprises ------------------------------------------------------------------------------


def test_ready_for_query_with_nothing_queued_is_unpredictable() -> None:
    link = linked()
    link.receive(ready("I"))
    assert link.server.unpredictable
    assert not link.take_drained()
    assert not link.server.is_clean(WELCOME)


def test_fatal_error_response_sets_fatal() -> None:
    link = linked()
    link.send(query("SELECT 1"))
    link.receive(error("terminating connection due to administrator command", "FATAL", "57P01"))
    assert link.server.fatal
    assert not link.server.is_clean(WELCOME)


def test_panic_error_response_sets_fatal() -> None:
    link = linked()
    link.send(query("SELECT 1"))
    link.receive(messages.raw_error_response({"S": "PANIC", "C": "XX000", "M": "oops"}))
    assert link.server.fatal


def test_plain_error_response_is_not_fatal() -> None:
    link = linked()
    link.send(query("SELECT 1"))
    link.receive(error())
    assert not link.server.fatal


def test_localized_severity_is_read_from_the_v_field() -> None:
    link = linked()
    link.send(query("SELECT 1"))
    link.receive(messages.raw_error_response({"S": "FATAL_DE", "V": "FATAL", "M": "x"}))
    assert link.server.fatal


def test_expect_nothing_only_when_nothing_is_owed() -> None:
    link = linked()
    assert link.server.expect_nothing()
    link.send(query("SELECT 1"))
    assert not link.server.expect_nothing()
    link.receive(select_one_reply())
    assert link.server.expect_nothing()


# --- the proxy's own queries ----------------------------------------------------------------


def prelude_reply(*status: tuple[str, str], error_fields: bytes = b"") -> bytes:
    """What Postgres answers to `SELECT pg_catalog.set_config(...)`."""
    return (
        b"".join(parameter_status(name, value) for name, value in status)
        + error_fields
        + row_description("set_config")
        + data_row(b"x")
        + command_complete("SELECT 1")
        + ready("I")
    )


def test_proxy_query_alone_is_swallowed_and_drains() -> None:
    server = ServerState(id=1, created_at=0.0, backend_key=None, params={})
    sent = server.send_proxy_query("ROLLBACK")
    assert sent == query("ROLLBACK")
    assert list(server.queue) == [0]
    reply = command_complete("ROLLBACK") + ready("I")
    assert server.feed(reply) == len(reply)
    assert not server.swallowing
    assert server.drained
    assert server.is_idle
    assert not server.outbox  # no client: nobody to catch up


def test_proxy_queries_in_a_row_are_all_swallowed() -> None:
    server = ServerState(id=1, created_at=0.0, backend_key=None, params={})
    data = server.send_proxy_query("ROLLBACK") + server.send_proxy_query("DISCARD ALL")
    assert data == query("ROLLBACK") + query("DISCARD ALL")
    first = command_complete("ROLLBACK") + ready("I")
    second = command_complete("DISCARD ALL") + ready("I")
    assert server.feed(first) == len(first)
    between = server.swallowing, server.drained
    assert between == (True, False)
    assert server.feed(second) == len(second)
    assert not server.swallowing
    assert server.drained


def test_prelude_then_client_query_in_one_chunk_forwards_only_the_client_part() -> None:
    link = Link(wanted={"application_name": "cvat"})
    link.link(query("SELECT 1"))
    assert len(link.server.queue) == 2
    assert link.server.swallowing
    assert link.server.applied == {"application_name": "cvat"}
    assert bytes(link.to_server).endswith(query("SELECT 1"))
    assert bytes(link.to_server).startswith(b"Q")

    own = prelude_reply(("application_name", "cvat"))
    assert link.server.feed(own + select_one_reply()) == len(own)
    assert link.server.drained


def test_prelude_catches_up_the_clients_reported_view_through_the_outbox() -> None:
    link = Link(wanted={"application_name": "cvat", "DateStyle": "iso, dmy"})
    link.link(query("SELECT 1"))
    own = prelude_reply(("application_name", "cvat"), ("DateStyle", "ISO, DMY"))
    to_client = link.receive(own + select_one_reply())

    expected = parameter_status("application_name", "cvat") + parameter_status(
        "DateStyle", "ISO, DMY"
    )
    assert to_client == expected + select_one_reply()
    assert link.view.reported["application_name"] == "cvat"
    assert link.view.reported["DateStyle"] == "ISO, DMY"
    # The client's wishes keep its spelling; the server reports its own.
    assert link.view.wanted == {"application_name": "cvat", "DateStyle": "iso, dmy"}
    assert link.server.params["DateStyle"] == "ISO, DMY"
    assert link.server.applied == {"application_name": "cvat", "DateStyle": "iso, dmy"}
    assert link.take_drained()
    assert link.releasable


def test_catch_up_sends_nothing_the_client_already_knows() -> None:
    link = Link(
        wanted={"application_name": "cvat"},
        reported={**WELCOME, "application_name": "cvat"},
    )
    link.link(query("SELECT 1"))
    to_client = link.receive(prelude_reply(("application_name", "cvat")) + select_one_reply())
    assert to_client == select_one_reply()


def test_prelude_resets_what_the_previous_client_set() -> None:
    link = Link(
        wanted={},
        applied={"application_name": "previous"},
        params={**WELCOME, "application_name": "previous"},
        reported=dict(WELCOME),
    )
    link.link(query("SELECT 1"))
    assert b'RESET "application_name"' in bytes(link.to_server)
    to_client = link.receive(
        parameter_status("application_name", "")
        + command_complete("RESET")
        + ready("I")
        + select_one_reply()
    )
    assert to_client == select_one_reply()  # the client was told "" at login already
    assert link.server.params["application_name"] == ""
    assert link.server.applied == {}


def test_no_prelude_when_the_server_already_has_the_clients_settings() -> None:
    link = Link(wanted={"application_name": "cvat"}, applied={"application_name": "cvat"})
    link.link(query("SELECT 1"))
    assert bytes(link.to_server) == query("SELECT 1")
    assert not link.server.swallowing
    assert link.receive(select_one_reply()) == select_one_reply()
    assert link.take_drained()


def test_error_in_proxy_query_is_kept_in_proxy_error() -> None:
    link = Link(wanted={"DateStyle": "nonsense"})
    link.link(query("SELECT 1"))
    failure = error('invalid value for parameter "DateStyle": "nonsense"', sqlstate="22023")
    to_client = link.receive(failure + ready("I"))
    assert to_client == b""
    assert link.server.proxy_error is not None
    assert link.server.proxy_error["C"] == "22023"
    assert not link.server.fatal


def test_server_whose_prelude_failed_is_never_clean() -> None:
    # BUG: `proxy_error` is never cleared and `is_clean` ignores it. When the prelude's error
    # and the client's whole reply arrive in one chunk, the queue is empty and the client
    # (closed by `prelude_failed`) leaves at a boundary: the server is checked in, and the
    # next client linked to it is failed with this stale error on its first reply.
    link = Link(wanted={"DateStyle": "bogus"})
    link.link(query("SELECT 1"))
    failure = error('invalid value for parameter "DateStyle": "bogus"', sqlstate="22023")
    link.receive(failure + ready("I") + select_one_reply())
    assert link.server.proxy_error is not None
    assert link.server.is_idle
    assert not link.server.is_clean(WELCOME)


def test_client_error_after_the_prelude_is_not_a_proxy_error() -> None:
    link = Link(wanted={"application_name": "cvat"})
    link.link(query("SELECT nope"))
    failure = error('column "nope" does not exist')
    to_client = link.receive(prelude_reply() + failure + ready("I"))
    assert to_client == failure + ready("I")
    assert link.server.proxy_error is None


def test_parameter_status_swallowed_with_the_prelude_is_not_the_clients_wish() -> None:
    link = Link(wanted={"application_name": "cvat"})
    link.link(query("SELECT 1"))
    link.receive(prelude_reply(("TimeZone", "Europe/Paris")))
    # The server's view moved; the client's wishes did not (catch-up tells it the value).
    assert link.server.params["TimeZone"] == "Europe/Paris"
    assert "TimeZone" not in link.view.wanted
    assert link.view.reported["TimeZone"] == "Europe/Paris"


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_any_split_of_prelude_and_client_reply_gives_the_client_exactly_its_bytes(
    data: st.DataObject,
) -> None:
    link = Link(wanted={"application_name": "cvat", "TimeZone": "Europe/Paris"})
    link.link(query("SELECT 1") + query("SELECT 1"))
    own = prelude_reply(("application_name", "cvat"), ("TimeZone", "Europe/Paris"))
    theirs = select_one_reply() + parameter_status("TimeZone", "UTC") + select_one_reply()
    stream = own + theirs
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))

    start = 0
    for stop in [*cuts, len(stream)]:
        link.receive(stream[start:stop])
        start = stop

    catch_up = parameter_status("application_name", "cvat") + parameter_status(
        "TimeZone", "Europe/Paris"
    )
    assert bytes(link.to_client) == catch_up + theirs
    assert link.server.drained
    assert link.server.is_idle
    assert link.view.wanted["TimeZone"] == "UTC"


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_any_split_of_an_extended_copy_transcript_gives_the_same_accounting(
    data: st.DataObject,
) -> None:
    frontend_first = extended("COPY t FROM STDIN") + SYNC
    frontend_copy = copy_data(b"1\n") + copy_data(b"2\n") + COPY_DONE + SYNC
    backend_first = PARSE_COMPLETE + BIND_COMPLETE + NO_DATA + copy_in_response()
    backend_last = command_complete("COPY 2") + ready("I")

    def split(stream: bytes) -> list[bytes]:
        cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=4)))
        bounds = [0, *cuts, len(stream)]
        return [stream[a:b] for a, b in pairwise(bounds)]

    link = linked()
    for piece in split(frontend_first):
        link.send(piece)
    for piece in split(backend_first):
        link.receive(piece)
    for piece in split(frontend_copy):
        link.send(piece)
    for piece in split(backend_last):
        link.receive(piece)

    assert bytes(link.to_server) == frontend_first + frontend_copy
    assert link.server.drained
    assert link.releasable


# --- ParameterStatus and session state ------------------------------------------------------


def test_parameter_status_for_tracked_param_while_linked_follows_the_client() -> None:
    link = linked(applied={"application_name": "cvat"}, wanted={"application_name": "cvat"})
    link.send(query("SET application_name = 'export'"))
    link.receive(parameter_status("application_name", "export") + command_complete("SET"))
    assert link.view.wanted["application_name"] == "export"
    assert link.view.reported["application_name"] == "export"
    assert link.server.applied["application_name"] == "export"
    assert link.server.params["application_name"] == "export"
    link.receive(ready("I"))
    assert link.server.is_clean(WELCOME)  # tracked: replayed per client, not leftover state


def test_parameter_status_with_canonical_spelling_keeps_that_spelling() -> None:
    link = linked()
    link.send(query("SET datestyle = 'german'"))
    link.receive(parameter_status("DateStyle", "German, DMY") + command_complete("SET"))
    assert link.view.wanted == {"DateStyle": "German, DMY"}
    assert link.server.applied == {"DateStyle": "German, DMY"}


def test_parameter_status_for_untracked_param_updates_the_clients_view_only() -> None:
    link = linked()
    link.send(query("SET SESSION AUTHORIZATION other"))
    link.receive(
        parameter_status("session_authorization", "other")
        + parameter_status("is_superuser", "off")
        + command_complete("SET")
        + ready("I")
    )
    assert link.view.reported["session_authorization"] == "other"
    assert "session_authorization" not in link.view.wanted
    assert "session_authorization" not in link.server.applied
    assert link.server.is_idle
    assert not link.server.is_clean(WELCOME)
    assert not link.releasable


def test_parameter_status_without_a_client_updates_the_server_only() -> None:
    server = ServerState(id=1, created_at=0.0, backend_key=None, params=dict(WELCOME))
    server.send_proxy_query("DISCARD ALL")
    server.feed(parameter_status("application_name", "") + ready("I"))
    assert server.params["application_name"] == ""
    # What the server has now (the rolled-back or reset value), for the next client's prelude.
    assert server.applied == {"application_name": ""}


def test_is_clean_ignores_parameters_the_baseline_does_not_know() -> None:
    link = linked()
    link.server.params["in_hot_standby"] = "off"
    assert link.server.is_clean(WELCOME)


def test_is_clean_ignores_tracked_parameters_that_differ_from_the_baseline() -> None:
    link = linked(params={**WELCOME, "TimeZone": "Asia/Tokyo", "client_encoding": "LATIN1"})
    assert link.server.is_clean(WELCOME)


def test_is_clean_is_false_while_not_idle_or_unpredictable() -> None:
    link = linked()
    assert link.server.is_clean(WELCOME)
    link.send(query("SELECT 1"))
    assert not link.server.is_clean(WELCOME)
    link.receive(select_one_reply())
    assert link.server.is_clean(WELCOME)
    link.server.unpredictable = True
    assert not link.server.is_clean(WELCOME)


def test_disconnect_reasons_have_distinct_short_values() -> None:
    values = [reason.value for reason in DisconnectReason]
    assert len(values) == len(set(values))
    assert all(value == value.lower() and " " not in value for value in values)


@pytest.mark.parametrize("status", ["T", "E"])
def test_transaction_status_other_than_idle_is_never_clean(status: str) -> None:
    link = linked()
    link.send(query("BEGIN"))
    link.receive(command_complete("BEGIN") + ready(status))
    assert link.server.expect_nothing()
    assert not link.server.is_clean(WELCOME)


def test_proxy_query_is_refused_while_the_client_is_owed_an_answer() -> None:
    # Swallowing must start at a chunk boundary; behind a client query it could not.
    link = linked()
    link.send(query("SELECT 1"))
    with pytest.raises(AssertionError):
        link.server.send_proxy_query("ROLLBACK")
