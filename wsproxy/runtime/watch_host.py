"""One task per watched thing, hosted in a nursery of their own: what the health checker (one
task per backend with active checks) and DNS discovery (one per discovered pool) share.

`sync(state)` makes the set of watches match `state`; before `run` has started its nursery the
state waits and is applied when it starts, so the server may sync at any point of its start-up.
A watch ends by cancelling its own scope; `run`'s end cancels them all.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Generic, Protocol, TypeVar

import trio


class Watch(Protocol):
    scope: trio.CancelScope


K = TypeVar("K")
W = TypeVar("W", bound=Watch)
S = TypeVar("S")


class WatchHost(ABC, Generic[K, W, S]):
    """The watches (`_watches`, by key), their nursery, and the state waiting for it."""

    def __init__(self) -> None:
        self._watches: dict[K, W] = {}
        self._nursery: trio.Nursery | None = None
        self._pending: S | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Host the watch tasks until cancelled."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if self._pending is not None:
                    self.sync(self._pending)
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            self._watches.clear()

    def sync(self, state: S) -> None:
        """Make the watches match `state` (now, or when `run` starts)."""
        if self._nursery is None:
            self._pending = state
            return
        self._pending = None
        self._resync(state, self._nursery)

    @abstractmethod
    def _resync(self, state: S, nursery: trio.Nursery) -> None:
        """Cancel the watches `state` no longer wants, start (in `nursery`) the ones it adds."""
