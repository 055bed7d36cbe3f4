"""Build and drive the compiled handshake generator (hs_gen.c) for relay_bench.py's handshake cells.

The picows generator could not open sessions as fast as a direct connection to the backends takes
them, so the handshake cells measured the client. hs_gen.c does connect, TLS and the Upgrade in C
on one epoll loop; this module compiles it once per source version (`gcc -O2 ... -lssl -lcrypto`,
into ~/.cache/wsproxy-bench, else the run's workdir), starts one or more generator processes pinned
like the Python one, reads every watched process's CPU from /proc over the same window the
generators count in, and returns a result in load_client.py's shape, so relay_bench.py names the
processes and flags `gen-sat` the same way for both generators.

    python benchmarks/hs_driver.py --build   # compile (or find the cached build) and print its path
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from load_client import CpuWindow

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "hs_gen.c"
START_DELAY = 0.3  # seconds between spawning the generators and their common start (they all start together)
EXIT_GRACE = 15.0  # seconds a generator may take past its own bound before it is given up on


class BuildError(RuntimeError):
    """The generator cannot be compiled here (no gcc, no OpenSSL headers): the message says what to install."""


def build(workdir: Path | None = None) -> Path:
    """The compiled generator, built on first use and cached by the source's hash."""
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "wsproxy-bench"
    places = [cache] + ([workdir] if workdir is not None else [])
    for place in places:
        binary = place / f"hs_gen-{digest}"
        if binary.exists():
            return binary
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        raise BuildError("the handshake cells need a C compiler (Debian: apt-get install gcc libssl-dev)")
    errors = []
    for place in places:
        binary = place / f"hs_gen-{digest}"
        try:
            place.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            errors.append(f"{place}: {exc}")
            continue
        tmp = place / f".hs_gen-{digest}.{os.getpid()}"
        argv = [gcc, "-O2", "-Wall", "-o", str(tmp), str(SOURCE), "-lssl", "-lcrypto"]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        if done.returncode == 0:
            tmp.replace(binary)
            return binary
        tmp.unlink(missing_ok=True)
        if "openssl/" in done.stderr and "No such file" in done.stderr:
            raise BuildError("the handshake cells need the OpenSSL headers (Debian: apt-get install libssl-dev)")
        errors.append(done.stderr.strip()[-800:])
    raise BuildError("compiling benchmarks/hs_gen.c failed:\n" + "\n".join(errors))


def ports(urls: list[str]) -> tuple[str, list[int]]:
    """The one host and the ports of ws:// / wss:// URLs (the generator takes one host, many ports)."""
    parts = [urlsplit(u) for u in urls]
    hosts = {p.hostname for p in parts}
    if len(hosts) != 1:
        raise ValueError(f"one host expected, got {sorted(h or '' for h in hosts)}")
    return parts[0].hostname or "127.0.0.1", [p.port or (443 if p.scheme == "wss" else 80) for p in parts]


@dataclass
class GenRun:
    """What every generator process of a cell is given."""

    binary: Path
    pin: list[str]  # the taskset prefix (empty: no pinning)
    urls: list[str]
    ca: Path | None
    tls: bool
    resume: bool = False

    def argv(self, mode: str, conns: int, start_at: float, extra: list[str]) -> list[str]:
        host, port_list = ports(self.urls)
        argv = [*self.pin, str(self.binary), "--mode", mode, "--host", host, "--conns", str(conns)]
        argv += ["--start-at", f"{start_at:.3f}", *extra]
        for p in port_list:
            argv += ["--port", str(p)]
        if self.tls:
            argv.append("--tls")
            if self.ca is not None:
                argv += ["--ca", str(self.ca)]
        if self.resume:
            argv.append("--resume")
        return argv


def run_generators(
    argvs: list[list[str]], *, watch: list[int], start_at: float, window: tuple[float, float] | None, bound: float
) -> tuple[list[dict], dict, list[str]]:
    """Start the generators, read CPU over `window` (seconds after start_at; None: until they exit),
    wait for them (at most `bound` + grace). Returns their JSON results, the CPU reading in
    load_client.py's shape ("self" is the generators together) and their stderr."""
    procs = [subprocess.Popen(a, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for a in argvs]
    gen_pids = [p.pid for p in procs]
    cpu = CpuWindow([*gen_pids, *watch])
    try:
        if window is not None:
            time.sleep(max(0.0, start_at + window[0] - time.time()))
            cpu.start()
            time.sleep(max(0.0, start_at + window[0] + window[1] - time.time()))
            cpu.stop()
        else:
            time.sleep(max(0.0, start_at - time.time()))
            cpu.start()
        outs = []
        deadline = time.monotonic() + bound + EXIT_GRACE
        for p in procs:
            out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            outs.append((p.returncode, out, err))
        if window is None:
            cpu.stop()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(5)
    results, errs = [], []
    for code, out, err in outs:
        if err.strip():
            errs.append(err.strip()[-400:])
        if code != 0 or not out.strip():
            raise RuntimeError(f"hs_gen failed ({code}): {err.strip()[-400:]}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    reading = {pid: v for pid, v in cpu.result.items() if pid not in {str(p) for p in gen_pids}}
    if window is None:  # the generators have exited: their own CPU (getrusage) over the time since the start
        elapsed = max(time.time() - start_at, 1e-3)
        reading["self"] = round(sum(r.get("cpu_s", 0.0) for r in results) / elapsed, 3)
    else:
        reading["self"] = round(sum(cpu.result.get(str(p), 0.0) for p in gen_pids), 3)
    return results, {"cpu": reading, "cpu_busy": cpu.busy}, errs


def merge_error_kinds(results: list[dict]) -> dict[str, int]:
    kinds: dict[str, int] = {}
    for r in results:
        for k, n in r.get("error_kinds", {}).items():
            kinds[k] = kinds.get(k, 0) + n
    return kinds


def run_hs(
    gen: GenRun, *, conns: int, procs: int, warmup: float, duration: float, watch: list[int], timeout: float = 10.0
) -> dict:
    """A handshake cell: `procs` generators with `conns` sessions in flight between them, closed loop."""
    procs = max(1, min(procs, conns))
    start_at = time.time() + START_DELAY
    bound = warmup + duration + 5.0
    extra = ["--warmup", str(warmup), "--duration", str(duration), "--timeout", str(timeout)]
    extra += ["--max-seconds", str(bound)]
    shares = [conns // procs + (1 if i < conns % procs else 0) for i in range(procs)]
    argvs = [gen.argv("hs", n, start_at, extra) for n in shares]
    results, cpu, errs = run_generators(argvs, watch=watch, start_at=start_at, window=(warmup, duration), bound=bound)
    seconds = statistics.median(r["seconds"] for r in results)
    count = sum(r["handshakes"] for r in results)
    p50s = [r["p50_us"] for r in results if r["p50_us"] is not None]
    p99s = [r["p99_us"] for r in results if r["p99_us"] is not None]
    out = {
        "mode": "hs",
        "generator": f"hs_gen x{procs}",
        "conns": conns,
        "handshakes": count,
        "seconds": seconds,
        "rate": round(count / seconds, 1) if seconds else None,
        # one process: exact; several: the median of their p50s and the largest p99
        "p50_us": statistics.median(p50s) if p50s else None,
        "p99_us": max(p99s) if p99s else None,
        "tls_full": sum(r["tls_full"] for r in results),
        "tls_resumed": sum(r["tls_resumed"] for r in results),
        "errors": sum(r["errors"] for r in results),
        "error_kinds": merge_error_kinds(results),
        **cpu,
    }
    if errs:
        out["stderr"] = " | ".join(errs)[-600:]
    return out


def main() -> None:
    if sys.argv[1:] != ["--build"]:
        sys.exit(__doc__)
    try:
        print(build())
    except BuildError as exc:
        sys.exit(str(exc))


if __name__ == "__main__":
    main()
