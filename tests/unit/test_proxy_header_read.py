"""streams.read_proxy_header on a real socket: the PROXY header is taken to its last byte and
no further (what follows stays in the kernel for TLS or h11), however it arrives."""

from __future__ import annotations

import socket

import pytest
import trio

from wsproxy.protocol import proxy_protocol
from wsproxy.runtime.streams import read_proxy_header

AFTER = b"\x16\x03\x01 the client's first TLS record"


@pytest.fixture
def pair():  # type: ignore[no-untyped-def]
    ours, peer = socket.socketpair()
    ours.setblocking(False)
    yield ours, peer
    ours.close()
    peer.close()


@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_the_header_is_read_and_the_bytes_after_it_stay_unread(pair, version: str) -> None:
    ours, peer = pair
    header = proxy_protocol.build(version, ("198.51.100.7", 40000), ("192.0.2.1", 443))
    peer.sendall(header + AFTER)
    with trio.fail_after(2):
        got = await read_proxy_header(ours)
    assert got is not None and got.source == ("198.51.100.7", 40000) and got.dest == ("192.0.2.1", 443)
    assert ours.recv(4096) == AFTER


@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_a_header_that_arrives_a_few_bytes_at_a_time_is_read_whole(pair, version: str) -> None:
    ours, peer = pair
    header = proxy_protocol.build(version, ("2001:db8::9", 40001), ("2001:db8::1", 443))
    data = header + AFTER

    async def dribble() -> None:
        for i in range(0, len(data), 5):
            peer.sendall(data[i : i + 5])
            await trio.sleep(0.005)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(dribble)
        with trio.fail_after(5):
            got = await read_proxy_header(ours)
    assert got is not None and got.source == ("2001:db8::9", 40001)
    assert ours.recv(4096) == AFTER  # (the dribble is over: all of it is here)


async def test_a_connection_that_ends_before_a_header_gives_none(pair) -> None:
    ours, peer = pair
    peer.sendall(b"PROXY TCP4 1.2")
    peer.shutdown(socket.SHUT_WR)
    with trio.fail_after(2):
        assert await read_proxy_header(ours) is None


@pytest.mark.parametrize(
    "data", [b"GET / HTTP/1.1\r\n\r\n", b"PROXY " + b"x" * 200, b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\xff\xff"]
)
async def test_something_else_than_a_header_is_refused(pair, data: bytes) -> None:
    ours, peer = pair
    peer.sendall(data)
    with trio.fail_after(2), pytest.raises(ValueError):
        await read_proxy_header(ours)
