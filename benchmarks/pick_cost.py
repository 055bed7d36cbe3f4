"""Cost of one pick per balancing policy, for 3, 30 and 300 backends.

One pick is what a new session pays: take the first candidate from `candidates(key)` and
acquire/release it. Each pool first holds 10 000 open sessions placed by the policy itself, so
the load-aware policies compare real, uneven counts. Each cell runs for about 0.2 s.

    python benchmarks/pick_cost.py
"""

from __future__ import annotations

import sys
import time
from contextlib import ExitStack
from pathlib import Path

try:
    from wsproxy.balancing import POLICIES, Pool, build_pool
except ImportError:  # run from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from wsproxy.balancing import POLICIES, Pool, build_pool
from wsproxy.config import Address, BackendConfig, HashKey, PoolConfig

BACKEND_COUNTS = (3, 30, 300)
ACTIVE_SESSIONS = 10_000
CELL_SECONDS = 0.2
BATCH = 100
KEYS = [f"user-{i}".encode() for i in range(4096)]


def make_pool(balance: str, count: int) -> Pool:
    """`count` backends with weights 1, 2, 3, 1, 2, 3, ... so weighting is exercised too."""
    backends = tuple(BackendConfig(Address(f"10.{i // 250}.{i % 250}.1", 9000), weight=1 + i % 3) for i in range(count))
    hash_key = HashKey("header", "x-user") if balance == "consistent_hash" else None
    return build_pool(PoolConfig(name="bench", backends=backends, balance=balance, hash_key=hash_key))


def pick_cost_us(pool: Pool) -> float:
    """Mean microseconds per pick, measured in batches until CELL_SECONDS have passed."""
    keys, n_keys = KEYS, len(KEYS)
    picks = 0
    start = time.perf_counter()
    deadline = start + CELL_SECONDS
    now = start
    while now < deadline:
        for i in range(picks, picks + BATCH):
            backend = next(iter(pool.candidates(keys[i % n_keys])))
            with pool.acquire(backend):
                pass
        picks += BATCH
        now = time.perf_counter()
    return (now - start) / picks * 1e6


def measure(balance: str, count: int) -> float:
    pool = make_pool(balance, count)
    with ExitStack() as sessions:
        for i in range(ACTIVE_SESSIONS):
            backend = next(iter(pool.candidates(f"session-{i}".encode())))
            sessions.enter_context(pool.acquire(backend))
        return pick_cost_us(pool)


def main() -> None:
    print(f"cost of one pick in microseconds ({ACTIVE_SESSIONS} active sessions held open)")
    header = f"{'policy':<16}" + "".join(f"{f'{n} backends':>14}" for n in BACKEND_COUNTS)
    print(header)
    print("-" * len(header))
    for balance in POLICIES:
        cells = [measure(balance, n) for n in BACKEND_COUNTS]
        print(f"{balance:<16}" + "".join(f"{c:>14.2f}" for c in cells))


if __name__ == "__main__":
    main()
