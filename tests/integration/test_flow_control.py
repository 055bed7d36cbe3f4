"""Flow control: nothing unbounded. Backpressure, the message-size limit, slow consumers.

The memory tests run the proxy as a subprocess (`python -m wsproxy run -c FILE`) so its RSS can
be read from /proc/PID/status while a peer floods 128 MiB at a peer that does not read; the peers
are trio tasks in this process speaking raw frames (a tiny codec below: headers parsed by hand,
payloads unmasked with one big-integer XOR) so the test itself can move 128 MiB in about a
second. The limit tests use the in-process proxy. All on the real clock, with short timeouts.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import os
import struct
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from tests.support import free_port, proxy_yaml, start_proxy, watch_proxy_output

RELAYS = ["passthrough", "inspect"]
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

CONT, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA

MiB = 1 << 20
BLOCK = 64 * 1024
FLOOD_COUNT = 2048  # 2048 messages of 64 KiB: 128 MiB
RSS_GROWTH_LIMIT = 32 * MiB
STALL = 3.0  # seconds the receiver reads nothing


@pytest.fixture(params=RELAYS)
def relay(request: pytest.FixtureRequest) -> str:
    return request.param


# --------------------------------------------------------------------------------------------
# a raw WebSocket codec: exact frames, fast enough for 128 MiB


def _xor(payload: bytes, key: bytes) -> bytes:
    n = len(payload)
    if not n or key == b"\0\0\0\0":
        return payload
    stream = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(stream, "little")).to_bytes(n, "little")


def build_frame(opcode: int, payload: bytes, *, fin: bool = True, mask: bool, length: int | None = None) -> bytes:
    """A frame header plus payload; `length` overrides the announced length (a frame sent in part)."""
    n = len(payload) if length is None else length
    b0 = (0x80 if fin else 0) | opcode
    mbit = 0x80 if mask else 0
    if n < 126:
        head = struct.pack("!BB", b0, mbit | n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", b0, mbit | 126, n)
    else:
        head = struct.pack("!BBQ", b0, mbit | 127, n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + _xor(payload, key)


def close_payload(code: int, reason: str = "") -> bytes:
    return struct.pack("!H", code) + reason.encode()


@dataclass
class Frame:
    fin: bool
    opcode: int
    payload: bytes


@dataclass
class Close:
    code: int | None
    reason: str


class Wire:
    """One end of a WebSocket over raw frames. `mask`: this end is the client (masks its frames)."""

    def __init__(self, stream: trio.SocketStream, *, mask: bool, initial: bytes = b"") -> None:
        self.stream = stream
        self.mask = mask
        self.buf = bytearray(initial)
        self.pos = 0
        self.send_lock = trio.Lock()
        self.pings: list[bytes] = []
        self.close: Close | None = None
        self.received_bytes = 0  # data-frame payload bytes read so far

    async def _fill(self, n: int) -> None:
        while len(self.buf) - self.pos < n:
            try:
                data = await self.stream.receive_some(256 * 1024)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                raise EOFError
            if self.pos > MiB:
                del self.buf[: self.pos]
                self.pos = 0
            self.buf += data

    async def frame(self) -> Frame:
        """The next frame; EOFError when the stream ends first."""
        await self._fill(2)
        b0, b1 = self.buf[self.pos], self.buf[self.pos + 1]
        n = b1 & 0x7F
        head = 2 + {126: 2, 127: 8}.get(n, 0) + (4 if b1 & 0x80 else 0)
        await self._fill(head)
        if n == 126:
            n = struct.unpack_from("!H", self.buf, self.pos + 2)[0]
        elif n == 127:
            n = struct.unpack_from("!Q", self.buf, self.pos + 2)[0]
        await self._fill(head + n)
        p = self.pos  # only now: _fill may have moved the buffer
        payload = bytes(self.buf[p + head : p + head + n])
        if b1 & 0x80:
            payload = _xor(payload, bytes(self.buf[p + head - 4 : p + head]))
        self.pos = p + head + n
        return Frame(bool(b0 & 0x80), b0 & 0x0F, payload)

    async def message(self) -> bytes | Close:
        """The next whole data message (pings are answered), or the peer's close."""
        parts: list[bytes] = []
        while True:
            f = await self.frame()
            if f.opcode in (TEXT, BINARY, CONT):
                parts.append(f.payload)
                self.received_bytes += len(f.payload)
                if f.fin:
                    return b"".join(parts)
            elif f.opcode == PING:
                self.pings.append(f.payload)
                await self.send(PONG, f.payload)
            elif f.opcode == CLOSE:
                code = struct.unpack("!H", f.payload[:2])[0] if len(f.payload) >= 2 else None
                self.close = Close(code, f.payload[2:].decode(errors="replace"))
                return self.close

    async def wait_close(self, *, answer: bool = True) -> Close:
        """Read (discarding data) until the peer's close; answer it."""
        while True:
            got = await self.message()
            if isinstance(got, Close):
                if answer:
                    await self.send(CLOSE, close_payload(got.code) if got.code else b"")
                return got

    async def send(self, opcode: int, payload: bytes, *, fin: bool = True) -> None:
        async with self.send_lock:
            await self.stream.send_all(build_frame(opcode, payload, fin=fin, mask=self.mask))

    async def send_raw(self, data: bytes) -> None:
        async with self.send_lock:
            await self.stream.send_all(data)

    async def until_eof(self) -> None:
        """Read and discard until the stream ends (or is reset)."""
        while True:
            try:
                data = await self.stream.receive_some(256 * 1024)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if not data:
                return


async def _read_head(stream: trio.SocketStream) -> tuple[bytes, bytes]:
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = await stream.receive_some(65536)
        if not data:
            raise EOFError(f"stream ended during the handshake: {buf!r}")
        buf += data
    head, _, rest = buf.partition(b"\r\n\r\n")
    return head, rest


async def connect_client(port: int, path: str = "/", *, rcvbuf: int | None = None) -> Wire:
    """A client handshake by hand; `rcvbuf` sets SO_RCVBUF before connecting."""
    sock = trio.socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, rcvbuf)
    await sock.connect(("127.0.0.1", port))
    stream = trio.SocketStream(sock)
    key = base64.b64encode(os.urandom(16))
    await stream.send_all(
        b"GET " + path.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    head, rest = await _read_head(stream)
    assert head.startswith(b"HTTP/1.1 101"), head
    return Wire(stream, mask=True, initial=rest)


Behaviour = Callable[[Wire], Awaitable[None]]


class RawBackend:
    """A WebSocket server on raw frames; the request path picks the behaviour for a connection."""

    def __init__(self, behaviours: dict[str, Behaviour]) -> None:
        self.behaviours = behaviours
        self.port = 0
        self.wires: dict[str, list[Wire]] = {}

    async def start(self, nursery: trio.Nursery) -> RawBackend:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, self._handle, 0, host="127.0.0.1"))
        self.port = listeners[0].socket.getsockname()[1]
        return self

    async def _handle(self, stream: trio.SocketStream) -> None:
        head, rest = await _read_head(stream)
        lines = head.split(b"\r\n")
        path = lines[0].split(b" ")[1].decode()
        key = next(ln.split(b":", 1)[1].strip() for ln in lines[1:] if ln.lower().startswith(b"sec-websocket-key:"))
        accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
        await stream.send_all(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
        )
        wire = Wire(stream, mask=False, initial=rest)
        self.wires.setdefault(path, []).append(wire)
        try:
            await self.behaviours[path](wire)
        except (EOFError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)


async def echo(wire: Wire) -> None:
    while True:
        got = await wire.message()
        if isinstance(got, Close):
            await wire.send(CLOSE, close_payload(got.code) if got.code else b"")
            await wire.until_eof()
            return
        await wire.send(BINARY, got)


# --------------------------------------------------------------------------------------------
# the 128 MiB payload: 2048 distinct 64 KiB messages, and the digest they must arrive with


@functools.cache
def flood_messages() -> tuple[list[bytes], str]:
    base = bytearray(os.urandom(BLOCK))
    msgs = []
    digest = hashlib.sha256()
    for i in range(FLOOD_COUNT):
        struct.pack_into("!I", base, 0, i)
        m = bytes(base)
        msgs.append(m)
        digest.update(m)
    return msgs, digest.hexdigest()


@dataclass
class Received:
    count: int = 0
    digest: hashlib._Hash = field(default_factory=hashlib.sha256)
    wrong_sizes: int = 0
    close: Close | None = None


async def receive_flood(wire: Wire, into: Received) -> None:
    while into.count < FLOOD_COUNT:
        got = await wire.message()
        if isinstance(got, Close):
            into.close = got
            return
        into.count += 1
        if len(got) != BLOCK:
            into.wrong_sizes += 1
        into.digest.update(got)


@dataclass
class Sent:
    messages: int = 0
    done: trio.Event = field(default_factory=trio.Event)


async def send_flood(wire: Wire, progress: Sent) -> None:
    msgs, _ = flood_messages()
    for m in msgs:
        await wire.send(BINARY, m)
        progress.messages += 1
    progress.done.set()


# --------------------------------------------------------------------------------------------
# the proxy in a subprocess


class ProxyProcess:
    def __init__(self, proc: subprocess.Popen, port: int, log: Path) -> None:
        self.proc = proc
        self.port = port
        self.log = log

    def rss(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise AssertionError(f"no VmRSS for pid {self.proc.pid}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def proxy_process(tmp_path: Path) -> Iterator[Callable[[str], Awaitable[ProxyProcess]]]:
    started: list[subprocess.Popen] = []

    async def start(yaml_text: str) -> ProxyProcess:
        port = free_port()
        config = tmp_path / f"proxy{len(started)}.yaml"
        config.write_text(yaml_text.replace("127.0.0.1:0", f"127.0.0.1:{port}", 1))
        log = tmp_path / f"proxy{len(started)}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "wsproxy", "run", "-c", str(config), "--log-level", "warning"],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=Path(__file__).resolve().parents[2],
            )
        started.append(proc)
        handle = ProxyProcess(proc, port, log)
        watch_proxy_output(handle.output)
        with trio.fail_after(15):
            while True:
                assert proc.poll() is None, f"proxy exited:\n{handle.output()}"
                try:
                    probe = await trio.open_tcp_stream("127.0.0.1", port)
                except OSError:
                    await trio.sleep(0.05)
                    continue
                await trio.aclose_forcefully(probe)
                return handle

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


class RssSampler:
    def __init__(self, proxy: ProxyProcess) -> None:
        self.proxy = proxy
        self.peak = 0
        self.samples = 0

    async def run(self) -> None:
        while True:
            self.peak = max(self.peak, self.proxy.rss())
            self.samples += 1
            await trio.sleep(0.01)


def flood_config(backend_port: int, relay: str) -> str:
    # heartbeats off: nothing but the flood on the wire
    return proxy_yaml([backend_port], listener_extra=f"relay: {relay}", extra="heartbeat: {interval: off}\n")


async def warm_up(port: int) -> None:
    """A session moving some data both ways, so lazy imports and allocator pools are in the baseline."""
    client = await connect_client(port, "/echo")
    msgs, _ = flood_messages()
    for m in msgs[:32]:
        await client.send(BINARY, m)
        assert await client.message() == m
    await client.send(CLOSE, close_payload(1000))
    with trio.fail_after(5):
        await client.wait_close(answer=False)
        await client.until_eof()


# --------------------------------------------------------------------------------------------
# backpressure: memory stays bounded while a receiver reads nothing


async def test_backend_flood_to_a_stalled_client_keeps_proxy_memory_bounded(nursery, relay, proxy_process) -> None:
    sent = Sent()
    go = trio.Event()

    async def flood(wire: Wire) -> None:
        await go.wait()
        await send_flood(wire, sent)
        await wire.wait_close()
        await wire.until_eof()

    backend = await RawBackend({"/flood": flood, "/echo": echo}).start(nursery)
    proxy = await proxy_process(flood_config(backend.port, relay))
    await warm_up(proxy.port)
    client = await connect_client(proxy.port, "/flood")
    baseline = proxy.rss()
    sampler = RssSampler(proxy)
    async with trio.open_nursery() as sampling:
        sampling.start_soon(sampler.run)
        go.set()
        await trio.sleep(STALL)  # the client reads nothing
        sent_during_stall = sent.messages
        received = Received()
        with trio.fail_after(30):
            await receive_flood(client, received)
        sampling.cancel_scope.cancel()
    growth = sampler.peak - baseline
    assert sampler.samples > 50
    assert growth < RSS_GROWTH_LIMIT, f"RSS grew by {growth / MiB:.1f} MiB while the client read nothing"
    # backpressure reached the backend: it could not push the whole 128 MiB while nobody read
    assert sent_during_stall < FLOOD_COUNT // 2, f"{sent_during_stall} of {FLOOD_COUNT} messages left the backend"
    _, expected = flood_messages()
    assert received.close is None, f"closed by the proxy: {received.close}"
    assert (received.count, received.wrong_sizes) == (FLOOD_COUNT, 0)
    assert received.digest.hexdigest() == expected
    await client.send(CLOSE, close_payload(1000))
    with trio.fail_after(5):
        assert (await client.wait_close(answer=False)).code == 1000


async def test_client_upload_to_a_stalled_backend_keeps_proxy_memory_bounded(nursery, relay, proxy_process) -> None:
    start_reading = trio.Event()
    received = Received()
    all_in = trio.Event()

    async def sink(wire: Wire) -> None:
        await start_reading.wait()
        await receive_flood(wire, received)
        all_in.set()
        await wire.wait_close()
        await wire.until_eof()

    backend = await RawBackend({"/sink": sink, "/echo": echo}).start(nursery)
    proxy = await proxy_process(flood_config(backend.port, relay))
    await warm_up(proxy.port)
    client = await connect_client(proxy.port, "/sink")
    baseline = proxy.rss()
    sampler = RssSampler(proxy)
    sent = Sent()
    async with trio.open_nursery() as inner:
        inner.start_soon(sampler.run)
        inner.start_soon(send_flood, client, sent)
        await trio.sleep(STALL)  # the backend reads nothing
        sent_during_stall = sent.messages
        start_reading.set()
        with trio.fail_after(30):
            await all_in.wait()
            await sent.done.wait()
        inner.cancel_scope.cancel()
    growth = sampler.peak - baseline
    assert sampler.samples > 50
    assert growth < RSS_GROWTH_LIMIT, f"RSS grew by {growth / MiB:.1f} MiB while the backend read nothing"
    assert sent_during_stall < FLOOD_COUNT // 2, f"{sent_during_stall} of {FLOOD_COUNT} messages left the client"
    _, expected = flood_messages()
    assert received.close is None, f"closed by the proxy: {received.close}"
    assert (received.count, received.wrong_sizes) == (FLOOD_COUNT, 0)
    assert received.digest.hexdigest() == expected
    await client.send(CLOSE, close_payload(1000))
    with trio.fail_after(5):
        assert (await client.wait_close(answer=False)).code == 1000


# --------------------------------------------------------------------------------------------
# limits.max_message_bytes: counted while streaming


LIMIT_1MIB = "limits: {max_message_bytes: 1MiB}\ntimeouts: {close: 2s}\nheartbeat: {interval: off}\n"


def limit_config(backend_port: int, relay: str) -> str:
    return proxy_yaml([backend_port], listener_extra=f"relay: {relay}", extra=LIMIT_1MIB)


async def send_too_big(wire: Wire, shape: str) -> None:
    """Start a 2 MiB message but stop after 1 MiB + 64 KiB: it is never finished, so a proxy
    that waited for the whole message (buffering it) would never see it is too big."""
    chunk = os.urandom(BLOCK)
    if shape == "fragments":
        await wire.send(BINARY, chunk, fin=False)
        for _ in range(16):
            await wire.send(CONT, chunk, fin=False)
    else:  # one frame announcing 2 MiB, of which only part is sent
        head = build_frame(BINARY, b"", mask=False, length=2 * MiB)
        if wire.mask:
            key = b"\x11\x22\x33\x44"
            head = head[:1] + bytes([head[1] | 0x80]) + head[2:] + key
            body = _xor(chunk * 17, key)
        else:
            body = chunk * 17
        # the proxy may refuse the frame from its header alone and drop the rest: fine
        with contextlib.suppress(trio.BrokenResourceError):
            await wire.send_raw(head + body)


async def read_partial_then_close(wire: Wire) -> Close:
    """Data frames (of an unfinished message) until the close; answer the close."""
    while True:
        f = await wire.frame()
        if f.opcode in (TEXT, BINARY, CONT):
            wire.received_bytes += len(f.payload)
        elif f.opcode == CLOSE:
            code = struct.unpack("!H", f.payload[:2])[0] if len(f.payload) >= 2 else None
            wire.close = Close(code, f.payload[2:].decode(errors="replace"))
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await wire.send(CLOSE, f.payload[:2])
            return wire.close


@pytest.mark.parametrize("shape", ["fragments", "one_frame"])
async def test_client_message_over_the_limit_gets_1009_and_backend_1001(nursery, relay, shape) -> None:
    backend_close: list[Close] = []
    backend_bytes: list[int] = []

    async def watch(wire: Wire) -> None:
        backend_close.append(await read_partial_then_close(wire))
        backend_bytes.append(wire.received_bytes)
        await wire.until_eof()

    backend = await RawBackend({"/watch": watch}).start(nursery)
    proxy = await start_proxy(nursery, limit_config(backend.port, relay))
    client = await connect_client(proxy.port(), "/watch")
    await send_too_big(client, shape)
    with trio.fail_after(5):
        got = await read_partial_then_close(client)
    assert got.code == 1009, got
    with trio.fail_after(5):
        while not backend_close:
            await trio.sleep(0.01)
    assert backend_close[0].code == 1001, backend_close[0]
    # the proxy streamed the message's start on (it held none of it whole) and stopped at the limit
    assert backend_bytes[0] <= MiB
    with trio.fail_after(5):
        await client.until_eof()


@pytest.mark.parametrize("shape", ["fragments", "one_frame"])
async def test_backend_message_over_the_limit_gets_1009_and_client_1001(nursery, relay, shape) -> None:
    backend_close: list[Close] = []

    async def too_big(wire: Wire) -> None:
        await send_too_big(wire, shape)
        backend_close.append(await read_partial_then_close(wire))
        await wire.until_eof()

    backend = await RawBackend({"/big": too_big}).start(nursery)
    proxy = await start_proxy(nursery, limit_config(backend.port, relay))
    client = await connect_client(proxy.port(), "/big")
    with trio.fail_after(5):
        got = await read_partial_then_close(client)
    assert got.code == 1001, got
    assert client.received_bytes <= MiB
    with trio.fail_after(5):
        while not backend_close:
            await trio.sleep(0.01)
    assert backend_close[0].code == 1009, backend_close[0]


async def test_streamed_message_reaches_the_backend_before_it_ends(nursery, relay) -> None:
    """Under the limit, fragments go on as they come: the backend sees the start of a message
    whose end the client has not sent yet."""
    first_bytes = trio.Event()

    async def watch(wire: Wire) -> None:
        while wire.received_bytes < 512 * 1024:
            f = await wire.frame()
            wire.received_bytes += len(f.payload)
        first_bytes.set()
        await wire.until_eof()

    backend = await RawBackend({"/watch": watch}).start(nursery)
    proxy = await start_proxy(nursery, limit_config(backend.port, relay))
    client = await connect_client(proxy.port(), "/watch")
    chunk = os.urandom(BLOCK)
    await client.send(BINARY, chunk, fin=False)
    for _ in range(9):
        await client.send(CONT, chunk, fin=False)
    with trio.fail_after(5):
        await first_bytes.wait()


async def test_message_of_exactly_the_limit_passes(nursery, relay) -> None:
    backend = await RawBackend({"/echo": echo}).start(nursery)
    proxy = await start_proxy(
        nursery,
        proxy_yaml(
            [backend.port],
            listener_extra=f"relay: {relay}",
            extra="limits: {max_message_bytes: 2MiB}\nheartbeat: {interval: off}\n",
        ),
    )
    client = await connect_client(proxy.port(), "/echo")
    payload = os.urandom(2 * MiB)
    await client.send(BINARY, payload[:MiB], fin=False)
    await client.send(CONT, payload[MiB:], fin=True)
    with trio.fail_after(10):
        assert await client.message() == payload


# --------------------------------------------------------------------------------------------
# limits.slow_consumer_timeout


SLOW = "limits: {slow_consumer_timeout: 1s}\ntimeouts: {close: 2s}\nheartbeat: {interval: off}\n"


async def endless_flood(wire: Wire) -> None:
    """Send 64 KiB messages until the proxy closes; answer its close."""
    chunk = os.urandom(BLOCK)

    async def send_forever() -> None:
        with trio.move_on_after(30):
            while wire.close is None:
                await wire.send(BINARY, chunk)

    async with trio.open_nursery() as inner:
        inner.start_soon(send_forever)
        await wire.wait_close()
        inner.cancel_scope.cancel()
    await wire.until_eof()


async def test_slow_consumer_is_dropped_and_the_backend_gets_1001(nursery, relay) -> None:
    backend = await RawBackend({"/flood": endless_flood, "/echo": echo}).start(nursery)
    proxy = await start_proxy(nursery, proxy_yaml([backend.port], listener_extra=f"relay: {relay}", extra=SLOW))
    bystander = await connect_client(proxy.port(), "/echo")
    slow = await connect_client(proxy.port(), "/flood")  # never reads
    start = trio.current_time()
    with trio.fail_after(2):
        while not backend.wires.get("/flood"):
            await trio.sleep(0.01)
    flood_wire = backend.wires["/flood"][0]

    async def check_bystander() -> None:
        for i in range(6):
            msg = b"still here %d" % i
            await bystander.send(BINARY, msg)
            assert await bystander.message() == msg
            await trio.sleep(0.25)

    async with trio.open_nursery() as inner:
        inner.start_soon(check_bystander)
        with trio.fail_after(6):
            while flood_wire.close is None:
                await trio.sleep(0.01)
    closed_after = trio.current_time() - start
    assert flood_wire.close.code == 1001, flood_wire.close
    assert 1.0 <= closed_after <= 5.0, f"backend told after {closed_after:.2f}s"
    # the slow client's socket was closed by the proxy: reading now ends (EOF or reset), not hangs
    with trio.fail_after(5):
        await slow.until_eof()
    # the other session is untouched
    await bystander.send(BINARY, b"after")
    with trio.fail_after(2):
        assert await bystander.message() == b"after"


async def test_slow_backend_is_dropped_and_the_client_gets_1001(nursery, relay) -> None:
    backend_gone = trio.Event()
    stall_started = trio.Event()

    async def stall(wire: Wire) -> None:
        stall_started.set()
        await trio.sleep(2)  # reads nothing while the client uploads
        await wire.until_eof()  # then drains: the proxy must have closed this socket
        backend_gone.set()

    backend = await RawBackend({"/stall": stall, "/echo": echo}).start(nursery)
    proxy = await start_proxy(nursery, proxy_yaml([backend.port], listener_extra=f"relay: {relay}", extra=SLOW))
    bystander = await connect_client(proxy.port(), "/echo")
    client = await connect_client(proxy.port(), "/stall")
    await stall_started.wait()
    start = trio.current_time()
    chunk = os.urandom(BLOCK)

    async def upload() -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while client.close is None:
                await client.send(BINARY, chunk)

    async with trio.open_nursery() as inner:
        inner.start_soon(upload)
        with trio.fail_after(6):
            got = await client.wait_close()
        inner.cancel_scope.cancel()
    closed_after = trio.current_time() - start
    assert got.code == 1001, got
    assert 1.0 <= closed_after <= 5.0, f"client told after {closed_after:.2f}s"
    with trio.fail_after(5):
        await backend_gone.wait()
    await bystander.send(BINARY, b"unaffected")
    with trio.fail_after(2):
        assert await bystander.message() == b"unaffected"


async def test_slow_consumer_off_by_default_keeps_a_stalled_client(nursery, relay) -> None:
    backend = await RawBackend({"/flood": endless_flood}).start(nursery)
    proxy = await start_proxy(
        nursery,
        proxy_yaml([backend.port], listener_extra=f"relay: {relay}", extra="heartbeat: {interval: off}\n"),
    )
    slow = await connect_client(proxy.port(), "/flood")
    await trio.sleep(1.2)
    flood_wire = backend.wires["/flood"][0]
    assert flood_wire.close is None
    with trio.fail_after(10):
        for _ in range(64):  # the stalled client can still read what waited for it
            got = await slow.message()
            assert isinstance(got, bytes) and len(got) == BLOCK


async def test_a_client_that_reads_steadily_is_not_a_slow_consumer(nursery, relay) -> None:
    """Reading 64 KiB every 50 ms (1.25 MiB/s) for 2 s while the backend floods: it accepts data
    all the time, so a 1 s slow-consumer timeout must not fire."""
    backend = await RawBackend({"/flood": endless_flood}).start(nursery)
    proxy = await start_proxy(nursery, proxy_yaml([backend.port], listener_extra=f"relay: {relay}", extra=SLOW))
    client = await connect_client(proxy.port(), "/flood")
    got = 0
    with trio.move_on_after(2):
        while True:
            data = await client.stream.receive_some(BLOCK)
            assert data, "the proxy closed a client that was reading"
            got += len(data)
            await trio.sleep(0.05)
    assert got > MiB
    assert backend.wires["/flood"][0].close is None


async def test_a_slow_consumer_that_reads_again_within_the_close_timeout_gets_1008_not_a_reset(nursery, relay) -> None:
    backend = await RawBackend({"/flood": endless_flood}).start(nursery)
    extra = "limits: {slow_consumer_timeout: 1s}\ntimeouts: {close: 4s}\nheartbeat: {interval: off}\n"
    proxy = await start_proxy(nursery, proxy_yaml([backend.port], listener_extra=f"relay: {relay}", extra=extra))
    slow = await connect_client(proxy.port(), "/flood", rcvbuf=4096)  # reads nothing for now
    with trio.fail_after(2):
        while not backend.wires.get("/flood"):
            await trio.sleep(0.01)
    flood_wire = backend.wires["/flood"][0]
    with trio.fail_after(6):
        while flood_wire.close is None:
            await trio.sleep(0.01)
    assert flood_wire.close.code == 1001  # dropped as slow: the backend was told
    await trio.sleep(0.5)  # a moment later, the client reads again
    with trio.fail_after(3):
        got = await slow.wait_close()  # the rest of its frame in flight, then the proxy's close
    assert got.code == 1008 and "too slow" in got.reason, got
    with trio.fail_after(3):
        await slow.until_eof()
    with trio.fail_after(5):
        while proxy.server.sessions:
            await trio.sleep(0.05)


@pytest.mark.parametrize("shape", ["unmasked", "rsv2"])
async def test_a_protocol_error_delivers_replies_in_flight_and_the_close_not_a_reset(nursery, relay, shape) -> None:
    """The client has 1 MiB of echo still to read when it breaks the protocol and goes on
    sending: the proxy reads and discards that input (lingering close) instead of closing a
    socket with unread input, which would reset the connection and lose the reply and the close."""
    backend = await RawBackend({"/echo": echo}).start(nursery)
    extra = "timeouts: {close: 4s}\nheartbeat: {interval: off}\n"
    proxy = await start_proxy(nursery, proxy_yaml([backend.port], listener_extra=f"relay: {relay}", extra=extra))
    client = await connect_client(proxy.port(), "/echo", rcvbuf=4096)
    big = os.urandom(MiB)
    await client.send(BINARY, big)
    await trio.sleep(0.3)  # the echo is on its way back, most of it waiting at the proxy
    bad = (
        build_frame(BINARY, b"bad", mask=False) if shape == "unmasked" else build_frame(BINARY | 0x20, b"b", mask=True)
    )
    garbage = build_frame(BINARY, b"g" * 4000, mask=True)
    done = trio.Event()

    async def keep_sending() -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await client.send_raw(bad)
            with trio.move_on_after(3):
                while not done.is_set():
                    await client.send_raw(garbage)
                    await trio.sleep(0.001)

    async with trio.open_nursery() as inner:
        inner.start_soon(keep_sending)
        await trio.sleep(0.3)
        with trio.fail_after(5):
            assert await client.message() == big  # the reply already on its way
            got = await client.message()
        done.set()
    assert isinstance(got, Close) and got.code == 1002, got
    await client.stream.aclose()
    with trio.fail_after(5):
        while proxy.server.sessions:
            await trio.sleep(0.05)
