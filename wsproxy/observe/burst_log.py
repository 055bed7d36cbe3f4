"""Rate-limited logging for events that come in bursts: one line per burst, not one per event.

When the proxy runs out of descriptors, hundreds of sessions fail within a second; a log line
each would bury the one thing the operator must read (and cost descriptors and CPU of its own).
`BurstLog` says when to log: the first event of a burst, then nothing until `quiet` seconds pass
without an event; the first event after that starts a new burst and its line reports how many
events the previous burst had. The counts are also in a metric; this only shapes the log. Pure:
time comes in as `now`.
"""

from __future__ import annotations

import math


class BurstLog:
    """Decides which events of a bursty kind get a log line."""

    __slots__ = ("_last", "_suppressed", "quiet")

    def __init__(self, quiet: float) -> None:
        self.quiet = quiet
        self._last = -math.inf  # the latest event's time
        self._suppressed = 0  # events of the current burst after its logged first one

    def note(self, now: float) -> int | None:
        """One event at `now`. None: stay silent (same burst). Else log it: the number of events
        the previous burst had beyond its first (0 for the first burst)."""
        quiet_since = now - self._last
        self._last = now
        if quiet_since < self.quiet:
            self._suppressed += 1
            return None
        previous, self._suppressed = self._suppressed, 0
        return previous
