"""Plain HTTP/1.1 requests beside WebSocket Upgrades: the message rules, as pure functions.

h11 parses both hops (framing, chunked coding, keep-alive, the 100-continue state); this module
adds what a proxy must decide on top of it: which requests are refused before any backend sees
them (framing a smuggler could exploit: Transfer-Encoding together with Content-Length, two
different Content-Lengths, a body over `limits.max_body_bytes`, an Expect we cannot honour), the
request the backend gets (the target normalised and the forwarding headers written as for an
Upgrade, by target.py, forwarding.py and handshake.py's one builder; hop-by-hop headers dropped;
the body framed for this hop), the response the client gets (the proxy's own 5xx without detail),
and which requests may be retried on another backend. Identical repeated Content-Length values
are one value (RFC 9112 section 6.3, as h11 reads them) and reach the backend as one header.
Of the target forms (RFC 9112 section 3.2) origin-form and absolute-form are normalised by
target.py, asterisk-form is kept for `OPTIONS *`, authority-form (CONNECT) gets 501.
"""

from __future__ import annotations

from collections.abc import Iterable

import h11

from wsproxy.protocol.forwarding import Origin
from wsproxy.protocol.handshake import (
    ClientUpgrade,
    Headers,
    Rejection,
    forward_headers,
    passthrough_response_headers,
    phrase,
)
from wsproxy.protocol.target import ASTERISK, BadTarget, normalize_target

# RFC 9110 section 9.2.2: a retry cannot change what the first attempt did.
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
# Expect is answered by the proxy itself (a 100 when it starts reading the body), never forwarded.
PER_HOP_HTTP = frozenset({b"expect"})


def _all(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    return [v for k, v in headers if k.lower() == name]


def error_status(exc: h11.RemoteProtocolError) -> int:
    """The status for a request h11 could not parse. Framing h11 leaves to a 501 (a second
    Transfer-Encoding header) is a smuggling attempt here, so a 400."""
    if "Transfer-Encoding" in str(exc) and "multiple" in str(exc):
        return 400
    return exc.error_status_hint


def plain_request(req: h11.Request) -> ClientUpgrade | Rejection:
    """A request that is not an Upgrade, as the edge rules and the backend request need it; or
    why it is refused before any backend sees it."""
    headers = list(req.headers)
    hosts = _all(headers, b"host")
    if len(hosts) != 1 or not hosts[0].strip():
        return Rejection(400, "exactly one non-empty Host header is required")
    if _all(headers, b"transfer-encoding") and _all(headers, b"content-length"):
        return Rejection(400, "Transfer-Encoding together with Content-Length (a request smuggling pattern)")
    expects = [v.strip().lower() for v in _all(headers, b"expect")]
    if any(e != b"100-continue" for e in expects):
        return Rejection(417, "only Expect: 100-continue is supported")
    if req.method == b"CONNECT":  # authority-form: a tunnel, which this proxy never opens
        return Rejection(501, "CONNECT is not supported (no tunnels)")
    try:  # the same normal form as an Upgrade's: routes cannot be bypassed by spelling (target.py)
        target = asterisk_form(req) or normalize_target(req.target, host=hosts[0].strip())
    except BadTarget as exc:
        return Rejection(400, f"request target {exc}")
    return ClientUpgrade(
        target=target,
        host=hosts[0].strip(),
        key=b"",
        subprotocols=(),
        extension_offers=(),
        raw_headers=tuple((bytes(k), bytes(v)) for k, v in req.headers.raw_items()),
        method=bytes(req.method),
        websocket=False,
    )


def asterisk_form(req: h11.Request) -> bytes | None:
    """`*` for `OPTIONS *` (RFC 9112 section 3.2.4: the server as a whole), routed by its Host
    alone (routing.route_matches) and sent on as it is; None for any other target."""
    if req.target != ASTERISK:
        return None
    if req.method != b"OPTIONS":
        raise BadTarget("* is only for OPTIONS")
    return ASTERISK


def declared_length(request: ClientUpgrade) -> int | None:
    """The Content-Length of a request (h11 checked its syntax), or None (chunked or no body)."""
    values = _all(request.raw_headers, b"content-length")
    return int(values[0]) if values else None


def is_chunked(request: ClientUpgrade) -> bool:
    return bool(_all(request.raw_headers, b"transfer-encoding"))


def too_large(request: ClientUpgrade, max_body_bytes: int) -> Rejection | None:
    """A 413 for a declared body over the limit, before any of it is read."""
    length = declared_length(request)
    if length is not None and length > max_body_bytes:
        return Rejection(413, f"request body of {length} bytes is over limits.max_body_bytes ({max_body_bytes})")
    return None


def body_over(received: int, max_body_bytes: int) -> Rejection | None:
    """A 413 once a (chunked) body's running total passes the limit."""
    if received > max_body_bytes:
        return Rejection(413, f"request body over limits.max_body_bytes ({max_body_bytes})")
    return None


def may_retry(request: ClientUpgrade, body_sent: int) -> bool:
    """Another backend may be tried: the method is idempotent and no body byte left the proxy."""
    return request.method in IDEMPOTENT and body_sent == 0


def backend_request(
    request: ClientUpgrade,
    *,
    origin: Origin,
    scheme: str,
    extra_headers: Iterable[tuple[bytes, bytes]] = (),
) -> h11.Request:
    """The request for the backend: the normalised target, end-to-end headers, the forwarding
    headers for `origin` (forwarding.py, as for an Upgrade), and this hop's body framing (the
    client's Content-Length kept; a chunked body re-chunked by h11)."""
    own: Headers = []
    if is_chunked(request):
        own.append((b"Transfer-Encoding", b"chunked"))
    headers = forward_headers(
        request, origin=origin, scheme=scheme, extra_headers=extra_headers, own=own, drop=PER_HOP_HTTP
    )
    return h11.Request(method=request.method, target=request.target, headers=headers)


def client_response(response: h11.Response, *, set_cookie: bytes | None = None, close: bool = False) -> h11.Response:
    """The backend's response as the client gets it: hop-by-hop headers dropped (h11 frames the
    body for this hop), the affinity cookie added when the proxy sets one; `close`: the client
    connection ends after it (Connection: close, a drain)."""
    headers = passthrough_response_headers(response, close=close)
    if set_cookie is not None:
        headers.append((b"Set-Cookie", set_cookie))
    return h11.Response(status_code=response.status_code, headers=headers, reason=response.reason)


def rejection_response(rejection: Rejection, *, close: bool) -> tuple[h11.Response, bytes]:
    """A Rejection as an h11 response and body, for a keep-alive connection (close: the
    connection ends after it, e.g. when the request body was not read)."""
    body = rejection.body_bytes()
    headers: Headers = [
        *rejection.headers,
        (b"Content-Type", b"text/plain; charset=utf-8"),
        (b"Content-Length", str(len(body)).encode()),
    ]
    if close:
        headers.append((b"Connection", b"close"))
    return h11.Response(status_code=rejection.status, headers=headers, reason=phrase(rejection.status).encode()), body
