"""Balancing policies behind one interface (see base.py); `build_pool` picks by name."""

from __future__ import annotations

from wsproxy.config import PoolConfig
from wsproxy.policy.balancing.base import Backend, Policy, Pool
from wsproxy.policy.balancing.consistent_hash import ConsistentHash
from wsproxy.policy.balancing.least_conn import LeastConn
from wsproxy.policy.balancing.random_two import RandomTwo
from wsproxy.policy.balancing.round_robin import RoundRobin

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
