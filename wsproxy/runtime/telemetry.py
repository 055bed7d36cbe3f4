"""The shell's part of the metrics: what can only be read from live objects or the process.

The Prometheus metrics themselves are defined in observe/metrics.py; this module registers
what needs the running server: the process collector (`process_*`: CPU, memory, descriptors,
start time, read from /proc at scrape time), `wsproxy_build_info`, and the backlog gauge (bytes
waiting in the proxy per direction, summed over the open sessions at scrape time, labelled by
pool and backend, so bounded by the config). It also samples the registry for the status
page's charts (observe/history.py) every few seconds.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import trio
from prometheus_client import ProcessCollector
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from wsproxy import __version__
from wsproxy.config import defaults
from wsproxy.observe.history import History, sample_from_metrics

if TYPE_CHECKING:
    from wsproxy.runtime.server import Server


class BacklogCollector(Collector):
    """wsproxy_backlog_bytes{pool, backend, direction}, read at scrape time."""

    def __init__(self, server: Server) -> None:
        self._server = server

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(
            "wsproxy_backlog_bytes",
            "Bytes read from one peer and waiting in the proxy for the other (its TCP window is full)",
            labels=["pool", "backend", "direction"],
        )
        sums: dict[tuple[str, str, str], int] = {}
        for name, pool in self._server.snapshot.pools.items():
            for b in pool.backends:
                for direction in ("to_client", "to_backend"):
                    sums[(name, b.name, direction)] = 0
        for s in list(self._server.sessions):
            if s.backend is None:
                continue
            to_client, to_backend = s.backlog()
            for direction, n in (("to_client", to_client), ("to_backend", to_backend)):
                key = (s.outcome.pool or "-", s.outcome.backend or "-", direction)
                if key in sums:  # a backend removed by a reload: its sessions are closing
                    sums[key] += n
        for key, n in sorted(sums.items()):
            family.add_metric(list(key), float(n))
        return [family]


class Telemetry:
    """One server's shell-side metrics and the status page's history."""

    def __init__(self, server: Server) -> None:
        self.server = server
        registry = server.metrics.registry
        ProcessCollector(registry=registry)
        registry.register(BacklogCollector(server))
        server.metrics.built(__version__, platform.python_version())
        self.history = History()
        self.started: float | None = None  # session clock, when serving began
        self.started_wall: float | None = None

    def sample(self) -> dict[str, Any]:
        return sample_from_metrics(self.server.metrics.registry.collect(), defaults.HISTORY_MAX_SERIES)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Sample every HISTORY_INTERVAL seconds until cancelled (the server's nursery ends)."""
        self.started, self.started_wall = trio.current_time(), time.time()
        task_status.started()
        while True:
            self.history.add(trio.current_time(), self.sample())
            await trio.sleep(self.history.interval)

    def overview(self) -> dict[str, Any]:
        """The status page's charts and totals: history, a sample of now, uptime, rates since start."""
        now = trio.current_time()
        current = self.sample()
        uptime = max(0.0, now - self.started) if self.started is not None else 0.0
        totals = {**current["total"], "closes": sum(current["closes"].values())}
        totals.pop("open", None)
        return {
            "uptime_s": round(uptime, 3),
            "totals": totals,
            "rates": {k: round(v / uptime, 3) if uptime > 0 else 0.0 for k, v in totals.items()},
            "now": current,
            "history": self.history.document(now),
        }
