"""Memory per idle session: 1000 sessions open through an in-process proxy, counted by tracemalloc.

A regression guard with slack, not a speed test (benchmarks/relay_bench.py measures RSS and
speed). The clients and the backend run in another process (tests/integration/idle_peers.py),
so every byte traced here is the proxy's (plus the test's own constant overhead): each session
has echoed one message and then sits idle, and the Python heap it holds while idle is bounded
per relay path. tracemalloc sees Python's allocations only, not kernel socket buffers or
OpenSSL's, so these bounds sit below the RSS figures of docs/performance.md.
"""

from __future__ import annotations

import gc
import resource
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
import trio
import trio.testing

from tests.support import proxy_yaml, start_proxy

ROOT = Path(__file__).resolve().parents[2]
# passthrough is the default path and the one with a memory target; inspect holds fewer
# sessions to keep the test short (tracemalloc makes each handshake about 2.5x slower).
SESSIONS = {"passthrough": 1000, "inspect": 300}
WARMUP = 50  # first-use costs (imports, caches, the first TLS-free accept) before tracing starts
# Measured on CPython 3.11: passthrough 25.2 KiB and inspect 28.4 KiB when this guard was written;
# 17.3 and 20.7 KiB once the relay stopped keeping the handshake's objects and one of its three
# tasks; 5.0 KiB (passthrough) once the relay phase moved to the shared readiness loop
# (reactor.py: no task at all while idle) and the backend count became a plain Lease
# (docs/performance.md says where the rest goes); 4.2 KiB once the per-session bound methods and
# closures, the heartbeat's dict and the spent handshake scope went (issue 22; 5.4 KiB before in
# the same harness); about 40 % slack on top.
BOUND_BYTES = {"passthrough": 6 * 1024, "inspect": 10 * 1024}
FDS_PER_SESSION = 4  # the proxy's two sockets, and the peers' two (they inherit the same limit)
FDS_SPARE = 200
MIN_SESSIONS = 100  # fewer would let per-process constants blur the per-session figure


def _sessions_allowed(wanted: int) -> int:
    """Raise the soft open-files limit as far as needed (and allowed); on a machine whose hard
    limit is lower, measure with as many sessions as fit rather than not at all."""
    needed = FDS_PER_SESSION * (wanted + WARMUP) + FDS_SPARE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        soft = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    fit = (soft - FDS_SPARE) // FDS_PER_SESSION - WARMUP
    assert fit >= MIN_SESSIONS, f"the open-files limit ({soft}) leaves room for only {fit} sessions"
    return min(wanted, fit)


class Peers:
    """The idle_peers.py process: line commands in, line answers out."""

    def __init__(self, proc: trio.Process) -> None:
        self.proc = proc
        self._buf = b""

    async def line(self) -> str:
        assert self.proc.stdout is not None
        while b"\n" not in self._buf:
            chunk = await self.proc.stdout.receive_some(4096)
            if not chunk:
                raise AssertionError(f"idle_peers exited: {self._buf!r}")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode()

    async def say(self, text: str) -> None:
        assert self.proc.stdin is not None
        await self.proc.stdin.send_all(text.encode() + b"\n")

    async def open(self, n: int) -> None:
        await self.say(f"open {n}")
        answer = await self.line()
        assert answer == f"opened {n}", answer


async def wait_for_sessions(server, n: int) -> None:  # type: ignore[no-untyped-def]
    while len(server.sessions) != n:
        await trio.sleep(0.01)


@pytest.mark.parametrize("relay", ["passthrough", "inspect"])
async def test_idle_session_memory_is_bounded(nursery, relay: str) -> None:
    sessions = _sessions_allowed(SESSIONS[relay])
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "tests.integration.idle_peers"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=ROOT,
    )
    peers = Peers(proc)
    try:
        with trio.fail_after(60):
            backend_port = int((await peers.line()).split()[1])
            proxy = await start_proxy(
                nursery,
                proxy_yaml([backend_port], listener_extra=f"relay: {relay}", extra="log: {level: warning}\n"),
            )
            await peers.say(f"proxy {proxy.port()}")
            await peers.open(WARMUP)
            await wait_for_sessions(proxy.server, WARMUP)
            await trio.testing.wait_all_tasks_blocked(0.05)
            gc.collect()
            tracemalloc.start(1)
            try:
                before = tracemalloc.get_traced_memory()[0]
                await peers.open(sessions)
                await wait_for_sessions(proxy.server, WARMUP + sessions)
                await trio.testing.wait_all_tasks_blocked(0.05)  # every session handed to the readiness loop
                gc.collect()
                after = tracemalloc.get_traced_memory()[0]
            finally:
                tracemalloc.stop()
            per_session = (after - before) / sessions
            assert all(s.relay is not None for s in proxy.server.sessions), "a session is not relaying"
            assert per_session <= BOUND_BYTES[relay], (
                f"{relay}: {per_session / 1024:.1f} KiB of Python heap per idle session "
                f"(bound {BOUND_BYTES[relay] / 1024:.0f} KiB)"
            )
            await peers.say("close")
            await proc.wait()
            await wait_for_sessions(proxy.server, 0)
    finally:
        if proc.returncode is None:
            proc.kill()  # our own child, by its handle
            await proc.wait()
