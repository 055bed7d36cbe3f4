"""Listeners, the connection nursery, the live-session registry and graceful drain.

One `Server` owns the current snapshot and every open session. Listeners accept into one
connection nursery; each connection becomes a `Session` that registers itself for the time it
runs. Shutdown cancels the listeners, asks every session to close with 1001, and gives them
until the deadline to finish their closing handshakes.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Iterator
from contextlib import contextmanager

import trio

from wsproxy.config import Config, ListenerConfig
from wsproxy.relay import GOING_AWAY
from wsproxy.session import Session, peer_address, tune_socket
from wsproxy.snapshot import Snapshot
from wsproxy.timers import Timers

log = logging.getLogger("wsproxy.server")


def server_ssl_context(listener: ListenerConfig) -> ssl.SSLContext:
    """A TLS context for a listener: TLS 1.2 minimum, ALPN http/1.1 only."""
    assert listener.tls is not None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(listener.tls.cert), str(listener.tls.key))
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


class Server:
    """Everything a running proxy holds: snapshot, listeners, sessions."""

    def __init__(self, config: Config) -> None:
        self.snapshot = Snapshot.build(config)
        self.sessions: set[Session] = set()
        self.bound: list[tuple[ListenerConfig, tuple[str, int]]] = []  # (listener, actual address)
        self._listen_scope = trio.CancelScope()
        self._all_gone = trio.Event()
        self.draining = False
        self.timers = Timers()

    @contextmanager
    def _registered(self, session: Session) -> Iterator[None]:
        self.sessions.add(session)
        try:
            yield
        finally:
            self.sessions.discard(session)
            if self.draining and not self.sessions:
                self._all_gone.set()

    async def _handle(self, stream: trio.abc.Stream, listener: ListenerConfig) -> None:
        assert isinstance(stream, trio.SocketStream | trio.SSLStream)
        tune_socket(stream)
        session = Session(
            stream, client_addr=peer_address(stream), listener=listener, snapshot=self.snapshot, timers=self.timers
        )
        with self._registered(session):
            await session.run()

    async def _open_listener(self, listener: ListenerConfig) -> list[trio.abc.Listener]:
        addr = listener.address
        tcp = await trio.open_tcp_listeners(addr.port, host=addr.host, backlog=1024)
        result: list[trio.abc.Listener] = list(tcp)
        if listener.tls is not None:
            ctx = server_ssl_context(listener)
            result = [trio.SSLListener(t, ctx, https_compatible=True) for t in tcp]
        for t in tcp:
            sockname = t.socket.getsockname()
            self.bound.append((listener, (sockname[0], sockname[1])))
        return result

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Open every listener, report ready, and serve until `shutdown` finishes."""
        async with trio.open_nursery() as connections:
            await connections.start(self.timers.run)
            opened: list[tuple[ListenerConfig, list[trio.abc.Listener]]] = []
            for lst in self.snapshot.config.listeners:
                opened.append((lst, await self._open_listener(lst)))
            with self._listen_scope:
                async with trio.open_nursery() as accepting:
                    for lst, listeners in opened:
                        handler = _bind_handler(self._handle, lst)
                        await accepting.start(_serve_listeners, handler, listeners, connections)
                    for lst, (host, port) in self.bound:
                        log.info("listening on %s://%s:%d -> %s", lst.scheme, host, port, lst.pool or "routes")
                    task_status.started()
            # listeners are closed; sessions finish in their own nursery, then the timers stop
            if self.sessions:
                await self._all_gone.wait()
            connections.cancel_scope.cancel()

    async def shutdown(self, deadline: float | None = None) -> None:
        """Stop accepting, close sessions with 1001, wait up to the deadline, then cut the rest."""
        self.draining = True
        self._listen_scope.cancel()
        wait = self.snapshot.config.shutdown.deadline if deadline is None else deadline
        log.info("shutting down: %d open session(s), deadline %gs", len(self.sessions), wait)
        if not self.sessions:
            return
        for session in list(self.sessions):
            session.go_away(GOING_AWAY, "proxy shutting down")
        with trio.move_on_after(wait):
            await self._all_gone.wait()
        for session in list(self.sessions):
            session._scope.cancel()


def _bind_handler(handle, listener: ListenerConfig):  # type: ignore[no-untyped-def]
    async def handler(stream: trio.abc.Stream) -> None:
        await handle(stream, listener)

    return handler


async def _serve_listeners(handler, listeners, connections, *, task_status=trio.TASK_STATUS_IGNORED):  # type: ignore[no-untyped-def]
    await trio.serve_listeners(handler, listeners, handler_nursery=connections, task_status=task_status)
