"""Auth before the channel opens: one HTTP/1.1 subrequest (h11 over trio) per new session.

Before a backend is contacted, the proxy sends the auth service a GET with the client's
`pass_headers` and where the request was going (X-Forwarded-For/-Proto/-Host/-Uri/-Method). A
2xx lets the handshake go on, with the answer's `copy_headers` added to the upstream request;
401 or 403 goes back to the client as is (a 401's WWW-Authenticate too); anything else, no
answer within `timeout`, or a broken answer is a 503: the proxy fails closed. Only the response
head is read (bounded by `limits.max_header_bytes`); the body is never read and the connection
is closed after each check. Answers (2xx, 401, 403) may be cached for `cache` seconds in a
bounded table keyed by everything the auth service was sent, so a reconnect storm of one user
costs one check.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass

import h11
import trio

from wsproxy.config import AuthConfig
from wsproxy.policy.credentials import parse_expiry
from wsproxy.policy.lru import LRUTable, TTLCache
from wsproxy.protocol.handshake import ClientUpgrade, Rejection

log = logging.getLogger("wsproxy.auth")

MAX_AUTH_CONFIGS = 64  # caches kept for distinct auth settings (reloads create new ones)
RECEIVE_SIZE = 4096

Headers = tuple[tuple[bytes, bytes], ...]


@dataclass(frozen=True, slots=True)
class AuthAnswer:
    """What the auth service decided, as the session needs it."""

    allowed: bool
    status: int  # the auth service's status; 0 when it gave none
    copy: Headers = ()  # for the upstream request (allowed)
    challenge: Headers = ()  # WWW-Authenticate for the client (a 401)
    reason: str = ""
    expires_at: float | None = None  # Unix time the yes holds until (auth.session_expiry_header)

    def rejection(self) -> Rejection | None:
        """None when allowed; else the answer for the client (401/403 as is, else 503)."""
        if self.allowed:
            return None
        if self.status in (401, 403):
            return Rejection(self.status, self.reason, headers=self.challenge)
        return Rejection(503, self.reason, headers=((b"Retry-After", b"1"),))


def build_check(spec: AuthConfig, upgrade: ClientUpgrade, *, client_ip: str, scheme: str) -> h11.Request:
    """The subrequest: the passed headers as the client sent them, plus where it was going."""
    host = spec.host if spec.port == 80 else f"{spec.host}:{spec.port}"
    if ":" in spec.host:  # an IPv6 literal
        host = f"[{spec.host}]" + ("" if spec.port == 80 else f":{spec.port}")
    wanted = {name.encode("latin-1") for name in spec.pass_headers}
    headers: list[tuple[bytes, bytes]] = [
        (b"Host", host.encode("latin-1")),
        (b"Connection", b"close"),
        (b"X-Forwarded-For", client_ip.encode("latin-1", "replace")),
        (b"X-Forwarded-Proto", scheme.encode("latin-1")),
        (b"X-Forwarded-Host", upgrade.host),
        (b"X-Forwarded-Uri", upgrade.target),
        (b"X-Forwarded-Method", b"GET"),
    ]
    headers += [(k, v) for k, v in upgrade.raw_headers if k.lower() in wanted]
    return h11.Request(method=b"GET", target=spec.target.encode("ascii"), headers=headers)


def cache_key(request: h11.Request) -> tuple[bytes, ...]:
    """Everything the auth service sees of one check, so a cached answer is the one it would give."""
    return (request.target, *(b"%s:%s" % (k, v) for k, v in request.headers))  # names in lower case


def decide(spec: AuthConfig, response: h11.Response) -> AuthAnswer:
    """The answer for one auth response head."""
    status = response.status_code
    if 200 <= status < 300:
        wanted = {name.encode("latin-1") for name in spec.copy_headers}
        copy = tuple((bytes(k), bytes(v)) for k, v in response.headers.raw_items() if k.lower() in wanted)
        expires_at = None
        if spec.session_expiry_header is not None:
            name = spec.session_expiry_header.encode("latin-1")
            value = next((bytes(v) for k, v in response.headers.raw_items() if k.lower() == name), None)
            if value is not None:
                expires_at = parse_expiry(value, time.time())
                if expires_at is None:
                    log.warning("auth %s: %s: %r is not a time; the session is not bound to it", spec.url, name, value)
        return AuthAnswer(True, status, copy=copy, reason=f"auth service answered {status}", expires_at=expires_at)
    if status in (401, 403):
        challenge = tuple(
            (b"WWW-Authenticate", bytes(v)) for k, v in response.headers.raw_items() if k.lower() == b"www-authenticate"
        )
        return AuthAnswer(False, status, challenge=challenge if status == 401 else (), reason="denied by auth service")
    return AuthAnswer(False, status, reason=f"auth service answered {status}")


class AuthService:
    """Runs auth checks and keeps their caches (one per auth setting); shared by a server's sessions."""

    __slots__ = ("_caches", "counts")

    def __init__(self) -> None:
        self._caches: LRUTable[AuthConfig, TTLCache[tuple[bytes, ...], AuthAnswer]] = LRUTable(MAX_AUTH_CONFIGS)
        self.counts: Counter[str] = Counter()  # allowed, denied, error, cached

    def _cache(self, spec: AuthConfig) -> TTLCache[tuple[bytes, ...], AuthAnswer] | None:
        if spec.cache is None:
            return None
        cache = self._caches.get(spec)
        if cache is None:
            cache = TTLCache(spec.cache_entries, spec.cache)
            self._caches.put(spec, cache)
        return cache

    async def check(
        self,
        spec: AuthConfig,
        upgrade: ClientUpgrade,
        *,
        client_ip: str,
        scheme: str,
        max_header_bytes: int,
        fresh: bool = False,
    ) -> AuthAnswer:
        """The auth service's answer (a cached one unless `fresh`: a recheck before expiry)."""
        request = build_check(spec, upgrade, client_ip=client_ip, scheme=scheme)
        cache = self._cache(spec)
        key = cache_key(request) if cache is not None else ()
        if cache is not None and not fresh:
            hit = cache.get(key, trio.current_time())
            if hit is not None:
                self.counts["cached"] += 1
                return hit
        answer = await self._ask(spec, request, max_header_bytes)
        if answer.allowed:
            self.counts["allowed"] += 1
        elif answer.status in (401, 403):
            self.counts["denied"] += 1
        else:
            self.counts["error"] += 1
            log.warning("auth %s for %s: %s", spec.url, client_ip, answer.reason)
        if cache is not None and (answer.allowed or answer.status in (401, 403)):
            cache.put(key, answer, trio.current_time())
        return answer

    async def _ask(self, spec: AuthConfig, request: h11.Request, max_header_bytes: int) -> AuthAnswer:
        """One subrequest within `spec.timeout`, connect included."""
        answer = AuthAnswer(False, 0, reason=f"auth service {spec.url} did not answer within {spec.timeout:g}s")
        with trio.move_on_after(spec.timeout):
            try:
                stream = await trio.open_tcp_stream(spec.host, spec.port)
            except OSError as exc:
                return AuthAnswer(False, 0, reason=f"cannot connect to auth service {spec.url}: {exc}")
            try:
                answer = await _exchange(spec, stream, request, max_header_bytes)
            finally:
                await trio.aclose_forcefully(stream)
        return answer


async def _exchange(
    spec: AuthConfig, stream: trio.SocketStream, request: h11.Request, max_header_bytes: int
) -> AuthAnswer:
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=max_header_bytes)
    try:
        await stream.send_all(conn.send(request) + conn.send(h11.EndOfMessage()))
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(RECEIVE_SIZE))
                continue
            if isinstance(event, h11.InformationalResponse):
                continue  # 100 Continue and the like: the real answer follows
            if isinstance(event, h11.Response):
                return decide(spec, event)
            return AuthAnswer(False, 0, reason=f"auth service {spec.url} closed without an answer")
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        return AuthAnswer(False, 0, reason=f"auth service {spec.url}: connection failed: {exc}")
    except h11.ProtocolError as exc:
        return AuthAnswer(False, 0, reason=f"auth service {spec.url}: bad response: {exc}")
