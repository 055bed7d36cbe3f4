"""A soak with faults, counted (issue 18): does any session that no fault touched lose a message?

`wsproxy run` (its own process) fronts four echo backends (each its own process, `--backend`):
three direct and one behind an idle-cutting relay (the backend leg); a fifth of the clients reach
the proxy through another idle-cutting relay (the client leg). `--sessions` sessions (300 by
default) exchange binary messages carrying their session id, a sequence number and a digest; the
echo is checked for all three (a wrong digest or a gap is `corrupt`). Each session lives a random
while, then ends with a closing handshake after its last echo, and its slot opens a new one.

Meanwhile faults are injected one at a time, in a shuffled cycle of kinds, at random targets and
moments:

- `kill_restart`: a backend is killed (SIGKILL) and restarted on its port 1-2 s later;
- `stall`: a backend is stopped (SIGSTOP) for 1.5-3 s, then continued (SIGCONT);
- `reload`: a backend is removed by a reload (SIGHUP), then added back by another;
- `idle_cut_client`, `idle_cut_backend`: for 3 s, a relay cuts (resets) every connection through it
  that has been idle for 1 s;
- `slow_readers`: three sessions (with an 8 KiB receive buffer) stop reading for 5 s while sending
  32 KiB messages as fast as their window allows (limits.slow_consumer_timeout is 2 s);
- `burst`: sessions opened at once, past `limits.max_sessions` (the population + 15 %).

A session that ends other than by its own closing handshake is attributed to a fault that could
have ended it (same backend, same relay, a slow reader; during the fault or `GRACE` seconds after
it). Its unanswered messages are "lost on fault-closed sessions", reported with the close codes
per fault. Messages unanswered on any other session are "lost on sessions no fault closed": they
must be 0, as must corrupt echoes and closes no fault explains. The proxy's descriptors and VmRSS
are sampled every 0.5 s: the start is taken after a warm-up (the population plus a burst opened
and closed once, which sets the allocator's high-water marks), the end once every session is
gone; the end must be within 5 % of the start (descriptors: within FD_SLACK).

    python benchmarks/soak.py                          # 10 minutes, 300 sessions
    python benchmarks/soak.py --duration 60 --sessions 60 --json /tmp/soak.json

Everything is on 127.0.0.1; every wait has a timeout and the run is bounded by duration + 120 s.
Only processes this script started are signalled (by their own handle). Exit status 1 on a FAIL.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import random
import signal
import socket
import struct
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import trio
from soak_rig import BackendProcess, IdleCutRelay, ProxyProcess, free_port, proxy_config  # (the script's own folder)
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError

MIB = 1024 * 1024
FAULT_KINDS = ("kill_restart", "stall", "reload", "idle_cut_client", "idle_cut_backend", "slow_readers", "burst")
GRACE = 8.0  # seconds after a fault during which a close is still its doing (drain windows, close timeouts)
CUT_FOR = 3.0  # seconds a relay cuts
SLOW_FOR = 5.0  # seconds a slow reader reads nothing
SLOW_READERS = 3
SLOW_RCVBUF = 8192
SLOW_MESSAGE = 32 * 1024
SLOW_WINDOW = 256  # messages in flight while slow: 8 MiB, more than the kernel buffers on the way
WINDOW = 16  # messages in flight normally
HEADER = struct.Struct(">IIH")  # session id, sequence number, payload length
DIGEST = 8
FD_SLACK = 4
RSS_SLACK = 0.05
SAMPLE_EVERY = 0.5
GAP = (1.0, 3.0)  # seconds between two faults
GAP_SHORT = (0.3, 0.8)  # in a short run (the test suite's), so that every kind gets its turn
OPEN_TIMEOUT = 5.0
END_TIMEOUT = 5.0


# --------------------------------------------------------------------------------------------
# sessions


def make_message(sid: int, seq: int, size: int, rng: random.Random) -> bytes:
    payload = rng.randbytes(size)
    body = HEADER.pack(sid, seq, size) + payload
    return body + hashlib.blake2b(body, digest_size=DIGEST).digest()


def check_message(data: bytes, sid: int, seq: int) -> bool:
    if len(data) < HEADER.size + DIGEST:
        return False
    body, digest = data[:-DIGEST], data[-DIGEST:]
    got_sid, got_seq, size = HEADER.unpack_from(body)
    return (got_sid, got_seq, size) == (sid, seq, len(body) - HEADER.size) and hashlib.blake2b(
        body, digest_size=DIGEST
    ).digest() == digest


@dataclass(eq=False)
class Record:
    """One steady session, from its open to its end."""

    sid: int
    via_relay: bool
    slow_capable: bool
    opened: float = 0.0
    ended: float = 0.0
    backend: str | None = None
    end: str = ""  # normal | close CODE | reset | eof | no close answer
    code: int | None = None
    sent: int = 0
    received: int = 0
    corrupt: int = 0
    slow: bool = False  # reading nothing right now (a slow_readers fault)
    was_slow: bool = False


class Client:
    """A WebSocket client on wsproto over a trio stream, for the soak's sessions."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.lock = trio.Lock()
        self.events: list = []

    @classmethod
    async def open(cls, port: int, path: str, *, rcvbuf: int | None = None) -> tuple[Client | None, str]:
        """(client, "101"), or (None, the status or error) when no session came of it."""
        sock = trio.socket.socket()
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        try:
            with trio.fail_after(OPEN_TIMEOUT):
                await sock.connect(("127.0.0.1", port))
                client = cls(trio.SocketStream(sock))
                await client.stream.send_all(client.ws.send(Request(host="127.0.0.1", target=path)))
                while True:
                    events = await client.next_events()
                    for i, ev in enumerate(events):
                        if isinstance(ev, AcceptConnection):
                            client.events = events[i + 1 :]  # the backend's hello may have come along
                            return client, "101"
                        if isinstance(ev, RejectConnection):
                            await trio.aclose_forcefully(client.stream)
                            return None, str(ev.status_code)
                        if isinstance(ev, RejectData):
                            continue
        except trio.TooSlowError:
            sock.close()
            return None, "timeout"
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            sock.close()
            return None, f"error {exc.__class__.__name__}"
        except EOFError:
            sock.close()
            return None, "closed"

    async def next_events(self) -> list:
        data = await self.stream.receive_some(65536)
        if not data and self.ws.state.name == "CONNECTING":
            raise EOFError
        self.ws.receive_data(data or None)
        return list(self.ws.events())

    async def send(self, event: object) -> None:
        """Send one event; trio.ClosedResourceError once the closing handshake forbids it (the
        reader may have seen the proxy's close while the sender was about to send)."""
        async with self.lock:
            try:
                data = self.ws.send(event)  # type: ignore[arg-type]
            except LocalProtocolError as exc:
                raise trio.ClosedResourceError(str(exc)[-80:]) from None
            await self.stream.send_all(data)


@dataclass
class Totals:
    records: list[Record] = field(default_factory=list)
    open_failures: Counter[str] = field(default_factory=Counter)
    burst: Counter[str] = field(default_factory=Counter)
    faults: list[dict] = field(default_factory=list)  # {kind, target, start, end}


class Soak:
    def __init__(self, args: argparse.Namespace, proxy_port: int) -> None:
        self.args = args
        self.port = proxy_port
        self.admin = 0  # the admin listener's port (reloads are confirmed there)
        self.client_relay: IdleCutRelay | None = None
        self.totals = Totals()
        self.rng = random.Random(args.seed)
        self.stopping = False
        self.live: set[Record] = set()
        self.next_sid = 0

    # --- one session ---------------------------------------------------------------------------

    async def session(self, rec: Record, client: Client, lifetime: float) -> None:
        rng = random.Random(self.rng.random())
        resumed = trio.Event()
        resumed.set()
        closed = trio.Event()
        expected = [0]  # next sequence number expected back
        buffer: list[bytes] = []

        async def reader() -> None:
            try:
                while True:
                    if rec.slow:
                        await trio.sleep(0.05)
                        continue
                    if client.events:
                        events, client.events = client.events, []
                    else:
                        data = await client.stream.receive_some(65536)
                        if not data:  # the connection ended without a closing handshake reaching us
                            rec.end = rec.end or "eof"
                            closed.set()
                            return
                        client.ws.receive_data(data)
                        events = list(client.ws.events())
                    for ev in events:
                        if isinstance(ev, BytesMessage):
                            buffer.append(bytes(ev.data))
                            if ev.message_finished:
                                message = b"".join(buffer)
                                buffer.clear()
                                if check_message(message, rec.sid, expected[0]):
                                    rec.received += 1
                                else:
                                    rec.corrupt += 1
                                expected[0] += 1
                        elif isinstance(ev, TextMessage):
                            if ev.data.startswith("backend:"):
                                rec.backend = ev.data.split(":", 1)[1]
                        elif isinstance(ev, Ping) and not client.lock.locked():
                            # (a sender holding the lock is sending data: the proxy sees traffic
                            # anyway, and the reader must never wait on a sender that waits on it)
                            await client.send(ev.response())
                        elif isinstance(ev, CloseConnection):
                            if client.ws.state.name == "REMOTE_CLOSING":  # the proxy (or backend) closed first
                                rec.end, rec.code = f"close {ev.code}", ev.code
                                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                                    await client.send(ev.response())
                            else:
                                rec.end = rec.end or "normal"
                            closed.set()
                            return
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                rec.end = rec.end or "reset"
                closed.set()

        async def sender() -> None:
            until = trio.current_time() + lifetime
            try:
                while not closed.is_set() and not self.stopping and trio.current_time() < until:
                    window = SLOW_WINDOW if rec.slow else WINDOW
                    if rec.sent - expected[0] >= window:
                        await trio.sleep(0.01)
                        continue
                    size = SLOW_MESSAGE if rec.slow else rng.randint(16, 1024)
                    await client.send(BytesMessage(data=make_message(rec.sid, rec.sent, size, rng)))
                    rec.sent += 1
                    if not rec.slow:
                        await trio.sleep(rng.uniform(0.1, 1.2))
                # our own end: every echo back first, then the closing handshake
                with trio.move_on_after(END_TIMEOUT):
                    while expected[0] < rec.sent and not closed.is_set():
                        await trio.sleep(0.01)
                if not closed.is_set():
                    await client.send(CloseConnection(code=1000))
                    with trio.move_on_after(END_TIMEOUT):
                        await closed.wait()
                    if not closed.is_set():
                        rec.end = "no close answer"
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                with trio.move_on_after(1):
                    await closed.wait()
                rec.end = rec.end or "reset"

        self.live.add(rec)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader)
                await sender()
                with trio.move_on_after(END_TIMEOUT):
                    await closed.wait()
                nursery.cancel_scope.cancel()
        finally:
            self.live.discard(rec)
            rec.ended = trio.current_time()
            rec.end = rec.end or "no close answer"
            await trio.aclose_forcefully(client.stream)

    async def slot(self, index: int) -> None:
        """One place in the population: open a session, run it, open the next, until stopping."""
        rng = random.Random(self.rng.random())
        via = index % 5 == 0 and self.client_relay is not None
        slow_capable = index % 5 == 2
        lifetime_max = max(5.0, min(60.0, self.args.duration / 3))
        while not self.stopping:
            port = self.client_relay.port if via and self.client_relay is not None else self.port
            client, status = await Client.open(port, f"/soak/{index}", rcvbuf=SLOW_RCVBUF if slow_capable else None)
            if client is None:
                self.totals.open_failures[status] += 1
                await trio.sleep(rng.uniform(0.2, 0.8))
                continue
            self.next_sid += 1
            rec = Record(self.next_sid, via, slow_capable, opened=trio.current_time())
            self.totals.records.append(rec)
            await self.session(rec, client, rng.uniform(0.3, 1.0) * lifetime_max)

    # --- faults --------------------------------------------------------------------------------

    async def burst_one(self, index: int) -> None:
        client, status = await Client.open(self.port, f"/burst/{index}")
        self.totals.burst[status] += 1
        if client is None:
            return
        with trio.move_on_after(END_TIMEOUT):
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                await client.send(CloseConnection(code=1000))
                while client.ws.state.name != "CLOSED":
                    await client.next_events()
        await trio.aclose_forcefully(client.stream)


async def run_fault(
    kind: str,
    soak: Soak,
    backends: list[BackendProcess],
    relays: dict[str, IdleCutRelay],
    proxy: ProxyProcess,
    config_for: dict[str, str],
) -> dict:
    rng = soak.rng
    start = trio.current_time()
    target = ""
    if kind == "kill_restart":
        b = rng.choice(backends)
        target = b.name
        b.kill()
        await trio.sleep(rng.uniform(1.0, 2.0))
        await b.start()
    elif kind == "stall":
        b = rng.choice(backends)
        target = b.name
        b.signal(signal.SIGSTOP)
        await trio.sleep(rng.uniform(1.5, 3.0))
        b.signal(signal.SIGCONT)
    elif kind == "reload":
        b = rng.choice(backends[:-1])  # a direct one (the relayed one is the relay's address)
        target = b.name
        await proxy.reload(soak.admin, config_for[b.name])
        await trio.sleep(3.0)  # the drain window (2 s) and a little
        await proxy.reload(soak.admin, config_for[""])
    elif kind in ("idle_cut_client", "idle_cut_backend"):
        relay = relays["client" if kind == "idle_cut_client" else "backend"]
        target = relay.name
        relay.cutting = True
        await trio.sleep(CUT_FOR)
        relay.cutting = False
    elif kind == "slow_readers":
        candidates = [r for r in soak.live if r.slow_capable and not r.slow and not r.via_relay]
        chosen = rng.sample(candidates, min(SLOW_READERS, len(candidates)))
        target = ",".join(str(r.sid) for r in chosen)
        for r in chosen:
            r.slow = r.was_slow = True
        await trio.sleep(SLOW_FOR)
        for r in chosen:
            r.slow = False
    elif kind == "burst":
        count = max(20, soak.args.sessions // 2)
        target = str(count)
        with trio.move_on_after(OPEN_TIMEOUT + 2 * END_TIMEOUT):
            async with trio.open_nursery() as nursery:
                for i in range(count):
                    nursery.start_soon(soak.burst_one, i)
    return {"kind": kind, "target": target, "start": start, "end": trio.current_time()}


def affected(fault: dict, rec: Record) -> bool:
    kind, target = fault["kind"], fault["target"]
    if kind in ("kill_restart", "stall", "reload"):
        return rec.backend == target
    if kind == "idle_cut_client":
        return rec.via_relay
    if kind == "idle_cut_backend":
        return rec.backend == "b3"  # the backend behind the relay
    if kind == "slow_readers":
        return str(rec.sid) in target.split(",")
    return False


def attribute(rec: Record, faults: list[dict]) -> str | None:
    """The fault that ended `rec` (None: its own closing handshake, or nothing explains it)."""
    if rec.end == "normal":
        return None
    candidates = [f for f in faults if f["start"] <= rec.ended <= f["end"] + GRACE and affected(f, rec)]
    if not candidates:
        return "none"
    return max(candidates, key=lambda f: f["start"])["kind"]  # the latest fault that could have done it


# --------------------------------------------------------------------------------------------
# the run


@dataclass
class Samples:
    start: tuple[int, int] = (0, 0)
    peak: tuple[int, int] = (0, 0)
    end: tuple[int, int] = (0, 0)
    began: float = 0.0  # trio time the faults and the population started

    def note(self, fds: int, rss: int) -> None:
        self.peak = (max(self.peak[0], fds), max(self.peak[1], rss))


async def settle(proxy: ProxyProcess, below: int, timeout: float) -> tuple[int, int]:
    """Wait until the proxy holds at most `below` descriptors (bounded), then a sample."""
    with trio.move_on_after(timeout):
        while proxy.sample()[0] > below:
            await trio.sleep(0.1)
    await trio.sleep(1.0)
    return proxy.sample()


async def warm_up(soak: Soak, count: int) -> None:
    """`count` sessions opened at once, one echo each, closed: the allocator's high-water marks."""

    async def one(i: int) -> None:
        client, _status = await Client.open(soak.port, f"/warm/{i}")
        if client is None:
            return
        with (
            trio.move_on_after(END_TIMEOUT),
            contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError),
        ):
            await client.send(BytesMessage(data=make_message(0, 0, 64, soak.rng)))
            got = 0
            while got < 2:  # the hello and the echo
                got += sum(isinstance(e, BytesMessage | TextMessage) for e in await client.next_events())
            await client.send(CloseConnection(code=1000))
            while client.ws.state.name != "CLOSED":
                await client.next_events()
        await trio.aclose_forcefully(client.stream)

    async with trio.open_nursery() as nursery:
        for i in range(count):
            nursery.start_soon(one, i)


async def soak_main(args: argparse.Namespace) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="wsproxy-soak-"))
    max_seconds = args.duration + 120
    names = ["b0", "b1", "b2", "b3"]
    backends = [BackendProcess(n, free_port(), max_seconds) for n in names]
    proxy: ProxyProcess | None = None
    samples = Samples()
    result: dict = {}
    try:
        with trio.fail_after(max_seconds):
            for b in backends:
                await b.start()
            async with trio.open_nursery() as nursery:
                backend_relay = IdleCutRelay("backend", backends[3].port)
                await nursery.start(backend_relay.run)
                proxy_port, admin_port = free_port(), free_port()
                pool_ports = [b.port for b in backends[:3]] + [backend_relay.port]
                cap = args.sessions + max(10, args.sessions * 15 // 100)
                config_for = {"": proxy_config(proxy_port, admin_port, pool_ports, cap, args.relay)}
                for i, b in enumerate(backends[:3]):
                    config_for[b.name] = proxy_config(
                        proxy_port, admin_port, [p for j, p in enumerate(pool_ports) if j != i], cap, args.relay
                    )
                config = workdir / "proxy.yaml"
                config.write_text(config_for[""])
                proxy = ProxyProcess(config, workdir / "proxy.log")
                await proxy.wait_ready(proxy_port)
                client_relay = IdleCutRelay("client", proxy_port)
                await nursery.start(client_relay.run)
                relays = {"client": client_relay, "backend": backend_relay}
                soak = Soak(args, proxy_port)
                soak.admin = admin_port
                soak.client_relay = client_relay

                await warm_up(soak, cap + 20)
                samples.start = await settle(proxy, 0, 3.0)
                samples.peak = samples.start
                began = samples.began = trio.current_time()

                async def sampler() -> None:
                    assert proxy is not None
                    while True:
                        with contextlib.suppress(OSError):
                            samples.note(*proxy.sample())
                        await trio.sleep(SAMPLE_EVERY)

                nursery.start_soon(sampler)
                async with trio.open_nursery() as population:
                    for i in range(args.sessions):
                        population.start_soon(soak.slot, i)
                    await trio.sleep(2.0)
                    kinds: list[str] = []
                    while trio.current_time() - began < args.duration - 8:
                        if not kinds:
                            kinds = list(FAULT_KINDS)
                            soak.rng.shuffle(kinds)
                        fault = await run_fault(kinds.pop(), soak, backends, relays, proxy, config_for)
                        soak.totals.faults.append(fault)
                        await trio.sleep(soak.rng.uniform(*(GAP_SHORT if args.duration < 120 else GAP)))
                    await trio.sleep_until(began + args.duration)
                    soak.stopping = True  # every session ends with its own closing handshake
                wall = trio.current_time() - began
                samples.end = await settle(proxy, samples.start[0] + FD_SLACK, 15.0)
                nursery.cancel_scope.cancel()
        alive = proxy.proc.poll() is None
        log = proxy.text()
        result = summarize(args, soak.totals, samples, wall, alive, log)
    finally:
        if proxy is not None:
            proxy.stop()
        for b in backends:
            b.close()
    return result


def summarize(args: argparse.Namespace, t: Totals, samples: Samples, wall: float, alive: bool, log: str) -> dict:
    by_fault: dict[str, Counter[str]] = {}
    lost_fault = lost_none = 0
    unexplained: Counter[str] = Counter()
    normal = 0
    details: list[str] = []
    t0 = samples.began
    for rec in t.records:
        lost = max(0, rec.sent - rec.received - rec.corrupt)
        cause = attribute(rec, t.faults)
        if cause is None:
            normal += 1
            lost_none += lost
        elif cause == "none":
            unexplained[rec.end] += 1
            lost_none += lost
            if len(details) < 20:
                details.append(
                    f"session {rec.sid} on {rec.backend} (via relay: {rec.via_relay}) "
                    f"{rec.opened - t0:.1f}-{rec.ended - t0:.1f} s: {rec.end}"
                )
        else:
            by_fault.setdefault(cause, Counter())[rec.end] += 1
            lost_fault += lost
    sent = sum(r.sent for r in t.records)
    delivered = sum(r.received for r in t.records)
    corrupt = sum(r.corrupt for r in t.records)
    tracebacks = log.count("Traceback")
    fd_ok = samples.end[0] <= samples.start[0] + FD_SLACK
    rss_ok = samples.end[1] <= samples.start[1] * (1 + RSS_SLACK)
    failures = []
    if lost_none:
        failures.append(f"{lost_none} message(s) lost on sessions no fault closed")
    if corrupt:
        failures.append(f"{corrupt} corrupt or out-of-order echo(es)")
    if unexplained:
        failures.append(f"{sum(unexplained.values())} close(s) no fault explains: {dict(unexplained)}")
    if not fd_ok:
        failures.append(f"descriptors did not return: {samples.start[0]} -> {samples.end[0]}")
    if not rss_ok:
        failures.append(f"VmRSS did not return within {RSS_SLACK:.0%}: {samples.start[1]} -> {samples.end[1]}")
    if not alive:
        failures.append("the proxy died")
    if tracebacks:
        failures.append(f"{tracebacks} traceback(s) in the proxy's log")
    return {
        "duration": round(wall, 1),
        "sessions": args.sessions,
        "relay": args.relay,
        "seed": args.seed,
        "messages": {
            "sent": sent,
            "delivered": delivered,
            "lost_no_fault": lost_none,
            "lost_fault_closed": lost_fault,
            "corrupt": corrupt,
        },
        "sessions_opened": len(t.records),
        "sessions_normal": normal,
        "closed_by_fault": {k: dict(v) for k, v in sorted(by_fault.items())},
        "closed_unexplained": dict(unexplained),
        "unexplained_sessions": details,
        "fault_log": [f"{f['start'] - t0:.1f}-{f['end'] - t0:.1f} s {f['kind']} {f['target']}" for f in t.faults],
        "faults": dict(Counter(f["kind"] for f in t.faults)),
        "open_failures": dict(t.open_failures),
        "burst": dict(t.burst),
        "proxy": {
            "fds": {"start": samples.start[0], "peak": samples.peak[0], "end": samples.end[0]},
            "rss_mib": {
                k: round(v[1] / MIB, 1)
                for k, v in (("start", samples.start), ("peak", samples.peak), ("end", samples.end))
            },
        },
        "failures": failures,
        "verdict": "PASS" if not failures else "FAIL",
    }


def table(r: dict) -> str:
    m, p = r["messages"], r["proxy"]
    rss = p["rss_mib"]
    change = (rss["end"] - rss["start"]) / rss["start"] * 100 if rss["start"] else 0.0
    lines = [
        f"soak: {r['duration']:g} s, {r['sessions']} sessions, relay {r['relay']}, seed {r['seed']}",
        "",
        "| measure | value |",
        "|---|---|",
        f"| messages sent | {m['sent']} |",
        f"| messages delivered (echoed back, checked) | {m['delivered']} |",
        f"| lost on sessions no fault closed (must be 0) | {m['lost_no_fault']} |",
        f"| lost on sessions a fault closed | {m['lost_fault_closed']} |",
        f"| corrupt or out-of-order echoes (must be 0) | {m['corrupt']} |",
        f"| sessions opened / ended by their own close | {r['sessions_opened']} / {r['sessions_normal']} |",
        f"| closes no fault explains (must be 0) | {r['closed_unexplained'] or 0} |",
        f"| faults injected | {', '.join(f'{k} {v}' for k, v in sorted(r['faults'].items()))} |",
        f"| opens refused (status: count) | {r['open_failures'] or 0} |",
        f"| burst sessions (status: count) | {r['burst'] or 0} |",
        f"| proxy descriptors start / peak / end | {p['fds']['start']} / {p['fds']['peak']} / {p['fds']['end']} |",
        f"| proxy VmRSS MiB start / peak / end | {rss['start']} / {rss['peak']} / {rss['end']} ({change:+.1f} %) |",
        "",
        "| fault | sessions closed, by how they ended |",
        "|---|---|",
    ]
    for kind in FAULT_KINDS:
        closed = r["closed_by_fault"].get(kind, {})
        lines.append(f"| {kind} | {', '.join(f'{k}: {v}' for k, v in sorted(closed.items())) or '-'} |")
    lines += ["", f"verdict: {r['verdict']}"] + [f"  - {f}" for f in r["failures"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of faults and traffic (default 600)")
    parser.add_argument("--sessions", type=int, default=300, help="sessions kept open at once (default 300)")
    parser.add_argument("--relay", choices=("passthrough", "inspect"), default="passthrough")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the result as JSON here")
    args = parser.parse_args(argv)
    if args.seed is None:
        args.seed = random.randrange(1 << 30)
    if args.duration < 20:
        parser.error("--duration: at least 20 s (a fault cycle needs room)")
    result = trio.run(soak_main, args)
    print(table(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))
    return 0 if result["verdict"] == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
