"""The ERROR-log guard in tests/conftest.py: an ERROR from a `wsproxy` logger, or in a proxy
subprocess's output, fails the test that did not declare it; a declared one passes; a declaration
names one error and does not cover another."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import subprocess_errors

pytest_plugins = ["pytester"]

INNER = """
import logging

import pytest

from tests.support import watch_proxy_output

log = logging.getLogger("wsproxy.runtime.reactor")


def test_unexpected_error():
    log.error("reactor callback failed")


@pytest.mark.expect_errors(r"reactor callback failed")
def test_expected_error():
    log.error("reactor callback failed")


@pytest.mark.expect_errors(r"reactor callback failed")
def test_expecting_one_error_does_not_cover_another():
    log.error("reactor callback failed")
    logging.getLogger("wsproxy.runtime.session").error("session from 127.0.0.1:1 failed")


@pytest.mark.expect_errors(r"reactor callback failed")
def test_an_expected_error_that_never_comes():
    pass


def test_warnings_and_other_loggers_pass():
    log.warning("a peer sent a bad frame")
    logging.getLogger("websockets.server").error("not ours")


def test_unexpected_error_in_a_proxy_subprocess():
    out = "2026-01-01 10:00:00,000 INFO wsproxy: ready\\n"
    out += "2026-01-01 10:00:01,000 ERROR wsproxy.session: session failed\\n"
    watch_proxy_output(lambda: out)


@pytest.mark.expect_errors(r"cannot start")
def test_expected_error_in_a_proxy_subprocess():
    watch_proxy_output(lambda: "2026-01-01 10:00:00,000 ERROR wsproxy: cannot start: in use\\n")
"""


def inner_outcomes(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Run INNER with the guard (tests/conftest.py as a plugin) in a subprocess: the guard of this
    test must not see the inner tests' records. Returns each inner test's outcome. The checkout
    goes on the subprocess's path so that `tests.conftest` imports from pytester's folder."""
    root = str(Path(__file__).resolve().parents[2])
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p))
    pytester.makepyfile(test_inner=INNER)
    result = pytester.runpytest_subprocess("-p", "tests.conftest", "-p", "no:cacheprovider", "-rA")
    seen: dict[str, str] = {}
    for line in result.outlines:
        for word in ("PASSED", "FAILED", "ERROR"):
            if line.startswith(word + " ") and "::" in line:
                name = line.split("::", 1)[1].split(" ", 1)[0]
                seen[name] = "failed" if word != "PASSED" else seen.get(name, "passed")
    return seen


def test_the_guard_fails_unexpected_errors_and_passes_declared_ones_only(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    outcomes = inner_outcomes(pytester, monkeypatch)
    # an ERROR nobody declared fails the test, in this process or in a proxy subprocess's output
    assert outcomes["test_unexpected_error"] == "failed"
    assert outcomes["test_unexpected_error_in_a_proxy_subprocess"] == "failed"
    # a declared one passes; warnings and other libraries' loggers are not the guard's business
    assert outcomes["test_expected_error"] == "passed"
    assert outcomes["test_expected_error_in_a_proxy_subprocess"] == "passed"
    assert outcomes["test_warnings_and_other_loggers_pass"] == "passed"
    # a declaration is specific: it does not cover another error, and a stale one fails
    assert outcomes["test_expecting_one_error_does_not_cover_another"] == "failed"
    assert outcomes["test_an_expected_error_that_never_comes"] == "failed"
    assert len(outcomes) == 7


def test_subprocess_output_is_split_into_records_with_their_tracebacks() -> None:
    out = (
        "2026-01-01 10:00:00,000 INFO wsproxy: listening on ws://127.0.0.1:1\n"
        "2026-01-01 10:00:01,000 ERROR wsproxy.session: session from 127.0.0.1:2 failed\n"
        "Traceback (most recent call last):\n"
        '  File "x.py", line 1, in f\n'
        "ValueError: boom\n"
        "2026-01-01 10:00:02,000 WARNING wsproxy.session: client sent a bad frame\n"
        '{"time": "t", "level": "error", "logger": "wsproxy", "message": "json error"}\n'
        "Traceback (most recent call last):\n"
        '  File "y.py", line 2, in g\n'
        "KeyError: 'k'\n"
    )
    assert subprocess_errors(out) == [
        "2026-01-01 10:00:01,000 ERROR wsproxy.session: session from 127.0.0.1:2 failed ... ValueError: boom",
        '{"time": "t", "level": "error", "logger": "wsproxy", "message": "json error"} ... KeyError: \'k\'',
    ]
    uncaught = "2026-01-01 10:00:00,000 INFO wsproxy: ready\nTraceback (most recent call last):\nOSError: x\n"
    assert subprocess_errors(uncaught) == ["Traceback (most recent call last): ... OSError: x"]
