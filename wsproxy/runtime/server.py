"""Listeners, the connection nursery, the live-session registry, reload and graceful drain.

One `Server` owns the current snapshot and every open session. Each listener address has one
`_Listening` slot: its sockets, its cancel scope, and the settings and TLS context that new
connections on it get. A reload swaps the snapshot, updates kept slots in place (their sockets
never close, so no connect is refused), opens and closes the others, and closes the sessions of
removed backends with 1012 spread over a window. Shutdown stops accepting and spreads 1001 closes
the same way, then cuts whatever is left at the deadline.
"""

from __future__ import annotations

import errno
import logging
import random
import socket
import ssl
from collections import Counter
from collections.abc import Iterable

import trio

from wsproxy.config import Address, Config, ListenerConfig, PoolConfig
from wsproxy.observe.metrics import Metrics
from wsproxy.policy.balancing import Backend, Pool
from wsproxy.policy.reload_plan import (
    ListenerKey,
    ReloadPlan,
    drain_window,
    listener_keys,
    plan_reload,
    rebalance_victim,
    spread,
)
from wsproxy.policy.snapshot import Snapshot
from wsproxy.protocol import proxy_protocol
from wsproxy.protocol.relay import GOING_AWAY, SERVICE_RESTART
from wsproxy.runtime.admin import serve_admin
from wsproxy.runtime.capacity import Capacity
from wsproxy.runtime.gate import Edge, EdgeCollector
from wsproxy.runtime.health_check import HealthMonitor
from wsproxy.runtime.reactor import AVAILABLE as REACTOR_AVAILABLE
from wsproxy.runtime.reactor import Reactor
from wsproxy.runtime.session import Session, peer_address
from wsproxy.runtime.streams import FastSocketStream, FastTLSStream, PrefixedStream
from wsproxy.runtime.timers import Timers

log = logging.getLogger("wsproxy.server")

# accept() failures that mean "out of descriptors or memory for now", not a broken listener
ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
ACCEPT_PAUSE = 0.1  # seconds before accepting again after one of those

PROXY_HEADER_READ = 256  # a PROXY header is at most 107 (v1) or 16 + a few hundred (v2) bytes


def server_ssl_context(listener: ListenerConfig) -> ssl.SSLContext:
    """A TLS context for a listener: TLS 1.2 minimum, ALPN http/1.1 only. Built once per listener
    and again on reload (so renewed cert files on disk are picked up)."""
    assert listener.tls is not None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(listener.tls.cert), str(listener.tls.key))
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


class ReloadError(Exception):
    """A valid config that still cannot be applied (a cert that does not load, a port in use)."""


class _Listening:
    """One listening address: its sockets and what new connections on it get."""

    __slots__ = ("config", "scope", "sockets", "ssl_ctx")

    def __init__(self, config: ListenerConfig, sockets: list[trio.SocketListener], ctx: ssl.SSLContext | None) -> None:
        self.config = config
        self.sockets = sockets
        self.ssl_ctx = ctx
        self.scope = trio.CancelScope()


class Server:
    """Everything a running proxy holds: snapshot, listeners, sessions."""

    def __init__(self, config: Config, *, worker_index: int = 0) -> None:
        self.worker_index = worker_index  # with workers > 1: this worker's admin port is admin's + index
        self.snapshot = Snapshot.build(config)
        self.sessions: set[Session] = set()
        self.bound: list[tuple[ListenerConfig, tuple[str, int]]] = []  # (listener, actual address)
        self._listening: dict[ListenerKey, _Listening] = {}
        self._listen_scope = trio.CancelScope()
        self._accepting: trio.Nursery | None = None
        self._connections: trio.Nursery | None = None
        self._all_gone = trio.Event()
        self.draining = False
        self.timers = Timers()
        self.reactor = Reactor()  # the relay phase of every session, on one readiness loop (Linux)
        self.health = HealthMonitor(  # active checks; sync() on start and reload
            on_down=self._backend_down, on_shortage=lambda exc: self.capacity.record(exc.resource, exc.reason)
        )
        self.reloads = 0
        self.metrics = Metrics(
            pools=lambda: self.snapshot.pools,
            clock=trio.current_time,
            live=lambda: (t for s in self.sessions if (t := s.live_traffic()) is not None),
        )  # this server's own
        self.metrics.config_loaded(config)
        self.capacity = Capacity(self.metrics, sessions=self.sessions)  # the proxy's own descriptors
        self.edge = Edge(capacity=self.capacity)  # caps, per-IP buckets, auth caches: shared, kept on reload
        self.metrics.registry.register(EdgeCollector(self.edge))
        self.admin_bound: tuple[str, int] | None = None  # the admin listener's actual address

    def _unregister(self, session: Session) -> None:
        self.sessions.discard(session)
        if self.draining and not self.sessions:
            self._all_gone.set()

    # --- connections -----------------------------------------------------------------------

    async def _handle(self, stream: trio.SocketStream, slot: _Listening) -> None:
        """One accepted connection. Until it is a session the socket is ours to close; from
        then on the session closes it, possibly long after this task ended (on the reactor)."""
        session = None
        try:
            session = await self._admit_connection(stream, slot)
        finally:
            if session is None:
                stream.socket.close()
        if session is not None:
            self.sessions.add(session)
            await session.run()

    async def _admit_connection(self, stream: trio.SocketStream, slot: _Listening) -> Session | None:
        """PROXY header, TLS wrapping, the Session object; None: refused before a session."""
        listener, ctx = slot.config, slot.ssl_ctx  # as of accept time: a reload may change the slot later
        client_addr = peer_address(stream)
        conn: trio.abc.Stream = stream
        got = None
        if listener.proxy_protocol:
            got = await self._read_proxy_header(stream, client_addr)
            if got is None:
                return None
            if got.source is not None:
                client_addr = got.source
            if got.rest:
                conn = PrefixedStream(stream, got.rest)
        if self.draining:  # accepted before the shutdown, not yet a session: the drain would never close it
            return None
        own_addr = _local(stream)  # before any TLS wrap: wrap_socket takes the descriptor over
        if ctx is not None:
            if conn is stream:  # OpenSSL on the socket itself: no Python in the record path
                conn = FastTLSStream(stream, ctx)
            else:  # bytes already read after a PROXY header: they must go through a BIO
                conn = trio.SSLStream(conn, ctx, server_side=True, https_compatible=True)
        elif conn is stream:  # the system call first, a scheduler trip only when it must wait
            conn = FastSocketStream(stream)
        local_addr = got.dest if listener.proxy_protocol and got.dest is not None else own_addr
        session = Session(
            conn,
            client_addr=client_addr,
            listener=listener,
            snapshot=self.snapshot,
            timers=self.timers,
            local_addr=local_addr,
            metrics=self.metrics,
            edge=self.edge,
            reactor=self.reactor,
            on_end=self._unregister,  # told once: by run(), or later by its link on the reactor
        )
        return session

    async def _read_proxy_header(
        self, stream: trio.SocketStream, peer: tuple[str, int]
    ) -> proxy_protocol.ProxyHeader | None:
        """The PROXY header a listener with `proxy_protocol: true` requires; None: refused."""
        reason = "no PROXY header within the handshake timeout"
        with trio.move_on_after(self.snapshot.config.timeouts.handshake):
            try:
                got = await _receive_proxy_header(stream)
            except ValueError as exc:
                reason = str(exc)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                reason = f"connection failed: {exc}"
            else:
                if got is not None:
                    return got
                reason = "connection closed before a PROXY header"
        log.warning("connection from %s refused: %s", _fmt(peer), reason)
        await trio.aclose_forcefully(stream)
        return None

    # --- listeners -------------------------------------------------------------------------

    async def _open_sockets(self, listener: ListenerConfig) -> list[trio.SocketListener]:
        addr = listener.address
        if self.snapshot.config.workers > 1:
            return [_reuseport_listener(addr)]
        return list(await trio.open_tcp_listeners(addr.port, host=addr.host, backlog=1024))

    def _refresh_bound(self) -> None:
        self.bound = [(slot.config, _sockname(sock)) for slot in self._listening.values() for sock in slot.sockets]

    async def _accept(self, slot: _Listening, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept on every socket of `slot` until its scope is cancelled (then close them)."""
        with slot.scope:
            async with trio.open_nursery() as loops:
                for sock in slot.sockets:
                    loops.start_soon(self._accept_loop, sock, slot)
                task_status.started()

    async def _accept_loop(self, listener: trio.SocketListener, slot: _Listening) -> None:
        """trio.serve_listeners' loop, minus the aclose_forcefully (a cancel scope and a
        checkpoint) it wraps around every connection: sessions close their own sockets."""
        connections = self._connections
        assert connections is not None
        async with listener:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    if exc.errno not in ACCEPT_CAPACITY_ERRNOS:
                        raise
                    if not self.capacity.accept_failed(listener, exc):  # the spare descriptor: accept, close
                        await trio.sleep(ACCEPT_PAUSE)
                    continue
                connections.start_soon(self._handle, stream, slot)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Open every listener, report ready, and serve until `shutdown` finishes."""
        async with trio.open_nursery() as connections:
            self._connections = connections
            await connections.start(self.timers.run)
            if REACTOR_AVAILABLE:
                await connections.start(self.reactor.run)
            self.health.sync(self.snapshot)
            await connections.start(self.health.run)
            for key, lst in listener_keys(self.snapshot.config).items():
                ctx = server_ssl_context(lst) if lst.tls is not None else None
                self._listening[key] = _Listening(lst, await self._open_sockets(lst), ctx)
            self._refresh_bound()
            self.capacity.start(self.snapshot.config)  # the spare descriptor; warns if RLIMIT_NOFILE is short
            if self.snapshot.config.admin is not None:  # in `connections`: it answers until the drain ends
                self.admin_bound = await connections.start(
                    serve_admin, self, self.snapshot.config.admin, self.worker_index
                )
            with self._listen_scope:
                async with trio.open_nursery() as accepting:
                    self._accepting = accepting
                    for slot in self._listening.values():
                        await accepting.start(self._accept, slot)
                    for lst, (host, port) in self.bound:
                        log.info("listening on %s://%s:%d -> %s", lst.scheme, host, port, lst.pool or "routes")
                    task_status.started()
                    await trio.sleep_forever()
            # listeners are closed; sessions finish in their own nursery, then the timers stop
            if self.sessions:
                await self._all_gone.wait()
            self.capacity.stop()
            connections.cancel_scope.cancel()

    # --- reload ----------------------------------------------------------------------------

    async def reload(self, config: Config) -> ReloadPlan:
        """Apply a validated config; raises ReloadError (and changes nothing) if it cannot be.

        Everything that can fail (TLS contexts, binding new ports) happens before the swap.
        """
        if self.draining or self._accepting is None or self._connections is None:
            raise ReloadError("the proxy is shutting down")
        old = self.snapshot.config
        plan = plan_reload(old, config)
        if config.workers != old.workers:
            log.warning("workers changed (%d -> %d): takes effect on restart only", old.workers, config.workers)
        contexts: dict[Address, ssl.SSLContext] = {}
        for lst in config.listeners:
            if lst.tls is not None:
                try:
                    contexts[lst.address] = server_ssl_context(lst)
                except (OSError, ssl.SSLError) as exc:
                    raise ReloadError(f"listener {lst.address}: cannot load TLS cert/key: {exc}") from None
        opened: list[tuple[ListenerKey, _Listening]] = []
        try:
            for key, lst in plan.open:
                opened.append((key, _Listening(lst, await self._open_sockets(lst), contexts.get(lst.address))))
        except OSError as exc:
            for _, slot in opened:
                for sock in slot.sockets:
                    await sock.aclose()
            raise ReloadError(f"cannot listen on {lst.address}: {exc}") from None
        # the swap: from here on nothing fails
        self.snapshot = Snapshot.build(config, previous=self.snapshot)
        self.reloads += 1
        self.health.sync(self.snapshot)  # kept backends keep their checker; new ones get one
        for key, lst in plan.keep:
            slot = self._listening[key]
            slot.config, slot.ssl_ctx = lst, contexts.get(lst.address)
        for key in plan.close:
            self._listening.pop(key).scope.cancel()
        for key, slot in opened:
            self._listening[key] = slot
            await self._accepting.start(self._accept, slot)
        self._refresh_bound()
        doomed = [s for s in self.sessions if s.backend is not None and plan.drops(s.outcome.pool, s.backend.address)]
        if doomed:
            self._connections.start_soon(
                self._spread_closes, doomed, config.reload.drain_window, SERVICE_RESTART, "backend removed by reload"
            )
        connecting = [s for s in self.sessions if s.backend is None and s.snapshot is not self.snapshot]
        if connecting and plan.removed:
            self._connections.start_soon(self._doom_late, connecting, plan, config)
        for name, pool in self.snapshot.pools.items():
            if pool.config.rebalance_rate is not None and any(p == name for p, _ in plan.added):
                self._connections.start_soon(self._rebalance, pool, self.reloads)
        log.info(
            "reloaded %s (sha256 %s): %s; %d session(s) on removed backends close over %gs",
            config.source,
            config.digest[:12],
            plan.describe(),
            len(doomed),
            config.reload.drain_window,
        )
        return plan

    def _backend_down(self, backend: Backend, pool: PoolConfig) -> None:
        """Active checks marked `backend` down in a pool with close_sessions_on_down: close its
        sessions with 1012, spread over the pool's drain_window so clients don't reconnect at once."""
        doomed = [s for s in self.sessions if s.backend is backend]
        if not doomed or self._connections is None:
            return
        log.info(
            "closing %d session(s) on backend %s (pool %s) over %gs",
            len(doomed),
            backend.name,
            pool.name,
            pool.drain_window,
        )
        self._connections.start_soon(
            self._spread_closes, doomed, pool.drain_window, SERVICE_RESTART, "backend marked down"
        )

    async def _doom_late(self, connecting: list[Session], plan: ReloadPlan, config: Config) -> None:
        """Sessions still in their handshake at the reload chose from the old snapshot and may yet
        land on a removed backend. Their handshake is bounded by `timeouts.handshake`: after that,
        each has a backend or is gone, and those on removed backends close like the others."""
        # reading the request and reaching a backend each get their own timeouts.handshake
        await trio.sleep(2 * max(s.snapshot.config.timeouts.handshake for s in connecting))
        late = [
            s
            for s in connecting
            if s in self.sessions and s.backend is not None and plan.drops(s.outcome.pool, s.backend.address)
        ]
        if late:
            log.info("closing %d session(s) that reached a removed backend during the reload", len(late))
            await self._spread_closes(late, config.reload.drain_window, SERVICE_RESTART, "backend removed by reload")

    async def _spread_closes(self, sessions: Iterable[Session], window: float, code: int, reason: str) -> None:
        """Close `sessions` with `code`, one by one at a flat rate over `window` (with jitter)."""
        batch = list(sessions)
        random.shuffle(batch)
        start = trio.current_time()
        for offset, session in zip(spread(len(batch), window, [random.random() for _ in batch]), batch, strict=True):
            await trio.sleep_until(start + offset)
            if session in self.sessions:
                session.go_away(code, reason)

    async def _rebalance(self, pool: Pool, generation: int) -> None:
        """Move sessions off the most loaded backends of `pool`, one per 1/rate seconds, until the
        spread is within weight. A newer reload or a shutdown ends it; it never moves more sessions
        than the pool held when it started."""
        assert pool.config.rebalance_rate is not None
        period = 1.0 / pool.config.rebalance_rate
        budget = pool.active
        moved = 0
        while moved < budget and self.reloads == generation and not self.draining:
            # A session already closing still counts on its backend until its closing handshake
            # ends, while its client may already be back elsewhere: count it as moved.
            closing = Counter(s.backend for s in self.sessions if s.closing and s.backend is not None)
            index = rebalance_victim([(b.active - closing[b], b.weight) for b in pool.backends])
            if index is None:
                break
            backend = pool.backends[index]
            on_it = [s for s in self.sessions if s.backend is backend and not s.closing]
            if not on_it:
                break
            max(on_it, key=lambda s: s.started).go_away(SERVICE_RESTART, "rebalancing after a reload")
            moved += 1
            await trio.sleep(period)
        if moved:
            log.info("pool %s: rebalanced %d session(s) after a reload", pool.name, moved)

    # --- shutdown --------------------------------------------------------------------------

    async def shutdown(self, deadline: float | None = None) -> None:
        """Stop accepting, close sessions with 1001 spread over the drain window, wait up to the
        deadline, then cut the rest."""
        cfg = self.snapshot.config
        self.draining = True
        self._listen_scope.cancel()
        wait = cfg.shutdown.deadline if deadline is None else deadline
        window = drain_window(cfg.shutdown.drain_window, wait, cfg.timeouts.close)
        log.info("shutting down: %d open session(s), closes over %gs, deadline %gs", len(self.sessions), window, wait)
        if not self.sessions:
            return
        with trio.move_on_after(wait):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._spread_closes, list(self.sessions), window, GOING_AWAY, "proxy shutting down")
                await self._all_gone.wait()
                nursery.cancel_scope.cancel()
        for session in list(self.sessions):
            session.cut()


async def _receive_proxy_header(stream: trio.SocketStream) -> proxy_protocol.ProxyHeader | None:
    data = b""
    while True:
        chunk = await stream.receive_some(PROXY_HEADER_READ)
        if not chunk:
            return None
        data += chunk
        got = proxy_protocol.parse(data)
        if got is not None:
            return got
        if len(data) > proxy_protocol.V2_MAX_TLV + 16:
            raise ValueError("PROXY header too long")


def _reuseport_listener(addr: Address) -> trio.SocketListener:
    """A listening socket that other workers bind too (SO_REUSEPORT: the kernel spreads connects)."""
    family = socket.AF_INET6 if ":" in addr.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((addr.host, addr.port))
        sock.listen(1024)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise OSError(exc.errno, f"{addr} is in use by another program") from None
        raise
    return trio.SocketListener(trio.socket.from_stdlib_socket(sock))


def _local(stream: trio.SocketStream) -> tuple[str, int] | None:
    try:
        name = stream.socket.getsockname()
    except OSError:
        return None
    return (name[0], name[1])


def _sockname(sock: trio.SocketListener) -> tuple[str, int]:
    name = sock.socket.getsockname()
    return (name[0], name[1])


def _fmt(addr: tuple[str, int]) -> str:
    return f"[{addr[0]}]:{addr[1]}" if ":" in addr[0] else f"{addr[0]}:{addr[1]}"
