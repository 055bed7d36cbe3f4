"""One immutable view of the configuration plus the live pools built from it.

A session holds the snapshot it started with; a reload builds a new one and swaps a single
reference, so nothing a session depends on changes under it.
"""

from __future__ import annotations

from dataclasses import dataclass

from wsproxy.balancing import Pool, build_pool
from wsproxy.config import Config


@dataclass(frozen=True, slots=True)
class Snapshot:
    config: Config
    pools: dict[str, Pool]

    @classmethod
    def build(cls, config: Config) -> Snapshot:
        return cls(config=config, pools={name: build_pool(p) for name, p in config.pools.items()})
