"""A brief run of every fuzz target (tests/fuzz/targets.py) with each test run, and the entry point.

Long runs: `python -m tests.fuzz --minutes N` (docs/fuzzing.md).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from tests.fuzz.targets import TARGETS

REPO = Path(__file__).resolve().parents[2]
BRIEF = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
BRIEF_TARGETS = {name: BRIEF(fn) for name, fn in TARGETS.items()}


def test_every_kind_of_input_the_issue_names_has_a_target():
    assert {"request_bytes", "config_yaml", "origins", "relay_frames"} <= set(TARGETS)


@pytest.mark.parametrize("name", sorted(BRIEF_TARGETS))
def test_fuzz_target_briefly(name: str) -> None:
    BRIEF_TARGETS[name]()


def test_fuzz_entry_point_runs_for_the_time_asked_and_reports_each_target() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tests.fuzz", "--seconds", "1", "--examples", "10"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    for name in TARGETS:
        assert f"{name}: " in result.stdout and "no failure" in result.stdout
