"""TCP keepalive (tcp_* settings, named as PgBouncer's) on both sides of the proxy.

The options are read back from the proxy's own sockets, for a real client and the real
server connection it was served by: what the kernel will do with a silent peer follows."""

from __future__ import annotations

import socket
from collections.abc import Callable

from .conftest import ProxyThread
from .helpers import connect

OPTIONS = {
    "tcp_keepidle": socket.TCP_KEEPIDLE,
    "tcp_keepintvl": socket.TCP_KEEPINTVL,
    "tcp_keepcnt": socket.TCP_KEEPCNT,
    "tcp_user_timeout": socket.TCP_USER_TIMEOUT,
}


def _read(sock: socket.socket) -> dict[str, int]:
    values = {name: sock.getsockopt(socket.IPPROTO_TCP, opt) for name, opt in OPTIONS.items()}
    values["keepalive"] = sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
    return values


def _proxy_sockets(proxy: ProxyThread) -> tuple[list[dict[str, int]], list[dict[str, int]]]:
    """The options of every client and server socket the proxy holds, read on its loop."""

    def read() -> tuple[list[dict[str, int]], list[dict[str, int]]]:
        def of(conns: object) -> list[dict[str, int]]:
            found = []
            for conn in conns:  # type: ignore[attr-defined]
                transport = conn.transport
                if transport is None or transport.is_closing():
                    continue
                found.append(_read(transport.get_extra_info("socket")))
            return found

        return of(proxy.proxy.clients), of(proxy.proxy.servers)

    result: tuple[list[dict[str, int]], list[dict[str, int]]] = proxy.call(read)
    return result


def _defaults() -> dict[str, int]:
    with socket.socket() as fresh:
        return _read(fresh)


def test_keepalive_is_on_with_the_timings_asked_for_on_clients_and_servers(
    make_proxy: Callable[..., ProxyThread],
) -> None:
    proxy = make_proxy(
        tcp_keepidle="7", tcp_keepintvl="3", tcp_keepcnt="4", tcp_user_timeout="25000"
    )
    with connect(proxy.port) as conn:
        conn.execute("SELECT 1")  # a server connection is open now
        clients, servers = _proxy_sockets(proxy)
    wanted = {
        "keepalive": 1,
        "tcp_keepidle": 7,
        "tcp_keepintvl": 3,
        "tcp_keepcnt": 4,
        "tcp_user_timeout": 25000,
    }
    assert clients == [wanted]
    assert servers == [wanted]


def test_keepalive_on_by_default_with_the_os_timings(
    make_proxy: Callable[..., ProxyThread],
) -> None:
    proxy = make_proxy()
    with connect(proxy.port) as conn:
        conn.execute("SELECT 1")
        clients, servers = _proxy_sockets(proxy)
    os_timing = {**_defaults(), "keepalive": 1}
    assert os_timing["keepalive"] == 1 and _defaults()["keepalive"] == 0
    assert clients == [os_timing] and servers == [os_timing]


def test_keepalive_off_leaves_sockets_without_it(make_proxy: Callable[..., ProxyThread]) -> None:
    proxy = make_proxy(tcp_keepalive="false", tcp_keepidle="7", tcp_user_timeout="9000")
    with connect(proxy.port) as conn:
        conn.execute("SELECT 1")
        clients, servers = _proxy_sockets(proxy)
    # The keepalive timings are left alone; the user timeout is not a keepalive option.
    expected = {**_defaults(), "tcp_user_timeout": 9000}
    assert clients == [expected] and servers == [expected]
