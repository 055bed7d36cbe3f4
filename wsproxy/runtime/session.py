"""One proxied session, from the client's first byte to its log line.

Reads the client's request (h11), asks handshake.py whether it is a valid Upgrade, routes it
to a pool, walks the balancer's candidates (connect + upstream handshake, retrying the next
candidate while nothing has been sent to the client), answers 101, then hands both sockets to
the shared readiness loop (link.py), and the session's task ends: the link ends the session
(`_link_ended`). Where there is no loop (no epoll, or TLS after a PROXY header) it runs two pumps
that feed the sans-I/O relay instead, in one nursery whose scope is cancelled when both hops are
done or the close timeout runs out. Every wait here has a deadline from the config.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import random
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import h11
import trio
from wsproto.extensions import PerMessageDeflate

from wsproxy.config import ListenerConfig
from wsproxy.observe import session_log
from wsproxy.observe.metrics import (
    ABORTED,
    BACKEND_RESPONSE,
    BUFFER_FULL,
    REJECTED,
    SEND_STALL_SECONDS,
    SEND_STALLED,
    SLOW_CONSUMER_CLOSED,
    UPGRADED,
    Metrics,
)
from wsproxy.policy import health, routing
from wsproxy.policy.admission import RATE_CLOSED, RATE_THROTTLED, Ticket
from wsproxy.policy.balancing import Backend, Pool
from wsproxy.policy.balancing.base import Lease
from wsproxy.policy.ratelimit import FlowLimiter
from wsproxy.policy.snapshot import Snapshot
from wsproxy.protocol import handshake, heartbeat, proxy_protocol
from wsproxy.protocol.handshake import ClientUpgrade, Rejection
from wsproxy.protocol.heartbeat import Expired, PeerDead, Schedule, SendPing
from wsproxy.protocol.relay import GOING_AWAY, INTERNAL_ERROR, POLICY_VIOLATION, Relay, RelayStats
from wsproxy.protocol.relay_inspect import InspectRelay
from wsproxy.protocol.relay_passthrough import PassthroughRelay
from wsproxy.runtime import gate, tls_handshake
from wsproxy.runtime.capacity import LocalShortage
from wsproxy.runtime.link import Link
from wsproxy.runtime.reactor import Reactor
from wsproxy.runtime.streams import FastSocketStream, FastTLSStream, close_now, raw_socket
from wsproxy.runtime.timers import TimerEntry, Timers
from wsproxy.runtime.upstream import LocalResourceError, UpstreamAnswer, UpstreamError, connect, request_upgrade

log = logging.getLogger("wsproxy.session")

Stream = trio.SocketStream | trio.SSLStream | FastSocketStream | FastTLSStream


@dataclass(slots=True)
class Upstream:
    """A backend that answered: its 101 (checked) and this hop's negotiated extension."""

    answer: UpstreamAnswer
    accepted: handshake.BackendAccept | None = None  # None: a normal HTTP response, not a 101
    extension: PerMessageDeflate | None = None  # inspect: this hop's negotiated deflate


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


class Session:
    """A client connection: handshake on both hops, then the relay."""

    __slots__ = (
        "_active",
        "_backend_lock",
        "_backend_stream",
        "_client_lock",
        "_close_armed",
        "_closed",
        "_edge",
        "_flow",
        "_lease",
        "_link",
        "_metrics",
        "_nursery",
        "_on_end",
        "_reactor",
        "_schedule",
        "_scope",
        "_ticket",
        "_timer",
        "_timers",
        "_upstream_headers",
        "backend",
        "client_addr",
        "client_stream",
        "listener",
        "local_addr",
        "outcome",
        "relay",
        "snapshot",
        "started",
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
        reactor: Reactor | None = None,
        on_end: Callable[[Session], None] | None = None,
    ) -> None:
        self.client_stream = stream
        self.client_addr = client_addr
        self.local_addr = local_addr  # the address the client connected to (for PROXY headers)
        self.listener = listener
        self.snapshot = snapshot
        self.outcome = Outcome()
        self.relay: Relay | None = None
        self.backend: Backend | None = None  # the backend this session is relayed to (after its 101)
        self.started = trio.current_time()
        self._backend_stream: trio.SocketStream | FastSocketStream | None = None
        self._scope = trio.CancelScope()
        self._nursery: trio.Nursery | None = None
        self._client_lock: trio.Lock | None = None  # the task-driven relay's send locks (not the reactor's)
        self._backend_lock: trio.Lock | None = None
        self._closed = {"client": False, "backend": False}
        self._close_armed = False
        self._timers = timers
        self._schedule: Schedule | None = None
        self._metrics = metrics
        self._active: tuple[str, str, str] | None = None  # sessions_active labels while counted
        self._timer: TimerEntry | None = None
        self._edge = edge if edge is not None else gate.Edge()  # the server's: caps, buckets, auth caches
        self._ticket: Ticket | None = None  # this session's place in the session counts, once admitted
        self._upstream_headers: tuple[tuple[bytes, bytes], ...] = ()  # from the auth service
        self._flow: FlowLimiter | None = None  # client-to-backend message/byte budget
        self._reactor = reactor if reactor is not None and reactor.running else None
        self._lease: Lease | None = None  # this session's count on its backend, once chosen
        self._link: Link | None = None  # the relay phase on the reactor (else: two pump tasks)
        self._on_end = on_end  # told once, when everything of this session is released

    # --- lifecycle -------------------------------------------------------------------------

    async def run(self) -> None:
        """The session's task: the handshake, then either the relay on the reactor (this task
        then ends and the link ends the session: an idle session holds no task) or the pumps."""
        try:
            with self._scope:
                await self._serve()
        except Exception:
            # A bug in one session ends that session only; the process and others go on.
            log.exception("session from %s failed", _fmt_addr(self.client_addr))
            self.outcome.reason = self.outcome.reason or "internal error"
        finally:
            if self._link is None:  # else the link owns the end (_link_ended)
                try:
                    for stream in (self.client_stream, self._backend_stream):
                        if stream is not None and not close_now(stream):
                            with trio.CancelScope(shield=True):
                                await trio.aclose_forcefully(stream)
                finally:
                    self._release()

    def _link_ended(self, link: Link) -> None:
        """The reactor-driven relay phase ended (both hops done, the close timeout, a cut, the
        reactor stopping, or a bug): close the sockets and release the session."""
        if link.failed:
            self.outcome.reason = self.outcome.reason or "internal error"
        try:
            for stream in (self.client_stream, self._backend_stream):
                if stream is not None:
                    close_now(stream)
        finally:
            self._release()

    def _release(self) -> None:
        """Everything a session holds beyond its sockets, released once; then its metrics, its
        log line, and the server's registry."""
        self._timers.cancel(self._timer)  # free this session now, not at its next deadline
        self._timer = None
        if self._lease is not None:
            self._lease.release()
            self._lease = None
        if self._ticket is not None:
            self._ticket.release()
            self._ticket = None
        try:
            self._finish()
        finally:
            if self._on_end is not None:
                on_end, self._on_end = self._on_end, None
                on_end(self)

    def go_away(self, code: int = GOING_AWAY, reason: str = "proxy shutting down") -> None:
        """Close this session from outside (shutdown): a closing handshake with `code`."""
        if self.relay is not None and self._link is not None:
            self.relay.close(client_code=code, backend_code=code, reason=reason)
            self._link.settle()
            return
        if self.relay is None or self._nursery is None:
            self._scope.cancel()  # still in the handshake: nothing to close gracefully
            return
        self.relay.close(client_code=code, backend_code=code, reason=reason)
        with contextlib.suppress(RuntimeError):  # the relay phase may already have ended
            self._nursery.start_soon(self._flush)

    def live_traffic(self) -> tuple[str, str, RelayStats] | None:
        """(listener, pool, stats) while this session counts as active in the metrics."""
        if self._active is None or self.relay is None:
            return None
        return (self._active[0], self._active[1], self.relay.stats)

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

    # --- handshake phase ---------------------------------------------------------------------

    async def _serve(self) -> None:
        """Handshake, then relay. The relay runs after the handshake's frames have returned, so
        an idle session does not keep the request, both h11 connections and the balancer's
        iterator alive for hours; `self._lease` is what must outlive them (the backend's count,
        released by `_release`)."""
        trailing = await self._handshake()
        if trailing is not None:
            await self._relay(*trailing)

    async def _handshake(self) -> tuple[bytes, bytes] | None:
        """Both handshakes; (client bytes, backend bytes) already read past them once the client
        has its 101, else None (the client got its answer, or left)."""
        cfg = self.snapshot.config
        h = h11.Connection(h11.SERVER, max_incomplete_event_size=cfg.limits.max_header_bytes)
        secured = False  # one deadline covers the TLS handshake and the request head (tls_handshake.py)
        with trio.move_on_after(cfg.timeouts.handshake) as waited:
            secured = await self._finish_tls()
            got = await self._read_request(h) if secured else None
        if waited.cancelled_caught and not secured:
            self.outcome.reason = f"TLS handshake not complete within {cfg.timeouts.handshake:g}s"
            log.info("client %s: %s: closed", _fmt_addr(self.client_addr), self.outcome.reason)
            return
        if waited.cancelled_caught:
            await self._reject(Rejection(408, f"request headers not complete within {cfg.timeouts.handshake:g}s"))
            return
        if got is None:
            return  # the client left (or TLS failed) before sending a request
        # Every request counts against its address's handshake rate, well-formed or not.
        limited = self._edge.admission.check_handshake(cfg, self.client_addr[0], trio.current_time())
        if limited is not None:
            await self._reject(limited)
            return
        if isinstance(got, Rejection):
            await self._reject(got)
            return
        self.outcome.path = got.target.decode("latin-1")
        checked = handshake.validate_client_request(got)
        if isinstance(checked, Rejection):
            await self._reject(checked)
            return
        admitted = await gate.admit(
            self._edge,
            config=cfg,
            pools=self.snapshot.pools,
            listener=self.listener,
            upgrade=checked,
            client_ip=self.client_addr[0],
        )
        if isinstance(admitted, Rejection):
            await self._reject(admitted)
            return
        self._ticket, self._upstream_headers = admitted.ticket, admitted.upstream_headers
        return await self._connect_backend(h, admitted.upgrade)

    async def _finish_tls(self) -> bool:
        try:
            await tls_handshake.finish(self.client_stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.info("client %s: TLS handshake failed: %s", _fmt_addr(self.client_addr), exc)
            return False
        return True

    async def _read_request(self, h: h11.Connection) -> h11.Request | Rejection | None:
        request: h11.Request | None = None
        size = self.snapshot.config.limits.buffer_bytes
        while True:
            try:
                event = h.next_event()
            except h11.RemoteProtocolError as exc:
                return Rejection(exc.error_status_hint, f"malformed request: {exc}")
            if event is h11.NEED_DATA:
                try:
                    data = await self.client_stream.receive_some(size)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    log.info("client %s: connection failed before a request: %s", _fmt_addr(self.client_addr), exc)
                    return None
                h.receive_data(data)
                if not data and request is None and h.their_state is h11.IDLE:
                    return None
                continue
            if isinstance(event, h11.Request):
                # h11 bounds only a head still incomplete; one that arrived whole is measured here.
                limit = self.snapshot.config.limits.max_header_bytes
                if handshake.head_size(event) > limit:
                    return Rejection(431, f"request head over {limit} bytes")
                request = event
                continue
            if isinstance(event, h11.Data):
                return Rejection(400, "an Upgrade request must not carry a body")
            if isinstance(event, h11.EndOfMessage) and request is not None:
                return request
            if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                return request
            return Rejection(400, f"unexpected {type(event).__name__}")

    async def _reject(self, rejection: Rejection) -> None:
        self.outcome.status = rejection.status
        self._metrics.handshake(str(self.listener.address), REJECTED, rejection.status)
        self.outcome.reason = rejection.reason
        log.log(
            rejection.log_level if isinstance(rejection, LocalShortage) else logging.WARNING,  # once per burst
            "client %s: %d %s (path %s)",
            _fmt_addr(self.client_addr),
            rejection.status,
            rejection.reason,
            self.outcome.path or "-",
        )
        with trio.move_on_after(self.snapshot.config.timeouts.close):
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await self.client_stream.send_all(rejection.to_bytes())

    async def _connect_backend(self, h: h11.Connection, upgrade: ClientUpgrade) -> tuple[bytes, bytes] | None:
        cfg = self.snapshot.config
        pool_name = routing.select_pool(self.listener, upgrade.host, upgrade.path)
        if pool_name is None:
            await self._reject(
                Rejection(404, f"no route for host {upgrade.host.decode('latin-1')} path {upgrade.path}")
            )
            return None
        pool = self.snapshot.pools[pool_name]
        self.outcome.pool = pool_name
        key: bytes | None = None
        if pool.config.hash_key is not None:
            key = routing.extract_hash_key(pool.config.hash_key, upgrade, self.client_addr[0])
            if key is None and pool.config.hash_fallback == "reject":
                await self._reject(Rejection(400, f"request has no {pool.config.hash_key} to choose a backend by"))
                return None
        if not pool.backends:
            await self._reject(Rejection(503, f"pool {pool_name} has no backends"))
            return None
        deadline = trio.current_time() + cfg.timeouts.handshake
        last: Rejection | None = None
        # Only backends healthy now (not down, not ejected), at their slow-start weights.
        for backend in itertools.islice(pool.candidates(key, trio.current_time()), 1 + pool.config.retries):
            self.outcome.attempts += 1
            if self.outcome.attempts > 1:
                self._metrics.retry(pool_name)
            self.outcome.backend = backend.name
            lease: Lease | None = pool.acquire(backend)
            try:
                try:
                    result = await self._try_backend(backend, pool, upgrade, deadline)
                except LocalResourceError as exc:  # the proxy's own shortage: 503, the backend not blamed
                    await self._reject(gate.local_shortage(self._edge, exc))
                    return None
                if isinstance(result, Rejection):
                    log.warning("backend %s (pool %s): %s", backend.name, pool_name, result.reason)
                    self._metrics.upstream_failure(pool_name, backend.name, result.status)
                    # A Rejection here is the proxy's verdict on this backend (connect failed, no
                    # answer in time, not a valid 101): it counts against the backend (health.py).
                    ejected = backend.health.attempt_failed(trio.current_time(), result.reason)
                    if ejected is not None:
                        log.warning(
                            "backend %s (pool %s) ejected for %gs: %s",
                            backend.name,
                            pool_name,
                            ejected.duration,
                            ejected.reason,
                        )
                    last = result
                    if trio.current_time() >= deadline:
                        break
                    continue
                # The backend answered, a 101 or a normal HTTP response (401, 404): it is alive.
                backend.health.attempt_succeeded(trio.current_time())
                if result.accepted is None:
                    await self._pass_response(h, result.answer, deadline)
                    return None
                self.backend = backend
                self._lease, lease = lease, None  # the count lasts as long as the session
                return await self._open(h, upgrade, result)
            finally:
                if lease is not None:
                    lease.release()
        await self._reject(last if last is not None else _unavailable(pool))
        return None

    async def _try_backend(
        self, backend: Backend, pool: Pool, upgrade: ClientUpgrade, deadline: float
    ) -> Upstream | Rejection:
        cfg = self.snapshot.config
        remaining = deadline - trio.current_time()
        if remaining <= 0:
            return Rejection(504, "handshake deadline passed before trying this backend")
        try:
            stream = FastSocketStream(await connect(backend.address, min(cfg.timeouts.connect, remaining)))
        except UpstreamError as exc:
            return Rejection(502, exc.reason)
        self._backend_stream = stream
        if pool.config.send_proxy_protocol is not None and self.local_addr is not None:
            header = proxy_protocol.build(pool.config.send_proxy_protocol, self.client_addr, self.local_addr)
            try:
                await stream.send_all(header)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                await self._drop_backend()
                return Rejection(502, f"{backend.name}: connection failed: {exc}")
        key = handshake.new_key()
        offer = None
        ext = None
        passthrough = self.listener.relay == "passthrough"
        if self.listener.deflate and _offers_deflate(upgrade):
            if passthrough:  # end to end: the backend answers the client's own offer
                offer = ", ".join(o for o in upgrade.extension_offers if _is_deflate(o))
            else:
                ext, offer = handshake.backend_deflate_offer()
        request = handshake.build_upstream_request(
            upgrade,
            key=key,
            client_ip=self.client_addr[0],
            scheme="https" if self.listener.tls else "http",
            extension_offer=offer,
            extra_headers=self._upstream_headers,
        )
        answer: UpstreamAnswer | None = None
        with trio.move_on_after(deadline - trio.current_time()):
            try:
                answer = await request_upgrade(
                    stream, request, max_header_bytes=cfg.limits.max_header_bytes, receive_size=cfg.limits.buffer_bytes
                )
            except UpstreamError as exc:
                await self._drop_backend()
                return Rejection(502, f"{backend.name}: {exc.reason}")
        if answer is None:
            await self._drop_backend()
            return Rejection(504, f"{backend.name} did not answer the Upgrade within {cfg.timeouts.handshake:g}s")
        if isinstance(answer.response, h11.InformationalResponse):
            checked = handshake.check_backend_101(
                answer.response,
                key=key,
                offered_subprotocols=upgrade.subprotocols,
                offered_extensions=offer is not None,
            )
            if isinstance(checked, Rejection):
                await self._drop_backend()
                return checked
            backend_ext = None
            if passthrough and checked.extensions is not None:
                parts = [p for p in checked.extensions.split(",") if p.strip()]
                if len(parts) != 1 or not _is_deflate(parts[0]):
                    await self._drop_backend()
                    return Rejection(
                        502,
                        f"backend answered extensions {checked.extensions!r}; only one "
                        "permessage-deflate can pass end to end",
                    )
            if ext is not None:
                fin = handshake.finalize_backend_deflate(ext, checked.extensions)
                if isinstance(fin, Rejection):
                    await self._drop_backend()
                    return fin
                backend_ext = fin
            return Upstream(answer, checked, backend_ext)
        return Upstream(answer)

    async def _drop_backend(self) -> None:
        if self._backend_stream is not None:
            if not close_now(self._backend_stream):
                await trio.aclose_forcefully(self._backend_stream)
            self._backend_stream = None

    async def _pass_response(self, h: h11.Connection, answer: UpstreamAnswer, deadline: float) -> None:
        """The backend answered with a normal HTTP response: give it to the client as is."""
        resp = answer.response
        assert isinstance(resp, h11.Response)
        self.outcome.status = resp.status_code
        self._metrics.handshake(str(self.listener.address), BACKEND_RESPONSE, resp.status_code)
        self.outcome.reason = "backend answered without upgrading"
        headers = handshake.passthrough_response_headers(resp)
        out = h11.Response(status_code=resp.status_code, headers=headers, reason=resp.reason)
        size = self.snapshot.config.limits.buffer_bytes
        with trio.move_on_after(max(0.0, deadline - trio.current_time())):
            try:
                await self.client_stream.send_all(h.send(out))
                while True:
                    event = answer.conn.next_event()
                    if event is h11.NEED_DATA:
                        data = await answer.stream.receive_some(size)
                        answer.conn.receive_data(data)
                        continue
                    if isinstance(event, h11.Data):
                        await self.client_stream.send_all(h.send(h11.Data(data=event.data)))
                        continue
                    if isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                        await self.client_stream.send_all(h.send(h11.EndOfMessage()))
                    break
            except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError) as exc:
                log.info(
                    "passing the backend's %d to %s stopped: %s", resp.status_code, _fmt_addr(self.client_addr), exc
                )

    # --- relay phase ---------------------------------------------------------------------------

    async def _open(self, h: h11.Connection, upgrade: ClientUpgrade, upstream: Upstream) -> tuple[bytes, bytes] | None:
        """Send the client its 101 and build the relay; the bytes each peer sent past its
        handshake go back to `_serve` for `_relay` (None: the client left)."""
        accepted, backend_ext, answer = upstream.accepted, upstream.extension, upstream.answer
        assert accepted is not None
        cfg = self.snapshot.config
        client_ext, client_answer = (None, None)
        if self.listener.relay == "passthrough":
            client_answer = accepted.extensions  # end to end: the backend answered the client's offer
        elif self.listener.deflate:
            client_ext, client_answer = handshake.negotiate_client_deflate(upgrade.extension_offers)
        reply = handshake.build_client_101(upgrade, accepted, extensions=client_answer)
        self.outcome.status = 101
        self.outcome.subprotocol = accepted.subprotocol
        try:
            await self.client_stream.send_all(h.send(reply))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.outcome.reason = "client left before the 101"
            self._metrics.handshake(str(self.listener.address), ABORTED, 0)
            return None
        listener = str(self.listener.address)
        self._metrics.handshake(listener, UPGRADED, 101)
        self._active = self._metrics.session_opened(listener, self.outcome.pool or "-", self.outcome.backend or "-")
        relay: Relay
        if self.listener.relay == "passthrough":
            relay = PassthroughRelay(deflate=client_answer is not None, max_message_bytes=cfg.limits.max_message_bytes)
        else:
            relay = InspectRelay(
                client_extensions=[client_ext] if client_ext else None,
                backend_extensions=[backend_ext] if backend_ext else None,
                max_message_bytes=cfg.limits.max_message_bytes,
                buffer_bytes=cfg.limits.buffer_bytes,
            )
        self.relay = relay
        self._start_schedule()
        self._flow = gate.flow_limiter(cfg, trio.current_time())
        return bytes(h.trailing_data[0]), answer.trailing

    async def _relay(self, client_trailing: bytes, backend_trailing: bytes) -> None:
        relay = self.relay
        assert relay is not None
        client_sock = raw_socket(self.client_stream)
        backend_sock = raw_socket(self._backend_stream) if self._backend_stream is not None else None
        if self._reactor is not None and self._reactor.running and client_sock and backend_sock:
            self._relay_on_reactor(self._reactor, client_sock, backend_sock, client_trailing, backend_trailing)
            return
        # The relay phase moves bytes on plain sockets without a scheduler trip per call (TLS
        # client streams arrive as streams.FastTLSStream already, from Server._handle).
        self._client_lock, self._backend_lock = trio.Lock(), trio.Lock()
        if isinstance(self.client_stream, trio.SocketStream):
            self.client_stream = FastSocketStream(self.client_stream)
        if isinstance(self._backend_stream, trio.SocketStream):
            self._backend_stream = FastSocketStream(self._backend_stream)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if client_trailing:
                relay.feed_client(client_trailing)
            if backend_trailing:
                relay.feed_backend(backend_trailing)
            await self._flush()
            assert self._backend_stream is not None
            nursery.start_soon(self._pump, self._backend_stream, relay.feed_backend, "backend")
            # the client pump runs in this task: one task fewer per session (most of an idle
            # session's memory is its tasks)
            await self._pump(self.client_stream, relay.feed_client, "client")

    def _relay_on_reactor(
        self,
        reactor: Reactor,
        client_sock: socket.socket,
        backend_sock: socket.socket,
        client_trailing: bytes,
        backend_trailing: bytes,
    ) -> None:
        """The relay phase on the shared readiness loop. The session's task ends after this; the
        link ends the session (`_link_ended`), so an idle session holds no task at all."""
        relay = self.relay
        assert relay is not None
        cfg = self.snapshot.config
        link = Link(
            reactor=reactor,
            relay=relay,
            client=client_sock,
            backend=backend_sock,
            timers=self._timers,
            metrics=self._metrics,
            receive_size=cfg.limits.buffer_bytes,
            close_timeout=cfg.timeouts.close,
            slow_consumer_timeout=cfg.limits.slow_consumer_timeout,
            on_pongs=self._own_pongs,
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
        self._edge.admission.counts[RATE_THROTTLED] += 1

    def _rate_close(self) -> None:
        """Over its message/byte rate for close_after: 1008 to the client, 1001 to the backend."""
        relay = self.relay
        assert relay is not None
        self._edge.admission.counts[RATE_CLOSED] += 1
        rl = self.snapshot.config.rate_limits
        log.warning(
            "client %s: over its message/byte rate for %gs: closing with 1008",
            _fmt_addr(self.client_addr),
            rl.close_after or 0,
        )
        relay.close(
            client_code=POLICY_VIOLATION,
            backend_code=GOING_AWAY,
            reason=f"client over its rate limit for {rl.close_after or 0:g}s",
        )

    async def _pump(self, stream: Stream, feed: Callable[[bytes], None], side: str) -> None:
        size = self.snapshot.config.limits.buffer_bytes
        relay = self.relay
        schedule = self._schedule
        assert relay is not None
        while not self._closed[side]:
            try:
                data = await stream.receive_some(size)
            except trio.ClosedResourceError:
                return  # we closed this side ourselves
            except trio.BrokenResourceError:
                data = b""
            sent_before = relay.stats.messages_to_backend
            if schedule is not None and data:
                schedule.saw_traffic(side, trio.current_time())
                self._consume(feed, data)
            else:
                feed(data)
            await self._flush()
            if relay.backlog(side):  # inflated input waits until the other peer took some
                self._metrics.backpressure_event("backend" if side == "client" else "client", BUFFER_FULL)
                while relay.backlog(side):
                    if schedule is not None:
                        self._consume(relay.resume, side)
                    else:
                        relay.resume(side)
                    await self._flush()
            if self._flow is not None and side == "client" and data and not relay.closing:
                await self._throttle(self._flow, len(data), relay.stats.messages_to_backend - sent_before)
            if not data:
                return

    async def _throttle(self, flow: FlowLimiter, nbytes: int, messages: int) -> None:
        """Charge a client read to its budget; over it, stop reading (backpressure) for as long as
        the budget needs, and close the client with 1008 once it has been over for close_after."""
        was_limited = flow.limited_since is not None
        flow.charge(trio.current_time(), messages=messages, nbytes=nbytes)
        if flow.limited_since is None:
            return
        if not was_limited:
            self._rate_throttled()
        if await gate.hold_back(flow):
            return
        self._rate_close()
        await self._flush()

    def _consume(self, step: Callable[[Any], None], arg: Any) -> None:
        """Run one relay step and tell the schedule what it carried (data, our pongs)."""
        relay, schedule = self.relay, self._schedule
        assert relay is not None and schedule is not None
        now = trio.current_time()
        frames = relay.stats.data_frames
        step(arg)
        if relay.stats.data_frames != frames:
            schedule.saw_data(now)
        pongs = relay.take_pongs()
        if pongs:
            self._own_pongs(pongs, now)

    def _own_pongs(self, pongs: list[tuple[str, bytes]], now: float) -> None:
        """Pongs that answered the proxy's pings: the round trips they measured."""
        schedule = self._schedule
        assert schedule is not None
        for leg, payload in pongs:
            rtt = schedule.saw_own_pong(leg, payload, now)
            if rtt is not None:
                self._metrics.rtt(leg, rtt)

    async def _flush(self) -> None:
        """Send what the relay queued, close finished sides, arm the close timeout."""
        relay = self.relay
        assert relay is not None and self._nursery is not None
        assert self._client_lock is not None and self._backend_lock is not None
        while True:
            sent_c = await self._send("client", self.client_stream, self._client_lock, relay.take_for_client)
            assert self._backend_stream is not None
            sent_b = await self._send("backend", self._backend_stream, self._backend_lock, relay.take_for_backend)
            if not (sent_c or sent_b):
                break
        if relay.closing and not self._close_armed:
            self._close_armed = True
            scope = self._nursery.cancel_scope
            scope.deadline = min(scope.deadline, trio.current_time() + self.snapshot.config.timeouts.close)
        if relay.client_done:
            await self._close_side("client", self.client_stream, self._client_lock)
        if relay.backend_done and self._backend_stream is not None:
            await self._close_side("backend", self._backend_stream, self._backend_lock)
        if relay.client_done and relay.backend_done:
            self._nursery.cancel_scope.cancel()

    async def _send(self, side: str, stream: Stream, lock: trio.Lock, take: Callable[[], bytes]) -> bool:
        """Send pending bytes for one side; True if a broken peer changed what is pending.

        The hot path: most calls find nothing to send for one of the two sides, and most of the
        rest find the side's lock free, so neither costs a trip through the scheduler. Bytes are
        taken before the lock is awaited; trio's Lock is FIFO, so sends still go out in the order
        their bytes were taken, and the pump and a proxy-originated close never interleave.
        """
        data = take()
        if not data or self._closed[side]:
            return False
        try:
            lock.acquire_nowait()
        except trio.WouldBlock:
            await lock.acquire()
        try:
            if self._closed[side]:
                return False
            assert self.relay is not None
            limit = self.snapshot.config.limits.slow_consumer_timeout
            began = trio.current_time()
            try:
                if limit is None:
                    await stream.send_all(data)
                    return self._sent(side, began)
                with trio.move_on_after(limit):
                    await stream.send_all(data)
                    return self._sent(side, began)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                feed = self.relay.feed_client if side == "client" else self.relay.feed_backend
                feed(b"")  # the peer is gone: the relay decides what the other side hears
                self._closed[side] = True
                return True
            # The peer took nothing for `limit` seconds while data waited. Its socket is mid-frame
            # now, so no close frame can follow: drop it, and tell the other peer why.
            log.warning("%s %s accepted nothing for %gs: closing it", side, self._peer_name(side), limit)
            self._metrics.backpressure_event(side, SLOW_CONSUMER_CLOSED)
            self.relay.abandon(side, other_code=GOING_AWAY, reason=f"{side} too slow: nothing accepted for {limit:g}s")
            self._closed[side] = True
            await trio.aclose_forcefully(stream)
            return True
        finally:
            lock.release()

    def _sent(self, side: str, began: float) -> bool:
        """A send completed: count it as a stall if it waited for the peer's window (False: the
        send changed nothing the caller must re-check)."""
        if trio.current_time() - began >= SEND_STALL_SECONDS:
            self._metrics.backpressure_event(side, SEND_STALLED)
        return False

    async def _close_side(self, side: str, stream: Stream, lock: trio.Lock) -> None:
        if self._closed[side]:
            return
        async with lock:
            if self._closed[side]:
                return
            self._closed[side] = True
            with trio.move_on_after(self.snapshot.config.timeouts.close):
                await stream.aclose()

    # --- heartbeats and deadlines ---------------------------------------------------------------

    def _start_schedule(self) -> None:
        cfg = self.snapshot.config
        lifetime = None
        if cfg.timeouts.max_lifetime is not None:
            lifetime = heartbeat.lifetime_with_jitter(
                cfg.timeouts.max_lifetime, cfg.timeouts.max_lifetime_jitter, random.random()
            )
        legs = cfg.heartbeat.leg_names
        if not legs and cfg.timeouts.idle is None and lifetime is None:
            return  # nothing to time: no schedule, no timer entries
        self._schedule = Schedule(
            trio.current_time(),
            interval=cfg.heartbeat.interval if legs else None,
            timeout=cfg.heartbeat.timeout,
            legs=legs,
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
        relay, schedule, nursery, link = self.relay, self._schedule, self._nursery, self._link
        if relay is None or schedule is None or (nursery is None and link is None):
            return
        if link is not None and link.done:
            return  # the session has ended (its timer entry was cancelled; this is a late call)
        if relay.client_done and relay.backend_done:
            return
        for leg in ("client", "backend"):
            if relay.ping_waiting(leg):
                schedule.ping_held(leg, now)
        acted = False
        for action in schedule.due(now):
            acted = True
            if isinstance(action, SendPing):
                if relay.send_ping(action.leg, action.payload):
                    self._metrics.ping_sent(action.leg)
            elif isinstance(action, PeerDead):
                self._metrics.dead_peer(action.leg)
                log.warning(
                    "%s %s: no answer to our ping, silent for %.1fs: closing",
                    action.leg,
                    self._peer_name(action.leg),
                    action.silent_for,
                )
                other = GOING_AWAY if action.leg == "client" else INTERNAL_ERROR
                relay.abandon(action.leg, other_code=other, reason=f"{action.leg} did not answer the proxy's ping")
            elif isinstance(action, Expired):
                reason = "idle timeout" if action.what == "idle" else "maximum session lifetime reached"
                log.info("session from %s: %s", _fmt_addr(self.client_addr), reason)
                relay.close(client_code=GOING_AWAY, backend_code=GOING_AWAY, reason=reason)
        if acted:
            if link is not None:
                link.settle()
                if link.done:
                    return
            else:
                assert nursery is not None
                with contextlib.suppress(RuntimeError):  # the relay phase may have just ended
                    nursery.start_soon(self._flush)
        if not relay.closing:
            self._arm_timer()

    def _peer_name(self, side: str) -> str:
        return _fmt_addr(self.client_addr) if side == "client" else (self.outcome.backend or "?")

    # --- log -----------------------------------------------------------------------------------

    def _finish(self) -> None:
        """The session ended: its metrics and its one log line, from one record."""
        record = self._record()
        if self.outcome.status == 0:  # no answer reached the client (it left, or shutdown cut it)
            self._metrics.handshake(record.listener, ABORTED, 0)
        self._metrics.session_closed(self._active, record)
        self._active = None
        if self.outcome.status != 0:
            session_log.emit(record)

    def _record(self) -> session_log.SessionRecord:
        o = self.outcome
        r = session_log.SessionRecord(
            client=_fmt_addr(self.client_addr),
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
            r.rtt_client, r.rtt_backend = self._schedule.rtt("client"), self._schedule.rtt("backend")
        return r


def _unavailable(pool: Pool) -> Rejection:
    """No backend to try (all down or ejected): 503 at once, saying when to come back."""
    after = health.retry_after((b.health for b in pool.backends), trio.current_time())
    return Rejection(
        503,
        f"no backend available in pool {pool.name} (all down or ejected)",
        headers=((b"Retry-After", str(after).encode()),),
    )


def _is_deflate(offer: str) -> bool:
    return offer.split(";", 1)[0].strip().lower() == "permessage-deflate"


def _offers_deflate(upgrade: ClientUpgrade) -> bool:
    return any(_is_deflate(o) for o in upgrade.extension_offers)


def _fmt_addr(addr: tuple[str, int]) -> str:
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def peer_address(stream: Stream) -> tuple[str, int]:
    """The client's address from a plain or TLS stream."""
    inner = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
    assert isinstance(inner, trio.SocketStream)
    try:
        addr = inner.socket.getpeername()
    except OSError:
        return ("?", 0)
    return (addr[0], addr[1]) if isinstance(addr, tuple) else (str(addr), 0)
