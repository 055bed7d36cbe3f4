"""A stream that first returns bytes already read from it (after a PROXY header), then the rest."""

from __future__ import annotations

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
