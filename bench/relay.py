"""A bare uvloop relay in front of PostgreSQL: what a pooler on uvloop pays before pooling.

Each client gets a server connection of its own for as long as it stays: no pooling, no
authentication (PostgreSQL logs the client in through the relay), no state. Both directions
are cut into PostgreSQL messages by pgproxy's own `MessageScanner`, watching what a pooler
must see (Query and Sync from the client, ReadyForQuery from the server), so the relay does
the reads, the writes and the framing of a pooler and nothing else. The bench runs it as the
target `uvloop-relay`: its CPU per transaction beside PgBouncer's is the floor that asyncio
and uvloop set for pgproxy on the same machine in the same run. The scanner is compiled;
this file's few lines per callback run interpreted, so the floor is a little high.

    python bench/relay.py --listen 127.0.0.1:6433 --server 127.0.0.1:5432
"""

from __future__ import annotations

import argparse
import asyncio
import struct
from typing import cast

import uvloop

from pgproxy.wire.codes import GSSENC_REQUEST_CODE, SSL_REQUEST_CODE
from pgproxy.wire.scanner import MessageScanner

QUERY, SYNC, READY_FOR_QUERY = ord("Q"), ord("S"), ord("Z")


class ServerSide(asyncio.Protocol):
    def __init__(self, client: ClientSide) -> None:
        self.client = client
        self.scanner = MessageScanner([READY_FOR_QUERY])
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCP transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.scanner.feed(data)
        self.client.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.transport.close()


class ClientSide(asyncio.Protocol):
    """Answers SSLRequest/GSSENCRequest with 'N' (the bench runs without TLS), holds the
    startup packet until its server connection is up, then relays."""

    def __init__(self, server_address: tuple[str, int]) -> None:
        self.server_address = server_address
        self.head = bytearray()  # bytes before the startup packet was relayed
        self.scanner: MessageScanner | None = None  # from the first typed message on
        self.server: ServerSide | None = None
        self.connecting: asyncio.Task[None] | None = None
        self.transport: asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCP transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.scanner is not None:
            self.scanner.feed(data)
            assert self.server is not None and self.server.transport is not None
            self.server.transport.write(data)
            return
        self.head += data
        while len(self.head) >= 8:
            length, code = struct.unpack_from("!ii", self.head)
            if code not in (SSL_REQUEST_CODE, GSSENC_REQUEST_CODE):
                if len(self.head) >= length:
                    self.transport.pause_reading()
                    self.connecting = asyncio.ensure_future(self.connect(length))
                return
            del self.head[:length]
            self.transport.write(b"N")

    async def connect(self, startup_length: int) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, server = await loop.create_connection(lambda: ServerSide(self), *self.server_address)
        except OSError:
            self.transport.close()
            return
        assert server.transport is not None
        if self.transport.is_closing():
            server.transport.close()
            return
        self.server = server
        self.scanner = MessageScanner([QUERY, SYNC])
        head, self.head = bytes(self.head), bytearray()
        self.scanner.feed(head[startup_length:])
        server.transport.write(head)
        self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.server is not None and self.server.transport is not None:
            self.server.transport.close()


def address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


async def serve(listen: tuple[str, int], server_address: tuple[str, int]) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: ClientSide(server_address), *listen, backlog=4096, reuse_address=True
    )
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", type=address, required=True, help="host:port to accept on")
    parser.add_argument("--server", type=address, required=True, help="PostgreSQL host:port")
    args = parser.parse_args()
    uvloop.run(serve(args.listen, args.server))


if __name__ == "__main__":
    main()
