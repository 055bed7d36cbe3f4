"""Balancing policies behind one interface (see base.py); `build_pool` picks by name."""

from __future__ import annotations

from wsproxy.balancing.base import Backend, Policy, Pool
from wsproxy.balancing.consistent_hash import ConsistentHash
from wsproxy.balancing.least_conn import LeastConn
from wsproxy.balancing.random_two import RandomTwo
from wsproxy.balancing.round_robin import RoundRobin
from wsproxy.config import PoolConfig

POLICIES: dict[str, type[Policy]] = {
    "round_robin": RoundRobin,
    "least_conn": LeastConn,
    "random_two": RandomTwo,
    "consistent_hash": ConsistentHash,
}


def build_pool(config: PoolConfig, previous: Pool | None = None) -> Pool:
    """A pool for `config`; backends also in `previous` (a reload) keep their live state."""
    return Pool(config, POLICIES[config.balance], previous)


__all__ = ["POLICIES", "Backend", "Policy", "Pool", "build_pool"]
