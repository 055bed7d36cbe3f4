"""The streams of a session's handshake phase, on sockets the shell owns from accept on.

The server accepts on stdlib listening sockets and the upstream connects stdlib sockets, so every
socket a session uses is ours from the start: nothing has to be pried out of trio's streams when
the relay phase hands the sockets to the readiness loop (`.socket`). Until then the handshake
speaks to them through two trio streams that try the system call first and wait only when it
must: `FastSocketStream` (plain TCP) and `FastTLSStream` (TLS to a client, or to a backend,
OpenSSL on the socket itself, public `ssl` APIs only). `read_proxy_header` reads a PROXY header
without taking a byte past it, so TLS (or the request) starts on the socket right after it.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import sys

import trio

from wsproxy.protocol import proxy_protocol

FAIR_EVERY = 16  # operations that did not have to wait, between two yields to the scheduler
PROXY_PEEK = 16 + proxy_protocol.V2_MAX_TLV  # the longest PROXY header we accept


# Unsent bytes a TCP socket may hold before it stops reporting writable (trio's SocketStream
# default too): without it the kernel takes megabytes for a slow peer, and a send the peer is
# still draining looks like one it takes nothing of (the slow-consumer timer).
NOTSENT_LOWAT = 16384


def tune_tcp(sock: socket.socket) -> None:
    """The options every TCP socket of a session gets: non-blocking, no Nagle delay (frames are
    written whole), a small unsent-bytes watermark (`NOTSENT_LOWAT`)."""
    if sock.gettimeout() != 0.0:  # (a socket created non-blocking needs no system call)
        sock.setblocking(False)
    with contextlib.suppress(OSError):  # not TCP (a Unix socket in a test)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    lowat = getattr(socket, "TCP_NOTSENT_LOWAT", None)
    if lowat is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, lowat, NOTSENT_LOWAT)


# Linux gives an accepted socket the listening socket's TCP_NODELAY and TCP_NOTSENT_LOWAT: the
# listening socket is tuned once (`tune_tcp`), each accepted one only made non-blocking.
ACCEPTED_INHERIT_OPTIONS = sys.platform.startswith("linux")


def tune_accepted(sock: socket.socket) -> None:
    """An accepted socket's options (`tune_tcp`'s), two system calls fewer where it inherits
    them from its listening socket, which the accept loop tuned."""
    if ACCEPTED_INHERIT_OPTIONS:
        sock.setblocking(False)
    else:
        tune_tcp(sock)


def format_address(addr: tuple[str, int]) -> str:
    """host:port, an IPv6 host in brackets: how addresses appear in logs."""
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def close_socket(sock: socket.socket) -> None:
    """Close `sock` now, waking any trio task that waits on it (with ClosedResourceError)."""
    if sock.fileno() != -1:
        trio.lowlevel.notify_closing(sock)
        sock.close()


def discard_readable(sock: socket.socket, limit: int = 65536) -> None:
    """Read and drop what the peer already sent (at most `limit` bytes, without waiting), so that
    closing a refused connection sends a FIN the peer can read to the end instead of a reset
    (the kernel resets a socket closed with unread input)."""
    taken = 0
    while taken < limit:
        try:
            data = sock.recv(min(65536, limit - taken), socket.MSG_DONTWAIT)
        except OSError:
            return
        if not data:
            return
        taken += len(data)


class FastSocketStream(trio.abc.HalfCloseableStream):
    """A plain TCP stream on a non-blocking stdlib socket that it owns.

    trio's SocketStream yields to the scheduler on every receive and send, even when data is
    already there or the send buffer has room (docs/performance.md). This one calls `recv`/`send`
    directly, waits with `wait_readable`/`wait_writable` only on EWOULDBLOCK, and yields every
    FAIR_EVERY calls that did not wait, so one busy peer cannot starve other sessions or hold off
    a cancellation.
    """

    __slots__ = ("_streak", "socket")

    def __init__(self, sock: socket.socket) -> None:
        if sock.gettimeout() != 0.0:
            sock.setblocking(False)
        self.socket = sock  # the relay phase hands this to the readiness loop
        self._streak = 0

    async def _fair(self) -> None:
        """After a call that did not wait: yield every FAIR_EVERY of them. Shielded, as trio's own
        calls are once they succeeded: a cancellation here would drop bytes already received or
        report a finished send as cut; the next call's check sees it instead."""
        self._streak += 1
        if self._streak >= FAIR_EVERY:
            self._streak = 0
            await trio.lowlevel.cancel_shielded_checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        size = max_bytes if max_bytes is not None else 65536
        await trio.lowlevel.checkpoint_if_cancelled()  # before the call: a cancelled receive takes nothing
        while True:
            try:
                data = self.socket.recv(size)
            except BlockingIOError:
                self._streak = 0
                await trio.lowlevel.wait_readable(self.socket)
                continue
            except OSError as exc:
                raise self._translate(exc) from exc
            await self._fair()
            return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        await trio.lowlevel.checkpoint_if_cancelled()  # before the call: a cancelled send sends nothing
        while view:
            try:
                sent = self.socket.send(view)
            except BlockingIOError:
                self._streak = 0
                await trio.lowlevel.wait_writable(self.socket)
                continue
            except OSError as exc:
                raise self._translate(exc) from exc
            view = view[sent:]
        await self._fair()

    def _translate(self, exc: OSError) -> trio.ClosedResourceError | trio.BrokenResourceError:
        if self.socket.fileno() == -1:
            return trio.ClosedResourceError("the socket was closed")
        return trio.BrokenResourceError(f"socket connection broken: {exc}")

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.wait_writable(self.socket)

    async def send_eof(self) -> None:
        await trio.lowlevel.checkpoint()
        try:
            self.socket.shutdown(socket.SHUT_WR)
        except OSError as exc:
            raise self._translate(exc) from exc

    def close_now(self) -> None:
        close_socket(self.socket)

    async def aclose(self) -> None:
        self.close_now()
        await trio.lowlevel.checkpoint()


class FastTLSStream(trio.abc.Stream):
    """TLS on a non-blocking `ssl.SSLSocket` wrapped around a socket we own: server side (a
    client's connection), or client side when a `server_hostname` is given (a backend's,
    backend_tls.py).

    trio.SSLStream pushes every record through two MemoryBIOs in Python; here OpenSSL reads and
    writes the socket itself and Python only waits when it says SSL_WANT_READ/WRITE, like
    FastSocketStream does for plain TCP. The handshake runs on first use (the session's first
    read), as SSLStream's does, or when `handshake` is awaited. A write that wants a read while
    the reader task already waits for readability (a TLS 1.3 key update, say) polls briefly
    instead of waiting twice on one socket, which trio does not allow. Missing close_notify from
    a peer is a normal end of stream (`suppress_ragged_eofs`), as with SSLStream's
    https_compatible.
    """

    __slots__ = ("_handshaken", "_streak", "socket")

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, *, server_hostname: str | None = None) -> None:
        tls = context.wrap_socket(
            sock,
            server_side=server_hostname is None,
            server_hostname=server_hostname,  # the client side's SNI and the name its certificate check expects
            do_handshake_on_connect=False,
            suppress_ragged_eofs=True,
        )
        tls.setblocking(False)
        self.socket = tls  # from here on this owns the descriptor (wrap_socket detached `sock`)
        self._handshaken = False
        self._streak = 0

    async def _wait(self, exc: ssl.SSLError) -> None:
        self._streak = 0
        try:
            if isinstance(exc, ssl.SSLWantWriteError):
                await trio.lowlevel.wait_writable(self.socket)
            else:
                await trio.lowlevel.wait_readable(self.socket)
        except trio.BusyResourceError:
            await trio.sleep(0.001)  # the other task waits on this socket: let it, then retry

    async def handshake(self) -> None:
        """Complete the TLS handshake now (else the first read or write does); raises
        BrokenResourceError (its cause: OpenSSL's error, a certificate that does not verify)."""
        await self._handshake()

    async def _handshake(self) -> None:
        while not self._handshaken:
            try:
                self.socket.do_handshake()
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError) as exc:
                await self._wait(exc)
                continue
            except (ssl.SSLError, OSError) as exc:
                raise self._translate(exc) from exc
            self._handshaken = True

    async def _fair(self) -> None:
        self._streak += 1
        if self._streak >= FAIR_EVERY:
            self._streak = 0
            await trio.lowlevel.cancel_shielded_checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint_if_cancelled()
        await self._handshake()
        size = max_bytes if max_bytes is not None else 65536
        while True:
            try:
                data = self.socket.recv(size)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError) as exc:
                await self._wait(exc)
                continue
            except (ssl.SSLError, OSError) as exc:
                raise self._translate(exc) from exc
            await self._fair()
            return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        await self._handshake()
        view = memoryview(data)
        while view:
            try:
                sent = self.socket.send(view)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError) as exc:
                await self._wait(exc)  # retried with the same view: OpenSSL's rule
                continue
            except (ssl.SSLError, OSError) as exc:
                raise self._translate(exc) from exc
            view = view[sent:]
        await self._fair()

    def _translate(self, exc: BaseException) -> trio.ClosedResourceError | trio.BrokenResourceError:
        if self.socket.fileno() == -1:
            return trio.ClosedResourceError("the socket was closed")
        return trio.BrokenResourceError(f"TLS connection broken: {exc}")

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.wait_writable(self.socket)

    async def aclose(self) -> None:
        """Send close_notify if the socket takes it at once, then close; never waits for the peer."""
        self.close_now()
        await trio.lowlevel.checkpoint()

    def close_now(self) -> None:
        if self.socket.fileno() != -1:
            if self._handshaken:
                with contextlib.suppress(ssl.SSLError, OSError, ValueError):
                    self.socket.unwrap()
            close_socket(self.socket)


Stream = FastSocketStream | FastTLSStream


def _header_bytes(data: bytes) -> int:
    """How many of `data` (the first bytes a client sent) belong to its PROXY header, as far as
    they tell: all of them until the header's end is in sight. ValueError: not a PROXY header."""
    sig = proxy_protocol.V2_SIGNATURE
    if data[: len(sig)] == sig[: len(data)]:
        if len(data) < 16:
            return len(data)  # a v2 header is at least its 16-byte fixed part
        return min(len(data), 16 + int.from_bytes(data[14:16], "big"))
    prefix = proxy_protocol.V1_PREFIX
    if data[: len(prefix)] == prefix[: len(data)]:
        end = data.find(b"\r\n", 0, proxy_protocol.V1_MAX)
        return end + 2 if end >= 0 else min(len(data), proxy_protocol.V1_MAX)
    raise ValueError("not a PROXY protocol header")


async def read_proxy_header(sock: socket.socket) -> proxy_protocol.ProxyHeader | None:
    """Read the PROXY header at the start of `sock` and nothing past it (the client's TLS or HTTP
    bytes stay in the kernel for whoever reads next): peek, take exactly the header's bytes seen
    so far. None: the connection ended first; ValueError: not a valid header."""
    got = b""
    while True:
        try:
            seen = sock.recv(PROXY_PEEK - len(got), socket.MSG_PEEK)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(sock)
            continue
        if not seen:
            return None
        take = _header_bytes(got + seen) - len(got)
        got += sock.recv(take)  # at least one byte: what was peeked is there
        header = proxy_protocol.parse(got)
        if header is not None:
            return header
        if len(got) >= PROXY_PEEK:
            raise ValueError("PROXY header too long")
