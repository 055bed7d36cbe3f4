"""The readiness loop's two pollers side by side: what one round's poll costs.

runtime/reactor.py waits with `EpollPoller` (epoll itself) on Linux and `SelectorPoller`
(`selectors.DefaultSelector`) elsewhere; this measures, on this host, the cost of one
non-blocking poll with N registered sockets of which R are ready (level-triggered, so they stay
ready), and of one registration change (a side starting or stopping to wait for writability,
what backpressure does), per poller. Loopback socket pairs only; bounded in count and time.

    python benchmarks/poller_bench.py
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

from wsproxy.runtime.reactor import READ, WRITE, EpollPoller, Poller, SelectorPoller

CASES = ((100, 2), (100, 20), (1000, 2), (1000, 100))  # (registered, ready)
REPEAT = 3


def per_call(fn: Callable[[], object], seconds: float = 0.3) -> float:
    """Best of REPEAT: microseconds per call of `fn`."""
    best = float("inf")
    for _ in range(REPEAT):
        n = 0
        start = time.perf_counter()
        end = start + seconds
        while time.perf_counter() < end:
            for _ in range(100):
                fn()
            n += 100
        best = min(best, (time.perf_counter() - start) / n)
    return best * 1e6


def measure(make: Callable[[], Poller], registered: int, ready: int) -> tuple[float, float]:
    poller = make()
    pairs = [socket.socketpair() for _ in range(registered)]
    try:
        for i, (a, b) in enumerate(pairs):
            a.setblocking(False)
            poller.register(a.fileno(), READ)
            if i < ready:
                b.send(b"x")  # never read: ready in every round
        assert len(poller.poll()) == ready
        poll = per_call(poller.poll)
        fd = pairs[-1][0].fileno()
        flip = [READ | WRITE, READ]
        state = [0]

        def modify() -> None:
            state[0] ^= 1
            poller.modify(fd, flip[state[0]])

        change = per_call(modify)
        return poll, change
    finally:
        poller.close()
        for a, b in pairs:
            a.close()
            b.close()


def main() -> None:
    head = f"{'registered':>10} {'ready':>6} | {'epoll poll':>11} {'selectors poll':>15}"
    print(head + f" | {'epoll mod':>10} {'sel mod':>8}")
    for registered, ready in CASES:
        ep_poll, ep_mod = measure(EpollPoller, registered, ready)
        sel_poll, sel_mod = measure(SelectorPoller, registered, ready)
        print(
            f"{registered:>10} {ready:>6} | {ep_poll:>9.2f}us {sel_poll:>13.2f}us | {ep_mod:>8.2f}us {sel_mod:>6.2f}us"
        )


if __name__ == "__main__":
    main()
