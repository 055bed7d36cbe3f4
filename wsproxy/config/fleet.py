"""The fleet's keys: `shared_state` (Redis) and `pools.NAME.discovery` (DNS).

Kept apart from the loader's other sections so each can grow on its own: the loader and the pool
parser call `parse_shared_state` and `parse_discovery` and nothing else of this module.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

from wsproxy.config import defaults
from wsproxy.config.checker import Checker, join
from wsproxy.config.model import DISCOVERY_TYPES, Address, DnsDiscovery, SharedState
from wsproxy.config.values import parse_address, parse_bounded_int, parse_duration

SHARED_STATE_KEYS = ("redis", "key_prefix", "timeout", "refresh", "process_ttl")
DNS_KEYS = ("name", "type", "port", "nameservers", "interval", "max_interval", "timeout")
# a DNS name: labels of letters, digits, '-' and '_' (SRV names start with _service._proto)
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?"
_DNS_NAME = re.compile(rf"(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*")
_KEY_PREFIX = re.compile(r"[!-~]{0,64}")  # printable ASCII, no spaces: it starts every Redis key


def shown_url(url: str) -> str:
    """A Redis URL fit for a log line or an error: any user and password replaced by `***`."""
    scheme, sep, rest = url.partition("://")
    if sep and "@" in rest.split("/", 1)[0]:
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


def _redis_url(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected redis://HOST:PORT/DB, got a {type(value).__name__}")
    shown = shown_url(value)
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        raise ValueError(f"not a Redis URL: {shown!r}") from None
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"expected a redis://, rediss:// or unix:// URL, got {shown!r}")
    if parts.scheme != "unix" and not parts.hostname:
        raise ValueError(f"the URL names no host: {shown!r}")
    if parts.scheme != "unix" and port is None:
        raise ValueError(f"give the port explicitly (redis://HOST:PORT/DB): {shown!r}")
    db = parts.path.strip("/") if parts.scheme != "unix" else ""
    if db and not db.isdigit():
        raise ValueError(f"the database is a number (redis://HOST:PORT/0), got {db!r}")
    return value


def _key_prefix(value: Any) -> str:
    if not isinstance(value, str) or not _KEY_PREFIX.fullmatch(value):
        raise ValueError(f"expected up to 64 printable characters without spaces, got {value!r}")
    return value


def _refresh(value: Any) -> float:
    seconds = parse_duration(value)
    if not 0.01 <= seconds <= defaults.SHARED_STATE_REFRESH:
        raise ValueError(f"must be 10ms..{defaults.SHARED_STATE_REFRESH * 1000:g}ms, got {seconds:g}s")
    return seconds


def _positive_duration(value: Any) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError("must be more than 0")
    return seconds


def parse_shared_state(ck: Checker, raw: Any) -> SharedState | None:
    """`shared_state` (absent: None, each process alone)."""
    if raw is None:
        return None
    path = "shared_state"
    m = ck.mapping(raw, path, SHARED_STATE_KEYS)
    if not isinstance(raw, dict):
        return None
    if "redis" not in m:
        ck.fail(join(path, "redis"), "missing: where the fleet's Redis is, e.g. redis://127.0.0.1:6379/0")
    redis = ck.get(m, "redis", path, _redis_url, None)
    refresh = ck.get(m, "refresh", path, _refresh, defaults.SHARED_STATE_REFRESH)
    ttl = ck.get(m, "process_ttl", path, _positive_duration, defaults.SHARED_STATE_PROCESS_TTL)
    if ttl < 3 * refresh:
        ck.fail(join(path, "process_ttl"), f"{ttl:g}s is less than three refreshes ({3 * refresh:g}s)")
    timeout = ck.get(m, "timeout", path, _positive_duration, defaults.SHARED_STATE_TIMEOUT)
    if redis is None:
        return None
    return SharedState(
        redis=redis,
        key_prefix=ck.get(m, "key_prefix", path, _key_prefix, defaults.SHARED_STATE_KEY_PREFIX),
        timeout=timeout,
        refresh=refresh,
        process_ttl=ttl,
    )


def _dns_name(value: Any) -> str:
    if not isinstance(value, str) or not _DNS_NAME.fullmatch(value.rstrip(".")):
        raise ValueError(f"expected a DNS name such as _ws._tcp.chat.internal, got {value!r}")
    return value.rstrip(".").lower()


def _dns_type(value: Any) -> str:
    text = str(value).upper() if isinstance(value, str) else ""
    if text not in DISCOVERY_TYPES:
        raise ValueError(f"expected one of {', '.join(DISCOVERY_TYPES)}, got {value!r}")
    return text


def _nameserver(value: Any) -> Address:
    if isinstance(value, str) and ":" not in value.strip("[]") and not value.startswith("["):
        value = f"{value}:{defaults.DNS_PORT}"  # a bare address: the standard port
    address = parse_address(value)
    if not re.fullmatch(r"[0-9.]+|[0-9A-Fa-f:]+", address.host):
        raise ValueError(f"a nameserver is an IP address, got {address.host!r}")
    return address


def parse_discovery(ck: Checker, pool_path: str, raw: Any) -> DnsDiscovery | None:
    """`pools.NAME.discovery: {dns: {...}}`."""
    path = join(pool_path, "discovery")
    outer = ck.mapping(raw, path, ("dns",))
    if not isinstance(raw, dict):
        if raw is None:
            ck.fail(path, "expected {dns: {name, type, ...}}")
        return None
    if "dns" not in outer:
        ck.fail(join(path, "dns"), "missing: the DNS name whose answers are the backends")
        return None
    dpath = join(path, "dns")
    m = ck.mapping(outer["dns"], dpath, DNS_KEYS)
    if not isinstance(outer["dns"], dict):
        return None
    if "name" not in m:
        ck.fail(join(dpath, "name"), "missing: e.g. _ws._tcp.chat.internal (SRV) or chat.internal (A)")
    name = ck.get(m, "name", dpath, _dns_name, None)
    kind = ck.get(m, "type", dpath, _dns_type, defaults.DISCOVERY_TYPE)
    port = ck.get(m, "port", dpath, parse_bounded_int(1, 65535), None)
    if kind == "SRV" and "port" in m:
        ck.fail(join(dpath, "port"), "SRV records carry their own ports: port is for type A or AAAA")
    if kind != "SRV" and "port" not in m:
        ck.fail(join(dpath, "port"), f"missing: type {kind} answers addresses only, so give the backends' port")
    servers: list[Address] = []
    if "nameservers" in m:
        for i, item in ck.sequence(m["nameservers"], join(dpath, "nameservers")):
            try:
                servers.append(_nameserver(item))
            except ValueError as exc:
                ck.fail(f"{join(dpath, 'nameservers')}[{i}]", str(exc))
        if isinstance(m["nameservers"], list) and not m["nameservers"]:
            ck.fail(join(dpath, "nameservers"), "an empty list: leave the key out to use the system's resolvers")
    interval = ck.get(m, "interval", dpath, _positive_duration, defaults.DISCOVERY_INTERVAL)
    max_interval = ck.get(m, "max_interval", dpath, _positive_duration, max(defaults.DISCOVERY_MAX_INTERVAL, interval))
    if max_interval < interval:
        ck.fail(join(dpath, "max_interval"), f"{max_interval:g}s is shorter than interval ({interval:g}s)")
    timeout = ck.get(m, "timeout", dpath, _positive_duration, defaults.DISCOVERY_TIMEOUT)
    if name is None:
        return None
    return DnsDiscovery(
        name=name,
        type=kind,
        port=port if kind != "SRV" else None,
        nameservers=tuple(servers),
        interval=interval,
        max_interval=max_interval,
        timeout=timeout,
    )
