"""The relay phase end to end: messages, fragments, streaming, pings, isolation, clean-up.

Every test runs once per relay path (RELAY_LISTENER_YAML) through the `relay_mode` fixture, as
do test_close_codes.py and test_load.py, which share the table. Backends come from
the `websockets` library (a different WebSocket stack from the one wsproxy speaks with), except
where a test needs to see exactly what reached the backend.
"""

from __future__ import annotations

import functools
import hashlib
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
import trio.testing
from websockets.exceptions import ConnectionClosed
from websockets.sync.server import ServerConnection
from wsproto import WSConnection
from wsproto.events import (
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    Pong,
    TextMessage,
)
from wsproto.extensions import PerMessageDeflate

from tests.support import (
    RawClient,
    TLSFiles,
    echo_handler,
    proxy_yaml,
    serve_wsproto,
    start_backend,
    start_proxy,
    watch_proxy_output,
)
from wsproxy.runtime.reactor import SelectorPoller

# Listener YAML per relay path: every test in this file runs on each.
RELAY_LISTENER_YAML: dict[str, str] = {"inspect": "relay: inspect", "passthrough": "relay: passthrough"}
# Sessions relay on the one readiness loop (runtime/reactor.py), whose poller is epoll on Linux
# and `selectors` elsewhere (kqueue on BSD and macOS): here this file's tests run on the
# selectors poller too, so the portable one is held to the same behaviour.
ON_SELECTORS = "passthrough-selectors"
RELAY_MODES = {**RELAY_LISTENER_YAML, ON_SELECTORS: RELAY_LISTENER_YAML["passthrough"]}

TIMEOUTS = "timeouts: {handshake: 1s, connect: 1s, close: 1s}\n"


@pytest.fixture(params=sorted(RELAY_MODES))
def relay_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == ON_SELECTORS:
        monkeypatch.setattr("wsproxy.runtime.reactor.default_poller", SelectorPoller)
    return request.param


def relay_yaml(
    ports: list[int], relay_mode: str, *, tls: tuple[Path, Path] | None = None, timeouts: str = TIMEOUTS
) -> str:
    return proxy_yaml(ports, tls=tls, extra=timeouts, listener_extra=RELAY_MODES[relay_mode])


# --------------------------------------------------------------------------------------------
# helpers


@dataclass
class Recorder:
    """What a websockets backend handler saw: messages, how the connection ended."""

    messages: list[str | bytes] = field(default_factory=list)
    close_code: int | None = None
    close_reason: str | None = None
    ended: threading.Event = field(default_factory=threading.Event)
    notes: dict[str, object] = field(default_factory=dict)


def recording_echo(rec: Recorder) -> Callable[[ServerConnection], None]:
    """Echo every message, record it, and record the close the backend received."""

    def handler(conn: ServerConnection) -> None:
        try:
            while True:
                message = conn.recv()
                rec.messages.append(message)
                conn.send(message)
        except ConnectionClosed as exc:
            rec.close_code = exc.rcvd.code if exc.rcvd else 1006
            rec.close_reason = exc.rcvd.reason if exc.rcvd else None
        finally:
            rec.ended.set()

    return handler


async def wait_thread_event(event: threading.Event, timeout: float = 5.0) -> bool:
    return await trio.to_thread.run_sync(event.wait, timeout)


def frame(opcode: int, payload: bytes = b"", *, fin: bool = True, rsv: int = 0, mask: bool = True) -> bytes:
    """One WebSocket frame, byte for byte (RFC 6455 section 5.2)."""
    head = bytearray([(0x80 if fin else 0) | (rsv << 4) | opcode])
    mbit = 0x80 if mask else 0
    n = len(payload)
    if n < 126:
        head.append(mbit | n)
    elif n < 65536:
        head.append(mbit | 126)
        head += struct.pack("!H", n)
    else:
        head.append(mbit | 127)
        head += struct.pack("!Q", n)
    if mask:
        key = os.urandom(4)
        head += key
        payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return bytes(head) + payload


def text_of(size: int, alphabet: str = "abcdefghijklmnopqrstuvwxyz0123456789 ") -> str:
    return "".join(alphabet[i % len(alphabet)] for i in range(size))


def bytes_of(size: int) -> bytes:
    return random.Random(size).randbytes(size)


async def wait_sessions_gone(proxy, timeout: float = 3.0) -> None:  # type: ignore[no-untyped-def]
    with trio.fail_after(timeout):
        while proxy.server.sessions:
            await trio.sleep(0.01)


def task_count() -> int:
    def walk(task: trio.lowlevel.Task) -> int:
        return 1 + sum(walk(child) for nursery in task.child_nurseries for child in nursery.child_tasks)

    return walk(trio.lowlevel.current_root_task())


def open_sockets_on(ports: set[int]) -> list[str]:
    """This process's open, non-listening TCP sockets with either end on one of `ports`."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in list(f)[1:]:
                cols = line.split()
                local, remote, state, inode = cols[1], cols[2], cols[3], cols[9]
                lport, rport = int(local.rsplit(":", 1)[1], 16), int(remote.rsplit(":", 1)[1], 16)
                if inode in inodes and state != "0A" and (lport in ports or rport in ports):
                    found.append(f"{local} -> {remote} state {state}")
    return found


# --------------------------------------------------------------------------------------------
# messages both ways


BOUNDARY_SIZES = [0, 1, 125, 126, 127, 65535, 65536, 65537]


@pytest.mark.parametrize("size", BOUNDARY_SIZES)
@pytest.mark.parametrize("kind", ["text", "binary"])
async def test_message_of_boundary_size_passes_both_ways_intact(nursery, backends, relay_mode, kind, size) -> None:
    rec = Recorder()
    backends.append(start_backend(recording_echo(rec)))
    proxy = await start_proxy(nursery, relay_yaml([backends[0].port], relay_mode))
    client = await RawClient.connect(proxy.port())
    message: str | bytes = text_of(size) if kind == "text" else bytes_of(size)
    with trio.fail_after(5):
        if isinstance(message, str):
            await client.send(TextMessage(data=message))
        else:
            await client.send(BytesMessage(data=message))
        echoed = await client.receive_message()
    assert rec.messages == [message]  # client -> backend, same type and content
    assert type(echoed) is type(message)
    assert echoed == message  # backend -> client
    with trio.fail_after(5):
        assert (await client.close()).code == 1000


NON_ASCII = [
    "héllo wörld",
    "☃ snowman, 🎉 party, 日本語, עברית, \u0000 nul",
    "é" * 70000,  # 140000 UTF-8 bytes: the 64-bit length form, non-ASCII throughout
    "🎉" * 16384,  # exactly 65536 UTF-8 bytes
]


@pytest.mark.parametrize("text", NON_ASCII, ids=["latin", "mixed", "long-2-byte", "4-byte-65536"])
async def test_non_ascii_text_passes_both_ways_intact(nursery, backends, relay_mode, text) -> None:
    rec = Recorder()
    backends.append(start_backend(recording_echo(rec)))
    proxy = await start_proxy(nursery, relay_yaml([backends[0].port], relay_mode))
    client = await RawClient.connect(proxy.port())
    with trio.fail_after(5):
        await client.send(TextMessage(data=text))
        assert await client.receive_message() == text
    assert rec.messages == [text]


async def test_many_messages_keep_their_order_and_types(nursery, backends, relay_mode) -> None:
    rec = Recorder()
    backends.append(start_backend(recording_echo(rec)))
    proxy = await start_proxy(nursery, relay_yaml([backends[0].port], relay_mode))
    client = await RawClient.connect(proxy.port())
    sent: list[str | bytes] = []
    for i in range(200):
        sent.append(f"text {i}" if i % 2 else f"binary {i}".encode())
    with trio.fail_after(5):
        for m in sent:  # all sent before any echo is read: the relay must not reorder or merge
            await client.send(TextMessage(data=m) if isinstance(m, str) else BytesMessage(data=m))
        got = [await client.receive_message() for _ in sent]
    assert got == sent
    assert rec.messages == sent


async def test_backend_initiated_messages_reach_client(nursery, backends, relay_mode) -> None:
    pushed = ["welcome", b"\x00\x01\x02", "", b"", "last ☃"]

    def handler(conn: ServerConnection) -> None:
        for m in pushed:
            conn.send(m)
        for _ in conn:
            pass

    backends.append(start_backend(handler))
    proxy = await start_proxy(nursery, relay_yaml([backends[0].port], relay_mode))
    client = await RawClient.connect(proxy.port())
    with trio.fail_after(5):
        got = [await client.receive_message() for _ in pushed]
    assert got == pushed
    assert [type(m) for m in got] == [type(m) for m in pushed]


async def test_messages_pass_intact_with_permessage_deflate_on_both_hops(nursery, backends, relay_mode) -> None:
    rec = Recorder()
    backends.append(start_backend(recording_echo(rec)))
    proxy = await start_proxy(nursery, relay_yaml([backends[0].port], relay_mode))
    client = await RawClient.connect(proxy.port(), extensions=[PerMessageDeflate()])
    assert client.accept is not None
    messages: list[str | bytes] = ["compress me " * 1000, bytes_of(70000), "", "☃" * 500]
    with trio.fail_after(5):
        for m in messages:
            await client.send(TextMessage(data=m) if isinstance(m, str) else BytesMessage(data=m))
            assert await client.receive_message() == m
    assert rec.messages == messages


async def test_messages_pass_intact_over_tls_listener(nursery, backends, relay_mode, tls_files: TLSFiles) -> None:
    rec = Recorder()
    backends.append(start_backend(recording_echo(rec)))
    proxy = await start_proxy(nursery, relay_yaml([backends[0].port], relay_mode, tls=(tls_files.cert, tls_files.key)))
    client = await RawClient.connect(proxy.port(), host="localhost", ssl_context=tls_files.client_context())
    assert client.accept is not None
    with trio.fail_after(5):
        await client.send(TextMessage(data="over tls ☃"))
        assert await client.receive_message() == "over tls ☃"
        await client.send(BytesMessage(data=bytes_of(100000)))
        assert await client.receive_message() == bytes_of(100000)
        closed = await client.close(4001, "tls bye")
    assert (closed.code, closed.reason) == (4001, "tls bye")
    assert await wait_thread_event(rec.ended)
    assert (rec.close_code, rec.close_reason) == (4001, "tls bye")


# --------------------------------------------------------------------------------------------
# fragmented messages


@pytest.mark.parametrize("kind", ["text", "binary"])
async def test_fragmented_client_message_arrives_whole(nursery, backends, relay_mode, kind) -> None:
    rec = Recorder()
    backends.append(start_backend(recording_echo(rec)))
    proxy = await start_proxy(nursery, relay_yaml([backends[0].port], relay_mode))
    client = await RawClient.connect(proxy.port())
    pieces = ["first ", "", "sécond ", "x" * 70000, "☃ last"]
    with trio.fail_after(5):
        for i, piece in enumerate(pieces):
            fin = i == len(pieces) - 1
            if kind == "text":
                await client.send(TextMessage(data=piece, message_finished=fin))
            else:
                await client.send(BytesMessage(data=piece.encode(), message_finished=fin))
        echoed = await client.receive_message()
    whole: str | bytes = "".join(pieces) if kind == "text" else "".join(pieces).encode()
    assert rec.messages == [whole]
    assert echoed == whole


async def test_utf8_character_split_across_fragments_arrives_intact(nursery, backends, relay_mode) -> None:
    rec = Recorder()
    backends.append(start_backend(recording_echo(rec)))
    proxy = await start_proxy(nursery, relay_yaml([backends[0].port], relay_mode))
    client = await RawClient.connect(proxy.port())
    encoded = "a☃🎉b".encode()  # 61 e2 98 83 f0 9f 8e 89 62: split inside both multi-byte characters
    with trio.fail_after(5):
        await client.send_raw(
            frame(0x1, encoded[:2], fin=False) + frame(0x0, encoded[2:6], fin=False) + frame(0x0, encoded[6:])
        )
        assert await client.receive_message() == "a☃🎉b"
    assert rec.messages == ["a☃🎉b"]


async def test_ping_between_fragments_is_answered_and_message_stays_whole(nursery, backends, relay_mode) -> None:
    rec = Recorder()
    backends.append(start_backend(recording_echo(rec)))
    proxy = await start_proxy(nursery, relay_yaml([backends[0].port], relay_mode))
    client = await RawClient.connect(proxy.port())
    with trio.fail_after(5):
        await client.send(TextMessage(data="part one, ", message_finished=False))
        await client.send(Ping(payload=b"mid-message"))
        await client.send(TextMessage(data="part two", message_finished=True))
        assert await client.receive_message() == "part one, part two"
        pongs = [ev for ev in client.control if isinstance(ev, Pong)]
        while not pongs:
            ev = await client.next_event()
            if isinstance(ev, Pong):
                pongs.append(ev)
    assert [bytes(p.payload) for p in pongs] == [b"mid-message"]
    assert rec.messages == ["part one, part two"]


async def test_fragmented_backend_message_arrives_whole(nursery, backends, relay_mode) -> None:
    def handler(conn: ServerConnection) -> None:
        conn.send(iter(["frag-1 ", "frag-2 ☃ ", "", "frag-4"]))
        conn.send(iter([b"\x00" * 70000, b"\x01", b"\x02" * 3]))
        for _ in conn:
            pass

    backends.append(start_backend(handler))
    proxy = await start_proxy(nursery, relay_yaml([backends[0].port], relay_mode))
    client = await RawClient.connect(proxy.port())
    with trio.fail_after(5):
        assert await client.receive_message() == "frag-1 frag-2 ☃ frag-4"
        assert await client.receive_message() == b"\x00" * 70000 + b"\x01" + b"\x02" * 3


# --------------------------------------------------------------------------------------------
# 16 MiB streams through a proxy process without being buffered whole


class ProxyProcess:
    """`python -m wsproxy run -c FILE` in a subprocess; its port comes from its log."""

    def __init__(self, config_path: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "wsproxy", "run", "-c", str(config_path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self.port: int | None = None
        self.ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        watch_proxy_output(lambda: "".join(self.lines))

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            m = re.search(r"listening on \w+://[\d.]+:(\d+)", line)
            if m and self.port is None:
                self.port = int(m.group(1))
            if "wsproxy ready" in line:
                self.ready.set()
        self.ready.set()  # EOF: the process died; wait_ready reports it

    def wait_ready(self, timeout: float = 15.0) -> int:
        assert self.ready.wait(timeout), "proxy did not report ready:\n" + "".join(self.lines)
        assert self.proc.poll() is None and self.port is not None, "proxy exited:\n" + "".join(self.lines)
        return self.port

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._reader.join(timeout=5)


@pytest.fixture
def proxy_process(tmp_path: Path) -> Iterator[Callable[[str], ProxyProcess]]:
    started: list[ProxyProcess] = []

    def start(yaml_text: str) -> ProxyProcess:
        path = tmp_path / f"proxy{len(started)}.yaml"
        path.write_text(yaml_text)
        p = ProxyProcess(path)
        started.append(p)
        return p

    yield start
    for p in started:
        p.stop()


class RssSampler:
    """Samples a process's RSS every few milliseconds in a thread; keeps the peak."""

    def __init__(self, proc: ProxyProcess) -> None:
        self.proc = proc
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.rss_bytes())
            self.samples += 1
            time.sleep(0.002)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


BIG = 16 * 1024 * 1024
CHUNK = 64 * 1024
RSS_GROWTH_LIMIT = 8 * 1024 * 1024


def big_payload() -> bytes:
    return random.Random(16).randbytes(BIG)


WARM_UP_PATH = "/warm-up"


async def warm_up(port: int) -> None:
    """One short session through the proxy so lazy imports and allocator pools are in the baseline.

    It connects to WARM_UP_PATH: backends that do something special echo there instead.
    """
    client = await RawClient.connect(port, WARM_UP_PATH)
    for _ in range(8):
        await client.send(BytesMessage(data=bytes_of(CHUNK), message_finished=False))
    await client.send(BytesMessage(data=b"", message_finished=True))
    await client.receive_message()
    await client.close()
    await client.stream.aclose()


def hashing_sink(result: dict) -> Callable[[ServerConnection], None]:
    """Consume each message frame by frame (never whole), answer with its length and sha256."""

    def handler(conn: ServerConnection) -> None:
        try:
            while True:
                h = hashlib.sha256()
                n = 0
                for chunk in conn.recv_streaming():
                    data = chunk.encode() if isinstance(chunk, str) else chunk
                    h.update(data)
                    n += len(data)
                result.setdefault("received", []).append((n, h.hexdigest()))
                conn.send(f"{n} {h.hexdigest()}")
        except ConnectionClosed:
            pass

    return handler


@pytest.mark.parametrize(
    "framing",
    [
        "64KiB-fragments",
        "one-frame-sent-in-64KiB-chunks",
        "64KiB-fragments-deflate",
        "compressible-64KiB-fragments-deflate",
    ],
)
async def test_16mib_client_message_streams_without_buffering_whole(
    backends, relay_mode, proxy_process, framing
) -> None:
    result: dict = {}
    backends.append(start_backend(hashing_sink(result)))  # websockets: permessage-deflate on by default
    proc = proxy_process(relay_yaml([backends[0].port], relay_mode))
    port = await trio.to_thread.run_sync(proc.wait_ready)
    await warm_up(port)
    payload = (b"compressible line of text\n" * BIG)[:BIG] if framing.startswith("compressible") else big_payload()
    expected = hashlib.sha256(payload).hexdigest()
    deflate = framing.endswith("deflate")
    client = await RawClient.connect(port, extensions=[PerMessageDeflate()] if deflate else None)
    assert client.accept is not None
    assert bool(client.accept.extensions) is deflate
    baseline = proc.rss_bytes()
    with RssSampler(proc) as sampler, trio.fail_after(20):
        if framing == "one-frame-sent-in-64KiB-chunks":
            wire = client.ws.send(BytesMessage(data=payload))
            for off in range(0, len(wire), CHUNK):
                await client.send_raw(wire[off : off + CHUNK])
        else:
            for off in range(0, BIG, CHUNK):
                await client.send(BytesMessage(data=payload[off : off + CHUNK], message_finished=off + CHUNK >= BIG))
        answer = await client.receive_message()
    assert answer == f"{BIG} {expected}"
    assert result["received"][-1] == (BIG, expected)
    assert sampler.samples > 10
    growth = sampler.peak - baseline
    assert growth < RSS_GROWTH_LIMIT, f"proxy RSS grew by {growth / 2**20:.1f} MiB while relaying 16 MiB"


async def test_16mib_backend_message_streams_without_buffering_whole(backends, relay_mode, proxy_process) -> None:
    payload = big_payload()
    expected = hashlib.sha256(payload).hexdigest()
    go = threading.Event()

    def handler(conn: ServerConnection) -> None:
        assert conn.request is not None
        if conn.request.path == WARM_UP_PATH:
            return echo_handler(conn)
        go.wait(10)
        conn.send(payload[off : off + CHUNK] for off in range(0, BIG, CHUNK))
        for _ in conn:
            pass

    backends.append(start_backend(handler))
    proc = proxy_process(relay_yaml([backends[0].port], relay_mode))
    port = await trio.to_thread.run_sync(proc.wait_ready)
    await warm_up(port)
    client = await RawClient.connect(port)
    baseline = proc.rss_bytes()
    go.set()
    h = hashlib.sha256()
    n = 0
    with RssSampler(proc) as sampler, trio.fail_after(20):
        while True:
            ev = await client.next_event()
            assert isinstance(ev, BytesMessage), ev
            h.update(ev.data)
            n += len(ev.data)
            if ev.message_finished:
                break
    assert (n, h.hexdigest()) == (BIG, expected)
    assert sampler.samples > 10
    growth = sampler.peak - baseline
    assert growth < RSS_GROWTH_LIMIT, f"proxy RSS grew by {growth / 2**20:.1f} MiB while relaying 16 MiB"


async def test_backend_flooding_a_non_reading_client_is_held_back_not_buffered(
    backends, relay_mode, proxy_process
) -> None:
    payload = big_payload()
    go = threading.Event()

    def handler(conn: ServerConnection) -> None:
        assert conn.request is not None
        if conn.request.path == WARM_UP_PATH:
            return echo_handler(conn)
        go.wait(10)
        for off in range(0, BIG, CHUNK):  # 256 separate messages, sent as fast as the proxy takes them
            conn.send(payload[off : off + CHUNK])
        for _ in conn:
            pass

    backends.append(start_backend(handler))
    proc = proxy_process(relay_yaml([backends[0].port], relay_mode))
    port = await trio.to_thread.run_sync(proc.wait_ready)
    await warm_up(port)
    client = await RawClient.connect(port)
    baseline = proc.rss_bytes()
    with RssSampler(proc) as sampler:
        go.set()
        await trio.sleep(1.5)  # the client reads nothing meanwhile
        got = bytearray()
        with trio.fail_after(20):
            while len(got) < BIG:
                got += await client.receive_message()
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
    growth = sampler.peak - baseline
    assert growth < RSS_GROWTH_LIMIT, f"proxy RSS grew by {growth / 2**20:.1f} MiB for a client that did not read"


async def start_fragment_echo_backend(nursery: trio.Nursery, sockbuf: int) -> int:
    """A one-task wsproto backend that echoes each piece of a message as soon as it arrives.

    Small socket buffers and a single task (it stops reading while it is blocked sending) make
    a proxy that couples its two directions deadlock instead of merely slowing down.
    """

    def echo_pieces(ws: WSConnection, ev: Event) -> bytes:
        if isinstance(ev, BytesMessage):
            return ws.send(BytesMessage(data=ev.data, message_finished=ev.message_finished))
        return b""

    async def conn(stream: trio.SocketStream) -> None:
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, sockbuf)
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sockbuf)
        await serve_wsproto(stream, echo_pieces)

    listeners = await nursery.start(functools.partial(trio.serve_tcp, conn, 0, host="127.0.0.1"))
    return listeners[0].socket.getsockname()[1]


async def test_full_duplex_16mib_each_way_does_not_deadlock(nursery, relay_mode) -> None:
    port = await start_fragment_echo_backend(nursery, sockbuf=32 * 1024)
    proxy = await start_proxy(nursery, relay_yaml([port], relay_mode))
    client = await RawClient.connect(proxy.port())
    client.stream.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
    payload = big_payload()
    echoed = hashlib.sha256()
    received = 0

    async def send_all_fragments() -> None:
        for off in range(0, BIG, CHUNK):
            await client.send(BytesMessage(data=payload[off : off + CHUNK], message_finished=off + CHUNK >= BIG))

    async def read_echoes() -> None:
        nonlocal received
        while received < BIG:
            ev = await client.next_event()
            assert isinstance(ev, BytesMessage), ev
            echoed.update(ev.data)
            received += len(ev.data)

    with trio.fail_after(20):
        async with trio.open_nursery() as both:
            both.start_soon(send_all_fragments)
            both.start_soon(read_echoes)
    assert received == BIG
    assert echoed.digest() == hashlib.sha256(payload).digest()


# --------------------------------------------------------------------------------------------
# pings end to end


@dataclass
class PingBackend:
    port: int
    pings: list[bytes]


async def start_ping_recording_backend(nursery: trio.Nursery) -> PingBackend:
    """A wsproto backend that records every ping it gets and answers with a pong."""
    pings: list[bytes] = []

    def record_pings(ws: WSConnection, ev: Event) -> bytes:
        if isinstance(ev, Ping):
            pings.append(bytes(ev.payload))
            return ws.send(ev.response())
        return b""

    async def conn(stream: trio.SocketStream) -> None:
        await serve_wsproto(stream, record_pings)

    listeners = await nursery.start(functools.partial(trio.serve_tcp, conn, 0, host="127.0.0.1"))
    return PingBackend(listeners[0].socket.getsockname()[1], pings)


async def next_pong(client: RawClient) -> Pong:
    for ev in client.control:
        if isinstance(ev, Pong):
            client.control.remove(ev)
            return ev
    while True:
        ev = await client.next_event()
        if isinstance(ev, Pong):
            return ev
        assert not isinstance(ev, CloseConnection), ev


async def test_client_ping_reaches_websockets_backend_and_its_pong_returns(nursery, backends, relay_mode) -> None:
    backends.append(start_backend())
    proxy = await start_proxy(nursery, relay_yaml([backends[0].port], relay_mode))
    client = await RawClient.connect(proxy.port())
    with trio.fail_after(5):
        for payload in (b"ping-1", b"", bytes(range(125))):
            await client.send(Ping(payload=payload))
            assert bytes((await next_pong(client)).payload) == payload


async def test_client_ping_is_forwarded_to_backend_not_answered_by_proxy(nursery, relay_mode) -> None:
    backend = await start_ping_recording_backend(nursery)
    proxy = await start_proxy(nursery, relay_yaml([backend.port], relay_mode))
    client = await RawClient.connect(proxy.port())
    with trio.fail_after(5):
        await client.send(Ping(payload=b"are you there"))
        pong = await next_pong(client)
    assert bytes(pong.payload) == b"are you there"
    assert backend.pings == [b"are you there"]


async def test_backend_ping_reaches_client_and_client_pong_returns(nursery, backends, relay_mode) -> None:
    pong_seen = threading.Event()
    ping_sent = threading.Event()

    def handler(conn: ServerConnection) -> None:
        waiter = conn.ping(b"backend-ping \xff")
        ping_sent.set()
        if waiter.wait(5):
            pong_seen.set()
        for _ in conn:
            pass

    backends.append(start_backend(handler))
    proxy = await start_proxy(nursery, relay_yaml([backends[0].port], relay_mode))
    client = await RawClient.connect(proxy.port())
    with trio.fail_after(5):
        ev = await client.next_event()
    assert isinstance(ev, Ping)
    assert bytes(ev.payload) == b"backend-ping \xff"
    await trio.sleep(0.3)
    assert not pong_seen.is_set(), "the backend's ping was answered before the client answered it"
    await client.send(ev.response())
    assert await wait_thread_event(pong_seen), "the client's pong never reached the backend"


# --------------------------------------------------------------------------------------------
# isolation and clean-up


GARBAGE = b"this is not a websocket frame\r\n" * 8


async def test_broken_session_does_not_affect_a_concurrent_one(nursery, backends, relay_mode) -> None:
    rec_good, rec_bad = Recorder(), Recorder()
    by_path = {"/good": rec_good, "/bad": rec_bad}

    def handler(conn: ServerConnection) -> None:
        assert conn.request is not None
        recording_echo(by_path[conn.request.path])(conn)

    backends.append(start_backend(handler))
    proxy = await start_proxy(nursery, relay_yaml([backends[0].port], relay_mode))
    good = await RawClient.connect(proxy.port(), "/good")
    with trio.fail_after(5):
        await good.send(TextMessage(data="before"))
        assert await good.receive_message() == "before"
        bad = await RawClient.connect(proxy.port(), "/bad")
        await bad.send(TextMessage(data="bad starts fine"))
        assert await bad.receive_message() == "bad starts fine"
        await good.send(TextMessage(data="half ", message_finished=False))  # mid-message when the other breaks
        await bad.send_raw(GARBAGE)
        closed = await bad.next_event()
        while not isinstance(closed, CloseConnection):
            closed = await bad.next_event()
        assert closed.code == 1002
        await bad.expect_eof()
        await good.send(TextMessage(data="and half", message_finished=True))
        assert await good.receive_message() == "half and half"
        for i in range(20):
            await good.send(BytesMessage(data=bytes([i]) * 1000))
            assert await good.receive_message() == bytes([i]) * 1000
        fresh = await RawClient.connect(proxy.port(), "/good")
        await fresh.send(TextMessage(data="fresh"))
        assert await fresh.receive_message() == "fresh"
    assert await wait_thread_event(rec_bad.ended)
    assert rec_bad.close_code == 1001
    assert not rec_good.ended.is_set()
    assert rec_good.messages == ["before", "half and half", *[bytes([i]) * 1000 for i in range(20)], "fresh"]


@pytest.mark.parametrize("ending", ["client-closes", "backend-closes", "client-drops-tcp", "client-resets-tcp"])
async def test_ended_session_leaves_no_tasks_sockets_or_registry_entry(nursery, backends, relay_mode, ending) -> None:
    rec = Recorder()

    def handler(conn: ServerConnection) -> None:
        if ending == "backend-closes":
            try:
                rec.messages.append(conn.recv())
                conn.close(1000, "done")
            finally:
                rec.ended.set()
        else:
            recording_echo(rec)(conn)

    backends.append(start_backend(handler))
    proxy = await start_proxy(nursery, relay_yaml([backends[0].port], relay_mode))
    ports = {proxy.port(), backends[0].port}
    await trio.testing.wait_all_tasks_blocked()
    tasks_before = task_count()

    client = await RawClient.connect(proxy.port())
    with trio.fail_after(5):
        await client.send(TextMessage(data="hello"))
        if ending != "backend-closes":
            assert await client.receive_message() == "hello"
        assert len(proxy.server.sessions) == 1
        # the relay phase runs on the shared readiness loop: no task of its own
        await trio.testing.wait_all_tasks_blocked()
        assert len(proxy.server.reactor) == 1
        assert task_count() == tasks_before
        assert len(open_sockets_on(ports)) == 4  # client, proxy's two, backend's
        if ending == "client-closes":
            await client.close()
            await client.expect_eof()
        elif ending == "backend-closes":
            assert (await client.wait_close()).code == 1000
            await client.expect_eof()
        elif ending == "client-resets-tcp":
            client.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await client.stream.aclose()

    assert await wait_thread_event(rec.ended), "the backend's connection never ended"
    await wait_sessions_gone(proxy)
    with trio.move_on_after(3):
        while task_count() != tasks_before or open_sockets_on(ports):
            await trio.sleep(0.02)
    assert task_count() == tasks_before, "the session left trio tasks behind"
    assert open_sockets_on(ports) == [], "the session left sockets open"
    assert len(proxy.server.reactor) == 0, "the reactor still owns the ended session"


async def test_sessions_after_many_ended_ones_leave_no_trace(nursery, backends, relay_mode) -> None:
    backends.append(start_backend())
    proxy = await start_proxy(nursery, relay_yaml([backends[0].port], relay_mode))
    await trio.testing.wait_all_tasks_blocked()
    tasks_before = task_count()
    for i in range(30):
        client = await RawClient.connect(proxy.port())
        with trio.fail_after(5):
            await client.send(TextMessage(data=f"m{i}"))
            assert await client.receive_message() == f"m{i}"
            if i % 3 == 0:
                await client.close()
        await client.stream.aclose()
    await wait_sessions_gone(proxy)
    with trio.move_on_after(3):
        while task_count() != tasks_before or open_sockets_on({proxy.port(), backends[0].port}):
            await trio.sleep(0.02)
    assert task_count() == tasks_before, "ended sessions left trio tasks behind"
    assert open_sockets_on({proxy.port(), backends[0].port}) == [], "ended sessions left sockets open"
