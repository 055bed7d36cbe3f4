"""Shared fixtures: TLS files from trustme, websockets backends that stop after each test, and the
ERROR-log guard.

The guard (`error_guard`, autouse) fails every test during which wsproxy logged ERROR or worse: a
`wsproxy.*` logger in this process, or a proxy subprocess whose output its helper registered with
`tests.support.watch_proxy_output` (an " ERROR " line, a JSON `"level": "error"` line or a
traceback). A test that provokes an error on purpose says which one:
`@pytest.mark.expect_errors(r"reactor callback failed")`. Every pattern (a regular expression,
searched in "logger: message" or in the subprocess's log line) must match at least one error, and
every error must match one of the patterns, so an expectation cannot hide a different error.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests import support
from tests.support import Backend, TLSFiles, make_tls_files


@pytest.fixture
def tls_files(tmp_path: Path) -> TLSFiles:
    return make_tls_files(tmp_path)


@pytest.fixture
def backends() -> Iterator[list[Backend]]:
    """Append started backends here (tests.support.start_backend); all are stopped afterwards."""
    started: list[Backend] = []
    yield started
    for b in started:
        b.stop()


# --------------------------------------------------------------------------------------------
# the ERROR-log guard


class _ErrorRecords(logging.Handler):
    """Keeps every record at ERROR or above that reaches the `wsproxy` logger."""

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.errors: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = f"{record.name}: {record.getMessage()}"
        if record.exc_info and record.exc_info[1] is not None:
            text += f" [{type(record.exc_info[1]).__name__}: {record.exc_info[1]}]"
        self.errors.append(text)


# A proxy subprocess's log record starts with a timestamp (text format) or "{" (JSON); other lines
# continue the record above them (the traceback under log.exception). A traceback under no ERROR
# line (an uncaught exception) is a record of its own.
_RECORD_START = re.compile(r"^(\d{4}-\d\d-\d\d[ T]|\{)")
_ERROR_LINE = re.compile(r" (ERROR|CRITICAL) |\"level\": \"(error|critical)\"")
_TRACEBACK = "Traceback (most recent call last):"


def subprocess_errors(output: str) -> list[str]:
    """The error records in a proxy subprocess's output, each as its first and last line."""
    records: list[list[str]] = []
    for line in output.splitlines():
        starts = _RECORD_START.match(line) or (
            line.startswith(_TRACEBACK)
            and records
            and not _ERROR_LINE.search(records[-1][0])
            and not records[-1][0].startswith(_TRACEBACK)  # a chained exception stays one record
        )
        if starts or not records:
            records.append([line])
        else:
            records[-1].append(line)
    return [
        rec[0] if len(rec) == 1 else f"{rec[0]} ... {rec[-1]}"
        for rec in records
        if _ERROR_LINE.search(rec[0]) or rec[0].startswith(_TRACEBACK)
    ]


@dataclass
class ErrorGuard:
    patterns: list[re.Pattern[str]]
    handler: _ErrorRecords = field(default_factory=_ErrorRecords)

    def problems(self, errors: list[str]) -> list[str]:
        unexpected = [e for e in errors if not any(p.search(e) for p in self.patterns)]
        unseen = [p.pattern for p in self.patterns if not any(p.search(e) for e in errors)]
        out = [f"unexpected ERROR: {e}" for e in unexpected]
        out += [f"expected an ERROR matching {p!r}, none was logged" for p in unseen]
        return out


@pytest.fixture(autouse=True)
def error_guard(request: pytest.FixtureRequest) -> Iterator[ErrorGuard]:
    """Fails the test if wsproxy logged an ERROR it did not declare with @pytest.mark.expect_errors."""
    patterns = [re.compile(p) for mark in request.node.iter_markers("expect_errors") for p in mark.args]
    guard = ErrorGuard(patterns)
    logger = logging.getLogger("wsproxy")
    logger.addHandler(guard.handler)
    support.watched_outputs.clear()
    try:
        yield guard
    finally:
        logger.removeHandler(guard.handler)
    errors = list(guard.handler.errors)
    for read in support.watched_outputs:
        errors += subprocess_errors(read())
    support.watched_outputs.clear()
    problems = guard.problems(errors)
    if problems:
        pytest.fail("wsproxy logged errors this test does not expect:\n  " + "\n  ".join(problems), pytrace=False)
