"""One proxied session's lifecycle, from the accepted socket to its log line.

The session runs its handshake phase (handshake_phase.py: the request, admission, the backend
candidates, the upstream handshake, the 101), then hands both sockets and the relay to the shared
readiness loop (link.py), and its task ends: the link ends the session later (`_link_ended`). What
the session owns over its whole life is here: the sockets until the hand-over, its ticket in the
caps and its backend's lease (released once, `_release`), the heartbeat and deadline schedule
(one entry in the shared timer task), closes from outside (`go_away`, `cut`), and the one log
line and the metrics it ends with.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass

import trio

from wsproxy.config import ListenerConfig
from wsproxy.observe import session_log
from wsproxy.observe.metrics import ABORTED, Metrics
from wsproxy.policy.admission import RATE_CLOSED, RATE_THROTTLED, Ticket
from wsproxy.policy.balancing import Backend
from wsproxy.policy.balancing.base import Lease
from wsproxy.policy.ratelimit import FlowLimiter
from wsproxy.policy.snapshot import Snapshot
from wsproxy.protocol import heartbeat
from wsproxy.protocol.forwarding import Origin
from wsproxy.protocol.heartbeat import Expired, PeerDead, Schedule, SendPing
from wsproxy.protocol.relay import GOING_AWAY, INTERNAL_ERROR, Relay, RelayStats
from wsproxy.protocol.sides import Side
from wsproxy.runtime import gate
from wsproxy.runtime.backend_tls import BackendContexts
from wsproxy.runtime.handshake_phase import HandshakePhase
from wsproxy.runtime.http_pool import IdleConnections
from wsproxy.runtime.http_proxy import HttpConnection
from wsproxy.runtime.link import Link
from wsproxy.runtime.reactor import Reactor
from wsproxy.runtime.streams import Stream, format_address
from wsproxy.runtime.timers import TimerEntry, Timers

log = logging.getLogger("wsproxy.session")
_SPENT_SCOPE = trio.CancelScope()  # stands in for a relaying session's handshake scope (never entered)


@dataclass(slots=True)
class Outcome:
    """What the handshake phase decided, for the session log."""

    status: int = 0
    reason: str = ""
    pool: str | None = None
    backend: str | None = None
    path: str | None = None
    subprotocol: str | None = None
    attempts: int = 0
    http_requests: int = 0  # plain HTTP requests answered on this connection (http_proxy.py)
    cookie: bytes | None = None  # the affinity Set-Cookie for the 101 (sticky.py)


class Session:
    """A client connection: handshake on both hops, then the relay."""

    __slots__ = (
        "_active",
        "_flow",
        "_link",
        "_on_end",
        "_reactor",
        "_schedule",
        "_scope",
        "_timer",
        "_timers",
        "backend",
        "backend_stream",
        "backend_tls",
        "client_addr",
        "client_stream",
        "current_snapshot",
        "edge",
        "http",
        "idle",
        "lease",
        "listener",
        "local_addr",
        "metrics",
        "origin",
        "outcome",
        "relay",
        "snapshot",
        "started",
        "ticket",
    )

    def __init__(
        self,
        stream: Stream,
        *,
        client_addr: tuple[str, int],
        listener: ListenerConfig,
        snapshot: Snapshot,
        timers: Timers,
        local_addr: tuple[str, int] | None = None,
        metrics: Metrics,
        edge: gate.Edge | None = None,
        reactor: Reactor,
        on_end: Callable[[Session], None] | None = None,
        backend_tls: BackendContexts | None = None,
        idle: IdleConnections | None = None,
        current_snapshot: Callable[[], Snapshot] | None = None,
    ) -> None:
        self.client_stream = stream
        self.client_addr = client_addr
        self.local_addr = local_addr  # the address the client connected to (for PROXY headers)
        self.origin = Origin.direct(client_addr[0])  # who connected; client_addr follows it (handshake_phase)
        self.listener = listener
        self.snapshot = snapshot
        self.outcome = Outcome()
        self.relay: Relay | None = None
        self.backend: Backend | None = None  # the backend this session is relayed to (after its 101)
        self.started = trio.current_time()
        self.backend_stream: Stream | None = None  # plain TCP or TLS (backend_tls.py)
        self._scope = trio.CancelScope()
        self._timers = timers
        self._schedule: Schedule | None = None
        self.metrics = metrics
        self._active: tuple[str, str, str] | None = None  # sessions_active labels while counted
        self._timer: TimerEntry | None = None
        self.edge = edge if edge is not None else gate.Edge()  # the server's: caps, buckets, auth caches
        self.ticket: Ticket | None = None  # this session's place in the session counts, once admitted
        self._flow: FlowLimiter | None = None  # client-to-backend message/byte budget
        self._reactor = reactor
        self.lease: Lease | None = None  # this session's count on its backend, once chosen
        self._link: Link | None = None  # the relay phase, on the reactor
        self._on_end = on_end  # told once, when everything of this session is released
        self.backend_tls = backend_tls if backend_tls is not None else BackendContexts()  # the server's
        self.idle = idle if idle is not None else IdleConnections()  # the server's kept-alive backend connections
        self.current_snapshot = current_snapshot  # the server's snapshot now (plain HTTP keep-alive ends on reload)
        self.http: HttpConnection | None = None  # while plain HTTP requests are served (http_proxy.py)

    # --- lifecycle -------------------------------------------------------------------------

    async def run(self) -> None:
        """The session's task: the handshake, then the hand-over to the reactor (this task then
        ends and the link ends the session: an idle session holds no task)."""
        try:
            with self._scope:
                await self._serve()
            if self._link is not None:
                # relaying on the reactor: the link ends the session from here, never this scope
                # (go_away and cut ask the link), so an idle session does not keep it
                self._scope = _SPENT_SCOPE
        except Exception:
            # A bug in one session ends that session only; the process and others go on.
            log.exception("session from %s failed", format_address(self.client_addr))
            self.outcome.reason = self.outcome.reason or "internal error"
        finally:
            if self._link is None:  # else the link owns the end (_link_ended)
                try:
                    self._close_streams()
                finally:
                    self._release()

    def _link_ended(self, link: Link) -> None:
        """The reactor-driven relay phase ended (both hops done, the close timeout, a cut, the
        reactor stopping, or a bug): close the sockets and release the session."""
        if link.failed_by_bug:
            self.outcome.reason = self.outcome.reason or "internal error"
        try:
            self._close_streams()
        finally:
            self._release()

    def _close_streams(self) -> None:
        """Close both sockets now (those the link closed already are left as they are)."""
        self.client_stream.close_now()
        if self.backend_stream is not None:
            self.backend_stream.close_now()

    def _release(self) -> None:
        """Everything a session holds beyond its sockets, released once; then its metrics, its
        log line, and the server's registry."""
        self._timers.cancel(self._timer)  # free this session now, not at its next deadline
        self._timer = None
        if self.lease is not None:
            self.lease.release()
            self.lease = None
        if self.ticket is not None:
            self.ticket.release()
            self.ticket = None
        try:
            self._finish()
        finally:
            if self._on_end is not None:
                on_end, self._on_end = self._on_end, None
                on_end(self)

    def go_away(self, code: int = GOING_AWAY, reason: str = "proxy shutting down") -> None:
        """Close this session from outside (shutdown): a closing handshake with `code`; plain
        HTTP requests: the one in flight is answered, then the connection closes."""
        if self.relay is not None and self._link is not None:
            self.relay.close(client_code=code, backend_code=code, reason=reason)
            self._link.settle()
            return
        if self.http is not None:
            self.http.go_away()  # (cut() still ends it at the shutdown deadline)
            return
        self._scope.cancel()  # still in the handshake: nothing to close gracefully

    def live_traffic(self) -> tuple[str, str, RelayStats] | None:
        """(listener, pool, stats) while this session counts as active in the metrics."""
        if self._active is None or self.relay is None:
            return None
        return (self._active[0], self._active[1], self.relay.stats)

    def backlog(self) -> tuple[int, int]:
        """Bytes waiting in the proxy: (to the client, to the backend)."""
        return self._link.backlog() if self._link is not None else (0, 0)

    @property
    def last_activity(self) -> float | None:
        """When the last data frame passed either way (None: no schedule keeps it)."""
        return self._schedule.last_data if self._schedule is not None else None

    @property
    def closing(self) -> bool:
        """A closing handshake has started (by either peer or the proxy)."""
        return self.relay is not None and self.relay.closing

    def cut(self) -> None:
        """End this session now, without a closing handshake (a shutdown deadline passed)."""
        if self._link is not None:
            self._link.end()
        else:
            self._scope.cancel()

    # --- the two phases ------------------------------------------------------------------------

    async def _serve(self) -> None:
        """Handshake, then relay. The relay runs after the handshake's frames have returned, so
        an idle session does not keep the request, both h11 connections and the balancer's
        iterator alive for hours; `self.lease` is what must outlive them (the backend's count,
        released by `_release`)."""
        upgraded = await HandshakePhase(self).run()
        if upgraded is None:
            return
        cfg = self.snapshot.config
        self.relay = upgraded.relay
        listener = str(self.listener.address)
        self._active = self.metrics.session_opened(listener, self.outcome.pool or "-", self.outcome.backend or "-")
        # the handshake's latency, whether it is a reconnect, and the credentials' expiry timer
        gate.upgraded(self.edge, self, upgraded.upgrade, self.metrics, upgraded.credentials)
        self._start_schedule()
        self._flow = gate.flow_limiter(cfg, trio.current_time())
        self._relay(upgraded.client_trailing, upgraded.backend_trailing)

    # --- relay phase ---------------------------------------------------------------------------

    def _relay(self, client_trailing: bytes, backend_trailing: bytes) -> None:
        """The relay phase on the shared readiness loop. The session's task ends after this; the
        link ends the session (`_link_ended`), so an idle session holds no task at all."""
        relay = self.relay
        assert relay is not None and self.backend_stream is not None
        if not self._reactor.running:  # the server stopped as this handshake ended: no loop to relay on
            self.outcome.reason = self.outcome.reason or "proxy stopped"
            return  # (run() closes the sockets and releases the session)
        cfg = self.snapshot.config
        link = Link(
            reactor=self._reactor,
            relay=relay,
            client=self.client_stream.socket,
            backend=self.backend_stream.socket,
            timers=self._timers,
            metrics=self.metrics,
            receive_size=cfg.limits.buffer_bytes,
            splice_min_bytes=cfg.limits.splice_min_bytes,
            close_timeout=cfg.timeouts.close,
            slow_consumer_timeout=cfg.limits.slow_consumer_timeout,
            schedule=self._schedule,
            flow=self._flow,
            on_throttled=self._rate_throttled,
            on_rate_close=self._rate_close,
            peer_name=self._peer_name,
            on_end=self._link_ended,
        )
        self._link = link
        link.start(client_trailing, backend_trailing)

    def _rate_throttled(self) -> None:
        self.edge.admission.counts[RATE_THROTTLED] += 1

    def _rate_close(self, over: float) -> None:
        """Over its message/byte rate for close_after (`over` seconds): the relay phase closes
        it with 1008 to the client, 1001 to the backend; here it is counted and logged."""
        self.edge.admission.counts[RATE_CLOSED] += 1
        log.warning(
            "client %s: over its message/byte rate for %gs: closing with 1008", format_address(self.client_addr), over
        )

    # --- heartbeats and deadlines ---------------------------------------------------------------

    def _start_schedule(self) -> None:
        cfg = self.snapshot.config
        lifetime = None
        if cfg.timeouts.max_lifetime is not None:
            lifetime = heartbeat.lifetime_with_jitter(
                cfg.timeouts.max_lifetime, cfg.timeouts.max_lifetime_jitter, random.random()
            )
        sides = tuple(Side(name) for name in cfg.heartbeat.leg_names)  # the config's `heartbeat.legs`
        if not sides and cfg.timeouts.idle is None and lifetime is None:
            return  # nothing to time: no schedule, no timer entries
        self._schedule = Schedule(
            trio.current_time(),
            interval=cfg.heartbeat.interval if sides else None,
            timeout=cfg.heartbeat.timeout,
            sides=sides,
            idle=cfg.timeouts.idle,
            lifetime=lifetime,
        )
        self._arm_timer()

    def _arm_timer(self) -> None:
        assert self._schedule is not None
        when = self._schedule.next_deadline()
        if when is None:
            return
        self._timers.cancel(self._timer)
        self._timer = self._timers.schedule(when, self._on_timer)

    def _on_timer(self, now: float) -> None:
        self._timer = None
        relay, schedule, link = self.relay, self._schedule, self._link
        if relay is None or schedule is None or link is None:
            return
        if link.done:
            return  # the session has ended (its timer entry was cancelled; this is a late call)
        if relay.client_done and relay.backend_done:
            return
        for side in Side:
            if relay.ping_waiting(side):
                schedule.ping_held(side, now)
        acted = False
        for action in schedule.due(now):
            acted = True
            if isinstance(action, SendPing):
                if relay.send_ping(action.side, action.payload):
                    self.metrics.ping_sent(action.side)
            elif isinstance(action, PeerDead):
                self.metrics.dead_peer(action.side)
                log.warning(
                    "%s %s: no answer to our ping, silent for %.1fs: closing",
                    action.side,
                    self._peer_name(action.side),
                    action.silent_for,
                )
                other = GOING_AWAY if action.side is Side.CLIENT else INTERNAL_ERROR
                relay.abandon(action.side, other_code=other, reason=f"{action.side} did not answer the proxy's ping")
            elif isinstance(action, Expired):
                reason = "idle timeout" if action.what == "idle" else "maximum session lifetime reached"
                log.info("session from %s: %s", format_address(self.client_addr), reason)
                relay.close(client_code=GOING_AWAY, backend_code=GOING_AWAY, reason=reason)
        if acted:
            link.settle()
            if link.done:
                return
        if not relay.closing:
            self._arm_timer()

    def _peer_name(self, side: Side) -> str:
        return format_address(self.client_addr) if side is Side.CLIENT else (self.outcome.backend or "?")

    # --- log -----------------------------------------------------------------------------------

    def _finish(self) -> None:
        """The session ended: its metrics and its one log line, from one record."""
        record = self._record()
        if self.outcome.status == 0 and not self.outcome.http_requests:  # no answer reached the client
            self.metrics.handshake(record.listener, ABORTED, 0)
        self.metrics.session_closed(self._active, record)
        self._active = None
        if self.outcome.status != 0:
            session_log.emit(record)

    def _record(self) -> session_log.SessionRecord:
        o = self.outcome
        r = session_log.SessionRecord(
            client=format_address(self.client_addr),
            listener=str(self.listener.address),
            pool=o.pool,
            backend=o.backend,
            path=o.path,
            subprotocol=o.subprotocol,
            status=o.status,
            duration=trio.current_time() - self.started,
            attempts=o.attempts,
            error=o.reason,
        )
        if self.relay is not None:
            st = self.relay.stats
            r.relayed = True
            r.messages_to_backend, r.messages_to_client = st.messages_to_backend, st.messages_to_client
            r.bytes_from_client, r.bytes_from_backend = st.client_bytes_in, st.backend_bytes_in
            r.client_close, r.backend_close, r.proxy_close = st.client_close, st.backend_close, st.proxy_close
            r.first_closer = st.first_closer
        if self._schedule is not None:
            r.rtt_client, r.rtt_backend = self._schedule.rtt(Side.CLIENT), self._schedule.rtt(Side.BACKEND)
        return r
