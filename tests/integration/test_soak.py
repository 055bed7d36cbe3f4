"""The soak with faults (benchmarks/soak.py), in a short version: nothing lost that no fault touched.

The full run (10 minutes, 300 sessions; its table is in docs/reliability.md) is a benchmark; this
runs the same script for 45 s with 40 sessions, long enough for one of each fault kind (backend
killed and restarted, stalled, removed and re-added by reload, both idle-cutting relays, slow
readers, a burst past the cap), and fails if a message is lost on a session no fault closed, an
echo is corrupt, a close has no fault to explain it, the proxy's descriptors or VmRSS do not
return to their start, or the proxy died or logged a traceback. The script bounds itself (every
wait has a timeout; the run ends by duration + 120 s); so does this test.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import wsproxy

ROOT = Path(wsproxy.__file__).resolve().parent.parent
SOAK = ROOT / "benchmarks" / "soak.py"
FAULT_KINDS = {"kill_restart", "stall", "reload", "idle_cut_client", "idle_cut_backend", "slow_readers", "burst"}


@pytest.mark.timeout(240)
def test_a_soak_with_every_kind_of_fault_loses_nothing_no_fault_touched_and_leaves_nothing_behind(
    tmp_path: Path,
) -> None:
    out = tmp_path / "soak.json"
    done = subprocess.run(
        [sys.executable, str(SOAK), "--duration", "45", "--sessions", "40", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=200,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
    )
    print(done.stdout)
    assert out.exists(), done.stdout + done.stderr[-3000:]
    result = json.loads(out.read_text())
    messages = result["messages"]
    assert messages["sent"] > 500 and messages["delivered"] > 0.5 * messages["sent"], messages
    assert messages["lost_no_fault"] == 0, result
    assert messages["corrupt"] == 0, result
    assert result["closed_unexplained"] == {}, result["unexplained_sessions"]
    assert set(result["faults"]) == FAULT_KINDS, result["fault_log"]
    fds, rss = result["proxy"]["fds"], result["proxy"]["rss_mib"]
    assert fds["peak"] > fds["start"] + 40  # the sessions were really there
    assert fds["end"] <= fds["start"] + 4, fds
    assert rss["end"] <= rss["start"] * 1.05, rss
    assert result["verdict"] == "PASS" and done.returncode == 0, result["failures"]
