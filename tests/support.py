"""Test support: an in-process proxy, backends from the `websockets` library, raw clients.

Backends and one family of clients come from `websockets` (a different library from the one
wsproxy speaks with), so the tests judge interop, not our code against itself. The raw trio
clients give byte-level control for bad handshakes and protocol errors.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import h11
import trio
import trustme
from websockets.sync.server import Server as WSServer
from websockets.sync.server import ServerConnection, serve
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    Pong,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

from wsproxy.config import Config, parse_config
from wsproxy.runtime.server import Server

# --------------------------------------------------------------------------------------------
# the proxy


@dataclass
class RunningProxy:
    server: Server
    config: Config

    def port(self, index: int = 0) -> int:
        return self.server.bound[index][1][1]

    def url(self, path: str = "/", index: int = 0) -> str:
        lst = self.server.bound[index][0]
        host = "localhost" if lst.tls else "127.0.0.1"
        return f"{lst.scheme}://{host}:{self.port(index)}{path}"


async def start_proxy(nursery: trio.Nursery, yaml_text: str, base_dir: Path | None = None) -> RunningProxy:
    """Parse the YAML, start a Server in `nursery`, return once every listener accepts."""
    config = parse_config(yaml_text, source="test.yaml", base_dir=base_dir)
    server = Server(config)
    await nursery.start(server.serve)
    return RunningProxy(server, config)


def proxy_yaml(
    backends: list[int],
    *,
    tls: tuple[Path, Path] | None = None,
    extra: str = "",
    listener_extra: str = "",
    pool_extra: str = "",
) -> str:
    """A one-listener, one-pool config on an ephemeral port."""
    lines = ["listeners:", "  - address: 127.0.0.1:0", "    pool: p"]
    if tls:
        lines.append(f"    tls: {{cert: {tls[0]}, key: {tls[1]}}}")
    if listener_extra:
        lines += ["    " + ln for ln in listener_extra.strip().splitlines()]
    lines += ["pools:", "  p:", "    backends:"]
    lines += [f"      - address: 127.0.0.1:{p}" for p in backends]
    if pool_extra:
        lines += ["    " + ln for ln in pool_extra.strip().splitlines()]
    return "\n".join(lines) + "\n" + extra


# --------------------------------------------------------------------------------------------
# proxy subprocesses: their output is checked for errors when the test ends (tests/conftest.py)

watched_outputs: list[Callable[[], str]] = []


def watch_proxy_output(read: Callable[[], str]) -> None:
    """Have the ERROR-log guard read a wsproxy subprocess's log output (`read()`) when the test
    ends: an ERROR line or a traceback in it fails the test unless the test expects that error."""
    watched_outputs.append(read)


# --------------------------------------------------------------------------------------------
# TLS material


@dataclass
class TLSFiles:
    ca: trustme.CA
    cert: Path
    key: Path

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        self.ca.configure_trust(ctx)
        return ctx


def make_tls_files(directory: Path) -> TLSFiles:
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    cert, key = directory / "cert.pem", directory / "key.pem"
    leaf.private_key_pem.write_to_path(str(key))
    with cert.open("wb") as f:
        for blob in leaf.cert_chain_pems:
            f.write(blob.bytes())
    return TLSFiles(ca, cert, key)


# --------------------------------------------------------------------------------------------
# backends: the `websockets` library's threaded server


@dataclass
class Backend:
    server: WSServer
    thread: threading.Thread
    requests: list = field(default_factory=list)  # websockets Request objects seen

    @property
    def port(self) -> int:
        return self.server.socket.getsockname()[1]

    def stop(self) -> None:
        self.server.shutdown()
        self.thread.join(timeout=10)


def echo_handler(conn: ServerConnection) -> None:
    """Echo every message until the client closes."""
    for message in conn:
        conn.send(message)


def start_backend(handler: Callable[[ServerConnection], None] = echo_handler, **kwargs) -> Backend:  # type: ignore[no-untyped-def]
    """A websockets backend on 127.0.0.1 in a thread; records each handshake request."""
    requests: list = []

    def process_request(conn, request):  # type: ignore[no-untyped-def]
        requests.append(request)
        return None

    kwargs.setdefault("ping_interval", None)
    kwargs.setdefault("max_size", None)
    server = serve(handler, "127.0.0.1", 0, process_request=process_request, **kwargs)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return Backend(server, thread, requests)


def backend_reads(wire: bytes) -> h11.Request:
    """A request head as a backend reads it (h11 on the server side): what tests check of the
    bytes the proxy sends upstream."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(wire)
    event = conn.next_event()
    assert isinstance(event, h11.Request), (event, wire[:200])
    return event


def free_port() -> int:
    """A port nothing listens on (bound then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------
# a one-task wsproto backend with byte-level control


async def serve_wsproto(stream: trio.SocketStream, on_event: Callable[[WSConnection, Event], bytes]) -> None:
    """Serve one WebSocket connection in one task: accept the Upgrade, answer the peer's close,
    and hand every other event to `on_event`, which returns the bytes to send (b"" for none).
    One task on purpose: while it is blocked sending it reads nothing, as a slow backend would."""
    ws = WSConnection(ConnectionType.SERVER)
    async with stream:
        while True:
            try:
                data = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                return
            ws.receive_data(data or None)
            out = b""
            for ev in ws.events():
                if isinstance(ev, Request):
                    out += ws.send(AcceptConnection())
                elif isinstance(ev, CloseConnection):
                    if ws.state.name == "REMOTE_CLOSING":
                        out += ws.send(ev.response())
                else:
                    out += on_event(ws, ev)
            if out:
                try:
                    await stream.send_all(out)
                except trio.BrokenResourceError:
                    return
            if not data or ws.state.name == "CLOSED":
                return


# --------------------------------------------------------------------------------------------
# a raw trio client with byte-level control (wsproto high-level client)


class RawClient:
    """A WebSocket client on wsproto: sends exactly what a test asks, records every event."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.pending: list[Event] = []
        self.accept: AcceptConnection | None = None
        self.reject: RejectConnection | None = None
        self.reject_body = b""
        self.control: list[Event] = []  # pings/pongs seen while waiting for messages

    @classmethod
    async def connect(
        cls,
        port: int,
        path: str = "/",
        *,
        host: str = "127.0.0.1",
        ssl_context: ssl.SSLContext | None = None,
        subprotocols: list[str] | None = None,
        extensions: list | None = None,
        extra_headers: list[tuple[bytes, bytes]] | None = None,
        local_address: str | None = None,  # e.g. "127.0.0.2": another client address on loopback
    ) -> RawClient:
        stream: trio.abc.Stream = await trio.open_tcp_stream("127.0.0.1", port, local_address=local_address)
        if ssl_context is not None:
            stream = trio.SSLStream(stream, ssl_context, server_hostname="localhost")
        client = cls(stream)
        req = Request(
            host=host,
            target=path,
            subprotocols=subprotocols or [],
            extensions=extensions or [],
            extra_headers=extra_headers or [],
        )
        await stream.send_all(client.ws.send(req))
        while client.accept is None and client.reject is None:
            event = await client._next()
            if isinstance(event, AcceptConnection):
                client.accept = event
            elif isinstance(event, RejectConnection):
                client.reject = event
                if event.has_body:
                    while True:
                        ev = await client._next()
                        assert isinstance(ev, RejectData)
                        client.reject_body += ev.data
                        if ev.body_finished:
                            break
        return client

    async def _next(self) -> Event:
        while not self.pending:
            try:
                data = await self.stream.receive_some(65536)
            except trio.BrokenResourceError:
                data = b""
            self.ws.receive_data(data or None)
            self.pending.extend(self.ws.events())
        return self.pending.pop(0)

    async def next_event(self) -> Event:
        return await self._next()

    async def send(self, event: Event) -> None:
        await self.stream.send_all(self.ws.send(event))

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def receive_message(self) -> str | bytes:
        """The next whole data message; pings and pongs seen meanwhile go to self.control."""
        parts: list = []
        while True:
            ev = await self._next()
            if isinstance(ev, TextMessage | BytesMessage):
                parts.append(ev.data)
                if ev.message_finished:
                    return "".join(parts) if isinstance(ev, TextMessage) else b"".join(bytes(p) for p in parts)
            elif isinstance(ev, CloseConnection):
                raise AssertionError(f"closed while waiting for a message: {ev.code} {ev.reason!r}")
            elif isinstance(ev, Ping | Pong):
                self.control.append(ev)

    async def wait_close(self) -> CloseConnection:
        """The close frame the proxy sends (answering it if the proxy started the handshake)."""
        while True:
            ev = await self._next()
            if isinstance(ev, CloseConnection):
                if self.ws.state.name == "REMOTE_CLOSING":
                    await self.stream.send_all(self.ws.send(ev.response()))
                return ev

    async def close(self, code: int = 1000, reason: str = "") -> CloseConnection:
        await self.send(CloseConnection(code=code, reason=reason or None))
        return await self.wait_close()

    async def expect_eof(self) -> None:
        """The proxy closes the TCP stream after the closing handshake."""
        while True:
            try:
                data = await self.stream.receive_some(65536)
            except trio.BrokenResourceError:
                return
            if not data:
                return


async def read_until_closed(stream: trio.abc.ReceiveStream, limit: float = 5.0) -> bytes:
    """Everything the peer sends until it closes (or resets), for at most `limit` seconds."""
    got = b""
    with trio.move_on_after(limit):
        while True:
            try:
                data = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                break
            if not data:
                break
            got += data
    return got


async def raw_http(port: int, request: bytes, *, read_timeout: float = 5.0) -> bytes:
    """Send raw bytes, return everything the proxy answers until it closes."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        return await read_until_closed(stream, read_timeout)


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/1.1 ") else 0


@dataclass
class BackendTLSFiles:
    """TLS material for backends the proxy reaches over TLS: the CA the proxy trusts (a file),
    the backends' server contexts, and a client certificate for mutual TLS."""

    ca: trustme.CA
    ca_path: Path
    client_cert: Path
    client_key: Path
    names: tuple[str, ...]

    def server_context(self, *, require_client_cert: bool = False) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ca.issue_cert(*self.names).configure_cert(ctx)
        if require_client_cert:
            ctx.verify_mode = ssl.CERT_REQUIRED
            self.ca.configure_trust(ctx)
        return ctx

    def pool_yaml(self, *, client_cert: bool = False, extra: str = "") -> str:
        """`tls:` for proxy_yaml's pool_extra."""
        parts = [f"ca: {self.ca_path}"]
        if client_cert:
            parts += [f"cert: {self.client_cert}", f"key: {self.client_key}"]
        if extra:
            parts.append(extra)
        return "tls: {" + ", ".join(parts) + "}"


def make_backend_tls(directory: Path, names: tuple[str, ...] = ("127.0.0.1", "localhost")) -> BackendTLSFiles:
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    ca_path = directory / "backend-ca.pem"
    ca.cert_pem.write_to_path(str(ca_path))
    client = ca.issue_cert("wsproxy-client")
    cert, key = directory / "client-cert.pem", directory / "client-key.pem"
    client.private_key_pem.write_to_path(str(key))
    client.cert_chain_pems[0].write_to_path(str(cert))
    return BackendTLSFiles(ca, ca_path, cert, key, names)


class StepTimer(trio.abc.Instrument):
    """The longest uninterrupted step of one task (trio.lowlevel.add_instrument): how long it
    held the scheduler without yielding, in CPU time of the thread, so that another process
    preempting it on a loaded machine does not count as the task's own holding."""

    def __init__(self, task: trio.lowlevel.Task | None) -> None:
        self.task = task
        self.began = 0.0
        self.longest = 0.0
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task is self.task:
            self.began = time.thread_time()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if task is self.task:
            self.steps += 1
            self.longest = max(self.longest, time.thread_time() - self.began)
