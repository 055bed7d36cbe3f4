"""wsproxy against a direct connection, a trio byte pump, HAProxy and nginx, side by side.

One command runs every cell on every target in turn and prints each figure with its ratio to
the direct connection measured in the same run (ratios, not absolute numbers: the machines are
shared and noisy):

- round trips: 64 B / 1 KiB / 64 KiB x 1 / 100 / 1000 connections (and 16 KiB x 1 / 100),
  closed loop, one message in
  flight per connection (round trips/s, RTT p50/p99), and 1 KiB x 100 over TLS (to the target,
  and on both legs: client to proxy and proxy to TLS backends, `rt 1KiB x100 tls both legs`);
- handshakes/s, plain and TLS (full handshakes) and TLS resumed (`hs tls resumed`, a saved
  session ticket per port), from the compiled generator (hs_gen.c, see hs_driver.py): each
  session connects, handshakes, Upgrades, checks the 101, sends a close and reads it back;
- `storm`: 5,000 sessions opened at once by several generator processes, each one echo then a
  close: time until all are established, handshake latency p50/p99, failures (storm.py);
- resident memory per idle session with N sessions open, each after echoing one message
  (plain and TLS; a freshly started target for each).

Every cell runs `--repeats` times (default 3) with the targets interleaved (direct, A, B, ...,
direct, A, B, ...); the tables show the median, the spread and the median of the per-round
ratios to direct, and the verdicts (issue 22's targets) are judged on medians (bench_report.py).

Targets: `direct` (the load generator talks to the echo backends itself), `passthrough` and
`inspect` (wsproxy's two relay paths, heartbeats on at their 20 s default), `passthrough-no-hb`
(heartbeats off; key cells only, to show what the heartbeat bookkeeping costs),
`passthrough-splice` (payloads spliced from 16 KiB, `limits.splice_min_bytes: 16KiB`, where the
default copies below 128 KiB; the 16 KiB and 64 KiB cells only: the A/B of splicing), `byte-pump`
(benchmarks/byte_pump.py, the yardstick) and `haproxy` / `nginx` when installed (both one
process, one thread). Everything listens on 127.0.0.1. The target under test is pinned to
CPU 0 and the load generator and backends to CPU 1 with `taskset` (no pinning, with a note,
when taskset is missing or there is one CPU). The backends and the load generator are picows
on uvloop (`pip install -e '.[bench]'`); the handshake and storm cells use hs_gen.c instead,
compiled on first use (gcc and libssl-dev). Per cell it prints the CPU use of the target, the
generator and the backends, and how busy each CPU was over the window (by anything), and flags:
`gen-sat` (generator + backends used >= 90 % of CPU 1: the target may not have been the
bottleneck; expected for `direct`, whose ceiling is CPU 1), `cpu1-full` (CPU 1 was full but with
other work: the generator was starved), `cpu0-shared` / `cpu1-shared` (other processes took more
than 15 % of a pinned CPU: noise on a shared machine).

    python benchmarks/relay_bench.py                 # every cell, 3 repeats (about 45 minutes)
    python benchmarks/relay_bench.py --issue22       # issue 22's cells and targets (about 20 minutes)
    python benchmarks/relay_bench.py --quick         # a small subset, short cells, 1 repeat (< 2 minutes)
    python benchmarks/relay_bench.py --json out.json --targets direct,passthrough
    python benchmarks/relay_bench.py --profile prof.json   # py-spy on passthrough, 1 KiB x 100

Only processes it starts are stopped (by their own handle); each exits on its own when this
script goes away (their stdin closes).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import bench_report
import hs_driver
import storm

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PY = sys.executable
KEY_CELL = "rt 1KiB x100"
BOTH_LEGS_CELL = "rt 1KiB x100 tls both legs"  # 1 KiB x 100, TLS client-to-proxy and proxy-to-backend

SIZES = {"64B": 64, "1KiB": 1024, "64KiB": 65536}
CONNS = (1, 100, 1000)
MID_CELLS = ("rt 16KiB x1", "rt 16KiB x100")  # where splicing starts to pay (limits.splice_min_bytes)
SPLICE_CELLS = (*MID_CELLS, "rt 64KiB x1", "rt 64KiB x100", "rt 64KiB x1000")
HANDSHAKE_CONCURRENCY = 50
STORM_SESSIONS = 5000
STORM_BOUND = 30.0  # seconds: a storm session not finished by then is a timeout
STORM_PAUSE = 2.0  # seconds after a storm cell, for the target to close its 5,000 sessions
CELL_PAUSE = 0.5  # seconds between cells
GEN_SATURATED = 0.9  # CPU 1 (generator + backends) busier than this: the target may not be the bottleneck
SHARED = 0.15  # a pinned CPU this much busier than our processes on it: other work shared it (noise)


@dataclass
class Cell:
    name: str
    mode: str  # rt | hs | idle
    tls: bool = False
    size: int = 1024
    conns: int = 100
    backend_tls: bool = False  # the proxy speaks TLS to the backends too (wss:// pool)
    resume: bool = False  # hs: TLS resumption with a saved session (hs_gen --resume)


@dataclass
class Plan:
    cells: list[Cell]
    warmup: float
    duration: float
    idle_sessions: int
    targets: list[str]
    repeats: int = 3
    hs_procs: int = 1  # generator processes of a handshake cell
    storm_procs: int = 4  # generator processes of the storm cell


def all_cells(idle_sessions: int) -> list[Cell]:
    cells = [Cell(f"rt {label} x{n}", "rt", size=size, conns=n) for label, size in SIZES.items() for n in CONNS]
    cells += [Cell(name, "rt", size=16384, conns=int(name.rsplit("x", 1)[1])) for name in MID_CELLS]
    return [
        *cells,
        Cell("rt 1KiB x100 tls", "rt", tls=True, size=1024, conns=100),
        Cell(BOTH_LEGS_CELL, "rt", tls=True, backend_tls=True, size=1024, conns=100),
        Cell("hs plain", "hs", conns=HANDSHAKE_CONCURRENCY),
        Cell("hs tls", "hs", tls=True, conns=HANDSHAKE_CONCURRENCY),
        Cell("hs tls resumed", "hs", tls=True, resume=True, conns=HANDSHAKE_CONCURRENCY),
        Cell("idle plain", "idle", conns=idle_sessions, size=64),
        Cell("idle tls", "idle", tls=True, conns=idle_sessions, size=64),
        Cell("storm", "storm", conns=STORM_SESSIONS, size=16),
    ]


# issue 22's table: these cells and targets; shorter windows and fewer idle sessions, so that 3
# repeats finish in about 20 minutes
ISSUE22_CELLS = [
    "hs plain",
    "hs tls",
    "hs tls resumed",
    KEY_CELL,
    "rt 64KiB x100",
    "rt 1KiB x1000",
    "rt 1KiB x100 tls",
    "idle plain",
    "idle tls",
    "storm",
]
ISSUE22_TARGETS = ["direct", "passthrough", "byte-pump", "haproxy"]
ISSUE22_WINDOW = (0.5, 2.0)  # warm-up, measured seconds
ISSUE22_IDLE_SESSIONS = 3000


def build_plan(args: argparse.Namespace, idle_sessions: int) -> Plan:
    gens = {"hs_procs": args.hs_procs, "storm_procs": args.storm_procs}
    if args.quick:
        cells = [
            Cell(KEY_CELL, "rt", size=1024, conns=100),
            Cell("rt 1KiB x100 tls", "rt", tls=True, size=1024, conns=100),
            Cell("hs plain", "hs", conns=HANDSHAKE_CONCURRENCY),
            Cell("hs tls resumed", "hs", tls=True, resume=True, conns=HANDSHAKE_CONCURRENCY),
            Cell("idle plain", "idle", conns=min(idle_sessions, 300), size=64),
            Cell("storm", "storm", conns=min(args.storm_sessions, 1000), size=16),
        ]
        idle = min(idle_sessions, 300)
        return Plan(cells, 0.3, 1.0, idle, args.targets, repeats=args.repeats or 1, **gens)
    cells = all_cells(idle_sessions)
    for c in cells:
        if c.mode == "storm":
            c.conns = args.storm_sessions
    if args.cells:
        unknown = set(args.cells) - {c.name for c in cells}
        if unknown:
            sys.exit(f"unknown cells {sorted(unknown)}; known: {', '.join(c.name for c in cells)}")
        cells = [c for c in cells if c.name in args.cells]
    return Plan(cells, args.warmup, args.duration, idle_sessions, args.targets, repeats=args.repeats or 3, **gens)


# --------------------------------------------------------------------------------------------
# processes we start


@dataclass
class Proc:
    """A child process; stopped through its own handle only."""

    name: str
    popen: subprocess.Popen
    log: Path | None = None

    def stop(self, sig: int = signal.SIGTERM, wait: float = 10.0) -> None:
        if self.popen.poll() is not None:
            return
        with contextlib.suppress(OSError):
            if self.popen.stdin is not None:
                self.popen.stdin.close()
        with contextlib.suppress(ProcessLookupError):
            self.popen.send_signal(sig)
        try:
            self.popen.wait(wait)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(5)


class Pinning:
    def __init__(self, enabled: bool) -> None:
        self.note = ""
        taskset = shutil.which("taskset")
        cpus = os.cpu_count() or 1
        if not enabled:
            self.note = "pinning off (--no-pin)"
        elif taskset is None:
            self.note = "taskset not found: no CPU pinning (install util-linux)"
        elif cpus < 2:
            self.note = "one CPU: no pinning, target and load generator share it"
        self.on = not self.note
        self.target = [taskset, "-c", "0"] if self.on else []
        self.load = [taskset, "-c", "1"] if self.on else []


def spawn(name: str, argv: list[str], *, workdir: Path, json_line: bool = False) -> tuple[Proc, dict]:
    """Start a child with a log file; with json_line, wait for its first stdout line (ready)."""
    log = workdir / f"{name}.log"
    popen = subprocess.Popen(
        argv,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE if json_line else subprocess.DEVNULL,
        stderr=log.open("wb"),
        cwd=ROOT,
    )
    proc = Proc(name, popen, log)
    info: dict = {}
    if json_line:
        assert popen.stdout is not None
        line = popen.stdout.readline()
        if not line:
            proc.stop()
            raise RuntimeError(f"{name} did not start: {log.read_text()[-2000:]}")
        info = json.loads(line)
    return proc, info


def wait_listening(port: int, proc: Proc, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited: {proc.log.read_text()[-2000:] if proc.log else ''}")
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{proc.name} is not listening on {port} after {timeout:g}s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------
# targets


@dataclass
class Endpoint:
    plain: list[str]
    tls: list[str]
    pids: list[int] = field(default_factory=list)  # the target's own processes (CPU, RSS)
    tls_both: list[str] = field(default_factory=list)  # TLS to the target and from it to TLS backends


@dataclass
class Env:
    workdir: Path
    pin: Pinning
    backend_plain: list[int]
    backend_tls: list[int]
    cert: Path
    key: Path
    combined: Path  # cert chain + key in one file (HAProxy)
    ca: Path
    idle_sessions: int
    gen_binary: Path | None = None  # the compiled handshake generator (hs_gen.c)


class Target:
    name = ""
    only: tuple[str, ...] | None = None  # cell names this target runs (None: all)

    def __init__(self, env: Env) -> None:
        self.env = env
        self.procs: list[Proc] = []

    def available(self) -> str | None:
        """None, or why this target is skipped."""
        return None

    def start(self) -> Endpoint:
        raise NotImplementedError

    def stop(self) -> None:
        for p in self.procs:
            p.stop()
        self.procs.clear()


class Direct(Target):
    name = "direct"

    def start(self) -> Endpoint:
        e = self.env
        tls = [f"wss://127.0.0.1:{p}/" for p in e.backend_tls]
        return Endpoint([f"ws://127.0.0.1:{p}/" for p in e.backend_plain], tls, tls_both=tls)


class WsProxy(Target):
    def __init__(
        self,
        env: Env,
        name: str,
        relay: str,
        heartbeat: bool = True,
        only: tuple[str, ...] | None = None,
        limits: str = "",  # more `limits:` keys, spelled ", key: value"
    ):
        super().__init__(env)
        self.name, self.relay, self.heartbeat, self.only, self.limits = name, relay, heartbeat, only, limits

    def start(self) -> Endpoint:
        e = self.env
        plain, tls, both = free_port(), free_port(), free_port()
        backends = ", ".join(f"127.0.0.1:{p}" for p in e.backend_plain)
        tls_backends = ", ".join(f"'wss://127.0.0.1:{p}'" for p in e.backend_tls)
        hb = "heartbeat: {interval: 20s}" if self.heartbeat else "heartbeat: {legs: none}"
        cfg = e.workdir / f"{self.name}.yaml"
        listener_tls = f"tls: {{cert: '{e.cert}', key: '{e.key}'}}"
        cfg.write_text(
            f"listeners:\n"
            f"  - {{address: '127.0.0.1:{plain}', pool: echo, relay: {self.relay}}}\n"
            f"  - {{address: '127.0.0.1:{tls}', pool: echo, relay: {self.relay}, {listener_tls}}}\n"
            f"  - {{address: '127.0.0.1:{both}', pool: echo_tls, relay: {self.relay}, {listener_tls}}}\n"
            f"pools:\n  echo:\n    backends: [{backends}]\n"
            f"  echo_tls:\n    backends: [{tls_backends}]\n    tls: {{ca: '{e.ca}'}}\n"
            f"{hb}\n"
            # nothing of wsproxy's own refuses the storm cell (these are the defaults, spelled out)
            f"admission: {{upgrades: off}}\n"
            f"limits: {{max_sessions: off{self.limits}}}\n"
            f"rate_limits: {{handshakes_per_ip: off, max_sessions_per_ip: off}}\n"
            f"shutdown: {{drain_window: 1s, deadline: 3s}}\n"
            f"log: {{level: warning}}\n"
        )
        proc, _ = spawn(self.name, [*e.pin.target, PY, "-m", "wsproxy", "run", "-c", str(cfg)], workdir=e.workdir)
        self.procs.append(proc)
        wait_listening(plain, proc)
        wait_listening(tls, proc)
        wait_listening(both, proc)
        return Endpoint(
            [f"ws://127.0.0.1:{plain}/"],
            [f"wss://127.0.0.1:{tls}/"],
            [proc.popen.pid],
            tls_both=[f"wss://127.0.0.1:{both}/"],
        )


class BytePump(Target):
    name = "byte-pump"

    def start(self) -> Endpoint:
        e = self.env
        argv = [*e.pin.target, PY, str(HERE / "byte_pump.py"), "--cert", str(e.cert), "--key", str(e.key)]
        for p in e.backend_plain:
            argv += ["--backend", f"127.0.0.1:{p}"]
        proc, info = spawn(self.name, argv, workdir=e.workdir, json_line=True)
        self.procs.append(proc)
        return Endpoint([f"ws://127.0.0.1:{info['plain']}/"], [f"wss://127.0.0.1:{info['tls']}/"], [info["pid"]])


class HAProxy(Target):
    name = "haproxy"
    binary = "/usr/sbin/haproxy"

    def available(self) -> str | None:
        path = shutil.which("haproxy") or (self.binary if Path(self.binary).exists() else None)
        if path is None:
            return "not installed (Debian: apt-get install haproxy)"
        self.binary = path
        return None

    def start(self) -> Endpoint:
        e = self.env
        plain, tls = free_port(), free_port()
        servers = "\n".join(f"  server b{i} 127.0.0.1:{p}" for i, p in enumerate(e.backend_plain))
        cfg = e.workdir / "haproxy.cfg"
        maxconn = max(e.idle_sessions, STORM_SESSIONS) + 500
        cfg.write_text(
            f"global\n  nbthread 1\n  maxconn {maxconn}\n"
            f"defaults\n  mode http\n  maxconn {maxconn}\n"
            f"  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n"
            f"  timeout tunnel 1h\n"
            f"frontend fe\n  bind 127.0.0.1:{plain}\n  bind 127.0.0.1:{tls} ssl crt {e.combined} alpn http/1.1\n"
            f"  default_backend be\n"
            f"backend be\n  balance roundrobin\n{servers}\n"
        )
        proc, _ = spawn(self.name, [*e.pin.target, self.binary, "-db", "-f", str(cfg)], workdir=e.workdir)
        self.procs.append(proc)
        wait_listening(plain, proc)
        wait_listening(tls, proc)
        return Endpoint([f"ws://127.0.0.1:{plain}/"], [f"wss://127.0.0.1:{tls}/"], [proc.popen.pid])


class Nginx(Target):
    name = "nginx"
    binary = "/usr/sbin/nginx"

    def available(self) -> str | None:
        path = shutil.which("nginx") or (self.binary if Path(self.binary).exists() else None)
        if path is None:
            return "not installed (Debian: apt-get install nginx)"
        self.binary = path
        return None

    def start(self) -> Endpoint:
        e = self.env
        plain, tls = free_port(), free_port()
        prefix = e.workdir / "nginx"
        prefix.mkdir(exist_ok=True)
        servers = "".join(f" server 127.0.0.1:{p};" for p in e.backend_plain)
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        conns = min(2 * e.idle_sessions + 2000, nofile - 100)  # two per session, and closing ones linger
        cfg = prefix / "nginx.conf"
        cfg.write_text(
            f"daemon off;\nmaster_process off;\nworker_processes 1;\nworker_rlimit_nofile {nofile};\n"
            f"error_log {prefix}/error.log warn;\npid {prefix}/nginx.pid;\n"
            f"events {{ worker_connections {conns}; }}\n"
            f"http {{\n  access_log off;\n"
            f"  client_body_temp_path {prefix}/body; proxy_temp_path {prefix}/proxy;\n"
            f"  fastcgi_temp_path {prefix}/fcgi; uwsgi_temp_path {prefix}/uwsgi; scgi_temp_path {prefix}/scgi;\n"
            f"  upstream echo {{{servers} }}\n"
            f"  server {{\n    listen 127.0.0.1:{plain};\n    listen 127.0.0.1:{tls} ssl;\n"
            f"    ssl_certificate {e.cert};\n    ssl_certificate_key {e.key};\n"
            f"    location / {{\n      proxy_pass http://echo;\n      proxy_http_version 1.1;\n"
            f"      proxy_set_header Upgrade $http_upgrade;\n      proxy_set_header Connection upgrade;\n"
            f"      proxy_read_timeout 1h;\n      proxy_send_timeout 1h;\n    }}\n  }}\n}}\n"
        )
        argv = [*e.pin.target, self.binary, "-p", str(prefix), "-c", str(cfg), "-e", str(prefix / "error.log")]
        proc, _ = spawn(self.name, argv, workdir=e.workdir)
        self.procs.append(proc)
        wait_listening(plain, proc)
        wait_listening(tls, proc)
        return Endpoint([f"ws://127.0.0.1:{plain}/"], [f"wss://127.0.0.1:{tls}/"], [proc.popen.pid])


def make_targets(env: Env) -> dict[str, Target]:
    key = (KEY_CELL, "rt 64KiB x100", "rt 1KiB x100 tls")
    targets: list[Target] = [
        Direct(env),
        WsProxy(env, "passthrough", "passthrough"),
        WsProxy(env, "inspect", "inspect"),
        WsProxy(env, "passthrough-no-hb", "passthrough", heartbeat=False, only=key),
        # splicing from 16 KiB (the default copies below 128 KiB): the A/B of limits.splice_min_bytes
        WsProxy(
            env, "passthrough-splice", "passthrough", only=SPLICE_CELLS, limits=", splice_min_bytes: 16KiB"
        ),
        BytePump(env),
        HAProxy(env),
        Nginx(env),
    ]
    return {t.name: t for t in targets}


# --------------------------------------------------------------------------------------------
# cells


def run_cell(env: Env, plan: Plan, cell: Cell, ep: Endpoint, backend_pid: int) -> dict:
    urls = ep.tls_both if cell.backend_tls else ep.tls if cell.tls else ep.plain
    if not urls:
        return {"error": "this target has no TLS-to-backend setup"}
    watch = [*ep.pids, backend_pid]
    started = time.monotonic()
    if cell.mode in ("hs", "storm"):
        assert env.gen_binary is not None
        gen = hs_driver.GenRun(env.gen_binary, env.pin.load, urls, env.ca, cell.tls, resume=cell.resume)
        try:
            if cell.mode == "hs":
                result = hs_driver.run_hs(
                    gen, conns=cell.conns, procs=plan.hs_procs, warmup=plan.warmup, duration=plan.duration, watch=watch
                )
            else:
                result = storm.run_storm(
                    gen, sessions=cell.conns, procs=plan.storm_procs, watch=watch, bound=STORM_BOUND, size=cell.size
                )
        except (RuntimeError, ValueError, subprocess.TimeoutExpired) as exc:
            return {"error": f"compiled generator: {exc}"[:600]}
        result["wall_seconds"] = round(time.monotonic() - started, 1)
        return finish_result(env, cell, ep, backend_pid, result)
    argv = [*env.pin.load, PY, str(HERE / "load_client.py"), cell.mode, "--conns", str(cell.conns)]
    argv += ["--size", str(cell.size), "--warmup", str(plan.warmup), "--duration", str(plan.duration)]
    argv += ["--watch", ",".join(map(str, watch)), "--ca", str(env.ca)]
    if cell.mode == "idle":
        argv += ["--settle", "0.5" if plan.duration < 2 else "1.5", "--max-seconds", "600"]
    for url in urls:
        argv += ["--url", url]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=700, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": "load generator timed out"}
    if done.returncode != 0 or not done.stdout.strip():
        return {"error": f"load generator failed ({done.returncode}): {done.stderr.strip()[-600:]}"}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall_seconds"] = round(time.monotonic() - started, 1)
    if done.stderr.strip():
        result["stderr"] = done.stderr.strip()[-600:]
    return finish_result(env, cell, ep, backend_pid, result)


def finish_result(env: Env, cell: Cell, ep: Endpoint, backend_pid: int, result: dict) -> dict:
    """Name the watched processes' CPU, flag a saturated or shared CPU, set the cell's value."""
    cpu = result.pop("cpu", None)
    if cpu is not None:
        result["cpu_gen"] = round(cpu.get("self", 0.0), 3)
        result["cpu_backend"] = round(cpu.get(str(backend_pid), 0.0), 3)
        result["cpu_target"] = round(sum(cpu.get(str(p), 0.0) for p in ep.pids), 3) if ep.pids else None
        busy = result.pop("cpu_busy", {})
        result["cpu0_busy"], result["cpu1_busy"] = busy.get("cpu0"), busy.get("cpu1")
        flags = []
        if env.pin.on:
            # CPU 1 runs the generator and the backends; busy (by them or by anything else) means
            # the target may not have been the bottleneck.
            others0 = (result["cpu0_busy"] or 0.0) - (result["cpu_target"] or 0.0)
            others1 = (result["cpu1_busy"] or 0.0) - result["cpu_gen"] - result["cpu_backend"]
            if result["cpu_gen"] + result["cpu_backend"] >= GEN_SATURATED:
                flags.append("gen-sat")
            elif (result["cpu1_busy"] or 0.0) >= GEN_SATURATED and others1 > SHARED:
                flags.append(f"cpu1-full (others {others1:.0%})")  # the generator side was starved
            elif others1 > SHARED:
                flags.append(f"cpu1-shared {others1:.0%}")
            if others0 > SHARED:
                flags.append(f"cpu0-shared {others0:.0%}")
        elif result["cpu_gen"] >= GEN_SATURATED:
            flags.append("gen-sat")
        result["flags"] = flags
    if cell.mode == "idle":
        per = result.get("bytes_per_session", {})
        pids = ep.pids or [backend_pid]  # direct: what the backend itself holds per session
        result["value"] = round(sum(per.get(str(p), 0.0) for p in pids) / 1024, 2)  # KiB per session
        result["backend_kib_per_session"] = round(per.get(str(backend_pid), 0.0) / 1024, 2)
    else:
        result["value"] = result.get("rate")
    return result


# --------------------------------------------------------------------------------------------
# the run


def machine() -> dict:
    info: dict = {
        "python": platform.python_version(),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
    }
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError):
        mem = Path("/proc/meminfo").read_text().split()[1]
        info["memory_gib"] = round(int(mem) / 1024 / 1024, 1)
    for pkg in ("trio", "picows", "uvloop", "wsproto"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            info[pkg] = importlib.metadata.version(pkg)
    for tool, argv in (("haproxy", ["haproxy", "-v"]), ("nginx", ["nginx", "-v"])):
        if shutil.which(tool):
            out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            info[tool] = (out.stdout + out.stderr).strip().splitlines()[0]
    return info


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def raise_fd_limit(wanted: int) -> tuple[int, str]:
    """Raise the soft RLIMIT_NOFILE (children inherit it); returns the limit and a note."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, wanted)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    note = f"open files: soft {soft} -> {target} (hard {hard})"
    return target, note


def make_certs(workdir: Path) -> tuple[Path, Path, Path, Path]:
    import trustme

    ca = trustme.CA()
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    cert, key, combined, ca_file = (workdir / n for n in ("cert.pem", "key.pem", "combined.pem", "ca.pem"))
    leaf.private_key_pem.write_to_path(str(key))
    cert.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    combined.write_bytes(cert.read_bytes() + key.read_bytes())
    ca.cert_pem.write_to_path(str(ca_file))
    return cert, key, combined, ca_file


def check_tools() -> None:
    missing = [m for m in ("picows", "uvloop", "trustme") if importlib.util.find_spec(m) is None]
    if missing:
        sys.exit(
            f"missing {', '.join(missing)}: install the benchmark extra first:\n"
            f"  {PY} -m pip install -e '{ROOT}[bench]'"
        )


def compiled_generator(cells: list[Cell], workdir: Path) -> Path | None:
    """The compiled generator if a cell needs it; a clear exit if it cannot be built here."""
    if not any(c.mode in ("hs", "storm") for c in cells):
        return None
    try:
        return hs_driver.build(workdir)
    except hs_driver.BuildError as exc:
        sys.exit(f"{exc}\n(or leave out the handshake and storm cells with --cells)")


def run(args: argparse.Namespace) -> dict:
    check_tools()
    limit, fd_note = raise_fd_limit(2 * max(args.idle_sessions, args.storm_sessions) + 1000)
    idle = min(args.idle_sessions, (limit - 500) // 2)
    notes = [fd_note]
    if idle < args.idle_sessions:
        notes.append(f"idle sessions lowered from {args.idle_sessions} to {idle} by the open-files limit")
    pin = Pinning(not args.no_pin)
    if pin.note:
        notes.append(pin.note)
    plan = build_plan(args, idle)
    if any(c.mode == "storm" for c in plan.cells):
        notes.append(
            f"storm: net.core.somaxconn {storm.somaxconn()} caps every listen backlog (wsproxy asks for 1024, "
            f"the byte pump and the echo backends 4096, HAProxy its maxconn)"
        )
    with contextlib.ExitStack() as stack:
        if args.workdir:
            workdir = Path(args.workdir)
            workdir.mkdir(parents=True, exist_ok=True)
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="relay-bench-")))
        profiled = [c for c in all_cells(idle) if args.profile and c.name == args.profile_cell]
        gen_binary = compiled_generator([*plan.cells, *profiled], workdir)
        cert, key, combined, ca = make_certs(workdir)
        backend, ports = spawn(
            "echo-backends",
            [*pin.load, PY, str(HERE / "echo_server.py"), "--count", "2", "--cert", str(cert), "--key", str(key)],
            workdir=workdir,
            json_line=True,
        )
        env = Env(workdir, pin, ports["plain"], ports["tls"], cert, key, combined, ca, idle, gen_binary)
        all_targets = make_targets(env)
        unknown = [t for t in plan.targets if t not in all_targets]
        if unknown:
            backend.stop()
            sys.exit(f"unknown targets {unknown}; known: {', '.join(all_targets)}")
        skipped: dict[str, str] = {}
        report = {
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "machine": machine(),
            "loadavg_start": loadavg(),
            "notes": notes,
            "plan": {
                "warmup": plan.warmup,
                "duration": plan.duration,
                "idle_sessions": plan.idle_sessions,
                "repeats": plan.repeats,
                "hs_generator_processes": plan.hs_procs,
                "storm_generator_processes": plan.storm_procs,
                "cells": [c.name for c in plan.cells],
            },
        }
        for note in notes:
            print(f"note: {note}", flush=True)
        print(f"load average at start: {report['loadavg_start']}", flush=True)
        targets = []
        for name in plan.targets:
            why = all_targets[name].available()
            if why is not None:
                skipped[name] = why
                print(f"-- {name}: skipped, {why}", flush=True)
            else:
                targets.append(all_targets[name])
        try:
            runs = run_interleaved(env, plan, targets, ports["pid"])
            if args.profile:
                target = all_targets[args.profile_target]
                cell = next(c for c in all_cells(plan.idle_sessions) if c.name == args.profile_cell)
                report["profile"] = profile(env, plan, target, ports["pid"], Path(args.profile), cell)
        finally:
            for t in all_targets.values():
                t.stop()
            backend.stop()
    results = bench_report.summarise(runs)
    report["loadavg_end"] = loadavg()
    report["skipped"] = skipped
    report["results"] = results
    report["verdicts"] = bench_report.verdicts(results, runs)
    order = [t.name for t in targets]
    report["table"] = bench_report.table(plan.cells, results, order)
    return report


def applies(target: Target, cell: Cell) -> bool:
    return target.only is None or cell.name in target.only


def run_interleaved(env: Env, plan: Plan, targets: list[Target], backend_pid: int) -> dict[str, dict[str, list[dict]]]:
    """Every cell `plan.repeats` times, the targets interleaved within each round. The targets of
    the shared cells run side by side for the whole run (each idle while another is measured);
    each idle cell gets a freshly started target (memory freed by earlier cells would hide the cost)."""
    runs: dict[str, dict[str, list[dict]]] = {t.name: {} for t in targets}
    shared = [c for c in plan.cells if c.mode != "idle"]
    endpoints: dict[str, Endpoint] = {}
    try:
        for t in targets:
            if any(applies(t, c) for c in shared):
                endpoints[t.name] = t.start()
        for cell in shared:
            for rep in range(plan.repeats):
                print(f"-- {cell.name}, round {rep + 1}/{plan.repeats} (load average {loadavg()})", flush=True)
                for t in (t for t in targets if applies(t, cell)):
                    r = run_cell(env, plan, cell, endpoints[t.name], backend_pid)
                    runs[t.name].setdefault(cell.name, []).append(r)
                    show(t.name, cell, r)
                    time.sleep(STORM_PAUSE if cell.mode == "storm" else CELL_PAUSE)  # the target closes the sessions
    finally:
        for t in targets:
            t.stop()
    for cell in (c for c in plan.cells if c.mode == "idle"):
        for rep in range(plan.repeats):
            print(f"-- {cell.name}, round {rep + 1}/{plan.repeats} (load average {loadavg()})", flush=True)
            for t in (t for t in targets if applies(t, cell)):
                ep = t.start()
                try:
                    r = run_cell(env, plan, cell, ep, backend_pid)
                finally:
                    t.stop()
                runs[t.name].setdefault(cell.name, []).append(r)
                show(t.name, cell, r)
    return runs


def show(target: str, cell: Cell, r: dict) -> None:
    if "error" in r:
        print(f"   {target:<18} ERROR {r['error']}", flush=True)
        return
    extra = ""
    if cell.mode != "idle":
        extra = f" p50 {bench_report.fmt_us(r.get('p50_us'))} p99 {bench_report.fmt_us(r.get('p99_us'))}"
    tcpu = r.get("cpu_target")
    cpus = f"target {tcpu:.0%} " if tcpu is not None else ""
    if r.get("cpu_gen") is not None:
        cpus += f"gen {r['cpu_gen']:.0%} backend {r['cpu_backend']:.0%} "
    if r.get("cpu0_busy") is not None:
        cpus += f"cpu0 {r['cpu0_busy']:.0%} cpu1 {r['cpu1_busy']:.0%}"
    flags = list(r.get("flags", []))
    if r.get("error_kinds"):
        flags.append("errors " + ",".join(f"{k}={n}" for k, n in sorted(r["error_kinds"].items())))
    if r.get("tls_resumed"):
        flags.append(f"resumed {r['tls_resumed']}/{r['tls_resumed'] + r.get('tls_full', 0)}")
    value = bench_report.fmt_value(cell.mode, r)
    print(f"   {target:<18} {value:>24}{extra}  {cpus} {' '.join(flags)}", flush=True)


# --------------------------------------------------------------------------------------------
# py-spy


def profile(env: Env, plan: Plan, target: Target, backend_pid: int, out: Path, cell: Cell) -> dict:
    """py-spy on one target during one cell (default: passthrough, the key cell); summary of the
    hottest frames."""
    spy = shutil.which("py-spy") or str(Path(PY).parent / "py-spy")
    if not Path(spy).exists():
        return {"error": "py-spy not installed (pip install py-spy)"}
    seconds = max(3, int(plan.duration) + 2)
    ep = target.start()
    try:
        argv = [*env.pin.load, spy, "record", "--pid", str(ep.pids[0]), "--duration", str(seconds)]
        argv += ["--rate", "200", "--format", "speedscope", "--output", str(out)]
        spy_proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        long_plan = Plan(plan.cells, warmup=0.5, duration=seconds, idle_sessions=0, targets=[])
        r = run_cell(env, long_plan, cell, ep, backend_pid)
        try:
            _, err = spy_proc.communicate(timeout=seconds + 30)
        except subprocess.TimeoutExpired:
            spy_proc.kill()
            _, err = spy_proc.communicate()
    finally:
        target.stop()
    if not out.exists():
        return {"error": f"py-spy wrote nothing: {err.decode(errors='replace')[-500:]}"}
    summary = bench_report.summarise_speedscope(out)
    summary["cell_rate_under_profiler"] = r.get("value")
    summary["cell"], summary["target"] = cell.name, target.name
    print("\n" + bench_report.render_profile(summary, KEY_CELL), flush=True)
    return summary


def main() -> None:
    default_targets = "direct,passthrough,inspect,passthrough-no-hb,passthrough-splice,byte-pump,haproxy,nginx"
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a small subset with short cells (checks the script works)")
    p.add_argument(
        "--issue22",
        action="store_true",
        help=f"issue 22's table: cells {', '.join(ISSUE22_CELLS)}; targets {','.join(ISSUE22_TARGETS)}; "
        f"{ISSUE22_WINDOW[0]:g} s warm-up, {ISSUE22_WINDOW[1]:g} s windows, {ISSUE22_IDLE_SESSIONS} idle sessions "
        f"(each overridable by its own option)",
    )
    p.add_argument("--json", help="write the full results here")
    p.add_argument("--targets", default=None, type=lambda s: [t for t in s.split(",") if t])
    p.add_argument("--idle-sessions", type=int, default=None, help="sessions held open in the idle cells (9000)")
    p.add_argument("--warmup", type=float, default=None, help="seconds before each measured window (1.0)")
    p.add_argument("--duration", type=float, default=None, help="seconds of each measured window (4.0)")
    p.add_argument("--repeats", type=int, default=None, help="runs of every cell, targets interleaved (3; --quick 1)")
    p.add_argument("--hs-procs", type=int, default=1, help="generator processes of a handshake cell")
    p.add_argument("--storm-procs", type=int, default=4, help="generator processes of the storm cell")
    p.add_argument("--storm-sessions", type=int, default=STORM_SESSIONS, help="sessions of the storm cell")
    p.add_argument("--no-pin", action="store_true", help="do not pin with taskset")
    p.add_argument(
        "--cells",
        type=lambda s: [c.strip() for c in s.split(",") if c.strip()],
        default=None,
        help='only these cells, e.g. "rt 1KiB x100,idle plain"',
    )
    p.add_argument("--workdir", help="keep configs, certs and the targets' logs here (default: a temporary directory)")
    p.add_argument("--profile", help="afterwards, py-spy the passthrough proxy in the key cell; speedscope JSON here")
    p.add_argument("--profile-cell", default=KEY_CELL, help="the cell --profile runs (a round-trip or handshake cell)")
    p.add_argument("--profile-target", default="passthrough", help="the target --profile samples")
    args = p.parse_args()
    preset = args.issue22 and not args.quick
    if args.targets is None:
        args.targets = list(ISSUE22_TARGETS) if preset else default_targets.split(",")
    if args.cells is None and preset:
        args.cells = list(ISSUE22_CELLS)
    if args.idle_sessions is None:
        args.idle_sessions = ISSUE22_IDLE_SESSIONS if preset else 9000
    if args.warmup is None:
        args.warmup = ISSUE22_WINDOW[0] if preset else 1.0
    if args.duration is None:
        args.duration = ISSUE22_WINDOW[1] if preset else 4.0
    if args.repeats is not None and args.repeats < 1:
        p.error("--repeats must be at least 1")
    if "direct" not in args.targets:
        args.targets.insert(0, "direct")  # every ratio needs it
    started = time.monotonic()
    report = run(args)
    report["wall_seconds"] = round(time.monotonic() - started, 1)
    print()
    print(report["table"])
    if report["verdicts"]:
        print()
        print(bench_report.verdict_table(report["verdicts"]))
    for name, why in report["skipped"].items():
        print(f"skipped {name}: {why}")
    print(f"\nload average: start {report['loadavg_start']}, end {report['loadavg_end']}; {report['wall_seconds']} s")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
