"""A session's handshake phase: from the client's request to its 101 (or another answer).

Reads the client's request (h11, bounded in size and time), asks handshake.py whether it is a
valid Upgrade, runs admission (rate per IP, caps, origins, auth), routes it to a pool, walks the
balancer's candidates (connect + upstream handshake, retrying the next candidate while nothing
has been sent to the client, a failure counting against the backend's health), passes a
backend's ordinary HTTP answer to the client as it is, or answers 101 and builds the relay for
the extensions both hops negotiated. Plain HTTP requests on a listener with `http: proxy` go to
http_proxy.py, which answers them (and those after them on the connection) and hands back an
Upgrade that follows; the affinity cookie (sticky.py) puts its backend first among the
candidates and is set in the 101 when another backend answered. What must outlive the phase (the session's ticket in the
caps, the backend's lease, the backend's socket) is handed to the session as soon as it is
taken, so a session cut in the middle still releases it; the rest (h11 connections, the
request, the balancer's iterator) ends with the phase. Every wait has a deadline from the config.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import h11
import trio
from wsproto.extensions import PerMessageDeflate

from wsproxy.observe import session_log
from wsproxy.observe.metrics import ABORTED, BACKEND_RESPONSE, REJECTED, UPGRADED
from wsproxy.policy import routing, sticky
from wsproxy.policy.balancing import Backend, Pool
from wsproxy.policy.balancing.base import Lease
from wsproxy.protocol import handshake, http1, http_head, proxy_protocol
from wsproxy.protocol.forwarding import resolve_client
from wsproxy.protocol.handshake import ClientUpgrade, Rejection, phrase
from wsproxy.protocol.relay import Relay
from wsproxy.protocol.relay_inspect import InspectRelay
from wsproxy.protocol.relay_passthrough import PassthroughRelay
from wsproxy.runtime import gate, tls_handshake
from wsproxy.runtime.backend_tls import open_stream
from wsproxy.runtime.credentials import Credentials
from wsproxy.runtime.http_proxy import HttpConnection
from wsproxy.runtime.streams import format_address
from wsproxy.runtime.upstream import LocalResourceError, UpstreamAnswer, UpstreamError, request_upgrade

if TYPE_CHECKING:
    from wsproxy.runtime.session import Session

log = logging.getLogger("wsproxy.session")


@dataclass(slots=True)
class Upstream:
    """A backend that answered: its 101 (checked) and this hop's negotiated extension."""

    answer: UpstreamAnswer
    accepted: handshake.BackendAccept | None = None  # None: a normal HTTP response, not a 101
    extension: PerMessageDeflate | None = None  # inspect: this hop's negotiated deflate


@dataclass(slots=True)
class Upgraded:
    """The client has its 101: the relay to run and what each peer sent past its handshake."""

    relay: Relay
    client_trailing: bytes
    backend_trailing: bytes
    upgrade: ClientUpgrade  # the client's request, as admitted
    credentials: Credentials | None = None  # the auth answer's expiry, if it had one


class HandshakePhase:
    """One session's handshake phase (see the module); `run` it once."""

    __slots__ = ("_credentials", "_session", "_upstream_headers")

    def __init__(self, session: Session) -> None:
        self._session = session
        self._upstream_headers: tuple[tuple[bytes, bytes], ...] = ()  # from the auth service
        self._credentials: Credentials | None = None  # the auth answer's expiry, if it had one

    async def run(self) -> Upgraded | None:
        """Both handshakes; once the client has its 101, the relay and the bytes each peer sent
        past its handshake; None: the client got another answer, or left."""
        cfg = self._session.snapshot.config
        h = h11.Connection(h11.SERVER, max_incomplete_event_size=cfg.limits.max_header_bytes)
        secured = False  # one deadline covers the TLS handshake and the request head (tls_handshake.py)
        with trio.move_on_after(cfg.timeouts.handshake) as waited:
            secured = await self._finish_tls()
            got = await self._read_request(h) if secured else None
        if waited.cancelled_caught and not secured:
            self._session.outcome.reason = f"TLS handshake not complete within {cfg.timeouts.handshake:g}s"
            log.info("client %s: %s: closed", format_address(self._session.client_addr), self._session.outcome.reason)
            return None
        if waited.cancelled_caught:
            await self._reject(Rejection(408, f"request headers not complete within {cfg.timeouts.handshake:g}s"))
            return None
        if got is None:
            return None  # the client left (or TLS failed) before sending a request
        session = self._session
        if isinstance(got, h11.Request):
            self._resolve_client(got)
        # Every request counts against its address's handshake rate, well-formed or not.
        limited = await gate.check_handshake(session.edge, cfg, session.client_addr[0], trio.current_time())
        if limited is not None:
            await self._reject(limited)
            return None
        if isinstance(got, Rejection):
            await self._reject(got)
            return None
        if session.listener.http == "proxy" and not handshake.is_upgrade(got):
            upgrade = await self._serve_http(h, got)  # plain HTTP requests; an Upgrade among them comes back
            if upgrade is None:
                return None
            got = upgrade
            self._resolve_client(got)  # (its handshake rate was counted by http_proxy.py)
        session.outcome.path = session_log.shown_target(got.target, cfg.log.query)  # as sent, until normalised
        checked = handshake.validate_client_request(got)
        if isinstance(checked, Rejection):
            await self._reject(checked)
            return None
        session.outcome.path = session_log.shown_target(checked.target, cfg.log.query)
        admitted = await gate.admit(
            self._session.edge,
            config=cfg,
            pools=self._session.snapshot.pools,
            listener=self._session.listener,
            upgrade=checked,
            client_ip=self._session.client_addr[0],
        )
        if isinstance(admitted, Rejection):
            await self._reject(admitted)
            return None
        self._session.ticket, self._upstream_headers = admitted.ticket, admitted.upstream_headers
        self._credentials = admitted.credentials
        return await self._connect_backend(h, admitted.upgrade)

    def _resolve_client(self, request: h11.Request) -> None:
        """The one place the session's client address may change: who the peer speaks for
        (forwarding.py, for the listener's trusted_proxies)."""
        session = self._session
        session.origin = resolve_client(session.origin.peer, request.headers, session.listener.trusted_proxies)
        session.client_addr = (session.origin.client, session.client_addr[1])

    async def _finish_tls(self) -> bool:
        try:
            await tls_handshake.finish(self._session.client_stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.info("client %s: TLS handshake failed: %s", format_address(self._session.client_addr), exc)
            return False
        return True

    async def _read_request(self, h: h11.Connection) -> h11.Request | Rejection | None:
        """The client's next request head (an Upgrade: the whole request), or why it is refused;
        None: the client left. On `http: proxy` a plain request returns at its head (http_proxy.py
        streams its body); http_proxy.py reads its next requests with this too."""
        request: h11.Request | None = None
        size = self._session.snapshot.config.limits.buffer_bytes
        while True:
            try:
                event = h.next_event()
            except h11.RemoteProtocolError as exc:
                return Rejection(http1.error_status(exc), f"malformed request: {exc}")
            if event is h11.NEED_DATA:
                try:
                    data = await self._session.client_stream.receive_some(size)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    client = format_address(self._session.client_addr)
                    log.info("client %s: connection failed before a request: %s", client, exc)
                    return None
                h.receive_data(data)
                if not data and request is None and h.their_state is h11.IDLE:
                    return None
                continue
            if isinstance(event, h11.Request):
                # h11 bounds only a head still incomplete; one that arrived whole is measured here.
                limit = self._session.snapshot.config.limits.max_header_bytes
                if handshake.head_size(event) > limit:
                    return Rejection(431, f"request head over {limit} bytes")
                request = event
                if self._session.listener.http == "proxy" and not handshake.is_upgrade(event):
                    return event  # a plain request: http_proxy.py streams its body
                continue
            if isinstance(event, h11.Data):
                return Rejection(400, "an Upgrade request must not carry a body")
            if isinstance(event, h11.EndOfMessage) and request is not None:
                return request
            if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                return request
            return Rejection(400, f"unexpected {type(event).__name__}")

    async def _reject(self, rejection: Rejection) -> None:
        self._session.outcome.status = rejection.status
        self._session.metrics.handshake(str(self._session.listener.address), REJECTED, rejection.status)
        self._session.outcome.reason = rejection.reason
        log.log(
            logging.DEBUG if rejection.quiet else logging.WARNING,  # quiet: the storm shield logs in aggregate
            "client %s: %d %s (path %s)",
            format_address(self._session.client_addr),
            rejection.status,
            rejection.reason,
            self._session.outcome.path or "-",
        )
        with trio.move_on_after(self._session.snapshot.config.timeouts.close):
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await self._session.client_stream.send_all(rejection.to_bytes())

    async def _connect_backend(self, h: h11.Connection, upgrade: ClientUpgrade) -> Upgraded | None:
        cfg = self._session.snapshot.config
        pool_name = routing.select_pool(self._session.listener, upgrade.host, upgrade.path)
        if pool_name is None:
            await self._reject(
                Rejection(404, f"no route for host {upgrade.host.decode('latin-1')} path {upgrade.path}")
            )
            return None
        pool = self._session.snapshot.pools[pool_name]
        self._session.outcome.pool = pool_name
        key: bytes | None = None
        if pool.config.hash_key is not None:
            key = routing.extract_hash_key(pool.config.hash_key, upgrade, self._session.client_addr[0])
            if key is None and pool.config.hash_fallback == "reject":
                await self._reject(Rejection(400, f"request has no {pool.config.hash_key} to choose a backend by"))
                return None
        if not pool.backends:
            await self._reject(Rejection(503, f"pool {pool_name} has no backends"))
            return None
        deadline = trio.current_time() + cfg.timeouts.handshake
        last: Rejection | None = None
        # Only backends healthy now (not down, not ejected), at their slow-start weights; the
        # affinity cookie's backend first while it is one of them.
        pinned = self._pinned(pool, upgrade)
        candidates = sticky.candidates(pinned, pool.candidates(key, trio.current_time()))
        for backend in itertools.islice(candidates, 1 + pool.config.retries):
            self._session.outcome.attempts += 1
            if self._session.outcome.attempts > 1:
                self._session.metrics.retry(pool_name)
            self._session.outcome.backend = backend.name
            lease: Lease | None = pool.acquire(backend)
            try:
                began = trio.current_time()
                try:
                    result = await self._try_backend(backend, pool, upgrade, deadline)
                except LocalResourceError as exc:  # the proxy's own shortage: 503, the backend not blamed
                    await self._reject(gate.local_shortage(self._session.edge, exc))
                    return None
                if not isinstance(result, Rejection):  # connect + upgrade, to a 101 or another answer
                    self._session.metrics.backend_handshake(pool_name, backend.name, trio.current_time() - began)
                if isinstance(result, Rejection):
                    log.warning("backend %s (pool %s): %s", backend.name, pool_name, result.reason)
                    self._session.metrics.upstream_failure(pool_name, backend.name, result.status)
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
                self._session.backend = backend
                self._session.lease, lease = lease, None  # the count lasts as long as the session
                self._set_cookie(pool, backend, pinned)
                return await self._open(h, upgrade, result)
            finally:
                if lease is not None:
                    lease.release()
        await self._reject(last if last is not None else gate.unavailable(pool, trio.current_time()))
        return None

    async def _try_backend(
        self, backend: Backend, pool: Pool, upgrade: ClientUpgrade, deadline: float
    ) -> Upstream | Rejection:
        cfg = self._session.snapshot.config
        remaining = deadline - trio.current_time()
        if remaining <= 0:
            return Rejection(504, "handshake deadline passed before trying this backend")
        try:
            tls = self._session.backend_tls.target(pool.config, backend.config)
            stream = await open_stream(backend.address, tls=tls, timeout=min(cfg.timeouts.connect, remaining))
        except UpstreamError as exc:
            return Rejection(502, exc.reason)
        self._session.backend_stream = stream
        local_addr = self._session.local_addr
        if pool.config.send_proxy_protocol is not None and local_addr is not None:
            header = proxy_protocol.build(pool.config.send_proxy_protocol, self._session.client_addr, local_addr)
            try:
                await stream.send_all(header)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                await self._drop_backend()
                return Rejection(502, f"{backend.name}: connection failed: {exc}")
        key = handshake.new_key()
        offer = None
        ext = None
        passthrough = self._session.listener.relay == "passthrough"
        if self._session.listener.deflate and _offers_deflate(upgrade):
            if passthrough:  # end to end: the backend answers the client's own offer
                offer = ", ".join(o for o in upgrade.extension_offers if _is_deflate(o))
            else:
                ext, offer = handshake.backend_deflate_offer()
        request = handshake.build_upstream_request(
            upgrade,
            key=key,
            origin=self._session.origin,
            scheme="https" if self._session.listener.tls else "http",
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
        response = answer.response
        if isinstance(response, http_head.Switching | h11.InformationalResponse):  # a 101 (Switching first: no ABC)
            checked = handshake.check_backend_101(
                response,
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

    # --- plain HTTP requests and affinity (http_proxy.py, sticky.py) ---------------------------

    async def _serve_http(self, h: h11.Connection, request: h11.Request) -> h11.Request | None:
        """Hand plain HTTP requests to http_proxy.py; an Upgrade that follows comes back."""
        session = self._session
        http = HttpConnection(
            stream=session.client_stream,
            h=h,
            peer=session.origin.peer,
            client_port=session.client_addr[1],
            local_addr=session.local_addr,
            listener=session.listener,
            snapshot=session.snapshot,
            metrics=session.metrics,
            edge=session.edge,
            backend_tls=session.backend_tls,
            idle=session.idle,
            read_request=self._read_request,
            current=session.current_snapshot,
        )
        session.http = http  # a drain lets its request in flight finish (Session.go_away)
        try:
            return await http.serve(request)
        finally:
            session.http = None
            session.outcome.http_requests = http.requests

    def _pinned(self, pool: Pool, upgrade: ClientUpgrade) -> Backend | None:
        """The backend the request's affinity cookie names, while it can take sessions."""
        spec = pool.config.sticky
        if spec is None:
            return None
        secret = self._session.snapshot.sticky_secret(pool.name)
        value = sticky.cookie_value(upgrade, spec.cookie)
        return sticky.pinned(secret, pool.name, pool.backends, value, trio.current_time())[0]

    def _set_cookie(self, pool: Pool, backend: Backend, pinned: Backend | None) -> None:
        """The 101 sets the cookie when the answering backend is not the one it already named."""
        spec = pool.config.sticky
        if spec is not None and backend is not pinned:
            value = sticky.backend_id(self._session.snapshot.sticky_secret(pool.name), pool.name, backend)
            tls = self._session.listener.tls is not None
            self._session.outcome.cookie = sticky.set_cookie(spec, value, client_tls=tls)

    async def _drop_backend(self) -> None:
        if self._session.backend_stream is not None:
            self._session.backend_stream.close_now()
            self._session.backend_stream = None
        await trio.lowlevel.checkpoint()

    async def _pass_response(self, h: h11.Connection, answer: UpstreamAnswer, deadline: float) -> None:
        """The backend answered with a normal HTTP response: give it to the client as is."""
        resp = answer.response
        assert isinstance(resp, h11.Response) and answer.conn is not None
        self._session.outcome.status = resp.status_code
        self._session.metrics.handshake(str(self._session.listener.address), BACKEND_RESPONSE, resp.status_code)
        self._session.outcome.reason = "backend answered without upgrading"
        headers = handshake.passthrough_response_headers(resp)
        reason = resp.reason or phrase(resp.status_code)
        out = h11.Response(status_code=resp.status_code, headers=headers, reason=reason)
        size = self._session.snapshot.config.limits.buffer_bytes
        with trio.move_on_after(max(0.0, deadline - trio.current_time())):
            try:
                await self._session.client_stream.send_all(h.send(out))
                while True:
                    event = answer.conn.next_event()
                    if event is h11.NEED_DATA:
                        data = await answer.stream.receive_some(size)
                        answer.conn.receive_data(data)
                        continue
                    if isinstance(event, h11.Data):
                        await self._session.client_stream.send_all(h.send(h11.Data(data=event.data)))
                        continue
                    if isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                        await self._session.client_stream.send_all(h.send(h11.EndOfMessage()))
                    break
            except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError) as exc:
                client = format_address(self._session.client_addr)
                log.info("passing the backend's %d to %s stopped: %s", resp.status_code, client, exc)

    async def _open(self, h: h11.Connection, upgrade: ClientUpgrade, upstream: Upstream) -> Upgraded | None:
        """Send the client its 101 and build the relay for the hops' negotiated extensions
        (None: the client left)."""
        accepted, backend_ext, answer = upstream.accepted, upstream.extension, upstream.answer
        assert accepted is not None
        cfg = self._session.snapshot.config
        client_ext, client_answer = (None, None)
        if self._session.listener.relay == "passthrough":
            client_answer = accepted.extensions  # end to end: the backend answered the client's offer
        elif self._session.listener.deflate:
            client_ext, client_answer = handshake.negotiate_client_deflate(upgrade.extension_offers)
        if self._session.outcome.cookie is not None:
            cookie = (b"Set-Cookie", self._session.outcome.cookie)
            accepted = replace(accepted, passthrough_headers=(*accepted.passthrough_headers, cookie))
        reply = handshake.build_client_101(upgrade, accepted, extensions=client_answer)
        self._session.outcome.status = 101
        self._session.outcome.subprotocol = accepted.subprotocol
        try:
            await self._session.client_stream.send_all(
                http_head.encode_response(101, reply.reason, reply.headers.raw_items())
            )
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._session.outcome.reason = "client left before the 101"
            self._session.metrics.handshake(str(self._session.listener.address), ABORTED, 0)
            return None
        self._session.metrics.handshake(str(self._session.listener.address), UPGRADED, 101)
        relay: Relay
        if self._session.listener.relay == "passthrough":
            relay = PassthroughRelay(deflate=client_answer is not None, max_message_bytes=cfg.limits.max_message_bytes)
        else:
            relay = InspectRelay(
                client_extensions=[client_ext] if client_ext else None,
                backend_extensions=[backend_ext] if backend_ext else None,
                max_message_bytes=cfg.limits.max_message_bytes,
                buffer_bytes=cfg.limits.buffer_bytes,
            )
        return Upgraded(relay, bytes(h.trailing_data[0]), answer.trailing, upgrade, self._credentials)


def _is_deflate(offer: str) -> bool:
    return offer.split(";", 1)[0].strip().lower() == "permessage-deflate"


def _offers_deflate(upgrade: ClientUpgrade) -> bool:
    return any(_is_deflate(o) for o in upgrade.extension_offers)
