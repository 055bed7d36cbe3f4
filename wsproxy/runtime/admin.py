"""The admin listener: /metrics, /healthz, /readyz, /status and /status.json over plain HTTP.

A small HTTP/1.1 server on h11 and trio, one request per connection (`Connection: close`), for
Prometheus, orchestrators and people. Bounded like everything else: a request head and body of at
most ADMIN_MAX_REQUEST_BYTES, ADMIN_TIMEOUT for the whole exchange, at most
ADMIN_MAX_CONNECTIONS at once (further ones are closed at once). It only reads the server's state:
the metrics registry, the session registry, the pools and the draining flag. It binds loopback
unless the config says `allow_remote: true` (config.py enforces that). It answers only requests
whose Host is its own address, `localhost` or a name in `admin.hosts` (else 421), so a page on
another site that a DNS-rebinding attack points at this address cannot read /status.json.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from typing import TYPE_CHECKING

import h11
import trio
from prometheus_client import CONTENT_TYPE_LATEST

from wsproxy.config import Address, AdminConfig, defaults
from wsproxy.observe.status import STATUS_HTML, RecentErrors, build_status
from wsproxy.policy.routing import host_allowed, host_name
from wsproxy.protocol.handshake import phrase
from wsproxy.runtime.listen import open_sockets

if TYPE_CHECKING:
    from wsproxy.runtime.server import Server

log = logging.getLogger("wsproxy.admin")

TEXT = "text/plain; charset=utf-8"
# The status page is one self-contained document: it may run its own inline script and style and
# fetch from this origin, nothing else.
STATUS_CSP = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'"


class Response:
    __slots__ = ("body", "content_type", "headers", "status")

    def __init__(
        self, status: int, body: bytes, content_type: str = TEXT, headers: tuple[tuple[str, str], ...] = ()
    ) -> None:
        self.status = status
        self.body = body
        self.content_type = content_type
        self.headers = headers


class Admin:
    """Answers admin requests about one `Server`."""

    def __init__(self, server: Server, errors: RecentErrors | None = None, config: AdminConfig | None = None) -> None:
        self.server = server
        self.errors = errors if errors is not None else RecentErrors()
        self._slots = trio.Semaphore(defaults.ADMIN_MAX_CONNECTIONS)
        # Host names answered on every connection; the address a connection arrived on is added to them
        self.hosts = frozenset({"localhost", *(config.hosts if config else ())})
        if config is not None:
            self.hosts |= {host_name(config.address.host.encode())}

    # --- routing -----------------------------------------------------------------------------

    def ready(self) -> tuple[bool, str]:
        """Listening and not draining: a load balancer in front may send new sessions here."""
        if self.server.draining:
            return False, "draining"
        if not self.server.bound:
            return False, "not listening"
        return True, "ready"

    def status(self) -> dict[str, object]:
        s = self.server
        return (
            build_status(
                pools=s.snapshot.pools,
                sessions=s.sessions,
                now=trio.current_time(),
                wall_time=time.time(),
                draining=s.draining,
                config=s.snapshot.config,
                listeners=s.bound,
                errors=self.errors.entries,
            )
            | s.telemetry.overview()
        )  # charts, totals, rates, uptime (telemetry.py)

    def respond(
        self,
        method: bytes,
        target: bytes,
        headers: tuple[tuple[bytes, bytes], ...] = (),
        body: bytes = b"",
        peer: str = "?",
    ) -> Response:
        """The response to one request (pure routing; no I/O)."""
        path = target.split(b"?", 1)[0]
        api = self.server.control_api
        if api.handles(path):  # /sessions and the writes (admin_api.py)
            status, doc, extra = api.respond(method, target, headers, body, peer)
            return Response(status, doc, "application/json", extra)
        if method not in (b"GET", b"HEAD"):
            return Response(405, b"only GET and HEAD\n", headers=(("Allow", "GET, HEAD"),))
        if path == b"/metrics":
            return Response(200, self.server.metrics.exposition(), CONTENT_TYPE_LATEST)
        if path == b"/healthz":
            return Response(200, b"ok\n")
        if path == b"/readyz":
            ok, why = self.ready()
            return Response(200 if ok else 503, why.encode() + b"\n")
        if path == b"/status.json":
            body = json.dumps(self.status(), separators=(",", ":")).encode()
            return Response(200, body, "application/json")
        if path == b"/status":
            return Response(
                200, STATUS_HTML.encode(), "text/html; charset=utf-8", (("Content-Security-Policy", STATUS_CSP),)
            )
        if path == b"/":
            return Response(302, b"see /status\n", headers=(("Location", "/status"),))
        return Response(404, b"not found: try /metrics /healthz /readyz /status /status.json\n")

    # --- I/O -----------------------------------------------------------------------------------

    async def handle(self, stream: trio.SocketStream) -> None:
        try:
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            await trio.aclose_forcefully(stream)  # too many admin connections: refuse this one
            return
        try:
            with trio.move_on_after(defaults.ADMIN_TIMEOUT):
                await self._exchange(stream)
        finally:
            self._slots.release()
            await trio.aclose_forcefully(stream)

    async def _exchange(self, stream: trio.SocketStream) -> None:
        limit = defaults.ADMIN_MAX_REQUEST_BYTES
        h = h11.Connection(h11.SERVER, max_incomplete_event_size=limit)
        request: h11.Request | None = None
        body = bytearray()
        try:
            while True:
                event = h.next_event()
                if event is h11.NEED_DATA:
                    try:
                        data = await stream.receive_some(limit)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        return
                    h.receive_data(data)
                    continue
                if isinstance(event, h11.Request):
                    request = event
                elif isinstance(event, h11.Data):
                    body += event.data
                    if len(body) > limit:
                        await self._send(stream, h, Response(413, b"request body too large\n"), head=False)
                        return
                elif isinstance(event, h11.EndOfMessage):
                    break
                else:  # ConnectionClosed (or PAUSED, which one request per connection never reaches)
                    return
        except h11.RemoteProtocolError as exc:
            await self._send(stream, h, Response(exc.error_status_hint, f"bad request: {exc}\n".encode()), head=False)
            return
        assert request is not None
        host = next((bytes(v) for k, v in request.headers if k == b"host"), None)
        if not host_allowed(host, self.hosts | _own_names(stream)):
            shown = (host or b"").decode("latin-1")[:100]
            log.warning("admin: refused a request for Host %r (not this listener's address or admin.hosts)", shown)
            refusal = b"this admin listener answers to its own address, localhost and admin.hosts only\n"
            await self._send(stream, h, Response(421, refusal), head=request.method == b"HEAD")
            return
        try:
            peer = _peer(stream)
            response = self.respond(request.method, request.target, tuple(request.headers), bytes(body), peer)
        except Exception:  # a bug in a page must not take the admin listener down
            log.exception("admin: %s %s failed", request.method.decode(), request.target.decode("latin-1"))
            response = Response(500, b"internal error\n")
        await self._send(stream, h, response, head=request.method == b"HEAD")

    @staticmethod
    async def _send(stream: trio.SocketStream, h: h11.Connection, response: Response, *, head: bool) -> None:
        headers = [
            ("Content-Type", response.content_type),
            ("Content-Length", str(len(response.body))),
            ("Cache-Control", "no-store"),
            ("X-Content-Type-Options", "nosniff"),
            ("Connection", "close"),
            *response.headers,
        ]
        out = h.send(h11.Response(status_code=response.status, headers=headers, reason=phrase(response.status)))
        if not head and response.body:
            out += h.send(h11.Data(data=response.body))
        out += h.send(h11.EndOfMessage())
        try:
            await stream.send_all(out)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return


def _peer(stream: trio.SocketStream) -> str:
    try:
        addr = stream.socket.getpeername()
    except OSError:
        return "?"
    return f"[{addr[0]}]:{addr[1]}" if ":" in addr[0] else f"{addr[0]}:{addr[1]}"


async def serve_admin(
    server: Server,
    config: AdminConfig,
    port_offset: int = 0,
    *,
    inherited: list[socket.socket] | None = None,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Bind the admin address (+ `port_offset`: worker i of several serves its own metrics on
    port + i), report the bound (host, port), serve until cancelled."""
    port = config.address.port + port_offset if config.address.port else 0
    if inherited:  # handed over by the previous process (an upgrade)
        sockets = list(inherited)
    else:
        address = Address(config.address.host, port)
        sockets = await open_sockets(
            address, label=f"admin.address {config.address}", reuse_port=False, backlog=defaults.ADMIN_LISTEN_BACKLOG
        )
    server.admin_sockets = sockets  # stdlib sockets: what an upgrade hands over (handover.py)
    listeners = [trio.SocketListener(trio.socket.from_stdlib_socket(s)) for s in sockets]
    sockname = listeners[0].socket.getsockname()
    bound = (sockname[0], sockname[1])
    errors = RecentErrors()
    root = logging.getLogger("wsproxy")
    root.addHandler(errors)
    try:
        admin = Admin(server, errors, config)
        log.info("admin: serving http://%s:%d/ (metrics, healthz, readyz, status)", bound[0], bound[1])
        task_status.started(bound)
        await trio.serve_listeners(admin.handle, listeners)
    finally:
        root.removeHandler(errors)


def _own_names(stream: trio.SocketStream) -> frozenset[str]:
    """The address this connection arrived on (for a listener bound to 0.0.0.0 or ::), as a Host name."""
    try:
        local = stream.socket.getsockname()[0]
    except OSError:
        return frozenset()
    names = {str(local).lower()}
    if str(local).lower().startswith("::ffff:"):
        names.add(str(local)[7:])
    return frozenset(names)
