"""What the proxy is doing now, as plain records: for the admin console, /metrics and logs.

Built on demand by walking the proxy's clients, servers and pools (never on the data path),
on the event loop thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from pgproxy.core.client import ClientPhase
from pgproxy.core.prepared import StatementCounts, split_parse
from pgproxy.core.stats import PoolStats
from pgproxy.wire.codes import FrontendCode

if TYPE_CHECKING:
    from pgproxy.net.client_connection import ClientConnection
    from pgproxy.net.server_connection import ServerConnection
    from pgproxy.proxy import Proxy

# Client states, as labels and in admin output.
ACTIVE = "active"  # linked to a server, a statement running or results flowing
WAITING = "waiting"  # has sent something, no server yet
IDLE_IN_TRANSACTION = "idle_in_transaction"  # holds a server in an open transaction, silent
IDLE = "idle"  # logged in, no server
LOGIN = "login"  # still logging in
CLIENT_STATES = (ACTIVE, WAITING, IDLE_IN_TRANSACTION, IDLE, LOGIN)

# Server states.
SERVER_ACTIVE = "active"  # linked to a client
SERVER_IDLE = "idle"  # in the pool, ready
SERVER_RESETTING = "resetting"  # being rolled back or reset after its client
SERVER_LOGIN = "login"  # connecting or logging in
SERVER_STATES = (SERVER_ACTIVE, SERVER_IDLE, SERVER_RESETTING, SERVER_LOGIN)

# How much of a statement's text reports show.
STATEMENT_TEXT_LIMIT = 300


@dataclass(frozen=True, slots=True)
class ClientReport:
    id: int
    address: str  # host:port
    user: str  # "" while logging in
    database: str
    application_name: str
    state: str  # one of CLIENT_STATES
    connected_for: float  # seconds
    state_for: float  # seconds in this state (0 for idle and login)
    holding_for: float | None  # seconds it has held its server, None when it holds none
    server_id: int | None
    last_statement: str | None  # None: none seen, or statement text tracking is off


@dataclass(frozen=True, slots=True)
class ServerReport:
    id: int
    database: str  # the pool's (the name clients use)
    user: str
    address: str  # host:port of Postgres
    state: str  # one of SERVER_STATES
    connected_for: float
    state_for: float  # seconds since it became idle (idle), else 0
    client_id: int | None
    backend_pid: int | None
    pinned: str | None  # why it is pinned to its client, if it is
    prepared_statements: int


@dataclass(frozen=True, slots=True)
class PoolReport:
    database: str
    user: str
    pool_mode: str
    size: int  # the limit
    min_size: int
    clients: dict[str, int]  # by CLIENT_STATES (login excluded: no pool yet)
    servers: dict[str, int]  # by SERVER_STATES
    longest_wait: float  # seconds the oldest waiting client has waited (0: none)
    longest_hold: float  # seconds the client holding a server longest has held it (0: none)
    longest_idle_in_transaction: float  # seconds of its longest idle-in-transaction client
    paused: bool
    stats: PoolStats
    statements: StatementCounts


def statement_text(code: int, body: bytes, client: ClientConnection) -> str:
    """Readable text of a client's last Query, Parse or Bind, cut to STATEMENT_TEXT_LIMIT."""
    if code == FrontendCode.QUERY:
        raw = body.rstrip(b"\x00")
    elif code == FrontendCode.PARSE:
        _name, definition = split_parse(body) if b"\x00" in body else (b"", body)
        raw = definition.split(b"\x00", 1)[0]
    else:  # Bind: the statement it binds
        portal_end = body.find(b"\x00")
        name = body[portal_end + 1 : body.find(b"\x00", portal_end + 1)]
        state = client.state
        entry = state.statements.lookup(name) if state is not None else None
        if entry is None:
            label = name.decode("utf-8", "replace") or "unnamed"
            return f"(prepared statement {label})"
        raw = entry[0].split(b"\x00", 1)[0]
    text = " ".join(raw.decode("utf-8", "replace").split())
    if len(text) > STATEMENT_TEXT_LIMIT:
        text = text[: STATEMENT_TEXT_LIMIT - 1] + "…"
    return text


def client_report(client: ClientConnection, now: float) -> ClientReport:
    st = client.state
    server = client.server
    if st is None:
        return ClientReport(
            id=client.id,
            address=client.address,
            user="",
            database="",
            application_name=client.application_name,
            state=LOGIN,
            connected_for=now - client.connected_at,
            state_for=0.0,
            holding_for=None,
            server_id=None,
            last_statement=None,
        )
    idle_since = client.idle_in_transaction_since
    if server is not None:
        if idle_since is not None:
            state, state_for = IDLE_IN_TRANSACTION, now - idle_since
        else:
            state, state_for = ACTIVE, now - client.linked_at
    elif st.phase is ClientPhase.WAITING:
        state, state_for = WAITING, now - st.waiting_since
    else:
        state, state_for = IDLE, 0.0
    last = None
    if st.last_statement is not None:
        last = statement_text(st.last_statement_code, st.last_statement, client)
    return ClientReport(
        id=client.id,
        address=client.address,
        user=st.user,
        database=st.database,
        application_name=client.application_name,
        state=state,
        connected_for=now - st.connected_at,
        state_for=state_for,
        holding_for=None if server is None else now - client.linked_at,
        server_id=None if server is None else server.id,
        last_statement=last,
    )


def server_report(server: ServerConnection, now: float) -> ServerReport:
    pool = server.pool
    sst = server.state
    if sst is None:
        state = SERVER_LOGIN
    elif server in pool.idle:
        state = SERVER_IDLE
    elif server in pool.resetting:
        state = SERVER_RESETTING
    else:
        state = SERVER_ACTIVE
    idle_since = pool.idle.get(server)
    return ServerReport(
        id=server.id,
        database=pool.key.database,
        user=pool.key.user,
        address=f"{server.address[0]}:{server.address[1]}",
        state=state,
        connected_for=0.0 if sst is None else now - sst.created_at,
        state_for=0.0 if idle_since is None else now - idle_since,
        client_id=None if server.client is None else server.client.id,
        backend_pid=None if sst is None or sst.backend_key is None else sst.backend_key[0],
        pinned=None if sst is None else sst.pinned,
        prepared_statements=0 if sst is None else len(sst.statements),
    )


def clients(proxy: Proxy, now: float) -> list[ClientReport]:
    """Every connected client, in order of connection."""
    return sorted((client_report(c, now) for c in proxy.clients), key=lambda r: r.id)


def servers(proxy: Proxy, now: float) -> list[ServerReport]:
    """Every server connection, open or opening, in order of creation."""
    return sorted((server_report(s, now) for s in proxy.servers), key=lambda r: r.id)


def leaks(proxy: Proxy, now: float, min_seconds: float = 0.0) -> list[ClientReport]:
    """Clients holding a server connection, longest first (at least `min_seconds`)."""
    holding = [
        r
        for r in (client_report(c, now) for c in proxy.clients if c.server is not None)
        if r.holding_for is not None and r.holding_for >= min_seconds
    ]
    holding.sort(key=lambda r: r.holding_for or 0.0, reverse=True)
    return holding


def pools(proxy: Proxy, now: float) -> list[PoolReport]:
    """Every pool, by database then user, with its clients and servers counted by state."""
    client_counts: dict[object, dict[str, int]] = {}
    holds: dict[object, float] = {}
    idle_tx: dict[object, float] = {}
    for client in proxy.clients:
        if client.pool is None:
            continue
        key = client.pool.key
        report = client_report(client, now)
        counts = client_counts.setdefault(key, dict.fromkeys(CLIENT_STATES[:-1], 0))
        counts[report.state] = counts.get(report.state, 0) + 1
        if report.holding_for is not None:
            holds[key] = max(holds.get(key, 0.0), report.holding_for)
        if report.state == IDLE_IN_TRANSACTION:
            idle_tx[key] = max(idle_tx.get(key, 0.0), report.state_for)
    out = []
    for key, pool in sorted(proxy.pools.items(), key=lambda kv: (kv[0].database, kv[0].user)):
        oldest = next(iter(pool.waiters.values()), None)
        out.append(
            PoolReport(
                database=key.database,
                user=key.user,
                pool_mode=proxy.settings.pool_mode.value,
                size=pool.size,
                min_size=pool.min_size,
                clients=client_counts.get(key, dict.fromkeys(CLIENT_STATES[:-1], 0)),
                servers={
                    SERVER_ACTIVE: len(pool.active),
                    SERVER_IDLE: len(pool.idle),
                    SERVER_RESETTING: len(pool.resetting),
                    SERVER_LOGIN: pool.connecting,
                },
                longest_wait=0.0 if oldest is None else now - oldest,
                longest_hold=holds.get(key, 0.0),
                longest_idle_in_transaction=idle_tx.get(key, 0.0),
                paused=proxy.is_paused(key.database),
                stats=pool.stats,
                statements=pool.statement_counts,
            )
        )
    return out
