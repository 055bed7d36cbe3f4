"""The load generator of relay_bench.py: picows on uvloop, one process per cell.

Three modes, each bounded in time and count, printing one JSON line with its result:

- `rt`: `--conns` connections, closed loop, one message of `--size` bytes in flight per
  connection; round trips in the measured window and RTT percentiles.
- `hs`: `--conns` connectors, each opening a session (TCP, TLS if wss, Upgrade), closing it and
  opening the next; full handshakes per second (a fresh TLS session every time, no resumption).
- `idle`: opens `--conns` sessions that each echo one message and then stay open; the resident
  memory of the `--watch` processes before and after, per session.

`--watch PID,...` names the processes whose CPU (and for `idle`, RSS) is read from /proc over
the measured window: the proxy and the backends. The generator's own CPU is reported too, so
a cell where it saturates its core can be flagged.

    python benchmarks/load_client.py rt --url ws://127.0.0.1:8080/ --conns 100 --size 1024
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import ssl
import sys
import time
from array import array

import uvloop
from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

CLK_TCK = os.sysconf("SC_CLK_TCK")
MAX_SAMPLES = 5_000_000  # RTT samples kept per cell (a bound, far above what a cell records)
CONNECT_CONCURRENCY = 200  # sessions being opened at once while a cell sets up
DATA = (WSMsgType.BINARY, WSMsgType.TEXT, WSMsgType.CONTINUATION)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads), from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return (int(rest[11]) + int(rest[12])) / CLK_TCK


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def cpu_busy_ticks() -> dict[str, tuple[int, int]]:
    """Per CPU (busy, total) ticks since boot, from /proc/stat: busy counts every process."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                name, *vals = line.split()
                ticks = [int(v) for v in vals[:8]]  # user nice system idle iowait irq softirq steal
                total = sum(ticks)
                out[name] = (total - ticks[3] - ticks[4], total)
    return out


class CpuWindow:
    """CPU used by this process and the watched ones between start() and stop(), and how busy
    each CPU was over the same window (by anything: other processes on a shared machine too)."""

    def __init__(self, watch: list[int]) -> None:
        self.watch = watch
        self._t0 = 0.0
        self._c0: dict[int, float] = {}
        self._b0: dict[str, tuple[int, int]] = {}
        self.result: dict[str, float] = {}
        self.busy: dict[str, float] = {}

    def _read(self) -> dict[int, float]:
        out = {}
        for pid in [os.getpid(), *self.watch]:
            try:
                out[pid] = cpu_seconds(pid)
            except OSError:
                out[pid] = 0.0
        return out

    def start(self) -> None:
        self._t0, self._c0, self._b0 = time.perf_counter(), self._read(), cpu_busy_ticks()

    def stop(self) -> float:
        elapsed = time.perf_counter() - self._t0
        c1, b1 = self._read(), cpu_busy_ticks()
        self.result = {str(pid): (c1[pid] - self._c0[pid]) / elapsed for pid in c1}
        self.result["self"] = self.result.pop(str(os.getpid()))
        for cpu, (busy, total) in b1.items():
            b0, t0 = self._b0.get(cpu, (busy, total))
            self.busy[cpu] = round((busy - b0) / max(total - t0, 1), 3)
        return elapsed


class Client(WSListener):
    """One session of the generator: reports whole echoed messages to its cell."""

    def __init__(self, cell: Cell) -> None:
        super().__init__()
        self.cell = cell
        self.transport: WSTransport | None = None
        self.sent_at = 0
        self.got = 0

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        kind = frame.msg_type
        if kind in DATA:
            self.got += frame.payload_size
            if frame.fin:
                self.cell.echoed(self)
        elif kind is WSMsgType.CLOSE:
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.cell.lost(self)


class Cell:
    """Shared state of one cell's sessions."""

    def __init__(self, size: int) -> None:
        self.payload = bytes(i & 0xFF for i in range(size))
        self.size = size
        self.running = False  # closed loop on: every echo sends the next message
        self.measuring = False
        self.count = 0
        self.errors = 0
        self.inflight = 0
        self.rtts = array("q")
        self.drained = asyncio.Event()
        self.disconnected = 0
        self.closing = False

    def fire(self, client: Client) -> None:
        assert client.transport is not None
        client.got = 0
        client.sent_at = time.perf_counter_ns()
        self.inflight += 1
        client.transport.send(WSMsgType.BINARY, self.payload)

    def echoed(self, client: Client) -> None:
        now = time.perf_counter_ns()
        self.inflight -= 1
        if client.got != self.size:
            self.errors += 1
        if self.measuring:
            self.count += 1
            if len(self.rtts) < MAX_SAMPLES:
                self.rtts.append(now - client.sent_at)
        if self.running:
            self.fire(client)
        elif self.inflight == 0:
            self.drained.set()

    def lost(self, client: Client) -> None:
        self.disconnected += 1
        if not self.closing:
            self.errors += 1
        if client.sent_at and client.got < self.size and self.inflight > 0:
            self.inflight -= 1
            if not self.running and self.inflight == 0:
                self.drained.set()


def percentiles_us(samples: array, points: tuple[float, ...] = (0.5, 0.99)) -> list[float | None]:
    if not samples:
        return [None for _ in points]
    ordered = sorted(samples)
    return [round(ordered[min(len(ordered) - 1, int(p * len(ordered)))] / 1000, 1) for p in points]


async def open_sessions(cell: Cell, urls: list[str], n: int, ctx: ssl.SSLContext | None) -> list[Client]:
    """Open n sessions (round robin over urls), CONNECT_CONCURRENCY at a time."""
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)
    pick = itertools.cycle(urls)

    async def one(url: str) -> Client | None:
        async with gate:
            try:
                _, client = await ws_connect(
                    lambda: Client(cell), url, ssl_context=ctx, websocket_handshake_timeout=10, max_frame_size=1 << 20
                )
            except Exception as exc:  # picows, ssl and the OS raise many kinds: count it, go on
                print(f"connect {url} failed: {exc!r}", file=sys.stderr)
                cell.errors += 1
                return None
            return client

    opened = await asyncio.gather(*(one(next(pick)) for _ in range(n)))
    return [c for c in opened if c is not None]


async def close_sessions(cell: Cell, clients: list[Client], timeout: float = 10.0) -> None:
    cell.closing = True
    for c in clients:
        if c.transport is not None and not c.transport.is_disconnected:
            c.transport.send_close(WSCloseCode.OK)
            c.transport.disconnect()
    waits = [c.transport.wait_disconnected() for c in clients if c.transport is not None]
    if waits:
        await asyncio.wait_for(asyncio.gather(*waits, return_exceptions=True), timeout)


async def round_trips(args: argparse.Namespace, ctx: ssl.SSLContext | None) -> dict:
    cell = Cell(args.size)
    clients = await open_sessions(cell, args.url, args.conns, ctx)
    cpu = CpuWindow(args.watch)
    cell.running = True
    for c in clients:
        cell.fire(c)
    await asyncio.sleep(args.warmup)
    cell.measuring = True
    cpu.start()
    await asyncio.sleep(args.duration)
    cell.measuring = False
    elapsed = cpu.stop()
    cell.running = False
    if cell.inflight:
        try:
            await asyncio.wait_for(cell.drained.wait(), 10)
        except TimeoutError:
            print(f"{cell.inflight} messages still in flight after 10 s", file=sys.stderr)
    await close_sessions(cell, clients)
    p50, p99 = percentiles_us(cell.rtts)
    return {
        "mode": "rt",
        "conns": len(clients),
        "size": args.size,
        "round_trips": cell.count,
        "seconds": round(elapsed, 3),
        "rate": round(cell.count / elapsed, 1),
        "p50_us": p50,
        "p99_us": p99,
        "cpu": cpu.result,
        "cpu_busy": cpu.busy,
        "errors": cell.errors,
    }


async def handshakes(args: argparse.Namespace, ctx: ssl.SSLContext | None) -> dict:
    cell = Cell(1)
    cell.closing = True  # every session here is closed by us on purpose
    state = {"measuring": False, "count": 0, "errors": 0, "attempts": 0}
    lat = array("q")
    stop_at = time.monotonic() + args.warmup + args.duration
    max_attempts = args.max_handshakes

    async def worker(url: str) -> None:
        while time.monotonic() < stop_at and state["attempts"] < max_attempts:
            state["attempts"] += 1
            t0 = time.perf_counter_ns()
            try:
                transport, _ = await ws_connect(
                    lambda: Client(cell), url, ssl_context=ctx, websocket_handshake_timeout=10
                )
            except Exception as exc:  # picows and ssl raise many kinds; count and go on (bounded)
                state["errors"] += 1
                if state["errors"] <= 3:
                    print(f"handshake {url} failed: {exc!r}", file=sys.stderr)
                if state["errors"] > 1000:
                    return
                await asyncio.sleep(0.01)
                continue
            if state["measuring"]:
                state["count"] += 1
                if len(lat) < MAX_SAMPLES:
                    lat.append(time.perf_counter_ns() - t0)
            transport.send_close(WSCloseCode.OK)
            transport.disconnect()

    cpu = CpuWindow(args.watch)

    async def window() -> float:
        await asyncio.sleep(args.warmup)
        state["measuring"] = True
        cpu.start()
        await asyncio.sleep(args.duration)
        state["measuring"] = False
        return cpu.stop()

    pick = itertools.cycle(args.url)
    results = await asyncio.gather(window(), *(worker(next(pick)) for _ in range(args.conns)))
    elapsed = results[0]
    p50, p99 = percentiles_us(lat)
    return {
        "mode": "hs",
        "conns": args.conns,
        "handshakes": state["count"],
        "seconds": round(elapsed, 3),
        "rate": round(state["count"] / elapsed, 1),
        "p50_us": p50,
        "p99_us": p99,
        "cpu": cpu.result,
        "cpu_busy": cpu.busy,
        "errors": state["errors"],
    }


async def idle(args: argparse.Namespace, ctx: ssl.SSLContext | None) -> dict:
    """RSS of the watched processes per open idle session (each echoed one message)."""

    async def open_and_echo(n: int) -> tuple[Cell, list[Client]]:
        cell = Cell(args.size)
        clients = await open_sessions(cell, args.url, n, ctx)
        for c in clients:
            cell.fire(c)
        try:
            await asyncio.wait_for(cell.drained.wait(), 60)
        except TimeoutError:
            print(f"{cell.inflight} echoes missing after 60 s", file=sys.stderr)
        return cell, clients

    warm_cell, warm = await open_and_echo(min(100, args.conns))  # first-use costs (imports, caches)
    await close_sessions(warm_cell, warm)
    await asyncio.sleep(args.settle)
    before = {pid: rss_bytes(pid) for pid in args.watch}
    started = time.perf_counter()
    cell, clients = await open_and_echo(args.conns)
    open_seconds = time.perf_counter() - started
    await asyncio.sleep(args.settle)
    after = {pid: rss_bytes(pid) for pid in args.watch}
    n = len(clients)
    per_session = {str(pid): round((after[pid] - before[pid]) / max(n, 1), 1) for pid in args.watch}
    await close_sessions(cell, clients, timeout=30)
    return {
        "mode": "idle",
        "sessions": n,
        "open_seconds": round(open_seconds, 2),
        "rss_before": {str(k): v for k, v in before.items()},
        "rss_after": {str(k): v for k, v in after.items()},
        "bytes_per_session": per_session,
        "errors": cell.errors,
    }


async def run(args: argparse.Namespace) -> dict:
    ctx = None
    if args.ca:
        ctx = ssl.create_default_context(cafile=args.ca)
    modes = {"rt": round_trips, "hs": handshakes, "idle": idle}
    return await asyncio.wait_for(modes[args.mode](args, ctx), args.max_seconds)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=["rt", "hs", "idle"])
    p.add_argument("--url", action="append", required=True, help="ws:// or wss:// URL; repeat to round-robin")
    p.add_argument("--ca", help="CA file for wss:// URLs")
    p.add_argument("--conns", type=int, default=100)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--duration", type=float, default=4.0)
    p.add_argument("--settle", type=float, default=1.0, help="idle: wait this long before reading RSS")
    p.add_argument("--max-handshakes", type=int, default=500_000, help="hs: a bound on attempts")
    p.add_argument("--watch", type=lambda s: [int(x) for x in s.split(",") if x], default=[])
    p.add_argument("--max-seconds", type=float, default=300.0, help="give up after this long")
    args = p.parse_args()
    print(json.dumps(uvloop.run(run(args))), flush=True)


if __name__ == "__main__":
    main()
