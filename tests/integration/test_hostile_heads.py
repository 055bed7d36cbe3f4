"""Request heads built by hypothesis, through a running proxy: never a traceback (issue 17).

Heads are built from the handshake's own vocabulary (its header names, valid and invalid values,
repeated, listed in Connection, in odd casing, with odd whitespace) and from request lines with
odd methods, targets and versions. For every one: the client gets an HTTP answer or a 101, the
proxy logs no ERROR, and no backend connection is left open (the test backend counts the
connections it accepted and those still open).

The proxy and the backend run in one trio thread for the whole module (a proxy per example would
cost more than the examples); the test itself talks through plain blocking sockets.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wsproxy.config import parse_config
from wsproxy.runtime.server import Server

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
CONFIG = """
listeners:
  - address: 127.0.0.1:0
    pool: p
pools:
  p:
    backends: ["127.0.0.1:{backend}"]
    retries: 0
    passive: off
timeouts: {{handshake: 1s, connect: 1s, close: 0.5s}}
heartbeat: {{interval: off}}
limits: {{max_header_bytes: 4096}}
"""


@dataclass
class Harness:
    """A proxy in front of a counting backend, on one trio thread."""

    port: int = 0
    accepted: int = 0
    open: int = 0
    errors: list[logging.LogRecord] = field(default_factory=list)
    token: trio.lowlevel.TrioToken | None = None
    stop: trio.Event | None = None


class _Errors(logging.Handler):
    def __init__(self, sink: list[logging.LogRecord]) -> None:
        super().__init__(level=logging.ERROR)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        self.sink.append(record)


async def _backend(harness: Harness, stream: trio.SocketStream) -> None:
    """Answer any request head with a valid 101, then hang up at the first bytes or EOF."""
    harness.accepted += 1
    harness.open += 1
    try:
        head = b""
        with trio.move_on_after(5):
            while b"\r\n\r\n" not in head and len(head) < 65536:
                data = await stream.receive_some(65536)
                if not data:
                    return
                head += data
            found = re.search(rb"(?im)^sec-websocket-key:[ \t]*(\S+)", head)
            accept = base64.b64encode(hashlib.sha1((found.group(1) if found else b"") + GUID).digest())
            await stream.send_all(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
            )
            await stream.receive_some(65536)  # the proxy's close frame, or EOF
    except trio.BrokenResourceError:
        pass
    finally:
        harness.open -= 1
        await trio.aclose_forcefully(stream)


def _serve(harness: Harness, ready: threading.Event) -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(trio.serve_tcp, lambda s: _backend(harness, s), 0)
            backend_port = listeners[0].socket.getsockname()[1]
            server = Server(parse_config(CONFIG.format(backend=backend_port), source="heads.yaml"))
            await nursery.start(server.serve)
            harness.port = server.bound[0][1][1]
            harness.token = trio.lowlevel.current_trio_token()
            harness.stop = trio.Event()
            ready.set()
            await harness.stop.wait()
            nursery.cancel_scope.cancel()

    trio.run(main)


@pytest.fixture(scope="module")
def harness() -> Iterator[Harness]:
    h = Harness()
    handler = _Errors(h.errors)
    logging.getLogger("wsproxy").addHandler(handler)
    ready = threading.Event()
    thread = threading.Thread(target=_serve, args=(h, ready), daemon=True)
    thread.start()
    assert ready.wait(10)
    try:
        yield h
    finally:
        assert h.token is not None and h.stop is not None
        trio.from_thread.run_sync(h.stop.set, trio_token=h.token)
        thread.join(10)
        logging.getLogger("wsproxy").removeHandler(handler)


# --- the heads ---------------------------------------------------------------------------------

VALUES: dict[bytes, list[bytes]] = {
    b"Host": [b"127.0.0.1:{port}", b"", b"evil.example", b"x\\", b'a"b', b"[::1]:80", b"127.0.0.1:{port}, other"],
    b"Upgrade": [b"websocket", b"WebSocket", b"h2c", b"websocket, h2c", b""],
    b"Connection": [b"Upgrade", b"upgrade, keep-alive", b"close", b"Upgrade, Host", b"Upgrade, Sec-WebSocket-Key"],
    b"Sec-WebSocket-Key": [KEY, b"short", b"", KEY + b"=", b"!!!!"],
    b"Sec-WebSocket-Version": [b"13", b"8", b"13, 8", b"", b"thirteen"],
    b"Sec-WebSocket-Protocol": [b"chat", b"chat, superchat", b",,", b"a b"],
    b"Sec-WebSocket-Extensions": [b"permessage-deflate", b"permessage-deflate; client_max_window_bits", b"x; y=\""],
    b"Sec-WebSocket-Accept": [b"forged"],
    b"Origin": [b"https://example.com", b"null", b""],
    b"Content-Length": [b"0", b"x", b"-1", b"00"],
    b"Transfer-Encoding": [b"gzip", b"identity"],
    b"X-Forwarded-For": [b"6.6.6.6", b"6.6.6.6, 10.0.0.1", b"garbage", b""],
    b"Forwarded": [b"for=6.6.6.6", b'for="[::1]:80";host="x\\\\"', b"for"],
    b"X-Real-IP": [b"6.6.6.6", b"::1"],
    b"Keep-Alive": [b"timeout=5"],
    b"TE": [b"trailers"],
    b"Trailer": [b"X-Sum"],
    b"Proxy-Connection": [b"keep-alive"],
    b"Cookie": [b"a=1; b=2"],
}
LISTABLE = [n.lower() for n in VALUES] + [b"upgrade", b"x-other", b""]
TARGETS = [b"/", b"/chat?token=1", b"//a/./b/../c", b"/%61", b"/%2e%2e/x", b"/a%2Fb", b"/a\\b", b"*",
           b"http://127.0.0.1:{port}/x", b"http://evil.example/x", b"/a#b"]  # fmt: skip
BASE = [b"Host", b"Upgrade", b"Connection", b"Sec-WebSocket-Key", b"Sec-WebSocket-Version"]


def _case(name: bytes, style: int) -> bytes:
    return (name, name.lower(), name.upper(), name.swapcase())[style]


@st.composite
def heads(draw: st.DrawFn) -> bytes:
    method = draw(st.sampled_from([b"GET"] * 6 + [b"POST", b"get", b"HEAD"]))
    target = draw(st.sampled_from(TARGETS))
    version = draw(st.sampled_from([b"HTTP/1.1"] * 6 + [b"HTTP/1.0"]))
    fields = [(n, VALUES[n][0]) for n in BASE if draw(st.integers(0, 9)) > 0]  # usually all of them
    extra = st.sampled_from(list(VALUES)).flatmap(lambda n: st.tuples(st.just(n), st.sampled_from(VALUES[n])))
    fields += draw(st.lists(extra, max_size=5))
    fields += [(n, v) for n, v in fields if draw(st.integers(0, 9)) == 0]  # some repeated
    listed = draw(st.lists(st.sampled_from(LISTABLE), max_size=3))
    if listed:
        fields.append((b"Connection", b", ".join([b"Upgrade", *listed])))
    fields = draw(st.permutations(fields))
    lines = [b" ".join([method, target, version])]
    for name, value in fields:
        sep = draw(st.sampled_from([b": ", b":", b":\t", b":   "] * 3 + [b" : ", b"::"]))
        pad = draw(st.sampled_from([b"", b"", b" ", b"\t"]))
        lines.append(_case(name, draw(st.integers(0, 3))) + sep + value + pad)
    return b"\r\n".join(lines) + b"\r\n\r\n"


def _answered(got: bytes) -> bool:
    """A whole answer: a 101's head, or a response head and the Content-Length bytes it announces
    (a plain HTTP request's answer, after which the proxy keeps the connection alive)."""
    end = got.find(b"\r\n\r\n")
    if end < 0:
        return False
    if got.startswith(b"HTTP/1.1 101 "):
        return True
    length = re.search(rb"(?im)^content-length:[ \t]*(\d+)[ \t]*\r$", got[: end + 2])
    return length is not None and len(got) - end - 4 >= int(length.group(1))


def _exchange(port: int, head: bytes) -> bytes:
    """Send the head; read the answer (a 101's head, or a response with its body) or everything
    until the proxy closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(head.replace(b"{port}", str(port).encode()))
        got = b""
        while True:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                break
            if not data:
                break
            got += data
            if _answered(got):
                break
    return got


def _wait_closed(harness: Harness) -> None:
    deadline = time.monotonic() + 5
    while harness.open and time.monotonic() < deadline:
        time.sleep(0.005)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(head=heads())
def test_every_head_gets_an_answer_no_error_and_leaves_no_backend_connection(harness: Harness, head: bytes) -> None:
    answer = _exchange(harness.port, head)
    assert re.match(rb"HTTP/1\.1 [1-5]\d\d [^\r\n]+\r\n", answer), (head, answer[:200])
    _wait_closed(harness)
    assert harness.open == 0, head
    assert not harness.errors, [r.getMessage() for r in harness.errors]


def test_connection_naming_host_is_400_and_no_backend_is_contacted(harness: Harness) -> None:
    before = harness.accepted
    head = (
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade, Host\r\n"
        b"Sec-WebSocket-Key: " + KEY + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    answer = _exchange(harness.port, head)
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"Connection lists host" in answer
    assert harness.accepted == before and not harness.errors
