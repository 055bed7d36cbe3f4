"""Session._send takes a side's pending bytes before it waits for that side's lock (the hot path
skips the scheduler when the lock is free). Bytes taken while another send holds the lock must
still leave in the order they were taken: trio's Lock is FIFO and acquire_nowait never jumps
the queue. These tests hold the session to that with a stream whose first send stalls.
"""

from __future__ import annotations

import trio
import trio.testing

from tests.support import proxy_yaml
from wsproxy.config import parse_config
from wsproxy.observe.metrics import Metrics
from wsproxy.policy.snapshot import Snapshot
from wsproxy.runtime.session import Session
from wsproxy.runtime.timers import Timers


class StallingStream(trio.abc.Stream):
    """Records every send; the first one waits until `release` is set."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.release = trio.Event()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if not self.sent and not self.release.is_set():
            self.sent.append(b"<stalled>")
            await self.release.wait()
            self.sent[0] = bytes(data)
            return
        await trio.lowlevel.checkpoint()
        self.sent.append(bytes(data))

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.sleep_forever()
        raise AssertionError

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


def _session(stream: trio.abc.Stream) -> Session:
    config = parse_config(proxy_yaml([9]), source="test.yaml")
    session = Session(
        stream,  # type: ignore[arg-type]
        client_addr=("127.0.0.1", 1),
        listener=config.listeners[0],
        snapshot=Snapshot.build(config),
        timers=Timers(),
        metrics=Metrics(),
    )
    session.relay = object()  # type: ignore[assignment]  # only the broken-peer path uses it
    return session


async def test_sends_queued_behind_a_stalled_one_leave_in_the_order_their_bytes_were_taken() -> None:
    stream = StallingStream()
    session = _session(stream)
    lock = trio.Lock()
    taken: list[bytes] = []

    def take(data: bytes):  # type: ignore[no-untyped-def]
        def _take() -> bytes:
            taken.append(data)
            return data

        return _take

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            for chunk in (b"1", b"2", b"3", b"4"):
                nursery.start_soon(session._send, "client", stream, lock, take(chunk))
                await trio.testing.wait_all_tasks_blocked()
            stream.release.set()
            # a send that arrives while the queue drains still goes last
            await trio.lowlevel.checkpoint()
            nursery.start_soon(session._send, "client", stream, lock, take(b"5"))
    assert taken == [b"1", b"2", b"3", b"4", b"5"]
    assert stream.sent == taken
    assert not lock.locked()


async def test_bytes_waiting_for_a_side_closed_meanwhile_are_dropped_not_sent() -> None:
    stream = StallingStream()
    session = _session(stream)
    lock = trio.Lock()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session._send, "client", stream, lock, lambda: b"first")
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(session._send, "client", stream, lock, lambda: b"late")
            await trio.testing.wait_all_tasks_blocked()
            session._closed["client"] = True  # e.g. the slow-consumer path closed it
            stream.release.set()
    assert stream.sent == [b"first"]
    assert not lock.locked()
