"""The proxy's own descriptors at run time: the limit, the reserve, a spare descriptor, shortages.

policy/capacity.py decides (which errors are local, how big the reserve is); this module holds
what those decisions need from the process: RLIMIT_NOFILE, the count of open descriptors, and
one spare descriptor (nginx's and HAProxy's trick) released when accept() fails with EMFILE, so
the accept loop can take the waiting connection and close it instead of spinning on a backlog
it cannot serve. New sessions are refused with 503 while the open descriptors are within the
reserve, so the proxy sheds work before it runs out; a connect that still fails for want of a
local resource gets 503 with Retry-After and is never held against the backend. Every shortage
counts in `wsproxy_local_resource_exhausted_total{resource}` and is logged once per burst.
"""

from __future__ import annotations

import logging
import os
import resource as rlimit
import socket
import struct
from collections.abc import Sized

import trio

from wsproxy.config import Config, defaults
from wsproxy.observe.burst_log import BurstLog
from wsproxy.observe.metrics import Metrics
from wsproxy.policy import capacity
from wsproxy.protocol.handshake import Rejection

log = logging.getLogger("wsproxy.capacity")

FD_DIR = "/proc/self/fd"


def descriptor_limit() -> int | None:
    """This process's soft RLIMIT_NOFILE (None: unlimited)."""
    soft, _hard = rlimit.getrlimit(rlimit.RLIMIT_NOFILE)
    return None if soft == rlimit.RLIM_INFINITY else int(soft)


def open_descriptors() -> int | None:
    """How many descriptors this process has open now (None where /proc is not there)."""
    try:
        return len(os.listdir(FD_DIR)) - 1  # listdir's own descriptor on the directory
    except OSError:
        return None


def shortage_rejection(resource: str, what: str) -> Rejection:
    """The 503 of a session the proxy could not carry for want of its own resources. `quiet`: the
    burst's one warning (Capacity.record) speaks for all of them, not a line per session."""
    return Rejection(
        503,
        f"proxy out of {resource}: {what}",
        headers=((b"Retry-After", str(defaults.LOCAL_SHORTAGE_RETRY_AFTER).encode()),),
        public="the proxy is at capacity; retry after Retry-After",
        quiet=True,
    )


class Capacity:
    """One server's view of its own descriptors; shared by its accept loops and sessions."""

    __slots__ = ("_base", "_logs", "_metrics", "_sessions", "_spare", "limit")

    def __init__(self, metrics: Metrics, *, sessions: Sized) -> None:
        """`sessions` is the server's live-session registry (anything with a len())."""
        self.limit = descriptor_limit()
        self._metrics = metrics
        self._sessions = sessions
        self._logs: dict[str, BurstLog] = {}
        self._spare: int | None = None
        self._base = defaults.DESCRIPTOR_BASE

    def start(self, config: Config) -> None:
        """Once the listeners are open: take the spare, measure the base, warn if the limit is short."""
        self._take_spare()
        measured = open_descriptors()
        if measured is not None:
            self._base = measured
        warn_if_short(config, self.limit)

    def stop(self) -> None:
        if self._spare is not None:
            os.close(self._spare)
            self._spare = None

    # --- sessions --------------------------------------------------------------------------

    def shed(self) -> Rejection | None:
        """A 503 for a new session while the open descriptors are within the reserve, else None.

        The estimate (base + 2 per live session) is one len(); only when it says the reserve is
        near is /proc/self/fd counted, so the check costs nothing away from the limit."""
        limit = self.limit
        if limit is None:
            return None
        estimate = self._base + capacity.PER_SESSION * len(self._sessions)
        if not capacity.within_reserve(open_descriptors=estimate, limit=limit):
            return None
        real = open_descriptors()
        if real is not None and not capacity.within_reserve(open_descriptors=real, limit=limit):
            return None
        count = real if real is not None else estimate
        reserve = capacity.reserve_for(limit)
        return self.shortage(
            capacity.DESCRIPTORS, f"{count} of {limit} descriptors open, within the reserve of {reserve}"
        )

    def shortage(self, resource: str, what: str) -> Rejection:
        """Count and (once per burst) log a local shortage; the 503 the session answers."""
        self.record(resource, what)
        return shortage_rejection(resource, what)

    def record(self, resource: str, what: str) -> None:
        self._metrics.local_resource_exhausted(resource)
        burst = self._logs.get(resource)
        if burst is None:
            burst = self._logs[resource] = BurstLog(defaults.LOCAL_SHORTAGE_LOG_QUIET)
        previous = burst.note(trio.current_time())
        if previous is None:
            return
        earlier = f" (the previous burst: {previous + 1} times)" if previous else ""
        log.warning(
            "the proxy is out of its own %s: %s; new sessions get 503 with Retry-After, no backend is blamed. "
            "Logged once per burst (until %gs pass without it); counted in "
            "wsproxy_local_resource_exhausted_total{resource=%r}%s",
            resource,
            what,
            burst.quiet,
            resource,
            earlier,
        )

    # --- the accept loop ---------------------------------------------------------------------

    def accept_failed(self, listening: socket.socket, exc: OSError) -> bool:
        """accept() failed with `exc` (one of ACCEPT_CAPACITY_ERRNOS). For want of descriptors,
        release the spare, take the waiting connection and close it at once (its client sees a
        closed connection instead of waiting in the backlog), and take the spare back. True: do
        so, accept again at once; False: pause before accepting again."""
        resource = capacity.local_resource(exc.errno) or capacity.DESCRIPTORS
        self.record(resource, f"accept failed: {exc.strerror or exc}")
        if resource != capacity.DESCRIPTORS or self._spare is None:
            self._take_spare()
            return False
        os.close(self._spare)
        self._spare = None
        try:
            conn, _addr = listening.accept()
        except OSError:
            self._take_spare()
            return False
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()  # a reset at once: the client knows now, and nothing lingers here
        self._take_spare()
        return self._spare is not None

    def _take_spare(self) -> None:
        if self._spare is None:
            try:
                self._spare = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                self._spare = None


def warn_if_short(config: Config, limit: int | None) -> None:
    """At start: warn when RLIMIT_NOFILE is below what the configured caps need, and say how to
    raise it; without a cap, say how many sessions the limit carries."""
    if limit is None:
        return
    needed = capacity.descriptors_needed(config)
    how = "raise it with LimitNOFILE= in the systemd unit, or `ulimit -n` before starting (docs/operations.md)"
    carries = capacity.sessions_allowed(limit)
    if needed is None:
        log.info(
            "descriptor limit (RLIMIT_NOFILE) %d carries about %d sessions (2 descriptors each); "
            "no max_sessions bounds them: beyond that, new sessions get 503; %s",
            limit,
            carries,
            how,
        )
        return
    if needed > limit:
        log.warning(
            "descriptor limit (RLIMIT_NOFILE) %d is below the %d the configured caps need (2 per session, "
            "plus health checks, admin, listeners and a reserve): sessions beyond about %d get 503; "
            "%s, e.g. LimitNOFILE=%d",
            limit,
            needed,
            carries,
            how,
            needed,
        )
