"""Consistent hashing with bounded loads: sticky sessions that survive pool changes.

A key (a user id, a room, a cookie) always maps to the same backend while the pool is
unchanged, in every process and on every run: the ring is built from a stable hash
(BLAKE2b, never Python's salted `hash()`) of each backend's address, so reordering backends in
the config moves nothing, removing one moves only its own keys and adding one takes about
1/(N+1) of the keys. Each backend gets `VNODES_PER_WEIGHT` points per unit of weight.

Sticky keys can pile onto one backend (one huge room), so loads are bounded as in HAProxy's
`hash-balance-factor` and Envoy's bounded loads: a backend holding `cap` sessions or more is
skipped and the walk goes clockwise to the next distinct backend. See `cap` for the bound.
Without a key the policy orders like least_conn (the "hash_fallback: least_conn" behaviour;
"reject" is decided by the caller before asking for candidates).
"""

from __future__ import annotations

import hashlib
import math
import struct
from bisect import bisect_left
from collections.abc import Iterator, Sequence

from wsproxy.config import PoolConfig
from wsproxy.policy.balancing.base import Backend, Policy
from wsproxy.policy.balancing.least_conn import LeastConn

# Points on the ring per unit of weight. 100 keeps each backend's share within about 10%
# (one standard deviation) of its weighted fair share; changing it remaps keys (the
# known-answer tests catch that). Weight 1000, the config maximum, means 100 000 points.
VNODES_PER_WEIGHT = 100

_POINTS_PER_DIGEST = 8  # one 64-byte BLAKE2b digest gives eight 64-bit ring points
_UNPACK_POINTS = struct.Struct(">8Q").unpack


def key_hash(key: bytes) -> int:
    """The 64-bit position of a key on the ring: stable across processes, runs and machines."""
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big")


def vnode_points(name: str, count: int) -> list[int]:
    """The `count` ring points of the backend called `name` (its address): a pure function."""
    points: list[int] = []
    for block in range(-(-count // _POINTS_PER_DIGEST)):
        digest = hashlib.blake2b(f"{name}#{block}".encode(), digest_size=64).digest()
        points.extend(_UNPACK_POINTS(digest))
    return points[:count]


def cap(factor: float, total_active: int, weight: float, total_weight: float) -> int:
    """Most sessions a backend may hold before a new one is placed (bounded loads).

    ceil(factor * (total_active + 1) * weight / total_weight): the +1 counts the session being
    placed. The caps add up to more than total_active, so some backend is always under its cap.
    """
    return math.ceil(factor * (total_active + 1) * weight / total_weight)


class ConsistentHash(Policy):
    """Ring walk from the key's point: under-cap backends first, then over-cap ones, each once."""

    def __init__(self, backends: Sequence[Backend], config: PoolConfig) -> None:
        super().__init__(backends, config)
        self._factor = config.hash_balance_factor
        self._total_weight = sum(b.weight for b in self.backends)
        self._fallback = LeastConn(self.backends, config)
        # Rank backends by name so the ring never depends on the order of the config, then sort
        # point * n + rank as plain ints (much faster than tuples; equal points, which 64-bit
        # hashes make all but impossible, still order by name).
        n = len(self.backends)
        by_name = sorted(range(n), key=lambda i: self.backends[i].name)
        combined: list[int] = []
        for rank, i in enumerate(by_name):
            b = self.backends[i]
            combined.extend(p * n + rank for p in vnode_points(b.name, VNODES_PER_WEIGHT * b.weight))
        combined.sort()
        self._points = [c // n for c in combined]
        self._owners = [by_name[c % n] for c in combined]

    def owner(self, key: bytes) -> Backend:
        """The backend a key maps to when no load bound applies (for tests and the docs)."""
        i = bisect_left(self._points, key_hash(key)) % len(self._points)
        return self.backends[self._owners[i]]

    def candidates(self, key: bytes | None = None, weights: Sequence[float] | None = None) -> Iterator[Backend]:
        """Backends in ring-walk order from the key's point, under-cap ones first.

        With `weights`, unavailable backends (weight 0) are passed over, so their keys go to the
        next backend clockwise (and come back when they recover); caps use the effective weights
        of the available backends, so a backend ramping up takes only part of its own keys.
        """
        if key is None:
            yield from self._fallback.candidates(None, weights)
            return
        backends = self.backends
        n = len(backends)
        if n == 0:
            return
        if weights is not None:
            yield from self._walk(key, weights)
            return
        total_active = sum(b.active for b in backends)
        factor, total_weight = self._factor, self._total_weight
        points, owners = self._points, self._owners
        size = len(points)
        start = bisect_left(points, key_hash(key))
        seen: set[int] = set()
        over_cap: list[Backend] = []
        # Walk clockwise until every backend has been met (at most one lap).
        for step in range(size):
            i = owners[(start + step) % size]
            if i in seen:
                continue
            seen.add(i)
            b = backends[i]
            if b.active < cap(factor, total_active, b.weight, total_weight):
                yield b
            else:
                over_cap.append(b)
            if len(seen) == n:
                break
        yield from over_cap

    def _walk(self, key: bytes, weights: Sequence[float]) -> Iterator[Backend]:
        backends = self.backends
        live = [i for i, w in enumerate(weights) if w > 0]
        if not live:
            return
        total_active = sum(backends[i].active for i in live)
        total_weight = sum(weights[i] for i in live)
        factor = self._factor
        points, owners = self._points, self._owners
        size = len(points)
        start = bisect_left(points, key_hash(key))
        wanted = len(live)
        seen: set[int] = set()
        over_cap: list[Backend] = []
        for step in range(size):
            i = owners[(start + step) % size]
            if i in seen or weights[i] <= 0:
                continue
            seen.add(i)
            b = backends[i]
            if b.active < cap(factor, total_active, weights[i], total_weight):
                yield b
            else:
                over_cap.append(b)
            if len(seen) == wanted:
                break
        yield from over_cap
