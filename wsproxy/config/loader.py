"""YAML text to a frozen, validated configuration snapshot.

The whole file is checked before anything uses it, and every problem is collected (not just
the first), each with the file, the key path and what is wrong. Unknown keys are errors: a typo
must never be silently ignored. A running proxy holds one `Config`; a reload builds a new one.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import yaml

from wsproxy.config import defaults
from wsproxy.config.checker import Checker, join
from wsproxy.config.control import ADMIN_TOKEN_KEYS, parse_admin_token, parse_admission, parse_observability
from wsproxy.config.fleet import parse_shared_state
from wsproxy.config.listeners import parse_listener
from wsproxy.config.model import (
    HEARTBEAT_LEGS,
    LOG_QUERY_MODES,
    Address,
    AdminConfig,
    Config,
    ConfigError,
    Heartbeat,
    Limits,
    ListenerConfig,
    LogConfig,
    PoolConfig,
    RateLimit,
    RateLimits,
    Reload,
    Shutdown,
    Timeouts,
)
from wsproxy.config.pools import parse_pool
from wsproxy.config.values import (
    is_off,
    parse_address,
    parse_bool,
    parse_bounded_int,
    parse_burst,
    parse_choice,
    parse_duration,
    parse_fraction,
    parse_host_names,
    parse_optional_count,
    parse_optional_duration,
    parse_optional_size,
    parse_rate,
    parse_size,
    parse_window,
    parse_workers,
)
from wsproxy.config.yaml_loader import StrictLoader


def rate_limit(ck: Checker, parent: dict[str, Any], key: str, path: str, *, sizes: bool) -> RateLimit | None:
    """`{rate, burst}`, or just a rate (burst: one second's worth), or `off`."""
    if key not in parent or is_off(parent[key]):
        return None
    kpath = join(path, key)
    raw = parent[key]
    if not isinstance(raw, dict):
        raw = {"rate": raw}
    m = ck.mapping(raw, kpath, ("rate", "burst"))
    if "rate" not in m:
        ck.fail(join(kpath, "rate"), "missing")
        return None
    rate = ck.get(m, "rate", kpath, lambda v: parse_rate(v, sizes=sizes), None)
    if rate is None:
        return None
    burst = ck.get(m, "burst", kpath, parse_burst(sizes), max(1.0, rate))
    return RateLimit(rate=rate, burst=burst)


def _parse_rate_limits(ck: Checker, raw: Any) -> RateLimits:
    path = "rate_limits"
    m = ck.mapping(
        raw, path, ("handshakes_per_ip", "max_sessions_per_ip", "messages", "bytes", "close_after", "max_tracked_ips")
    )
    return RateLimits(
        handshakes_per_ip=rate_limit(ck, m, "handshakes_per_ip", path, sizes=False),
        max_sessions_per_ip=ck.get(m, "max_sessions_per_ip", path, parse_optional_count, defaults.MAX_SESSIONS_PER_IP),
        messages=rate_limit(ck, m, "messages", path, sizes=False),
        bytes=rate_limit(ck, m, "bytes", path, sizes=True),
        close_after=ck.get(m, "close_after", path, parse_optional_duration, defaults.RATE_CLOSE_AFTER),
        max_tracked_ips=ck.get(m, "max_tracked_ips", path, parse_bounded_int(1, 10_000_000), defaults.MAX_TRACKED_IPS),
    )


def _pid_path(value: Any, base: Path) -> Path:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("expected a file path")
    p = Path(value)
    return p if p.is_absolute() else (base / p)


LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")


def _parse_admin_and_log(ck: Checker, top: dict[str, Any], base: Path) -> tuple[AdminConfig | None, LogConfig]:
    """`admin` (absent: off; a non-loopback address needs allow_remote: true) and `log`."""
    admin = None
    if "admin" in top:
        a = ck.mapping(top["admin"], "admin", ("address", "allow_remote", "hosts", *ADMIN_TOKEN_KEYS))
        if "address" not in a and (top["admin"] is None or isinstance(top["admin"], dict)):
            ck.fail("admin.address", "missing: where the admin listener binds, e.g. 127.0.0.1:9900")
        address = ck.get(a, "address", "admin", lambda v: parse_address(v, allow_port_zero=True), None)
        allow_remote = ck.get(a, "allow_remote", "admin", parse_bool, defaults.ADMIN_ALLOW_REMOTE)
        if address is not None and not address.is_loopback and not allow_remote:
            ck.fail(
                "admin.address",
                f"{address} is not a loopback address: the admin listener shows sessions and metrics, "
                "so binding it elsewhere needs admin.allow_remote: true",
            )
        token_file, token_env = parse_admin_token(ck, a, base)
        hosts = ck.get(a, "hosts", "admin", parse_host_names, defaults.ADMIN_HOSTS)
        if address is not None:
            admin = AdminConfig(
                address=address, allow_remote=allow_remote, hosts=hosts, token_file=token_file, token_env=token_env
            )
    lg = ck.mapping(top.get("log"), "log", ("format", "level", "query"))
    log_config = LogConfig(
        format=ck.get(lg, "format", "log", parse_choice(LOG_FORMATS), defaults.LOG_FORMAT),
        level=ck.get(lg, "level", "log", parse_choice(LOG_LEVELS), defaults.LOG_LEVEL),
        query=ck.get(lg, "query", "log", parse_choice(LOG_QUERY_MODES), defaults.LOG_QUERY),
    )
    return admin, log_config


def parse_config(text: str, source: str = "<config>", base_dir: Path | None = None) -> Config:
    """Parse and validate YAML text. Raises ConfigError naming every problem."""
    base = base_dir if base_dir is not None else Path(".")
    try:
        raw = yaml.load(text, Loader=StrictLoader)  # safe_load, but a repeated key is an error
    except RecursionError:
        raise ConfigError(source, [("", "the YAML is nested too deeply")]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "?"
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(source, [("", f"not valid YAML at {where}: {problem}")]) from None
    ck = Checker(base)
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
            "admission",
            "observability",
            "workers",
            "pid_file",
            "shared_state",
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
        pool = parse_pool(ck, name, praw)
        if pool is not None:
            pools[name] = pool
    listeners: list[ListenerConfig] = []
    if "listeners" not in top and raw is not None:
        ck.fail("listeners", "missing: define at least one listener")
    elif "listeners" in top:
        seen: set[Address] = set()
        for i, lraw in ck.sequence(top["listeners"], "listeners"):
            lst = parse_listener(ck, f"listeners[{i}]", lraw, pools_raw)
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
        ("connect", "handshake", "close", "idle", "max_lifetime", "max_lifetime_jitter", "http_idle", "http_response"),
    )
    timeouts = Timeouts(
        connect=ck.get(t, "connect", "timeouts", parse_duration, defaults.CONNECT_TIMEOUT),
        handshake=ck.get(t, "handshake", "timeouts", parse_duration, defaults.HANDSHAKE_TIMEOUT),
        close=ck.get(t, "close", "timeouts", parse_duration, defaults.CLOSE_TIMEOUT),
        idle=ck.get(t, "idle", "timeouts", parse_optional_duration, defaults.IDLE_TIMEOUT),
        max_lifetime=ck.get(t, "max_lifetime", "timeouts", parse_optional_duration, defaults.MAX_LIFETIME),
        max_lifetime_jitter=ck.get(t, "max_lifetime_jitter", "timeouts", parse_fraction, defaults.MAX_LIFETIME_JITTER),
        http_idle=ck.get(t, "http_idle", "timeouts", parse_duration, defaults.HTTP_IDLE_TIMEOUT),
        http_response=ck.get(t, "http_response", "timeouts", parse_duration, defaults.HTTP_RESPONSE_TIMEOUT),
    )
    lim = ck.mapping(
        top.get("limits"),
        "limits",
        (
            "max_header_bytes",
            "buffer_bytes",
            "splice_min_bytes",
            "max_message_bytes",
            "slow_consumer_timeout",
            "max_sessions",
            "retry_after",
            "max_body_bytes",
        ),
    )
    limits = Limits(
        max_header_bytes=ck.get(
            lim, "max_header_bytes", "limits", parse_bounded_int(1024, 1 << 20), defaults.MAX_HEADER_BYTES
        ),
        buffer_bytes=ck.get(lim, "buffer_bytes", "limits", parse_bounded_int(1024, 16 << 20), defaults.BUFFER_BYTES),
        splice_min_bytes=ck.get(lim, "splice_min_bytes", "limits", parse_optional_size, defaults.SPLICE_MIN_BYTES),
        max_message_bytes=ck.get(lim, "max_message_bytes", "limits", parse_size, defaults.MAX_MESSAGE_BYTES),
        slow_consumer_timeout=ck.get(
            lim, "slow_consumer_timeout", "limits", parse_optional_duration, defaults.SLOW_CONSUMER_TIMEOUT
        ),
        max_sessions=ck.get(lim, "max_sessions", "limits", parse_optional_count, defaults.MAX_SESSIONS),
        retry_after=ck.get(lim, "retry_after", "limits", parse_duration, defaults.RETRY_AFTER),
        max_body_bytes=ck.get(lim, "max_body_bytes", "limits", parse_size, defaults.MAX_BODY_BYTES),
    )
    rate_limits = _parse_rate_limits(ck, top.get("rate_limits"))
    hb = ck.mapping(top.get("heartbeat"), "heartbeat", ("interval", "timeout", "legs"))
    heartbeat = Heartbeat(
        interval=ck.get(hb, "interval", "heartbeat", parse_optional_duration, defaults.HEARTBEAT_INTERVAL),
        timeout=ck.get(hb, "timeout", "heartbeat", parse_duration, defaults.HEARTBEAT_TIMEOUT),
        legs=ck.get(hb, "legs", "heartbeat", parse_choice(HEARTBEAT_LEGS), defaults.HEARTBEAT_LEGS),
    )
    sd = ck.mapping(top.get("shutdown"), "shutdown", ("deadline", "drain_window"))
    shutdown = Shutdown(
        deadline=ck.get(sd, "deadline", "shutdown", parse_duration, defaults.SHUTDOWN_DEADLINE),
        drain_window=ck.get(sd, "drain_window", "shutdown", parse_window, defaults.SHUTDOWN_DRAIN_WINDOW),
    )
    rl = ck.mapping(top.get("reload"), "reload", ("drain_window",))
    reload = Reload(drain_window=ck.get(rl, "drain_window", "reload", parse_window, defaults.RELOAD_DRAIN_WINDOW))
    workers = ck.get(top, "workers", "", parse_workers, defaults.WORKERS)
    pid_file = ck.get(top, "pid_file", "", lambda v: _pid_path(v, base), None)
    if workers > 1:
        for i, lst in enumerate(listeners):
            if lst.address.port == 0:
                ck.fail(f"listeners[{i}].address", "workers > 1 needs a fixed port (every worker binds the same one)")
    admin, log_config = _parse_admin_and_log(ck, top, base)
    admission = parse_admission(ck, top.get("admission"), pools_raw)
    observability = parse_observability(ck, top.get("observability"))
    shared_state = parse_shared_state(ck, top.get("shared_state"))
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
        admission=admission,
        observability=observability,
        shutdown=shutdown,
        heartbeat=heartbeat,
        reload=reload,
        workers=workers,
        pid_file=pid_file,
        shared_state=shared_state,
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
