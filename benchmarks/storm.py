"""The storm cell of relay_bench.py: every client reconnecting at once.

`--sessions` (5,000 in relay_bench) sessions are opened as fast as possible by `--procs` compiled
generator processes (hs_gen.c, storm mode) that all start at the same wall-clock instant; each
session does the handshake, one echo of a small message and a close. Bounded: every session
that has not finished within `bound` seconds (30 s) is counted as a timeout, and every generator
exits by then. Reported: how long until all sessions were established (or how many were within
the bound), the handshake latency (connect start to 101) p50/p99 over all sessions, sessions per
second established, failures by kind (refused, reset, timeout, non101, eof, tls, local, other),
and the CPU of the generators, the target and the backends from the common start until the last
generator exits.

What limits a storm besides the target's speed: the listen backlog (connections the kernel has
completed but the target has not yet accepted; SYNs beyond it are dropped and retried by the
client after 1 s, 3 s, ...). `net.core.somaxconn` caps every backlog; the value is recorded.
"""

from __future__ import annotations

import time
from pathlib import Path

from hs_driver import START_DELAY, GenRun, merge_error_kinds, run_generators

SOMAXCONN = Path("/proc/sys/net/core/somaxconn")


def somaxconn() -> int | None:
    try:
        return int(SOMAXCONN.read_text())
    except (OSError, ValueError):
        return None


def percentile(ordered: list[int], p: float) -> float | None:
    if not ordered:
        return None
    return float(ordered[min(len(ordered) - 1, int(p * len(ordered)))])


def run_storm(gen: GenRun, *, sessions: int, procs: int, watch: list[int], bound: float = 30.0, size: int = 16) -> dict:
    procs = max(1, min(procs, sessions))
    start_at = time.time() + START_DELAY
    extra = ["--timeout", str(bound), "--max-seconds", str(bound + 1.0), "--size", str(size)]
    shares = [sessions // procs + (1 if i < sessions % procs else 0) for i in range(procs)]
    argvs = [gen.argv("storm", n, start_at, extra) for n in shares]
    results, cpu, errs = run_generators(argvs, watch=watch, start_at=start_at, window=None, bound=bound + 1.0)
    established = sum(r["established"] for r in results)
    latencies = sorted(x for r in results for x in r["latencies_us"])
    last = max((r["last_established_s"] for r in results if r["established"]), default=None)
    out = {
        "mode": "storm",
        "generator": f"hs_gen x{procs}",
        "sessions": sessions,
        "bound_s": bound,
        "established": established,
        "completed": sum(r["completed"] for r in results),
        # None unless every session was established within the bound
        "all_established_s": round(last, 3) if last is not None and established == sessions else None,
        "last_established_s": round(last, 3) if last is not None else None,
        "rate": round(established / last, 1) if last else None,
        "p50_us": percentile(latencies, 0.5),
        "p99_us": percentile(latencies, 0.99),
        "errors": sum(r["errors"] for r in results),
        "error_kinds": merge_error_kinds(results),
        "somaxconn": somaxconn(),
        **cpu,
    }
    if errs:
        out["stderr"] = " | ".join(errs)[-600:]
    return out
