"""A session's count on its backend (Pool.acquire) returns to zero on every way a session ends.

The count is taken per attempt and, once the backend accepts, moved to an ExitStack that lives
as long as the session (Session._connect_backend), so the relay can run after the handshake's
frames have returned. These tests walk each exit: relayed and closed, backend refused with a
normal response, backend silent past the handshake timeout, a shutdown cutting the attempt,
an exception while answering the client, and the client vanishing before its 101.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import socket
import struct
from collections.abc import Awaitable, Callable

import pytest
import trio
from wsproto.events import TextMessage

from tests.support import RawClient, proxy_yaml, start_proxy
from wsproxy.policy.balancing.base import Backend
from wsproxy.protocol import handshake

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
Behaviour = Callable[[trio.SocketStream, bytes], Awaitable[None]]


async def _read_head(stream: trio.SocketStream) -> bytes:
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = await stream.receive_some(4096)
        if not chunk:
            raise trio.BrokenResourceError("closed during the handshake")
        head += chunk
    return head


def _accept_101(head: bytes) -> bytes:
    key = next(
        ln.split(b":", 1)[1].strip() for ln in head.split(b"\r\n") if ln.lower().startswith(b"sec-websocket-key")
    )
    accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
    return (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
    )


async def _upgrade_and_sink(stream: trio.SocketStream, head: bytes) -> None:
    await stream.send_all(_accept_101(head))
    while await stream.receive_some(4096):
        pass


async def _never_answer(stream: trio.SocketStream, head: bytes) -> None:
    await trio.sleep_forever()


async def _answer_401(stream: trio.SocketStream, head: bytes) -> None:
    await stream.send_all(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n")
    await trio.sleep_forever()


async def _start_backend(nursery: trio.Nursery, behave: Behaviour) -> int:
    async def handle(stream: trio.SocketStream) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await behave(stream, await _read_head(stream))

    listeners = await nursery.start(functools.partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
    return listeners[0].socket.getsockname()[1]


async def _start(nursery: trio.Nursery, behave: Behaviour, handshake_timeout: str = "5s"):  # type: ignore[no-untyped-def]
    port = await _start_backend(nursery, behave)
    extra = f"timeouts: {{handshake: {handshake_timeout}, connect: 1s, close: 1s}}\n"
    extra += "shutdown: {drain_window: 0s, deadline: 1s}\n"
    proxy = await start_proxy(nursery, proxy_yaml([port], extra=extra, pool_extra="retries: 0"))
    backend = proxy.server.snapshot.pools["p"].backends[0]
    return proxy, backend


async def _until(cond: Callable[[], bool]) -> None:
    with trio.fail_after(5):
        while not cond():
            await trio.sleep(0.01)


async def _all_gone(proxy, backend: Backend) -> None:  # type: ignore[no-untyped-def]
    await _until(lambda: not proxy.server.sessions)
    assert backend.active == 0


async def test_a_relayed_session_holds_its_count_until_it_ends(nursery) -> None:
    proxy, backend = await _start(nursery, _upgrade_and_sink)
    client = await RawClient.connect(proxy.port(), "/")
    assert client.accept is not None
    await client.send(TextMessage(data="hi"))
    await trio.sleep(0.05)
    assert backend.active == 1  # the relay runs after the handshake returned: the count moved with it
    await client.stream.aclose()
    await _all_gone(proxy, backend)


async def test_a_normal_response_releases_the_count(nursery) -> None:
    proxy, backend = await _start(nursery, _answer_401)
    client = await RawClient.connect(proxy.port(), "/")
    assert client.reject is not None and client.reject.status_code == 401
    await client.stream.aclose()
    await _all_gone(proxy, backend)


async def test_a_silent_backend_past_the_handshake_timeout_releases_the_count(nursery) -> None:
    proxy, backend = await _start(nursery, _never_answer, handshake_timeout="0.3s")
    client = await RawClient.connect(proxy.port(), "/")
    assert client.reject is not None and client.reject.status_code == 504
    await client.stream.aclose()
    await _all_gone(proxy, backend)


async def test_a_shutdown_cutting_the_attempt_releases_the_count(nursery) -> None:
    proxy, backend = await _start(nursery, _never_answer)
    stream = await trio.open_tcp_stream("127.0.0.1", proxy.port())
    await stream.send_all(
        b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    await _until(lambda: backend.active == 1)  # waiting in _try_backend
    with trio.fail_after(5):
        await proxy.server.shutdown()
    await _all_gone(proxy, backend)
    await stream.aclose()


@pytest.mark.expect_errors(r"wsproxy\.session: session from .* failed \[RuntimeError: injected\]")
async def test_an_exception_while_answering_the_client_releases_the_count(nursery, monkeypatch) -> None:
    def boom(*args: object, **kwargs: object) -> bytes:
        raise RuntimeError("injected")

    monkeypatch.setattr(handshake, "build_client_101", boom)
    proxy, backend = await _start(nursery, _upgrade_and_sink)
    stream = await trio.open_tcp_stream("127.0.0.1", proxy.port())
    await stream.send_all(
        b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    with trio.fail_after(5):
        assert await stream.receive_some(100) == b""  # the session failed and closed the client
    await _all_gone(proxy, backend)
    await stream.aclose()


@pytest.mark.parametrize("reset", [False, True], ids=["fin", "rst"])
async def test_a_client_leaving_before_its_101_releases_the_count(nursery, reset: bool) -> None:
    go = trio.Event()

    async def late_101(stream: trio.SocketStream, head: bytes) -> None:
        await go.wait()
        await _upgrade_and_sink(stream, head)

    proxy, backend = await _start(nursery, late_101)
    sock = socket.create_connection(("127.0.0.1", proxy.port()))
    sock.sendall(
        b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    await _until(lambda: backend.active == 1)
    if reset:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    await trio.sleep(0.05)
    go.set()
    await _all_gone(proxy, backend)
