"""Streams of the shell: a prefix replayed after a PROXY header, and the relay's fast plain-TCP
and TLS streams."""

from __future__ import annotations

import contextlib
import socket
import ssl

import trio


class PrefixedStream(trio.abc.Stream):
    """`prefix`, then whatever `inner` yields; sends go straight to `inner`."""

    __slots__ = ("_prefix", "inner")

    def __init__(self, inner: trio.abc.Stream, prefix: bytes) -> None:
        self.inner = inner
        self._prefix = prefix

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._prefix:
            await trio.lowlevel.checkpoint()
            n = len(self._prefix) if max_bytes is None else max_bytes
            data, self._prefix = self._prefix[:n], self._prefix[n:]
            return data
        return await self.inner.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        if isinstance(self.inner, trio.abc.HalfCloseableStream):
            await self.inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()


FAIR_EVERY = 16  # operations that did not have to wait, between two yields to the scheduler


class FastSocketStream(trio.abc.HalfCloseableStream):
    """A plain TCP stream that tries the system call first and waits only when it must.

    trio's SocketStream yields to the scheduler on every receive and send, even when data is
    already there or the send buffer has room: on a relay, that is most of the cost (see
    docs/performance.md). This one calls `recv`/`send` on the non-blocking socket directly, waits
    with `wait_readable`/`wait_writable` only on EWOULDBLOCK, and yields every FAIR_EVERY calls
    that did not wait, so one flooding peer cannot starve other sessions or hold off a
    cancellation. Closing goes through the wrapped SocketStream, whose close wakes any waiter
    with ClosedResourceError, as trio's own streams do.
    """

    __slots__ = ("_raw", "_streak", "stream")

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self._raw = stream.socket._sock  # trio keeps the stdlib socket here, non-blocking
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
                data = self._raw.recv(size)
            except BlockingIOError:
                self._streak = 0
                await trio.lowlevel.wait_readable(self._raw)
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
                sent = self._raw.send(view)
            except BlockingIOError:
                self._streak = 0
                await trio.lowlevel.wait_writable(self._raw)
                continue
            except OSError as exc:
                raise self._translate(exc) from exc
            view = view[sent:]
        await self._fair()

    def _translate(self, exc: OSError) -> trio.ClosedResourceError | trio.BrokenResourceError:
        if self._raw.fileno() == -1:
            return trio.ClosedResourceError("the socket was closed")
        return trio.BrokenResourceError(f"socket connection broken: {exc}")

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.stream.send_eof()

    async def aclose(self) -> None:
        await self.stream.aclose()


class FastTLSStream(trio.abc.Stream):
    """Server-side TLS on a non-blocking `ssl.SSLSocket` over the kernel socket.

    trio.SSLStream pushes every record through two MemoryBIOs in Python; here OpenSSL reads and
    writes the socket itself and Python only waits when it says SSL_WANT_READ/WRITE, like
    FastSocketStream does for plain TCP. The handshake runs on first use (the session's first
    read), as SSLStream's does. A write that wants a read while the reader task already waits
    for readability (a TLS 1.3 key update, say) polls briefly instead of waiting twice on one
    socket, which trio does not allow. Missing close_notify from a client is a normal end of
    stream (`suppress_ragged_eofs`), as with SSLStream's https_compatible.
    """

    __slots__ = ("_handshaken", "_ssl", "_streak")

    def __init__(self, stream: trio.SocketStream, context: ssl.SSLContext) -> None:
        raw = stream.socket._sock  # taken over: from here on this object owns the descriptor
        self._ssl = context.wrap_socket(raw, server_side=True, do_handshake_on_connect=False, suppress_ragged_eofs=True)
        self._ssl.setblocking(False)
        self._handshaken = False
        self._streak = 0

    async def _wait(self, exc: ssl.SSLError) -> None:
        self._streak = 0
        try:
            if isinstance(exc, ssl.SSLWantWriteError):
                await trio.lowlevel.wait_writable(self._ssl)
            else:
                await trio.lowlevel.wait_readable(self._ssl)
        except trio.BusyResourceError:
            await trio.sleep(0.001)  # the other task waits on this socket: let it, then retry

    async def _handshake(self) -> None:
        while not self._handshaken:
            try:
                self._ssl.do_handshake()
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
                data = self._ssl.recv(size)
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
                sent = self._ssl.send(view)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError) as exc:
                await self._wait(exc)
                continue
            except (ssl.SSLError, OSError) as exc:
                raise self._translate(exc) from exc
            view = view[sent:]
        await self._fair()

    def _translate(self, exc: BaseException) -> trio.ClosedResourceError | trio.BrokenResourceError:
        if self._ssl.fileno() == -1:
            return trio.ClosedResourceError("the socket was closed")
        return trio.BrokenResourceError(f"TLS connection broken: {exc}")

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.wait_writable(self._ssl)

    async def aclose(self) -> None:
        """Send close_notify if the socket takes it at once, then close; never waits for the peer."""
        self.close_now()
        await trio.lowlevel.checkpoint()

    def close_now(self) -> None:
        if self._ssl.fileno() != -1:
            if self._handshaken:
                with contextlib.suppress(ssl.SSLError, OSError, ValueError):
                    self._ssl.unwrap()
            trio.lowlevel.notify_closing(self._ssl)
            self._ssl.close()


def raw_socket(stream: trio.abc.Stream) -> socket.socket | None:
    """The non-blocking socket under a plain or FastTLS stream, for the reactor to drive; None
    for a stream whose bytes pass through Python first (trio.SSLStream, a PROXY prefix)."""
    if isinstance(stream, trio.SocketStream):
        return stream.socket._sock  # type: ignore[attr-defined]
    if isinstance(stream, FastSocketStream):
        return stream._raw
    if isinstance(stream, FastTLSStream):
        return stream._ssl if stream._handshaken else None
    if isinstance(stream, PrefixedStream) and not stream._prefix:
        return raw_socket(stream.inner)
    return None


def close_now(stream: trio.abc.Stream) -> bool:
    """Close a socket-backed stream without waiting (True), as aclose_forcefully would but
    without its cancel scope and checkpoint: a handshake-rate cost. False: not one of ours,
    close it with trio.aclose_forcefully."""
    if isinstance(stream, PrefixedStream):  # (the prefix was read already, or is dropped with the socket)
        stream = stream.inner
    if isinstance(stream, FastSocketStream):
        stream = stream.stream
    if isinstance(stream, trio.SocketStream):
        stream.socket.close()  # trio's close: wakes any waiter with ClosedResourceError
        return True
    if isinstance(stream, FastTLSStream):
        stream.close_now()
        return True
    return False
