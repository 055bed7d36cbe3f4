"""Listeners, the connection nursery, the live-session registry, reload and graceful drain.

One `Server` owns the current snapshot and every open session. Each listener address has one
`_Listening` slot: its sockets, its cancel scope, and the settings and TLS context that new
connections on it get. A reload swaps the snapshot, updates kept slots in place (their sockets
never close, so no connect is refused), opens and closes the others, and closes the sessions of
removed backends with 1012 spread over a window. A pool's backends found in DNS change through
the same path (`_apply`): the DNS answer becomes a configuration, and the reload plan between it
and the running one says what to add and what to drain (runtime/fleet_wiring.py). Shutdown stops
accepting and spreads 1001 closes the same way, then cuts whatever is left at the deadline.
"""

from __future__ import annotations

import errno
import logging
import random
import socket
import ssl
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import trio

from wsproxy.config import Address, Config, ListenerConfig, PoolConfig
from wsproxy.observe.metrics import Metrics
from wsproxy.policy.balancing import Backend, Pool
from wsproxy.policy.discovery import carry_membership
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
from wsproxy.runtime import gate, telemetry
from wsproxy.runtime.admin import serve_admin
from wsproxy.runtime.admin_api import ControlApi, ControlCollector
from wsproxy.runtime.backend_tls import BackendContexts
from wsproxy.runtime.capacity import Capacity
from wsproxy.runtime.control import Control
from wsproxy.runtime.fleet_wiring import FleetWiring
from wsproxy.runtime.gate import Edge, EdgeCollector
from wsproxy.runtime.handover import Inherited
from wsproxy.runtime.health_check import HealthMonitor
from wsproxy.runtime.http_pool import IdleConnections
from wsproxy.runtime.listen import ListenError, listener_label, open_sockets, server_ssl_context, set_backlog
from wsproxy.runtime.reactor import Reactor
from wsproxy.runtime.session import Session
from wsproxy.runtime.streams import (
    FastSocketStream,
    FastTLSStream,
    Stream,
    close_socket,
    discard_readable,
    format_address,
    read_proxy_header,
    tune_accepted,
    tune_tcp,
)
from wsproxy.runtime.timers import Timers

log = logging.getLogger("wsproxy.server")

# accept() failures that mean "out of descriptors or memory for now", not a broken listener
ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
ACCEPT_PAUSE = 0.1  # seconds before accepting again after one of those


class ReloadError(Exception):
    """A valid config that still cannot be applied (a cert that does not load, a port in use)."""


class _Listening:
    """One listening address: its sockets and what new connections on it get."""

    __slots__ = ("config", "scope", "sockets", "ssl_ctx")

    def __init__(self, config: ListenerConfig, sockets: list[socket.socket], ctx: ssl.SSLContext | None) -> None:
        self.config = config
        self.sockets = sockets
        self.ssl_ctx = ctx
        self.scope = trio.CancelScope()


class Server:
    """Everything a running proxy holds: snapshot, listeners, sessions."""

    def __init__(
        self,
        config: Config,
        *,
        worker_index: int = 0,
        inherited: Inherited | None = None,
        secret: bytes | None = None,
    ) -> None:
        self.worker_index = worker_index  # with workers > 1: this worker's admin port is admin's + index
        self._inherited = inherited  # listening sockets handed over by the previous process (an upgrade)
        self._admin_scope = trio.CancelScope()
        self.admin_sockets: list[socket.socket] = []  # the admin listener's (for a handover)
        self.snapshot = Snapshot.build(config, secret=secret)  # secret: the affinity cookies' key
        self.backend_tls = BackendContexts()  # client TLS contexts for wss:// backends, rebuilt on reload
        self.backend_tls.load(config)
        self.sessions: set[Session] = set()
        # what every session is handed, made once: a callable per session is memory it keeps while idle
        self._current_snapshot: Callable[[], Snapshot] = lambda: self.snapshot
        self._session_ended: Callable[[Session], None] = self._unregister
        self.bound: list[tuple[ListenerConfig, tuple[str, int]]] = []  # (listener, actual address)
        self._listening: dict[ListenerKey, _Listening] = {}
        self._listen_scope = trio.CancelScope()
        self._accepting: trio.Nursery | None = None
        self._connections: trio.Nursery | None = None
        self._all_gone = trio.Event()
        self.draining = False
        self.timers = Timers()
        self.reactor = Reactor(on_failure=self.metrics_relay_failure)  # every session's relay phase
        self.health = HealthMonitor(  # active checks; sync() on start and reload
            on_down=self._backend_down,
            on_shortage=lambda exc: self.capacity.record(exc.resource, exc.reason),
            tls=self.backend_tls,
        )
        self.idle = IdleConnections(self.timers)  # kept-alive backend connections of plain HTTP requests
        self.reloads = 0
        self.metrics = Metrics(
            pools=lambda: self.snapshot.pools,
            clock=trio.current_time,
            live=lambda: (t for s in self.sessions if (t := s.live_traffic()) is not None),
        )  # this server's own
        self.metrics.config_loaded(config)
        self.capacity = Capacity(self.metrics, sessions=self.sessions)  # the proxy's own descriptors
        self.edge = Edge(capacity=self.capacity)  # caps, per-IP buckets, auth caches: shared, kept on reload
        self.edge.timers = self.timers  # credential expiry timers run on the one timer task
        self.metrics.registry.register(EdgeCollector(self.edge))
        self.admin_bound: tuple[str, int] | None = None  # the admin listener's actual address
        self.control = Control(self)  # runtime control: session ids, admin states, closes (control.py)
        self.control_api = ControlApi(self.control, lambda: self.snapshot.config.admin)
        self.metrics.registry.register(ControlCollector(lambda: self.control_api))
        self.telemetry = telemetry.Telemetry(self)  # process_*, build info, backlog; the charts' history
        self.fleet = FleetWiring(
            config,
            edge=self.edge,
            metrics=self.metrics,
            snapshot=lambda: self.snapshot,
            apply=self._apply,
            draining=lambda: self.draining,
        )  # shared_state (Redis) and pools from DNS; started before the listeners

    def metrics_relay_failure(self) -> None:
        """A watcher of the readiness loop raised: counted (its session alone ended)."""
        self.metrics.relay_failure()

    def _unregister(self, session: Session) -> None:
        self.sessions.discard(session)
        self.control.forget(session)
        gate.ended(self.edge, session)  # reconnect tracking
        if self.draining and not self.sessions:
            self._all_gone.set()

    # --- connections -----------------------------------------------------------------------

    async def _handle(self, sock: socket.socket, slot: _Listening) -> None:
        """One accepted connection. Until it is a session the socket is ours to close; from
        then on the session closes it, possibly long after this task ended (on the reactor)."""
        session = None
        try:
            session = await self._admit_connection(sock, slot)
        finally:
            if session is None:
                close_socket(sock)
        if session is not None:
            self.sessions.add(session)
            self.control.track(session)
            await session.run()

    async def _admit_connection(self, sock: socket.socket, slot: _Listening) -> Session | None:
        """PROXY header, TLS wrapping, the Session object; None: refused before a session."""
        listener, ctx = slot.config, slot.ssl_ctx  # as of accept time: a reload may change the slot later
        client_addr = _address(sock.getpeername) or ("?", 0)
        local_addr = _address(sock.getsockname)  # before any TLS wrap: wrap_socket takes the descriptor over
        if listener.proxy_protocol:
            got = await self._read_proxy_header(sock, client_addr)
            if got is None:
                return None
            if got.source is not None:
                client_addr = got.source
            if got.dest is not None:
                local_addr = got.dest
        if self.draining:  # accepted before the shutdown, not yet a session: the drain would never close it
            return None
        # The PROXY header was read to its last byte and no further: TLS (or the request)
        # starts on the socket itself, so OpenSSL reads it with no Python in the record path.
        conn: Stream = FastTLSStream(sock, ctx) if ctx is not None else FastSocketStream(sock)
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
            on_end=self._session_ended,  # told once: by run(), or later by its link on the reactor
            backend_tls=self.backend_tls,
            idle=self.idle,
            current_snapshot=self._current_snapshot,
        )
        return session

    async def _read_proxy_header(self, sock: socket.socket, peer: tuple[str, int]) -> proxy_protocol.ProxyHeader | None:
        """The PROXY header a listener with `proxy_protocol: true` requires; None: refused."""
        reason = "no PROXY header within the handshake timeout"
        with trio.move_on_after(self.snapshot.config.timeouts.handshake):
            try:
                got = await read_proxy_header(sock)
            except ValueError as exc:
                reason = str(exc)
            except OSError as exc:
                reason = f"connection failed: {exc}"
            else:
                if got is not None:
                    return got
                reason = "connection closed before a PROXY header"
        log.warning("connection from %s refused: %s", format_address(peer), reason)
        discard_readable(sock)  # the close then reaches the peer as a FIN, not a reset
        return None

    # --- listeners -------------------------------------------------------------------------

    async def _open_sockets(self, listener: ListenerConfig, config: Config, key: ListenerKey) -> list[socket.socket]:
        """Listening stdlib sockets: the server owns every connection's socket from accept on. After
        an upgrade, the previous process's sockets for this listener (no moment without one)."""
        if self._inherited is not None:
            socks = self._inherited.take(listener_key_name(key))
            if socks:
                set_backlog(socks, listener.backlog)  # the new config's, not the previous process's
                return socks
        label = listener_label(config, listener)
        return await open_sockets(
            listener.address, label=label, reuse_port=config.workers > 1, backlog=listener.backlog
        )

    def _refresh_bound(self) -> None:
        self.bound = [(slot.config, _sockname(sock)) for slot in self._listening.values() for sock in slot.sockets]

    async def _accept(self, slot: _Listening, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept on every socket of `slot` until its scope is cancelled (then close them)."""
        with slot.scope:
            async with trio.open_nursery() as loops:
                for sock in slot.sockets:
                    loops.start_soon(self._accept_loop, sock, slot)
                task_status.started()

    async def _accept_loop(self, listening: socket.socket, slot: _Listening) -> None:
        """Accept on a stdlib listening socket (waiting with trio only when none is pending) and
        give each connection its task; sessions close their own sockets. Closed with the slot."""
        connections = self._connections
        assert connections is not None
        # Sockets opened here are tuned before listen(); one handed over by an upgrade is tuned
        # now, and the connections it queued before that did not inherit the options: until the
        # queue is first empty, each accepted socket is tuned in full.
        tune_tcp(listening)
        queued_before = True
        try:
            while True:
                try:
                    sock, _ = listening.accept()
                except BlockingIOError:
                    queued_before = False
                    await trio.lowlevel.wait_readable(listening)
                    continue
                except OSError as exc:
                    if exc.errno not in ACCEPT_CAPACITY_ERRNOS:
                        raise
                    if not self.capacity.accept_failed(listening, exc):  # the spare descriptor: accept, close
                        await trio.sleep(ACCEPT_PAUSE)
                    continue
                if queued_before:
                    tune_tcp(sock)
                else:
                    tune_accepted(sock)
                connections.start_soon(self._handle, sock, slot)
                await trio.lowlevel.checkpoint()  # a burst of connects must not hold the scheduler
        finally:
            close_socket(listening)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Open every listener, report ready, and serve until `shutdown` finishes."""
        try:
            await self._serve(task_status)
        finally:
            self.idle.close_all()  # kept-alive backend connections of plain HTTP requests

    async def _serve(self, task_status: trio.TaskStatus[None]) -> None:
        async with trio.open_nursery() as connections:
            self._connections = connections
            self.edge.tasks = connections  # auth rechecks before credentials expire
            await connections.start(self.timers.run)
            await connections.start(self.telemetry.run)
            await connections.start(self.reactor.run)
            await self.fleet.start(connections)  # discovered backends before listeners
            self.health.sync(self.snapshot)
            await connections.start(self.health.run)
            config = self.snapshot.config
            for key, lst in listener_keys(config).items():
                ctx = server_ssl_context(lst, listener_label(config, lst)) if lst.tls is not None else None
                self._listening[key] = _Listening(lst, await self._open_sockets(lst, config, key), ctx)
            self._refresh_bound()
            self.capacity.start(self.snapshot.config)  # the spare descriptor; warns if RLIMIT_NOFILE is short
            if self.snapshot.config.admin is not None:  # in `connections`: it answers until the drain ends
                self.admin_bound = await connections.start(self._serve_admin)
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
            await self.fleet.leave()
            self.capacity.stop()
            connections.cancel_scope.cancel()

    async def _serve_admin(self, *, task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED) -> None:
        config = self.snapshot.config.admin
        assert config is not None
        inherited = self._inherited.admin if self._inherited is not None else None
        with self._admin_scope:
            await serve_admin(self, config, self.worker_index, inherited=inherited, task_status=task_status)

    def listening_fds(self) -> tuple[dict[str, list[int]], list[int]]:
        """The descriptors a successor takes over: listeners by key, and the admin listener's."""
        listeners = {
            listener_key_name(key): [sock.fileno() for sock in slot.sockets] for key, slot in self._listening.items()
        }
        return listeners, [sock.fileno() for sock in self.admin_sockets]

    def stop_admin(self) -> None:
        """The successor answers on the admin address now."""
        self._admin_scope.cancel()

    # --- reload ----------------------------------------------------------------------------

    async def reload(self, config: Config) -> ReloadPlan:
        """Apply a validated config; raises ReloadError (and changes nothing) if it cannot be.

        Everything that can fail (TLS contexts, binding new ports) happens before the swap.
        """
        if self.draining or self._accepting is None or self._connections is None:
            raise ReloadError("the proxy is shutting down")
        old = self.snapshot.config
        plan = plan_reload(old, carry_membership(old, config))
        if config.workers != old.workers:
            log.warning("workers changed (%d -> %d): takes effect on restart only", old.workers, config.workers)
        if config.shared_state != old.shared_state:
            log.warning("shared_state changed: takes effect on restart only")
        contexts: dict[Address, ssl.SSLContext] = {}
        for lst in config.listeners:
            if lst.tls is not None:
                try:
                    contexts[lst.address] = server_ssl_context(lst, listener_label(config, lst))
                except ListenError as exc:
                    raise ReloadError(str(exc)) from None
        backend_tls = BackendContexts()
        try:
            backend_tls.load(config)
        except (OSError, ssl.SSLError) as exc:
            raise ReloadError(f"cannot load the TLS files for backends: {exc}") from None
        opened: list[tuple[ListenerKey, _Listening]] = []
        try:
            for key, lst in plan.open:
                sockets = await self._open_sockets(lst, config, key)
                opened.append((key, _Listening(lst, sockets, contexts.get(lst.address))))
        except ListenError as exc:
            for _, slot in opened:
                for sock in slot.sockets:
                    sock.close()
            raise ReloadError(str(exc)) from None
        # the swap: from here on nothing fails. Members of discovered pools as of now (DNS may
        # have changed them while the sockets opened; listeners are the file's alone).
        config = carry_membership(self.snapshot.config, config)
        plan = plan_reload(self.snapshot.config, config)
        self.backend_tls.replace(backend_tls)  # (a plain assignment: nothing here fails)
        self.idle.close_all()  # kept connections were made with the old TLS and PROXY settings
        doomed = await self._apply(config, plan, "backend removed by reload", contexts=contexts, opened=opened)
        self.fleet.reloaded(config)
        log.info(
            "reloaded %s (sha256 %s): %s; %d session(s) on removed backends close over %gs",
            config.source,
            config.digest[:12],
            plan.describe(),
            doomed,
            config.reload.drain_window,
        )
        return plan

    async def _apply(
        self,
        config: Config,
        plan: ReloadPlan,
        cause: str,
        *,
        contexts: dict[Address, ssl.SSLContext] | None = None,
        opened: Iterable[tuple[ListenerKey, _Listening]] = (),
    ) -> int:
        """Swap in `config` as `plan` says, for a SIGHUP reload and a DNS change alike: the new
        snapshot (kept backends keep their live objects), health checks, listener slots (`contexts`
        None: kept listeners keep their TLS context), the drain of removed backends' sessions,
        rebalancing. Nothing here fails. The number of sessions set to drain."""
        self.snapshot = Snapshot.build(config, previous=self.snapshot)
        self.reloads += 1
        if self._accepting is not None:  # serving: backends added now ramp up (slow start, if set)
            now = trio.current_time()
            for pool in self.snapshot.pools.values():
                for backend in pool.backends:
                    if (pool.name, backend.address) in plan.added:
                        backend.health.joined(now)
        self.health.sync(self.snapshot)  # kept backends keep their checker; new ones get one
        for key, lst in plan.keep:
            slot = self._listening.get(key)
            if slot is None:  # not listening yet (the first DNS answers come before the listeners)
                continue
            if lst.backlog != slot.config.backlog:
                set_backlog(slot.sockets, lst.backlog)
            slot.config = lst
            if contexts is not None:
                slot.ssl_ctx = contexts.get(lst.address)
        for key in plan.close:
            self._listening.pop(key).scope.cancel()
        for key, slot in opened:
            self._listening[key] = slot
            assert self._accepting is not None
            await self._accepting.start(self._accept, slot)
        self._refresh_bound()
        connections = self._connections
        if connections is None:  # not serving yet (the first DNS answers): no session to care about
            return 0
        doomed = [s for s in self.sessions if s.backend is not None and plan.drops(s.outcome.pool, s.backend.address)]
        if doomed:
            connections.start_soon(self._spread_closes, doomed, config.reload.drain_window, SERVICE_RESTART, cause)
        connecting = [s for s in self.sessions if s.backend is None and s.snapshot is not self.snapshot]
        if connecting and plan.removed:
            connections.start_soon(self._doom_late, connecting, plan, config, cause)
        for name, pool in self.snapshot.pools.items():
            if pool.config.rebalance_rate is not None and any(p == name for p, _ in plan.added):
                connections.start_soon(self._rebalance, pool, self.reloads)
        return len(doomed)

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

    async def _doom_late(self, connecting: list[Session], plan: ReloadPlan, config: Config, cause: str) -> None:
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
            await self._spread_closes(late, config.reload.drain_window, SERVICE_RESTART, cause)

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


def _address(get: Callable[[], Any]) -> tuple[str, int] | None:
    """A socket's peer or own address as (host, port); None if the socket cannot tell."""
    try:
        name = get()
    except OSError:
        return None
    return (name[0], name[1]) if isinstance(name, tuple) else (str(name), 0)


def listener_key_name(key: ListenerKey) -> str:
    """A listener's identity as text, the same in a successor that reads the same file."""
    return str(key) if isinstance(key, Address) else f"{key[0]}#{key[1]}"


def _sockname(sock: socket.socket) -> tuple[str, int]:
    name = sock.getsockname()
    return (name[0], name[1])
