"""Abuse at full scale (issue 9): bad connections and a reconnect storm against `wsproxy run`.

The proxy runs as its own process (`python -m wsproxy run -c <temporary config>`), in front of
an echo backend from the `websockets` library (another process, started by this script with
`--backend`). One bystander session echoes a message every 20 ms from start to end. A warm-up
(500 open/close sessions and one wave of 2 000 bad connections) creates the proxy's allocator
pools, caches and its heap's high-water mark for that many connections at once: CPython and
malloc keep freed memory for reuse instead of returning it, so without the wave VmRSS after a
storm stays about 10 KiB per connection that was open at the peak above a quiet baseline. Then
the proxy's resident memory (VmRSS) and open descriptors are the baseline, and each round
(`--rounds`, 2 by default) runs, at the same time:

- 2 000 connections that send garbage, half a request, or nothing (opened in waves of 250 and
  held until the proxy hangs up: 400 at once, or 408 after `timeouts.handshake`, here 5 s);
- 10 000 sessions opened and closed as fast as `--concurrency` clients can: a third with a
  closing handshake, a third dropping TCP after the 101, a third dropping TCP right after
  sending the request (while the proxy is still reaching the backend).

VmRSS and descriptors are sampled every 50 ms for each round's peak and read again `--settle`
seconds after it (with the resident size of malloc's brk heap, to tell where memory stays). The
script prints a table and exits 1 if the proxy died or logged an error, the bystander failed (an
echo missing, or a round trip over `--max-rtt`), a storm session did not get its 101 (or its
close answer), a bad connection was not hung up on, VmRSS after the last round exceeds the
baseline by more than `--slack-mib` or the first round's by more than `--round-slack-mib` (a
leak grows every round, a high-water mark does not), or descriptors stay open (more than 8).
Everything is on 127.0.0.1, every wait has a timeout and the run is bounded by `--max-seconds`.

    python benchmarks/abuse_storm.py                          # the issue's scale, about 2 minutes
    python benchmarks/abuse_storm.py --relay inspect
    python benchmarks/abuse_storm.py --bad 300 --sessions 1500 --warmup 200 --warmup-bad 300   # quick

Only processes it starts are stopped (by their own handle); the backend also exits when this
script goes away (its stdin closes).
"""

from __future__ import annotations

import argparse
import base64
import collections
import contextlib
import json
import os
import random
import re
import resource
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Ping, RejectConnection, Request, TextMessage

ROOT = Path(__file__).resolve().parents[1]
MIB = 1024 * 1024
HANDSHAKE_TIMEOUT = 5.0  # the proxy's timeouts.handshake: long enough to hold a round's bad connections at once
BAD_WAVE = 250  # bad connections opened at once (the proxy's listen backlog is 1024)
BAD_WAVE_GAP = 0.05  # seconds between waves: every bad connection is open at once, during the storm
SESSION_TIMEOUT = 10.0  # one storm session, connect to close
ECHO_INTERVAL = 0.02  # the bystander's pause between round trips
ECHO_TIMEOUT = 5.0  # one bystander round trip at most (a miss fails the run)
SAMPLE_EVERY = 0.05  # seconds between VmRSS / descriptor samples
FD_SLACK = 8  # descriptors the proxy may hold after the storm beyond its baseline
STORM_KINDS = ("close", "drop", "abort")
BAD_KINDS = ("garbage", "half", "silent")
GOOD_STORM = {"closed", "dropped", "aborted"}
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


UPGRADE_HEAD = (
    b"GET /storm HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: "
)


def upgrade_request() -> bytes:
    return UPGRADE_HEAD + base64.b64encode(os.urandom(16)) + b"\r\n\r\n"


def masked_close(code: int = 1000) -> bytes:
    mask = os.urandom(4)
    payload = code.to_bytes(2, "big")
    return bytes([0x88, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


# --------------------------------------------------------------------------------------------
# the echo backend (its own process: `abuse_storm.py --backend`)


def backend_main(max_seconds: float) -> None:
    """Echo every message (websockets' asyncio server); print the port; exit on stdin EOF."""
    import asyncio
    import logging

    from websockets.asyncio.server import ServerConnection, serve
    from websockets.exceptions import ConnectionClosed

    # Clients that drop mid-handshake make the proxy abandon upstream handshakes: expected here.
    logging.getLogger("websockets").setLevel(logging.CRITICAL)

    async def echo(conn: ServerConnection) -> None:
        with contextlib.suppress(ConnectionClosed):  # a dropped connection ends its handler, nothing more
            async for message in conn:
                await conn.send(message)

    async def stdin_closed() -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while await reader.read(4096):
            pass

    async def main() -> None:
        async with serve(echo, "127.0.0.1", 0, ping_interval=None, compression=None, backlog=1024) as server:
            port = next(iter(server.sockets)).getsockname()[1]
            print(json.dumps({"port": port, "pid": os.getpid()}), flush=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stdin_closed(), max_seconds)

    asyncio.run(main())


# --------------------------------------------------------------------------------------------
# the processes


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far, from /proc (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def read_proc(pid: int) -> tuple[int, int]:
    """(VmRSS bytes, open descriptors) of a live process; OSError once it is gone."""
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def heap_rss(pid: int) -> int:
    """Resident bytes of the process's brk heap (malloc's main arena), 0 if unknown. Memory
    that stays here after a burst is malloc keeping freed space; pymalloc's arenas are mmaps."""
    try:
        with open(f"/proc/{pid}/smaps") as f:
            in_heap = False
            for line in f:
                if line.rstrip().endswith("[heap]"):
                    in_heap = True
                elif in_heap and line.startswith("Rss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class ProxyProcess:
    """`python -m wsproxy run -c FILE`; its port comes from its "listening on" log line."""

    def __init__(self, config_path: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "wsproxy", "run", "-c", str(config_path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        self.port: int | None = None
        self.ready = threading.Event()
        self.tail: collections.deque[str] = collections.deque(maxlen=40)
        self.levels: collections.Counter[str] = collections.Counter()  # log lines by level
        self.errors: collections.deque[str] = collections.deque(maxlen=10)  # ERROR lines and tracebacks
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.tail.append(line)
            level = next((w for w in LOG_LEVELS if f" {w} " in line[:40]), "other")
            self.levels[level] += 1
            if level in ("ERROR", "CRITICAL") or line.startswith("Traceback"):
                self.errors.append(line.rstrip())
            m = re.search(r"listening on \w+://[\d.]+:(\d+)", line)
            if m and self.port is None:
                self.port = int(m.group(1))
            if "wsproxy ready" in line:
                self.ready.set()
        self.ready.set()  # EOF: the process is gone

    def wait_ready(self, timeout: float = 20.0) -> int:
        if not self.ready.wait(timeout) or self.proc.poll() is not None or self.port is None:
            raise SystemExit("the proxy did not start:\n" + "".join(self.tail))
        return self.port

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> int | None:
        """SIGTERM (a graceful drain), then the exit code; killed if it hangs."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
                return None
        return self.proc.returncode


def start_backend(max_seconds: float) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [sys.executable, __file__, "--backend", "--max-seconds", str(max_seconds)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise SystemExit("the echo backend did not start")
    return proc, int(json.loads(line)["port"])


def proxy_config(backend_port: int, relay: str) -> str:
    return (
        "listeners:\n"
        "  - address: 127.0.0.1:0\n"
        "    pool: storm\n"
        f"    relay: {relay}\n"
        "pools:\n"
        "  storm:\n"
        f"    backends: [{{address: 127.0.0.1:{backend_port}}}]\n"
        f"timeouts: {{handshake: {HANDSHAKE_TIMEOUT:g}s, connect: 2s, close: 2s}}\n"
        "log: {level: info}\n"
    )


def raise_fd_limit(needed: int) -> None:
    """The proxy inherits this process's limit; both hold every bad connection at once."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            raise SystemExit(f"needs {needed} open files, the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


# --------------------------------------------------------------------------------------------
# the clients


async def read_until_eof(stream: trio.SocketStream, limit: int = 65536) -> bytes:
    got = b""
    while len(got) < limit:
        try:
            data = await stream.receive_some(65536)
        except trio.BrokenResourceError:
            break
        if not data:
            break
        got += data
    return got


async def read_head(stream: trio.SocketStream) -> bytes:
    head = b""
    while b"\r\n\r\n" not in head:
        data = await stream.receive_some(4096)
        if not data:
            return head
        head += data
    return head


async def storm_session(port: int, kind: str) -> str:
    """Open one session and end it the `kind` way; what happened, in a word."""
    try:
        with trio.fail_after(SESSION_TIMEOUT):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(upgrade_request())
                if kind == "abort":
                    return "aborted"
                head = await read_head(stream)
                if not head.startswith(b"HTTP/1.1 101"):
                    return head.split(b"\r\n", 1)[0].decode("latin-1") or "no answer"
                if kind == "drop":
                    return "dropped"
                await stream.send_all(masked_close())
                rest = await read_until_eof(stream)
                return "closed" if rest[:1] == b"\x88" else "no close answer"
    except trio.TooSlowError:
        return "timeout"
    except (OSError, trio.BrokenResourceError) as exc:
        return f"error {exc.__class__.__name__}"


async def bad_connection(port: int, kind: str) -> str:
    """Garbage, half a request or nothing; then wait for the proxy to hang up. Its status."""
    try:
        with trio.fail_after(HANDSHAKE_TIMEOUT + SESSION_TIMEOUT):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                if kind == "garbage":
                    await stream.send_all(os.urandom(random.randint(1, 300)) + b"\r\n\r\n")
                elif kind == "half":
                    request = upgrade_request()
                    await stream.send_all(request[: random.randint(1, len(request) - 3)])
                got = await read_until_eof(stream)
    except trio.TooSlowError:
        return "not hung up"
    except (OSError, trio.BrokenResourceError) as exc:
        return f"error {exc.__class__.__name__}"
    if got.startswith(b"HTTP/1.1 "):
        return got[9:12].decode("latin-1")
    return "hung up, no answer" if not got else "other bytes"


@dataclass
class Bystander:
    """One well-behaved session echoing every 20 ms until told to stop; its worst round trip."""

    rtts: list[float] = field(default_factory=list)
    error: str = ""
    closed_cleanly: bool = False

    async def run(self, port: int, stop: trio.Event) -> None:
        try:
            await self._run(port, stop)
        except (trio.TooSlowError, OSError, trio.BrokenResourceError, AssertionError) as exc:
            self.error = f"after {len(self.rtts)} echoes: {exc.__class__.__name__} {exc}"

    async def _run(self, port: int, stop: trio.Event) -> None:
        with trio.fail_after(ECHO_TIMEOUT):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
        ws = WSConnection(ConnectionType.CLIENT)
        pending: collections.deque = collections.deque()

        async def next_event() -> object:
            while not pending:
                data = await stream.receive_some(65536)
                ws.receive_data(data or None)
                for event in ws.events():
                    if isinstance(event, Ping):
                        await stream.send_all(ws.send(event.response()))
                    else:
                        pending.append(event)
            return pending.popleft()

        async with stream:
            await stream.send_all(ws.send(Request(host="127.0.0.1", target="/bystander")))
            with trio.fail_after(ECHO_TIMEOUT):
                event = await next_event()
            assert isinstance(event, AcceptConnection), f"no 101: {event}"
            n = 0
            while not stop.is_set():
                n += 1
                began = trio.current_time()
                with trio.fail_after(ECHO_TIMEOUT):
                    await stream.send_all(ws.send(TextMessage(f"bystander {n}")))
                    event = await next_event()
                assert isinstance(event, TextMessage) and event.data == f"bystander {n}", f"wrong echo: {event}"
                self.rtts.append(trio.current_time() - began)
                await trio.sleep(ECHO_INTERVAL)
            with trio.fail_after(ECHO_TIMEOUT):
                await stream.send_all(ws.send(CloseConnection(code=1000)))
                event = await next_event()
            assert not isinstance(event, RejectConnection)
            self.closed_cleanly = isinstance(event, CloseConnection) and event.code == 1000


# --------------------------------------------------------------------------------------------
# the run


@dataclass
class Watch:
    """VmRSS and descriptors of the proxy, sampled while the storm runs."""

    pid: int
    peak_rss: int = 0
    peak_fds: int = 0
    died: bool = False

    def read(self) -> tuple[int, int]:
        try:
            rss, fds = read_proc(self.pid)
        except OSError:
            self.died = True
            return 0, 0
        self.peak_rss, self.peak_fds = max(self.peak_rss, rss), max(self.peak_fds, fds)
        return rss, fds

    async def sample(self, stop: trio.Event) -> None:
        while not stop.is_set() and not self.died:
            self.read()
            await trio.sleep(SAMPLE_EVERY)


async def run_storm(port: int, count: int, concurrency: int, outcomes: collections.Counter[str]) -> None:
    todo = iter(range(count))

    async def worker() -> None:
        for i in todo:
            outcomes[await storm_session(port, STORM_KINDS[i % len(STORM_KINDS)])] += 1

    async with trio.open_nursery() as nursery:
        for _ in range(min(concurrency, count)):
            nursery.start_soon(worker)


async def run_bad(port: int, count: int, answers: dict[str, collections.Counter[str]]) -> None:
    async def one(kind: str) -> None:
        answers[kind][await bad_connection(port, kind)] += 1

    async with trio.open_nursery() as nursery:
        for i in range(count):
            nursery.start_soon(one, BAD_KINDS[i % len(BAD_KINDS)])
            if i % BAD_WAVE == BAD_WAVE - 1:
                await trio.sleep(BAD_WAVE_GAP)


@dataclass
class Round:
    """One storm: what the clients saw and what the proxy held."""

    peak: tuple[int, int] = (0, 0)  # VmRSS, descriptors
    after: tuple[int, int] = (0, 0)
    after_heap: int = 0
    seconds: float = 0.0
    cpu: float = 0.0  # the proxy's CPU seconds during the storm
    outcomes: collections.Counter[str] = field(default_factory=collections.Counter)
    answers: dict[str, collections.Counter[str]] = field(
        default_factory=lambda: {k: collections.Counter() for k in BAD_KINDS}
    )


@dataclass
class Result:
    baseline: tuple[int, int] = (0, 0)
    baseline_heap: int = 0
    rounds: list[Round] = field(default_factory=list)
    bystander: Bystander = field(default_factory=Bystander)
    timed_out: bool = False


async def storm_round(args: argparse.Namespace, port: int, watch: Watch) -> Round:
    """The bad connections and the session storm at once, sampled; then settle and read."""
    one = Round()
    watch.peak_rss, watch.peak_fds = watch.read()
    stop_sampling = trio.Event()
    began, cpu_before = trio.current_time(), cpu_seconds(watch.pid)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch.sample, stop_sampling)
        async with trio.open_nursery() as load:
            load.start_soon(run_bad, port, args.bad, one.answers)
            load.start_soon(run_storm, port, args.sessions, args.concurrency, one.outcomes)
        one.seconds, one.cpu = trio.current_time() - began, cpu_seconds(watch.pid) - cpu_before
        stop_sampling.set()
    one.peak = (watch.peak_rss, watch.peak_fds)
    await trio.sleep(args.settle)
    one.after, one.after_heap = watch.read(), heap_rss(watch.pid)
    return one


async def drive(args: argparse.Namespace, port: int, watch: Watch, result: Result) -> None:
    stop_bystander = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(result.bystander.run, port, stop_bystander)
        # warm-up: sessions and a full wave of bad connections, so that pools, caches and the
        # heap's high-water mark for that many connections at once exist before the baseline
        warm_outcomes: collections.Counter[str] = collections.Counter()
        warm_answers = {k: collections.Counter() for k in BAD_KINDS}
        async with trio.open_nursery() as warm:
            warm.start_soon(run_storm, port, args.warmup, args.concurrency, warm_outcomes)
            warm.start_soon(run_bad, port, args.warmup_bad, warm_answers)
        await trio.sleep(args.settle)
        result.baseline, result.baseline_heap = watch.read(), heap_rss(watch.pid)
        for _ in range(args.rounds):
            result.rounds.append(await storm_round(args, port, watch))
            if watch.died:
                break
        stop_bystander.set()


def report(args: argparse.Namespace, proxy: ProxyProcess, watch: Watch, result: Result, exit_code: int | None) -> int:
    """Print the table and the verdict; 0 when every check held."""
    base_rss, base_fds = result.baseline

    def row(name: str, rss: int, fds: int, heap: int | None = None) -> str:
        heap_mib = "-" if heap is None else f"{heap / MIB:.1f}"
        return f"{name:<28}{rss / MIB:>9.1f}{(rss - base_rss) / MIB:>+10.1f}{fds:>8}{heap_mib:>10}"

    print(
        f"wsproxy abuse storm ({args.relay}): {args.rounds} round(s) of {args.bad} bad connections + "
        f"{args.sessions} sessions (concurrency {args.concurrency}); warm-up {args.warmup} sessions + "
        f"{args.warmup_bad} bad connections"
    )
    print(f"{'proxy (pid ' + str(proxy.proc.pid) + ')':<28}{'RSS MiB':>9}{'vs base':>10}{'fds':>8}{'heap MiB':>10}")
    print(row("warm baseline", base_rss, base_fds, result.baseline_heap))
    for n, one in enumerate(result.rounds, 1):
        print(row(f"round {n}: peak", *one.peak))
        print(row(f"round {n}: {args.settle:g} s after", *one.after, one.after_heap))
    for n, one in enumerate(result.rounds, 1):
        rate = args.sessions / one.seconds if one.seconds else 0.0
        print(
            f"round {n}: {args.sessions} sessions in {one.seconds:.1f} s ({rate:.0f}/s, proxy CPU {one.cpu:.1f} s): "
            f"{fmt(one.outcomes)}; bad: " + "; ".join(f"{kind} {fmt(answers)}" for kind, answers in one.answers.items())
        )
    rtts = sorted(result.bystander.rtts)
    worst = rtts[-1] if rtts else 0.0
    p99 = rtts[int(0.99 * (len(rtts) - 1))] if rtts else 0.0
    print(
        f"bystander: {len(rtts)} echoes, worst {worst * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, "
        f"closed cleanly: {result.bystander.closed_cleanly}, error: {result.bystander.error or 'none'}"
    )
    print(f"proxy log: {fmt(proxy.levels)} lines (a warning per refused request); exit code after SIGTERM: {exit_code}")
    for line in proxy.errors:
        print(f"  {line}")

    failures = []
    if watch.died or exit_code != 0:
        failures.append(f"the proxy died or did not stop cleanly (exit code {exit_code})")
    if result.timed_out or len(result.rounds) < args.rounds:
        failures.append(f"the run did not finish within {args.max_seconds:g} s")
    if result.bystander.error or len(rtts) < 10:
        failures.append(f"the bystander failed ({result.bystander.error or 'too few echoes'})")
    elif worst > args.max_rtt:
        failures.append(f"the bystander's worst round trip {worst:.2f} s is over {args.max_rtt:g} s")
    elif not result.bystander.closed_cleanly:
        failures.append("the bystander's closing handshake did not complete")
    for n, one in enumerate(result.rounds, 1):
        bad_storm = sum(k for o, k in one.outcomes.items() if o not in GOOD_STORM)
        if bad_storm or sum(one.outcomes.values()) != args.sessions:
            failures.append(f"round {n}: {bad_storm} storm sessions did not upgrade and close as asked")
        not_hung_up = sum(a["not hung up"] for a in one.answers.values())
        if not_hung_up:
            failures.append(f"round {n}: {not_hung_up} bad connections still open past the handshake timeout")
    if proxy.errors:
        errors = proxy.levels["ERROR"] + proxy.levels["CRITICAL"]
        failures.append(f"the proxy logged {errors} errors and {len(proxy.errors) - errors} tracebacks")
    if result.rounds:
        after_rss, after_fds = result.rounds[-1].after
        grown = after_rss - base_rss
        if grown > args.slack_mib * MIB:
            failures.append(
                f"VmRSS after the storm is {grown / MIB:.1f} MiB over the baseline (slack {args.slack_mib:g} MiB)"
            )
        if after_fds > base_fds + FD_SLACK:
            failures.append(f"{after_fds - base_fds} more descriptors open after the storm than before")
        regrown = after_rss - result.rounds[0].after[0]
        if len(result.rounds) > 1 and regrown > args.round_slack_mib * MIB:
            failures.append(
                f"VmRSS grew {regrown / MIB:.1f} MiB more after round 1 (slack {args.round_slack_mib:g} MiB): "
                "a leak grows every round, a high-water mark does not"
            )
    for failure in failures:
        print(f"FAIL: {failure}")
    if not failures:
        print(f"PASS: proxy up, bystander echoed throughout, VmRSS back within {args.slack_mib:g} MiB of the baseline")
    return 1 if failures else 0


def fmt(counter: collections.Counter[str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counter.most_common()) or "-"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bad", type=int, default=2000, help="connections sending garbage, half a request or nothing")
    p.add_argument("--sessions", type=int, default=10000, help="sessions opened and closed in the storm")
    p.add_argument("--concurrency", type=int, default=64, help="storm sessions in flight at once")
    p.add_argument("--warmup", type=int, default=500, help="sessions opened and closed before the baseline")
    p.add_argument("--warmup-bad", type=int, default=2000, help="bad connections held at once before the baseline")
    p.add_argument("--rounds", type=int, default=2, help="storms one after another (a leak grows every round)")
    p.add_argument("--relay", choices=["passthrough", "inspect"], default="passthrough")
    p.add_argument("--settle", type=float, default=2.0, help="seconds after the warm-up and the storm before reading")
    p.add_argument("--slack-mib", type=float, default=16.0, help="VmRSS growth over the baseline that still passes")
    p.add_argument("--round-slack-mib", type=float, default=4.0, help="VmRSS growth from round 1 to the last")
    p.add_argument("--max-rtt", type=float, default=2.0, help="the bystander's worst round trip that still passes")
    p.add_argument("--max-seconds", type=float, default=600.0, help="the whole run, at most")
    p.add_argument("--backend", action="store_true", help=argparse.SUPPRESS)  # run as the echo backend
    args = p.parse_args()
    if args.backend:
        backend_main(args.max_seconds)
        return 0
    raise_fd_limit(args.bad + 4 * args.concurrency + 500)
    backend, backend_port = start_backend(args.max_seconds + 60)
    result = Result()
    with tempfile.TemporaryDirectory(prefix="abuse-storm-") as tmp:
        config = Path(tmp) / "proxy.yaml"
        config.write_text(proxy_config(backend_port, args.relay))
        proxy = ProxyProcess(config)
        try:
            port = proxy.wait_ready()
            watch = Watch(proxy.proc.pid)

            async def bounded() -> None:
                with trio.move_on_after(args.max_seconds) as scope:
                    await drive(args, port, watch, result)
                result.timed_out = scope.cancelled_caught

            trio.run(bounded)
            watch.died = watch.died or not proxy.alive()
        finally:
            exit_code = proxy.stop()
            assert backend.stdin is not None
            backend.stdin.close()  # the backend exits at stdin EOF
            try:
                backend.wait(timeout=10)
            except subprocess.TimeoutExpired:
                backend.kill()
                backend.wait(timeout=10)
    return report(args, proxy, watch, result, exit_code)


if __name__ == "__main__":
    sys.exit(main())
