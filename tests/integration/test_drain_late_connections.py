"""A connection accepted before a shutdown but not yet a session when it starts must not become a
session that the drain never closes (it would get a 101 during the drain, no 1001, and hold the
shutdown until its deadline). With `proxy_protocol: true` that window is the whole PROXY-header
read, so the test opens it wide: connect, start the shutdown, then send the header and an Upgrade.
"""

from __future__ import annotations

import trio
from wsproto.events import AcceptConnection, Request

from tests.support import RawClient, proxy_yaml, start_backend, start_proxy
from wsproxy.protocol import proxy_protocol

CONFIG = "timeouts: {handshake: 5s, connect: 1s, close: 1s}\nshutdown: {drain_window: 200ms, deadline: 4s}\n"
UPGRADE = (
    b"GET /late HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


async def test_a_connection_that_becomes_a_session_during_the_drain_is_refused(nursery, backends) -> None:
    backends.append(start_backend())
    proxy = await start_proxy(
        nursery, proxy_yaml([backends[0].port], listener_extra="proxy_protocol: true", extra=CONFIG)
    )
    port = proxy.port()
    header = proxy_protocol.build("v1", ("198.51.100.7", 40000), ("127.0.0.1", port))
    held_stream = await trio.open_tcp_stream("127.0.0.1", port)
    await held_stream.send_all(header)
    held = RawClient(held_stream)
    await held.send(Request(host="127.0.0.1", target="/held"))
    assert isinstance(await held.next_event(), AcceptConnection)
    late = await trio.open_tcp_stream("127.0.0.1", port)  # accepted, still reading its PROXY header
    await trio.sleep(0.05)
    done = trio.Event()

    async def shut_down() -> None:
        await proxy.server.shutdown()
        done.set()

    nursery.start_soon(shut_down)
    with trio.fail_after(2):
        while not proxy.server.draining:
            await trio.sleep(0.005)
    await late.send_all(header + UPGRADE)
    got = b""
    with trio.fail_after(3):
        while b"\r\n\r\n" not in got:
            try:
                chunk = await late.receive_some(65536)
            except trio.BrokenResourceError:
                break
            if not chunk:
                break
            got += chunk
    assert not got.startswith(b"HTTP/1.1 101"), got[:40]
    assert (await held.wait_close()).code == 1001
    with trio.fail_after(1.5):  # the drain ends with the held session, not at the 4 s deadline
        await done.wait()
