"""Kernel pipes for splicing payloads from socket to socket (Linux `os.splice`), bounded and reused.

The relay phase may let the rest of a large data frame's payload cross the proxy without entering
Python (policy/relay_phase.py, `splice_size`): the link moves it from one socket into a pipe and
from the pipe to the other socket, as HAProxy splices. A pipe is taken for one direction of one
session while bytes are in it and given back once it is empty, so the pipes in use are bounded by
the payloads in flight, and by `SPLICE_MAX_PIPES` (two descriptors each): past that, `take` says
no and the link copies. Empty pipes are kept for reuse (`SPLICE_IDLE_PIPES`); a pipe that still
holds bytes when its session ends or its peer fails is closed, never reused.

`HAS_SPLICE` is False off Linux (or on a Python without `os.splice`): the copy path runs alone.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys

from wsproxy.config.defaults import SPLICE_IDLE_PIPES, SPLICE_MAX_PIPES

HAS_SPLICE = sys.platform.startswith("linux") and hasattr(os, "splice")
SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)
PIPE_PAGE = 4096
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


class PipePool:
    """Pipes for splicing, each a (read end, write end) pair of descriptors; see the module."""

    __slots__ = ("_idle", "_max", "_max_idle", "in_use", "taken")

    def __init__(self, *, max_pipes: int = SPLICE_MAX_PIPES, max_idle: int = SPLICE_IDLE_PIPES) -> None:
        self._max = max_pipes
        self._max_idle = max_idle
        self._idle: list[tuple[int, int]] = []
        self.in_use = 0  # pipes handed out and not given back or dropped
        self.taken = 0  # pipes handed out, ever (a payload began to be spliced)

    def take(self, capacity: int) -> tuple[int, int] | None:
        """An empty pipe holding at least `capacity` bytes if the kernel allows (None: at the
        limit, or no descriptor left: copy instead)."""
        if self._idle:
            self.in_use += 1
            self.taken += 1
            return self._idle.pop()
        if self.in_use >= self._max:
            return None
        try:
            r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return None
        if capacity > 16 * PIPE_PAGE:  # (16 pages is Linux's default; more only when asked)
            # over /proc/sys/fs/pipe-max-size or the user's pipe quota: a smaller pipe moves less per call
            with contextlib.suppress(OSError):
                fcntl.fcntl(w, F_SETPIPE_SZ, capacity)
        self.in_use += 1
        self.taken += 1
        return r, w

    def give(self, pipe: tuple[int, int]) -> None:
        """An empty pipe back, for reuse."""
        self.in_use -= 1
        if len(self._idle) < self._max_idle:
            self._idle.append(pipe)
        else:
            _close(pipe)

    def drop(self, pipe: tuple[int, int]) -> None:
        """A pipe that may hold bytes nobody will send: closed."""
        self.in_use -= 1
        _close(pipe)

    def close(self) -> None:
        """Close the idle pipes (the loop stopped)."""
        for pipe in self._idle:
            _close(pipe)
        self._idle.clear()


def _close(pipe: tuple[int, int]) -> None:
    for fd in pipe:
        with contextlib.suppress(OSError):
            os.close(fd)
