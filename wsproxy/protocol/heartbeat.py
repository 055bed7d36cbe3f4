"""When to ping a side, when a peer is dead, when a session is idle or too old: a pure schedule.

Nothing here reads a clock: every method takes `now`, so a 20 s interval is tested in
microseconds. The session tells the schedule what it saw (traffic from a side, a data message, one
of our pongs) and asks, at the time `next_deadline()` names, what is due. The sides that get
heartbeats are what the config calls `heartbeat.legs`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

from wsproxy.protocol.sides import SIDES, Side

CLIENT = Side.CLIENT
BACKEND = Side.BACKEND
PING_MARKER = b"wsproxy:"  # the proxy's pings carry this prefix; pongs with it are ours


class _ForSide:
    """An action about one side."""

    __slots__ = ()
    side: Side


@dataclass(frozen=True, slots=True)
class SendPing(_ForSide):
    side: Side
    payload: bytes


@dataclass(frozen=True, slots=True)
class PeerDead(_ForSide):
    side: Side
    silent_for: float  # seconds since anything arrived from that side


@dataclass(frozen=True, slots=True)
class Expired:
    what: str  # "idle" | "max_lifetime"


Action = SendPing | PeerDead | Expired


class _SideState:
    __slots__ = ("last_rx", "ping_payload", "ping_sent", "rtt")

    def __init__(self, now: float) -> None:
        self.last_rx = now
        self.ping_payload: bytes | None = None
        self.ping_sent = 0.0
        self.rtt: float | None = None


class Schedule:
    """Heartbeat and deadline state of one session.

    interval: ping a side silent this long (None: no heartbeat). timeout: after our ping, a side
    with no traffic for this long is dead. sides: which sides get heartbeats (the config's
    `heartbeat.legs`). idle: no data message
    either way for this long ends the session. lifetime: the session's end, jitter applied.
    """

    __slots__ = ("_backend", "_client", "_counter", "idle", "interval", "last_data", "lifetime_end", "timeout")

    def __init__(
        self,
        now: float,
        *,
        interval: float | None,
        timeout: float,
        sides: Iterable[Side] = SIDES,
        idle: float | None = None,
        lifetime: float | None = None,
    ) -> None:
        self.interval = interval
        self.timeout = timeout
        self.idle = idle
        self.lifetime_end = now + lifetime if lifetime is not None else None
        self.last_data = now
        # one state per heartbeated leg (None: that leg has none); two slots rather than a dict
        # keyed by side: a dict is the largest object an idle session would keep
        legs = {Side(side) for side in sides} if interval is not None else set()
        self._client = _SideState(now) if CLIENT in legs else None
        self._backend = _SideState(now) if BACKEND in legs else None
        self._counter = 0

    # --- what the session saw ---------------------------------------------------------------

    def saw_traffic(self, side: Side, now: float) -> None:
        state = self._client if side == CLIENT else self._backend
        if state is not None:
            state.last_rx = now

    def saw_data(self, now: float) -> None:
        self.last_data = now

    def saw_own_pong(self, side: Side, payload: bytes, now: float) -> float | None:
        """A pong the relay swallowed as ours: the round trip it measured (None: not the answer
        to our outstanding ping to that side, so nothing was measured)."""
        state = self._client if side == CLIENT else self._backend
        if state is not None and state.ping_payload is not None and payload == state.ping_payload:
            state.rtt = now - state.ping_sent
            state.ping_payload = None
            return state.rtt
        return None

    def ping_held(self, side: Side, now: float) -> None:
        """Our ping to `side` still waits behind a frame the peer is receiving: its timeout
        counts from when it can be sent, not from when it was queued."""
        state = self._client if side == CLIENT else self._backend
        if state is not None and state.ping_payload is not None:
            state.ping_sent = now

    def rtt(self, side: Side) -> float | None:
        state = self._client if side == CLIENT else self._backend
        return state.rtt if state is not None else None

    # --- what is due --------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """The earliest time anything may be due (None: nothing ever is)."""
        times: list[float] = []
        for state in (self._client, self._backend):
            if state is None:
                continue
            assert self.interval is not None
            if state.ping_payload is None:
                times.append(state.last_rx + self.interval)
            else:
                times.append(max(state.ping_sent, state.last_rx) + self.timeout)
        if self.idle is not None:
            times.append(self.last_data + self.idle)
        if self.lifetime_end is not None:
            times.append(self.lifetime_end)
        return min(times) if times else None

    def due(self, now: float) -> list[Action]:
        """Everything due at `now`; pings it returns are recorded as sent at `now`."""
        if self.lifetime_end is not None and now >= self.lifetime_end:
            return [Expired("max_lifetime")]
        if self.idle is not None and now >= self.last_data + self.idle:
            return [Expired("idle")]
        actions: list[Action] = []
        for side, state in ((CLIENT, self._client), (BACKEND, self._backend)):
            if state is None:
                continue
            assert self.interval is not None
            if state.ping_payload is not None and now >= max(state.ping_sent, state.last_rx) + self.timeout:
                if state.last_rx > state.ping_sent:
                    # Traffic arrived after our ping: the peer lives; its pong may be queued
                    # behind data. Ping again from the last traffic on.
                    state.ping_payload = None
                else:
                    actions.append(PeerDead(side, now - state.last_rx))
                    continue
            if state.ping_payload is None and now >= state.last_rx + self.interval:
                self._counter += 1
                payload = PING_MARKER + self._counter.to_bytes(4, "big") + os.urandom(4)
                state.ping_payload = payload
                state.ping_sent = now
                actions.append(SendPing(side, payload))
        return actions


def lifetime_with_jitter(max_lifetime: float, jitter: float, unit_random: float) -> float:
    """Spread lifetimes so sessions opened together do not all end together.

    `unit_random` in [0, 1) comes from the caller (tests pass fixed values): the result lies in
    [max_lifetime * (1 - jitter), max_lifetime].
    """
    return max_lifetime * (1.0 - jitter * unit_random)
