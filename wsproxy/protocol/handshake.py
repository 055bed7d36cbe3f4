"""The opening handshake on both hops, as pure functions of h11 events.

Decides whether a client's request is a valid WebSocket Upgrade (and if not, which HTTP status
answers it), builds the request sent to the backend (end-to-end headers unchanged, hop-by-hop
headers dropped, X-Forwarded-*/Forwarded written as forwarding.py says, a fresh key), checks the backend's 101, and
builds the 101 for the client. No sockets and no clock: the shell does the waiting.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from http import HTTPStatus

import h11
from wsproto.extensions import PerMessageDeflate

from wsproxy.protocol import http_head
from wsproxy.protocol.forwarding import FORWARDING_HEADERS, Origin, forwarding_headers
from wsproxy.protocol.target import BadTarget, normalize_target

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

# RFC 7230 section 6.1 plus the de-facto ones; names listed in Connection are dropped too.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Headers of the WebSocket handshake itself: each hop negotiates its own.
PER_HOP_WS = frozenset({b"sec-websocket-key", b"sec-websocket-accept", b"sec-websocket-extensions"})
FORWARDING = frozenset({b"x-forwarded-proto", b"x-forwarded-host"})

Headers = list[tuple[bytes, bytes]]


@dataclass(frozen=True, slots=True)
class Rejection:
    """An HTTP answer instead of a 101: status, a reason for the log, extra headers, a body.

    The client is told the reason of a 4xx (its own request is at fault, and the reason says how).
    A 5xx is about the proxy's side (a backend's address and what it answered, the auth service's
    URL): its reason goes to the log only, and the client gets the status, or `public` when the
    reason is fit to show (a session cap of the proxy's own).
    """

    status: int
    reason: str
    headers: tuple[tuple[bytes, bytes], ...] = ()
    body: bytes = b""
    public: str | None = None  # what the client is told instead of the reason
    quiet: bool = False  # logged in aggregate elsewhere (the storm shield): no warning per request

    def to_bytes(self) -> bytes:
        """The whole HTTP/1.1 response; the connection is closed after it."""
        body = self.body_bytes()
        head = [f"HTTP/1.1 {self.status} {phrase(self.status)}".encode()]
        head += [k + b": " + v for k, v in self.headers]
        head += [
            b"Content-Type: text/plain; charset=utf-8",
            b"Content-Length: " + str(len(body)).encode(),
            b"Connection: close",
        ]
        return b"\r\n".join(head) + b"\r\n\r\n" + body

    def body_bytes(self) -> bytes:
        """The response body: the given one, else a line with the status and what the client
        may be told (a 4xx's reason, `public`, nothing more for a 5xx). Every answer the proxy
        makes (to an Upgrade or to a plain HTTP request, http1.py) takes its body from here."""
        detail = self.public if self.public is not None else (self.reason if self.status < 500 else "")
        line = f"{self.status} {phrase(self.status)}"
        return self.body or (f"{line}: {detail}\n" if detail else f"{line}\n").encode()


def phrase(status: int) -> str:
    """The standard reason phrase of a status (RFC 9110), never empty: a status line always has one."""
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


@dataclass(frozen=True, slots=True)
class ClientUpgrade:
    """A validated client Upgrade request."""

    target: bytes  # path and query: the path normalised (target.py), the query byte for byte
    host: bytes
    key: bytes
    subprotocols: tuple[str, ...]
    extension_offers: tuple[str, ...]  # the raw Sec-WebSocket-Extensions offers, in order
    raw_headers: tuple[tuple[bytes, bytes], ...] = field(repr=False)  # original names and order
    method: bytes = b"GET"
    websocket: bool = True  # False: a plain HTTP request (http1.plain_request), no key or offers

    @property
    def path(self) -> str:
        return self.target.split(b"?", 1)[0].decode("latin-1")

    @property
    def query(self) -> str:
        parts = self.target.split(b"?", 1)
        return parts[1].decode("latin-1") if len(parts) == 2 else ""

    def header(self, name: bytes) -> bytes | None:
        """The first value of a header (name in lower case), or None."""
        for k, v in self.raw_headers:
            if k.lower() == name:
                return v
        return None


def _tokens(values: list[bytes]) -> list[bytes]:
    return [t.strip().lower() for v in values for t in v.split(b",") if t.strip()]


def _by_name(headers: Iterable[tuple[bytes, bytes]]) -> dict[bytes, list[bytes]]:
    """Every value of each header (name in lower case), in order: one pass over a head whose
    checks ask for a dozen names (a pass per name showed in the handshake's profile)."""
    named: dict[bytes, list[bytes]] = {}
    for k, v in headers:
        named.setdefault(k.lower(), []).append(v)
    return named


def _all(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    return [v for k, v in headers if k.lower() == name]


def is_upgrade(req: h11.Request) -> bool:
    """The request asks for a protocol switch (an Upgrade header, or upgrade in Connection):
    validate_client_request judges it; anything else is a plain HTTP request."""
    headers = list(req.headers)
    return bool(_all(headers, b"upgrade")) or b"upgrade" in _tokens(_all(headers, b"connection"))


def validate_client_request(req: h11.Request) -> ClientUpgrade | Rejection:
    """Check an Upgrade request per RFC 6455 section 4.2.1; say which status answers a bad one."""
    named = _by_name(req.headers)
    upgrade = _tokens(named.get(b"upgrade", []))
    connection = _tokens(named.get(b"connection", []))
    if not upgrade and b"upgrade" not in connection:
        return Rejection(
            426,
            "this endpoint speaks WebSocket only; plain HTTP requests are not forwarded",
            headers=((b"upgrade", b"websocket"), (b"sec-websocket-version", b"13")),
        )
    if req.method != b"GET":
        return Rejection(400, f"WebSocket upgrade must use GET, not {req.method.decode('latin-1')}")
    if req.http_version != b"1.1":
        return Rejection(400, f"WebSocket upgrade needs HTTP/1.1, got HTTP/{req.http_version.decode('latin-1')}")
    if b"websocket" not in upgrade:
        return Rejection(400, "Upgrade header does not name websocket")
    if b"upgrade" not in connection:
        return Rejection(400, "Connection header does not contain upgrade")
    hosts = named.get(b"host", [])
    if len(hosts) != 1 or not hosts[0].strip():
        return Rejection(400, "exactly one non-empty Host header is required")
    if named.get(b"content-length", []) not in ([], [b"0"]) or named.get(b"transfer-encoding", []):
        return Rejection(400, "an Upgrade request must not carry a body")
    # A header named in Connection is dropped as hop-by-hop; these must reach the backend.
    needed = sorted({t for t in connection if t == b"host" or t.startswith(b"sec-websocket-")})
    if needed:
        shown = ", ".join(t.decode("latin-1") for t in needed)[:200]
        return Rejection(400, f"Connection lists {shown}, which the handshake needs end to end")
    versions = named.get(b"sec-websocket-version", [])
    if len(versions) != 1 or versions[0].strip() != b"13":
        shown = b", ".join(versions).decode("latin-1") or "missing"
        return Rejection(
            426 if versions else 400,
            f"Sec-WebSocket-Version must be 13 (got {shown})",
            headers=((b"sec-websocket-version", b"13"),),
        )
    keys = named.get(b"sec-websocket-key", [])
    if len(keys) != 1 or not _valid_key(keys[0]):
        return Rejection(400, "Sec-WebSocket-Key must be one base64 encoding of 16 bytes")
    try:
        target = normalize_target(req.target, host=hosts[0].strip())
    except BadTarget as exc:
        return Rejection(400, f"request target {exc}")
    subprotocols = tuple(t.decode("latin-1") for t in _tokens_keep_case(named.get(b"sec-websocket-protocol", [])))
    offers = tuple(_tokens_keep_case(named.get(b"sec-websocket-extensions", [])))
    return ClientUpgrade(
        target=target,
        host=hosts[0].strip(),
        key=keys[0].strip(),
        subprotocols=subprotocols,
        extension_offers=tuple(o.decode("latin-1") for o in offers),
        raw_headers=tuple((bytes(k), bytes(v)) for k, v in req.headers.raw_items()),
    )


def head_size(req: h11.Request) -> int:
    """Bytes of a request head as sent: request line plus header lines."""
    line = len(req.method) + len(req.target) + len(req.http_version) + 12
    return line + sum(len(k) + len(v) + 4 for k, v in req.headers.raw_items())


def _tokens_keep_case(values: list[bytes]) -> list[bytes]:
    return [t.strip() for v in values for t in v.split(b",") if t.strip()]


def _valid_key(key: bytes) -> bool:
    try:
        return len(base64.b64decode(key.strip(), validate=True)) == 16
    except (binascii.Error, ValueError):
        return False


def accept_key(key: bytes) -> bytes:
    """Sec-WebSocket-Accept for a Sec-WebSocket-Key (RFC 6455 section 4.2.2)."""
    return base64.b64encode(hashlib.sha1(key.strip() + WS_GUID).digest())


def new_key() -> bytes:
    return base64.b64encode(os.urandom(16))


# ---------------------------------------------------------------------------------------------
# upstream request


def _connection_listed(headers: Headers) -> set[bytes]:
    return set(_tokens(_all(headers, b"connection")))


def build_upstream_request(
    upgrade: ClientUpgrade,
    *,
    key: bytes,
    origin: Origin,
    scheme: str,
    extension_offer: str | None,
    extra_headers: Iterable[tuple[bytes, bytes]] = (),
) -> bytes:
    """The Upgrade request's head as the backend receives it: end-to-end headers as received, in
    order, plus forwarding and this hop's own, written as h11 writes a request
    (http_head.encode_request).

    `origin` says who connected and whether its forwarding headers are kept (forwarding.py).
    `scheme` is "http" or "https" as the client spoke to us. `extension_offer` is what this hop
    offers for Sec-WebSocket-Extensions (None: no extensions). `extra_headers` are added after
    the client's (the auth service's `copy_headers`; the caller removed the client's own).
    """
    own = [(b"Connection", b"Upgrade"), (b"Upgrade", b"websocket"), (b"Sec-WebSocket-Key", key)]
    if extension_offer:
        own.append((b"Sec-WebSocket-Extensions", extension_offer.encode("latin-1")))
    headers = forward_headers(
        upgrade, origin=origin, scheme=scheme, extra_headers=extra_headers, own=own, drop=PER_HOP_WS
    )
    return http_head.encode_request(b"GET", upgrade.target, headers)


def forward_headers(
    request: ClientUpgrade,
    *,
    origin: Origin,
    scheme: str,
    extra_headers: Iterable[tuple[bytes, bytes]] = (),
    own: Iterable[tuple[bytes, bytes]] = (),
    drop: frozenset[bytes] = frozenset(),
) -> Headers:
    """The headers a backend gets for a client's request (an Upgrade or a plain HTTP request):
    end-to-end headers as received, in order, without hop-by-hop ones, those the client's
    Connection lists and `drop`; then `extra_headers`, this hop's `own`, X-Forwarded-Proto/-Host,
    and the forwarding headers forwarding.py writes for `origin` (the client's own kept and
    appended to only from a trusted proxy)."""
    listed = _connection_listed(list(request.raw_headers))
    out: Headers = []
    for name, value in request.raw_headers:
        low = name.lower()
        if low in HOP_BY_HOP or low in listed or low in drop or low in FORWARDING or low in FORWARDING_HEADERS:
            continue
        out.append((name, value))
    out.extend(extra_headers)
    out.extend(own)
    out.append((b"X-Forwarded-Proto", scheme.encode()))
    out.append((b"X-Forwarded-Host", request.host))
    out.extend(forwarding_headers(origin, request.raw_headers, scheme=scheme, host=request.host))
    return out


# ---------------------------------------------------------------------------------------------
# the backend's answer


@dataclass(frozen=True, slots=True)
class BackendAccept:
    """A valid 101 from the backend."""

    subprotocol: str | None
    extensions: str | None  # the backend's Sec-WebSocket-Extensions answer, raw
    passthrough_headers: tuple[tuple[bytes, bytes], ...]  # e.g. Set-Cookie in the 101


def check_backend_101(
    response: h11.InformationalResponse | http_head.Switching,
    *,
    key: bytes,
    offered_subprotocols: tuple[str, ...],
    offered_extensions: bool,
) -> BackendAccept | Rejection:
    """Validate a backend's 101 (RFC 6455 section 4.1, the client's checks), read by h11 or
    directly (http_head.py). Bad: 502."""
    headers = list(response.raw_items() if isinstance(response, http_head.Switching) else response.headers.raw_items())
    named = _by_name(headers)
    if b"websocket" not in _tokens(named.get(b"upgrade", [])):
        return Rejection(502, "backend's 101 lacks Upgrade: websocket")
    if b"upgrade" not in _tokens(named.get(b"connection", [])):
        return Rejection(502, "backend's 101 lacks Connection: upgrade")
    accepts = named.get(b"sec-websocket-accept", [])
    if len(accepts) != 1 or accepts[0].strip() != accept_key(key):
        return Rejection(502, "backend's 101 has a wrong Sec-WebSocket-Accept")
    protocols = _tokens_keep_case(named.get(b"sec-websocket-protocol", []))
    subprotocol = None
    if protocols:
        chosen = protocols[0].decode("latin-1")
        if len(protocols) > 1 or chosen not in offered_subprotocols:
            return Rejection(502, f"backend chose subprotocol {chosen!r}, which the client did not offer")
        subprotocol = chosen
    ext_values = named.get(b"sec-websocket-extensions", [])
    extensions = b", ".join(v.strip() for v in ext_values).decode("latin-1") or None
    if extensions and not offered_extensions:
        return Rejection(502, f"backend answered extensions {extensions!r} that were not offered")
    listed = set(_tokens(named.get(b"connection", [])))
    keep = tuple(
        (bytes(k), bytes(v))
        for k, v in headers
        if k.lower() not in HOP_BY_HOP
        and k.lower() not in listed
        and k.lower() not in PER_HOP_WS
        and k.lower() != b"sec-websocket-protocol"
    )
    return BackendAccept(subprotocol=subprotocol, extensions=extensions, passthrough_headers=keep)


def build_client_101(
    upgrade: ClientUpgrade, accepted: BackendAccept, *, extensions: str | None
) -> h11.InformationalResponse:
    headers: Headers = [
        (b"Upgrade", b"websocket"),
        (b"Connection", b"Upgrade"),
        (b"Sec-WebSocket-Accept", accept_key(upgrade.key)),
    ]
    if accepted.subprotocol is not None:
        headers.append((b"Sec-WebSocket-Protocol", accepted.subprotocol.encode("latin-1")))
    if extensions:
        headers.append((b"Sec-WebSocket-Extensions", extensions.encode("latin-1")))
    headers.extend(accepted.passthrough_headers)
    return h11.InformationalResponse(status_code=101, headers=headers, reason=b"Switching Protocols")


def passthrough_response_headers(response: h11.Response, *, close: bool = True) -> Headers:
    """Headers of a backend's non-101 answer as sent to the client: hop-by-hop removed (and,
    with `close`, Connection: close: the handshake path ends the connection after it)."""
    listed = _connection_listed(list(response.headers))
    out = [
        (bytes(k), bytes(v))
        for k, v in response.headers.raw_items()
        if k.lower() not in HOP_BY_HOP and k.lower() not in listed
    ]
    if close:
        out.append((b"Connection", b"close"))
    return out


# ---------------------------------------------------------------------------------------------
# permessage-deflate, negotiated per hop (inspect relay)


def negotiate_client_deflate(offers: tuple[str, ...]) -> tuple[PerMessageDeflate | None, str | None]:
    """Accept the client's first acceptable permessage-deflate offer, if any.

    Returns the extension object for the client hop and the Sec-WebSocket-Extensions answer.
    """
    for offer in offers:
        name = offer.split(";", 1)[0].strip().lower()
        if name != PerMessageDeflate.name:
            continue
        ext = PerMessageDeflate()
        try:
            params = ext.accept(offer)
        except ValueError:  # a malformed parameter: try the next offer
            continue
        if params is None or params is False:
            continue
        answer = PerMessageDeflate.name + (f"; {params}" if isinstance(params, str) and params else "")
        return ext, answer
    return None, None


def backend_deflate_offer() -> tuple[PerMessageDeflate, str]:
    ext = PerMessageDeflate()
    params = ext.offer()
    return ext, PerMessageDeflate.name + (f"; {params}" if isinstance(params, str) and params else "")


def finalize_backend_deflate(ext: PerMessageDeflate, answer: str | None) -> PerMessageDeflate | Rejection | None:
    """Apply the backend's extension answer to our offer; an answer we cannot honour is a 502."""
    if not answer:
        return None
    parts = [p.strip() for p in answer.split(",") if p.strip()]
    if len(parts) != 1 or parts[0].split(";", 1)[0].strip().lower() != PerMessageDeflate.name:
        return Rejection(502, f"backend answered extensions {answer!r}; only permessage-deflate was offered")
    try:
        ext.finalize(parts[0])
    except (ValueError, TypeError) as exc:
        return Rejection(502, f"backend's permessage-deflate answer is invalid: {exc}")
    return ext
