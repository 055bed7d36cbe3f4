"""`pools.NAME`: balancing, hashing, retries, backends and their health checks."""

from __future__ import annotations

from typing import Any

from wsproxy.config import defaults
from wsproxy.config.checker import Checker, join
from wsproxy.config.model import (
    BALANCE_POLICIES,
    HASH_FALLBACKS,
    HEALTH_CHECKS,
    PROXY_PROTOCOL_VERSIONS,
    ActiveHealth,
    Address,
    BackendConfig,
    PassiveHealth,
    PoolConfig,
)
from wsproxy.config.values import (
    parse_address,
    parse_bool,
    parse_bounded_int,
    parse_choice,
    parse_duration,
    parse_factor,
    parse_hash_key,
    parse_health_path,
    parse_optional_count,
    parse_optional_duration,
    parse_positive_rate,
    says_off,
)

# ---------------------------------------------------------------------------------------------


def parse_pool(ck: Checker, name: str, raw: Any) -> PoolConfig | None:
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
    balance = ck.get(m, "balance", path, parse_choice(BALANCE_POLICIES), defaults.BALANCE)
    retries = ck.get(m, "retries", path, parse_bounded_int(0, 10), defaults.RETRIES)
    hash_key = ck.get(m, "hash_key", path, parse_hash_key, None)
    factor = ck.get(m, "hash_balance_factor", path, parse_factor, defaults.HASH_BALANCE_FACTOR)
    fallback = ck.get(m, "hash_fallback", path, parse_choice(HASH_FALLBACKS), defaults.HASH_FALLBACK)
    send_pp = ck.get(m, "send_proxy_protocol", path, parse_choice(PROXY_PROTOCOL_VERSIONS), None)
    rb = ck.mapping(m.get("rebalance"), join(path, "rebalance"), ("max_sessions_per_second",))
    rebalance = ck.get(rb, "max_sessions_per_second", join(path, "rebalance"), parse_positive_rate, None)
    pool_max = ck.get(m, "max_sessions", path, parse_optional_count, defaults.MAX_SESSIONS)
    health, passive, close_on_down, down_drain = _parse_pool_health(ck, path, m)
    if balance == "consistent_hash" and hash_key is None and "hash_key" not in m:
        ck.fail(join(path, "hash_key"), "consistent_hash needs a hash_key")
    for key in ("hash_key", "hash_balance_factor", "hash_fallback"):
        if key in m and balance != "consistent_hash":
            ck.fail(join(path, key), f"only meaningful with balance: consistent_hash (balance is {balance})")
    backends: list[BackendConfig] = []
    seen: set[Address] = set()
    if "backends" not in m:
        ck.fail(join(path, "backends"), "missing: a pool needs at least one backend")
    else:
        bpath = join(path, "backends")
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
ACTIVE_KEYS = ("interval", "timeout", "rise", "fall", "check", "path", "slow_start")
PASSIVE_KEYS = ("failures", "window", "eject_for", "max_eject_for")


def _parse_pool_health(
    ck: Checker, path: str, m: dict[str, Any]
) -> tuple[ActiveHealth | None, PassiveHealth | None, bool, float]:
    """A pool's `health`, `passive`, `close_sessions_on_down` and `drain_window` keys."""
    active = None
    if "health" in m:
        hpath = join(path, "health")
        h = ck.mapping(m["health"], hpath, ACTIVE_KEYS)
        interval = ck.get(h, "interval", hpath, parse_duration, defaults.HEALTH_INTERVAL)
        timeout = ck.get(h, "timeout", hpath, parse_duration, min(defaults.HEALTH_TIMEOUT, interval))
        if "timeout" in h and timeout > interval:
            ck.fail(join(hpath, "timeout"), f"{timeout:g}s is longer than the interval ({interval:g}s)")
        check = ck.get(h, "check", hpath, parse_choice(HEALTH_CHECKS), defaults.HEALTH_CHECK)
        if "path" in h and check == "tcp":
            ck.fail(join(hpath, "path"), "only meaningful with check: http or websocket (check is tcp)")
        active = ActiveHealth(
            interval=interval,
            timeout=timeout,
            rise=ck.get(h, "rise", hpath, parse_bounded_int(1, 100), defaults.HEALTH_RISE),
            fall=ck.get(h, "fall", hpath, parse_bounded_int(1, 100), defaults.HEALTH_FALL),
            check=check,
            path=ck.get(h, "path", hpath, parse_health_path, defaults.HEALTH_PATH),
            slow_start=ck.get(h, "slow_start", hpath, parse_optional_duration, defaults.HEALTH_SLOW_START),
        )
    passive: PassiveHealth | None = PassiveHealth()
    if "passive" in m and says_off(m["passive"]):
        passive = None
    elif "passive" in m:
        ppath = join(path, "passive")
        pm = ck.mapping(m["passive"], ppath, PASSIVE_KEYS)
        eject_for = ck.get(pm, "eject_for", ppath, parse_duration, defaults.PASSIVE_EJECT_FOR)
        max_eject_for = ck.get(
            pm, "max_eject_for", ppath, parse_duration, max(defaults.PASSIVE_MAX_EJECT_FOR, eject_for)
        )
        if max_eject_for < eject_for:
            ck.fail(join(ppath, "max_eject_for"), f"{max_eject_for:g}s is shorter than eject_for ({eject_for:g}s)")
        passive = PassiveHealth(
            failures=ck.get(pm, "failures", ppath, parse_bounded_int(1, 100), defaults.PASSIVE_FAILURES),
            window=ck.get(pm, "window", ppath, parse_duration, defaults.PASSIVE_WINDOW),
            eject_for=eject_for,
            max_eject_for=max_eject_for,
        )
    close_on_down = ck.get(m, "close_sessions_on_down", path, parse_bool, defaults.CLOSE_SESSIONS_ON_DOWN)
    drain = ck.get(m, "drain_window", path, parse_duration, defaults.DOWN_DRAIN_WINDOW)
    if close_on_down and active is None and "health" not in m:
        ck.fail(join(path, "close_sessions_on_down"), "needs active health checks (a health mapping) to mark down")
    if "drain_window" in m and not close_on_down:
        ck.fail(join(path, "drain_window"), "only meaningful with close_sessions_on_down: true")
    return active, passive, close_on_down, drain


def _parse_backend(ck: Checker, path: str, raw: Any) -> BackendConfig | None:
    if isinstance(raw, str):  # shorthand: "- 127.0.0.1:9001"
        raw = {"address": raw}
    elif not isinstance(raw, dict):
        shapes = '"host:port" or a mapping such as {address: "127.0.0.1:9001", weight: 2}'
        ck.fail(path, f"expected {shapes}, got {raw!r}")
        return None
    m = ck.mapping(raw, path, ("address", "weight", "max_sessions"))
    if "address" not in m:
        if isinstance(raw, dict):
            ck.fail(join(path, "address"), "missing")
        return None
    address = ck.get(m, "address", path, parse_address, None)
    weight = ck.get(m, "weight", path, parse_bounded_int(1, 1000), defaults.WEIGHT)
    max_sessions = ck.get(m, "max_sessions", path, parse_optional_count, defaults.MAX_SESSIONS)
    if address is None:
        return None
    return BackendConfig(address=address, weight=weight, max_sessions=max_sessions)
