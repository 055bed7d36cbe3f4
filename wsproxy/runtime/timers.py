"""One task that fires every session's deadlines (heartbeats, idle, lifetime).

A task or cancel scope per session per timer would cost memory on every idle session; instead a
session schedules a callback at its next deadline and the single timer task calls it. Cancelling
only drops the callback (so a finished session is freed at once, not at a deadline hours away);
the heap is compacted when cancelled entries outnumber live ones, which keeps both `schedule`
and `cancel` cheap and the heap's size bounded by the live sessions.
"""

from __future__ import annotations

import heapq
import itertools
import logging
from collections.abc import Callable

import trio

log = logging.getLogger("wsproxy.timers")

COMPACT_MIN = 64  # below this many cancelled entries, compacting is not worth it


class TimerEntry:
    """A scheduled callback; `Timers.cancel` clears it."""

    __slots__ = ("callback", "seq", "when")

    def __init__(self, when: float, seq: int, callback: Callable[[float], None]) -> None:
        self.when = when
        self.seq = seq
        self.callback: Callable[[float], None] | None = callback

    def __lt__(self, other: TimerEntry) -> bool:
        return (self.when, self.seq) < (other.when, other.seq)


class Timers:
    __slots__ = ("_cancelled", "_heap", "_scope", "_seq")

    def __init__(self) -> None:
        self._heap: list[TimerEntry] = []
        self._seq = itertools.count()
        self._scope: trio.CancelScope | None = None
        self._cancelled = 0

    def schedule(self, when: float, callback: Callable[[float], None]) -> TimerEntry:
        """Call `callback(now)` at `when` (trio clock), from the timer task."""
        entry = TimerEntry(when, next(self._seq), callback)
        heapq.heappush(self._heap, entry)
        if self._scope is not None and when < self._scope.deadline:
            self._scope.deadline = when
        return entry

    def cancel(self, entry: TimerEntry | None) -> None:
        """Forget `entry`'s callback (and whatever it references); harmless if it already ran."""
        if entry is None or entry.callback is None:
            return
        entry.callback = None
        self._cancelled += 1
        if self._cancelled >= COMPACT_MIN and self._cancelled * 2 > len(self._heap):
            self._heap[:] = [e for e in self._heap if e.callback is not None]
            heapq.heapify(self._heap)
            self._cancelled = 0

    def __len__(self) -> int:
        """Live (not cancelled, not yet fired) entries."""
        return len(self._heap) - self._cancelled

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        heap = self._heap
        while True:
            with trio.CancelScope(deadline=heap[0].when if heap else float("inf")) as scope:
                self._scope = scope
                await trio.sleep_forever()
            self._scope = None
            now = trio.current_time()
            while heap and heap[0].when <= now:
                entry = heapq.heappop(heap)
                callback, entry.callback = entry.callback, None
                if callback is None:
                    self._cancelled -= 1
                    continue
                try:
                    callback(now)
                except Exception:
                    # A bug in one session's timer must not stop every other session's timers.
                    log.exception("timer callback failed")
            await trio.lowlevel.checkpoint()
