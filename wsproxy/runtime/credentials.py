"""Sessions bound to their credentials, the shell: a timer per session whose auth answer
carried an expiry (policy/credentials.py decides when), which closes the session with 1008
"credentials expired" or first asks the auth service again (`auth.recheck_before`).

A recheck runs as a short task in the server's nursery (`Edge.tasks`), so an idle session still
holds no task of its own between checks. An auth service that cannot answer a recheck does not
end the session before its credentials actually expire: the session is then closed at expiry.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from wsproxy.config import AuthConfig
from wsproxy.policy.credentials import CLOSE_REASON, RECHECK, next_step
from wsproxy.protocol.handshake import ClientUpgrade
from wsproxy.protocol.relay import POLICY_VIOLATION
from wsproxy.runtime.timers import TimerEntry

if TYPE_CHECKING:
    from wsproxy.runtime.gate import Edge
    from wsproxy.runtime.session import Session

log = logging.getLogger("wsproxy.auth")


@dataclass(slots=True)
class Credentials:
    """What a recheck needs: the auth settings and the request as the auth service saw it."""

    spec: AuthConfig
    upgrade: ClientUpgrade
    client_ip: str
    scheme: str
    expires_at: float  # Unix time


class CredentialWatch:
    """One session's expiry timer (and recheck)."""

    __slots__ = ("_timer", "creds", "edge", "session")

    def __init__(self, edge: Edge, session: Session, creds: Credentials) -> None:
        self.edge = edge
        self.session = session
        self.creds = creds
        self._timer: TimerEntry | None = None

    def arm(self) -> None:
        remaining = self.creds.expires_at - time.time()
        step = next_step(remaining, self.creds.spec.recheck_before, random.random())
        when = trio.current_time() + step.delay
        callback = self._recheck_due if step.what == RECHECK else self._expired
        self.cancel()
        self._timer = self.edge.timers.schedule(when, callback)

    def cancel(self) -> None:
        if self._timer is not None:
            self.edge.timers.cancel(self._timer)
            self._timer = None

    def _live(self) -> bool:
        return self.edge.watches.get(self.session) is self and not self.session.closing

    def _expired(self, now: float) -> None:
        self._timer = None
        if not self._live():
            return
        log.info("session from %s: credentials expired: closing with 1008", self.creds.client_ip)
        self.session.go_away(POLICY_VIOLATION, CLOSE_REASON)

    def _recheck_due(self, now: float) -> None:
        self._timer = None
        if not self._live():
            return
        if self.edge.tasks is None:  # no nursery to ask from (not serving): close at expiry
            self._at_expiry()
            return
        self.edge.tasks.start_soon(self._recheck)

    def _at_expiry(self) -> None:
        delay = max(0.0, self.creds.expires_at - time.time())
        self._timer = self.edge.timers.schedule(trio.current_time() + delay, self._expired)

    async def _recheck(self) -> None:
        c = self.creds
        answer = await self.edge.auth.check(
            c.spec,
            c.upgrade,
            client_ip=c.client_ip,
            scheme=c.scheme,
            max_header_bytes=self.session.snapshot.config.limits.max_header_bytes,
            fresh=True,
        )
        if not self._live():
            return
        if answer.allowed:
            if answer.expires_at is None:
                return  # still allowed, and no longer bound to a time
            c.expires_at = answer.expires_at
            self.arm()
            return
        if answer.status in (401, 403):
            log.info("session from %s: auth recheck answered %d: closing with 1008", c.client_ip, answer.status)
            self.session.go_away(POLICY_VIOLATION, CLOSE_REASON)
            return
        log.warning("session from %s: auth recheck failed (%s): closing at expiry", c.client_ip, answer.reason)
        self._at_expiry()
