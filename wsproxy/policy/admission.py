"""Whether a new session may start: the decisions taken between a valid Upgrade and a backend.

Pure, like the rest of the core: time comes in as `now`. `Admission` is the one piece of state
these decisions need across sessions (owned by the server, surviving reloads): open-session
counts (all listeners, per pool, per client address) and the per-address handshake buckets.
Counts change only through a `Ticket`, taken and released in pairs, so a session that crashes
can never leak one. Over a cap the answer is an HTTP status *before* the 101 — never a session
accepted and then dropped. `route_rules` and `apply_rules` hold the per-listener and per-route
rules: allowed origins (403), allowed subprotocols (filtered; 400 when none is left) and the
headers only the auth service may set.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from dataclasses import dataclass

from wsproxy.config import AuthConfig, Config, ListenerConfig
from wsproxy.policy import routing
from wsproxy.policy.origin import filter_subprotocols, origin_allowed
from wsproxy.policy.ratelimit import KeyedBuckets
from wsproxy.protocol.handshake import ClientUpgrade, Rejection

# `Admission.counts` keys: one per limit, for metrics and tests.
HANDSHAKE_RATE = "handshake_rate"
SESSIONS_PER_IP = "max_sessions_per_ip"
MAX_SESSIONS = "max_sessions"
POOL_MAX_SESSIONS = "pool_max_sessions"
BACKENDS_FULL = "backend_max_sessions"
ORIGIN = "origin"
SUBPROTOCOL = "subprotocol"
AUTH_DENIED = "auth_denied"
AUTH_ERROR = "auth_error"
RATE_THROTTLED = "session_rate_throttled"
RATE_CLOSED = "session_rate_closed"


def retry_after(seconds: float) -> tuple[tuple[bytes, bytes], ...]:
    """A Retry-After header: whole seconds, at least 1 (RFC 9110 delay-seconds)."""
    whole = 1 if not math.isfinite(seconds) else max(1, math.ceil(seconds))
    return ((b"Retry-After", str(whole).encode()),)


class Ticket:
    """One admitted session's place in the counts; `release` (or leaving the `with`) gives it back."""

    __slots__ = ("_admission", "ip", "pool")

    def __init__(self, admission: Admission, ip: str, pool: str) -> None:
        self._admission: Admission | None = admission
        self.ip = ip
        self.pool = pool

    def release(self) -> None:
        admission, self._admission = self._admission, None
        if admission is not None:
            admission._release(self.ip, self.pool)

    def __enter__(self) -> Ticket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class Admission:
    """Session counts and handshake buckets shared by every session of one server."""

    __slots__ = ("_handshake_key", "_handshakes", "counts", "per_ip", "per_pool", "total")

    def __init__(self) -> None:
        self.total = 0
        self.per_ip: dict[str, int] = {}  # only addresses with an open session: bounded by `total`
        self.per_pool: dict[str, int] = {}
        self._handshakes: KeyedBuckets | None = None
        self._handshake_key: tuple[float, float, int] | None = None
        self.counts: Counter[str] = Counter()  # refusals and closes, by limit

    @property
    def tracked_ips(self) -> int:
        """Addresses with a handshake bucket (at most `rate_limits.max_tracked_ips`)."""
        return 0 if self._handshakes is None else len(self._handshakes)

    def check_handshake(self, config: Config, ip: str, now: float) -> Rejection | None:
        """A request arrived from `ip`: take a token from its bucket, or answer 429."""
        spec = config.rate_limits.handshakes_per_ip
        if spec is None:
            return None
        key = (spec.rate, spec.burst, config.rate_limits.max_tracked_ips)
        if self._handshakes is None or self._handshake_key != key:  # first use, or a reload changed it
            self._handshakes = KeyedBuckets(spec.rate, spec.burst, key[2])
            self._handshake_key = key
        wait = self._handshakes.take(ip, now)
        if wait <= 0:
            return None
        self.counts[HANDSHAKE_RATE] += 1
        return Rejection(
            429, f"handshake rate from {ip} over {spec.rate:g}/s (burst {spec.burst:g})", headers=retry_after(wait)
        )

    def admit(self, config: Config, ip: str, pool: str) -> Ticket | Rejection:
        """Count a new session for `ip` on `pool`, or say which cap it would cross."""
        limits = config.limits
        pool_cap = config.pools[pool].max_sessions if pool in config.pools else None
        ip_cap = config.rate_limits.max_sessions_per_ip
        later = retry_after(limits.retry_after)
        if limits.max_sessions is not None and self.total >= limits.max_sessions:
            self.counts[MAX_SESSIONS] += 1
            why = f"{self.total} sessions open, limits.max_sessions is {limits.max_sessions}"
            return Rejection(503, why, later, public=why)
        if pool_cap is not None and self.per_pool.get(pool, 0) >= pool_cap:
            self.counts[POOL_MAX_SESSIONS] += 1
            why = f"pool {pool} is at its max_sessions ({pool_cap})"
            return Rejection(503, why, later, public=why)
        if ip_cap is not None and self.per_ip.get(ip, 0) >= ip_cap:
            self.counts[SESSIONS_PER_IP] += 1
            return Rejection(429, f"{ip} already has {ip_cap} sessions (max_sessions_per_ip)", later)
        self.total += 1
        self.per_pool[pool] = self.per_pool.get(pool, 0) + 1
        self.per_ip[ip] = self.per_ip.get(ip, 0) + 1
        return Ticket(self, ip, pool)

    def _release(self, ip: str, pool: str) -> None:
        self.total -= 1
        for table, key in ((self.per_pool, pool), (self.per_ip, ip)):
            left = table[key] - 1
            if left:
                table[key] = left
            else:
                del table[key]


@dataclass(frozen=True, slots=True)
class RouteRules:
    """What applies to one request: its pool and its route's (or listener's) rules."""

    pool: str
    allowed_subprotocols: tuple[str, ...] | None = None
    auth: AuthConfig | None = None


def route_rules(listener: ListenerConfig, host: bytes, path: str) -> RouteRules | None:
    """The rules of the route `routing.select_pool` picks (None: no route, a 404)."""
    if listener.pool is not None:
        return RouteRules(listener.pool, listener.allowed_subprotocols, listener.auth)
    name = routing.host_name(host)
    for route in listener.routes:
        if routing.route_matches(route.match, name, path):
            return RouteRules(route.pool, route.allowed_subprotocols, route.auth)
    return None


def apply_rules(listener: ListenerConfig, rules: RouteRules, upgrade: ClientUpgrade) -> ClientUpgrade | Rejection:
    """Check the origin (403) and subprotocols (400); return the request the backend should see.

    Offered subprotocols that the route does not allow are removed from the request; a request
    left with none of them (or offering none) is refused, since the route speaks only those.
    With `auth`, headers named in `copy_headers` are removed from the client's request: only
    the auth service's answer may set them.
    """
    if listener.allowed_origins is not None:
        origins = [v for k, v in upgrade.raw_headers if k.lower() == b"origin"]
        if not origin_allowed(listener.allowed_origins, origins):
            shown = b", ".join(origins).decode("latin-1")[:200]
            return Rejection(403, f"origin {shown!r} is not allowed on this listener")
    drop: set[bytes] = set()
    subprotocols = upgrade.subprotocols
    if rules.allowed_subprotocols is not None:
        subprotocols = filter_subprotocols(upgrade.subprotocols, rules.allowed_subprotocols)
        if not subprotocols:
            offered = ", ".join(upgrade.subprotocols)[:200] or "none"
            return Rejection(400, f"no allowed subprotocol offered (offered: {offered})")
        if subprotocols != upgrade.subprotocols:
            drop.add(b"sec-websocket-protocol")
    if rules.auth is not None:
        drop.update(name.encode("latin-1") for name in rules.auth.copy_headers)
    if not drop:
        return upgrade
    headers = [(k, v) for k, v in upgrade.raw_headers if k.lower() not in drop]
    if b"sec-websocket-protocol" in drop:
        headers.append((b"Sec-WebSocket-Protocol", ", ".join(subprotocols).encode("latin-1")))
    return dataclasses.replace(upgrade, subprotocols=subprotocols, raw_headers=tuple(headers))
