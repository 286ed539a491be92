"""TCP keepalive on a new connection, as the tcp_* settings ask (PgBouncer's names)."""

from __future__ import annotations

import asyncio
import logging
import socket

from pgproxy.config import Settings

log = logging.getLogger("pgproxy")

_TCP_FAMILIES = (socket.AF_INET, socket.AF_INET6)
_warned = False
# (setting, socket option); options this OS lacks are left out.
_OPTIONS = tuple(
    (name, option)
    for name, option in (
        ("tcp_keepidle", getattr(socket, "TCP_KEEPIDLE", None)),
        ("tcp_keepintvl", getattr(socket, "TCP_KEEPINTVL", None)),
        ("tcp_keepcnt", getattr(socket, "TCP_KEEPCNT", None)),
        ("tcp_user_timeout", getattr(socket, "TCP_USER_TIMEOUT", None)),
    )
    if option is not None
)


def set_keepalive(transport: asyncio.BaseTransport, settings: Settings) -> None:
    """A few setsockopt calls per connection, at connect time only (never on the data path).

    A value the kernel refuses is logged and the connection goes on with the OS default:
    keepalive is a safety net, not a reason to drop a client."""
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family not in _TCP_FAMILIES:
        return  # a Unix-domain socket has no TCP options
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1 if settings.tcp_keepalive else 0)
        for name, option in _OPTIONS:
            value = getattr(settings, name)
            if value and (settings.tcp_keepalive or name == "tcp_user_timeout"):
                sock.setsockopt(socket.IPPROTO_TCP, option, value)
    except OSError as exc:
        global _warned
        if not _warned:  # the kernel would refuse them for every connection: say it once
            _warned = True
            log.warning("could not set the tcp_* options: %s", exc.strerror or exc)
