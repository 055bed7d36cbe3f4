"""Power of two random choices on weighted load (Mitzenmacher; Envoy's LEAST_REQUEST default).

Two distinct backends are drawn at random, with probability proportional to weight, and the
one with the lower active/weight goes first. This gets most of least_conn's balance while
avoiding its herd behaviour: several proxy processes that each see an idle backend do not all
send their next session to that same backend. Each draw is O(log n) (bisect over cumulative
weights); the remaining candidates, needed only for retries, follow in increasing load order.
"""

from __future__ import annotations

import random
from bisect import bisect_right
from collections.abc import Iterator, Sequence
from itertools import accumulate

from wsproxy.config import PoolConfig
from wsproxy.policy.balancing.base import Backend, Policy
from wsproxy.policy.balancing.least_conn import load


class RandomTwo(Policy):
    """The better of two weighted random picks first, then the rest by increasing load."""

    def __init__(
        self,
        backends: Sequence[Backend],
        config: PoolConfig,
        *,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__(backends, config)
        self._rng = rng if rng is not None else random.Random()
        self._cumulative = list(accumulate(b.weight for b in self.backends))
        self._total = self._cumulative[-1] if self._cumulative else 0

    def _draw(self, exclude: int | None = None) -> int:
        """Index of a backend drawn with probability weight/total (skipping `exclude`)."""
        total = self._total
        if exclude is None:
            r = self._rng.randrange(total)
        else:
            # Draw from the weight line with `exclude`'s segment cut out, then map back.
            excluded_weight = self.backends[exclude].weight
            r = self._rng.randrange(total - excluded_weight)
            if r >= self._cumulative[exclude] - excluded_weight:
                r += excluded_weight
        return bisect_right(self._cumulative, r)

    def candidates(self, key: bytes | None = None, weights: Sequence[float] | None = None) -> Iterator[Backend]:
        """The key is ignored: only load (and chance) matter."""
        backends = self.backends
        n = len(backends)
        if n == 0:
            return
        if weights is not None:
            yield from self._weighted(weights)
            return
        if n == 1:
            yield backends[0]
            return
        a = self._draw()
        b = self._draw(exclude=a)
        best = b if load(backends[b]) < load(backends[a]) else a
        yield backends[best]
        rest = sorted((i for i in range(n) if i != best), key=lambda i: (load(backends[i]), i))
        for i in rest:
            yield backends[i]

    def _weighted(self, weights: Sequence[float]) -> Iterator[Backend]:
        """Draws and loads on effective weights (O(n): only while some backend is unavailable or
        ramping up); unavailable backends (weight 0) are never drawn nor yielded."""
        backends = self.backends
        live = [i for i, w in enumerate(weights) if w > 0]
        if not live:
            return
        best = live[0]
        if len(live) > 1:
            cumulative = list(accumulate(weights[i] for i in live))
            total = cumulative[-1]
            a = min(bisect_right(cumulative, self._rng.random() * total), len(live) - 1)
            # the second draw, from the weight line with the first one's segment cut out
            cut = weights[live[a]]
            r = self._rng.random() * (total - cut)
            if r >= cumulative[a] - cut:
                r += cut
            b = min(bisect_right(cumulative, r), len(live) - 1)
            if b == a:  # float rounding at a segment edge: take any other
                b = (a + 1) % len(live)
            first, second = live[a], live[b]
            if backends[second].sessions / weights[second] < backends[first].sessions / weights[first]:
                best = second
            else:
                best = first
        yield backends[best]
        rest = sorted((i for i in live if i != best), key=lambda i: (backends[i].sessions / weights[i], i))
        for i in rest:
            yield backends[i]
