"""YAML text to a frozen, validated configuration snapshot.

The whole file is checked before anything uses it, and every problem is collected (not just
the first), each with the file, the key path and what is wrong. Unknown keys are errors: a typo
must never be silently ignored. A running proxy holds one `Config`; a reload builds a new one.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from wsproxy import defaults
from wsproxy.origin import OriginPattern, parse_origin_pattern, parse_subprotocol

BALANCE_POLICIES = ("round_robin", "least_conn", "random_two", "consistent_hash")
HASH_FALLBACKS = ("least_conn", "reject")
HASH_KEY_KINDS = ("header", "cookie", "query")
HASH_KEY_PLAIN = ("path", "client_ip")
RELAY_MODES = ("passthrough", "inspect")
PROXY_PROTOCOL_VERSIONS = ("v1", "v2")
HEARTBEAT_LEGS = ("both", "client", "backend", "none")
HEALTH_CHECKS = ("tcp", "http", "websocket")


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
class TLSConfig:
    cert: Path
    key: Path


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

    @property
    def name(self) -> str:
        return str(self.address)


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
class Timeouts:
    connect: float = defaults.CONNECT_TIMEOUT
    handshake: float = defaults.HANDSHAKE_TIMEOUT
    close: float = defaults.CLOSE_TIMEOUT
    idle: float | None = defaults.IDLE_TIMEOUT
    max_lifetime: float | None = defaults.MAX_LIFETIME
    max_lifetime_jitter: float = defaults.MAX_LIFETIME_JITTER


@dataclass(frozen=True, slots=True)
class Limits:
    max_header_bytes: int = defaults.MAX_HEADER_BYTES
    buffer_bytes: int = defaults.BUFFER_BYTES
    max_message_bytes: int = defaults.MAX_MESSAGE_BYTES
    slow_consumer_timeout: float | None = defaults.SLOW_CONSUMER_TIMEOUT
    max_sessions: int | None = defaults.MAX_SESSIONS  # all listeners together; over it: 503
    retry_after: float = defaults.RETRY_AFTER


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


@dataclass(frozen=True, slots=True)
class LogConfig:
    format: str = defaults.LOG_FORMAT  # text | json
    level: str = defaults.LOG_LEVEL  # debug | info | warning | error


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
    workers: int = defaults.WORKERS
    pid_file: Path | None = None
    digest: str = ""  # sha256 of the file's text, to tell snapshots apart in logs

    def summary(self) -> str:
        """A one-screen description for `wsproxy check`."""
        out = [f"{self.source}: OK (sha256 {self.digest[:12]})", "listeners:"]
        for lst in self.listeners:
            target = f"pool {lst.pool}" if lst.pool else f"{len(lst.routes)} route(s)"
            tls = " tls" if lst.tls else ""
            out.append(f"  {lst.scheme}://{lst.address} -> {target}{tls}")
            for r in lst.routes:
                m = r.match
                desc = "default" if m is None else f"host={m.host or '*'} path_prefix={m.path_prefix or '/'}"
                out.append(f"      {desc} -> pool {r.pool}")
        out.append("pools:")
        for pool in self.pools.values():
            extra = f" key={pool.hash_key}" if pool.hash_key else ""
            out.append(f"  {pool.name}: {pool.balance}{extra}, {len(pool.backends)} backend(s)")
            for b in pool.backends:
                out.append(f"    {b.address} weight={b.weight}")
        t = self.timeouts
        out.append(f"timeouts: connect={t.connect}s handshake={t.handshake}s close={t.close}s")
        return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# primitive parsers: each returns the value or raises ValueError with a message for the user

MAX_DURATION = 365 * 24 * 3600.0
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: Any) -> float:
    """Seconds from a number or a string such as "250ms", "10s", "5m", "1h"."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        number, unit = value, None
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        number, unit = m.group(1), m.group(2)
    else:
        raise ValueError(f'expected a duration such as 10, "250ms", "10s", "5m", got {value!r}')
    try:
        seconds = float(number) * _UNITS[unit]
    except OverflowError:
        raise ValueError(f"duration {value!r} is too large") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"expected a positive duration, got {value!r}")
    if seconds > MAX_DURATION:
        raise ValueError(f"duration {value!r} is over the maximum of {MAX_DURATION:g}s (one year)")
    return seconds


def parse_window(value: Any) -> float:
    """A duration that may be 0 (a drain window of 0: all at once)."""
    if value in (0, "0", "0s", "0ms"):
        return 0.0
    return parse_duration(value)


def parse_optional_duration(value: Any) -> float | None:
    """A duration, or `off` (also null / false) for a timer that never fires."""
    if value is None or value is False or (isinstance(value, str) and value.strip().lower() == "off"):
        return None
    return parse_duration(value)


def parse_fraction(value: Any) -> float:
    """0.1 or "10%": a fraction in [0, 1)."""
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            number = float(value.strip()[:-1]) / 100.0
        except ValueError:
            raise ValueError(f'expected a fraction such as 0.1 or "10%", got {value!r}') from None
    elif isinstance(value, int | float) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:
            raise ValueError(f"{value!r} is too large for a fraction") from None
    else:
        raise ValueError(f'expected a fraction such as 0.1 or "10%", got {value!r}')
    if not 0.0 <= number < 1.0:
        raise ValueError(f"expected a fraction from 0 up to (not including) 100%, got {value!r}")
    return number


def parse_size(value: Any) -> int:
    """Bytes: a whole number or "64KiB", "16MiB", "1GiB"."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+)\s*(B|KiB|MiB|GiB)?\s*", value)
        if m:
            number = int(m.group(1)) * {None: 1, "B": 1, "KiB": 1024, "MiB": 1 << 20, "GiB": 1 << 30}[m.group(2)]
            if number > 0:
                return number
    raise ValueError(f'expected a positive size in bytes such as 65536 or "64MiB", got {value!r}')


def parse_address(value: Any, *, allow_port_zero: bool = False) -> Address:
    """`host:port` or `[v6]:port`."""
    if not isinstance(value, str):
        raise ValueError(f"expected host:port, got {value!r}")
    text = value.strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1 : end + 2] != ":":
            raise ValueError(f"expected [ipv6]:port, got {value!r}")
        host, port_text = text[1:end], text[end + 2 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"expected host:port, got {value!r}")
        if ":" in host:
            raise ValueError(f"IPv6 addresses need brackets, as [{host}]:{port_text}")
    if not port_text.isdigit():
        raise ValueError(f"port must be a number, got {port_text!r} in {value!r}")
    port = int(port_text)
    low = 0 if allow_port_zero else 1
    if not low <= port <= 65535:
        raise ValueError(f"port must be {low}..65535, got {port}")
    return Address(host, port)


def parse_hash_key(value: Any) -> HashKey:
    if not isinstance(value, str):
        raise ValueError(f"expected header:NAME, cookie:NAME, query:NAME, path or client_ip, got {value!r}")
    if value in HASH_KEY_PLAIN:
        return HashKey(value)
    kind, sep, name = value.partition(":")
    if sep and kind in HASH_KEY_KINDS and name.strip():
        name = name.strip()
        return HashKey(kind, name.lower() if kind == "header" else name)
    raise ValueError(f"expected header:NAME, cookie:NAME, query:NAME, path or client_ip, got {value!r}")


# ---------------------------------------------------------------------------------------------
# the walker: collects problems with key paths instead of stopping at the first one


class _Checker:
    def __init__(self, base_dir: Path) -> None:
        self.problems: list[tuple[str, str]] = []
        self.base_dir = base_dir

    def fail(self, path: str, msg: str) -> None:
        self.problems.append((path, msg))

    def mapping(self, value: Any, path: str, allowed: tuple[str, ...]) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.fail(path, f"expected a mapping, got {type(value).__name__}")
            return {}
        for key in value:
            if key not in allowed:
                hint = f"; known keys: {', '.join(allowed)}" if allowed else ""
                self.fail(_join(path, str(key)), f"unknown key{hint}")
        return value

    def get(self, mapping: dict[str, Any], key: str, path: str, parse: Callable[[Any], Any], default: Any) -> Any:
        if key not in mapping:
            return default
        try:
            return parse(mapping[key])
        except ValueError as exc:
            self.fail(_join(path, key), str(exc))
            return default

    def sequence(self, value: Any, path: str) -> Iterator[tuple[int, Any]]:
        if not isinstance(value, list):
            self.fail(path, f"expected a list, got {type(value).__name__}")
            return
        yield from enumerate(value)

    def path_to_file(self, value: Any) -> Path:
        if not isinstance(value, str) or not value:
            raise ValueError(f"expected a file path, got {value!r}")
        p = Path(value)
        if not p.is_absolute():
            p = self.base_dir / p
        try:
            exists = p.is_file()
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot use {value!r} as a file path: {exc}") from None
        if not exists:
            raise ValueError(f"no such file: {p}")
        return p


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


def _choice(options: tuple[str, ...]) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if value not in options:
            raise ValueError(f"expected one of {', '.join(options)}, got {value!r}")
        return value

    return parse


def _factor(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 1.0 < value <= 100.0:
        raise ValueError(f"expected a number greater than 1 (at most 100), got {value!r}")
    return float(value)


def _bounded_int(low: int, high: int) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"expected a whole number {low}..{high}, got {value!r}")
        return value

    return parse


def _host_pattern(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected a host name or *.domain, got {value!r}")
    host = value.strip().lower()
    if host.endswith(".") and not host.endswith(".."):
        host = host[:-1]  # "example.com." is "example.com", as routing.host_name treats requests
    body = host[2:] if host.startswith("*.") else host
    if not body or "*" in body or "/" in body or ":" in body:
        raise ValueError(f"expected a host name (no port) or *.domain, got {value!r}")
    return host


def _path_prefix(value: Any) -> str:
    if not isinstance(value, str) or not value.startswith("/"):
        raise ValueError(f"expected a path starting with /, got {value!r}")
    return value


# --- edge protection: rates, caps, origins, subprotocols, auth (docs/security.md) -------------------

_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KiB|MiB|GiB)?\s*/\s*(s|m|h)\s*$")
_SIZE_UNITS = {None: 1, "B": 1, "KiB": 1024, "MiB": 1 << 20, "GiB": 1 << 30}
_PER = {"s": 1.0, "m": 60.0, "h": 3600.0}
MAX_RATE = 1e12
# Headers an auth check may neither pass on nor copy into the upstream request: the HTTP framing
# of each hop and the headers the proxy sets itself.
_AUTH_RESERVED = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
_COPY_RESERVED = _AUTH_RESERVED | {"forwarded", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"}
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def parse_rate(value: Any, *, sizes: bool = False) -> float:
    """Events per second from a number (per second) or "20/s", "600/m", "1MiB/s" (sizes: bytes)."""
    hint = '"1MiB/s", "500KiB/s" or a number of bytes per second' if sizes else '"20/s", "600/m" or a number'
    if isinstance(value, int | float) and not isinstance(value, bool):
        rate = float(value)
    elif isinstance(value, str) and (m := _RATE.match(value)) and (sizes or m.group(2) is None):
        rate = float(m.group(1)) * _SIZE_UNITS[m.group(2)] / _PER[m.group(3)]
    else:
        raise ValueError(f"expected a rate such as {hint}, got {value!r}")
    if not math.isfinite(rate) or rate <= 0 or rate > MAX_RATE:
        raise ValueError(f"expected a positive rate (at most {MAX_RATE:g}/s), got {value!r}")
    return rate


def _burst(sizes: bool) -> Callable[[Any], float]:
    def parse(value: Any) -> float:
        if sizes and isinstance(value, str):
            return float(parse_size(value))
        if isinstance(value, bool) or not isinstance(value, int | float) or not 1 <= value <= MAX_RATE:
            raise ValueError(f"expected a burst of at least 1 (a whole number of tokens), got {value!r}")
        return float(value)

    return parse


def _off(value: Any) -> bool:
    """`off`, false or null: a limit or check that is not applied."""
    return value is None or value is False or (isinstance(value, str) and value.strip().lower() == "off")


def _rate_limit(ck: _Checker, parent: dict[str, Any], key: str, path: str, *, sizes: bool) -> RateLimit | None:
    """`{rate, burst}`, or just a rate (burst: one second's worth), or `off`."""
    if key not in parent or _off(parent[key]):
        return None
    kpath = _join(path, key)
    raw = parent[key]
    if not isinstance(raw, dict):
        raw = {"rate": raw}
    m = ck.mapping(raw, kpath, ("rate", "burst"))
    if "rate" not in m:
        ck.fail(_join(kpath, "rate"), "missing")
        return None
    rate = ck.get(m, "rate", kpath, lambda v: parse_rate(v, sizes=sizes), None)
    if rate is None:
        return None
    burst = ck.get(m, "burst", kpath, _burst(sizes), max(1.0, rate))
    return RateLimit(rate=rate, burst=burst)


def _optional_count(value: Any) -> int | None:
    if _off(value):
        return None
    return _bounded_int(1, 10_000_000)(value)


def _header_names(reserved: frozenset[str]) -> Callable[[Any], tuple[str, ...]]:
    def parse(value: Any) -> tuple[str, ...]:
        if not isinstance(value, list):
            raise ValueError(f"expected a list of header names, got {value!r}")
        names: list[str] = []
        for item in value:
            if not isinstance(item, str) or not _HEADER_NAME.fullmatch(item):
                raise ValueError(f"expected a header name, got {item!r}")
            name = item.lower()
            if name in reserved or name.startswith("sec-websocket-"):
                raise ValueError(f"{item} is set by the proxy for each hop and cannot be listed here")
            if name not in names:
                names.append(name)
        return tuple(names)

    return parse


def _auth_url(value: Any) -> tuple[str, int, str]:
    if not isinstance(value, str):
        raise ValueError(f"expected an http:// URL, got {value!r}")
    try:
        url = urlsplit(value.strip())
        port = url.port
    except ValueError as exc:
        raise ValueError(f"{value!r} is not a URL: {exc}") from None
    if url.scheme != "http":
        raise ValueError(f"expected an http:// URL (the auth service should be on a trusted network), got {value!r}")
    if not url.hostname or url.username is not None or url.fragment:
        raise ValueError(f"expected http://host[:port]/path without user or fragment, got {value!r}")
    target = (url.path or "/") + (f"?{url.query}" if url.query else "")
    if any(ord(c) <= 32 or ord(c) >= 127 for c in target):
        raise ValueError(f"the URL's path must be plain ASCII without spaces, got {value!r}")
    return url.hostname, port or 80, target


def _parse_auth(ck: _Checker, path: str, raw: Any) -> AuthConfig | None:
    if _off(raw):
        return None
    m = ck.mapping(raw, path, ("url", "timeout", "pass_headers", "copy_headers", "cache", "cache_entries"))
    if not isinstance(raw, dict):
        return None
    if "url" not in m:
        ck.fail(_join(path, "url"), "missing")
        return None
    where = ck.get(m, "url", path, _auth_url, None)
    timeout = ck.get(m, "timeout", path, parse_duration, defaults.AUTH_TIMEOUT)
    passed = ck.get(m, "pass_headers", path, _header_names(frozenset(_AUTH_RESERVED)), defaults.AUTH_PASS_HEADERS)
    copied = ck.get(m, "copy_headers", path, _header_names(frozenset(_COPY_RESERVED)), ())
    cache = ck.get(m, "cache", path, parse_optional_duration, defaults.AUTH_CACHE)
    entries = ck.get(m, "cache_entries", path, _bounded_int(1, 10_000_000), defaults.AUTH_CACHE_ENTRIES)
    if where is None:
        return None
    host, port, target = where
    return AuthConfig(
        url=str(m["url"]).strip(),
        host=host,
        port=port,
        target=target,
        timeout=timeout,
        pass_headers=passed,
        copy_headers=copied,
        cache=cache,
        cache_entries=entries,
    )


def _origins(value: Any) -> tuple[OriginPattern, ...]:
    if not isinstance(value, list) or not value:
        raise ValueError('expected a non-empty list of origins such as ["https://app.example.com"] (omit: any)')
    return tuple(parse_origin_pattern(v) for v in value)


def _subprotocols(value: Any) -> tuple[str, ...] | None:
    if _off(value):
        return None
    if not isinstance(value, list) or not value:
        raise ValueError("expected a non-empty list of subprotocol names (off: any)")
    return tuple(dict.fromkeys(parse_subprotocol(v) for v in value))


@dataclass(frozen=True, slots=True)
class _RouteRules:
    """What a listener's routes inherit unless they set their own."""

    allowed_subprotocols: tuple[str, ...] | None = None
    auth: AuthConfig | None = None


def _route_rules(ck: _Checker, path: str, m: dict[str, Any], inherit: _RouteRules) -> _RouteRules:
    subprotocols = ck.get(m, "allowed_subprotocols", path, _subprotocols, inherit.allowed_subprotocols)
    auth = _parse_auth(ck, _join(path, "auth"), m["auth"]) if "auth" in m else inherit.auth
    return _RouteRules(allowed_subprotocols=subprotocols, auth=auth)


def _parse_rate_limits(ck: _Checker, raw: Any) -> RateLimits:
    path = "rate_limits"
    m = ck.mapping(
        raw, path, ("handshakes_per_ip", "max_sessions_per_ip", "messages", "bytes", "close_after", "max_tracked_ips")
    )
    return RateLimits(
        handshakes_per_ip=_rate_limit(ck, m, "handshakes_per_ip", path, sizes=False),
        max_sessions_per_ip=ck.get(m, "max_sessions_per_ip", path, _optional_count, defaults.MAX_SESSIONS_PER_IP),
        messages=_rate_limit(ck, m, "messages", path, sizes=False),
        bytes=_rate_limit(ck, m, "bytes", path, sizes=True),
        close_after=ck.get(m, "close_after", path, parse_optional_duration, defaults.RATE_CLOSE_AFTER),
        max_tracked_ips=ck.get(m, "max_tracked_ips", path, _bounded_int(1, 10_000_000), defaults.MAX_TRACKED_IPS),
    )


# ---------------------------------------------------------------------------------------------


def _parse_pool(ck: _Checker, name: str, raw: Any) -> PoolConfig | None:
    path = f"pools.{name}"
    m = ck.mapping(
        raw,
        path,
        (
            "balance",
            "backends",
            "retries",
            "hash_key",
            "hash_balance_factor",
            "hash_fallback",
            "send_proxy_protocol",
            "rebalance",
            "max_sessions",
            *HEALTH_POOL_KEYS,
        ),
    )
    if raw is None or not isinstance(raw, dict):
        if raw is None:
            ck.fail(path, "a pool needs backends")
        return None
    balance = ck.get(m, "balance", path, _choice(BALANCE_POLICIES), defaults.BALANCE)
    retries = ck.get(m, "retries", path, _bounded_int(0, 10), defaults.RETRIES)
    hash_key = ck.get(m, "hash_key", path, parse_hash_key, None)
    factor = ck.get(m, "hash_balance_factor", path, _factor, defaults.HASH_BALANCE_FACTOR)
    fallback = ck.get(m, "hash_fallback", path, _choice(HASH_FALLBACKS), defaults.HASH_FALLBACK)
    send_pp = ck.get(m, "send_proxy_protocol", path, _choice(PROXY_PROTOCOL_VERSIONS), None)
    rb = ck.mapping(m.get("rebalance"), _join(path, "rebalance"), ("max_sessions_per_second",))
    rebalance = ck.get(rb, "max_sessions_per_second", _join(path, "rebalance"), _positive_rate, None)
    pool_max = ck.get(m, "max_sessions", path, _optional_count, defaults.MAX_SESSIONS)
    health, passive, close_on_down, down_drain = _parse_pool_health(ck, path, m)
    if balance == "consistent_hash" and hash_key is None and "hash_key" not in m:
        ck.fail(_join(path, "hash_key"), "consistent_hash needs a hash_key")
    for key in ("hash_key", "hash_balance_factor", "hash_fallback"):
        if key in m and balance != "consistent_hash":
            ck.fail(_join(path, key), f"only meaningful with balance: consistent_hash (balance is {balance})")
    backends: list[BackendConfig] = []
    seen: set[Address] = set()
    if "backends" not in m:
        ck.fail(_join(path, "backends"), "missing: a pool needs at least one backend")
    else:
        bpath = _join(path, "backends")
        for i, raw_b in ck.sequence(m["backends"], bpath):
            b = _parse_backend(ck, f"{bpath}[{i}]", raw_b)
            if b is None:
                continue
            if b.address in seen:
                ck.fail(f"{bpath}[{i}].address", f"{b.address} is listed twice in this pool")
                continue
            seen.add(b.address)
            backends.append(b)
        if isinstance(m["backends"], list) and not m["backends"]:
            ck.fail(bpath, "a pool needs at least one backend")
    return PoolConfig(
        name=name,
        backends=tuple(backends),
        balance=balance,
        retries=retries,
        hash_key=hash_key,
        hash_balance_factor=factor,
        hash_fallback=fallback,
        send_proxy_protocol=send_pp,
        rebalance_rate=rebalance,
        max_sessions=pool_max,
        health=health,
        passive=passive,
        close_sessions_on_down=close_on_down,
        drain_window=down_drain,
    )


HEALTH_POOL_KEYS = ("health", "passive", "close_sessions_on_down", "drain_window")
_ACTIVE_KEYS = ("interval", "timeout", "rise", "fall", "check", "path", "slow_start")
_PASSIVE_KEYS = ("failures", "window", "eject_for", "max_eject_for")
_HEALTH_PATH = re.compile(r"/[\x21-\x7e]*")  # printable ASCII, no spaces: it goes into a request line


def _health_path(value: Any) -> str:
    if not isinstance(value, str) or not _HEALTH_PATH.fullmatch(value):
        raise ValueError(f"expected a path starting with / (printable ASCII, no spaces), got {value!r}")
    return value


def _is_off(value: Any) -> bool:
    return value is False or (isinstance(value, str) and value.strip().lower() == "off")


def _parse_pool_health(
    ck: _Checker, path: str, m: dict[str, Any]
) -> tuple[ActiveHealth | None, PassiveHealth | None, bool, float]:
    """A pool's `health`, `passive`, `close_sessions_on_down` and `drain_window` keys."""
    active = None
    if "health" in m:
        hpath = _join(path, "health")
        h = ck.mapping(m["health"], hpath, _ACTIVE_KEYS)
        interval = ck.get(h, "interval", hpath, parse_duration, defaults.HEALTH_INTERVAL)
        timeout = ck.get(h, "timeout", hpath, parse_duration, min(defaults.HEALTH_TIMEOUT, interval))
        if "timeout" in h and timeout > interval:
            ck.fail(_join(hpath, "timeout"), f"{timeout:g}s is longer than the interval ({interval:g}s)")
        check = ck.get(h, "check", hpath, _choice(HEALTH_CHECKS), defaults.HEALTH_CHECK)
        if "path" in h and check == "tcp":
            ck.fail(_join(hpath, "path"), "only meaningful with check: http or websocket (check is tcp)")
        active = ActiveHealth(
            interval=interval,
            timeout=timeout,
            rise=ck.get(h, "rise", hpath, _bounded_int(1, 100), defaults.HEALTH_RISE),
            fall=ck.get(h, "fall", hpath, _bounded_int(1, 100), defaults.HEALTH_FALL),
            check=check,
            path=ck.get(h, "path", hpath, _health_path, defaults.HEALTH_PATH),
            slow_start=ck.get(h, "slow_start", hpath, parse_optional_duration, defaults.HEALTH_SLOW_START),
        )
    passive: PassiveHealth | None = PassiveHealth()
    if "passive" in m and _is_off(m["passive"]):
        passive = None
    elif "passive" in m:
        ppath = _join(path, "passive")
        pm = ck.mapping(m["passive"], ppath, _PASSIVE_KEYS)
        eject_for = ck.get(pm, "eject_for", ppath, parse_duration, defaults.PASSIVE_EJECT_FOR)
        max_eject_for = ck.get(
            pm, "max_eject_for", ppath, parse_duration, max(defaults.PASSIVE_MAX_EJECT_FOR, eject_for)
        )
        if max_eject_for < eject_for:
            ck.fail(_join(ppath, "max_eject_for"), f"{max_eject_for:g}s is shorter than eject_for ({eject_for:g}s)")
        passive = PassiveHealth(
            failures=ck.get(pm, "failures", ppath, _bounded_int(1, 100), defaults.PASSIVE_FAILURES),
            window=ck.get(pm, "window", ppath, parse_duration, defaults.PASSIVE_WINDOW),
            eject_for=eject_for,
            max_eject_for=max_eject_for,
        )
    close_on_down = ck.get(m, "close_sessions_on_down", path, _bool, defaults.CLOSE_SESSIONS_ON_DOWN)
    drain = ck.get(m, "drain_window", path, parse_duration, defaults.DOWN_DRAIN_WINDOW)
    if close_on_down and active is None and "health" not in m:
        ck.fail(_join(path, "close_sessions_on_down"), "needs active health checks (a health mapping) to mark down")
    if "drain_window" in m and not close_on_down:
        ck.fail(_join(path, "drain_window"), "only meaningful with close_sessions_on_down: true")
    return active, passive, close_on_down, drain


def _parse_backend(ck: _Checker, path: str, raw: Any) -> BackendConfig | None:
    if isinstance(raw, str):  # shorthand: "- 127.0.0.1:9001"
        raw = {"address": raw}
    m = ck.mapping(raw, path, ("address", "weight", "max_sessions"))
    if "address" not in m:
        if isinstance(raw, dict):
            ck.fail(_join(path, "address"), "missing")
        return None
    address = ck.get(m, "address", path, parse_address, None)
    weight = ck.get(m, "weight", path, _bounded_int(1, 1000), defaults.WEIGHT)
    max_sessions = ck.get(m, "max_sessions", path, _optional_count, defaults.MAX_SESSIONS)
    if address is None:
        return None
    return BackendConfig(address=address, weight=weight, max_sessions=max_sessions)


def _positive_rate(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 100_000:
        raise ValueError(f"expected a number of sessions per second in (0, 100000], got {value!r}")
    return float(value)


def _workers(value: Any) -> int:
    if value == "auto":
        return max(1, os.cpu_count() or 1)
    return _bounded_int(1, 256)(value)


def _pid_path(value: Any, base: Path) -> Path:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("expected a file path")
    p = Path(value)
    return p if p.is_absolute() else (base / p)


def _no_pool(name: Any, pools: dict[str, Any]) -> str:
    return f"no pool named {name!r} (pools: {', '.join(str(p) for p in pools) or 'none'})"


def _parse_listener(ck: _Checker, path: str, raw: Any, pools: dict[str, Any]) -> ListenerConfig | None:
    m = ck.mapping(
        raw,
        path,
        (
            "address",
            "pool",
            "routes",
            "tls",
            "deflate",
            "relay",
            "proxy_protocol",
            "allowed_origins",
            "allowed_subprotocols",
            "auth",
        ),
    )
    if not isinstance(raw, dict):
        return None
    rules = _route_rules(ck, path, m, _RouteRules())
    origins = ck.get(m, "allowed_origins", path, _origins, None)
    address = None
    if "address" not in m:
        ck.fail(_join(path, "address"), "missing")
    else:
        address = ck.get(m, "address", path, lambda v: parse_address(v, allow_port_zero=True), None)
    pool = None
    routes: list[Route] = []
    if "pool" in m and "routes" in m:
        ck.fail(path, "give either pool or routes, not both")
    elif "pool" in m:
        pool = m["pool"]
        if not isinstance(pool, str) or pool not in pools:
            ck.fail(_join(path, "pool"), _no_pool(pool, pools))
            pool = None
    elif "routes" in m:
        rpath = _join(path, "routes")
        for i, raw_r in ck.sequence(m["routes"], rpath):
            r = _parse_route(ck, f"{rpath}[{i}]", raw_r, pools, rules)
            if r is not None:
                routes.append(r)
        if isinstance(m["routes"], list) and not m["routes"]:
            ck.fail(rpath, "expected at least one route")
    else:
        ck.fail(path, "a listener needs a pool or routes")
    tls = None
    if "tls" in m:
        tpath = _join(path, "tls")
        t = ck.mapping(m["tls"], tpath, ("cert", "key"))
        for key in ("cert", "key"):
            if key not in t and isinstance(m["tls"], dict):
                ck.fail(_join(tpath, key), "missing")
        cert = ck.get(t, "cert", tpath, ck.path_to_file, None)
        key = ck.get(t, "key", tpath, ck.path_to_file, None)
        if cert is not None and key is not None:
            tls = TLSConfig(cert=cert, key=key)
    deflate = ck.get(m, "deflate", path, _bool, defaults.DEFLATE)
    relay = ck.get(m, "relay", path, _choice(RELAY_MODES), defaults.RELAY)
    proxy_protocol = ck.get(m, "proxy_protocol", path, _bool, False)
    if address is None:
        return None
    return ListenerConfig(
        address=address,
        pool=pool,
        routes=tuple(routes),
        tls=tls,
        deflate=deflate,
        relay=relay,
        proxy_protocol=proxy_protocol,
        allowed_origins=origins,
        allowed_subprotocols=rules.allowed_subprotocols,
        auth=rules.auth,
    )


def _parse_route(
    ck: _Checker, path: str, raw: Any, pools: dict[str, Any], inherit: _RouteRules = _RouteRules()
) -> Route | None:
    m = ck.mapping(raw, path, ("match", "pool", "allowed_subprotocols", "auth"))
    if not isinstance(raw, dict):
        return None
    rules = _route_rules(ck, path, m, inherit)
    pool = m.get("pool")
    if not isinstance(pool, str) or pool not in pools:
        ck.fail(_join(path, "pool"), _no_pool(pool, pools))
        return None
    if "match" not in m:
        return Route(pool=pool, allowed_subprotocols=rules.allowed_subprotocols, auth=rules.auth)
    mpath = _join(path, "match")
    mm = ck.mapping(m["match"], mpath, ("host", "path_prefix"))
    host = ck.get(mm, "host", mpath, _host_pattern, None)
    prefix = ck.get(mm, "path_prefix", mpath, _path_prefix, None)
    if host is None and prefix is None:
        ck.fail(mpath, "a match needs host and/or path_prefix (omit match for a default route)")
        return None
    return Route(
        pool=pool,
        match=RouteMatch(host=host, path_prefix=prefix),
        allowed_subprotocols=rules.allowed_subprotocols,
        auth=rules.auth,
    )


LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")


def _parse_admin_and_log(ck: _Checker, top: dict[str, Any]) -> tuple[AdminConfig | None, LogConfig]:
    """`admin` (absent: off; a non-loopback address needs allow_remote: true) and `log`."""
    admin = None
    if "admin" in top:
        a = ck.mapping(top["admin"], "admin", ("address", "allow_remote"))
        if "address" not in a and (top["admin"] is None or isinstance(top["admin"], dict)):
            ck.fail("admin.address", "missing: where the admin listener binds, e.g. 127.0.0.1:9900")
        address = ck.get(a, "address", "admin", lambda v: parse_address(v, allow_port_zero=True), None)
        allow_remote = ck.get(a, "allow_remote", "admin", _bool, defaults.ADMIN_ALLOW_REMOTE)
        if address is not None and not address.is_loopback and not allow_remote:
            ck.fail(
                "admin.address",
                f"{address} is not a loopback address: the admin listener shows sessions and metrics, "
                "so binding it elsewhere needs admin.allow_remote: true",
            )
        if address is not None:
            admin = AdminConfig(address=address, allow_remote=allow_remote)
    lg = ck.mapping(top.get("log"), "log", ("format", "level"))
    log_config = LogConfig(
        format=ck.get(lg, "format", "log", _choice(LOG_FORMATS), defaults.LOG_FORMAT),
        level=ck.get(lg, "level", "log", _choice(LOG_LEVELS), defaults.LOG_LEVEL),
    )
    return admin, log_config


def parse_config(text: str, source: str = "<config>", base_dir: Path | None = None) -> Config:
    """Parse and validate YAML text. Raises ConfigError naming every problem."""
    base = base_dir if base_dir is not None else Path(".")
    try:
        raw = yaml.safe_load(text)
    except RecursionError:
        raise ConfigError(source, [("", "the YAML is nested too deeply")]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "?"
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(source, [("", f"not valid YAML at {where}: {problem}")]) from None
    ck = _Checker(base)
    top = ck.mapping(
        raw,
        "",
        (
            "admin",
            "log",
            "listeners",
            "pools",
            "timeouts",
            "limits",
            "rate_limits",
            "shutdown",
            "heartbeat",
            "reload",
            "workers",
            "pid_file",
        ),
    )
    if raw is None:
        ck.fail("", "the file is empty")
    pools_raw = ck.mapping(
        top.get("pools"), "pools", tuple(top.get("pools") or {}) if isinstance(top.get("pools"), dict) else ()
    )
    if "pools" not in top and raw is not None:
        ck.fail("pools", "missing: define at least one pool")
    pools: dict[str, PoolConfig] = {}
    for name, praw in pools_raw.items():
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            ck.fail(f"pools.{name}", "pool names are letters, digits, _ . -")
            continue
        pool = _parse_pool(ck, name, praw)
        if pool is not None:
            pools[name] = pool
    listeners: list[ListenerConfig] = []
    if "listeners" not in top and raw is not None:
        ck.fail("listeners", "missing: define at least one listener")
    elif "listeners" in top:
        seen: set[Address] = set()
        for i, lraw in ck.sequence(top["listeners"], "listeners"):
            lst = _parse_listener(ck, f"listeners[{i}]", lraw, pools_raw)
            if lst is None:
                continue
            if lst.address in seen and lst.address.port != 0:
                ck.fail(f"listeners[{i}].address", f"{lst.address} is used by an earlier listener")
            seen.add(lst.address)
            listeners.append(lst)
        if isinstance(top["listeners"], list) and not top["listeners"]:
            ck.fail("listeners", "define at least one listener")
    t = ck.mapping(
        top.get("timeouts"),
        "timeouts",
        ("connect", "handshake", "close", "idle", "max_lifetime", "max_lifetime_jitter"),
    )
    timeouts = Timeouts(
        connect=ck.get(t, "connect", "timeouts", parse_duration, defaults.CONNECT_TIMEOUT),
        handshake=ck.get(t, "handshake", "timeouts", parse_duration, defaults.HANDSHAKE_TIMEOUT),
        close=ck.get(t, "close", "timeouts", parse_duration, defaults.CLOSE_TIMEOUT),
        idle=ck.get(t, "idle", "timeouts", parse_optional_duration, defaults.IDLE_TIMEOUT),
        max_lifetime=ck.get(t, "max_lifetime", "timeouts", parse_optional_duration, defaults.MAX_LIFETIME),
        max_lifetime_jitter=ck.get(t, "max_lifetime_jitter", "timeouts", parse_fraction, defaults.MAX_LIFETIME_JITTER),
    )
    lim = ck.mapping(
        top.get("limits"),
        "limits",
        (
            "max_header_bytes",
            "buffer_bytes",
            "max_message_bytes",
            "slow_consumer_timeout",
            "max_sessions",
            "retry_after",
        ),
    )
    limits = Limits(
        max_header_bytes=ck.get(
            lim, "max_header_bytes", "limits", _bounded_int(1024, 1 << 20), defaults.MAX_HEADER_BYTES
        ),
        buffer_bytes=ck.get(lim, "buffer_bytes", "limits", _bounded_int(1024, 16 << 20), defaults.BUFFER_BYTES),
        max_message_bytes=ck.get(lim, "max_message_bytes", "limits", parse_size, defaults.MAX_MESSAGE_BYTES),
        slow_consumer_timeout=ck.get(
            lim, "slow_consumer_timeout", "limits", parse_optional_duration, defaults.SLOW_CONSUMER_TIMEOUT
        ),
        max_sessions=ck.get(lim, "max_sessions", "limits", _optional_count, defaults.MAX_SESSIONS),
        retry_after=ck.get(lim, "retry_after", "limits", parse_duration, defaults.RETRY_AFTER),
    )
    rate_limits = _parse_rate_limits(ck, top.get("rate_limits"))
    hb = ck.mapping(top.get("heartbeat"), "heartbeat", ("interval", "timeout", "legs"))
    heartbeat = Heartbeat(
        interval=ck.get(hb, "interval", "heartbeat", parse_optional_duration, defaults.HEARTBEAT_INTERVAL),
        timeout=ck.get(hb, "timeout", "heartbeat", parse_duration, defaults.HEARTBEAT_TIMEOUT),
        legs=ck.get(hb, "legs", "heartbeat", _choice(HEARTBEAT_LEGS), defaults.HEARTBEAT_LEGS),
    )
    sd = ck.mapping(top.get("shutdown"), "shutdown", ("deadline", "drain_window"))
    shutdown = Shutdown(
        deadline=ck.get(sd, "deadline", "shutdown", parse_duration, defaults.SHUTDOWN_DEADLINE),
        drain_window=ck.get(sd, "drain_window", "shutdown", parse_window, defaults.SHUTDOWN_DRAIN_WINDOW),
    )
    rl = ck.mapping(top.get("reload"), "reload", ("drain_window",))
    reload = Reload(drain_window=ck.get(rl, "drain_window", "reload", parse_window, defaults.RELOAD_DRAIN_WINDOW))
    workers = ck.get(top, "workers", "", _workers, defaults.WORKERS)
    pid_file = ck.get(top, "pid_file", "", lambda v: _pid_path(v, base), None)
    if workers > 1:
        for i, lst in enumerate(listeners):
            if lst.address.port == 0:
                ck.fail(f"listeners[{i}].address", "workers > 1 needs a fixed port (every worker binds the same one)")
    admin, log_config = _parse_admin_and_log(ck, top)
    # worker i serves its own metrics on admin port + i
    if admin is not None and workers > 1 and (admin.address.port == 0 or admin.address.port + workers - 1 > 65535):
        ck.fail("admin.address", f"with workers: {workers}, worker i listens on this port + i: give a fixed port")
    if ck.problems:
        raise ConfigError(source, ck.problems)
    return Config(
        source=source,
        listeners=tuple(listeners),
        pools=pools,
        admin=admin,
        log=log_config,
        timeouts=timeouts,
        limits=limits,
        rate_limits=rate_limits,
        shutdown=shutdown,
        heartbeat=heartbeat,
        reload=reload,
        workers=workers,
        pid_file=pid_file,
        digest=hashlib.sha256(text.encode()).hexdigest(),
    )


def load_config(path: str | Path) -> Config:
    """Read and validate a file; relative TLS paths resolve against the file's directory."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(p), [("", f"cannot read the file: {exc}")]) from None
    return parse_config(text, source=str(p), base_dir=p.resolve().parent)
