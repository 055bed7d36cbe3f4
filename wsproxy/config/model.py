"""The configuration's frozen dataclasses: what a running proxy reads, typed, with nothing left
to parse (the loader builds them; nothing else does)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from wsproxy.config import defaults
from wsproxy.config.origins import OriginPattern

BALANCE_POLICIES = ("round_robin", "least_conn", "random_two", "consistent_hash")
HASH_FALLBACKS = ("least_conn", "reject")
HASH_KEY_KINDS = ("header", "cookie", "query")
HASH_KEY_PLAIN = ("path", "client_ip")
RELAY_MODES = ("passthrough", "inspect")
PROXY_PROTOCOL_VERSIONS = ("v1", "v2")
HEARTBEAT_LEGS = ("both", "client", "backend", "none")
HEALTH_CHECKS = ("tcp", "http", "websocket")
HTTP_MODES = ("proxy", "reject")  # listeners[].http: what a request that is not an Upgrade gets
SAME_SITE = ("lax", "strict", "none")
DISCOVERY_TYPES = ("SRV", "A", "AAAA")
LOG_QUERY_MODES = ("redact", "keep", "drop")


class ConfigError(Exception):
    """Invalid configuration: carries every problem found, each with its key path."""

    def __init__(self, source: str, problems: list[tuple[str, str]]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(self.render())

    def render(self) -> str:
        lines = [f"{self.source}: invalid configuration ({len(self.problems)} error(s))"]
        lines += [f"  {self.source}: {path or '<top>'}: {msg}" for path, msg in self.problems]
        return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


@dataclass(frozen=True, slots=True)
class CertKey:
    """One certificate chain and its private key (PEM files)."""

    cert: Path
    key: Path


@dataclass(frozen=True, slots=True)
class TLSConfig:
    """A listener's certificates: the first is the default, the others are chosen by SNI."""

    certs: tuple[CertKey, ...]

    @property
    def cert(self) -> Path:
        return self.certs[0].cert

    @property
    def key(self) -> Path:
        return self.certs[0].key


@dataclass(frozen=True, slots=True)
class RouteMatch:
    host: str | None = None  # lower case, no port; "*.example.com" matches subdomains
    path_prefix: str | None = None


@dataclass(frozen=True, slots=True)
class AuthConfig:
    """Ask an HTTP service whether a handshake may go on (see docs/security.md)."""

    url: str
    host: str  # where to connect, and the Host header
    port: int
    target: str  # path and query of the check request
    timeout: float = defaults.AUTH_TIMEOUT
    pass_headers: tuple[str, ...] = defaults.AUTH_PASS_HEADERS  # lower case
    copy_headers: tuple[str, ...] = ()  # lower case; from the 2xx answer into the upstream request
    cache: float | None = defaults.AUTH_CACHE  # seconds an answer is reused; None: never
    cache_entries: int = defaults.AUTH_CACHE_ENTRIES
    session_expiry_header: str | None = defaults.AUTH_SESSION_EXPIRY_HEADER  # lower case; None: off
    recheck_before: float | None = defaults.AUTH_RECHECK_BEFORE  # ask again this long before expiry


@dataclass(frozen=True, slots=True)
class Route:
    pool: str
    match: RouteMatch | None = None  # None: the default route
    allowed_subprotocols: tuple[str, ...] | None = None  # None: any (the listener's, resolved at parse time)
    auth: AuthConfig | None = None  # None: no auth check (the listener's, resolved at parse time)


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    address: Address
    pool: str | None
    routes: tuple[Route, ...]
    tls: TLSConfig | None
    deflate: bool
    relay: str = defaults.RELAY
    proxy_protocol: bool = False  # expect a PROXY v1/v2 header from an L4 balancer in front
    allowed_origins: tuple[OriginPattern, ...] | None = None  # None: any origin
    allowed_subprotocols: tuple[str, ...] | None = None  # for `pool:`; routes carry their own
    auth: AuthConfig | None = None  # for `pool:`; routes carry their own
    http: str = defaults.HTTP_MODE  # proxy: plain HTTP requests go to the pool; reject: 426
    # peers whose forwarding headers are kept and believed (docs/security.md)
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = defaults.TRUSTED_PROXIES
    backlog: int = defaults.LISTEN_BACKLOG  # the kernel's accept queue (listen(2)); capped by somaxconn

    @property
    def scheme(self) -> str:
        return "wss" if self.tls else "ws"


@dataclass(frozen=True, slots=True)
class HashKey:
    kind: str  # header | cookie | query | path | client_ip
    name: str | None = None  # for header (lower case), cookie and query

    def __str__(self) -> str:
        return f"{self.kind}:{self.name}" if self.name is not None else self.kind


@dataclass(frozen=True, slots=True)
class BackendConfig:
    address: Address
    weight: int = defaults.WEIGHT
    max_sessions: int | None = defaults.MAX_SESSIONS  # a full backend is skipped by the balancer
    tls: bool = False  # a wss:// address (or the pool's `tls`): TLS to this backend

    @property
    def name(self) -> str:
        return str(self.address)


@dataclass(frozen=True, slots=True)
class BackendTLS:
    """How the proxy speaks TLS to a pool's backends (`pools.NAME.tls`, or wss:// addresses)."""

    ca: Path | None = None  # None: the system's trust store (`ca: system`)
    server_name: str | None = None  # None: each backend's host
    verify: bool = defaults.BACKEND_TLS_VERIFY
    cert: Path | None = None  # with key: a client certificate (mutual TLS)
    key: Path | None = None


@dataclass(frozen=True, slots=True)
class HttpPool:
    """Idle HTTP/1.1 connections kept per backend for plain requests (`pools.NAME.http_pool`)."""

    max_idle: int = defaults.HTTP_POOL_MAX_IDLE  # per backend; 0: a connection per request
    idle_timeout: float = defaults.HTTP_POOL_IDLE_TIMEOUT


@dataclass(frozen=True, slots=True)
class Sticky:
    """Session affinity by cookie (`pools.NAME.sticky`): see policy/sticky.py."""

    cookie: str = defaults.STICKY_COOKIE
    max_age: float | None = defaults.STICKY_MAX_AGE  # None: a session cookie
    secure: str = defaults.STICKY_SECURE  # auto (when the client spoke TLS) | true | false
    http_only: bool = defaults.STICKY_HTTP_ONLY
    same_site: str = defaults.STICKY_SAME_SITE  # lax | strict | none
    secret: bytes | None = None  # None: the proxy's own random secret (shared by its workers)


@dataclass(frozen=True, slots=True)
class PoolConfig:
    name: str
    backends: tuple[BackendConfig, ...]
    balance: str = defaults.BALANCE
    retries: int = defaults.RETRIES
    hash_key: HashKey | None = None
    hash_balance_factor: float = defaults.HASH_BALANCE_FACTOR
    hash_fallback: str = defaults.HASH_FALLBACK
    send_proxy_protocol: str | None = None  # "v1" | "v2": tell backends the real client address
    rebalance_rate: float | None = None  # sessions/s moved off overloaded backends after a reload; None: off
    max_sessions: int | None = defaults.MAX_SESSIONS  # over it: 503 before the 101
    health: ActiveHealth | None = None  # None: no active checks
    passive: PassiveHealth | None = field(default_factory=lambda: PassiveHealth())  # None: off
    close_sessions_on_down: bool = defaults.CLOSE_SESSIONS_ON_DOWN
    drain_window: float = defaults.DOWN_DRAIN_WINDOW
    tls: BackendTLS | None = None  # None: plain, except backends given as wss:// (default settings)
    http_pool: HttpPool = field(default_factory=HttpPool)
    sticky: Sticky | None = None  # None: no affinity cookie

    def backend_tls(self, backend: BackendConfig) -> BackendTLS | None:
        """The TLS settings for `backend`, or None for plain TCP."""
        if self.tls is not None:
            return self.tls
        return BackendTLS() if backend.tls else None

    discovery: DnsDiscovery | None = None  # backends from DNS instead of `backends:` (None: static)


@dataclass(frozen=True, slots=True)
class ActiveHealth:
    """A pool's active checks: one probe per backend every `interval` (see health.py)."""

    interval: float = defaults.HEALTH_INTERVAL
    timeout: float = defaults.HEALTH_TIMEOUT
    rise: int = defaults.HEALTH_RISE
    fall: int = defaults.HEALTH_FALL
    check: str = defaults.HEALTH_CHECK  # tcp | http | websocket
    path: str = defaults.HEALTH_PATH
    slow_start: float | None = defaults.HEALTH_SLOW_START


@dataclass(frozen=True, slots=True)
class PassiveHealth:
    """Ejection of a backend whose real connects and handshakes keep failing (see health.py)."""

    failures: int = defaults.PASSIVE_FAILURES
    window: float = defaults.PASSIVE_WINDOW
    eject_for: float = defaults.PASSIVE_EJECT_FOR
    max_eject_for: float = defaults.PASSIVE_MAX_EJECT_FOR


@dataclass(frozen=True, slots=True)
class DnsDiscovery:
    """`pools.NAME.discovery.dns`: the pool's backends are what this name answers (see discovery.py)."""

    name: str  # lower case, no trailing dot
    type: str = defaults.DISCOVERY_TYPE  # SRV | A | AAAA
    port: int | None = None  # A/AAAA only: the backends' port
    nameservers: tuple[Address, ...] = ()  # empty: the system's resolver configuration
    interval: float = defaults.DISCOVERY_INTERVAL
    max_interval: float = defaults.DISCOVERY_MAX_INTERVAL
    timeout: float = defaults.DISCOVERY_TIMEOUT


@dataclass(frozen=True, slots=True)
class SharedState:
    """`shared_state`: the fleet's counts, caps and rate limits in Redis (see docs/scale-out.md)."""

    redis: str  # redis://HOST:PORT/DB
    key_prefix: str = defaults.SHARED_STATE_KEY_PREFIX
    timeout: float = defaults.SHARED_STATE_TIMEOUT
    refresh: float = defaults.SHARED_STATE_REFRESH
    process_ttl: float = defaults.SHARED_STATE_PROCESS_TTL


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect: float = defaults.CONNECT_TIMEOUT
    handshake: float = defaults.HANDSHAKE_TIMEOUT
    close: float = defaults.CLOSE_TIMEOUT
    idle: float | None = defaults.IDLE_TIMEOUT
    max_lifetime: float | None = defaults.MAX_LIFETIME
    max_lifetime_jitter: float = defaults.MAX_LIFETIME_JITTER
    http_idle: float = defaults.HTTP_IDLE_TIMEOUT  # a keep-alive client connection between requests
    http_response: float = defaults.HTTP_RESPONSE_TIMEOUT  # a backend's answer to a plain request


@dataclass(frozen=True, slots=True)
class Limits:
    max_header_bytes: int = defaults.MAX_HEADER_BYTES
    buffer_bytes: int = defaults.BUFFER_BYTES
    splice_min_bytes: int | None = defaults.SPLICE_MIN_BYTES  # None: never splice
    max_message_bytes: int = defaults.MAX_MESSAGE_BYTES
    slow_consumer_timeout: float | None = defaults.SLOW_CONSUMER_TIMEOUT
    max_sessions: int | None = defaults.MAX_SESSIONS  # all listeners together; over it: 503
    retry_after: float = defaults.RETRY_AFTER
    max_body_bytes: int = defaults.MAX_BODY_BYTES  # a plain HTTP request's body; over it: 413


@dataclass(frozen=True, slots=True)
class RateLimit:
    """A token bucket: `rate` tokens per second, at most `burst` saved up."""

    rate: float
    burst: float


@dataclass(frozen=True, slots=True)
class RateLimits:
    handshakes_per_ip: RateLimit | None = defaults.HANDSHAKES_PER_IP
    max_sessions_per_ip: int | None = defaults.MAX_SESSIONS_PER_IP
    messages: RateLimit | None = defaults.MESSAGE_RATE
    bytes: RateLimit | None = defaults.BYTE_RATE
    close_after: float | None = defaults.RATE_CLOSE_AFTER
    max_tracked_ips: int = defaults.MAX_TRACKED_IPS


@dataclass(frozen=True, slots=True)
class Heartbeat:
    interval: float | None = defaults.HEARTBEAT_INTERVAL  # None: off
    timeout: float = defaults.HEARTBEAT_TIMEOUT
    legs: str = defaults.HEARTBEAT_LEGS

    @property
    def leg_names(self) -> tuple[str, ...]:
        if self.interval is None or self.legs == "none":
            return ()
        return ("client", "backend") if self.legs == "both" else (self.legs,)


@dataclass(frozen=True, slots=True)
class Shutdown:
    deadline: float = defaults.SHUTDOWN_DEADLINE
    drain_window: float = defaults.SHUTDOWN_DRAIN_WINDOW


@dataclass(frozen=True, slots=True)
class Reload:
    drain_window: float = defaults.RELOAD_DRAIN_WINDOW


@dataclass(frozen=True, slots=True)
class AdminConfig:
    """The admin listener: /metrics, /healthz, /readyz, /status (see docs/observability.md)."""

    address: Address
    allow_remote: bool = defaults.ADMIN_ALLOW_REMOTE
    token_file: Path | None = defaults.ADMIN_TOKEN_FILE  # the write API's secret (read at start and reload)
    token_env: str | None = defaults.ADMIN_TOKEN_ENV  # ... or the environment variable holding it
    hosts: tuple[str, ...] = defaults.ADMIN_HOSTS  # Host names answered besides its address and localhost

    @property
    def writable(self) -> bool:
        """A token source is configured: the write API is on."""
        return self.token_file is not None or self.token_env is not None


@dataclass(frozen=True, slots=True)
class AdmissionConfig:
    """The storm shield: budgets of new upgrades, global and per pool (see docs/operations.md)."""

    upgrades: RateLimit | None = defaults.ADMISSION_UPGRADES
    per_pool: dict[str, RateLimit] = field(default_factory=dict)
    retry_after_spread: float = defaults.ADMISSION_RETRY_AFTER_SPREAD


@dataclass(frozen=True, slots=True)
class ObservabilityConfig:
    reconnect_window: float = defaults.RECONNECT_WINDOW
    reconnect_clients: int = defaults.RECONNECT_CLIENTS


@dataclass(frozen=True, slots=True)
class LogConfig:
    format: str = defaults.LOG_FORMAT  # text | json
    level: str = defaults.LOG_LEVEL  # debug | info | warning | error
    query: str = defaults.LOG_QUERY  # redact | keep | drop: query strings wherever a target is shown


@dataclass(frozen=True, slots=True)
class Config:
    source: str
    listeners: tuple[ListenerConfig, ...]
    pools: dict[str, PoolConfig]
    admin: AdminConfig | None = None  # None: no admin listener
    log: LogConfig = field(default_factory=LogConfig)
    timeouts: Timeouts = field(default_factory=Timeouts)
    limits: Limits = field(default_factory=Limits)
    shutdown: Shutdown = field(default_factory=Shutdown)
    heartbeat: Heartbeat = field(default_factory=Heartbeat)
    reload: Reload = field(default_factory=Reload)
    rate_limits: RateLimits = field(default_factory=RateLimits)
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    observability: ObservabilityConfig = field(default_factory=ObservabilityConfig)
    workers: int = defaults.WORKERS
    pid_file: Path | None = None
    shared_state: SharedState | None = None  # None: every process counts and limits alone
    digest: str = ""  # sha256 of the file's text, to tell snapshots apart in logs

    def summary(self) -> str:
        """A one-screen description for `wsproxy check`."""
        out = [f"{self.source}: OK (sha256 {self.digest[:12]})", "listeners:"]
        for lst in self.listeners:
            target = f"pool {lst.pool}" if lst.pool else f"{len(lst.routes)} route(s)"
            tls = f" tls ({len(lst.tls.certs)} certificates, by SNI)" if lst.tls and len(lst.tls.certs) > 1 else ""
            tls = (tls or (" tls" if lst.tls else "")) + (" http=reject" if lst.http == "reject" else "")
            out.append(f"  {lst.scheme}://{lst.address} -> {target}{tls}")
            for r in lst.routes:
                m = r.match
                desc = "default" if m is None else f"host={m.host or '*'} path_prefix={m.path_prefix or '/'}"
                out.append(f"      {desc} -> pool {r.pool}")
        out.append("pools:")
        for pool in self.pools.values():
            extra = f" key={pool.hash_key}" if pool.hash_key else ""
            extra += f" sticky={pool.sticky.cookie}" if pool.sticky else ""
            extra += " tls" if pool.tls or any(b.tls for b in pool.backends) else ""
            if pool.discovery is not None:
                d = pool.discovery
                out.append(f"  {pool.name}: {pool.balance}{extra}, backends from DNS {d.type} {d.name}")
                continue
            out.append(f"  {pool.name}: {pool.balance}{extra}, {len(pool.backends)} backend(s)")
            for b in pool.backends:
                out.append(f"    {b.address} weight={b.weight}")
        t = self.timeouts
        out.append(f"timeouts: connect={t.connect}s handshake={t.handshake}s close={t.close}s")
        return "\n".join(out)
