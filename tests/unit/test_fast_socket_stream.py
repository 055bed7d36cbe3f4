"""streams.FastSocketStream behaves as trio's SocketStream where the relay relies on it.

Every behaviour test runs against both trio's own SocketStream and the fast one, over a real
loopback TCP pair, so the fast path is held to the semantics of the stream it replaces: EOF,
reset and broken pipe, a close by another task while one waits, cancellation (a cancelled
receive loses no bytes; a send cancelled before it starts sends none), large sends across
partial writes, and the periodic yield that keeps one busy stream from starving other tasks.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable, Iterator

import pytest
import trio
import trio.testing

from wsproxy.runtime.streams import FAIR_EVERY, FastSocketStream

Wrap = Callable[[socket.socket], trio.abc.HalfCloseableStream]


def _trio(sock: socket.socket) -> trio.abc.HalfCloseableStream:
    return trio.SocketStream(trio.socket.from_stdlib_socket(sock))


def _fast(sock: socket.socket) -> trio.abc.HalfCloseableStream:
    return FastSocketStream(sock)


@pytest.fixture(params=[_trio, _fast], ids=["trio", "fast"])
def wrap(request: pytest.FixtureRequest) -> Wrap:
    return request.param


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """(ours, peer): a connected loopback TCP pair; the peer stays a blocking stdlib socket."""
    listener = socket.create_server(("127.0.0.1", 0))
    peer = socket.create_connection(listener.getsockname())
    ours, _ = listener.accept()
    listener.close()
    peer.settimeout(5)
    yield ours, peer
    ours.close()
    peer.close()


def _peer_has_nothing(peer: socket.socket) -> bool:
    peer.setblocking(False)
    try:
        peer.recv(1)
    except BlockingIOError:
        return True
    finally:
        peer.settimeout(5)
    return False


async def test_receive_returns_data_then_empty_bytes_at_eof(wrap: Wrap, pair) -> None:
    ours, peer = pair
    stream = wrap(ours)
    peer.sendall(b"hello")
    peer.shutdown(socket.SHUT_WR)
    with trio.fail_after(5):
        assert await stream.receive_some(100) == b"hello"
        assert await stream.receive_some(100) == b""


async def test_a_reset_is_a_broken_resource(wrap: Wrap, pair) -> None:
    ours, peer = pair
    stream = wrap(ours)
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.close()  # RST
    with trio.fail_after(5), pytest.raises(trio.BrokenResourceError):
        await stream.receive_some(100)


async def test_sending_to_a_vanished_peer_is_a_broken_resource(wrap: Wrap, pair) -> None:
    ours, peer = pair
    stream = wrap(ours)
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.close()
    await trio.sleep(0.05)  # let the RST arrive: the next send fails (ECONNRESET, then EPIPE)
    with trio.fail_after(5), pytest.raises(trio.BrokenResourceError):
        for _ in range(100):
            await stream.send_all(b"x" * 1024)


async def test_closing_wakes_a_waiting_receive_with_closed_resource(wrap: Wrap, pair) -> None:
    ours, _peer = pair
    stream = wrap(ours)
    got: list[BaseException] = []

    async def receive() -> None:
        try:
            await stream.receive_some(100)
        except trio.ClosedResourceError as exc:
            got.append(exc)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive)
            await trio.testing.wait_all_tasks_blocked()
            await stream.aclose()
    assert len(got) == 1


async def test_closing_wakes_a_send_waiting_for_room_with_closed_resource(wrap: Wrap, pair) -> None:
    ours, _peer = pair  # the peer never reads: the send fills both buffers and waits
    stream = wrap(ours)
    got: list[BaseException] = []

    async def send() -> None:
        try:
            await stream.send_all(bytes(16 << 20))
        except trio.ClosedResourceError as exc:
            got.append(exc)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            await trio.testing.wait_all_tasks_blocked()
            await stream.aclose()
    assert len(got) == 1


async def test_a_closed_stream_refuses_receive_and_send(wrap: Wrap, pair) -> None:
    ours, _peer = pair
    stream = wrap(ours)
    await stream.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await stream.receive_some(100)
    with pytest.raises(trio.ClosedResourceError):
        await stream.send_all(b"x")


async def test_a_cancelled_receive_loses_no_bytes(wrap: Wrap, pair) -> None:
    ours, peer = pair
    stream = wrap(ours)
    peer.sendall(b"keep me")
    await trio.sleep(0.05)  # the bytes are in our receive buffer
    with trio.CancelScope() as scope:
        scope.cancel()
        await stream.receive_some(100)
    assert scope.cancelled_caught
    with trio.fail_after(5):
        assert await stream.receive_some(100) == b"keep me"


async def test_a_send_cancelled_before_it_starts_sends_nothing(wrap: Wrap, pair) -> None:
    ours, peer = pair
    stream = wrap(ours)
    with trio.CancelScope() as scope:
        scope.cancel()
        await stream.send_all(b"must not leave")
    assert scope.cancelled_caught
    await trio.sleep(0.05)
    assert _peer_has_nothing(peer)


async def test_large_sends_of_a_memoryview_arrive_whole_across_partial_writes(wrap: Wrap, pair) -> None:
    ours, peer = pair
    stream = wrap(ours)
    payload = bytearray(i % 251 for i in range(8 << 20))  # far more than the socket buffers hold
    received = bytearray()

    def drain() -> None:
        while len(received) < len(payload):
            chunk = peer.recv(1 << 16)
            if not chunk:
                return
            received.extend(chunk)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, drain)
            await stream.send_all(memoryview(payload)[1:])
            await stream.send_all(memoryview(payload)[:1])
    assert received == payload[1:] + payload[:1]


async def test_a_busy_stream_yields_to_other_tasks(pair) -> None:
    """With data always there, receive never has to wait; it still lets others run."""
    ours, peer = pair
    stream = _fast(ours)
    peer.sendall(bytes(4 * FAIR_EVERY))
    await trio.sleep(0.05)
    ran = trio.Event()
    calls = 0

    async def other() -> None:
        ran.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other)
        while not ran.is_set():
            assert await stream.receive_some(1) == b"\0"
            calls += 1
            # the first yield comes by call FAIR_EVERY; trio may run this task first again in
            # that batch (its order is random), so the other one runs by the next yield at latest
            assert calls <= 2 * FAIR_EVERY, "the other task never ran"
