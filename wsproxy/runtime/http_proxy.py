"""Plain HTTP/1.1 requests on a WebSocket listener (`listeners[].http: proxy`), one client
connection at a time: the requests are answered in order (h11 reads a pipelined request only
after the previous response ended), each routed, checked and balanced exactly as an Upgrade is
(the target normalised by target.py first, so no spelling of a path slips past its route; the
client behind `trusted_proxies` resolved per request by forwarding.py, since a trusted proxy may
send several clients' requests over one connection; routing, origins, auth and the per-IP rules
through gate.admit; the pool's candidates with the affinity cookie first; the same forwarding
headers), sent over a kept-alive backend connection from the idle pool (http_pool.py) or a new
one (TLS when the pool says so), and the bodies streamed both ways one read at a time, so a slow
reader stops the reads on the other side.

Failures map as for Upgrades: a backend that cannot be reached counts against its health and
another is tried only for an idempotent request whose body has not started; otherwise the client
gets 502 (no answer, a broken answer) or 504 (no answer within `timeouts.http_response`). Each
request, a refused one too, ends with one `http` log line (its query shown as `log.query` says)
and its own metrics (observe/http_log.py). The proxy's own 5xx answers carry the status only
(handshake.Rejection): a backend's name or address stays in the log. An Upgrade arriving on the
same connection is handed back to the session (`serve` returns it). A drain (`go_away`) lets the
request in flight finish, its response marked Connection: close, and reads no next request.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Awaitable, Callable

import h11
import trio

from wsproxy.config import ListenerConfig
from wsproxy.observe import http_log, session_log
from wsproxy.observe.http_log import HttpRecord
from wsproxy.observe.metrics import Metrics
from wsproxy.policy import routing, sticky
from wsproxy.policy.balancing import Backend, Pool
from wsproxy.policy.snapshot import Snapshot
from wsproxy.protocol import handshake, http1, proxy_protocol
from wsproxy.protocol.forwarding import Origin, resolve_client
from wsproxy.protocol.handshake import ClientUpgrade, Rejection
from wsproxy.runtime import gate
from wsproxy.runtime.backend_tls import BackendContexts, BackendStream, open_stream
from wsproxy.runtime.http_pool import IdleConnections
from wsproxy.runtime.streams import format_address
from wsproxy.runtime.upstream import LocalResourceError, UpstreamError, response_head_size

log = logging.getLogger("wsproxy.http")

ReadRequest = Callable[[h11.Connection], Awaitable[h11.Request | Rejection | None]]


class ClientGone(Exception):
    """The client's connection broke or stalled: nothing more can be said to it."""


class Refused(Exception):
    """The request ends with this answer from the proxy (its body may be half read: close)."""

    def __init__(self, rejection: Rejection) -> None:
        super().__init__(rejection.reason)
        self.rejection = rejection


class BackendFailed(Exception):
    """This backend did not give a usable answer; `retry`: another one may be tried; `counts`:
    against its health (not for a kept-alive connection it had closed meanwhile)."""

    def __init__(self, rejection: Rejection, *, retry: bool, counts: bool = True) -> None:
        super().__init__(rejection.reason)
        self.rejection = rejection
        self.retry = retry
        self.counts = counts


class HttpConnection:
    """The plain HTTP requests of one client connection."""

    def __init__(
        self,
        *,
        stream: trio.abc.Stream,
        h: h11.Connection,
        peer: str,
        client_port: int,
        local_addr: tuple[str, int] | None,
        listener: ListenerConfig,
        snapshot: Snapshot,
        metrics: Metrics,
        edge: gate.Edge,
        backend_tls: BackendContexts,
        idle: IdleConnections,
        read_request: ReadRequest,
        current: Callable[[], Snapshot] | None = None,
    ) -> None:
        self.stream = stream
        self.h = h
        self.origin = Origin.direct(peer)  # who the current request is from (resolved per request)
        self.client_port = client_port
        self.local_addr = local_addr
        self.listener = listener
        self.snapshot = snapshot
        self.metrics = metrics
        self.edge = edge
        self.backend_tls = backend_tls
        self.idle = idle
        self.read_request = read_request
        self.current = current  # the server's snapshot now: a reload ends the keep-alive between requests
        self.requests = 0  # answered on this connection
        self.draining = False  # go_away: the request in flight finishes, no next one is read
        self._waiting: trio.CancelScope | None = None  # the wait for the next request, while it lasts
        self._client_eof = False  # the client's last read was the end of its stream

    @property
    def client_addr(self) -> tuple[str, int]:
        """The current request's client (behind a trusted proxy: the one it speaks for)."""
        return (self.origin.client, self.client_port)

    @property
    def _client(self) -> str:
        return format_address(self.client_addr)

    def go_away(self) -> None:
        """A drain (shutdown, binary upgrade): the request in flight is answered (with
        Connection: close if its response has not started) and nothing more is read; a
        connection waiting for its next request closes now."""
        self.draining = True
        if self._waiting is not None:
            self._waiting.cancel()

    def _resolve(self, request: h11.Request) -> None:
        self.origin = resolve_client(self.origin.peer, request.headers, self.listener.trusted_proxies)

    async def serve(self, first: h11.Request) -> h11.Request | None:
        """Answer `first` and the requests after it; an Upgrade among them is returned for the
        session to handle (None: the connection is done)."""
        cfg = self.snapshot.config
        request = first
        self._resolve(first)
        while True:
            if not await self._exchange(request):
                return None
            h = self.h
            if h.our_state is not h11.DONE or h.their_state is not h11.DONE:
                return None  # Connection: close, HTTP/1.0, or a body left unread
            if self.draining or (self.current is not None and self.current() is not self.snapshot):
                return None  # draining, or reloaded: a next request comes on a new connection
            h.start_next_cycle()
            got: h11.Request | Rejection | None = None
            with trio.move_on_after(cfg.timeouts.http_idle) as self._waiting:
                got = await self.read_request(h)
            self._waiting = None
            if got is None:
                return None  # idle past timeouts.http_idle, the client closed, or a drain
            if isinstance(got, h11.Request):
                self._resolve(got)
            limited = await gate.check_handshake(self.edge, cfg, self.client_addr[0], trio.current_time())
            if isinstance(got, Rejection) or limited is not None:  # answered, logged and counted, then closed
                refusal = got if isinstance(got, Rejection) else limited
                await self._exchange(got if isinstance(got, h11.Request) else None, refused=refusal)
                return None
            if self.draining:  # the drain came while the request was admitted: it is not served
                return None
            if handshake.is_upgrade(got):
                return got
            request = got

    # --- one request ---------------------------------------------------------------------------

    async def _exchange(self, req: h11.Request | None, *, refused: Rejection | None = None) -> bool:
        """One request and its response, its log line and metrics; True: the connection goes on.
        `refused`: the proxy's answer, decided as the head came in (`req` None: unreadable)."""
        self.requests += 1
        method = req.method.decode("latin-1") if req is not None else "-"
        query = self.snapshot.config.log.query  # the target as sent, until normalised
        shown = session_log.shown_target(req.target, query) if req is not None else "-"
        rec = HttpRecord(client=self._client, listener=str(self.listener.address), method=method, path=shown)
        started = trio.current_time()
        keep = False
        try:
            try:
                if refused is not None:
                    keep = await self._refuse(refused, rec, close=True)
                else:
                    assert req is not None
                    keep = await self._answer(req, rec)
            except Refused as exc:
                keep = await self._refuse(exc.rejection, rec)
        except ClientGone as exc:
            rec.error = rec.error or str(exc)
        except h11.LocalProtocolError as exc:  # a response h11 cannot frame for this request
            rec.error = f"cannot pass the response on: {exc}"
            log.warning("client %s: %s", self._client, rec.error)
        finally:
            rec.duration = trio.current_time() - started
            self.metrics.http_request(rec, http_log.method_label(method))
            http_log.emit(rec)
        return keep

    async def _answer(self, req: h11.Request, rec: HttpRecord) -> bool:
        cfg = self.snapshot.config
        checked = http1.plain_request(req)
        if isinstance(checked, Rejection):  # framing or a target we do not trust: nothing after it is read
            return await self._refuse(checked, rec, close=True)
        rec.path = session_log.shown_target(checked.target, cfg.log.query)
        admitted = await gate.admit(
            self.edge,
            config=cfg,
            pools=self.snapshot.pools,
            listener=self.listener,
            upgrade=checked,
            client_ip=self.client_addr[0],
        )
        if isinstance(admitted, Rejection):
            return await self._refuse(admitted, rec)
        try:
            return await self._balance(admitted.upgrade, admitted.pool, admitted.upstream_headers, rec)
        finally:
            admitted.ticket.release()

    async def _balance(
        self, request: ClientUpgrade, pool_name: str, extra: tuple[tuple[bytes, bytes], ...], rec: HttpRecord
    ) -> bool:
        cfg = self.snapshot.config
        pool = self.snapshot.pools[pool_name]
        rec.pool = pool_name
        refusal = http1.too_large(request, cfg.limits.max_body_bytes)
        key: bytes | None = None
        if refusal is None and pool.config.hash_key is not None:
            key = routing.extract_hash_key(pool.config.hash_key, request, self.client_addr[0])
            if key is None and pool.config.hash_fallback == "reject":
                refusal = Rejection(400, f"request has no {pool.config.hash_key} to choose a backend by")
        if refusal is None and not pool.backends:
            refusal = Rejection(503, f"pool {pool_name} has no backends")
        if refusal is not None:
            return await self._refuse(refusal, rec)
        now = trio.current_time()
        pinned: Backend | None = None
        spec, secret = pool.config.sticky, self.snapshot.sticky_secret(pool_name)
        if spec is not None:
            pinned, _ = sticky.pinned(secret, pool_name, pool.backends, sticky.cookie_value(request, spec.cookie), now)
        last: Rejection | None = None
        for backend in itertools.islice(sticky.candidates(pinned, pool.candidates(key, now)), 1 + pool.config.retries):
            rec.attempts += 1
            rec.backend = backend.name
            if rec.attempts > 1:
                self.metrics.retry(pool_name)
            cookie = None
            if spec is not None and backend is not pinned:
                value = sticky.backend_id(secret, pool_name, backend)
                cookie = sticky.set_cookie(spec, value, client_tls=self.listener.tls is not None)
            lease = pool.acquire(backend)
            try:
                return await self._forward(backend, pool, request, extra, rec, cookie)
            except BackendFailed as failed:
                if failed.counts:
                    self._count_failure(backend, pool, failed.rejection)
                last = failed.rejection
                if not failed.retry:
                    break
            finally:
                lease.release()
        return await self._refuse(last if last is not None else gate.unavailable(pool, trio.current_time()), rec)

    def _count_failure(self, backend: Backend, pool: Pool, rejection: Rejection) -> None:
        log.warning("backend %s (pool %s): %s", backend.name, pool.name, rejection.reason)
        self.metrics.upstream_failure(pool.name, backend.name, rejection.status)
        ejected = backend.health.attempt_failed(trio.current_time(), rejection.reason)
        if ejected is not None:
            log.warning(
                "backend %s (pool %s) ejected for %gs: %s", backend.name, pool.name, ejected.duration, ejected.reason
            )

    # --- the backend hop -----------------------------------------------------------------------

    async def _connection(self, backend: Backend, pool: Pool) -> tuple[BackendStream, h11.Connection, bool]:
        """An idle connection to `backend`, or a new one (reused: the bool)."""
        cfg = self.snapshot.config
        if pool.config.send_proxy_protocol is None:  # a PROXY header names one client: never shared
            idle = self.idle.take(backend, trio.current_time())
            if idle is not None:
                return idle.stream, idle.conn, True
        tls = self.backend_tls.target(pool.config, backend.config)
        stream = await open_stream(backend.address, tls=tls, timeout=cfg.timeouts.connect)
        if pool.config.send_proxy_protocol is not None and self.local_addr is not None:
            header = proxy_protocol.build(pool.config.send_proxy_protocol, self.client_addr, self.local_addr)
            try:
                await stream.send_all(header)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                stream.close_now()
                raise UpstreamError(f"connection failed: {exc}") from None
        return stream, h11.Connection(h11.CLIENT, max_incomplete_event_size=cfg.limits.max_header_bytes), False

    async def _forward(
        self,
        backend: Backend,
        pool: Pool,
        request: ClientUpgrade,
        extra: tuple[tuple[bytes, bytes], ...],
        rec: HttpRecord,
        cookie: bytes | None,
    ) -> bool:
        """One attempt on `backend`. Returns when the client has its response (True: the client
        connection goes on); raises BackendFailed while nothing was sent to the client."""
        try:
            stream, conn, reused = await self._connection(backend, pool)
        except LocalResourceError as exc:  # the proxy's own shortage: 503, the backend not blamed
            raise BackendFailed(gate.local_shortage(self.edge, exc), retry=False, counts=False) from None
        except UpstreamError as exc:
            status = 504 if exc.timeout else 502
            raise BackendFailed(Rejection(status, exc.reason), retry=http1.may_retry(request, 0)) from None
        rec.reused = reused
        kept = False
        try:
            out = http1.backend_request(
                request,
                origin=self.origin,
                scheme="https" if self.listener.tls else "http",
                extra_headers=extra,
            )
            try:
                await stream.send_all(conn.send(out))
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                # nothing of the body was sent yet (and a kept-alive connection may just be stale)
                raise BackendFailed(
                    Rejection(502, f"{backend.name}: {exc}"), retry=http1.may_retry(request, 0), counts=not reused
                ) from None
            await self._send_body(stream, conn, rec, backend)
            stale_ok = reused and http1.may_retry(request, rec.bytes_from_client)
            response = await self._response_head(stream, conn, backend, stale_ok=stale_ok)
            backend.health.attempt_succeeded(trio.current_time())
            rec.status = response.status_code
            await self._send(self.h.send(http1.client_response(response, set_cookie=cookie, close=self.draining)))
            await self._relay_response(stream, conn, rec, backend)
            reusable = pool.config.send_proxy_protocol is None  # a PROXY header named this client
            if reusable and conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                conn.start_next_cycle()
                self.idle.put(backend, stream, conn, pool.config.http_pool)
                kept = True
            return self.h.our_state is h11.DONE and self.h.their_state is h11.DONE
        finally:
            if not kept:
                stream.close_now()

    async def _send_body(self, stream: BackendStream, conn: h11.Connection, rec: HttpRecord, backend: Backend) -> None:
        """Stream the request body to the backend, one client read at a time (a 100 Continue
        first if the client waits for one); over limits.max_body_bytes: 413."""
        h = self.h
        limit = self.snapshot.config.limits.max_body_bytes
        if h.they_are_waiting_for_100_continue:
            await self._send(h.send(h11.InformationalResponse(status_code=100, headers=[])))
        while True:
            event = await self._client_event()
            if isinstance(event, h11.Data):
                rec.bytes_from_client += len(event.data)
                over = http1.body_over(rec.bytes_from_client, limit)
                if over is not None:
                    raise Refused(over)
                data = conn.send(h11.Data(data=event.data))
            elif isinstance(event, h11.EndOfMessage):
                data = conn.send(h11.EndOfMessage())
            else:
                raise Refused(Rejection(400, f"unexpected {type(event).__name__} in a request body"))
            try:
                await stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise BackendFailed(
                    Rejection(502, f"{backend.name} broke while taking the body: {exc}"), retry=False
                ) from None
            if isinstance(event, h11.EndOfMessage):
                return

    async def _client_event(self) -> h11.Event:
        """The client's next event in a request body, reading when h11 needs bytes (each read
        within timeouts.http_idle); a malformed body (a bad chunk size) is a 400."""
        h = self.h
        while True:
            try:
                event = h.next_event()
            except h11.RemoteProtocolError as exc:
                if self._client_eof:
                    raise ClientGone("client closed the connection inside a request body") from None
                raise Refused(Rejection(400, f"malformed request body: {exc}")) from None
            if event is not h11.NEED_DATA:
                assert isinstance(event, h11.Data | h11.EndOfMessage | h11.ConnectionClosed)
                return event
            data = b""
            with trio.move_on_after(self.snapshot.config.timeouts.http_idle) as waited:
                try:
                    data = bytes(await self.stream.receive_some(self.snapshot.config.limits.buffer_bytes))
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    raise ClientGone(f"client connection broke inside a request body: {exc}") from None
            if waited.cancelled_caught:
                raise ClientGone("client sent no body bytes within timeouts.http_idle")
            self._client_eof = not data
            h.receive_data(data)

    async def _backend_read(
        self, stream: BackendStream, conn: h11.Connection, backend: Backend, *, stale_ok: bool = False
    ) -> int:
        """One read from the backend into `conn` (its size), within timeouts.http_response.
        `stale_ok`: a kept-alive connection that breaks now had been closed by the backend."""
        cfg = self.snapshot.config
        data = None
        with trio.move_on_after(cfg.timeouts.http_response):
            try:
                data = await stream.receive_some(cfg.limits.buffer_bytes)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                failed = Rejection(502, f"{backend.name}: connection broke: {exc}")
                raise BackendFailed(failed, retry=stale_ok, counts=not stale_ok) from None
        if data is None:
            raise BackendFailed(
                Rejection(504, f"{backend.name} did not answer within {cfg.timeouts.http_response:g}s"), retry=False
            )
        conn.receive_data(data)
        return len(data)

    async def _response_head(
        self, stream: BackendStream, conn: h11.Connection, backend: Backend, *, stale_ok: bool
    ) -> h11.Response:
        """The backend's response head. `stale_ok`: the connection was kept alive and the request
        may be retried, so one closed before any answer is tried again on another backend."""
        limit = self.snapshot.config.limits.max_header_bytes
        got_any = False
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                stale = stale_ok and not got_any
                failed = Rejection(502, f"{backend.name} sent no valid response: {exc}")
                raise BackendFailed(failed, retry=stale, counts=not stale) from None
            if event is h11.NEED_DATA:
                got_any = (
                    await self._backend_read(stream, conn, backend, stale_ok=stale_ok and not got_any) > 0 or got_any
                )
                continue
            if isinstance(event, h11.InformationalResponse | h11.Response) and response_head_size(event) > limit:
                raise BackendFailed(
                    Rejection(502, f"{backend.name}'s response head is over {limit} bytes"), retry=False
                )
            if isinstance(event, h11.Response):
                return event
            if isinstance(event, h11.InformationalResponse) and event.status_code != 101:
                continue  # a 100 of its own: the client had its 100 from us
            raise BackendFailed(Rejection(502, f"{backend.name} answered a plain request with {event!r}"), retry=False)

    async def _relay_response(
        self, stream: BackendStream, conn: h11.Connection, rec: HttpRecord, backend: Backend
    ) -> None:
        """Stream the response body to the client. Past the head, a backend failure can only cut
        the client's connection (it gets a truncated body, never a second status)."""
        h = self.h
        while True:
            try:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    await self._backend_read(stream, conn, backend)
                    continue
            except (h11.RemoteProtocolError, BackendFailed) as exc:
                rec.error = f"{backend.name}: response cut: {exc}"
                log.warning("backend %s: response to %s cut: %s", backend.name, self._client, exc)
                raise ClientGone(rec.error) from None
            if isinstance(event, h11.Data):
                rec.bytes_from_backend += len(event.data)
                await self._send(h.send(h11.Data(data=event.data)))
            elif isinstance(event, h11.EndOfMessage):
                await self._send(h.send(h11.EndOfMessage()))
                return

    # --- the client hop ------------------------------------------------------------------------

    async def _send(self, data: bytes | None) -> None:
        """Send to the client; one that takes nothing for timeouts.http_idle is gone."""
        if not data:
            return
        with trio.move_on_after(self.snapshot.config.timeouts.http_idle) as waited:
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise ClientGone(f"client connection broke: {exc}") from None
        if waited.cancelled_caught:
            raise ClientGone("client accepted nothing within timeouts.http_idle")

    def _bodyless(self) -> bool:
        """Take the end of a request that has no body (the connection may then go on)."""
        h = self.h
        if h.their_state is not h11.SEND_BODY:
            return h.their_state is h11.DONE
        try:
            event = h.next_event()
        except h11.RemoteProtocolError:
            return False
        return isinstance(event, h11.EndOfMessage)

    async def _refuse(self, rejection: Rejection, rec: HttpRecord, *, close: bool = False) -> bool:
        """Answer with the proxy's own status; True: the connection may go on (the request had
        no body, or all of it was read; `close`: it may not)."""
        rec.status = rejection.status
        rec.error = rejection.reason
        level = logging.DEBUG if rejection.quiet else logging.WARNING  # (the storm/shortage line speaks for them)
        log.log(
            level, "client %s: %d %s (%s %s)", self._client, rejection.status, rejection.reason, rec.method, rec.path
        )
        if self.h.our_state not in (h11.IDLE, h11.SEND_RESPONSE):  # IDLE: h11 could not read the request
            raise ClientGone(f"{rejection.status} after the response started: {rejection.reason}")
        return await self._send_refusal(rejection, close=close or self.draining or not self._bodyless())

    async def _send_refusal(self, rejection: Rejection, *, close: bool) -> bool:
        response, body = http1.rejection_response(rejection, close=close)
        h = self.h
        try:
            data = h.send(response) + (h.send(h11.Data(data=body)) or b"") + (h.send(h11.EndOfMessage()) or b"")
        except h11.LocalProtocolError:  # h11 could not frame an answer here (e.g. the request was unreadable)
            data = rejection.to_bytes()
            close = True
        await self._send(data)
        return not close
