"""The session's end on the shared readiness loop (reactor.py, link.py), and addresses that must
be read before TLS takes the socket over.

When the link ends a session without having closed a side itself (a cut at the shutdown deadline,
the close timeout), `Session._link_ended` closes the session's streams: that includes the client
socket of a listener with `proxy_protocol: true`, whose PROXY header was read to its last byte
and no further. The socket is held here on purpose, so the cycle collector cannot hide a socket
left open.

A TLS listener with `send_proxy_protocol` on its pool: the local address goes into the PROXY
header sent to the backend, so it is read before FastTLSStream wraps the accepted socket.
"""

from __future__ import annotations

import functools

import pytest
import trio
from wsproto.events import AcceptConnection, Request

from tests.support import RawClient, proxy_yaml, start_backend, start_proxy
from wsproxy.protocol import proxy_protocol

FAST = "timeouts: {handshake: 2s, connect: 1s, close: 0.5s}\nheartbeat: {interval: off}\n"


async def _wait_for(predicate, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


async def _read_to_eof(stream: trio.abc.Stream) -> None:
    while True:
        try:
            data = await stream.receive_some(65536)
        except trio.BrokenResourceError:
            return
        if not data:
            return


@pytest.mark.parametrize("ending", ["cut", "close-timeout"])
@pytest.mark.parametrize("proxy_header", [False, True], ids=["plain", "proxy-protocol"])
async def test_link_ending_closes_the_client_socket(nursery, backends, ending: str, proxy_header: bool) -> None:
    backends.append(start_backend())
    listener_extra = "proxy_protocol: true" if proxy_header else ""
    proxy = await start_proxy(nursery, proxy_yaml([backends[0].port], listener_extra=listener_extra, extra=FAST))
    stream = await trio.open_tcp_stream("127.0.0.1", proxy.port())
    client = RawClient(stream)
    head = proxy_protocol.build("v1", ("198.51.100.7", 40000), ("127.0.0.1", proxy.port())) if proxy_header else b""
    # header and request in one write: what a load balancer in front does (the rest of the read
    # after the PROXY header is the start of the request, left in the kernel for h11)
    await stream.send_all(head + client.ws.send(Request(host="127.0.0.1", target="/")))
    with trio.fail_after(5):
        assert isinstance(await client.next_event(), AcceptConnection)
    await _wait_for(lambda: len(proxy.server.sessions) == 1)
    session = next(iter(proxy.server.sessions))
    await _wait_for(lambda s=session: s._link is not None)  # the 101 may arrive before the hand-over
    sock = session.client_stream.socket  # the socket the reactor drives; held: no GC rescue
    if ending == "cut":
        session.cut()  # what shutdown does at its deadline
    else:
        session.go_away()  # 1001 to both; the backend answers, this client never does
    del session
    await _wait_for(lambda: not proxy.server.sessions, timeout=3)
    assert len(proxy.server.reactor) == 0
    assert sock.fileno() == -1, "the session ended but its client socket is still open"
    with trio.fail_after(2):
        await _read_to_eof(stream)  # the client sees its connection end
    await stream.aclose()


async def test_tls_listener_sends_the_proxy_header_to_the_backend(nursery, tls_files) -> None:
    first: list[bytes] = []

    async def backend(conn: trio.SocketStream) -> None:
        data = b""
        with trio.move_on_after(3):
            while len(data) < 16:
                chunk = await conn.receive_some(4096)
                if not chunk:
                    break
                data += chunk
        first.append(data)
        await conn.aclose()

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    bport = listeners[0].socket.getsockname()[1]
    nursery.start_soon(functools.partial(trio.serve_listeners, backend, listeners))
    yaml = proxy_yaml([bport], tls=(tls_files.cert, tls_files.key), pool_extra="send_proxy_protocol: v1", extra=FAST)
    proxy = await start_proxy(nursery, yaml)
    with trio.fail_after(10):
        client = await RawClient.connect(proxy.port(), ssl_context=tls_files.client_context())
        await _wait_for(lambda: bool(first))
    assert client.reject is not None  # the backend answered nothing useful: 502
    assert first[0].startswith(b"PROXY TCP4 127.0.0.1 127.0.0.1 "), first[0][:80]
