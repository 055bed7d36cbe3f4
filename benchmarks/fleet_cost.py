"""What `shared_state` costs a handshake: wsproxy with and without Redis, in the same run.

Both proxies have the same limits set (a per-address handshake rate, per-address, per-pool and
global session caps, all far above what the load reaches, so nothing is refused): without
`shared_state` each is a local decision; with it, each handshake runs two Redis scripts (the
GCRA rate check and the session-cap admission) and every process runs one refresh script per
`shared_state.refresh`. Cells alternate (alone, fleet, alone, fleet, ...) so drift on a shared
machine hits both. The proxy is pinned to CPU 0, and the load generator (benchmarks/load_client.py
`hs`: open a session, close it, open the next), the picows echo backend and redis-server to CPU 1
when `taskset` exists. Redis's own count of commands is read around each fleet cell.

    python benchmarks/fleet_cost.py                 # 2 rounds of 4 s cells
    python benchmarks/fleet_cost.py --rounds 3 --duration 6 --json fleet.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PY = sys.executable
REDIS = shutil.which("redis-server") or "/usr/bin/redis-server"
READY_TIMEOUT = 20.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pin(cpu: int) -> list[str]:
    taskset = shutil.which("taskset")
    return [taskset, "-c", str(cpu)] if taskset else []


def redis_command(port: int, *args: str) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
        sock.sendall((f"*{len(args)}\r\n" + "".join(f"${len(a)}\r\n{a}\r\n" for a in args)).encode())
        data = sock.recv(65536)
        if data.startswith(b"$"):
            size = int(data[1 : data.index(b"\r\n")])
            while len(data) < data.index(b"\r\n") + 2 + size + 2:
                data += sock.recv(65536)
        return data.decode(errors="replace")


def redis_counts(port: int) -> tuple[int, int]:
    """(script calls, commands in all: those a script runs count too) Redis processed so far."""
    info = redis_command(port, "INFO", "commandstats")
    scripts = commands = 0
    for line in info.splitlines():
        if line.startswith("cmdstat_"):
            name, stats = line[8:].split(":", 1)
            calls = int(stats.split(",")[0].split("=")[1])
            commands += calls
            if name in ("evalsha", "eval"):
                scripts += calls
    return scripts, commands


def proxy_config(port: int, backend: int, redis_port: int | None) -> str:
    text = f"""
listeners: [{{address: 127.0.0.1:{port}, pool: p}}]
pools: {{p: {{balance: least_conn, max_sessions: 1000000, backends: [127.0.0.1:{backend}]}}}}
limits: {{max_sessions: 1000000}}
rate_limits: {{handshakes_per_ip: {{rate: 1000000, burst: 1000000}}, max_sessions_per_ip: 1000000}}
heartbeat: {{interval: off}}
log: {{level: warning}}
shutdown: {{drain_window: 0s, deadline: 2s}}
"""
    if redis_port is not None:
        text += f"shared_state: {{redis: 'redis://127.0.0.1:{redis_port}/0', timeout: 250ms}}\n"
    return text


def start_proxy(path: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [*pin(0), PY, "-m", "wsproxy", "run", "-c", str(path)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    return proc


def wait_listening(port: int, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"proxy exited: {proc.stderr.read() if proc.stderr else ''}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit("proxy did not listen in time")


def run_cell(url: str, watch: int, args: argparse.Namespace) -> dict:
    argv = [*pin(1), PY, str(HERE / "load_client.py"), "hs", "--url", url, "--conns", str(args.conns)]
    argv += ["--warmup", str(args.warmup), "--duration", str(args.duration), "--watch", str(watch)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=ROOT)
    if done.returncode != 0 or not done.stdout.strip():
        return {"error": done.stderr.strip()[-400:]}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    cpu = result.pop("cpu", {}) or {}
    result["cpu_proxy"] = round(cpu.get(str(watch), 0.0), 3)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--duration", type=float, default=4.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--conns", type=int, default=32)
    p.add_argument("--json", help="write every cell here")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fleet-cost-"))
    procs: list[subprocess.Popen[str]] = []
    try:
        redis_port = free_port()
        redis = subprocess.Popen(
            [*pin(1), REDIS, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        procs.append(redis)
        echo = subprocess.Popen(
            [*pin(1), PY, str(HERE / "echo_server.py"), "--count", "1", "--max-seconds", "1800"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        procs.append(echo)
        assert echo.stdout is not None
        backend = json.loads(echo.stdout.readline())["plain"][0]
        time.sleep(0.3)
        targets = {}
        for name, rport in (("alone", None), ("fleet", redis_port)):
            port = free_port()
            path = work / f"{name}.yaml"
            path.write_text(proxy_config(port, backend, rport))
            proc = start_proxy(path)
            procs.append(proc)
            wait_listening(port, proc)
            targets[name] = (f"ws://127.0.0.1:{port}/", proc.pid)
        cells = []
        for r in range(args.rounds):
            for name, (url, pid) in targets.items():
                before = redis_counts(redis_port)
                result = run_cell(url, pid, args)
                after = redis_counts(redis_port)
                result.update(
                    target=name, round=r + 1, redis_scripts=after[0] - before[0], redis_commands=after[1] - before[1]
                )
                cells.append(result)
                print(json.dumps(result), file=sys.stderr)
        print(
            f"{'target':8} {'round':>5} {'handshakes/s':>13} {'p50 ms':>8} {'p99 ms':>8} {'cpu ms/hs':>9} "
            f"{'scripts/hs':>10} {'cmds/hs':>8}"
        )
        for c in cells:
            if "error" in c:
                print(f"{c['target']:8} {c['round']:>5} error: {c['error']}")
                continue
            n = max(1, c["handshakes"])
            print(
                f"{c['target']:8} {c['round']:>5} {c['rate']:>13.0f} {c['p50_us'] / 1000:>8.2f} "
                f"{c['p99_us'] / 1000:>8.2f} {c['cpu_proxy'] * 1000 / n:>9.3f} {c['redis_scripts'] / n:>10.2f} "
                f"{c['redis_commands'] / n:>8.2f}"
            )
        print(
            "(cpu ms/hs: the proxy's CPU per handshake, which holds on a busy machine where handshakes/s does not; "
            "scripts/hs and cmds/hs: Redis's counts over the whole cell, warm-up and refresh scripts included)"
        )
        ok = [c for c in cells if "error" not in c]
        alone = [c["rate"] for c in ok if c["target"] == "alone"]
        fleet = [c["rate"] for c in ok if c["target"] == "fleet"]
        if alone and fleet:
            a, f = sum(alone) / len(alone), sum(fleet) / len(fleet)
            print(f"mean handshakes/s: alone {a:.0f}, with shared_state {f:.0f} ({f / a:.2f} x)")
        if args.json:
            Path(args.json).write_text(json.dumps(cells, indent=1))
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
