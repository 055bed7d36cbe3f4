"""Large passthrough payloads spliced socket to socket (limits.splice_min_bytes) through a real proxy.

The proxy runs in this process, so the test can see its reactor's pipe pool: that pipes were
taken (the payloads crossed by os.splice, not the copy path) and that every one came back when
the sessions ended. The peers speak raw frames (test_flow_control's codec), on real sockets.
"""

from __future__ import annotations

import hashlib
import os
import socket
import struct

import pytest
import trio
from websockets.sync.client import connect

from tests.integration.test_flow_control import (
    BINARY,
    CLOSE,
    Close,
    RawBackend,
    Wire,
    close_payload,
    connect_client,
    echo,
)
from tests.support import RunningProxy, proxy_yaml, start_backend, start_proxy

KiB = 1024
MiB = 1 << 20


def splice_config(backend_port: int, threshold: str = "64KiB") -> str:
    return proxy_yaml([backend_port], extra=f"limits: {{splice_min_bytes: {threshold}}}\ntimeouts: {{close: 2s}}\n")


def message(i: int, size: int) -> bytes:
    """A payload whose bytes say where they belong (a shifted or repeated block would show)."""
    block = hashlib.sha256(b"%d" % i).digest()
    return (block * (size // len(block) + 1))[:size]


async def wait_released(proxy: RunningProxy) -> None:
    with trio.fail_after(5):
        while proxy.server.sessions or proxy.server.reactor.pipes.in_use:
            await trio.sleep(0.01)


@pytest.mark.parametrize("size", [64 * KiB, 256 * KiB, 1 * MiB])
async def test_large_messages_cross_both_ways_intact_through_the_pipe(nursery, size) -> None:
    backend = await RawBackend({"/echo": echo}).start(nursery)
    proxy = await start_proxy(nursery, splice_config(backend.port))
    client = await connect_client(proxy.port(), "/echo")
    with trio.fail_after(20):
        for i in range(4):
            sent = message(i, size)
            await client.send(BINARY, sent)
            got = await client.message()
            assert got == sent, f"message {i} of {size} bytes came back changed"
        await client.send(CLOSE, close_payload(1000))
        assert await client.wait_close(answer=False) == Close(1000, "")
    pipes = proxy.server.reactor.pipes
    assert pipes.taken > 0, "nothing was spliced"
    await wait_released(proxy)


async def test_with_splicing_off_the_same_messages_are_copied(nursery) -> None:
    backend = await RawBackend({"/echo": echo}).start(nursery)
    proxy = await start_proxy(nursery, splice_config(backend.port, "off"))
    client = await connect_client(proxy.port(), "/echo")
    with trio.fail_after(20):
        for i in range(3):
            sent = message(i, 256 * KiB)
            await client.send(BINARY, sent)
            assert await client.message() == sent
    assert proxy.server.reactor.pipes.taken == 0


async def test_a_slow_reader_gets_every_spliced_byte_in_order(nursery) -> None:
    count, size = 8, 1 * MiB
    digest = hashlib.sha256()
    for i in range(count):
        digest.update(message(i, size))

    async def send_then_close(wire: Wire) -> None:
        for i in range(count):
            await wire.send(BINARY, message(i, size))
        await wire.wait_close()
        await wire.until_eof()

    backend = await RawBackend({"/big": send_then_close}).start(nursery)
    proxy = await start_proxy(nursery, splice_config(backend.port))
    client = await connect_client(proxy.port(), "/big", rcvbuf=16 * KiB)
    got = hashlib.sha256()
    with trio.fail_after(30):
        for i in range(count):
            await trio.sleep(0.2 if i < 3 else 0)  # stalls: the pipe and TCP hold the rest back
            m = await client.message()
            assert isinstance(m, bytes) and len(m) == size
            got.update(m)
        await client.send(CLOSE, close_payload(1000))
        await client.wait_close(answer=False)
    assert got.hexdigest() == digest.hexdigest()
    assert proxy.server.reactor.pipes.taken > 0
    await wait_released(proxy)


async def test_a_client_gone_in_the_middle_of_a_spliced_payload_ends_both_hops(nursery) -> None:
    arrived = bytearray()
    seen = trio.Event()
    ended = trio.Event()

    async def record(wire: Wire) -> None:
        seen.set()
        arrived.extend(wire.buf)
        while data := await wire.stream.receive_some(256 * KiB):
            arrived.extend(data)
        ended.set()

    backend = await RawBackend({"/cut": record}).start(nursery)
    proxy = await start_proxy(nursery, splice_config(backend.port))
    client = await connect_client(proxy.port(), "/cut")
    await seen.wait()
    # a masked frame announcing 1 MiB, of which 300 KiB arrive, then the client is gone
    sent = struct.pack("!BBQ", 0x80 | BINARY, 0x80 | 127, MiB) + os.urandom(4) + bytes(300 * KiB)
    await client.send_raw(sent)
    with trio.fail_after(5):
        while proxy.server.reactor.pipes.taken == 0:
            await trio.sleep(0.01)
    client.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await client.stream.aclose()  # a reset, mid-payload
    with trio.fail_after(5):
        await ended.wait()
        await wait_released(proxy)
    # the backend got a prefix of the cut frame and then the end of its stream: no close frame
    # can follow a frame that will never be completed
    assert 0 < len(arrived) <= len(sent) and bytes(arrived) == sent[: len(arrived)]


async def test_a_backend_gone_in_the_middle_of_a_spliced_payload_ends_the_session(nursery) -> None:
    async def half_then_gone(wire: Wire) -> None:
        await wire.send_raw(struct.pack("!BBQ", 0x80 | BINARY, 127, MiB) + bytes(400 * KiB))
        await trio.sleep(0.3)  # (the proxy is splicing the payload meanwhile)

    backend = await RawBackend({"/cut": half_then_gone}).start(nursery)
    proxy = await start_proxy(nursery, splice_config(backend.port))
    client = await connect_client(proxy.port(), "/cut")
    with trio.fail_after(5):
        received = 0
        while True:
            try:
                data = await client.stream.receive_some(256 * KiB)
            except trio.BrokenResourceError:
                break
            if not data:
                break
            received += len(data)
    assert 0 < received < MiB  # part of the payload, then the end of the stream: no close frame can follow
    assert proxy.server.reactor.pipes.taken > 0
    await wait_released(proxy)


async def test_websockets_peers_exchange_large_deflated_messages_through_the_pipe(nursery, backends) -> None:
    """The websockets library on both ends (permessage-deflate negotiated end to end: random
    payloads stay large compressed, and their frames are spliced as they are)."""
    backends.append(start_backend())
    proxy = await start_proxy(nursery, splice_config(backends[0].port))
    payloads = [os.urandom(size) for size in (96 * KiB, 512 * KiB, 900 * KiB)]

    def talk() -> list[bytes]:
        with connect(proxy.url("/big"), proxy=None, open_timeout=5, max_size=2 * MiB) as ws:
            out = []
            for payload in payloads:
                ws.send(payload)
                got = ws.recv(timeout=10)
                assert isinstance(got, bytes)
                out.append(got)
            return out

    assert await trio.to_thread.run_sync(talk) == payloads
    assert proxy.server.reactor.pipes.taken > 0
    await wait_released(proxy)
