"""What a fleet adds to a server: the shared-state client (Redis) and the DNS watches.

server.py owns listeners, sessions and the one apply path for configuration changes
(`Server._apply`). A fleet brings two more tasks and one more source of changes: the Redis client
that the sessions' edge checks ask (runtime/shared_state.py), and the watches of pools whose
backends come from DNS (runtime/discovery.py), whose answers become a configuration and a reload
plan handed to that same apply path. This module wires those to the server, so the server knows
only `start`, `reloaded`, `leave` and nothing of Redis or DNS.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from wsproxy.config import BackendConfig, Config
from wsproxy.observe.metrics import Metrics
from wsproxy.policy.discovery import same_members, with_membership
from wsproxy.policy.reload_plan import ReloadPlan, plan_reload
from wsproxy.policy.snapshot import Snapshot
from wsproxy.runtime.discovery import Discovery, DiscoveryCollector
from wsproxy.runtime.gate import Edge
from wsproxy.runtime.shared_state import SharedStateClient, SharedStateCollector

log = logging.getLogger("wsproxy.server")

# the server's apply path: (new config, plan from the running one, why sessions close) -> sessions set to drain
ApplyPlan = Callable[[Config, ReloadPlan, str], Awaitable[int]]


class FleetWiring:
    """A server's Redis client (None without `shared_state`) and its DNS watches."""

    def __init__(
        self,
        config: Config,
        *,
        edge: Edge,
        metrics: Metrics,
        snapshot: Callable[[], Snapshot],
        apply: ApplyPlan,
        draining: Callable[[], bool],
    ) -> None:
        self._snapshot = snapshot
        self._apply = apply
        self._draining = draining
        self.shared: SharedStateClient | None = None
        if config.shared_state is not None:
            self.shared = SharedStateClient(
                config.shared_state,
                pools=lambda: snapshot().pools,
                admission=edge.admission,
                config=lambda: snapshot().config,
            )
            edge.fleet = self.shared  # the sessions' edge checks ask the fleet first
            metrics.registry.register(SharedStateCollector(self.shared, lambda: snapshot().pools))
        self.discovery = Discovery(self.apply_membership)  # pools with `discovery`; sync() on start and reload
        metrics.registry.register(DiscoveryCollector(self.discovery, self._discovered_pools))

    def _discovered_pools(self) -> list[str]:
        return [name for name, pool in self._snapshot().config.pools.items() if pool.discovery is not None]

    async def start(self, nursery: trio.Nursery) -> None:
        """Before the listeners open: the Redis client running, every discovered pool asked once
        (so a proxy starts with backends when DNS answers), then the watches."""
        if self.shared is not None:
            await nursery.start(self.shared.run)
        await self.discovery.first_answers(self._snapshot().config)
        self.discovery.sync(self._snapshot().config)
        await nursery.start(self.discovery.run)

    def reloaded(self, config: Config) -> None:
        """A reload was applied: kept discovery specs keep their watch; changed ones ask again now."""
        self.discovery.sync(config)

    async def leave(self) -> None:
        """The sessions are gone: this process's counts leave the fleet now, not at its TTL's end."""
        if self.shared is not None:
            await self.shared.leave()

    async def apply_membership(self, pool: str, backends: tuple[BackendConfig, ...]) -> None:
        """DNS answered `backends` for `pool`: apply the difference as a reload would (new ones added,
        with slow start when health is configured; removed ones drained with 1012 over
        reload.drain_window; the others untouched)."""
        running = self._snapshot().config
        current = running.pools.get(pool)
        if current is None or current.discovery is None or self._draining() or same_members(current.backends, backends):
            return
        config = with_membership(running, pool, backends)
        plan = plan_reload(running, config)
        doomed = await self._apply(config, plan, "backend removed from DNS")
        log.info(
            "pool %s: DNS %s answered %d backend(s): %d added, %d removed; %d session(s) on removed backends "
            "close over %gs",
            pool,
            current.discovery.name,
            len(backends),
            len(plan.added),
            len(plan.removed),
            doomed,
            config.reload.drain_window,
        )
