"""Backends from DNS, decided without sockets: answers to a membership, when to ask again, and the
new configuration a change makes.

The runtime (runtime/discovery.py) asks DNS and hands the records here. A membership is sorted by
address, so every instance of a fleet that sees the same answer builds the same pool, and so the
same hash ring (consistent_hash ranks backends by name too; the order of the answer never
matters). A change is not applied here: `with_membership` makes the configuration the pool would
have, and the server applies it through the one reload path (reload_plan.plan_reload and
Server.apply), so a backend DNS drops is drained exactly as one a SIGHUP drops, and one that
stays keeps its sessions, counts and health.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass

from wsproxy.config import Address, BackendConfig, Config, DnsDiscovery, defaults

MAX_WEIGHT = 1000  # the config's own bound on a backend's weight


@dataclass(frozen=True, slots=True)
class Record:
    """One usable answer: an address (already resolved for SRV targets), its port and SRV fields."""

    host: str  # an IP address
    port: int
    weight: int = 1  # SRV weight (0..65535); A/AAAA: 1
    priority: int = 0  # SRV priority: only the lowest value present is used


def membership(records: Iterable[Record], *, limit: int = defaults.DISCOVERY_MAX_BACKENDS) -> tuple[BackendConfig, ...]:
    """The pool's backends for an answer: the lowest SRV priority only (higher ones are backups,
    RFC 2782), weight from SRV weight within 1..1000 (0 counts as 1), one backend per address
    (the largest weight wins), sorted by address, at most `limit`."""
    usable = list(records)
    if not usable:
        return ()
    best = min(r.priority for r in usable)
    weights: dict[Address, int] = {}
    for r in usable:
        if r.priority != best:
            continue
        address = Address(r.host, r.port)
        weights[address] = max(weights.get(address, 1), min(MAX_WEIGHT, max(1, r.weight)))
    ordered = sorted(weights, key=sort_key)[:limit]
    return tuple(BackendConfig(address=a, weight=weights[a]) for a in ordered)


def sort_key(address: Address) -> tuple[str, int]:
    """The order of a membership: by the backend's name (as the ring ranks it), then port."""
    return (str(address), address.port)


def next_lookup(ttl: float | None, spec: DnsDiscovery) -> float:
    """Seconds until the next lookup: the answer's TTL, kept within interval..max_interval (no
    TTL, as after a failure: the interval)."""
    if ttl is None:
        return spec.interval
    return min(spec.max_interval, max(spec.interval, ttl))


def same_members(current: Iterable[BackendConfig], new: Iterable[BackendConfig]) -> bool:
    """Nothing to apply: the same addresses with the same weights."""
    return {(b.address, b.weight) for b in current} == {(b.address, b.weight) for b in new}


def with_membership(config: Config, pool: str, backends: tuple[BackendConfig, ...]) -> Config:
    """`config` with `pool`'s backends replaced (everything else, the digest included, as it was)."""
    pools = dict(config.pools)
    pools[pool] = dataclasses.replace(pools[pool], backends=backends)
    return dataclasses.replace(config, pools=pools)


def carry_membership(running: Config, loaded: Config) -> Config:
    """A file reloaded by SIGHUP has no backends for its discovered pools: give each the members
    the running configuration found for the same pool, so a reload drains nothing DNS still
    answers. A pool whose discovery spec changed keeps them too until its next answer arrives."""
    carried = loaded
    for name, pool in loaded.pools.items():
        old = running.pools.get(name)
        if pool.discovery is not None and old is not None and old.discovery is not None and old.backends:
            carried = with_membership(carried, name, old.backends)
    return carried
