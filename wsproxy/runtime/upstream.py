"""Connecting to a backend and running the Upgrade handshake on that hop.

The shell half of the upstream handshake: it owns the socket and the waiting (connect timeout,
the deadline for the backend's answer); every decision about the answer is handshake.py's.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import socket
from dataclasses import dataclass
from typing import Any

import h11
import trio

from wsproxy.config import Address
from wsproxy.policy import capacity
from wsproxy.protocol import http_head
from wsproxy.runtime.streams import FastSocketStream, Stream, close_socket, tune_tcp


class UpstreamError(Exception):
    """The backend could not be reached or did not answer in time (counts as a failure)."""

    def __init__(self, reason: str, *, timeout: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.timeout = timeout


class LocalResourceError(Exception):
    """The connect failed for want of the proxy's OWN resources (descriptors, memory, buffers,
    source ports: policy/capacity.py): never a verdict on the backend. Not an UpstreamError on
    purpose, so no code that counts backend failures can count it by accident."""

    def __init__(self, resource: str, reason: str) -> None:
        super().__init__(reason)
        self.resource = resource
        self.reason = reason


@dataclass(slots=True)
class UpstreamAnswer:
    """What the backend said: a 101 (with bytes that followed it) or a normal HTTP response."""

    stream: Stream  # plain TCP or TLS (backend_tls.py)
    conn: h11.Connection | None  # the h11 reader of an answer h11 read (None: a plain 101, http_head.py)
    response: h11.InformationalResponse | h11.Response | http_head.Switching
    trailing: bytes = b""


async def connect(address: Address, timeout: float) -> FastSocketStream:
    """Open a TCP connection to the backend within `timeout` seconds, on a stdlib socket the
    session owns from here on (the relay phase hands it to the readiness loop as it is).

    Backends are usually given by IP address: those skip name resolution. A name is resolved
    (trio's threaded getaddrinfo) and its addresses are tried in order within the same timeout.

    Raises UpstreamError (the backend's failure) or LocalResourceError (the proxy's own shortage:
    a socket or connect that failed for want of descriptors, memory, buffers or source ports).
    """
    deadline = trio.current_time() + timeout  # waited on only where a wait is needed (a scope costs)
    family = _ip_family(address.host)
    if family is not None:
        targets: list[tuple[int, tuple[Any, ...]]] = [(family, (address.host, address.port))]
    else:
        infos = None
        with trio.move_on_at(deadline):
            try:
                infos = await trio.socket.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM)
            except OSError as exc:
                raise UpstreamError(f"connect to {address} failed: {exc.strerror or exc}") from None
        if infos is None:
            raise UpstreamError(f"connect to {address} timed out after {timeout:g}s", timeout=True)
        targets = [(info[0], tuple(info[4])) for info in infos]
    last: OSError | None = None
    for fam, sockaddr in targets:
        try:
            sock = await _connect_one(fam, sockaddr, deadline)
        except OSError as exc:
            resource = capacity.local_resource(exc.errno)
            if resource is not None:  # the proxy's own shortage: no other address would fare better
                raise LocalResourceError(resource, f"connect to {address} failed: {exc.strerror or exc}") from None
            last = exc
            continue
        if sock is None:
            raise UpstreamError(f"connect to {address} timed out after {timeout:g}s", timeout=True)
        return FastSocketStream(sock)
    reason = (last.strerror or str(last)) if last is not None else "no address"
    raise UpstreamError(f"connect to {address} failed: {reason}")


_NONBLOCK = getattr(socket, "SOCK_NONBLOCK", 0)  # Linux: created non-blocking, one system call fewer


@functools.lru_cache(maxsize=1024)  # per backend address, not per connection
def _ip_family(host: str) -> int | None:
    try:
        return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return None


async def _connect_one(family: int, sockaddr: tuple[Any, ...], deadline: float) -> socket.socket | None:
    """A non-blocking connect on a plain socket, waiting for writability (until `deadline`; None:
    it passed) only if it is still in progress (trio's socket connect adds a lock and a
    generator context manager per call). A connect answers EINPROGRESS even when the kernel has
    finished it (on loopback, always): a finished one (its error, or a peer address) is not
    waited for, and then no cancel scope is entered either."""
    sock = socket.socket(family, socket.SOCK_STREAM | _NONBLOCK)
    try:
        tune_tcp(sock)
        try:
            sock.connect(sockaddr)
        except BlockingIOError:
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if not err and not _connected(sock):
                with trio.move_on_at(deadline) as scope:
                    await trio.lowlevel.wait_writable(sock)
                if scope.cancelled_caught:
                    close_socket(sock)
                    return None
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise OSError(err, os.strerror(err)) from None
    except BaseException:
        close_socket(sock)
        raise
    return sock


def _connected(sock: socket.socket) -> bool:
    try:
        sock.getpeername()
    except OSError:  # ENOTCONN: still in progress
        return False
    return True


async def request_upgrade(
    stream: Stream, request: bytes, *, upgrade: bool = True, max_header_bytes: int, receive_size: int
) -> UpstreamAnswer:
    """Send the request head (`request`, a GET; `upgrade`: it offers a protocol switch) and read
    the backend's response head (not its body).

    A plain 101 is read directly (http_head.py); any other answer goes to h11, fed every byte
    read so far. The caller bounds this with the handshake deadline. A malformed or oversized
    answer, or a stream that ends first, raises UpstreamError.
    """
    try:
        await stream.send_all(request)
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        raise UpstreamError(f"backend closed the connection while we sent the request: {exc}") from None
    got = b""
    while upgrade:  # (a 101 to a request that offered no switch is h11's to refuse)
        searched = len(got) - 2  # a blank line ending in what arrives now starts here at the earliest
        got += await _receive(stream, receive_size)
        end = http_head.head_end(got, searched)
        if end < 0:
            if len(got) > max_header_bytes or not http_head.may_be_101(got):
                break  # not a plain 101: h11 reads it (and says how it is malformed, if it is)
            continue
        switching = http_head.parse_101(got[:end])
        if switching is None:
            break
        if response_head_size(switching) > max_header_bytes:
            raise UpstreamError(f"backend's response head is over {max_header_bytes} bytes")
        return UpstreamAnswer(stream, None, switching, got[end:])
    return await _read_with_h11(
        stream, got, upgrade=upgrade, max_header_bytes=max_header_bytes, receive_size=receive_size
    )


async def _receive(stream: Stream, receive_size: int) -> bytes:
    try:
        data = await stream.receive_some(receive_size)
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        raise UpstreamError(f"backend connection broke during the handshake: {exc}") from None
    if not data:
        raise UpstreamError("backend closed the connection without answering the Upgrade")
    return data


def _h11_client(*, upgrade: bool, max_header_bytes: int) -> h11.Connection:
    """An h11 client connection in the state of one that sent our request: how h11 reads an
    answer depends only on the method (a GET) and on whether a switch was offered, so a stand-in
    with those two is sent (its bytes are dropped; the real ones went to the backend)."""
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=max_header_bytes)
    headers = [(b"Host", b"backend")]
    if upgrade:
        headers += [(b"Connection", b"Upgrade"), (b"Upgrade", b"websocket")]
    conn.send(h11.Request(method=b"GET", target=b"/", headers=headers))
    conn.send(h11.EndOfMessage())
    return conn


async def _read_with_h11(
    stream: Stream, got: bytes, *, upgrade: bool, max_header_bytes: int, receive_size: int
) -> UpstreamAnswer:
    """The backend's answer, read by h11 from `got` (the bytes read so far) on."""
    conn = _h11_client(upgrade=upgrade, max_header_bytes=max_header_bytes)
    if got:  # (b"" would tell h11 the stream ended)
        conn.receive_data(got)
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise UpstreamError(f"backend sent a malformed HTTP response: {exc}") from None
        if event is h11.NEED_DATA:
            conn.receive_data(await _receive(stream, receive_size))
            continue
        if isinstance(event, h11.InformationalResponse | h11.Response) and response_head_size(event) > max_header_bytes:
            raise UpstreamError(f"backend's response head is over {max_header_bytes} bytes")
        if isinstance(event, h11.InformationalResponse):
            if event.status_code == 101:
                trailing, _closed = conn.trailing_data
                return UpstreamAnswer(stream, conn, event, bytes(trailing))
            continue  # 1xx other than 101 (e.g. 100): keep waiting for the real answer
        if isinstance(event, h11.Response):
            return UpstreamAnswer(stream, conn, event)
        raise UpstreamError(f"unexpected event from backend: {type(event).__name__}")


def response_head_size(response: h11.InformationalResponse | h11.Response | http_head.Switching) -> int:
    """h11 bounds only a head still incomplete; one that arrived whole is measured here."""
    line = len(response.http_version) + len(response.reason) + 14
    raw = response.raw_items() if isinstance(response, http_head.Switching) else response.headers.raw_items()
    return line + sum(len(k) + len(v) + 4 for k, v in raw)
