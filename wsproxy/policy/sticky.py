"""Session affinity by cookie: which backend a request's cookie pins, the order of candidates it
implies, and the Set-Cookie that pins a client to the backend that answered it.

A backend's id is an HMAC-SHA256 of the pool name and the backend's address under a secret (the
proxy's own random one, shared by its workers, or `pools.NAME.sticky.secret` for a fleet), so the
cookie names a backend without revealing its address, and stays valid across reloads and
restarts with the same secret. A pinned backend comes first whatever the balance policy while it
is available (healthy, not ejected, not full, still in the pool); otherwise the request is
balanced afresh and the response carries a new cookie. Pure: no clock, the caller passes `now`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Iterator, Sequence

from wsproxy.config import Sticky
from wsproxy.policy import routing
from wsproxy.policy.balancing import Backend
from wsproxy.protocol.handshake import ClientUpgrade

ID_BYTES = 15  # 120 bits of the HMAC: 20 characters of base64url, no padding


def backend_id(secret: bytes, pool: str, backend: Backend) -> bytes:
    """The opaque cookie value naming `backend` of `pool`."""
    mac = hmac.new(secret, pool.encode() + b"\0" + backend.name.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac[:ID_BYTES])


def cookie_value(request: ClientUpgrade, name: str) -> bytes | None:
    """The affinity cookie the request carries, if any."""
    return routing.cookie(request, name.encode())


def pinned(
    secret: bytes, pool: str, backends: Sequence[Backend], value: bytes | None, now: float
) -> tuple[Backend | None, bool]:
    """(the backend the cookie pins if it may take this request, whether the cookie named a
    backend of this pool at all). A pinned backend that is down, ejected, full or set to drain/maint gives
    (None, True): the request is balanced afresh and the cookie rewritten."""
    if not value:
        return None, False
    for backend in backends:
        if hmac.compare_digest(backend_id(secret, pool, backend), value):
            usable = backend.health.available(now) and not backend.full and backend.admin.accepting
            return (backend if usable else None), True
    return None, False


def candidates(first: Backend | None, rest: Iterator[Backend]) -> Iterator[Backend]:
    """The pinned backend (if any) first, then the balancer's order without it."""
    if first is not None:
        yield first
    for backend in rest:
        if backend is not first:
            yield backend


def set_cookie(spec: Sticky, value: bytes, *, client_tls: bool) -> bytes:
    """The Set-Cookie header value that pins a client to the backend whose id is `value`."""
    parts = [spec.cookie.encode() + b"=" + value, b"Path=/"]
    if spec.max_age is not None:
        parts.append(b"Max-Age=%d" % max(1, int(spec.max_age)))
    if spec.secure == "true" or (spec.secure == "auto" and client_tls):
        parts.append(b"Secure")
    if spec.http_only:
        parts.append(b"HttpOnly")
    parts.append(b"SameSite=" + spec.same_site.capitalize().encode())
    return b"; ".join(parts)
