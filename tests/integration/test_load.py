"""Many sessions at once: 500 clients, all open together, echoing through one proxy.

The backend is the demo's trio echo backend in this process, so the test measures the proxy
and not a threaded backend. A barrier makes every session open before any message is sent,
so the 500 are truly concurrent (the proxy's registry holds all of them at that moment).
"""

from __future__ import annotations

import functools

import pytest
import trio
from wsproto.events import BytesMessage, TextMessage

from tests.integration.test_relay import RELAY_LISTENER_YAML
from tests.support import RawClient, free_port, proxy_yaml, start_proxy
from wsproxy.demo import demo_backend

SESSIONS = 500
MESSAGES = 4  # per session: text and binary, alternating
TIMEOUTS = "timeouts: {handshake: 10s, connect: 5s, close: 5s}\n"


@pytest.fixture(params=sorted(RELAY_LISTENER_YAML))
def relay_mode(request: pytest.FixtureRequest) -> str:
    return request.param


async def test_500_concurrent_sessions_echo_at_once(nursery, relay_mode) -> None:
    backend_port = free_port()
    await nursery.start(functools.partial(demo_backend, "127.0.0.1", backend_port, "load-backend"))
    proxy = await start_proxy(
        nursery, proxy_yaml([backend_port], extra=TIMEOUTS, listener_extra=RELAY_LISTENER_YAML[relay_mode])
    )
    all_open = trio.Event()
    opened = 0
    open_at_barrier: list[int] = []
    done: set[int] = set()

    async def session(i: int) -> None:
        nonlocal opened
        client = await RawClient.connect(proxy.port(), f"/load/{i}")
        assert client.accept is not None, f"session {i} rejected: {client.reject}"
        opened += 1
        if opened == SESSIONS:
            open_at_barrier.append(len(proxy.server.sessions))
            all_open.set()
        await all_open.wait()
        sent: list[str | bytes] = []
        for j in range(MESSAGES):  # pipelined: all sent before any echo is read
            if j % 2:
                m: str | bytes = f"session {i} message {j} ☃ ".encode() * (j + i % 7)
                await client.send(BytesMessage(data=m))
            else:
                m = f"session {i} message {j} ☃ " * (j + i % 7 + 1)
                await client.send(TextMessage(data=m))
            sent.append(m)
        echoed = [await client.receive_message() for _ in sent]
        assert echoed == sent, f"session {i} got the wrong echoes"
        closed = await client.close(1000, f"done {i}")
        assert (closed.code, closed.reason) == (1000, f"done {i}")
        await client.expect_eof()
        await client.stream.aclose()
        done.add(i)

    with trio.fail_after(60):
        async with trio.open_nursery() as clients:
            for i in range(SESSIONS):
                clients.start_soon(session, i)
    assert done == set(range(SESSIONS))
    assert open_at_barrier == [SESSIONS], "not every session was open at the same time"
    with trio.fail_after(5):
        while proxy.server.sessions:
            await trio.sleep(0.02)
