"""The frame codec and both relays, sans I/O: microseconds per frame, no sockets, no scheduler.

relay_bench.py measures the proxy end to end, where system calls and the scheduler dominate and
the spread between runs on a shared machine (±30 %) hides a change in the relay's own Python.
This script times only that Python: `frames.apply_mask`, and each relay fed whole frames of 1 KiB
and 64 KiB in each direction (what the hot path does per read), plus 16 small frames per read
(the per-frame loop), text (the UTF-8 check) and per-hop deflate (inspect only). It uses only
the public API, so the same script runs against an older tree to compare:

    PYTHONPATH=. python benchmarks/codec_bench.py                 # this tree
    PYTHONPATH=/path/to/other/tree python benchmarks/codec_bench.py

Each figure is the best of `--repeat` rounds of `--number` calls (timeit's rule: the minimum is
the least disturbed run), in this process's CPU time (`time.process_time`), so other programs on a
shared machine do not count; lower is better. To compare two trees, alternate them a few times
and compare the minima.
"""

from __future__ import annotations

import argparse
import struct
import time
import timeit
import zlib
from collections.abc import Callable

from wsproto.extensions import PerMessageDeflate

from wsproxy.protocol import frames
from wsproxy.protocol.relay_inspect import InspectRelay
from wsproxy.protocol.relay_passthrough import PassthroughRelay

KEY = b"k3y!"


def frame(opcode: int, payload: bytes, *, masked: bool, rsv: int = 0) -> bytes:
    """A peer's frame, built here (not by the codec under test)."""
    n = len(payload)
    b0 = 0x80 | rsv | opcode
    m = 0x80 if masked else 0
    if n < 126:
        head = bytes((b0, m | n))
    elif n < 0x10000:
        head = struct.pack("!BBH", b0, m | 126, n)
    else:
        head = struct.pack("!BBQ", b0, m | 127, n)
    if not masked:
        return head + payload
    stream = (KEY * (n // 4 + 1))[:n]
    return head + KEY + bytes(a ^ b for a, b in zip(payload, stream, strict=True))


def _deflated(payload: bytes) -> bytes:
    z = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -15)
    return (z.compress(payload) + z.flush(zlib.Z_SYNC_FLUSH))[:-4]


def _deflate_ext() -> PerMessageDeflate:
    ext = PerMessageDeflate()
    ext._enabled = True  # as if negotiated with the defaults (15 bits, context takeover)
    return ext


def relay_cases() -> dict[str, Callable[[], object]]:
    cases: dict[str, Callable[[], object]] = {}
    payload_1k = bytes(i % 251 for i in range(1024))
    payload_64k = bytes(i % 251 for i in range(65536))
    text_1k = ("wsproxy " * 128).encode()
    for cls_name, make in (("passthrough", PassthroughRelay), ("inspect", InspectRelay)):
        for label, payload in (("1KiB", payload_1k), ("64KiB", payload_64k)):
            up = frame(2, payload, masked=True)
            down = frame(2, payload, masked=False)
            relay = make()

            def c2b(relay=relay, up=up) -> object:
                relay.feed_client(up)
                return relay.take_for_backend()

            def b2c(relay=relay, down=down) -> object:
                relay.feed_backend(down)
                return relay.take_for_client()

            cases[f"{cls_name:<11} client->backend binary {label}"] = c2b
            cases[f"{cls_name:<11} backend->client binary {label}"] = b2c
        small = frame(2, payload_1k[:64], masked=True) * 16
        relay = make()

        def many(relay=relay, small=small) -> object:
            relay.feed_client(small)
            return relay.take_for_backend()

        cases[f"{cls_name:<11} client->backend 16x64B/read"] = many
        text = frame(1, text_1k, masked=True)
        relay = make()

        def text_up(relay=relay, text=text) -> object:
            relay.feed_client(text)
            return relay.take_for_backend()

        cases[f"{cls_name:<11} client->backend text 1KiB"] = text_up
    z_up = frame(2, _deflated(text_1k), masked=True, rsv=0x40)
    relay = InspectRelay(client_extensions=[_deflate_ext()], backend_extensions=[_deflate_ext()])

    def deflate_up(relay=relay) -> object:
        relay.feed_client(z_up)
        return relay.take_for_backend()

    cases["inspect     client->backend deflate 1KiB"] = deflate_up
    return cases


def mask_cases() -> dict[str, Callable[[], object]]:
    cases: dict[str, Callable[[], object]] = {}
    for label, n in (("64B", 64), ("1KiB", 1024), ("64KiB", 65536)):
        data = bytes(i % 251 for i in range(n))
        cases[f"apply_mask {label}"] = lambda data=data: frames.apply_mask(data, KEY)
    return cases


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--number", type=int, default=2000, help="calls per round (64 KiB cases: /16)")
    p.add_argument("--repeat", type=int, default=7, help="rounds; the best is reported")
    args = p.parse_args()
    for name, fn in {**mask_cases(), **relay_cases()}.items():
        number = max(1, args.number // 16) if "64KiB" in name else args.number
        best = min(timeit.repeat(fn, number=number, repeat=args.repeat, timer=time.process_time)) / number
        print(f"{name:<46} {best * 1e6:9.2f} us")


if __name__ == "__main__":
    main()
