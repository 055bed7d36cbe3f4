"""Least connections, weighted: a new session goes where active/weight is lowest.

WebSocket sessions live for minutes or hours, so the number of open sessions is a much better
signal of a backend's load than the number of picks (which is all round robin balances). Ties
are broken by a start offset that rotates on every pick: with an idle pool the first sessions
spread over every backend instead of piling onto the first one listed. The first candidate is
found with one O(n) scan; the rest (only needed for retries) are sorted lazily.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

from wsproxy.config import PoolConfig
from wsproxy.policy.balancing.base import Backend, Policy


def load(backend: Backend) -> float:
    """Open sessions (this process's and, in a fleet, the others') per unit of weight: the quantity
    the load-aware policies compare.

    IEEE division is correctly rounded, so equal ratios (1/3 and 2/6) compare equal.
    """
    return (backend.active + backend.others) / backend.weight


class LeastConn(Policy):
    """Fewest active sessions relative to weight first; then the rest by increasing load."""

    def __init__(self, backends: Sequence[Backend], config: PoolConfig) -> None:
        super().__init__(backends, config)
        self._offset = 0

    def candidates(self, key: bytes | None = None, weights: Sequence[float] | None = None) -> Iterator[Backend]:
        """The key is ignored: only load matters."""
        backends = self.backends
        n = len(backends)
        if n == 0:
            return
        start = self._offset
        self._offset = (start + 1) % n
        if weights is not None:
            yield from self._weighted(weights, start)
            return
        # One scan from the rotating start: strict "<" keeps the earliest in rotation order.
        best = start
        best_load = load(backends[start])
        for step in range(1, n):
            i = (start + step) % n
            current = load(backends[i])
            if current < best_load:
                best, best_load = i, current
        yield backends[best]
        if n == 1:
            return
        # Retries only: the rest by load, ties still in rotation order.
        rest = sorted(
            (i for i in range(n) if i != best),
            key=lambda i: (load(backends[i]), (i - start) % n),
        )
        for i in rest:
            yield backends[i]

    def _weighted(self, weights: Sequence[float], start: int) -> Iterator[Backend]:
        """Load against effective weights; unavailable backends (weight 0) are left out. A
        backend ramping up (slow start) looks fuller than it is, so it fills gradually."""
        backends = self.backends
        n = len(backends)
        best, best_load = -1, math.inf
        for step in range(n):  # strict "<" keeps the earliest in rotation order, as above
            i = (start + step) % n
            w = weights[i]
            if w > 0 and backends[i].sessions / w < best_load:
                best, best_load = i, backends[i].sessions / w
        if best < 0:
            return
        yield backends[best]
        rest = sorted(
            (i for i in range(n) if i != best and weights[i] > 0),
            key=lambda i: (backends[i].sessions / weights[i], (i - start) % n),
        )
        for i in rest:
            yield backends[i]
