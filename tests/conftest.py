"""Shared fixtures: TLS files from trustme, websockets backends that stop after each test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

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
