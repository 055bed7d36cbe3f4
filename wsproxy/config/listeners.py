"""`listeners[]`: addresses, TLS, routes with their match rules, origins, subprotocols and auth."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wsproxy.config import defaults
from wsproxy.config.checker import Checker, join
from wsproxy.config.control import AUTH_EXPIRY_KEYS, parse_expiry_keys
from wsproxy.config.model import (
    HTTP_MODES,
    RELAY_MODES,
    AuthConfig,
    CertKey,
    ListenerConfig,
    Route,
    RouteMatch,
    TLSConfig,
)
from wsproxy.config.values import (
    AUTH_RESERVED,
    COPY_RESERVED,
    is_off,
    parse_address,
    parse_auth_url,
    parse_bool,
    parse_bounded_int,
    parse_choice,
    parse_duration,
    parse_header_names,
    parse_host_pattern,
    parse_optional_duration,
    parse_origins,
    parse_path_prefix,
    parse_subprotocols,
    parse_trusted_proxies,
)


def parse_auth(ck: Checker, path: str, raw: Any) -> AuthConfig | None:
    if is_off(raw):
        return None
    m = ck.mapping(
        raw, path, ("url", "timeout", "pass_headers", "copy_headers", "cache", "cache_entries", *AUTH_EXPIRY_KEYS)
    )
    if not isinstance(raw, dict):
        return None
    if "url" not in m:
        ck.fail(join(path, "url"), "missing")
        return None
    where = ck.get(m, "url", path, parse_auth_url, None)
    timeout = ck.get(m, "timeout", path, parse_duration, defaults.AUTH_TIMEOUT)
    passed = ck.get(m, "pass_headers", path, parse_header_names(frozenset(AUTH_RESERVED)), defaults.AUTH_PASS_HEADERS)
    copied = ck.get(m, "copy_headers", path, parse_header_names(frozenset(COPY_RESERVED)), ())
    cache = ck.get(m, "cache", path, parse_optional_duration, defaults.AUTH_CACHE)
    entries = ck.get(m, "cache_entries", path, parse_bounded_int(1, 10_000_000), defaults.AUTH_CACHE_ENTRIES)
    expiry_header, recheck_before = parse_expiry_keys(ck, path, m)
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
        session_expiry_header=expiry_header,
        recheck_before=recheck_before,
    )


@dataclass(frozen=True, slots=True)
class _RouteRules:
    """What a listener's routes inherit unless they set their own."""

    allowed_subprotocols: tuple[str, ...] | None = None
    auth: AuthConfig | None = None


def _route_rules(ck: Checker, path: str, m: dict[str, Any], inherit: _RouteRules) -> _RouteRules:
    subprotocols = ck.get(m, "allowed_subprotocols", path, parse_subprotocols, inherit.allowed_subprotocols)
    auth = parse_auth(ck, join(path, "auth"), m["auth"]) if "auth" in m else inherit.auth
    return _RouteRules(allowed_subprotocols=subprotocols, auth=auth)


def _no_pool(name: Any, pools: dict[str, Any]) -> str:
    return f"no pool named {name!r} (pools: {', '.join(str(p) for p in pools) or 'none'})"


# Said where a listener's certificate or key is missing: the demo's config (conf/demo.yaml) names
# development certificates by relative path, and this is the command that makes them.
DEV_CERTS_HINT = "`wsproxy demo --certs DIR` makes development certificates (demo-cert.pem, demo-key.pem) in DIR"


def _tls_file(ck: Checker) -> Callable[[Any], Path]:
    return functools.partial(ck.path_to_file, missing_hint=DEV_CERTS_HINT)


def parse_listener(ck: Checker, path: str, raw: Any, pools: dict[str, Any]) -> ListenerConfig | None:
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
            "http",
            "trusted_proxies",
            "backlog",
        ),
    )
    if not isinstance(raw, dict):
        return None
    rules = _route_rules(ck, path, m, _RouteRules())
    origins = ck.get(m, "allowed_origins", path, parse_origins, None)
    address = None
    if "address" not in m:
        ck.fail(join(path, "address"), "missing")
    else:
        address = ck.get(m, "address", path, lambda v: parse_address(v, allow_port_zero=True), None)
    pool = None
    routes: list[Route] = []
    if "pool" in m and "routes" in m:
        ck.fail(path, "give either pool or routes, not both")
    elif "pool" in m:
        pool = m["pool"]
        if not isinstance(pool, str) or pool not in pools:
            ck.fail(join(path, "pool"), _no_pool(pool, pools))
            pool = None
    elif "routes" in m:
        rpath = join(path, "routes")
        for i, raw_r in ck.sequence(m["routes"], rpath):
            r = _parse_route(ck, f"{rpath}[{i}]", raw_r, pools, rules)
            if r is not None:
                routes.append(r)
        if isinstance(m["routes"], list) and not m["routes"]:
            ck.fail(rpath, "expected at least one route")
    else:
        ck.fail(path, "a listener needs a pool or routes")
    tls = _parse_tls(ck, join(path, "tls"), m["tls"]) if "tls" in m else None
    http = ck.get(m, "http", path, parse_choice(HTTP_MODES), defaults.HTTP_MODE)
    deflate = ck.get(m, "deflate", path, parse_bool, defaults.DEFLATE)
    relay = ck.get(m, "relay", path, parse_choice(RELAY_MODES), defaults.RELAY)
    proxy_protocol = ck.get(m, "proxy_protocol", path, parse_bool, False)
    trusted_proxies = ck.get(m, "trusted_proxies", path, parse_trusted_proxies, defaults.TRUSTED_PROXIES)
    backlog = ck.get(m, "backlog", path, parse_bounded_int(1, 65535), defaults.LISTEN_BACKLOG)
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
        http=http,
        trusted_proxies=trusted_proxies,
        backlog=backlog,
    )


def _cert_key(ck: Checker, path: str, raw: Any) -> CertKey | None:
    t = ck.mapping(raw, path, ("cert", "key"))
    for key in ("cert", "key"):
        if key not in t and isinstance(raw, dict):
            ck.fail(join(path, key), "missing")
    cert = ck.get(t, "cert", path, _tls_file(ck), None)
    key = ck.get(t, "key", path, _tls_file(ck), None)
    return CertKey(cert=cert, key=key) if cert is not None and key is not None else None


def _parse_tls(ck: Checker, path: str, raw: Any) -> TLSConfig | None:
    """`{cert, key}`, or `{certs: [{cert, key}, ...]}`: the first is the default, SNI picks the others."""
    if not isinstance(raw, dict) or "certs" not in raw:
        one = _cert_key(ck, path, raw)
        return TLSConfig(certs=(one,)) if one is not None else None
    t = ck.mapping(raw, path, ("certs",))
    cpath = join(path, "certs")
    pairs = [_cert_key(ck, f"{cpath}[{i}]", item) for i, item in ck.sequence(t["certs"], cpath)]
    if isinstance(t["certs"], list) and not t["certs"]:
        ck.fail(cpath, "expected at least one {cert, key}")
    if not pairs or any(p is None for p in pairs):
        return None
    return TLSConfig(certs=tuple(p for p in pairs if p is not None))


def _parse_route(
    ck: Checker, path: str, raw: Any, pools: dict[str, Any], inherit: _RouteRules = _RouteRules()
) -> Route | None:
    m = ck.mapping(raw, path, ("match", "pool", "allowed_subprotocols", "auth"))
    if not isinstance(raw, dict):
        return None
    rules = _route_rules(ck, path, m, inherit)
    pool = m.get("pool")
    if not isinstance(pool, str) or pool not in pools:
        ck.fail(join(path, "pool"), _no_pool(pool, pools))
        return None
    if "match" not in m:
        return Route(pool=pool, allowed_subprotocols=rules.allowed_subprotocols, auth=rules.auth)
    mpath = join(path, "match")
    mm = ck.mapping(m["match"], mpath, ("host", "path_prefix"))
    host = ck.get(mm, "host", mpath, parse_host_pattern, None)
    prefix = ck.get(mm, "path_prefix", mpath, parse_path_prefix, None)
    if host is None and prefix is None:
        ck.fail(mpath, "a match needs host and/or path_prefix (omit match for a default route)")
        return None
    return Route(
        pool=pool,
        match=RouteMatch(host=host, path_prefix=prefix),
        allowed_subprotocols=rules.allowed_subprotocols,
        auth=rules.auth,
    )
