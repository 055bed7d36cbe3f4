"""Smooth weighted round robin (nginx's algorithm): weights respected without bursts.

Each pick adds every backend's weight to its running score, takes the highest, and lowers the
winner by the total weight, so with weights 5:1:1 the order is a a b a c a a, never five a in a row.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from wsproxy.config import PoolConfig
from wsproxy.policy.balancing.base import Backend, Policy


class RoundRobin(Policy):
    def __init__(self, backends: Sequence[Backend], config: PoolConfig) -> None:
        super().__init__(backends, config)
        self._score: list[float] = [0.0] * len(self.backends)
        self._total = sum(b.weight for b in self.backends)

    def candidates(self, key: bytes | None = None, weights: Sequence[float] | None = None) -> Iterator[Backend]:
        n = len(self.backends)
        if n == 0:
            return
        if weights is not None:
            yield from self._weighted(weights)
            return
        best = 0
        for i, b in enumerate(self.backends):
            self._score[i] += b.weight
            if self._score[i] > self._score[best]:
                best = i
        self._score[best] -= self._total
        yield self.backends[best]
        for step in range(1, n):  # retries: the rest, in ring order after the winner
            yield self.backends[(best + step) % n]

    def _weighted(self, weights: Sequence[float]) -> Iterator[Backend]:
        """The same algorithm over effective weights: unavailable backends (weight 0) take no
        part, so their turns go to the others by weight, not all to the next one in the ring."""
        n = len(self.backends)
        score = self._score
        best = -1
        total = 0.0
        for i in range(n):
            w = weights[i]
            if w <= 0:
                continue
            total += w
            score[i] += w
            if best < 0 or score[i] > score[best]:
                best = i
        if best < 0:
            return
        score[best] -= total
        yield self.backends[best]
        for step in range(1, n):
            i = (best + step) % n
            if weights[i] > 0:
                yield self.backends[i]
