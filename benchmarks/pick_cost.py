"""Cost of one pick per balancing policy, for 3, 30 and 300 backends.

One pick is what a new session pays: take the first candidate from `candidates(key)` and
acquire/release it. Each pool first holds 10 000 open sessions placed by the policy itself, so
the load-aware policies compare real, uneven counts. Each cell runs for about 0.2 s.

For scale it also prints what relaying one small client message costs: through the pure relay
core alone (parse, check, re-frame), and as a session does it, with trio receiving it from one
loopback socket pair and sending it on another. A pick is paid once per session, a relay step
once per message; a pick should stay well below the relay step.

    python benchmarks/pick_cost.py
"""

from __future__ import annotations

import socket
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import trio

try:
    from wsproxy.policy.balancing import POLICIES, Pool, build_pool
except ImportError:  # run from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from wsproxy.policy.balancing import POLICIES, Pool, build_pool
from wsproxy.config import Address, BackendConfig, HashKey, PoolConfig
from wsproxy.protocol.relay import Relay
from wsproxy.protocol.relay_inspect import InspectRelay
from wsproxy.protocol.relay_passthrough import PassthroughRelay

BACKEND_COUNTS = (3, 30, 300)
ACTIVE_SESSIONS = 10_000
CELL_SECONDS = 0.2
BATCH = 100
KEYS = [f"user-{i}".encode() for i in range(4096)]
MESSAGE_BYTES = 64


def masked_text_frame(payload: bytes, mask: bytes = b"\x12\x34\x56\x78") -> bytes:
    """One final text frame as a client sends it (masked; payload under 126 bytes)."""
    assert len(payload) < 126
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x81, 0x80 | len(payload)]) + mask + masked


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


def relay_cost_us(relay: Relay) -> float:
    """Mean microseconds for one client message through `relay`, to the bytes for the backend."""
    frame = masked_text_frame(b"x" * MESSAGE_BYTES)
    messages = 0
    start = time.perf_counter()
    deadline = start + CELL_SECONDS
    now = start
    while now < deadline:
        for _ in range(BATCH):
            relay.feed_client(frame)
            relay.take_for_backend()
        messages += BATCH
        now = time.perf_counter()
    return (now - start) / messages * 1e6


async def _relay_with_sockets_us(relay: Relay) -> float:
    """Like relay_cost_us, plus the socket hops a session makes: client -> proxy -> backend."""
    frame = masked_text_frame(b"x" * MESSAGE_BYTES)
    pairs = [socket.socketpair() for _ in range(2)]
    client, proxy_in = (trio.SocketStream(trio.socket.from_stdlib_socket(s)) for s in pairs[0])
    proxy_out, backend = (trio.SocketStream(trio.socket.from_stdlib_socket(s)) for s in pairs[1])
    messages = 0
    start = time.perf_counter()
    deadline = start + CELL_SECONDS
    now = start
    while now < deadline:
        for _ in range(BATCH):
            await client.send_all(frame)
            relay.feed_client(await proxy_in.receive_some(65536))
            out = relay.take_for_backend()
            await proxy_out.send_all(out)
            got = 0
            while got < len(out):
                got += len(await backend.receive_some(65536))
        messages += BATCH
        now = time.perf_counter()
    for stream in (client, proxy_in, proxy_out, backend):
        await stream.aclose()
    return (now - start) / messages * 1e6


def relay_with_sockets_us(relay: Relay) -> float:
    return trio.run(_relay_with_sockets_us, relay)


def main() -> None:
    print(f"cost of one pick in microseconds ({ACTIVE_SESSIONS} active sessions held open)")
    header = f"{'policy':<16}" + "".join(f"{f'{n} backends':>14}" for n in BACKEND_COUNTS)
    print(header)
    print("-" * len(header))
    for balance in POLICIES:
        cells = [measure(balance, n) for n in BACKEND_COUNTS]
        print(f"{balance:<16}" + "".join(f"{c:>14.2f}" for c in cells))
    print(f"\nfor scale, one {MESSAGE_BYTES}-byte client message relayed, in microseconds")
    print(f"{'relay':<16}{'core only':>14}{'with sockets':>14}")
    for name, make in (("inspect", InspectRelay), ("passthrough", PassthroughRelay)):
        print(f"{name:<16}{relay_cost_us(make()):>14.2f}{relay_with_sockets_us(make()):>14.2f}")


if __name__ == "__main__":
    main()
