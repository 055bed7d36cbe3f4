"""streams.FastTLSStream (server side, OpenSSL on the socket) behaves as trio's SSLStream where the
relay relies on it: each test runs against both, with a real TLS client (trio's SSLStream,
trustme CA) over loopback TCP. Handshake on first use, data both ways across many records, a
client that closes without close_notify (an ordinary end of stream), a close by another task
waking a waiting receive, a client that speaks no TLS (a broken stream, not a crash), and
cancellation before the call (a cancelled send sends nothing).
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable

import pytest
import trio
import trio.testing
import trustme

from wsproxy.runtime.streams import FastTLSStream

Wrap = Callable[[trio.SocketStream, ssl.SSLContext], trio.abc.Stream]


def _trio(stream: trio.SocketStream, ctx: ssl.SSLContext) -> trio.abc.Stream:
    return trio.SSLStream(stream, ctx, server_side=True, https_compatible=True)


def _fast(stream: trio.SocketStream, ctx: ssl.SSLContext) -> trio.abc.Stream:
    # what the server does: a stdlib socket of its own (here taken from trio's, by public API)
    return FastTLSStream(socket.socket(fileno=stream.socket.detach()), ctx)


@pytest.fixture(params=[_trio, _fast], ids=["trio", "fast"])
def wrap(request: pytest.FixtureRequest) -> Wrap:
    return request.param


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def contexts(ca: trustme.CA) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return server, client


async def tls_pair(wrap: Wrap, ca: trustme.CA) -> tuple[trio.abc.Stream, trio.SSLStream, trio.SocketStream]:
    """(server side under test, client, the client's raw TCP stream)."""
    server_ctx, client_ctx = contexts(ca)
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    raw_client = await trio.open_tcp_stream("127.0.0.1", port)
    accepted = await listener.accept()
    await listener.aclose()
    assert isinstance(accepted, trio.SocketStream)
    client = trio.SSLStream(raw_client, client_ctx, server_hostname="localhost")
    return wrap(accepted, server_ctx), client, raw_client


async def test_data_both_ways_across_many_records(wrap: Wrap, ca: trustme.CA) -> None:
    server, client, _ = await tls_pair(wrap, ca)
    payload = bytes(range(256)) * 4096  # 1 MiB: many TLS records, partial writes
    got = bytearray()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.send_all, payload)
        while len(got) < len(payload):
            got += await server.receive_some(65536)
    assert got == payload
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.send_all, payload)
        back = bytearray()
        while len(back) < len(payload):
            back += await client.receive_some(65536)
    assert back == payload
    await server.aclose()
    await client.aclose()


async def test_client_gone_without_close_notify_is_an_end_of_stream(wrap: Wrap, ca: trustme.CA) -> None:
    server, client, raw = await tls_pair(wrap, ca)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.send_all, b"hello")
        assert await server.receive_some(100) == b"hello"
    await raw.aclose()  # TCP FIN, no TLS close_notify (as browsers often do)
    with trio.fail_after(5):
        assert await server.receive_some(100) == b""
    await server.aclose()


async def test_close_by_another_task_wakes_a_waiting_receive(wrap: Wrap, ca: trustme.CA) -> None:
    server, client, _ = await tls_pair(wrap, ca)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.send_all, b"x")
        assert await server.receive_some(10) == b"x"
    outcome: list[type[BaseException]] = []

    async def waiter() -> None:
        try:
            await server.receive_some(10)
        except (trio.ClosedResourceError, trio.BrokenResourceError) as exc:
            outcome.append(type(exc))

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            await server.aclose()
    assert outcome and issubclass(outcome[0], trio.ClosedResourceError | trio.BrokenResourceError)
    await client.aclose()


async def test_a_client_that_speaks_no_tls_breaks_the_stream(wrap: Wrap, ca: trustme.CA) -> None:
    server, _, raw = await tls_pair(wrap, ca)
    await raw.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    with trio.fail_after(5), pytest.raises(trio.BrokenResourceError):
        await server.receive_some(100)
    await server.aclose()
    await raw.aclose()


async def test_a_cancelled_send_sends_nothing(wrap: Wrap, ca: trustme.CA) -> None:
    server, client, _ = await tls_pair(wrap, ca)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.send_all, b"hi")
        assert await server.receive_some(10) == b"hi"
    with trio.CancelScope() as scope:
        scope.cancel()
        await server.send_all(b"never")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.send_all, b"after")
        with trio.fail_after(5):
            assert await client.receive_some(100) == b"after"
    await server.aclose()
    await client.aclose()
