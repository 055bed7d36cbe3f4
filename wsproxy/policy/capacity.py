"""The proxy's own resources: which errors are a local shortage, and how many descriptors it needs.

A connect that fails with EMFILE ("too many open files") says nothing about the backend: the
proxy ran out of descriptors, memory, socket buffers or source ports. Counting such failures
against a backend's passive health ejects a healthy pool during a burst and keeps answering 503
long after it (issue 18). This module names those errors (`local_resource`), so the shell can
answer 503 with `Retry-After` and leave the backend's health alone, and it sizes what the
configured caps need (`descriptors_needed`) and the reserve kept back so the accept loop can
still answer or close (`reserve_for`, `within_reserve`). Pure: the descriptor limit and counts
come in as numbers.
"""

from __future__ import annotations

import errno

from wsproxy.config import Config, defaults

DESCRIPTORS = "descriptors"
MEMORY = "memory"
BUFFERS = "buffers"
SOURCE_PORTS = "source_ports"

# errno -> the local resource it says is exhausted (the `resource` label of the metric)
LOCAL_ERRNOS: dict[int, str] = {
    errno.EMFILE: DESCRIPTORS,  # this process's RLIMIT_NOFILE
    errno.ENFILE: DESCRIPTORS,  # the system's file table
    errno.ENOMEM: MEMORY,
    errno.ENOBUFS: BUFFERS,
    errno.EADDRNOTAVAIL: SOURCE_PORTS,  # no free local port toward the backend's address
}

PER_SESSION = 2  # a session holds the client's socket and the backend's


def local_resource(err: int | None) -> str | None:
    """The exhausted local resource an errno names, or None: not the proxy's own shortage."""
    return LOCAL_ERRNOS.get(err) if err is not None else None


def session_cap(config: Config) -> int | None:
    """At most how many sessions the config lets run at once (None: no cap bounds it)."""
    caps: list[int] = []
    if config.limits.max_sessions is not None:
        caps.append(config.limits.max_sessions)
    per_pool = [p.max_sessions for p in config.pools.values()]
    if per_pool and all(c is not None for c in per_pool):
        caps.append(sum(c for c in per_pool if c is not None))
    return min(caps) if caps else None


def descriptors_needed(config: Config) -> int | None:
    """Descriptors the configured caps need: 2 per session, one per active check, the admin
    listener's connections, the listeners, the splice pipes (when splicing is on) and a fixed
    base (stdio, epoll, the spare, logs).
    None when no cap bounds the sessions."""
    cap = session_cap(config)
    if cap is None:
        return None
    checks = sum(len(p.backends) for p in config.pools.values() if p.health is not None)
    admin = defaults.ADMIN_MAX_CONNECTIONS + 1 if config.admin is not None else 0
    listeners = len(config.listeners) * 2  # IPv4 and IPv6 for a name like localhost
    # the kernel pipes payloads are spliced through: two descriptors each, in use and kept idle
    pipes = 2 * (defaults.SPLICE_MAX_PIPES + defaults.SPLICE_IDLE_PIPES) if config.limits.splice_min_bytes else 0
    fixed = defaults.DESCRIPTOR_BASE + listeners + checks + admin + pipes
    return fixed + PER_SESSION * cap + reserve_for(fixed + PER_SESSION * cap)


def sessions_allowed(limit: int) -> int:
    """About how many sessions a descriptor limit carries, after the base and the reserve."""
    return max(0, (limit - defaults.DESCRIPTOR_BASE - reserve_for(limit)) // PER_SESSION)


def reserve_for(limit: int) -> int:
    """Descriptors kept back from new sessions: a fraction of the limit, within fixed bounds."""
    share = int(limit * defaults.DESCRIPTOR_RESERVE_FRACTION)
    return min(max(share, defaults.DESCRIPTOR_RESERVE_MIN), defaults.DESCRIPTOR_RESERVE_MAX)


def within_reserve(*, open_descriptors: int, limit: int) -> bool:
    """True when one more session (PER_SESSION descriptors) would eat into the reserve."""
    return open_descriptors + PER_SESSION > limit - reserve_for(limit)
