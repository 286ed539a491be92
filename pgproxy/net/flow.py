"""`ReadGate`: reading from a transport is paused while any reason to pause it holds.

One side's `pause_writing()` (its kernel buffer and our write buffer are full) becomes the
other side's `pause_reading()`, so a slow reader throttles its peer instead of growing memory.
"""

import asyncio
from typing import Final


class GateReason:
    """Bits of a gate's reason set; plain ints, because IntFlag arithmetic is slow."""

    PEER_BACKLOG: Final = 1  # the linked peer cannot take more bytes
    WAITING_FOR_SERVER: Final = 2  # a client holds a message and waits for a server


class ReadGate:
    __slots__ = ("_reasons", "_transport")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._reasons = 0

    def add(self, reason: int) -> None:
        if not self._reasons and not self._transport.is_closing():
            self._transport.pause_reading()
        self._reasons |= reason

    def discard(self, reason: int) -> None:
        if not self._reasons & reason:
            return
        self._reasons &= ~reason
        if not self._reasons and not self._transport.is_closing():
            self._transport.resume_reading()

    @property
    def is_open(self) -> bool:
        return not self._reasons
