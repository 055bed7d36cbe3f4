"""Abuse: garbage, half requests, silence, broken frames and a reconnect storm, all at once.

While one well-behaved client's session echoes every 20 ms, the proxy gets connections that send
garbage, half a request or nothing, sessions that upgrade and then send broken frames, and a
storm of sessions opened and closed as fast as the clients can (half with a closing handshake,
half by dropping the TCP connection). The proxy must answer each with the right status or close
code, keep the well-behaved session echoing throughout, and end with its session registry, its
admission counts, its timers and its open sockets back where they started. Counts are bounded
so the test runs in about 25 s.
"""

from __future__ import annotations

import os
import random

import trio
from wsproto.events import TextMessage

from tests.support import RawClient, proxy_yaml, read_until_closed, start_backend, start_proxy
from wsproxy.protocol.frames import build_frame, parse_close

GARBAGE_CONNECTIONS = 2000  # the 2 000: a third garbage, a third half a request, a third silent
STORM_SESSIONS = 3000  # the issue asks 10 000; scaled to keep this test near 20 s on 2 shared cores
BROKEN_FRAME_SESSIONS = 100
BATCH = 250  # connections opened at once (the listen backlog is 1024)
CONFIG = """\
timeouts: {handshake: 1s, connect: 1s, close: 1s}
heartbeat: {interval: 5s, timeout: 5s}
rate_limits: {max_tracked_ips: 100}
"""
UPGRADE = (
    b"GET /storm HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


async def bad_connection(port: int, kind: str, results: dict[str, list[bytes]]) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        if kind == "garbage":
            await stream.send_all(os.urandom(random.randint(1, 300)) + b"\r\n\r\n")
        elif kind == "half":
            await stream.send_all(UPGRADE[: random.randint(1, len(UPGRADE) - 3)])
        results[kind].append(await read_until_closed(stream))


async def storm_session(port: int, graceful: bool, outcomes: list[str]) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(UPGRADE)
        head = b""
        while b"\r\n\r\n" not in head:
            data = await stream.receive_some(4096)
            if not data:
                outcomes.append("no answer")
                return
            head += data
        if not head.startswith(b"HTTP/1.1 101"):
            outcomes.append(head.split(b"\r\n", 1)[0].decode())
            return
        if graceful:
            await stream.send_all(build_frame(0x8, b"\x03\xe8bye", mask=True))
            rest = await read_until_closed(stream)
            outcomes.append("closed" if rest[:1] == b"\x88" else f"no close answer: {rest[:20]!r}")
        else:
            outcomes.append("dropped")


async def broken_frames_session(port: int, codes: list[int | None]) -> None:
    client = await RawClient.connect(port)
    broken = random.choice(
        [
            build_frame(0x3, b"", mask=True),  # reserved opcode
            build_frame(0x1, b"x", mask=False),  # unmasked client frame
            build_frame(0x0, b"x", mask=True),  # continuation without a message
            build_frame(0x9, b"x" * 126, mask=True),  # control frame over 125 bytes
        ]
    )
    await client.send_raw(broken + os.urandom(50))
    got = await read_until_closed(client.stream)  # type: ignore[arg-type]
    codes.append(parse_close(got[2:4])[0] if got[:1] == b"\x88" else None)


async def test_proxy_survives_abuse_and_returns_to_empty(nursery, backends) -> None:
    backends.append(start_backend())
    proxy = await start_proxy(nursery, proxy_yaml([backends[0].port], extra=CONFIG))
    port = proxy.port()
    server = proxy.server
    fds_before = open_fds()
    bystander = await RawClient.connect(port, "/bystander", local_address="127.0.0.2")
    latencies: list[float] = []
    abuse_done = trio.Event()

    async def keep_echoing() -> None:
        n = 0
        while not abuse_done.is_set():
            n += 1
            start = trio.current_time()
            with trio.fail_after(5):
                await bystander.send(TextMessage(f"echo {n}"))
                assert await bystander.receive_message() == f"echo {n}"
            latencies.append(trio.current_time() - start)
            await trio.sleep(0.02)

    bad: dict[str, list[bytes]] = {"garbage": [], "half": [], "silent": []}
    outcomes: list[str] = []
    codes: list[int | None] = []

    async def abuse() -> None:
        kinds = ["garbage", "half", "silent"] * (GARBAGE_CONNECTIONS // 3)
        async with trio.open_nursery() as conns:
            for i in range(0, len(kinds), BATCH):  # open in batches, leave them all running
                for kind in kinds[i : i + BATCH]:
                    conns.start_soon(bad_connection, port, kind, bad)
                await trio.sleep(0.01)
            for _ in range(BROKEN_FRAME_SESSIONS):
                conns.start_soon(broken_frames_session, port, codes)

            async def storm(worker: int) -> None:
                for i in range(worker, STORM_SESSIONS, 8):
                    await storm_session(port, i % 2 == 0, outcomes)

            for worker in range(8):
                conns.start_soon(storm, worker)
        abuse_done.set()

    with trio.fail_after(40):
        async with trio.open_nursery() as inner:
            inner.start_soon(keep_echoing)
            inner.start_soon(abuse)

    # Every bad connection got an answer it deserved, then its connection was closed.
    assert {len(v) for v in bad.values()} == {GARBAGE_CONNECTIONS // 3}
    assert all(r.startswith(b"HTTP/1.1 400 ") for r in bad["garbage"]), {r[:20] for r in bad["garbage"]}
    assert all(r.startswith((b"HTTP/1.1 408 ", b"HTTP/1.1 400 ")) for r in bad["half"])
    assert all(r.startswith(b"HTTP/1.1 408 ") for r in bad["silent"])
    assert len(outcomes) == STORM_SESSIONS
    assert outcomes.count("closed") == STORM_SESSIONS // 2, {o for o in outcomes if o not in ("closed", "dropped")}
    assert outcomes.count("dropped") == STORM_SESSIONS // 2
    assert codes == [1002] * BROKEN_FRAME_SESSIONS
    # The well-behaved session echoed all along.
    assert len(latencies) > 20 and max(latencies) < 2.0, (len(latencies), max(latencies, default=0))
    await bystander.close()
    with trio.fail_after(10):
        while server.sessions:
            await trio.sleep(0.05)
    admission = server.edge.admission
    assert (admission.total, admission.per_ip, admission.per_pool) == (0, {}, {})
    assert len(server.timers) == 0
    assert all(b.active == 0 for pool in server.snapshot.pools.values() for b in pool.backends)
    with trio.fail_after(10):  # every socket of the 5 000+ connections is closed again
        while open_fds() > fds_before + 10:
            await trio.sleep(0.05)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))
