"""The basic path: a message round-trips through the proxy to a websockets backend."""

from __future__ import annotations

import trio
from websockets.sync.client import connect

from tests.support import RawClient, proxy_yaml, start_backend, start_proxy


async def test_text_message_round_trips_through_proxy(nursery, backends) -> None:
    backends.append(start_backend())
    proxy = await start_proxy(nursery, proxy_yaml([backends[0].port]))
    client = await RawClient.connect(proxy.port(), "/chat?room=1")
    assert client.accept is not None
    from wsproto.events import TextMessage

    await client.send(TextMessage(data="hello"))
    assert await client.receive_message() == "hello"
    closed = await client.close(1000, "bye")
    assert closed.code == 1000
    assert backends[0].requests[0].path == "/chat?room=1"


async def test_websockets_client_interop(nursery, backends) -> None:
    backends.append(start_backend())
    proxy = await start_proxy(nursery, proxy_yaml([backends[0].port]))

    def talk() -> str:
        with connect(proxy.url("/x"), proxy=None, open_timeout=5) as ws:
            ws.send("ping through proxy")
            return ws.recv(timeout=5)

    assert await trio.to_thread.run_sync(talk) == "ping through proxy"
