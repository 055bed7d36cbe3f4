"""The fleet's shared state in Redis: the client (coredis, on anyio, so on trio) and its one task.

Every `shared_state.refresh` the task runs one script (policy/fleet.py's SYNC_SCRIPT) that writes
this process's changed counts, renews its heartbeat, reaps processes whose heartbeat ran out, and
answers the fleet's totals; `merge` turns those into each backend's `others`, which the balancing
policies add to their own counts. A handshake never waits on that round trip. The limits that must
hold exactly for the fleet are one script per decision: the per-address handshake rate (GCRA) and
the session caps (limits.max_sessions, pools.NAME.max_sessions, rate_limits.max_sessions_per_ip).

Redis unreachable, or slower than `shared_state.timeout`: every decision is this process's own
(fail open, as Envoy's global rate limit does by default), one warning is logged,
`wsproxy_shared_state_up` is 0, and the task keeps trying each refresh; once Redis answers, the
process writes all its counts again (resync). No session is ever closed because Redis went away.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import coredis
import trio
from coredis.exceptions import RedisError
from coredis.retry import NoRetryPolicy
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from wsproxy.config import Config, SharedState, defaults
from wsproxy.config.fleet import shown_url
from wsproxy.policy import fleet
from wsproxy.policy.admission import Admission
from wsproxy.policy.balancing import Pool

log = logging.getLogger("wsproxy.shared_state")


class _CoredisLines(logging.Filter):
    """coredis logs every reconnect and NOSCRIPT retry at INFO and a failed connect at ERROR, each
    with a traceback; a Redis that is down or slow is the peer's condition, and this module logs
    the one line an operator needs (Redis down, Redis back) itself, once per streak. So: a failed
    connect (already in that line) is dropped, anything else of coredis's at ERROR becomes a
    WARNING without traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        if record.getMessage().startswith("Connection attempt failed"):
            return False
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.exc_info, record.exc_text = None, None
        return True


logging.getLogger("coredis").setLevel(logging.WARNING)
logging.getLogger("coredis").addFilter(_CoredisLines())

# `decisions` keys: what a handshake asked the fleet, by how it was answered
FLEET = "fleet"
LOCAL = "local"


class SharedStateClient:
    """One process's link to the fleet's Redis: counts out, totals in, limits decided there."""

    def __init__(
        self,
        spec: SharedState,
        *,
        pools: Callable[[], Mapping[str, Pool]],
        admission: Admission,
        config: Callable[[], Config],
    ) -> None:
        self.spec = spec
        self.keys = fleet.Keys(spec.key_prefix)
        self.process_id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.up = False
        self.fleet: dict[str, int] | None = None  # the fleet totals of the last refresh
        self.refreshed_at: float | None = None  # trio time of the last refresh that answered
        self.script_errors: Counter[str] = Counter()  # by script, for the metrics
        self.decisions: Counter[tuple[str, str]] = Counter()  # (limit, FLEET | LOCAL)
        self._pools = pools
        self._config = config
        self._admission = admission
        admission.touched_ips = set()
        self._published: dict[str, int] = {}  # what Redis holds for this process (applied writes)
        self._seq = 0
        self._full = True  # the next write carries every count (first one, or after a resync)
        self._client: Any = None
        self._scripts: dict[str, Any] = {}
        self._warned = False
        self._left = False

    # --- the task ----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Hold the Redis client and refresh until cancelled (the server calls `leave` first:
        once this task is cancelled, so are coredis's own connection tasks)."""
        client = coredis.Redis.from_url(
            self.spec.redis,
            stream_timeout=self.spec.timeout,
            connect_timeout=self.spec.timeout,
            max_connections=defaults.SHARED_STATE_MAX_CONNECTIONS,
            retry_policy=NoRetryPolicy(),
        )
        async with client:
            self._client = client
            self._scripts = {
                name: client.register_script(text)
                for name, text in (
                    ("sync", fleet.SYNC_SCRIPT),
                    ("admit", fleet.ADMIT_SCRIPT),
                    ("gcra", fleet.GCRA_SCRIPT),
                    ("leave", fleet.LEAVE_SCRIPT),
                )
            }
            await self.refresh()  # the first view before the listeners open, when Redis answers
            task_status.started()
            try:
                while True:
                    await trio.sleep(self.spec.refresh)
                    await self.refresh()
            finally:
                self._client = None

    async def refresh(self) -> None:
        """Write this process's changed counts, renew its heartbeat, read the fleet's totals."""
        if self._left:
            return
        pools = self._pools()
        limits = self._config().rate_limits
        with_ips = limits.max_sessions_per_ip is not None
        touched = self._admission.touched_ips or set()
        self._admission.touched_ips = set()
        if not with_ips:
            touched = set()  # no per-address cap: the addresses stay out of Redis
        elif len(touched) > limits.max_tracked_ips:
            touched = set()  # too many to list: write every address's count instead (bounded by open sessions)
            self._full = True
        full = self._full
        ips: Iterable[str] = self._admission.per_ip.keys() if full else touched
        current = fleet.local_counts(pools, self._admission, ips=ips, with_ips=with_ips)
        writes = fleet.changes(self._published, current, full=full)
        self._seq += 1
        answer = await self._call(
            "sync",
            keys=[self.keys.fleet, self.keys.ips, self.keys.procs, self.keys.ledger(self.process_id)],
            args=[
                self.process_id,
                str(self._seq),
                str(int(self.spec.process_ttl * 1000)),
                str(defaults.SHARED_STATE_REAP_BATCH),
                self.keys.ledger_prefix,
                "full" if full else "delta",
                str(len(writes)),
                *fleet.encode(writes),
            ],
        )
        if answer is None:
            if self._admission.touched_ips is not None:
                self._admission.touched_ips |= touched  # not written: take them again next time
            fleet.merge(pools, None, self._published)
            return
        status = _text(answer[0])
        if status == fleet.RESYNC:
            self._published.clear()
            self._full = True
        elif status == fleet.OK:
            for k, v in writes.items():
                if v:
                    self._published[k] = v
                else:
                    self._published.pop(k, None)
            self._full = False
        elif self._admission.touched_ips is not None:  # stale: a newer write went first; try these again
            self._admission.touched_ips |= touched
        self.fleet = fleet.parse_hash(answer[1])
        self.refreshed_at = trio.current_time()
        fleet.merge(pools, self.fleet, self._published)

    async def leave(self) -> None:
        """Take this process's counts out of the fleet now (a clean exit), instead of letting its
        heartbeat run out. Refreshes stop: the process is going away."""
        self._left = True
        if not self.up or self._client is None:
            return
        await self._call(
            "leave",
            keys=[self.keys.fleet, self.keys.ips, self.keys.procs, self.keys.ledger(self.process_id)],
            args=[self.process_id],
        )

    # --- decisions -----------------------------------------------------------------------------

    async def handshake_wait(self, ip: str, rate: float, burst: float) -> float | None:
        """The fleet's verdict on one more handshake from `ip`: 0.0 (go on), the seconds until one
        would fit (429), or None when the fleet cannot say (this process decides alone)."""
        if not self.up:
            self.decisions["handshake_rate", LOCAL] += 1
            return None
        answer = await self._call("gcra", keys=[self.keys.handshakes(ip)], args=fleet.gcra_args(rate, burst))
        if answer is None:
            self.decisions["handshake_rate", LOCAL] += 1
            return None
        self.decisions["handshake_rate", FLEET] += 1
        return int(answer) / 1_000_000

    async def admit(self, ip: str, pool: str, caps: Mapping[str, int | None]) -> str | None:
        """Count an admitted session (already in this process's `Admission`) for the fleet, within
        `caps` (ledger field: cap). The field whose cap the fleet is at, or None: admitted, or
        the fleet cannot say (this process's own caps decided)."""
        if not self.up or self._full:
            self.decisions["session_caps", LOCAL] += 1
            return None
        a = self._admission
        values = {fleet.TOTAL: a.total, fleet.pool_field(pool): a.per_pool.get(pool, 0)}
        if caps.get(fleet.ip_field(ip)) is not None:
            values[fleet.ip_field(ip)] = a.per_ip.get(ip, 0)
        args: list[str] = []
        for field, value in values.items():
            cap = caps.get(field)
            args += [field, str(value), str(-1 if cap is None else cap)]
        self._seq += 1
        answer = await self._call(
            "admit",
            keys=[self.keys.fleet, self.keys.ips, self.keys.ledger(self.process_id)],
            args=[str(self._seq), str(len(values)), *args],
        )
        if answer is None:
            self.decisions["session_caps", LOCAL] += 1
            return None
        self.decisions["session_caps", FLEET] += 1
        status = _text(answer[0])
        if status == fleet.OVER:
            return _text(answer[1])
        if status == fleet.OK:
            self._published.update(values)
        elif status == fleet.RESYNC:
            self._full = True
        return None

    # --- one call --------------------------------------------------------------------------------

    async def _call(self, script: str, *, keys: list[str], args: list[str]) -> Any:
        """Run one script within `timeout`; None (and the state marked down) when Redis did not
        answer in time or failed."""
        if self._client is None:
            return None
        answer = None
        failure = f"no answer within {self.spec.timeout:g}s"
        with trio.move_on_after(self.spec.timeout):
            try:
                answer = await self._scripts[script](keys=keys, args=args)
            except RedisError as exc:
                failure = f"{type(exc).__name__}: {exc}"
                if isinstance(exc, coredis.exceptions.ResponseError):
                    self.script_errors[script] += 1
        if answer is None:
            self._down(failure)
            return None
        if not self.up:
            self.up = True
            self._full = True  # whatever happened meanwhile, write every count again
            self._warned = False
            log.info("shared state: Redis %s answers again: fleet-wide counts and limits resume", self._where)
        return answer

    def _down(self, why: str) -> None:
        if self.up or not self._warned:
            log.warning(
                "shared state: Redis %s unavailable (%s): counts and limits are this process's own until it answers",
                self._where,
                why,
            )
            self._warned = True
        self.up = False

    @property
    def _where(self) -> str:
        return shown_url(self.spec.redis)  # never the password of redis://user:pass@host

    def cache_age(self, now: float) -> float | None:
        return None if self.refreshed_at is None else now - self.refreshed_at


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class SharedStateCollector(Collector):
    """The shared view as this process sees it, read at scrape time."""

    def __init__(self, state: SharedStateClient, pools: Callable[[], Mapping[str, Pool]]) -> None:
        self._state = state
        self._pools = pools

    def collect(self) -> Iterable[Metric]:
        s = self._state
        up = GaugeMetricFamily("wsproxy_shared_state_up", "1 while Redis answers within shared_state.timeout, else 0")
        up.add_metric([], 1.0 if s.up else 0.0)
        age = GaugeMetricFamily(
            "wsproxy_shared_state_cache_age_seconds", "Seconds since the fleet's totals were last read (-1: never)"
        )
        got = s.cache_age(trio.current_time())
        age.add_metric([], -1.0 if got is None else got)
        sessions = GaugeMetricFamily(
            "wsproxy_shared_state_backend_sessions",
            "Open sessions on each backend, fleet-wide, as this process sees them (own now + others' last read)",
            labels=["pool", "backend"],
        )
        for name, pool in self._pools().items():
            for b in pool.backends:
                sessions.add_metric([name, b.name], float(b.active + b.others))
        errors = CounterMetricFamily(
            "wsproxy_shared_state_script_errors", "Redis scripts that answered an error, by script", labels=["script"]
        )
        for script in ("sync", "admit", "gcra", "leave"):
            errors.add_metric([script], float(s.script_errors.get(script, 0)))
        decisions = CounterMetricFamily(
            "wsproxy_shared_state_decisions",
            "Limit decisions by who took them: the fleet (Redis) or this process alone (Redis unavailable)",
            labels=["limit", "by"],
        )
        for limit in ("handshake_rate", "session_caps"):
            for by in (FLEET, LOCAL):
                decisions.add_metric([limit, by], float(s.decisions.get((limit, by), 0)))
        return [up, age, sessions, errors, decisions]
